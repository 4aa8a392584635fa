"""HTTP Basic auth for the local endpoint, from the file named by ``local_http.basic_auth_file``.

One user a line, ``user:password`` or ``user:$sha256$<salt>$<hex>`` where hex is
SHA-256 of salt + password (``python -m edge.local.auth USER`` prints such a line);
blank lines and lines starting with ``#`` are skipped.  A plain SHA-256 is enough here:
the file is readable only by root and flexedge, and every check must stay cheap, since it
runs on the control loop.  Nothing here logs a secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

HASH_PREFIX = "$sha256$"
MAX_FILE_BYTES = 64 * 1024


class AuthFileError(ValueError):
    """The auth file cannot be used; the message names the file and the line, never a secret."""


@dataclass(frozen=True, slots=True)
class _Secret:
    salt: bytes | None  # None: a plain password
    digest: bytes  # the plain password's bytes, or SHA-256(salt + password)

    def matches(self, password: str) -> bool:
        given = password.encode()
        if self.salt is not None:
            given = hashlib.sha256(self.salt + given).digest()
        return hmac.compare_digest(given, self.digest)


class BasicAuth:
    """The users allowed in; ``allows(header)`` checks one ``Authorization`` header value."""

    def __init__(self, users: dict[str, _Secret]):
        self._users = users

    @classmethod
    def load(cls, path: Path) -> "BasicAuth":
        """Read and check the file (blocking: call it through asyncio.to_thread)."""
        try:
            raw = Path(path).read_bytes()[: MAX_FILE_BYTES + 1]
        except OSError as error:
            raise AuthFileError(f"local_http.basic_auth_file {path}: cannot be read: {error.strerror or error}") from None
        if len(raw) > MAX_FILE_BYTES:
            raise AuthFileError(f"local_http.basic_auth_file {path}: larger than {MAX_FILE_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise AuthFileError(f"local_http.basic_auth_file {path}: not UTF-8 text") from None
        users: dict[str, _Secret] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, colon, secret = line.partition(":")
            if not colon or not user or not secret:
                raise AuthFileError(f"local_http.basic_auth_file {path}:{number}: expected user:password "
                                    f"or user:{HASH_PREFIX}<salt>$<hex>")
            if user in users:
                raise AuthFileError(f"local_http.basic_auth_file {path}:{number}: user {user!r} appears twice")
            users[user] = _parse_secret(secret, f"local_http.basic_auth_file {path}:{number}")
        if not users:
            raise AuthFileError(f"local_http.basic_auth_file {path}: names no user")
        return cls(users)

    def allows(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, colon, password = decoded.partition(":")
        secret = self._users.get(user)
        return bool(colon) and secret is not None and secret.matches(password)


def _parse_secret(secret: str, where: str) -> _Secret:
    if not secret.startswith(HASH_PREFIX):
        return _Secret(None, secret.encode())
    salt, dollar, digest = secret[len(HASH_PREFIX):].partition("$")
    try:
        digest_bytes = bytes.fromhex(digest)
    except ValueError:
        digest_bytes = b""
    if not dollar or not salt or len(digest_bytes) != 32:
        raise AuthFileError(f"{where}: a hashed password is {HASH_PREFIX}<salt>$<64 hex digits>")
    return _Secret(salt.encode(), digest_bytes)


def hashed_line(user: str, password: str) -> str:
    """A line for the auth file, the password salted and hashed."""
    if not user or ":" in user or any(c.isspace() for c in user):
        raise ValueError(f"a user name has no ':' or spaces, got {user!r}")
    salt = secrets.token_hex(8)
    return f"{user}:{HASH_PREFIX}{salt}${hashlib.sha256((salt + password).encode()).hexdigest()}"


def main(argv: list[str] | None = None) -> int:
    """``python -m edge.local.auth USER``: asks for the password, prints the line for the file."""
    import getpass

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m edge.local.auth USER   (prints a line for local_http.basic_auth_file)", file=sys.stderr)
        return 2
    password = getpass.getpass(f"password for {args[0]}: ")
    if not password or password != getpass.getpass("again: "):
        print("the passwords are empty or differ", file=sys.stderr)
        return 1
    print(hashed_line(args[0], password))
    return 0


if __name__ == "__main__":
    sys.exit(main())
