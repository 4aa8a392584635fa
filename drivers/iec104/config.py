"""Profile model of an IEC 60870-5-104 asset and its point map.

``Iec104Asset`` is the ``driver: iec104`` entry of a site profile's ``assets``
list (keys documented in docs/drivers/iec104.md).  Its point map is a
template from ``profiles/templates/<template>.yaml`` with single points
replaced by the asset's own ``points``; ``Iec104Asset.point_map()`` returns
the merged, validated result.

Value conversion: a value in flexedge units = ``raw * scale * sign``; a
command of ``x`` flexedge units is sent as ``raw = x / (scale * sign)``.
``sign`` maps the unit's own convention onto flexedge's (+ = export): a
power-to-heat unit counting consumption as positive has ``sign: -1``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from edge import resources
from edge.config.types import AssetBase, Port, PositiveKw, Percent, Strict, _ranged

MEASURED_TYPES = ("M_ME_NA_1", "M_ME_NB_1", "M_ME_NC_1", "M_ME_TD_1", "M_ME_TE_1", "M_ME_TF_1")
STATUS_TYPES = ("M_SP_NA_1", "M_SP_TB_1", "M_DP_NA_1", "M_DP_TB_1")
SETPOINT_TYPES = ("C_SE_NA_1", "C_SE_NB_1", "C_SE_NC_1", "C_SE_TA_1", "C_SE_TB_1", "C_SE_TC_1")
PointType = Literal[MEASURED_TYPES + STATUS_TYPES + SETPOINT_TYPES]  # type: ignore[valid-type]

# signal name -> what kind of point carries it
SIGNALS: dict[str, tuple[str, ...]] = {
    "p_setpoint": SETPOINT_TYPES,
    "p_measured": MEASURED_TYPES,
    "q_measured": MEASURED_TYPES,
    "soc": MEASURED_TYPES,
    "p_charge_available": MEASURED_TYPES,
    "p_discharge_available": MEASURED_TYPES,
    "min_load": MEASURED_TYPES,
    "storage_temp": MEASURED_TYPES,
    "running": STATUS_TYPES,
    "fault": STATUS_TYPES,
    "remote": STATUS_TYPES,
}
REQUIRED_SIGNALS = {"bess": ("p_setpoint", "p_measured", "soc"), "p2h": ("p_setpoint", "p_measured")}

Ioa = Annotated[int, _ranged(1, 16_777_215)]
CommonAddress = Annotated[int, _ranged(1, 65_534)]


class PointSpec(Strict):
    """One signal of the unit: where it is (IOA), its ASDU type and how to convert it."""

    ioa: Ioa = Field(description="Information object address (1..16777215).")
    type: PointType = Field(description="ASDU type, e.g. M_ME_NC_1 (float) or C_SE_NC_1 (float setpoint).")
    scale: float = Field(1.0, description="Engineering units per raw count (raw * scale * sign).")
    sign: Literal[1, -1] = Field(1, description="-1 when the unit counts the other way round than flexedge.")
    unit: str = Field("", description="Engineering unit after scaling (documentation: kW, kvar, %, degC).")

    @model_validator(mode="after")
    def _scale_usable(self) -> "PointSpec":
        if not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError(f"scale must be a finite non-zero number, got {self.scale}")
        return self

    def to_flexedge(self, raw: float) -> float:
        return raw * self.scale * self.sign

    def to_raw(self, value: float) -> float:
        return value / (self.scale * self.sign)


class Iec104Tls(Strict):
    ca_file: Path = Field(description="CA certificate that signed the unit's (server's) certificate.")
    cert_file: Path = Field(description="Gateway (client) certificate for mutual TLS.")
    key_file: Path = Field(description="Private key of cert_file.")


class Iec104Asset(AssetBase):
    kind: Literal["bess", "p2h"]
    driver: Literal["iec104"]
    host: str = Field(description="Address of the unit's IEC 104 server (the controlled station).")
    port: Port = Field(2404, description="TCP port (2404 plain, 19998 usual with TLS).")
    common_address: CommonAddress = Field(description="ASDU common address of the unit's station.")
    template: str | None = Field(None, description="Point-map template name in profiles/templates (without .yaml).")
    points: dict[str, PointSpec] = Field(default_factory=dict, description="Signals added to or replacing the template's.")
    command_mode: Literal["direct", "select_and_execute"] = Field("direct", description="Setpoint command procedure.")
    confirm: Literal["act_con", "act_term"] = Field(
        "act_con", description="A command succeeded on a positive ACT_CON, or only once ACT_TERM follows it."
    )
    command_timeout_s: Annotated[float, _ranged(0.05, 60.0)] = Field(
        2.0, description="Confirmation (ACT_CON, and ACT_TERM when required) must arrive within this time."
    )
    connect_timeout_s: Annotated[float, _ranged(0.1, 60.0)] = Field(
        3.0, description="Connection (TCP, STARTDT) must be open within this time."
    )
    max_charge_kw: PositiveKw | None = Field(None, description="BESS: rated charge power (required for bess).")
    max_discharge_kw: PositiveKw | None = Field(None, description="BESS: rated discharge power (required for bess).")
    min_load_kw: PositiveKw = Field(0.0, description="P2H: minimum load while running (a min_load point overrides it).")
    max_load_kw: PositiveKw | None = Field(None, description="P2H: rated consumption (required for p2h).")
    soc_min_pct: Percent = Field(5.0, description="BESS: no discharge at or below this state of charge.")
    soc_max_pct: Percent = Field(95.0, description="BESS: no charge at or above this state of charge.")
    storage_temp_max_c: Annotated[float, _ranged(-50.0, 1000.0)] | None = Field(
        None, description="Boiler: no heating at or above this storage temperature."
    )
    tls: Iec104Tls | None = Field(None, description="TLS (IEC 62351-3 style) with client certificate.")

    @model_validator(mode="after")
    def _consistent(self) -> "Iec104Asset":
        if self.kind == "bess":
            if self.max_charge_kw is None or self.max_discharge_kw is None:
                raise ValueError("kind bess needs max_charge_kw and max_discharge_kw")
            if self.soc_min_pct >= self.soc_max_pct:
                raise ValueError(f"soc_min_pct ({self.soc_min_pct:g}) must be below soc_max_pct ({self.soc_max_pct:g})")
        if self.kind == "p2h":
            if self.max_load_kw is None or self.max_load_kw <= 0:
                raise ValueError("kind p2h needs max_load_kw > 0")
            if self.min_load_kw > self.max_load_kw:
                raise ValueError(f"min_load_kw ({self.min_load_kw:g}) must not exceed max_load_kw ({self.max_load_kw:g})")
        self.point_map()  # raises with a clear message if the merged map is unusable
        return self

    def point_map(self) -> dict[str, PointSpec]:
        """The template's points with the asset's ``points`` laid over them, checked."""
        merged: dict[str, PointSpec] = {}
        if self.template is not None:
            merged.update(load_template(self.template, self.kind))
        merged.update(self.points)
        for name, spec in merged.items():
            if name not in SIGNALS:
                raise ValueError(f"points.{name}: unknown signal (known: {', '.join(SIGNALS)})")
            if spec.type not in SIGNALS[name]:
                raise ValueError(f"points.{name}: type {spec.type} does not fit (use one of {', '.join(SIGNALS[name])})")
        missing = [s for s in REQUIRED_SIGNALS[self.kind] if s not in merged]
        if missing:
            raise ValueError(f"point map lacks {', '.join(missing)} (give a template or these points)")
        seen: dict[int, str] = {}
        for name, spec in merged.items():
            if spec.ioa in seen:
                raise ValueError(f"points.{name}: IOA {spec.ioa} is also used by {seen[spec.ioa]}")
            seen[spec.ioa] = name
        return merged


_template_cache: dict[str, tuple[str, dict[str, PointSpec]]] = {}


def load_template(name: str, kind: str | None = None) -> dict[str, PointSpec]:
    """Read ``profiles/templates/<name>.yaml``; raise ValueError naming the template and the problem."""
    if name not in _template_cache:
        path = resources.template_path(name)  # ValueError listing the available templates
        label = resources.template_label(name)
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("points"), dict):
            raise ValueError(f"{label}: a template is a mapping with a 'points' mapping")
        points = {}
        for signal, spec in data["points"].items():
            try:
                points[signal] = PointSpec.model_validate(spec)
            except ValidationError as error:
                first = error.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"{label}: points.{signal}.{where}: {first['msg']}") from None
        _template_cache[name] = (str(data.get("kind", "")), points)
    template_kind, points = _template_cache[name]
    if kind is not None and template_kind and template_kind != kind:
        raise ValueError(f"template {name!r} is for kind {template_kind}, not {kind}")
    return dict(points)


def describe(asset: Iec104Asset) -> str:
    """The asset's link, one line for `flexedge check`."""
    template = f", template {asset.template}" if asset.template else ""
    return f"tcp {asset.host}:{asset.port} CA {asset.common_address}{template}"
