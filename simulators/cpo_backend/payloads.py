"""Payloads (camelCase, as on the wire) of the requests a CPO backend sends, per OCPP version."""

from __future__ import annotations

from datetime import datetime, timezone

PURPOSES_16 = ("ChargePointMaxProfile", "TxDefaultProfile", "TxProfile")
PURPOSES_2X = ("ChargingStationMaxProfile", "TxDefaultProfile", "TxProfile", "ChargingStationExternalConstraints")


def _iso_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def set_charging_profile(version: str, *, limit: float, unit: str, purpose: str, stack_level: int, profile_id: int,
                         evse_or_connector: int, transaction_id=None, number_phases: int | None = None) -> dict:
    """One period from now on (Absolute, starting now), at ``limit`` ``unit`` ("A" or "W")."""
    if unit not in ("A", "W"):
        raise ValueError(f"unit must be 'A' or 'W', got {unit!r}")
    allowed = PURPOSES_16 if version == "1.6" else PURPOSES_2X
    if purpose not in allowed:
        raise ValueError(f"purpose {purpose!r} is not an OCPP {version} chargingProfilePurpose ({', '.join(allowed)})")
    if purpose == "TxProfile" and transaction_id is None:
        raise ValueError("a TxProfile needs transaction_id")
    period = {"startPeriod": 0, "limit": float(limit)}
    if number_phases is not None:
        period["numberPhases"] = number_phases
    schedule = {"chargingRateUnit": unit, "chargingSchedulePeriod": [period], "startSchedule": _iso_now()}
    profile = {"stackLevel": stack_level, "chargingProfilePurpose": purpose, "chargingProfileKind": "Absolute"}
    if version == "1.6":
        profile.update(chargingProfileId=profile_id, chargingSchedule=schedule)
        if transaction_id is not None:
            profile["transactionId"] = int(transaction_id)
        return {"connectorId": evse_or_connector, "csChargingProfiles": profile}
    profile.update(id=profile_id, chargingSchedule=[{"id": profile_id, **schedule}])
    if transaction_id is not None:
        profile["transactionId"] = str(transaction_id)
    return {"evseId": evse_or_connector, "chargingProfile": profile}


def clear_charging_profile(version: str, *, profile_id=None, purpose=None, stack_level=None,
                           evse_or_connector=None) -> dict:
    """Clear by id and/or criteria; nothing given clears every profile the charger has."""
    if version == "1.6":
        fields = {"id": profile_id, "connectorId": evse_or_connector, "chargingProfilePurpose": purpose,
                  "stackLevel": stack_level}
        return {k: v for k, v in fields.items() if v is not None}
    criteria = {k: v for k, v in {"evseId": evse_or_connector, "chargingProfilePurpose": purpose,
                                  "stackLevel": stack_level}.items() if v is not None}
    payload: dict = {}
    if profile_id is not None:
        payload["chargingProfileId"] = profile_id
    if criteria:
        payload["chargingProfileCriteria"] = criteria
    return payload


def remote_start(version: str, *, id_tag: str, evse_or_connector: int, remote_start_id: int) -> tuple[str, dict]:
    if version == "1.6":
        return "RemoteStartTransaction", {"idTag": id_tag, "connectorId": evse_or_connector}
    return "RequestStartTransaction", {"idToken": {"idToken": id_tag, "type": "ISO14443"},
                                       "remoteStartId": remote_start_id, "evseId": evse_or_connector}


def remote_stop(version: str, *, transaction_id) -> tuple[str, dict]:
    if version == "1.6":
        return "RemoteStopTransaction", {"transactionId": int(transaction_id)}
    return "RequestStopTransaction", {"transactionId": str(transaction_id)}
