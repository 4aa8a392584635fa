"""What the central system knows about one charger, rebuilt from its messages.

A ``ChargerSession`` lives as long as the central system, across websocket
connections: the link comes and goes, the asset stays.  Handlers of every OCPP
version feed it (``on_status``, ``on_transaction_started`` ...); it turns
them into the asset's ``AssetReading`` and upstream events.  After a gateway
restart nothing is known until the charger speaks again: status comes from a
StatusNotification (the central system asks for one with TriggerMessage on
every connection) and a running transaction from the MeterValues or
TransactionEvent that mention it.

An EV's charging needs (ISO 15118, NotifyEVChargingNeeds) and its energy are kept in
``self.ev`` (``drivers.ocpp.ev``).  A session is V2X (``v2x()``) when the link is OCPP
2.1, the charger can discharge (``features``, from the profile or its device model,
``drivers.ocpp.features``), and the car asked for a bidirectional transfer with a
maximum discharge power above 0; its reading then offers discharging too.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from edge.asset import AssetReading, CommandLog, DeviceRating, DispatchContext, EventSink, PowerPlan

from drivers.ocpp.config import OcppCharger
from drivers.ocpp.ev import EvAccount
from drivers.ocpp.features import ChargerFeatures
from drivers.ocpp.limits import ChargeLimit
from drivers.ocpp.meter import MeterSample
from drivers.ocpp.pacing import LoopPacer
from drivers.ocpp.schedule import LIMIT, SETPOINT, Command
from drivers.ocpp.session_v2x import V2xSession

# 1.6 ChargePointStatus and 2.0.1 ConnectorStatus values meaning a vehicle is plugged in.
EV_PRESENT = {"Preparing", "Charging", "SuspendedEV", "SuspendedEVSE", "Finishing", "Occupied"}
EV_ABSENT = {"Available", "Unavailable", "Faulted", "Reserved"}

log = logging.getLogger("flexedge.drivers.ocpp")


def fallback_settings(charger: OcppCharger) -> dict[str, str] | None:
    """What a charger that refuses its configured profile gets instead, or None if nothing to fall back to.

    Chargers exist that refuse ChargingStationExternalConstraints from a CSMS (2.0.1 allows
    that) or any limit in W.  The fallback is the most widely accepted profile: TxDefaultProfile
    (TxProfile for a charger with ``no_tx_default_profile``) in A.  Other purposes (the max
    profiles, TxProfile) are kept and only W becomes A.
    """
    purpose = charger.effective_purpose()
    settings: dict[str, str] = {}
    if purpose == "ChargingStationExternalConstraints":
        settings["profile_purpose"] = "TxProfile" if charger.no_tx_default_profile else "TxDefaultProfile"
    if charger.limit_unit == "W" or settings:
        settings["limit_unit"] = "A"
        return settings
    return None


class TagHasher:
    """Salted HMAC-SHA256 of ID tags: stable per installation, not reversible without the salt."""

    def __init__(self, salt: bytes):
        if len(salt) < 16:
            raise ValueError("ID tag salt must be at least 16 bytes")
        self._salt = salt

    def __call__(self, tag: str | None) -> str | None:
        if not tag:
            return None
        return hmac.new(self._salt, tag.encode(), hashlib.sha256).hexdigest()[:20]


class ChargerSession(V2xSession):
    def __init__(self, charger: OcppCharger, emit_event: EventSink, hash_tag: Callable[[str | None], str | None]):
        self.charger = charger
        self.emit_event = emit_event
        self.hash_tag = hash_tag
        self.command_log = CommandLog()  # the driver puts its own here (OcppChargerDriver.run)
        # Where the session may keep state across restarts (the folder of the ID tag salt; the
        # central system sets it): a proxied charger's queue for its backend.  None: nowhere.
        self.state_dir: Path | None = None
        self.connected = False
        self.ocpp_version: str | None = None
        self.boot: dict[str, Any] = {}
        # The EVSE's maximum power as the charger states it (2.0.1 device model, EVSE Power
        # maxLimit); kept across links, like the charger itself.  None: not stated.
        self.device_max_power: DeviceRating | None = None
        self.connector_status: str | None = None
        self.ev_present = False
        self.transaction_id: str | None = None
        self.tag_hash: str | None = None
        self.meter_start_wh: float | None = None
        self.sample = MeterSample()
        self.sample_at = 0.0
        self.degraded = False
        self.last_failure = ""
        # Command state: the wanted target (None = relaxed) and the limit the charger accepted.
        self.target_kw: float | None = None
        self.target_given = False
        self.limit_in_force: ChargeLimit | None = None
        # The last limit was refused or unanswered, so the charger runs unlimited or not as
        # commanded (AssetReading.command_refused); cleared by the next accepted profile.
        self.command_refused = False
        # The charger as commanded: its configuration, or once it refused the configured
        # purpose or unit, the fallback (see fallback_settings).  Kept for the session's
        # lifetime, across links: a charger that refused a purpose refuses it again after
        # reconnecting, and each retry would leave it unlimited for a while.
        self.command_charger: OcppCharger = charger
        self.fallback: dict[str, Any] | None = None  # the charging_profile_fallback event's detail
        self.configured_profile_accepted = False  # once accepted, a refusal is no reason to fall back
        # Set when it is this charger's turn to (re)consider its command; the central system's
        # pacer hands turns out a few per loop iteration (drivers.ocpp.pacing).  Without a
        # pacer (a session on its own), a request sets it at once.
        self.command_wakeup = asyncio.Event()
        self.pacer: LoopPacer | None = None
        # OCPP 2.1 and the EV (see the module's docstring).
        self.ev = EvAccount()
        self.features = ChargerFeatures()  # learned again at each connection
        self._default_features_logged = False
        self.v2x_transaction: str | None = None  # the transaction a v2x_session_started was emitted for
        # The plan (multi-period profiles) and the dispatch context (AFRRSignal), newest wins.
        self.plan: PowerPlan | None = None
        self.context: DispatchContext | None = None
        self.hold_s = 10.0  # the driver sets it from plan_hold_s and the cycle
        self.failsafe_kw: tuple[float, float | None] | None = None  # (import, export) share; the driver sets it
        # What the charger accepted last, and when (monotonic): a profile with a hold is refreshed.
        self.command_in_force: Command | None = None
        self.command_accepted_mono = 0.0
        self.operation_mode: str | None = None  # 2.1: period 0's operation mode, as accepted
        # Per connection: fallbacks for what the charger refused on this link.
        self.frequency_refused = False  # AFRRSignal or a CentralFrequency profile: CentralSetpoint instead
        self.clear_refused = False  # ClearChargingProfile: a limit at the rating instead
        self.afrr_signal_sent: int | None = None
        self._reports: dict[int, tuple[list[dict[str, Any]], asyncio.Future]] = {}

    def emit(self, event_type: str, detail: dict[str, Any]) -> None:
        self.emit_event(event_type, self.charger.id, {"charge_point_id": self.charger.charge_point_id, **detail})

    # ----------------------------------------------------------- link

    def on_connected(self, ocpp_version: str, remote: str) -> None:
        self.connected = True
        self.ocpp_version = ocpp_version
        self.limit_in_force = None  # unknown after (re)connection: send again
        self.command_in_force = None
        self.operation_mode = None
        self.features = ChargerFeatures()
        self.frequency_refused = self.clear_refused = False
        self.afrr_signal_sent = None
        self.request_command()
        self.emit("asset_online", {"ocpp_version": ocpp_version, "remote": remote})

    # Hooks of the central system for a session that does more with its links (a proxied
    # charger, drivers.ocpp.proxy); a plain session does nothing with them.

    def point_class(self, base: type) -> type:
        """The connection class for this charger's links, given the version's."""
        return base

    def on_link(self, point: Any, version: str) -> None:
        """A link's connection object exists (before anything is received on it)."""

    def on_link_closed(self, point: Any) -> None:
        """That link ended."""

    def close(self) -> None:
        """The central system stops or forgets the charger."""

    def upstream_status(self) -> "UpstreamStatus | None":
        """The link to the charger's CPO backend, if it is proxied (``AssetReading.upstream``)."""
        return None

    def on_disconnected(self, reason: str) -> None:
        if not self.connected:
            return
        self.connected = False
        self.emit("asset_offline", {"reason": reason})

    def on_boot(self, info: dict[str, Any]) -> None:
        self.boot = info
        # A charger that (re)boots may have dropped its profiles: send the limit again.
        self.limit_in_force = None
        self.request_command()

    # ---------------------------------------------------------- state

    def on_status(self, status: str) -> None:
        self.connector_status = status
        if status in EV_PRESENT:
            self._set_ev_present(True)
        elif status in EV_ABSENT:
            self._set_ev_present(False)

    def _set_ev_present(self, present: bool) -> None:
        if present == self.ev_present:
            return
        self.ev_present = present
        self.emit("ev_connected" if present else "ev_disconnected", {})
        if not present:
            self.sample.power_w = 0.0
            self.sample.export_power_w = None
            self.sample.current_a = 0.0
            self.sample.soc_pct = None
            self.ev.reset()

    def on_transaction_started(self, transaction_id: str, id_tag: str | None, meter_start_wh: float | None) -> None:
        if transaction_id == self.transaction_id:
            if id_tag and self.tag_hash is None:
                self.tag_hash = self.hash_tag(id_tag)
            return
        self.transaction_id = transaction_id
        self.tag_hash = self.hash_tag(id_tag)
        self.meter_start_wh = meter_start_wh
        self.ev.start_transaction(meter_start_wh)
        self.limit_in_force = None  # a TxProfile belongs to one transaction: send the limit again
        self._set_ev_present(True)
        self.request_command()  # a TxProfile can only be sent now
        self.emit("session_started", {"transaction_id": transaction_id, "id_tag_hash": self.tag_hash,
                                       "meter_start_wh": meter_start_wh})
        self._v2x_session_check()

    def on_transaction_seen(self, transaction_id: str) -> None:
        """A message names a transaction we did not see start (gateway restarted meanwhile)."""
        if self.transaction_id is None:
            self.on_transaction_started(transaction_id, None, None)

    def on_transaction_stopped(self, transaction_id: str, meter_stop_wh: float | None, reason: str | None) -> None:
        if self.transaction_id is not None and transaction_id != self.transaction_id:
            return  # another connector's transaction (1.6 StopTransaction names no connector)
        energy_kwh = None
        if meter_stop_wh is not None and self.meter_start_wh is not None:
            energy_kwh = round((meter_stop_wh - self.meter_start_wh) / 1000.0, 4)
        self.emit("session_stopped", {"transaction_id": transaction_id, "id_tag_hash": self.tag_hash,
                                       "energy_kwh": energy_kwh, "reason": reason})
        if self.v2x_transaction is not None:
            self.emit("v2x_session_stopped", {
                "transaction_id": self.v2x_transaction, "energy_charged_kwh": round(self.ev.charged_kwh(), 4),
                "energy_discharged_kwh": round(self.ev.discharged_kwh(), 4), "reason": reason})
            self.v2x_transaction = None
        self.transaction_id = None
        self.tag_hash = None
        self.meter_start_wh = None
        self.sample.power_w = 0.0
        self.sample.export_power_w = None
        self.sample.current_a = 0.0
        self.ev.reset()
        self.request_command()  # a V2X setpoint ends with the session

    def on_meter(self, sample: MeterSample) -> None:
        for name in ("power_w", "energy_wh", "current_a", "soc_pct", "export_power_w", "export_energy_wh"):
            value = getattr(sample, name)
            if value is not None:
                setattr(self.sample, name, value)
        if self.transaction_id is not None and self.meter_start_wh is None and sample.energy_wh is not None:
            self.meter_start_wh = sample.energy_wh  # 2.0.1 has no meterStart: first register of the transaction
        self.ev.on_registers(sample.energy_wh, sample.export_energy_wh)
        self.sample_at = time.time()

    # -------------------------------------------------------- command

    def set_target_kw(self, target_kw: float | None) -> None:
        """Never blocks and wakes nothing at once: the charger's turn to send is queued (once)."""
        self.target_kw = target_kw
        self.target_given = True
        self.request_command()

    def request_command(self, front: bool = False) -> None:
        """Ask for a turn of the command task: it then sends the newest target if it needs sending."""
        if self.pacer is None:
            self.command_wakeup.set()
        elif self.connected:  # without a link there is no command task; on_connected asks again
            self.pacer.submit(self, self.command_wakeup.set, front=front)

    def set_plan(self, plan: PowerPlan | None) -> None:
        if plan != self.plan:
            self.plan = plan
            self.request_command()

    def set_dispatch_context(self, context: DispatchContext | None) -> None:
        if context != self.context:
            self.context = context
            if self.features.afrr_signal:
                self.request_command()

    def on_command_result(self, command: Command, accepted: bool, why: str, *, refused: bool = False,
                          purpose: str | None = None) -> bool:
        """Record the outcome of a SetChargingProfile (or a ClearChargingProfile).  ``refused``: the
        charger answered no (Rejected, a CALLERROR) or the profile cannot exist in its version, as
        opposed to no answer.  Returns True when the refusal switched the charger to its fallback
        profile, which is then to be sent at once."""
        value, unit = command.shown()
        key = "setpoint" if command.mode == SETPOINT else "limit"
        self.command_log.note(key, value, accepted, "Accepted" if accepted else why, unit or "")
        if accepted:
            self.command_in_force = command
            self.command_accepted_mono = time.monotonic()
            self.limit_in_force = command.limit if command.mode == LIMIT else None
            self.operation_mode = command.operation_mode(self.ocpp_version or "")
            self.command_refused = False
            if self.fallback is None and command.mode == LIMIT:
                self.configured_profile_accepted = True
            if self.degraded:
                self.degraded = False
                self.last_failure = ""
            return False
        if refused and command.mode == LIMIT and command.limit is not None \
                and self._fall_back(command.limit, purpose, why):
            return True
        self.last_failure = why
        self.command_refused = True
        self.emit("command_failed", {"limit": value, "unit": unit, "purpose": purpose, "reason": why})
        if not self.degraded:
            self.degraded = True
            self.emit("asset_degraded", {"reason": why})
        return False

    def on_frequency_refused(self, why: str) -> None:
        """The charger refused AFRRSignal or its CentralFrequency profile: CentralSetpoint for the rest of the link."""
        if self.frequency_refused:
            return
        self.frequency_refused = True
        log.warning("%s: CentralFrequency refused (%s): CentralSetpoint for the rest of this connection",
                    self.charger.charge_point_id, why)
        self.emit("charging_profile_fallback", {"from_operation_mode": "CentralFrequency",
                                                "to_operation_mode": "CentralSetpoint", "reason": why})
        self.request_command(front=True)

    def _fall_back(self, limit: ChargeLimit, purpose: str | None, why: str) -> bool:
        """Switch to the fallback profile once, if the configured one may be what the charger refuses."""
        if self.fallback is not None or self.configured_profile_accepted:
            return False
        settings = fallback_settings(self.charger)
        if settings is None:
            return False
        self.command_charger = self.charger.model_copy(update=settings)
        from_purpose = purpose or self.charger.effective_purpose()
        self.fallback = {"from_purpose": from_purpose, "from_unit": limit.unit,
                         "to_purpose": settings.get("profile_purpose", from_purpose),
                         "to_unit": settings["limit_unit"], "reason": why}
        log.warning("%s: %s in %s refused (%s): falling back to %s in %s", self.charger.charge_point_id,
                    from_purpose, limit.unit, why, self.fallback["to_purpose"], self.fallback["to_unit"])
        self.emit("charging_profile_fallback", dict(self.fallback))
        return True

    # -------------------------------------------------------- reading

    def power_kw(self) -> float | None:
        """Measured power, flexedge sign (charging is negative): Export - Import."""
        imported, exported = self.sample.power_w, self.sample.export_power_w
        if imported is not None or exported is not None:
            return ((exported or 0.0) - (imported or 0.0)) / 1000.0 + 0.0
        if self.sample.current_a is not None:
            c = self.charger
            return -self.sample.current_a * c.voltage_v * c.phases / 1000.0
        return None

    def on_device_max_power(self, kw: float, source: str) -> None:
        """The charger stated its EVSE's maximum power (kW): a finite number > 0, else ignored."""
        if isinstance(kw, (int, float)) and math.isfinite(kw) and kw > 0:
            self.device_max_power = DeviceRating(float(kw), source)

    def rated_kw(self) -> float:
        """The charging power the charger can be given: the profile's rating, or the charger's
        own maximum if it states a lower one (the lower figure wins, docs/dispatch.md)."""
        rated_kw = self.charger.rated_kw
        device = self.device_max_power
        return rated_kw if device is None else min(rated_kw, device.power_kw)

    def reading(self) -> AssetReading:
        if self.v2x():
            return self._v2x_reading()
        c = self.charger
        can_charge = self.connected and (self.ev_present or self.transaction_id is not None)
        rated_kw = self.rated_kw()
        p_min = -rated_kw if can_charge else 0.0
        detail = (f"discrete range {{0}} + [{-rated_kw:.2f}, {-c.min_kw:.2f}] kW"
                  if can_charge else ("no EV" if self.connected else "charger not connected"))
        detail += self._detail_notes()
        return AssetReading(
            online=self.connected,
            p_kw=self.power_kw() if self.connected else None,
            soc_pct=self.sample.soc_pct if self.ev_present else None,
            p_min_kw=p_min,
            p_max_kw=0.0,
            p_gap_kw=(-c.min_kw, 0.0) if can_charge else None,
            degraded=self.degraded,
            command_refused=self.connected and self.command_refused,
            detail=detail,
            read_at=self.sample_at or time.time(),
            ev=self.ev_status() if self.ev.needs is not None and can_charge else None,
            upstream=self.upstream_status(),
        )

    def _detail_notes(self) -> str:
        notes = ""
        if self.last_failure:
            notes += f"; last command failed: {self.last_failure}"
        if self.fallback is not None:
            notes += f"; profiles sent as {self.fallback['to_purpose']} in {self.fallback['to_unit']} (fallback)"
        return notes

