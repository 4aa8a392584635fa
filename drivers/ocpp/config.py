"""Profile models of the OCPP driver: the site's central system and its chargers.

``OcppServer`` is site-level (one websocket server per site); ``OcppCharger``
is an asset.  Both forbid unknown keys and check ranges; units are in the key
names.  Every key is documented in docs/drivers/ocpp.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from edge.config.types import AssetBase, Port, Strict, _ranged

from drivers.ocpp.proxy.config import UpstreamLink
from drivers.ocpp.secret import read_password

Amps = Annotated[float, _ranged(0.0, 1000.0)]
CHARGE_POINT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:*+|@-]{0,47}$"

PURPOSES_16 = ("TxDefaultProfile", "TxProfile", "ChargePointMaxProfile")
PURPOSES_201 = ("TxDefaultProfile", "TxProfile", "ChargingStationExternalConstraints", "ChargingStationMaxProfile")
# 2.1 adds PriorityCharging and LocalGeneration, which the gateway does not use.
PURPOSES_21 = PURPOSES_201
# Purposes that can carry a V2X setpoint (a max profile or an external constraint only bounds).
V2X_PURPOSES = ("TxDefaultProfile", "TxProfile")


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
    upstream: UpstreamLink | None = Field(
        None, description="The site's CPO backend: every charger without an `upstream` of its own is proxied "
                          "there (local controller, docs/drivers/ocpp.md), under its own charge point id; "
                          "`upstream: null` on a charger keeps it off.")

    @model_validator(mode="after")
    def _tls_files(self) -> "OcppServer":
        if self.upstream is not None and self.upstream.charge_point_id is not None:
            raise ValueError("upstream.charge_point_id: a charger's identity at the backend is its own; give it in "
                             "that charger's upstream, not the site's")
        if not self.path.startswith("/") or self.path.endswith("/") and self.path != "/":
            raise ValueError(f"path must start with '/' and not end with '/', got {self.path!r}")
        if self.security_profile >= 2 and (self.cert_file is None or self.key_file is None):
            raise ValueError(f"security_profile {self.security_profile} needs cert_file and key_file")
        if self.security_profile == 3 and self.ca_file is None:
            raise ValueError("security_profile 3 (mutual TLS) needs ca_file to verify charger certificates")
        return self


class V2xSettings(Strict):
    """What a bidirectional (OCPP 2.1) charger can do; ``auto`` is learned from its device model."""

    bidirectional: Literal["auto"] | bool = Field(
        "auto", description="The charger can discharge an EV (V2X) under a CentralSetpoint profile. auto: learned "
                            "at each connection from its device model (V2XChargingCtrlr); true needs OCPP 2.1.")
    max_discharge_kw: Annotated[float, _ranged(0.1, 1000.0)] | None = Field(
        None, description="Largest discharging power the gateway commands, kW; default: the charging rating.")
    afrr_signal: Literal["auto"] | bool = Field(
        "auto", description="The charger follows OCPP 2.1 AFRRSignal under a CentralFrequency profile. auto: learned "
                            "(CentralFrequency among V2XChargingCtrlr.SupportedOperationModes).")
    operation_mode: Literal["CentralSetpoint"] = Field(
        "CentralSetpoint", description="Operation mode of V2X setpoints (the only one the gateway dispatches with; "
                                       "CentralFrequency is used by itself for afrr_signal chargers).")


class OcppCharger(AssetBase):
    kind: Literal["ev_charger"]
    driver: Literal["ocpp"]
    charge_point_id: Annotated[str, Field(pattern=CHARGE_POINT_ID_PATTERN)] = Field(
        description="Identity in the charger's URL (<path>/<charge_point_id>) and its Basic auth user name."
    )
    ocpp_version: Literal["1.6", "2.0.1", "2.1", "auto"] = Field(
        "auto", description="Websocket subprotocol accepted from this charger; auto accepts any, the newest it offers."
    )
    password_file: Path | None = Field(None, description="File whose first line is the Basic auth password.")
    password_env: str | None = Field(None, description="Environment variable holding the Basic auth password.")
    evse_id: Annotated[int, _ranged(1, 100)] = Field(1, description="2.0.1 and 2.1: EVSE controlled by this asset.")
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
    v2x: V2xSettings = Field(default_factory=V2xSettings,
                             description="OCPP 2.1 bidirectional charging (V2X) and the aFRR signal.")
    failsafe_kw: Annotated[float, _ranged(0.0, 1000.0)] | None = Field(
        None, description="Limit of the max profile set at each connection, kW; default: the charger's share of "
                          "grid.import_limit_kw (by rating), none without one.")
    failsafe_profile_id: Annotated[int, _ranged(1, 2**31 - 1)] = Field(
        2, description="chargingProfileId of the failsafe max profile; must differ from profile_id.")
    plan_hold_s: Annotated[float, _ranged(10.0, 3600.0)] | None = Field(
        None, description="With a plan, how long the current target holds before the plan's periods, s; "
                          "default 3 x control.cycle_s, at least 10 s. The profile is refreshed before half of it.")
    upstream: UpstreamLink | None = Field(
        None, description="The charger's CPO backend: the gateway forwards its OCPP messages there both ways and "
                          "keeps the power control (local controller, docs/drivers/ocpp.md).")

    @model_validator(mode="after")
    def _consistent(self) -> "OcppCharger":
        if self.password_file and self.password_env:
            raise ValueError("give password_file or password_env, not both")
        if self.min_current_a > self.max_current_a:
            raise ValueError(f"min_current_a ({self.min_current_a:g}) exceeds max_current_a ({self.max_current_a:g})")
        purpose = self.effective_purpose()
        allowed = {"1.6": PURPOSES_16, "2.0.1": PURPOSES_201, "2.1": PURPOSES_21}.get(self.ocpp_version)
        if allowed is not None and purpose not in allowed:
            raise ValueError(f"profile_purpose {purpose!r} does not exist in OCPP {self.ocpp_version} ({', '.join(allowed)})")
        for key in ("bidirectional", "afrr_signal"):
            if getattr(self.v2x, key) is True and self.ocpp_version in ("1.6", "2.0.1"):
                raise ValueError(f"v2x.{key}: true needs ocpp_version 2.1 or auto (got {self.ocpp_version}): "
                                 f"V2X exists only in OCPP 2.1")
            if getattr(self.v2x, key) is True and purpose not in V2X_PURPOSES:
                raise ValueError(f"v2x.{key}: true needs a TxDefaultProfile or TxProfile purpose (got {purpose}): "
                                 f"a {purpose} cannot carry a setpoint")
        if self.v2x.afrr_signal is True and self.v2x.bidirectional is False:
            raise ValueError("v2x.afrr_signal: true needs v2x.bidirectional true or auto: the aFRR signal "
                             "moves a charger both ways")
        if self.failsafe_profile_id == self.profile_id:
            raise ValueError(f"failsafe_profile_id ({self.failsafe_profile_id}) must differ from profile_id "
                             f"({self.profile_id}): each would replace the other")
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
    def max_discharge_kw(self) -> float:
        """The largest discharge the gateway commands (v2x.max_discharge_kw, default the charging rating)."""
        return self.v2x.max_discharge_kw if self.v2x.max_discharge_kw is not None else self.rated_kw

    def may_discharge(self) -> bool:
        """Whether this charger could be bidirectional at all (before anything is learned)."""
        return (self.v2x.bidirectional is not False and self.ocpp_version in ("2.1", "auto")
                and self.effective_purpose() in V2X_PURPOSES)

    def hold_s(self, cycle_s: float) -> float:
        """How long a plan's first period holds the current target (plan_hold_s)."""
        return self.plan_hold_s if self.plan_hold_s is not None else max(3.0 * cycle_s, 10.0)

    @property
    def min_kw(self) -> float:
        return self.min_current_a * self.voltage_v * self.phases / 1000.0

    def password(self) -> str | None:
        """The Basic auth password, read now; never logged.  None: no Basic auth for this charger.

        A password that is configured but cannot be had (missing or empty file, unset variable)
        raises ValueError naming the key and why: the central system then refuses the charger
        rather than let anyone in under its id."""
        return read_password(self.password_file, self.password_env)


def site_upstream(section: dict) -> dict:
    """``ocpp.upstream`` as every charger's default ``upstream`` (``DriverSpec.asset_defaults``), when valid."""
    upstream = section.get("upstream")
    if not isinstance(upstream, dict):
        return {}
    try:
        link = UpstreamLink.model_validate(upstream)
    except ValueError:  # pydantic's ValidationError: reported at ocpp.upstream by the section's own check
        return {}
    return {} if link.charge_point_id is not None else {"upstream": upstream}


def describe(asset: OcppCharger) -> str:
    """The charger, one line for `flexedge check`."""
    v2x = " (V2X)" if asset.v2x.bidirectional is True else ""
    proxied = f", proxied to {asset.upstream.host}" if asset.upstream is not None else ""
    return f"charge point {asset.charge_point_id}, OCPP {asset.ocpp_version}{v2x}{proxied}"
