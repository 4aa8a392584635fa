"""Which of the backend's charging-profile requests may reach the charger.

The gateway's grid limit is a profile of its own (``gateway_slots``): 1.6 a
ChargePointMaxProfile on connector 0, 2.0.1/2.1 a ChargingStationExternalConstraints on
the asset's EVSE, at the reserved stack level, plus the failsafe max profile at stack
level 0.  The charger applies the minimum of such a cap and the backend's Tx profiles, so
the backend's profiles are forwarded unless they would replace or outrank the gateway's
(``judge_set``); a ClearChargingProfile that names the gateway's profile is answered by the
gateway and not forwarded, and one that would sweep it away among others is forwarded and
the gateway's profile is sent again at once (``judge_clear``).  Pure logic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from drivers.ocpp.config import OcppCharger
from drivers.ocpp.schedule import max_purpose, purpose_for

FORWARD, REFUSE, REASSERT = "forward", "refuse", "reassert"
MAX_PURPOSES = ("ChargePointMaxProfile", "ChargingStationMaxProfile")


@dataclass(frozen=True)
class Slot:
    """One of the gateway's profiles on the charger: OCPP replaces a profile by id, or by the same
    purpose, stack level and target (1.6 connector / 2.x EVSE)."""

    profile_id: int
    purpose: str
    stack_level: int
    target: int


def gateway_slots(charger: OcppCharger, version: str, failsafe: bool) -> list[Slot]:
    """The gateway's profiles for ``charger`` (its command settings) on a ``version`` link; first the limit."""
    try:
        purpose = purpose_for(charger, version)
    except ValueError:
        return []
    if purpose in MAX_PURPOSES:
        target = 0
    else:
        target = charger.connector_id if version == "1.6" else charger.evse_id
    slots = [Slot(charger.profile_id, purpose, charger.stack_level, target)]
    if failsafe and purpose not in MAX_PURPOSES:
        slots.append(Slot(charger.failsafe_profile_id, max_purpose(version), 0, 0))
    return slots


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def judge_set(payload: dict[str, Any], version: str, slots: list[Slot]) -> str | None:
    """Why the backend's SetChargingProfile is refused, or None to forward it."""
    if not slots or not isinstance(payload, dict):
        return None
    if version == "1.6":
        profile, target = payload.get("csChargingProfiles"), _int(payload.get("connectorId"))
        profile_id = _int(profile.get("chargingProfileId")) if isinstance(profile, dict) else None
    else:
        profile, target = payload.get("chargingProfile"), _int(payload.get("evseId"))
        profile_id = _int(profile.get("id")) if isinstance(profile, dict) else None
    if not isinstance(profile, dict):
        return None  # malformed: the charger refuses it itself
    purpose, stack_level = profile.get("chargingProfilePurpose"), _int(profile.get("stackLevel"))
    limit = slots[0]
    for slot in slots:
        if profile_id == slot.profile_id:
            return f"chargingProfileId {profile_id} is the gateway's {slot.purpose} (grid limit)"
        if (purpose, stack_level, target) == (slot.purpose, slot.stack_level, slot.target):
            return f"{purpose} at stack level {stack_level} would replace the gateway's grid limit"
    if purpose == limit.purpose and (stack_level is None or stack_level >= limit.stack_level
                                     or purpose == "ChargingStationExternalConstraints"):
        return (f"{purpose} at stack level {stack_level} would outrank the gateway's grid limit "
                f"(reserved: {limit.purpose} from stack level {limit.stack_level})")
    return None


def judge_clear(payload: dict[str, Any], version: str, slots: list[Slot]) -> tuple[str, str]:
    """(FORWARD | REFUSE | REASSERT, why) for the backend's ClearChargingProfile."""
    if not slots or not isinstance(payload, dict):
        return FORWARD, ""
    if version == "1.6":
        profile_id, criteria = _int(payload.get("id")), {
            "purpose": payload.get("chargingProfilePurpose"), "stack": _int(payload.get("stackLevel")),
            "target": _int(payload.get("connectorId"))}
    else:
        raw = payload.get("chargingProfileCriteria") if isinstance(payload.get("chargingProfileCriteria"), dict) else {}
        profile_id, criteria = _int(payload.get("chargingProfileId")), {
            "purpose": raw.get("chargingProfilePurpose"), "stack": _int(raw.get("stackLevel")),
            "target": _int(raw.get("evseId"))}
    if profile_id is not None:
        for slot in slots:
            if profile_id == slot.profile_id:
                return REFUSE, f"chargingProfileId {profile_id} is the gateway's {slot.purpose} (grid limit)"
        return FORWARD, ""
    for slot in slots:
        if ((criteria["purpose"] is None or criteria["purpose"] == slot.purpose)
                and (criteria["stack"] is None or criteria["stack"] == slot.stack_level)
                and (criteria["target"] is None or criteria["target"] == slot.target)):
            if criteria["purpose"] is not None:
                return REFUSE, f"the criteria name the gateway's {slot.purpose} (grid limit)"
            return REASSERT, f"the criteria also match the gateway's {slot.purpose}: it is sent again"
    return FORWARD, ""


def refusal_answer(action: str, version: str, why: str) -> dict[str, Any]:
    """The answer the gateway gives the backend instead of the charger's."""
    status = "Rejected" if action == "SetChargingProfile" else "Unknown"  # ClearChargingProfile has no Rejected
    if version == "1.6":
        return {"status": status}
    return {"status": status, "statusInfo": {"reasonCode": "GridLimit", "additionalInfo": why[:512]}}
