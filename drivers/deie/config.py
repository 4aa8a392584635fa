"""Profile model of the DEIE link (the grid operator's telecontrol over IEC 60870-5-104).

``DeieConfig`` is meant to sit in the site profile as ``grid.deie``; its keys are
documented in docs/deie.md.  It imports nothing from c104, so a profile can be
validated on a machine without the IEC 104 library.

The point list comes from ``profiles/templates/<template>.yaml`` (default
``deie``) with single signals replaced by ``points``.  The real point list of a
DEIE is site-specific and not public in full: the template is a starting point
to check against the site's list, and every address can be overridden.

Value conversion: a value in flexedge units = ``raw * scale``; a report of ``x``
flexedge units is sent as ``raw = x / scale``.  Order units: ``p_limit`` in kW
(``limit_unit: kw``) or in % of ``installed_kw`` (``limit_unit: pct``),
``q_setpoint`` in kvar (+ = over-excited, export of reactive power),
``tan_phi_setpoint`` dimensionless.

``DeieConfig.point_map()`` returns the merged, validated map (signal -> ``DeiePoint``)
and raises ``ValueError`` naming the signal or file at fault.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from edge import resources
from edge.config.types import Port, PositiveKw, Strict, _ranged

SETPOINT_TYPES = ("C_SE_NC_1", "C_SE_TC_1")
SWITCH_TYPES = ("C_SC_NA_1", "C_DC_NA_1")
MEASURED_TYPES = ("M_ME_NC_1", "M_ME_TF_1")
STATUS_TYPES = ("M_SP_NA_1", "M_SP_TB_1", "M_DP_NA_1", "M_DP_TB_1")
PointType = Literal[SETPOINT_TYPES + SWITCH_TYPES + MEASURED_TYPES + STATUS_TYPES]  # type: ignore[valid-type]

# In the client role the DEIE exposes its orders as monitored points: the
# gateway reads the monitoring counterpart of each order type.
CLIENT_ORDER_TYPE = {
    "C_SE_NC_1": "M_ME_NC_1",
    "C_SE_TC_1": "M_ME_TF_1",
    "C_SC_NA_1": "M_SP_NA_1",
    "C_DC_NA_1": "M_DP_NA_1",
}

# signal -> the ASDU types that may carry it
ORDER_SIGNALS: dict[str, tuple[str, ...]] = {
    "p_limit": SETPOINT_TYPES,  # active-power limit at the connection point (kW or %)
    "p_limit_end": SWITCH_TYPES,  # ON = lift the active-power limit
    "q_setpoint": SETPOINT_TYPES,  # reactive-power setpoint, kvar
    "tan_phi_setpoint": SETPOINT_TYPES,  # tan(phi) setpoint
    "disconnect": SWITCH_TYPES,  # ON = disconnect (decouple), OFF = reconnection allowed
}
REPORT_SIGNALS: dict[str, tuple[str, ...]] = {
    "p_measured": MEASURED_TYPES,  # site active power, kW, + export
    "q_measured": MEASURED_TYPES,  # site reactive power, kvar
    "u_measured": MEASURED_TYPES,  # voltage at the connection point, V
    "p_limit_in_force": MEASURED_TYPES,  # kW (or %) in force; -1 when no limit
    "p_limit_received": STATUS_TYPES,
    "p_limit_applied": STATUS_TYPES,
    "q_order_received": STATUS_TYPES,
    "q_order_applied": STATUS_TYPES,
    "disconnect_received": STATUS_TYPES,
    "disconnect_applied": STATUS_TYPES,
    "coupled": STATUS_TYPES,  # ON = the site may produce (no disconnection in force)
    "breaker_closed": STATUS_TYPES,  # from the daemon's breaker input, when it has one
    "link_loss_default": STATUS_TYPES,  # ON = the link-loss default limit is in force
}
REQUIRED_SIGNALS = ("p_limit", "disconnect", "p_measured")

Ioa = Annotated[int, _ranged(1, 16_777_215)]
CommonAddress = Annotated[int, _ranged(1, 65_534)]


class DeiePoint(Strict):
    """One signal: where it is (IOA), its ASDU type and how to convert it."""

    ioa: Ioa = Field(description="Information object address (1..16777215).")
    type: PointType = Field(description="ASDU type, e.g. C_SE_NC_1 (float setpoint) or M_SP_NA_1.")
    scale: Annotated[float, _ranged(1e-9, 1e9)] = Field(
        1.0, description="flexedge units per raw unit (value = raw * scale)."
    )


class DeieTls(Strict):
    """TLS for the IEC 104 link (IEC 62351-3 style), mutual authentication."""

    ca_file: Path = Field(description="CA certificate that signed the peer's certificate.")
    cert_file: Path = Field(description="This gateway's certificate.")
    key_file: Path = Field(description="Private key of cert_file.")
    peer_cert_files: list[Path] = Field(
        default_factory=list, description="When given, only peers presenting one of these certificates are accepted."
    )


class DeieConfig(Strict):
    role: Literal["server", "client"] = Field(
        "server",
        description="server: the gateway is the controlled station and the operator's side connects to it; "
        "client: the gateway connects to a DEIE that exposes orders as monitored points.",
    )
    host: str = Field("0.0.0.0", description="Listen address (server) or the DEIE's address (client).")
    port: Port = Field(2404, description="Listen port (server) or the DEIE's port (client).")
    common_address: CommonAddress = Field(1, description="ASDU common address of the station.")
    template: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")] = Field(
        "deie", description="Point-list template in profiles/templates/."
    )
    points: dict[str, DeiePoint] = Field(
        default_factory=dict, description="Signals that replace the template's (signal -> {ioa, type, scale})."
    )
    installed_kw: Annotated[float, _ranged(0.001, 1_000_000.0)] = Field(
        description="Installed power of the site: the base of % orders and of the order range check."
    )
    limit_unit: Literal["kw", "pct"] = Field("kw", description="Unit of the p_limit order (kW or % of installed_kw).")
    max_abs_tan_phi: Annotated[float, _ranged(0.0, 10.0)] = Field(
        1.0, description="tan(phi) orders outside [-x, x] are refused."
    )
    link_loss_timeout_s: Annotated[float, _ranged(0.1, 86_400.0)] = Field(
        60.0, description="Time without a link after which on_link_loss acts."
    )
    on_link_loss: Literal["hold", "default_limit"] = Field(
        "hold", description="hold: the last order stays in force; default_limit: default_limit_kw applies."
    )
    default_limit_kw: PositiveKw | None = Field(None, description="Export limit put in force on link loss.")
    report_interval_s: Annotated[float, _ranged(0.1, 3600.0)] = Field(
        10.0, description="Period of the cyclic (periodic, COT 1) reports; changes are also sent spontaneously."
    )
    report_deadband_pct: Annotated[float, _ranged(0.0, 100.0)] = Field(
        1.0,
        description="A measurement is sent spontaneously when it moves by more than this % "
        "(P and Q: of installed_kw; U: of the last value sent).",
    )
    command_timeout_s: Annotated[float, _ranged(0.1, 60.0)] = Field(
        5.0, description="Client role: time allowed to open the connection before backing off."
    )
    tls: DeieTls | None = Field(None, description="TLS; plain TCP when absent.")

    @model_validator(mode="after")
    def _check(self) -> "DeieConfig":
        if self.on_link_loss == "default_limit" and self.default_limit_kw is None:
            raise ValueError("on_link_loss: default_limit needs default_limit_kw")
        if self.role == "client" and self.host in ("0.0.0.0", "::", ""):
            raise ValueError("role: client needs host = the DEIE's address")
        self.point_map()  # fail at load time, naming the signal
        return self

    def point_map(self) -> dict[str, DeiePoint]:
        """The template's points with ``points`` overrides applied, checked."""
        merged = {**load_template(self.template), **self.points}
        known = ORDER_SIGNALS | REPORT_SIGNALS
        for signal, point in merged.items():
            if signal not in known:
                raise ValueError(f"DEIE point {signal!r}: unknown signal (known: {', '.join(sorted(known))})")
            if point.type not in known[signal]:
                raise ValueError(
                    f"DEIE point {signal!r}: type {point.type} cannot carry it (use one of {', '.join(known[signal])})"
                )
        for signal in REQUIRED_SIGNALS:
            if signal not in merged:
                raise ValueError(f"DEIE point list lacks the required signal {signal!r}")
        seen: dict[int, str] = {}
        for signal, point in merged.items():
            if point.ioa in seen:
                raise ValueError(f"DEIE points {seen[point.ioa]!r} and {signal!r} share IOA {point.ioa}")
            seen[point.ioa] = signal
        return merged


def load_template(name: str) -> dict[str, DeiePoint]:
    """Read ``profiles/templates/<name>.yaml`` (its ``points`` mapping)."""
    try:
        path = resources.template_path(name)
    except ValueError:
        raise ValueError(f"DEIE template {name!r}: cannot read it, flexedge ships no template of that name "
                         f"(available: {', '.join(resources.template_names())})") from None
    label = resources.template_label(name)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"DEIE template {name!r}: cannot read {label}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"DEIE template {label}: not valid YAML: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("points"), dict):
        raise ValueError(f"DEIE template {label}: expected a mapping with a 'points' mapping")
    points: dict[str, DeiePoint] = {}
    for signal, spec in document["points"].items():
        try:
            points[signal] = DeiePoint.model_validate(spec)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"DEIE template {label}, point {signal!r}: {problems}") from None
    return points
