"""Profile models of the local grid functions (the profile section ``functions:``) and of
smart charging's defaults (``ev_charging:``, ``EvDefaults``, used by edge/control/ev_planner.py).

``FunctionsConfig`` is meant to sit in the site profile as ``functions``; each
function is enabled by giving its section:

- ``fcr``: frequency containment (FCR) droop from a measured frequency, in
  kW of activation added to the VPP's (FRR) activation; see edge/control/fcr.py.
- ``q_u``: a reactive-power request from the local voltage along a static
  droop curve Q(U); see edge/control/qu.py.

Every key is documented in docs/profile.md, the behaviour in
docs/grid-functions.md.  Signs: + activation is upward regulation (more
export / less import); + reactive power is over-excited (injecting).

``source_problems`` checks that the measuring assets named exist and can measure
(one of the profile's cross-checks, edge/config/checks.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from edge.config.types import Identifier, Strict, _ranged
from edge.config.yamlsource import did_you_mean

# Drivers whose readings carry frequency_hz and voltage_v (AssetReading).
MEASURING_DRIVERS = ("sunspec",)


def _positive_up_to(hi: float):
    """A finite number > 0 and <= hi (``_ranged`` is inclusive at both ends, and 0 makes no sense here)."""

    def check(value: float) -> float:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"must be a finite number > 0 and at most {hi:g}, got {value}")
        if not 0 < value <= hi:
            raise ValueError(f"must be > 0 and at most {hi:g}, got {value:g}")
        return value

    return AfterValidator(check)


# ------------------------------------------------------------------------ FCR


class FcrConfig(Strict):
    """Frequency containment: proportional (droop) response to the measured frequency."""

    capacity_kw: Annotated[float, _positive_up_to(1_000_000.0)] = Field(
        description="FCR capacity: the activation at full deviation, either sign (kW)."
    )
    deadband_mhz: Annotated[float, _ranged(0.0, 10.0)] = Field(
        10.0, description="No response while |f - nominal| is at most this (mHz; SOGL allows at most 10)."
    )
    full_deviation_mhz: Annotated[float, _ranged(1.0, 5000.0)] = Field(
        200.0, description="Deviation at which the full capacity is activated (mHz; Continental Europe: 200)."
    )
    nominal_hz: Annotated[float, _ranged(45.0, 65.0)] = Field(50.0, description="Nominal grid frequency (Hz).")
    full_activation_s: Annotated[float, _positive_up_to(30.0)] = Field(
        10.0, description="Time from zero to full response: the output moves at most capacity_kw / this per second."
    )
    frequency_source: Identifier = Field(
        description="Id of the asset whose measured frequency is used (a SunSpec inverter or meter)."
    )
    max_measurement_age_s: Annotated[float, _positive_up_to(3600.0)] = Field(
        6.0, description="A frequency measured longer ago than this is stale: the response ramps back to zero."
    )

    @model_validator(mode="after")
    def _deadband_below_full(self) -> "FcrConfig":
        if self.full_deviation_mhz <= self.deadband_mhz:
            raise ValueError(
                f"full_deviation_mhz ({self.full_deviation_mhz:g}) must be above deadband_mhz ({self.deadband_mhz:g})"
            )
        return self


# ----------------------------------------------------------------------- Q(U)


class QuCurvePoint(Strict):
    """One point of the droop curve: at voltage v_pu, request q_pct of q_max_kvar."""

    v_pu: Annotated[float, _ranged(0.5, 1.5)] = Field(description="Voltage in per unit of nominal_v.")
    q_pct: Annotated[float, _ranged(-100.0, 100.0)] = Field(
        description="Reactive power in % of q_max_kvar; + over-excited (injecting), - under-excited (absorbing)."
    )


class QuConfig(Strict):
    """Voltage control: reactive power from the local voltage along a static curve Q(U)."""

    voltage_source: Identifier = Field(
        description="Id of the asset whose measured voltage (line-to-neutral) is used (a SunSpec inverter or meter)."
    )
    nominal_v: Annotated[float, _ranged(1.0, 100_000.0)] = Field(
        230.0, description="Nominal line-to-neutral voltage: the base of v_pu (V)."
    )
    curve: list[QuCurvePoint] = Field(
        description="The droop curve: points {v_pu, q_pct} by strictly increasing v_pu, at least 2; "
        "linear between points, flat beyond the end points."
    )
    q_max_kvar: Annotated[float, _positive_up_to(1_000_000.0)] = Field(
        description="Reactive power at q_pct = 100 (kvar): the base of the curve's percentages."
    )
    update_interval_s: Annotated[float, _ranged(1.0, 3600.0)] = Field(
        60.0, description="The request is recomputed this often (MAESHA: about once a minute)."
    )
    mode: Literal["gateway", "inverter"] = Field(
        "gateway",
        description="gateway: the gateway computes the request and commands reactive power; inverter: the "
        "curve is written to every SunSpec inverter with a volt-var model (705), which then follows it on "
        "its own voltage (v_pu of its own nominal voltage, q_pct of its own maximum reactive power); the "
        "gateway's request covers only the other assets.",
    )
    response_time_s: Annotated[float, _ranged(0.0, 3600.0)] = Field(
        10.0, description="inverter mode: the response time written with the curve (705 RspTms, s)."
    )

    @field_validator("curve")
    @classmethod
    def _sorted_curve(cls, curve: list[QuCurvePoint]) -> list[QuCurvePoint]:
        if len(curve) < 2:
            raise ValueError(f"needs at least 2 points, got {len(curve)}")
        for index in range(1, len(curve)):
            before, point = curve[index - 1], curve[index]
            if point.v_pu <= before.v_pu:
                raise ValueError(
                    f"points must be sorted by strictly increasing v_pu: point [{index}] (v_pu {point.v_pu:g}) "
                    f"is not above point [{index - 1}] (v_pu {before.v_pu:g})"
                )
        return curve


# -------------------------------------------------------------------- section


class FunctionsConfig(Strict):
    """Local grid functions, each enabled by giving its section."""

    fcr: FcrConfig | None = Field(None, description="Frequency containment (FCR) droop; absent: off.")
    q_u: QuConfig | None = Field(None, description="Reactive power from local voltage, Q(U); absent: off.")

    def check_sources(self, assets: Iterable[Any]) -> None:
        """Raise ValueError unless every measuring asset named is in ``assets`` and can measure.

        ``assets`` are the profile's asset models (anything with ``id`` and ``driver``).
        """
        raw = {"fcr": self.fcr and {"frequency_source": self.fcr.frequency_source},
               "q_u": self.q_u and {"voltage_source": self.q_u.voltage_source}}
        for loc, message in source_problems(raw, {asset.id: asset.driver for asset in assets}):
            raise ValueError(f"functions.{'.'.join(loc)}: {message}")


SOURCES = (("fcr", "frequency_source", "frequency"), ("q_u", "voltage_source", "voltage"))


def source_problems(functions: Any, drivers: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """What is wrong with the measuring assets the ``functions`` section names, as (key path
    under ``functions``, message): an id that is no asset's, or an asset that cannot measure.

    ``functions`` is the section as written (a mapping, possibly invalid in parts: what is not
    an asset id there is its own field error); ``drivers`` maps each asset id to its driver.
    """
    problems: list[tuple[tuple[str, ...], str]] = []
    if not isinstance(functions, dict):
        return problems
    for section, key, quantity in SOURCES:
        asset_id = functions.get(section).get(key) if isinstance(functions.get(section), dict) else None
        if not isinstance(asset_id, str):
            continue
        if asset_id not in drivers:
            measuring = [i for i, d in drivers.items() if d in MEASURING_DRIVERS]
            close = did_you_mean(asset_id, drivers)
            known = f" (measuring assets: {', '.join(measuring)})" if measuring and not close else ""
            problems.append(((section, key), f"no asset {asset_id!r} in assets{close}{known}"))
        elif drivers[asset_id] not in MEASURING_DRIVERS:
            problems.append(((section, key), f"asset {asset_id!r} (driver {drivers[asset_id]}) does not measure "
                                             f"{quantity}; use a SunSpec inverter or meter"))
    return problems


# ------------------------------------------------------------- ev charging

MAX_EV_KWH = 1000.0  # the largest EV battery the planner takes


class EvDefaults(Strict):
    """Smart charging (profile section ``ev_charging``): what the planner assumes when the driver's preferences say nothing."""

    default_departure_after_h: Annotated[float, _ranged(0.25, 168.0)] = Field(
        8.0, description="Departure assumed this long after the session started, when the driver gave none."
    )
    default_energy_kwh: Annotated[float, _ranged(0.0, MAX_EV_KWH)] = Field(
        20.0, description="Energy a session needs when the driver gave neither energy nor target SoC (or the SoC is unknown)."
    )
    max_departure_after_h: Annotated[float, _ranged(1.0, 168.0)] = Field(
        168.0, description="A departure given further ahead than this is rejected."
    )
    v2x_min_soc_pct: Annotated[float, _ranged(0.0, 100.0)] = Field(
        30.0, description="A bidirectional EV is never discharged below this state of charge (the driver's "
                          "min_soc_pct and the car's own minimum can only raise it)."
    )
    v2x_horizon_s: Annotated[float, _ranged(60.0, 3600.0)] = Field(
        900.0, description="A bidirectional EV's band must be deliverable for this long without breaking its "
                           "minimum state of charge or its departure energy (an aFRR activation lasts up to 15 min)."
    )
