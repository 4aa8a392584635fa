"""Site profile: the YAML file a field engineer writes, validated with pydantic.

Every key is documented in docs/profile.md.  Unknown keys are errors, because a
misspelt limit that is silently ignored is worse than a daemon that refuses to
start.  Units are part of the key names (``_kw``, ``_s``, ``_pct``).

Sign convention (everywhere in flexedge): positive active power is export to the
grid, negative is import; positive activation is upward regulation (more export
or less import).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union

from pydantic import (
    ConfigDict,
    PrivateAttr,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from drivers import registry
from edge.config.functions import EvDefaults, FunctionsConfig
from edge.config.local_http import LocalHttp
from edge.config.checks import cross_problems
from edge.config.problems import problems_from
from edge.config.yamlsource import ProfileProblem, YamlDocument, did_you_mean, load_yaml, path_loc

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
            from zoneinfo import available_timezones

            hint = did_you_mean(value, available_timezones())
            raise ValueError(f"unknown time zone {value!r}{hint or ' (use an IANA name such as Europe/Paris)'}")
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
_CHECKED_APART = "cross-checked apart"  # validation context: read_profile runs the cross-checks itself


# ------------------------------------------------------------------ profile


class Profile(Strict):
    """A flexedge site profile."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="flexedge site profile")

    site: Site
    version: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        None, description="The profile's own version, free text (e.g. 2026-12-04.1): reported with its sha256 in the "
                          "birth message and telemetry."
    )
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
    local_http: LocalHttp | None = Field(
        None, description="The local HTTP endpoint: metrics, /health and the status page (docs/local.md); absent: off."
    )
    assets: list[Asset] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _site_defaults(cls, data: Any) -> Any:
        # e.g. ocpp.upstream: every charger without an upstream of its own is proxied to the site's backend
        return registry.with_site_defaults(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> "Profile":
        if info.context and info.context.get(_CHECKED_APART):
            return self  # read_profile runs them beside field validation, on the document with its lines
        doc = YamlDocument(name="profile", data=self.model_dump())
        errors = [p for p in cross_problems(doc, Profile, registry.asset_problems, assets=list(self.assets))
                  if not p.is_warning]
        if errors:  # every one at once, each at its own key
            raise ValidationError.from_exception_data("Profile", [
                InitErrorDetails(type=PydanticCustomError("cross_check", "{message}", {"message": p.message}),
                                 loc=path_loc(p.path), input=None)
                for p in errors
            ])
        return self

    @property
    def client_id(self) -> str:
        return self.uplink.mqtt.client_id or f"flexedge-{self.site.id}"

    # Not a key of the profile: the sha256 of the file's bytes as load_profile read them.
    _source_sha256: str | None = PrivateAttr(None)

    @property
    def source_sha256(self) -> str | None:
        """Hex sha256 of the file this profile was loaded from; None when it was built in code."""
        return self._source_sha256


# ---------------------------------------------------------------- loading

class ProfileError(Exception):
    """A profile failed to load; ``problems`` lists each error with file, line and key path
    (``warnings``: what would surprise at run time, found in the same pass)."""

    def __init__(self, problems: list[ProfileProblem], warnings: list[ProfileProblem] | None = None):
        self.problems = problems
        self.warnings = warnings or []
        super().__init__("\n".join(str(p) for p in problems))


class ProfileReading(NamedTuple):
    profile: Profile | None  # None when there is an error
    problems: list[ProfileProblem]  # errors and warnings (``severity``), sorted by line
    document: YamlDocument  # the lines of its keys, for what is found later (files on this machine)


def read_profile(path: str | Path) -> ProfileReading:
    """Every problem found in one pass: field errors and the checks across sections
    (edge/config/checks.py) together, the latter on the parts that are valid."""
    doc = load_yaml(Path(path))
    if doc.data is None or not isinstance(doc.data, dict):
        if not doc.problems:
            what = "a list" if isinstance(doc.data, list) else "nothing" if doc.data is None else f"{doc.data!r}"
            doc.problems.append(ProfileProblem(doc.name, doc.line_of(()), "", f"a profile is a mapping (`key: value` "
                                                                            f"lines: site, control, uplink, grid, "
                                                                            f"assets ...), but this file holds {what}"))
        return ProfileReading(None, doc.problems, doc)
    problems = list(doc.problems)  # duplicate keys
    profile = None
    try:
        profile = Profile.model_validate(doc.data, context={_CHECKED_APART: True})
    except ValidationError as error:
        problems += problems_from(error, doc, Profile)
    problems += cross_problems(doc, Profile, registry.asset_problems, assets=list(profile.assets) if profile else None)
    if any(not problem.is_warning for problem in problems):
        profile = None
    elif profile is not None:
        profile._source_sha256 = doc.sha256
    return ProfileReading(profile, sorted(problems, key=lambda p: (p.line, p.is_warning)), doc)


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile; raise ProfileError naming every problem found."""
    profile, problems, _ = read_profile(path)
    if profile is None:
        raise ProfileError([p for p in problems if not p.is_warning], [p for p in problems if p.is_warning])
    return profile


def json_schema() -> dict[str, Any]:
    schema = Profile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://flexedge.invalid/schema/profile.json"
    return schema

