"""Passwords from a file or the environment, never from the profile: one rule for the chargers'
own Basic auth and for the links to their CPO backends."""

from __future__ import annotations

import os
from pathlib import Path


def read_password(password_file: Path | None, password_env: str | None, key_prefix: str = "") -> str | None:
    """The password, read now (blocking: call it in a thread from the event loop); never logged.
    None: none configured.  One that is configured but cannot be had (missing or empty file,
    unset variable) raises ValueError naming the key (``key_prefix`` + ``password_file``) and why,
    so that a caller fails closed."""
    if password_file:
        try:
            lines = password_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{key_prefix}password_file {password_file}: cannot read it: {error}") from None
        if not lines or not lines[0].strip():
            raise ValueError(f"{key_prefix}password_file {password_file} is empty")
        return lines[0]
    if password_env:
        value = os.environ.get(password_env)
        if not value:
            raise ValueError(f"{key_prefix}password_env: environment variable {password_env} is not set")
        return value
    return None
