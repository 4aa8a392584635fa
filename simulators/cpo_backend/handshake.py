"""What the CPO backend checks before a charger's websocket opens: URL, credentials, TLS, subprotocol."""

from __future__ import annotations

import ssl
from pathlib import Path

from websockets.exceptions import NegotiationError
from websockets.typing import Subprotocol

from drivers.ocpp.identity import SUBPROTOCOLS


def check_security(security_profile: int, cert_file, key_file, ca_file) -> None:
    if security_profile not in (1, 2, 3):
        raise ValueError(f"security_profile must be 1, 2 or 3, got {security_profile!r}")
    if security_profile == 1 and (cert_file or key_file or ca_file):
        raise ValueError("cert_file/key_file/ca_file need security_profile 2 or 3 (profile 1 is plain ws)")
    if security_profile >= 2 and not (cert_file and key_file):
        raise ValueError(f"security_profile {security_profile} needs cert_file and key_file (the server's)")
    if security_profile == 3 and not ca_file:
        raise ValueError("security_profile 3 needs ca_file (the CA that signs the chargers' certificates)")


def server_ssl_context(security_profile: int, cert_file: str | Path | None, key_file: str | Path | None,
                       ca_file: str | Path | None) -> ssl.SSLContext | None:
    """None for profile 1; TLS for 2; TLS with a required client certificate for 3.  Blocking (reads files)."""
    if security_profile == 1:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
        if security_profile == 3:
            context.load_verify_locations(cafile=str(ca_file))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"CPO backend TLS files (cert_file/key_file/ca_file): {error}") from None
    return context


def select_subprotocol(versions: tuple[str, ...], offered) -> Subprotocol:
    """The newest of ``versions`` the charger offers; NegotiationError (HTTP 400) when none."""
    for version, name in SUBPROTOCOLS.items():
        if version in versions and name in offered:
            return Subprotocol(name)
    wanted = ", ".join(SUBPROTOCOLS[v] for v in versions)
    raise NegotiationError(f"charger offers {', '.join(offered) or 'no subprotocol'}; want one of {wanted}")
