"""Site profile: the YAML file a field engineer writes, validated with pydantic.

Every key is documented in docs/profile.md.  Unknown keys are errors, because a
misspelt limit that is silently ignored is worse than a daemon that refuses to
start.  Units are part of the key names (``_kw``, ``_s``, ``_pct``).

Sign convention (everywhere in flexedge): positive active power is export to the
grid, negative is import; positive activation is upward regulation (more export
or less import).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from drivers import registry
from edge.config.functions import EvDefaults, FunctionsConfig
from edge.config.yamlsource import ProfileProblem, YamlDocument, load_yaml

from edge.config.types import (  # noqa: F401  (re-exported for callers of edge.config.profile)
    ID_PATTERN,
    AssetBase,
    Identifier,
    Percent,
    Port,
    PositiveKw,
    Strict,
    UnitId,
    _ranged,
)


# The sections a driver package brings, taken from the registry (drivers/registry.py):
# this module imports no driver module but that one.
DeieConfig = registry.grid_link().config_model  # grid.deie
OcppServer = registry.drivers()["ocpp"].site_model  # ocpp: the chargers' central system


# --------------------------------------------------------------------- site


class Site(Strict):
    id: Identifier = Field(description="Site identifier; the second level of every MQTT topic.")
    name: str = Field("", description="Human-readable site name.")
    timezone: str = Field("UTC", description="IANA time zone of the site, e.g. Europe/Paris.")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Europe/Paris)")
        return value


# ------------------------------------------------------------------ control


class Fallback(Strict):
    ramp_kw_per_s: Annotated[float, _ranged(0.001, 1_000_000.0)] = Field(
        10.0, description="Rate at which activation returns to zero when no valid setpoint is in force."
    )


class Control(Strict):
    cycle_s: Annotated[float, _ranged(0.2, 60.0)] = Field(
        2.0, description="Control cycle period on the monotonic clock (aFRR: 2 s; 1 s also works)."
    )
    setpoint_timeout_s: Annotated[float, _ranged(0.5, 3600.0)] = Field(
        10.0, description="Fall back when no valid setpoint has been in force for this long."
    )
    clock_skew_tolerance_s: Annotated[float, _ranged(0.0, 300.0)] = Field(
        5.0, description="A setpoint whose ts lies further in the future than this is rejected."
    )
    max_setpoint_age_s: Annotated[float, _ranged(0.5, 86400.0)] = Field(
        60.0, description="A setpoint issued (ts) longer ago than this is rejected as stale."
    )
    fallback: Fallback = Field(default_factory=Fallback)
    allocation: Literal["pro_rata", "merit_order"] = Field(
        "pro_rata",
        description="How an activation is shared: pro_rata to each asset's band in the direction asked, or "
                    "merit_order by asset priority then dispatch cost (equals pro rata).",
    )
    committed_band_up_kw: PositiveKw | None = Field(
        None, description="Upward band the site is committed to offer; less available raises an incapacity event."
    )
    committed_band_down_kw: PositiveKw | None = Field(
        None, description="Downward band the site is committed to offer; less available raises an incapacity event."
    )
    incapacity_threshold_kw: Annotated[float, _ranged(0.0, 1_000_000.0)] = Field(
        0.5, description="A shortfall (activation not delivered, or band below the commitment) counts from this size."
    )


# ------------------------------------------------------------------- uplink


class Tls(Strict):
    ca_file: Path | None = Field(None, description="CA bundle to verify the broker; system CAs when absent.")
    cert_file: Path | None = Field(None, description="Client certificate for mutual TLS.")
    key_file: Path | None = Field(None, description="Private key of the client certificate.")

    @model_validator(mode="after")
    def _pair(self) -> "Tls":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS needs both)")
        return self


class Mqtt(Strict):
    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: Port = Field(1883, description="Broker port (8883 is usual with TLS).")
    client_id: str | None = Field(None, description="MQTT client id; default flexedge-<site id>.")
    topic_prefix: str = Field("flexedge", description="First level of every topic.")
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        "auto", description="MQTT version: auto tries 5 and falls back to 3.1.1."
    )
    keepalive_s: Annotated[int, _ranged(5, 3600)] = 30
    tls: Tls | None = Field(None, description="Enable TLS (and mutual TLS with cert_file/key_file).")
    username: str | None = None
    password_file: Path | None = Field(None, description="File whose first line is the password.")
    password_env: str | None = Field(None, description="Environment variable holding the password.")

    @field_validator("topic_prefix")
    @classmethod
    def _topic_safe(cls, value: str) -> str:
        if not value or any(c in value for c in "#+\0") or value.startswith("/") or value.endswith("/"):
            raise ValueError(f"must be a plain topic path without wildcards or edge slashes, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_password_source(self) -> "Mqtt":
        if self.password_file and self.password_env:
            raise ValueError("give password_file or password_env, not both")
        return self

    def password(self) -> str | None:
        """The password, read now from its file or environment variable; never logged.

        A password file that is missing, unreadable or blank raises
        edge.config.preflight.FileProblemError (a ValueError) saying so: connecting without
        the password would only be refused, again and again.
        """
        import os

        if self.password_file:
            from edge.config.preflight import read_password

            return read_password(self.password_file)
        if self.password_env:
            return os.environ.get(self.password_env)
        return None


class Spool(Strict):
    path: Path = Field(Path("/var/lib/flexedge/spool.sqlite"), description="SQLite file of the store-and-forward spool.")
    max_mb: Annotated[float, _ranged(1, 1_000_000)] = Field(
        1024, description="Size cap; when reached, the oldest messages are dropped (and counted)."
    )
    backlog_msgs_per_s: Annotated[float, _ranged(1, 10_000)] = Field(
        50, description="Rate at which the backlog is sent after an outage, beside live traffic."
    )


class Uplink(Strict):
    mqtt: Mqtt = Field(default_factory=Mqtt)
    spool: Spool = Field(default_factory=Spool)


# --------------------------------------------------------------------- grid


class Grid(Strict):
    export_limit_kw: PositiveKw | None = Field(
        None, description="Maximum export at the connection point; never exceeded by a command."
    )
    import_limit_kw: PositiveKw | None = Field(
        None, description="Maximum import at the connection point; never exceeded by a command."
    )
    deie: DeieConfig | None = Field(
        None, description="The grid operator's DEIE telecontrol link (IEC 104); its orders always win."
    )


# ------------------------------------------------------------------- assets


# Each driver package defines its own asset model on AssetBase (edge/config/types.py)
# and registers it (drivers/registry.py); the union is built from the registry.
Asset = Annotated[Union[registry.asset_models()], Field(discriminator="driver")]  # type: ignore[valid-type]
DRIVER_NAMES = ", ".join(registry.driver_names())


# ------------------------------------------------------------------ profile


class Profile(Strict):
    """A flexedge site profile."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="flexedge site profile")

    site: Site
    control: Control = Field(default_factory=Control)
    uplink: Uplink = Field(default_factory=Uplink)
    grid: Grid = Field(default_factory=Grid)
    ocpp: OcppServer | None = Field(
        None, description="The site's OCPP central system (one websocket server for all `driver: ocpp` chargers)."
    )
    functions: FunctionsConfig | None = Field(
        None, description="Local grid functions run on site from local measurements: FCR droop, Q(U)."
    )
    ev_charging: EvDefaults | None = Field(
        None, description="Smart charging: each EV session is planned at 15-min resolution against the tariffs; "
                          "absent: chargers charge as fast as the activation allows."
    )
    assets: list[Asset] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Profile":
        seen: set[str] = set()
        for asset in self.assets:
            if asset.id in seen:
                raise ValueError(f"asset id {asset.id!r} is used twice")
            seen.add(asset.id)
        if sum(1 for a in self.assets if getattr(a, "connection_point", False)) > 1:
            raise ValueError("at most one meter may be the connection point")
        if self.functions is not None:
            self.functions.check_sources(self.assets)
        if problems := registry.asset_problems(self.assets):
            # every conflict at once, each at its own key
            raise ValidationError.from_exception_data("Profile", [
                InitErrorDetails(type=PydanticCustomError("shared_link", "{message}", {"message": message}), loc=loc,
                                 input=None)
                for loc, message in problems
            ])
        return self

    @property
    def client_id(self) -> str:
        return self.uplink.mqtt.client_id or f"flexedge-{self.site.id}"


# ---------------------------------------------------------------- loading

_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


_DRIVER_TAGS = set(registry.driver_names())


def _path_text(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


class ProfileError(Exception):
    """A profile failed to load; ``problems`` lists each with file, line and key path."""

    def __init__(self, problems: list[ProfileProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _problems_from(error: ValidationError, doc: YamlDocument) -> list[ProfileProblem]:
    problems = []
    for item in error.errors():
        # pydantic adds the discriminator tag to the location of union members
        loc = tuple(p for p in item["loc"] if p not in _DRIVER_TAGS and not (isinstance(p, str) and p.startswith("function-")))
        message = _MESSAGES.get(item["type"], item["msg"])
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see docs/profile.md)"
        elif item["type"] == "literal_error":
            message = f"{item['msg'][0].lower()}{item['msg'][1:]}, got {item.get('input')!r}"
        elif item["type"] == "union_tag_invalid":
            loc += ("driver",)
            message = f"unknown driver {item['input'].get('driver')!r} (expected one of: {DRIVER_NAMES})"
        elif item["type"] == "union_tag_not_found":
            loc += ("driver",)
            message = f"required key is missing (one of: {DRIVER_NAMES})"
        elif item["type"] == "string_pattern_mismatch":
            message = f"must be letters, digits, '_', '.' or '-' (at most 64), got {item.get('input')!r}"
        elif item["type"] in ("float_parsing", "int_parsing", "int_from_float", "float_type", "int_type", "bool_parsing"):
            message = f"{item['msg'][0].lower()}{item['msg'][1:]}, got {item.get('input')!r}"
        if not loc:
            # A cross-check names the key it is about ("functions.fcr.frequency_source: ..."):
            # point at that key's line rather than the top of the file.
            named = re.match(r"([A-Za-z_][\w.]*(?:\[\d+\][\w.]*)*): ", message)
            if named:
                loc = tuple(int(p) if p.isdigit() else p for p in re.findall(r"[A-Za-z_]\w*|\d+", named.group(1)))
                message = message[named.end():]
        path = _path_text(loc)
        problems.append(ProfileProblem(doc.name, doc.line_of(loc), path, message))
    return problems


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile; raise ProfileError naming every problem found."""
    doc = load_yaml(Path(path))
    if doc.problems:
        raise ProfileError(doc.problems)
    if not isinstance(doc.data, dict):
        raise ProfileError([ProfileProblem(doc.name, 1, "", "a profile is a mapping with keys site, control, uplink, grid, assets")])
    try:
        return Profile.model_validate(doc.data)
    except ValidationError as error:
        raise ProfileError(sorted(_problems_from(error, doc), key=lambda p: p.line)) from None


def json_schema() -> dict[str, Any]:
    schema = Profile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://flexedge.invalid/schema/profile.json"
    return schema

