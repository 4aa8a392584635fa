"""The ``upstream:`` key of an OCPP charger: the CPO backend the gateway proxies it to.

Strict like every profile model; passwords come from a file or the environment, never
from the profile itself, and TLS to the backend always verifies its certificate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from edge.config.types import Strict, _ranged

from drivers.ocpp.secret import read_password

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:*+|@-]{0,47}$"


class UpstreamLink(Strict):
    url: str = Field(description="The CPO backend's websocket URL; the charge point id is appended as the last path "
                                 "segment (ws:// only with security_profile 1).")
    charge_point_id: Annotated[str, Field(pattern=ID_PATTERN)] | None = Field(
        None, description="The charger's identity at the backend (URL and Basic auth user); default its own.")
    security_profile: Literal[1, 2, 3] = Field(
        2, description="Toward the backend. 1: Basic auth over ws; 2: TLS + Basic auth; 3: mutual TLS.")
    password_file: Path | None = Field(None, description="File whose first line is the Basic auth password "
                                                         "(profiles 1 and 2).")
    password_env: str | None = Field(None, description="Environment variable holding the Basic auth password.")
    cert_file: Path | None = Field(None, description="Client certificate (PEM) presented to the backend, profile 3.")
    key_file: Path | None = Field(None, description="Private key of the client certificate, profile 3.")
    ca_file: Path | None = Field(None, description="CA bundle that verifies the backend's certificate; default the "
                                                   "system's CAs.")
    connect_timeout_s: Annotated[float, _ranged(0.5, 120.0)] = Field(
        10.0, description="Time for the TCP, TLS and websocket handshakes to the backend.")
    response_timeout_s: Annotated[float, _ranged(0.5, 120.0)] = Field(
        10.0, description="Time the backend has to answer a forwarded or replayed message; then the gateway "
                          "answers the charger itself and queues transaction messages.")
    queue_max_messages: Annotated[int, _ranged(10, 100000)] = Field(
        1000, description="Transaction messages kept while the backend is unreachable; beyond it the oldest meter "
                          "values are dropped (transactions never).")
    stack_level: Annotated[int, _ranged(1, 100)] = Field(
        8, description="Stack level reserved for the gateway's own profile; the backend's profiles of the "
                       "gateway's purpose at or above it are refused.")
    away_close_s: Annotated[float, _ranged(0.0, 3600.0)] = Field(
        30.0, description="How long the backend link stays open after the charger disconnected (the backend's "
                          "requests meanwhile get CALLERROR GenericError).")

    @model_validator(mode="before")
    @classmethod
    def _no_secrets_inline(cls, data: Any) -> Any:
        if isinstance(data, dict) and "password" in data:
            raise ValueError("password: passwords do not go into the profile; use password_file or password_env")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "UpstreamLink":
        parts = urlsplit(self.url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"url must be ws://host/... or wss://host/..., got {self.url!r}")
        if parts.username or parts.password:
            raise ValueError("url: credentials do not go into the URL; use password_file or password_env")
        if self.security_profile >= 2 and parts.scheme != "wss":
            raise ValueError(f"url: security_profile {self.security_profile} needs a wss:// URL (TLS), "
                             f"got {parts.scheme}://")
        if self.security_profile == 1 and parts.scheme != "ws":
            raise ValueError("url: security_profile 1 is Basic auth over ws://; use 2 for wss://")
        if self.password_file and self.password_env:
            raise ValueError("give password_file or password_env, not both")
        if self.security_profile == 3:
            if self.cert_file is None or self.key_file is None:
                raise ValueError("security_profile 3 (mutual TLS) needs cert_file and key_file")
            if self.password_file or self.password_env:
                raise ValueError("security_profile 3 authenticates with the client certificate: "
                                 "no password_file/password_env")
        elif self.cert_file or self.key_file:
            raise ValueError("cert_file/key_file are for security_profile 3")
        return self

    def station_url(self, own_id: str) -> str:
        """The URL the gateway connects to for this charger: ``url`` + '/' + its id at the backend."""
        return self.url.rstrip("/") + "/" + (self.charge_point_id or own_id)

    def shown_url(self, own_id: str) -> str:
        """The URL for logs and events: no query string (it may carry tokens), never credentials."""
        parts = urlsplit(self.station_url(own_id))
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "?"

    def password(self) -> str | None:
        """The Basic auth password, read now (blocking); never logged.  ValueError names the key."""
        return read_password(self.password_file, self.password_env, "upstream.")
