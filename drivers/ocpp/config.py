"""Profile models of the OCPP driver: the site's central system and its chargers.

``OcppServer`` is site-level (one websocket server per site); ``OcppCharger``
is an asset.  Both forbid unknown keys and check ranges; units are in the key
names.  Every key is documented in docs/drivers/ocpp.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from edge.config.types import AssetBase, Port, Strict, _ranged

Amps = Annotated[float, _ranged(0.0, 1000.0)]
CHARGE_POINT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:*+|@-]{0,47}$"

PURPOSES_16 = ("TxDefaultProfile", "TxProfile", "ChargePointMaxProfile")
PURPOSES_201 = ("TxDefaultProfile", "TxProfile", "ChargingStationExternalConstraints", "ChargingStationMaxProfile")


class LocalList(Strict):
    mode: Literal["local_list"] = "local_list"
    id_tags: list[Annotated[str, Field(min_length=1, max_length=36)]] = Field(
        default_factory=list, description="ID tags (1.6 idTag / 2.0.1 idToken) allowed to charge."
    )


class AcceptAll(Strict):
    mode: Literal["accept_all"] = "accept_all"


class OcppServer(Strict):
    host: str = Field("0.0.0.0", description="Listen address of the central system.")
    port: Port = Field(9000, description="Listen port (ws:// for security profile 1, wss:// for 2 and 3).")
    path: str = Field("/ocpp", description="URL prefix; a charger connects to <path>/<charge_point_id>.")
    security_profile: Literal[1, 2, 3] = Field(
        1, description="1: Basic auth over ws; 2: TLS + Basic auth; 3: mutual TLS (client certificate)."
    )
    cert_file: Path | None = Field(None, description="Server certificate (PEM), profiles 2 and 3.")
    key_file: Path | None = Field(None, description="Private key of the server certificate.")
    ca_file: Path | None = Field(None, description="CA bundle that signs charger certificates (profile 3).")
    authorize: LocalList | AcceptAll = Field(
        default_factory=LocalList, discriminator="mode",
        description="How Authorize / StartTransaction ID tags are checked.",
    )
    id_tag_salt_file: Path = Field(
        Path("/var/lib/flexedge/ocpp-id-salt"),
        description="Secret salt of the ID tag hashes in events; created (mode 0600) if missing.",
    )
    heartbeat_interval_s: Annotated[int, _ranged(10, 86400)] = Field(
        60, description="Heartbeat interval given to chargers in the BootNotification response."
    )
    call_timeout_s: Annotated[float, _ranged(0.5, 60.0)] = Field(
        5.0, description="Time a charger has to answer a CALL from the central system."
    )
    ping_interval_s: Annotated[float, _ranged(1.0, 3600.0)] = Field(
        20.0, description="Websocket ping period; a link without pong for as long is closed."
    )
    boot_grace_s: Annotated[float, _ranged(0.5, 60.0)] = Field(
        5.0, description="Nothing is sent to a charger before its BootNotification is answered; one that "
                         "sends none within this time of connecting is taken as already booted."
    )

    @model_validator(mode="after")
    def _tls_files(self) -> "OcppServer":
        if not self.path.startswith("/") or self.path.endswith("/") and self.path != "/":
            raise ValueError(f"path must start with '/' and not end with '/', got {self.path!r}")
        if self.security_profile >= 2 and (self.cert_file is None or self.key_file is None):
            raise ValueError(f"security_profile {self.security_profile} needs cert_file and key_file")
        if self.security_profile == 3 and self.ca_file is None:
            raise ValueError("security_profile 3 (mutual TLS) needs ca_file to verify charger certificates")
        return self


class OcppCharger(AssetBase):
    kind: Literal["ev_charger"]
    driver: Literal["ocpp"]
    charge_point_id: Annotated[str, Field(pattern=CHARGE_POINT_ID_PATTERN)] = Field(
        description="Identity in the charger's URL (<path>/<charge_point_id>) and its Basic auth user name."
    )
    ocpp_version: Literal["1.6", "2.0.1", "auto"] = Field(
        "auto", description="Websocket subprotocol accepted from this charger; auto accepts both."
    )
    password_file: Path | None = Field(None, description="File whose first line is the Basic auth password.")
    password_env: str | None = Field(None, description="Environment variable holding the Basic auth password.")
    evse_id: Annotated[int, _ranged(1, 100)] = Field(1, description="2.0.1: EVSE controlled by this asset.")
    connector_id: Annotated[int, _ranged(0, 100)] = Field(
        1, description="1.6: connector controlled by this asset (0 = the whole charge point)."
    )
    phases: Literal[1, 3] = Field(3, description="Phases the charger feeds; used for A <-> W conversion.")
    voltage_v: Annotated[float, _ranged(100.0, 480.0)] = Field(230.0, description="Line-to-neutral voltage.")
    min_current_a: Amps = Field(6.0, description="Minimum charging current per phase; below it the limit is 0.")
    max_current_a: Amps = Field(32.0, description="Maximum charging current per phase.")
    max_power_kw: Annotated[float, _ranged(0.1, 1000.0)] | None = Field(
        None, description="Maximum charging power; default max_current_a * voltage_v * phases."
    )
    limit_unit: Literal["W", "A"] = Field("A", description="Charging rate unit of the profiles sent.")
    deadband_kw: Annotated[float, _ranged(0.0, 1000.0)] = Field(
        0.2, description="A new limit is sent only when it differs from the last one by more than this."
    )
    # Quirks of real chargers; defaults suit a charger that follows the spec.
    profile_purpose: Literal[
        "TxDefaultProfile", "TxProfile", "ChargingStationExternalConstraints",
        "ChargePointMaxProfile", "ChargingStationMaxProfile",
    ] | None = Field(None, description="Purpose of the profiles sent; default TxDefaultProfile.")
    no_tx_default_profile: bool = Field(
        False, description="Charger ignores TxDefaultProfile: send TxProfile, during transactions only."
    )
    stack_level: Annotated[int, _ranged(0, 100)] = Field(1, description="Stack level of the profiles sent.")
    profile_id: Annotated[int, _ranged(1, 2**31 - 1)] = Field(
        1, description="chargingProfileId used, so each new limit replaces the last."
    )
    integer_limits: bool = Field(False, description="Charger refuses fractional limits: round down to integers.")

    @model_validator(mode="after")
    def _consistent(self) -> "OcppCharger":
        if self.password_file and self.password_env:
            raise ValueError("give password_file or password_env, not both")
        if self.min_current_a > self.max_current_a:
            raise ValueError(f"min_current_a ({self.min_current_a:g}) exceeds max_current_a ({self.max_current_a:g})")
        purpose = self.effective_purpose()
        allowed = {"1.6": PURPOSES_16, "2.0.1": PURPOSES_201}.get(self.ocpp_version)
        if allowed is not None and purpose not in allowed:
            raise ValueError(f"profile_purpose {purpose!r} does not exist in OCPP {self.ocpp_version} ({', '.join(allowed)})")
        return self

    def effective_purpose(self) -> str:
        if self.profile_purpose is not None:
            return self.profile_purpose
        return "TxProfile" if self.no_tx_default_profile else "TxDefaultProfile"

    @property
    def rated_kw(self) -> float:
        by_current = self.max_current_a * self.voltage_v * self.phases / 1000.0
        return min(by_current, self.max_power_kw) if self.max_power_kw is not None else by_current

    @property
    def min_kw(self) -> float:
        return self.min_current_a * self.voltage_v * self.phases / 1000.0

    def password(self) -> str | None:
        """The Basic auth password, read now; never logged.  None: no Basic auth for this charger.

        A password that is configured but cannot be had (missing or empty file, unset variable)
        raises ValueError naming the key and why: the central system then refuses the charger
        rather than let anyone in under its id."""
        if self.password_file:
            try:
                lines = self.password_file.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as error:
                raise ValueError(f"password_file {self.password_file}: cannot read it: {error}") from None
            if not lines or not lines[0].strip():
                raise ValueError(f"password_file {self.password_file} is empty")
            return lines[0]
        if self.password_env:
            value = os.environ.get(self.password_env)
            if not value:
                raise ValueError(f"password_env: environment variable {self.password_env} is not set")
            return value
        return None


def describe(asset: OcppCharger) -> str:
    """The charger, one line for `flexedge check`."""
    return f"charge point {asset.charge_point_id}, OCPP {asset.ocpp_version}"
