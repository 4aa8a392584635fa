"""OCPP 2.1 V2X pieces of a charging schedule period, and the AFRRSignal payload.

OCPP's sign is the charger's: positive power charges the EV.  flexedge's is the grid's:
positive is export (the EV discharging).  Every conversion between the two is here:

* CentralSetpoint: ``setpoint = -target_kw x 1000`` W, ``limit`` = the charging maximum
  (W), ``dischargeLimit`` = minus the discharging maximum (W, negative per the schema).
* CentralFrequency: ``v2xBaseline = -baseline_kw x 1000`` W and the signal curve
  ``[(-1000, +band_down W), (0, 0), (1000, -band_up W)]``: a full upward activation
  (signal 1000, more export) takes ``band_up`` off the charging power.
* ChargingOnly: a plain ``limit``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

SIGNAL_FULL = 1000  # AFRRSignal: the signal of a full activation


def watts(kw: float, integer: bool) -> float:
    """kW as W on the wire: 0.1 W steps (1 W for chargers that refuse fractions), rounded toward zero."""
    w = kw * 1000.0
    return float(int(w)) if integer else float(int(w * 10) / 10)


def setpoint_period(start_s: int, setpoint_kw: float, charge_max_kw: float, discharge_max_kw: float,
                    integer: bool) -> dict[str, Any]:
    """CentralSetpoint at ``setpoint_kw`` (flexedge sign) within the two maxima (magnitudes, kW)."""
    return {"startPeriod": start_s, "operationMode": "CentralSetpoint",
            "setpoint": watts(-setpoint_kw, integer) + 0.0,  # + 0.0: no -0.0 on the wire
            "limit": watts(charge_max_kw, integer), "dischargeLimit": -watts(discharge_max_kw, integer) + 0.0}


def frequency_period(start_s: int, baseline_kw: float, band_up_kw: float, band_down_kw: float,
                     charge_max_kw: float, discharge_max_kw: float, integer: bool) -> dict[str, Any]:
    """CentralFrequency around ``baseline_kw`` (flexedge sign): the charger follows AFRRSignal itself."""
    return {"startPeriod": start_s, "operationMode": "CentralFrequency",
            "v2xBaseline": watts(-baseline_kw, integer) + 0.0,
            "v2xSignalWattCurve": [{"signal": -SIGNAL_FULL, "power": watts(band_down_kw, integer)},
                                   {"signal": 0, "power": 0.0},
                                   {"signal": SIGNAL_FULL, "power": -watts(band_up_kw, integer) + 0.0}],
            "limit": watts(charge_max_kw, integer), "dischargeLimit": -watts(discharge_max_kw, integer) + 0.0}


def signal_for(activation_level: float) -> int:
    """The AFRRSignal value for an activation level in -1..1 (+ upward)."""
    level = min(1.0, max(-1.0, activation_level))
    return int(round(level * SIGNAL_FULL))


def afrr_signal_payload(signal: int, now_s: float) -> dict[str, Any]:
    moment = datetime.fromtimestamp(now_s, timezone.utc)
    return {"timestamp": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "signal": signal}
