"""The MQTT payloads, as models: the source of the JSON Schemas in docs/mqtt-api.md.

These models describe the public contract; tests validate what the gateway
really publishes against them, and `python -m edge.uplink.messages` prints the
schemas that docs/mqtt-api.md embeds (a test checks the two agree).
Incoming setpoints are validated by edge.control.setpoints, whose error messages a VPP
operator reads in the ack; the schema here documents the same rules.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edge.uplink.intake import MESSAGE_ID_PATTERN, MESSAGE_ID_RULE
from edge.config.types import ID_PATTERN

Kw = float | None


class Contract(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Times on the wire: ISO 8601 with a zone, or epoch seconds between 2001 and 2100 (a
# bound that keeps every later conversion of the time finite and in range).
EPOCH_MIN_S = 1_000_000_000.0
EPOCH_MAX_S = 4_102_444_800.0
WireTime = Annotated[str, Field(min_length=1, max_length=40)] | Annotated[float, Field(ge=EPOCH_MIN_S, le=EPOCH_MAX_S)]
MessageId = Annotated[str, Field(pattern=MESSAGE_ID_PATTERN, description=f"Message id: {MESSAGE_ID_RULE}.")]
AssetId = Annotated[str, Field(pattern=ID_PATTERN, description="An asset id of the site profile.")]
MAX_ABS_KW = 1_000_000.0
WireKw = Annotated[float, Field(ge=-MAX_ABS_KW, le=MAX_ABS_KW, allow_inf_nan=False)]


class SetpointMessage(Contract):
    """`<prefix>/<site>/setpoint`, published by the VPP. Give `valid_s` or `expires_at`, not both.

    At most 16 KiB, strict UTF-8 JSON (no NaN, no duplicate keys); see "Inbound messages"."""

    id: MessageId = Field(description=f"Unique id ({MESSAGE_ID_RULE}); a repeated id is rejected as a replay.")
    ts: WireTime = Field(description="Issue time: ISO 8601 with zone, or epoch seconds.")
    valid_s: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] | None = Field(
        None, description="Validity from ts, seconds.")
    expires_at: WireTime | None = Field(
        None, description="End of validity: ISO 8601 with zone, or epoch seconds; at most 3600 s after ts.")
    activation_kw: WireKw = Field(description="Requested activation, kW; positive = upward regulation (more export / less import).")


class ConnectionLimitsSlot(Contract):
    """One slot of a `connection_limits` schedule: magnitudes, >= 0; null or absent: no limit."""

    import_limit_kw: Annotated[float, Field(ge=0, le=MAX_ABS_KW, allow_inf_nan=False)] | None = None
    export_limit_kw: Annotated[float, Field(ge=0, le=MAX_ABS_KW, allow_inf_nan=False)] | None = None


class ScheduleMessage(Contract):
    """`<prefix>/<site>/schedule`, published by the VPP or the DSO (docs/schedules.md). At most 1 MiB."""

    id: MessageId = Field(description=f"Unique id ({MESSAGE_ID_RULE}) across all kinds; a repeated id is a replay.")
    ts: WireTime = Field(description="Issue time: ISO 8601 with zone, or epoch seconds; the newest schedule decides.")
    kind: Literal["activation", "site_power", "connection_limits", "tariff", "baseline"]
    start: WireTime = Field(description="Start of the first slot.")
    resolution_s: Annotated[float, Field(ge=60, le=3600)] = Field(
        description="Slot length, whole seconds dividing a day (60 ... 3600).")
    values: list[WireKw | ConnectionLimitsSlot | None] = Field(
        min_length=1, max_length=44640,
        description="One value per slot: kW (activation, site_power, baseline), a price per kWh (tariff), or "
                    "limits (connection_limits); null: nothing scheduled in that slot.")
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] | None = Field(None, description="tariff only: ISO 4217 code.")
    asset_id: AssetId | None = Field(None, description="baseline only: the asset whose baseline this is.")


class EvPreferencesMessage(Contract):
    """`<prefix>/<site>/ev/preferences`: an EV driver's needs for the session at a charger. At most 16 KiB."""

    asset_id: AssetId = Field(description="The charger's asset id.")
    departure: WireTime | None = Field(None, description="When the EV leaves: ISO 8601 with zone, or epoch seconds.")
    energy_kwh: Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)] | None = None
    target_soc_pct: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] | None = None
    battery_capacity_kwh: Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)] | None = None
    ev_max_kw: Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)] | None = None
    min_soc_pct: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] | None = Field(
        None, description="A bidirectional EV is never discharged below this state of charge.")


class ScheduleAck(Contract):
    """`<prefix>/<site>/schedule/ack`: one per schedule received (docs/schedules.md)."""

    id: str | None = Field(description="The schedule's id; null when the payload had no readable id.")
    status: Literal["accepted", "rejected"]
    reason: str | None = Field(description="Why it was rejected, naming the field; null when accepted.")
    ts: str = Field(description="When the gateway decided, ISO 8601 UTC.")
    kind: Literal["activation", "site_power", "connection_limits", "tariff", "baseline"] | None


class EvPreferencesAck(Contract):
    """`<prefix>/<site>/ev/preferences/ack`: one per preferences message (docs/schedules.md)."""

    asset_id: str | None
    status: Literal["accepted", "rejected"]
    reason: str | None = Field(description="Why they were rejected, naming the field; null when accepted.")
    ts: str


class SetpointAck(Contract):
    """`<prefix>/<site>/setpoint/ack`: one per setpoint received."""

    id: str | None = Field(description="The setpoint's id; null when the payload had no readable id.")
    status: Literal["accepted", "rejected"]
    reason: str | None = Field(description="Why it was rejected, naming the field; null when accepted.")
    ts: str = Field(description="When the gateway decided, ISO 8601 UTC.")
    activation_kw: float | None = Field(description="The activation now in force; null when rejected.")


class EvValues(Contract):
    """An EV charger's session, as the charger and the car tell it (ISO 15118 through OCPP) and as
    the gateway's battery rules leave it (docs/dispatch.md, "Bidirectional EVs")."""

    bidirectional: bool = Field(description="The charger, the car and the session can discharge (OCPP 2.1 V2X).")
    soc_pct: Kw = Field(description="The car's state of charge.")
    departure: str | None = Field(description="Departure the plan works to (driver, car or default), ISO 8601 UTC.")
    energy_to_departure_kwh: Kw = Field(description="Energy still to be charged by departure.")
    charge_max_kw: Kw = Field(description="The most it can charge now (magnitude), battery rules applied.")
    discharge_max_kw: Kw = Field(description="The most it can discharge now (magnitude), battery rules applied: "
                                             "0 for a one-way session.")
    min_soc_pct: Kw = Field(description="The minimum state of charge the discharge band keeps (the highest of the "
                                        "profile's, the driver's and the car's); null for a one-way session.")
    limited_by: Literal["minimum_soc", "departure_energy", "maximum_soc", "energy_unknown"] | None = Field(
        description="The battery rule that narrows the band now, if any.")
    operation_mode: str | None = Field(description="OCPP 2.1 operation mode last accepted by the charger "
                                                   "(CentralSetpoint, ChargingOnly, CentralFrequency ...).")
    energy_charged_kwh: Kw = Field(description="Charged this session.")
    energy_discharged_kwh: Kw = Field(description="Discharged this session.")


class UpstreamValues(Contract):
    """The link of a proxied device to the system its traffic goes to (docs/drivers/ocpp.md, "Local controller")."""

    connected: bool = Field(description="The link to the CPO backend is up.")
    queued: int = Field(ge=0, description="Messages waiting for the link to come back (transactions, meter values).")
    host: str = Field(description="The backend's host (no credentials).")


class AssetValues(Contract):
    kind: Literal["pv", "bess", "p2h", "ev_charger", "meter"]
    online: bool
    degraded: bool = Field(description="Online, but the last command failed or a value was implausible.")
    p_kw: Kw = Field(description="Measured active power, + export.")
    q_kvar: Kw = Field(description="Measured reactive power.")
    baseline_kw: Kw = Field(description="Power without activation (frozen when the activation started).")
    baseline_method: Literal["measured", "frozen", "schedule", "ev_plan"] | None = Field(
        description="How baseline_kw was found: measured (no activation in force), frozen (the power when the "
                    "activation or grid limit started), schedule (the VPP's baseline schedule, the prosumption plan), "
                    "ev_plan (the charger's smart-charging plan for this quarter hour)."
    )
    setpoint_kw: Kw = Field(description="Power commanded to the asset; null when released (no command in force).")
    activation_kw: Kw = Field(description="setpoint_kw - baseline_kw: this asset's share of the activation.")
    band_up_kw: Kw = Field(description="Available upward regulation from the baseline.")
    band_down_kw: Kw = Field(description="Available downward regulation from the baseline.")
    band_gap_kw: list[float] | None = Field(
        min_length=2, max_length=2,
        description="[low, high]: powers strictly between them cannot be run at (EV chargers, P2H: off or "
                    "between minimum and maximum load, so [-min, 0]); null: the band is continuous.",
    )
    soc_pct: Kw = Field(description="State of charge, storage only.")
    q_setpoint_kvar: Kw = Field(
        description="Reactive power commanded to the asset (+ over-excited); null when none is (no Q order in force)."
    )
    read_at: str | None = Field(
        description="When the asset's values were measured (a polled device: the poll that answered; a device that "
                    "reports by itself: its newest report), ISO 8601 UTC; null while it is offline."
    )
    age_ms: int | None = Field(
        ge=0, description="How old the asset's values were at ts (ts - read_at), in ms; null while it is offline."
    )
    ev: EvValues | None = Field(
        None, description="EV chargers only: the session with its EV; null while no EV is plugged in.")
    upstream: UpstreamValues | None = Field(
        None, description="Only for a device whose traffic the gateway forwards (an OCPP charger proxied to its CPO "
                          "backend): that link.")


class SiteValues(Contract):
    p_kw: Kw = Field(description="Site active power: the connection-point meter when there is one, else the sum of the assets.")
    q_kvar: Kw
    baseline_kw: Kw = Field(description="Site power without activation.")
    setpoint_kw: Kw = Field(description="baseline_kw + activation_kw: the power the site is commanded to.")
    activation_requested_kw: Kw = Field(description="The activation asked for (setpoint in force, or the fallback ramp).")
    activation_kw: Kw = Field(description="The activation commanded after band and grid limits.")
    band_up_kw: Kw
    band_down_kw: Kw
    soc_pct: Kw = Field(description="Mean state of charge of the online storage assets.")
    online: bool = Field(description="At least one asset answers.")
    metered: bool = Field(description="Site values come from an online connection-point meter.")
    limited_by: Literal["export_limit", "import_limit", "band", "discrete_band", "command_refused"] | None = Field(
        description="Why activation_kw differs from activation_requested_kw (discrete_band: chargers or P2H units "
                    "that are off or between minimum and maximum load cannot deliver the exact share, and the "
                    "continuous assets could not make up the difference; command_refused: assets that refused "
                    "their target, or did not confirm it, count at their measured power, and the others could "
                    "not take their share)."
    )
    import_limit_kw: Kw = Field(description="Import limit in force: the profile's, tightened by a connection-limits schedule.")
    export_limit_kw: Kw = Field(
        description="Export limit in force: the profile's, tightened by a connection-limits schedule and the grid operator's order."
    )
    q_requested_kvar: Kw = Field(
        description="Reactive power the grid operator's Q or tan(phi) order asks for at the connection point; null: no order."
    )
    q_setpoint_kvar: Kw = Field(
        description="Predicted site reactive power with the commanded targets; differs from q_requested_kvar when "
                    "the assets' reactive ratings cannot cover it."
    )


class GatewayHealth(Contract):
    cycles: int
    missed_cycles: int
    cycle_duration_ms_last: float | None
    cycle_duration_ms_p99: float
    cycle_lateness_ms_last: float | None
    cycle_lateness_ms_p99: float
    loop_lag_ms_p99: float
    loop_lag_ms_max: float
    loop_lag_ms_max_since_last: float = Field(description="Largest event-loop lag since the previous telemetry message.")
    allocation_ms_last: float | None = Field(description="Time the last allocation took (sharing the activation), ms.")
    allocation_ms_p99: float = Field(description="Its 99th percentile over the last 300 allocations, ms.")
    messages_repaired: int = Field(
        ge=0, description="Messages the gateway built that could not be encoded as they were (a NaN, a lone surrogate), "
                          "since start: each went out repaired (bad values as null or escaped) with a message_repaired event.")
    profile_sha256: str | None = Field(
        pattern=r"^[0-9a-f]{64}$", description="sha256 of the site profile file in force (hex); changes on a reload.")
    profile_version: str | None = Field(description="The profile's `version` key; null when it has none.")


class GridOrdersValues(Contract):
    export_limit_kw: Kw = Field(description="Active-power limit ordered by the grid operator (DEIE); null: none.")
    disconnected: bool = Field(description="The grid operator ordered the site to stop producing.")
    reactive_setpoint_kvar: Kw = Field(description="Reactive power ordered at the connection point, + over-excited; null: none.")
    tan_phi: Kw = Field(description="tan(phi) = Q / P ordered at the connection point (flexedge signs); null: none.")
    source: str = Field(description="Where the orders come from: none, deie, link_loss_default, or persisted "
                        "(saved before the gateway restarted and put back in force at start-up, until the operator's "
                        "next order or lift, or the DEIE's general interrogation in the client role).")


class FcrValues(Contract):
    frequency_hz: Kw = Field(description="The measured frequency used; null while the measurement is unusable.")
    deviation_mhz: Kw = Field(description="frequency - nominal, mHz.")
    target_kw: float = Field(description="The static droop response to that frequency, + upward.")
    activation_kw: float = Field(description="The FCR activation in force (rate-limited), added to the FRR activation.")
    measurement_ok: bool


class QuValues(Contract):
    voltage_v: Kw = Field(description="The measured voltage used, line-to-neutral; null while unusable.")
    v_pu: Kw
    request_kvar: Kw = Field(description="The curve's reactive-power request, + over-excited; null: none (released).")
    measurement_ok: bool
    mode: Literal["gateway", "inverter"] = Field(description="Where the curve runs (profile `functions.q_u.mode`).")
    inverter_curve_assets: list[str] = Field(
        description="inverter mode: the assets that run the curve themselves this cycle (model 705); the request is "
        "shared among the others, scaled to their part of the reactive capability.")


class FunctionsValues(Contract):
    """The local grid functions that are enabled; null: off."""

    fcr: FcrValues | None
    q_u: QuValues | None


class Telemetry(Contract):
    """`<prefix>/<site>/telemetry`: one per control cycle, spooled."""

    seq: int = Field(ge=1, description="Rises by one per message, across restarts.")
    ts: str = Field(description="The control cycle's tick, ISO 8601 UTC: when the gateway took every asset's "
                                "newest reading (the process image) to decide and report; each asset's read_at says "
                                "when its values were measured.")
    site_id: str
    cycle_s: float
    mode: Literal["setpoint", "schedule", "fallback", "idle"]
    setpoint_id: str | None
    schedule_id: str | None = Field(description="The activation or site-power schedule deciding the activation (mode schedule).")
    site: SiteValues
    assets: dict[str, AssetValues]
    grid_orders: GridOrdersValues
    functions: FunctionsValues
    gateway: GatewayHealth


class Event(Contract):
    """`<prefix>/<site>/events`: spooled; `seq` is its own rising counter."""

    seq: int = Field(ge=1)
    ts: str
    site_id: str
    type: str = Field(description="See the table of event types in docs/mqtt-api.md.")
    asset_id: str | None
    detail: dict[str, Any]


class IntervalPower(Contract):
    """Active power over one interval (site or asset); see "Interval aggregates" in docs/mqtt-api.md."""

    p_mean_kw: Kw = Field(description="Time-weighted mean active power over the covered time, + export; null: nothing covered.")
    p_min_kw: Kw = Field(description="Lowest power: samples in the interval and the interpolated value at its edges.")
    p_max_kw: Kw = Field(description="Highest power, likewise.")
    energy_import_kwh: float | None = Field(
        ge=0, description="Energy imported from the grid (negative power) in the covered time, >= 0; null: nothing covered."
    )
    energy_export_kwh: float | None = Field(ge=0, description="Energy exported (positive power) in the covered time, >= 0.")
    samples: int = Field(ge=0, description="Control cycles in the interval with a valid active power.")
    samples_missing: int = Field(ge=0, description="Control cycles in the interval without one (offline, unknown, not finite).")
    coverage_pct: float = Field(
        ge=0, le=100, description="Share of the interval between valid samples at most 3.5 cycles apart; the rest is a gap."
    )


class AssetIntervalPower(IntervalPower):
    kind: str | None


class IntervalValidation(IntervalPower):
    baseline_mean_kw: Kw = Field(description="Time-weighted mean baseline (power without activation).")
    activation_mean_kw: Kw = Field(description="Time-weighted mean activation delivered, + upward.")
    voltage_mean_v: Kw = Field(description="Time-weighted mean voltage, V; null: not measured.")
    voltage_coverage_pct: float = Field(ge=0, le=100, description="Share of the interval with a known voltage.")


class AssetIntervalValidation(IntervalValidation):
    kind: str | None


class _IntervalMessage(Contract):
    """What the consumption and validation messages share: the interval and its coverage."""

    seq: int = Field(ge=1, description="Rises by one per message, across restarts; its own counter.")
    ts: str = Field(description="When the gateway closed the interval, ISO 8601 UTC.")
    site_id: str
    interval_start: str = Field(
        description="Start of the interval (included), ISO 8601 UTC, on a whole minute (consumption) or quarter hour (validation)."
    )
    interval_end: str = Field(description="End of the interval (excluded).")
    interval_s: float = Field(gt=0)
    partial: bool = Field(
        description="The gateway did not sample across the interval's start or end (started, stopped, clock step, stall)."
    )


class ConsumptionData(_IntervalMessage):
    """`<prefix>/<site>/consumption`: one per whole UTC minute, spooled (MAESHA IE-02-01)."""

    site: IntervalPower
    assets: dict[str, AssetIntervalPower]


class ValidationData(_IntervalMessage):
    """`<prefix>/<site>/validation`: one per UTC quarter hour, spooled (MAESHA IE-03-01: baseline, P, U)."""

    site: IntervalValidation = Field(description="voltage_mean_v: the connection-point meter's, else the first asset's.")
    assets: dict[str, AssetIntervalValidation]


class ProfileIdentity(Contract):
    """Which site profile the gateway runs."""

    sha256: str | None = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the profile file's bytes, hex.")
    version: str | None = Field(description="The profile's `version` key; null when it has none.")


class Status(Contract):
    """`<prefix>/<site>/status`: retained; the birth message, the last will, and the shutdown notice.

    The birth message is published again, on the same connection, when a reload changes the profile."""

    state: Literal["online", "offline"]
    site_id: str
    version: str | None = None
    profile: ProfileIdentity | None = Field(None, description="Birth message: the profile in force.")
    assets: list[dict[str, str]] | None = None
    reason: str | None = None
    ts: str | None = None


CONTRACT = {
    "setpoint": SetpointMessage,
    "setpoint/ack": SetpointAck,
    "schedule": ScheduleMessage,
    "schedule/ack": ScheduleAck,
    "ev/preferences": EvPreferencesMessage,
    "ev/preferences/ack": EvPreferencesAck,
    "telemetry": Telemetry,
    "events": Event,
    "consumption": ConsumptionData,
    "validation": ValidationData,
    "status": Status,
}


def schemas() -> dict[str, dict[str, Any]]:
    return {topic: model.model_json_schema() for topic, model in CONTRACT.items()}


if __name__ == "__main__":
    print(json.dumps(schemas(), indent=2))
