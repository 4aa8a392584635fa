"""The profile's ``local_http`` section: the gateway's local HTTP endpoint (docs/local.md).

Absent: no endpoint.  Present: metrics, /health and the status page on ``host:port``,
loopback unless the profile says otherwise, read-only, with optional HTTP Basic auth.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, field_validator

from edge.config.types import Port, Strict

DEFAULT_PORT = 8750


class LocalHttp(Strict):
    host: str = Field(
        "127.0.0.1",
        description="Address to listen on: 127.0.0.1 (or ::1) keeps the endpoint on this machine; another "
                    "address exposes it to that network, so give it a basic_auth_file.",
    )
    port: Port = Field(DEFAULT_PORT, description="TCP port of the endpoint.")
    basic_auth_file: Path | None = Field(
        None,
        description="File of `user:password` or `user:$sha256$<salt>$<hex>` lines; present: every request "
                    "needs HTTP Basic auth (docs/local.md).",
    )

    @field_validator("host")
    @classmethod
    def _plain_host(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value) or "/" in value or len(value) > 253:
            raise ValueError(f"must be an IP address or a host name, got {value!r}")
        return value

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the endpoint."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: it may resolve to anything
