"""The OCPP websocket handshake's pieces: which OCPP a subprotocol is, who a connecting charger
says it is (its charge point id from the URL) and its HTTP Basic credentials checked against its
password.  The gateway's central system and its proxy use these, and so does the CPO backend
simulator, which meets the gateway's proxied links the same way."""

from __future__ import annotations

import hmac
from urllib.parse import unquote

from websockets.exceptions import InvalidHeader
from websockets.headers import parse_authorization_basic

SUBPROTOCOLS = {"2.1": "ocpp2.1", "2.0.1": "ocpp2.0.1", "1.6": "ocpp1.6"}  # newest first: the preferred
VERSIONS = {name: version for version, name in SUBPROTOCOLS.items()}


def charge_point_id(prefix_path: str, path: str) -> str | None:
    """The last path segment after ``prefix_path``, or None when the URL does not name one charger."""
    prefix = prefix_path.rstrip("/") + "/"
    path = path.split("?", 1)[0]
    if not path.startswith(prefix):
        return None
    cp_id = unquote(path[len(prefix):])
    return cp_id if cp_id and "/" not in cp_id else None


def check_basic(header: str | None, cp_id: str, password: str) -> str:
    """'' when the Basic credentials (the Authorization header) are this charger's, else why not
    (no secret in the text)."""
    if header is None:
        return "no credentials"
    try:
        user, given = parse_authorization_basic(header)
    except InvalidHeader:
        return "malformed Authorization header"
    if user != cp_id:
        return "user name is not the charge point id"
    if not hmac.compare_digest(given.encode(), password.encode()):
        return "wrong password"
    return ""
