"""What the central system knows about one charger, rebuilt from its messages.

A ``ChargerSession`` lives as long as the central system, across websocket
connections: the link comes and goes, the asset stays.  Handlers of both OCPP
versions feed it (``on_status``, ``on_transaction_started`` ...); it turns
them into the asset's ``AssetReading`` and upstream events.  After a gateway
restart nothing is known until the charger speaks again: status comes from a
StatusNotification (the central system asks for one with TriggerMessage on
every connection) and a running transaction from the MeterValues or
TransactionEvent that mention it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from typing import Any, Callable

from edge.asset import AssetReading, EventSink

from drivers.ocpp.config import OcppCharger
from drivers.ocpp.limits import ChargeLimit
from drivers.ocpp.meter import MeterSample
from drivers.ocpp.pacing import LoopPacer

# 1.6 ChargePointStatus and 2.0.1 ConnectorStatus values meaning a vehicle is plugged in.
EV_PRESENT = {"Preparing", "Charging", "SuspendedEV", "SuspendedEVSE", "Finishing", "Occupied"}
EV_ABSENT = {"Available", "Unavailable", "Faulted", "Reserved"}


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


class ChargerSession:
    def __init__(self, charger: OcppCharger, emit_event: EventSink, hash_tag: Callable[[str | None], str | None]):
        self.charger = charger
        self.emit_event = emit_event
        self.hash_tag = hash_tag
        self.connected = False
        self.ocpp_version: str | None = None
        self.boot: dict[str, Any] = {}
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
        # Set when it is this charger's turn to (re)consider its command; the central system's
        # pacer hands turns out a few per loop iteration (drivers.ocpp.pacing).  Without a
        # pacer (a session on its own), a request sets it at once.
        self.command_wakeup = asyncio.Event()
        self.pacer: LoopPacer | None = None

    def emit(self, event_type: str, detail: dict[str, Any]) -> None:
        self.emit_event(event_type, self.charger.id, {"charge_point_id": self.charger.charge_point_id, **detail})

    # ----------------------------------------------------------- link

    def on_connected(self, ocpp_version: str, remote: str) -> None:
        self.connected = True
        self.ocpp_version = ocpp_version
        self.limit_in_force = None  # unknown after (re)connection: send again
        self.request_command()
        self.emit("asset_online", {"ocpp_version": ocpp_version, "remote": remote})

    def on_disconnected(self, reason: str) -> None:
        if not self.connected:
            return
        self.connected = False
        self.emit("asset_offline", {"reason": reason})

    def on_boot(self, info: dict[str, Any]) -> None:
        self.boot = info

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
            self.sample.current_a = 0.0
            self.sample.soc_pct = None

    def on_transaction_started(self, transaction_id: str, id_tag: str | None, meter_start_wh: float | None) -> None:
        if transaction_id == self.transaction_id:
            if id_tag and self.tag_hash is None:
                self.tag_hash = self.hash_tag(id_tag)
            return
        self.transaction_id = transaction_id
        self.tag_hash = self.hash_tag(id_tag)
        self.meter_start_wh = meter_start_wh
        self.limit_in_force = None  # a TxProfile belongs to one transaction: send the limit again
        self._set_ev_present(True)
        self.request_command()  # a TxProfile can only be sent now
        self.emit("session_started", {"transaction_id": transaction_id, "id_tag_hash": self.tag_hash,
                                       "meter_start_wh": meter_start_wh})

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
        self.transaction_id = None
        self.tag_hash = None
        self.meter_start_wh = None
        self.sample.power_w = 0.0
        self.sample.current_a = 0.0

    def on_meter(self, sample: MeterSample) -> None:
        for name in ("power_w", "energy_wh", "current_a", "soc_pct"):
            value = getattr(sample, name)
            if value is not None:
                setattr(self.sample, name, value)
        if self.transaction_id is not None and self.meter_start_wh is None and sample.energy_wh is not None:
            self.meter_start_wh = sample.energy_wh  # 2.0.1 has no meterStart: first register of the transaction
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

    def on_command_result(self, limit: ChargeLimit, accepted: bool, why: str) -> None:
        if accepted:
            self.limit_in_force = limit
            if self.degraded:
                self.degraded = False
                self.last_failure = ""
            return
        self.last_failure = why
        self.emit("command_failed", {"limit": limit.value, "unit": limit.unit, "reason": why})
        if not self.degraded:
            self.degraded = True
            self.emit("asset_degraded", {"reason": why})

    # -------------------------------------------------------- reading

    def power_kw(self) -> float | None:
        """Measured power, flexedge sign (charging is negative)."""
        if self.sample.power_w is not None:
            return -self.sample.power_w / 1000.0
        if self.sample.current_a is not None:
            c = self.charger
            return -self.sample.current_a * c.voltage_v * c.phases / 1000.0
        return None

    def reading(self) -> AssetReading:
        c = self.charger
        can_charge = self.connected and (self.ev_present or self.transaction_id is not None)
        p_min = -c.rated_kw if can_charge else 0.0
        detail = (f"discrete range {{0}} + [{-c.rated_kw:.2f}, {-c.min_kw:.2f}] kW"
                  if can_charge else ("no EV" if self.connected else "charger not connected"))
        if self.last_failure:
            detail += f"; last command failed: {self.last_failure}"
        return AssetReading(
            online=self.connected,
            p_kw=self.power_kw() if self.connected else None,
            soc_pct=self.sample.soc_pct if self.ev_present else None,
            p_min_kw=p_min,
            p_max_kw=0.0,
            p_gap_kw=(-c.min_kw, 0.0) if can_charge else None,
            degraded=self.degraded,
            detail=detail,
            read_at=self.sample_at or time.time(),
        )
