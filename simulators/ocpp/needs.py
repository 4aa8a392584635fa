"""The ISO 15118 charging needs an EV states at plug-in, as the NotifyEVChargingNeeds ``chargingNeeds``.

OCPP 2.1, EV and station both bidirectional: ``DC_BPT`` (V2G in the field is DC
bidirectional power transfer, and DC is the transfer whose parameters carry the
battery's capacity and state of charge) with ``v2xChargingParameters`` (ISO 15118-20:
powers both ways as W magnitudes, energies in Wh from the present state of charge to
the target, to the V2X minimum (negative when above it) and to the V2X maximum),
``dcChargingParameters`` (capacity, state of charge, maximum power, energy to target),
``controlMode`` DynamicControl and the departure.  Anything else (2.0.1, or one side
unidirectional): ``AC_three_phase`` (``AC_single_phase`` on a 1-phase station) with
``acChargingParameters`` (ISO 15118-2: energy to target, min and max current per phase,
max voltage; integers in 2.0.1) and the departure.  Keys are snake_case: the ocpp library makes them camelCase.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

from simulators.ocpp.specs import EvSpec, StationSpec

DC_BATTERY_V = 400.0  # the EV battery voltage stated for DC_BPT


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _wh_to(ev: EvSpec, soc_pct: float) -> float:
    return round((soc_pct - ev.soc_pct) / 100.0 * ev.capacity_kwh * 1000.0, 1)


def charging_needs(ev: EvSpec, spec: StationSpec) -> dict[str, Any]:
    charge_max_w = min(ev.max_power_kw * 1000.0, spec.charge_rating_w)
    if spec.ocpp_version == "2.1" and spec.bidirectional and ev.bidirectional:
        discharge_max_w = min(ev.max_discharge_kw, spec.max_discharge_kw) * 1000.0
        needs: dict[str, Any] = {
            "requested_energy_transfer": "DC_BPT",
            "control_mode": "DynamicControl",
            "mobility_needs_mode": "EVCC",
            "v2x_charging_parameters": {
                "max_charge_power": charge_max_w, "min_charge_power": ev.min_charge_kw * 1000.0,
                "max_discharge_power": discharge_max_w, "min_discharge_power": ev.min_discharge_kw * 1000.0,
                "ev_target_energy_request": _wh_to(ev, ev.target_soc_pct),
                "ev_min_v2x_energy_request": _wh_to(ev, ev.min_soc_pct),
                "ev_max_v2x_energy_request": _wh_to(ev, ev.max_soc_pct),
                "target_soc": int(round(ev.target_soc_pct)),
            },
            "dc_charging_parameters": {
                "ev_max_current": round(charge_max_w / DC_BATTERY_V, 1), "ev_max_voltage": DC_BATTERY_V,
                "ev_max_power": charge_max_w, "ev_energy_capacity": ev.capacity_kwh * 1000.0,
                "energy_amount": max(0.0, _wh_to(ev, ev.target_soc_pct)),
                "state_of_charge": int(round(ev.soc_pct)),
            },
        }
    else:
        volts_phases = spec.voltage_v * spec.phases
        ac = {"energy_amount": max(0.0, _wh_to(ev, ev.target_soc_pct)),
              "ev_min_current": round(ev.min_charge_kw * 1000.0 / volts_phases, 1),
              "ev_max_current": round(charge_max_w / volts_phases, 1), "ev_max_voltage": spec.voltage_v}
        if spec.ocpp_version == "2.0.1":  # integers in 2.0.1: the minimum rounded up, the rest down
            ac = {key: math.ceil(value - 1e-9) if key == "ev_min_current" else int(value) for key, value in ac.items()}
        needs = {"requested_energy_transfer": "AC_three_phase" if spec.phases == 3 else "AC_single_phase",
                 "ac_charging_parameters": ac}
    if ev.departure_s is not None:
        needs["departure_time"] = _iso(ev.departure_s)
    return needs
