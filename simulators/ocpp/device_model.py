"""The few device-model variables a simulated 2.x station has, for GetVariables, GetReport and GetBaseReport.

* ``EVSE`` (on the station's EVSE) ``Power``: Actual = the power now (W), maxLimit = the rating.
* ``V2XChargingCtrlr`` (on the EVSE; 2.1 stations only) ``Enabled``: "true" when the charger
  can discharge; ``SupportedOperationModes``: "ChargingOnly,CentralSetpoint,Idle", plus
  ",CentralFrequency" on a station that follows AFRRSignal.

Only the Actual attribute exists.  Keys are snake_case (the ocpp library's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

V2X = "V2XChargingCtrlr"


@dataclass(frozen=True)
class Variable:
    component: str
    name: str
    value: Callable[[], str]
    data_type: str
    unit: str | None = None
    max_limit: float | None = None
    values_list: str | None = None


def variables(station) -> list[Variable]:
    spec = station.spec
    found = [Variable("EVSE", "Power", lambda: str(round(station.power_w, 1)), "decimal", "W", station.max_power_w)]
    if spec.ocpp_version == "2.1":
        modes = ",".join(station.operation_modes)
        found += [Variable(V2X, "Enabled", lambda: "true" if spec.bidirectional else "false", "boolean"),
                  Variable(V2X, "SupportedOperationModes", lambda: modes, "MemberList", values_list=modes)]
    return found


def _evse_matches(component: dict[str, Any], evse_id: int) -> bool:
    return (component.get("evse") or {}).get("id", evse_id) == evse_id


def get_variable_results(station, wanted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One GetVariableResult per requested item, in order."""
    evse_id = station.spec.evse_id
    known = variables(station)
    results = []
    for item in wanted:
        component, variable = item.get("component") or {}, item.get("variable") or {}
        result: dict[str, Any] = {"component": component, "variable": variable}
        attribute = item.get("attribute_type", "Actual")
        if attribute != "Actual":
            result["attribute_type"] = attribute
        ours = [v for v in known if v.component == component.get("name") and _evse_matches(component, evse_id)]
        match = next((v for v in ours if v.name == variable.get("name")), None)
        if not ours:
            result["attribute_status"] = "UnknownComponent"
        elif match is None:
            result["attribute_status"] = "UnknownVariable"
        elif attribute != "Actual":
            result["attribute_status"] = "NotSupportedAttributeType"
        else:
            result.update(attribute_status="Accepted", attribute_value=match.value())
        results.append(result)
    return results


def report_data(station, wanted: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """NotifyReport entries: every variable, or those ``wanted`` (GetReport's componentVariable) names."""
    evse_id = station.spec.evse_id
    data = []
    for v in variables(station):
        if wanted is not None and not any(
                (w.get("component") or {}).get("name") == v.component and _evse_matches(w["component"], evse_id)
                and (w.get("variable") or {}).get("name", v.name) == v.name for w in wanted):
            continue
        characteristics: dict[str, Any] = {"data_type": v.data_type, "supports_monitoring": False}
        if v.unit:
            characteristics["unit"] = v.unit
        if v.max_limit is not None:
            characteristics["max_limit"] = v.max_limit
        if v.values_list is not None:
            characteristics["values_list"] = v.values_list
        data.append({"component": {"name": v.component, "evse": {"id": evse_id}}, "variable": {"name": v.name},
                     "variable_attribute": [{"type": "Actual", "value": v.value(), "mutability": "ReadOnly"}],
                     "variable_characteristics": characteristics})
    return data
