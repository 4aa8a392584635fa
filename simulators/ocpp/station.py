"""One simulated charge point (OCPP 1.6J, 2.0.1 or 2.1) with an optional EV plugged in.

The station keeps its own state across websocket links: the link drops, the
station reconnects with capped backoff and jitter, and the EV keeps following the
installed charging profiles on the station's own clock (as real chargers do: that is
what a multi-period profile is for).  Messages that would go out while the link is
down are not queued (real chargers queue transaction messages; this simulator does not).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import ssl
import time
import uuid
from typing import Any

import ocpp.messages
from ocpp.v16 import call as call16
from ocpp.v201 import call as call201
from ocpp.v21 import call as call21
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, WebSocketException

from simulators.ocpp.needs import charging_needs
from simulators.ocpp.points import CALL_TIMEOUT_S, Point16, Point21, Point201, now_iso
from simulators.ocpp.schedule import (MODES, Capability, ProfileRefused, ProfileStack, check_v2x, decide,
                                      parse_profile, watts)
from simulators.ocpp.specs import (ActivePeriod, AfrrSignalRecord, EvSpec, ProfileRecord, RequestRecord,
                                   StationSpec)

__all__ = ["ActivePeriod", "AfrrSignalRecord", "EvSpec", "ProfileRecord", "RequestRecord", "Station", "StationSpec"]

log = logging.getLogger("flexedge.simulators.ocpp")

# Schema validation on the loop rather than in the default thread pool: the
# hand-off to a thread cost more than the validation itself, and 250 stations
# in one process each validate every SetChargingProfile (request and answer).
# Stations still validate everything, so a malformed profile from the gateway
# is refused as a real charger would.  A process-wide switch of the library.
ocpp.messages.ASYNC_VALIDATION = False

_SUBPROTOCOL = {"1.6": "ocpp1.6", "2.0.1": "ocpp2.0.1", "2.1": "ocpp2.1"}
_POINT = {"1.6": Point16, "2.0.1": Point201, "2.1": Point21}


class Station:
    def __init__(self, spec: StationSpec, url: str, ssl_context: ssl.SSLContext | None = None):
        self.spec = spec
        self.url = url
        self.ssl_context = ssl_context
        self.accept_profiles = spec.accept_profiles
        self.ev: EvSpec | None = None
        self.authorized = False
        self.transaction_id: str | None = None
        self.transaction_start_s: float | None = None  # station clock
        self.energy_wh = 0.0  # import register (all sessions)
        self.energy_export_wh = 0.0  # export register (all sessions)
        self.energy_charged_wh = 0.0  # this session
        self.energy_discharged_wh = 0.0  # this session
        self.min_soc_seen_pct: float | None = None  # this session
        self.power_w = 0.0  # + charging the EV, - discharging it
        self.operation_mode = "ChargingOnly"
        self.status = "Available"
        self.profiles: list[ProfileRecord] = []
        self.requests: list[RequestRecord] = []
        self.afrr_signals: list[AfrrSignalRecord] = []
        self.charging_needs_answers: list[str | None] = []  # NotifyEVChargingNeeds status (None: no answer)
        self.stack = ProfileStack()
        self.clock_offset_s = spec.clock_offset_s
        self.clock = self._clock  # a test may put any callable returning epoch s here
        self.connected_mono: float | None = None  # time.monotonic() of the last connection
        self.connected = asyncio.Event()
        self.connections = 0
        self.connect_errors: list[str] = []
        self._calls = call21 if spec.ocpp_version == "2.1" else call201
        self._point: Any = None
        self._websocket = None
        self._receiver: asyncio.Task | None = None
        self._booted = not spec.send_boot
        self._boot_call_id: str | None = None
        self._seq_no = 0
        self._profile_arrived = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    # ---------------------------------------------------------- public

    def _clock(self) -> float:
        return time.time() + self.clock_offset_s

    @property
    def max_power_w(self) -> float:
        return self.spec.charge_rating_w

    @property
    def operation_modes(self) -> tuple[str, ...]:
        """The 2.1 operation modes this station runs (its V2XChargingCtrlr.SupportedOperationModes)."""
        return tuple(m for m in MODES if m != "CentralFrequency" or self.spec.afrr_signal)

    @property
    def limits(self) -> dict[str, tuple[float | None, str, int | None, str | None]]:
        """Per purpose, the (limit, unit, number_phases, transaction_id) of the period in force now."""
        now_s, found = self.clock(), {}
        for profile in sorted(self.stack.profiles, key=lambda p: p.stack_level):
            index = profile.period_at(now_s, self.transaction_start_s)
            if index is not None:
                period = profile.periods[index]
                found[profile.purpose] = (period.limit, profile.unit, period.number_phases, profile.transaction_id)
        return found

    def limit_w(self) -> float:
        """The charging power allowed by the profiles in force now (W)."""
        chosen, caps = self.stack.in_force(self.clock(), self.transaction_id, self.transaction_start_s)
        cap = self._capability(self.max_power_w, 0.0)
        high = self.max_power_w
        for profile, index in ([chosen] if chosen else []) + caps:
            period = profile.periods[index]
            if period.limit is not None:
                high = min(high, watts(period.limit, profile.unit, period.number_phases, cap))
        return high

    def active_period(self) -> ActivePeriod:
        """What governs the station now, on its clock, and the power that gives with the EV plugged in."""
        chosen, _ = self.stack.in_force(self.clock(), self.transaction_id, self.transaction_start_s)
        mode, power_w = self._decide()
        if chosen is None:
            return ActivePeriod(None, None, None, mode, power_w)
        profile, index = chosen
        return ActivePeriod(profile.purpose, profile.profile_id, index, mode, power_w)

    async def next_profile(self, timeout_s: float = 2.0, after: int | None = None) -> ProfileRecord:
        """The first profile received after the ``after``-th one (default: after those already received)."""
        start = len(self.profiles) if after is None else after
        async def wait():
            while len(self.profiles) <= start:
                self._profile_arrived.clear()
                await self._profile_arrived.wait()
            return self.profiles[start]
        return await asyncio.wait_for(wait(), timeout_s)

    @property
    def early_requests(self) -> list[RequestRecord]:
        """CALLs received before the station's boot was accepted (a strict charger's complaint)."""
        return [r for r in self.requests if r.before_boot]

    async def wait_connected(self, timeout_s: float = 3.0) -> None:
        await asyncio.wait_for(self.connected.wait(), timeout_s)

    async def plug_in(self, ev: EvSpec | None = None) -> bool:
        """Plug an EV in, present its tag, start a transaction if accepted, state the EV's charging needs
        (2.x, when it sends them).  True when charging may start."""
        self.ev = ev or EvSpec()
        self.authorized = False
        self.energy_charged_wh = self.energy_discharged_wh = 0.0
        self.min_soc_seen_pct = self.ev.soc_pct
        await self._set_status("Preparing" if self.spec.ocpp_version == "1.6" else "Occupied")
        accepted = await self._authorize(self.ev.id_tag)
        if not accepted:
            return False
        self.authorized = True
        if self.spec.ocpp_version == "1.6":
            reply = await self._call(call16.StartTransaction(
                connector_id=self.spec.connector_id, id_tag=self.ev.id_tag,
                meter_start=int(self.energy_wh), timestamp=now_iso()))
            if reply is None or reply.id_tag_info["status"] != "Accepted":
                self.authorized = False
                return False
            self.transaction_start_s = self.clock()
            self.transaction_id = str(reply.transaction_id)
            await self._set_status("Charging")
        else:
            self.transaction_start_s = self.clock()
            self.transaction_id = str(uuid.uuid4())
            await self._transaction_event("Started", "Authorized", with_token=True)
            wants = self.ev.send_charging_needs
            if wants or (wants is None and self.spec.ocpp_version == "2.1"):
                await self.send_charging_needs()
        return True

    async def send_charging_needs(self) -> str | None:
        """NotifyEVChargingNeeds from the EV as it is now (2.x, EV plugged in); the answer's status,
        also appended to ``charging_needs_answers`` (None: no answer, or nothing to send)."""
        if self.ev is None or self.spec.ocpp_version == "1.6":
            return None
        reply = await self._call(self._calls.NotifyEVChargingNeeds(
            evse_id=self.spec.evse_id, charging_needs=charging_needs(self.ev, self.spec)))
        status = None if reply is None else reply.status
        self.charging_needs_answers.append(status)
        return status

    async def unplug(self) -> None:
        """End the transaction (if any) and free the connector."""
        transaction_id, self.transaction_id = self.transaction_id, None
        self.transaction_start_s = None
        self.power_w = 0.0
        self.stack.end_transaction()
        if transaction_id is not None:
            if self.spec.ocpp_version == "1.6":
                await self._call(call16.StopTransaction(
                    meter_stop=int(self.energy_wh), timestamp=now_iso(), transaction_id=int(transaction_id),
                    reason="EVDisconnected", id_tag=self.ev.id_tag if self.ev else None))
            else:
                await self._transaction_event("Ended", "EVCommunicationLost", transaction_id=transaction_id,
                                              stopped_reason="EVDisconnected")
        self.ev = None
        self.authorized = False
        await self._set_status("Available")

    async def drop_link(self) -> None:
        """Close the websocket abruptly (no close handshake); the station reconnects."""
        if self._websocket is not None:
            self._websocket.transport.abort()

    # ------------------------------------------------ profiles, signals

    def receive_profile(self, profile: dict[str, Any], schedule: dict[str, Any],
                        target_id: int) -> tuple[bool, tuple[str, str] | None]:
        """Install a SetChargingProfile if this charger can run it: (accepted, (reasonCode, text) if not)."""
        version = self.spec.ocpp_version
        purpose, unit = profile["charging_profile_purpose"], schedule["charging_rate_unit"]
        reason: tuple[str, str] | None = None
        installed = None
        try:
            installed = parse_profile(profile, schedule, target_id, version, self.clock())
            if version == "2.1":
                ev = self.ev
                check_v2x(installed, can_discharge=self.spec.bidirectional and (ev is None or ev.bidirectional),
                          afrr_signal=self.spec.afrr_signal)
        except ProfileRefused as refused:
            reason = (refused.reason_code, refused.info)
        except (KeyError, TypeError, ValueError) as error:
            reason = ("InvalidValue", f"cannot read the profile: {error!r}"[:1024])
        if reason is None and not self.accept_profiles:
            reason = ("Rejected", "the station refuses every profile (accept_profiles False)")
        elif reason is None and purpose in self.spec.reject_purposes:
            reason = ("UnsupportedParam", f"chargingProfilePurpose {purpose} is not supported here")
        elif reason is None and unit in self.spec.reject_units:
            reason = ("UnsupportedRateUnit", f"chargingRateUnit {unit} is not supported here")
        accepted = reason is None
        raw_periods = schedule.get("charging_schedule_period") or [{}]
        index = 0
        if installed is not None:
            index = installed.period_at(self.clock(), self.transaction_start_s) or 0
        period = raw_periods[min(index, len(raw_periods) - 1)]
        transaction_id = profile.get("transaction_id")
        mode = period.get("operation_mode", "ChargingOnly") if version == "2.1" else None
        record = ProfileRecord(
            received_at=time.time(), received_mono=time.monotonic(), purpose=purpose,
            limit=_float(period.get("limit")), unit=unit, number_phases=period.get("number_phases"),
            stack_level=int(profile["stack_level"]), target_id=target_id,
            transaction_id=str(transaction_id) if transaction_id is not None else None, accepted=accepted,
            raw=profile, charging_profile_id=profile.get("id", profile.get("charging_profile_id")),
            operation_mode=mode, setpoint=_float(period.get("setpoint")),
            discharge_limit=_float(period.get("discharge_limit")), periods=tuple(raw_periods),
            reason=None if reason is None else reason[0])
        self.profiles.append(record)
        self._profile_arrived.set()
        shown = f"limit {record.limit} {unit}"
        if mode is not None:
            shown = f"{mode} setpoint {record.setpoint} {shown} dischargeLimit {record.discharge_limit}"
        log.info("%s: profile %s id %s: %s (%d period(s)) -> %s", self.spec.charge_point_id, purpose,
                 record.charging_profile_id, shown, len(raw_periods),
                 "accepted" if accepted else f"rejected ({reason[0]}): {reason[1]}")
        if accepted:
            self.stack.install(installed)
        return accepted, reason

    def clear_profiles(self, profile_id: int | None, purpose: str | None, stack_level: int | None,
                       target_id: int | None) -> int:
        """ClearChargingProfile: remove the profiles matching every criterion given; how many went."""
        removed = self.stack.clear(profile_id, purpose, stack_level, target_id)
        log.info("%s: ClearChargingProfile id=%s purpose=%s stack=%s target=%s: %d removed", self.spec.charge_point_id,
                 profile_id, purpose, stack_level, target_id, removed)
        return removed

    def receive_afrr_signal(self, signal: int, timestamp: str) -> bool:
        if not self.spec.afrr_signal:
            return False
        self.afrr_signals.append(AfrrSignalRecord(int(signal), timestamp, time.time(), time.monotonic()))
        return True

    # ----------------------------------------------------------- physics

    def _capability(self, charge_max_w: float, discharge_max_w: float) -> Capability:
        ev = self.ev
        return Capability(charge_max_w, discharge_max_w, ev.min_charge_kw * 1000.0 if ev else 0.0,
                          ev.min_discharge_kw * 1000.0 if ev else 0.0, self.spec.voltage_v, self.spec.phases)

    def _decide(self) -> tuple[str, float]:
        """(operation mode, power W) the profiles in force give now, with the EV as it is."""
        chosen, caps = self.stack.in_force(self.clock(), self.transaction_id, self.transaction_start_s)
        mode = "ChargingOnly"
        if chosen is not None:
            mode = chosen[0].periods[chosen[1]].operation_mode or mode
        ev = self.ev
        if ev is None or self.transaction_id is None:
            return mode, 0.0
        # Charging only fills to the car's target; under a V2X mode the car accepts up to its maximum.
        ceiling = min(ev.target_soc_pct, ev.max_soc_pct) if mode == "ChargingOnly" else ev.max_soc_pct
        charge_max_w = 0.0 if ev.soc_pct >= ceiling else min(self.max_power_w, ev.max_power_kw * 1000.0)
        discharge_max_w = 0.0
        if self.spec.bidirectional and ev.bidirectional and ev.soc_pct > 0:
            discharge_max_w = min(self.spec.max_discharge_kw, ev.max_discharge_kw) * 1000.0
        signal = self.afrr_signals[-1].signal if self.afrr_signals else 0
        return decide(chosen, caps, self._capability(charge_max_w, discharge_max_w), signal)

    def _physics(self, dt_s: float) -> None:
        self.operation_mode, self.power_w = self._decide()
        ev = self.ev
        if ev is None or self.power_w == 0.0:
            return
        energy_wh = self.power_w * dt_s / 3600.0
        if energy_wh > 0:
            self.energy_wh += energy_wh
            self.energy_charged_wh += energy_wh
        else:
            self.energy_export_wh -= energy_wh
            self.energy_discharged_wh -= energy_wh
        ev.soc_pct = min(100.0, max(0.0, ev.soc_pct + energy_wh / 1000.0 / ev.capacity_kwh * 100.0))
        if self.min_soc_seen_pct is None or ev.soc_pct < self.min_soc_seen_pct:
            self.min_soc_seen_pct = ev.soc_pct

    async def _meter_loop(self) -> None:
        last = time.monotonic()
        next_meter = last + self.spec.meter_interval_s
        while True:
            await asyncio.sleep(self.spec.tick_s)
            now = time.monotonic()
            self._physics(now - last)
            last = now
            if now >= next_meter:
                next_meter = now + self.spec.meter_interval_s
                if self.connected.is_set():
                    self._spawn(self._send_meter_values())

    # -------------------------------------------------------- messages

    async def _call(self, request, timeout_s: float = CALL_TIMEOUT_S, unique_id: str | None = None):
        point, receiver = self._point, self._receiver
        if point is None or receiver is None or not self.connected.is_set():
            return None
        call = asyncio.ensure_future(point.call(request, suppress=False, unique_id=unique_id))
        call.add_done_callback(lambda task: task.cancelled() or task.exception())  # consumed even if abandoned
        # A dead link ends the receiver: give up on the answer at once rather than at the timeout.
        done, _ = await asyncio.wait({call, receiver}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if call not in done:
            call.cancel()
            log.warning("%s: %s: no answer (link %s)", self.spec.charge_point_id, type(request).__name__,
                        "lost" if receiver.done() else "timeout")
            return None
        try:
            return call.result()
        except Exception as error:  # CALLERROR or link trouble: the run loop reconnects if needed
            log.warning("%s: %s failed: %r", self.spec.charge_point_id, type(request).__name__, error)
            return None

    async def _authorize(self, tag: str) -> bool:
        if self.spec.ocpp_version == "1.6":
            reply = await self._call(call16.Authorize(id_tag=tag))
            return reply is not None and reply.id_tag_info["status"] == "Accepted"
        reply = await self._call(self._calls.Authorize(id_token={"id_token": tag, "type": "ISO14443"}))
        return reply is not None and reply.id_token_info["status"] == "Accepted"

    async def _set_status(self, status: str) -> None:
        self.status = status
        await self._send_status()

    async def _send_status(self) -> None:
        if self.spec.ocpp_version == "1.6":
            await self._call(call16.StatusNotification(
                connector_id=self.spec.connector_id, error_code="NoError", status=self.status, timestamp=now_iso()))
        else:
            await self._call(self._calls.StatusNotification(
                timestamp=now_iso(), connector_status=self.status, evse_id=self.spec.evse_id,
                connector_id=self.spec.connector_id))

    def _sampled_values(self) -> list[dict[str, Any]]:
        import_w = max(0.0, self.power_w)
        current_a = import_w / (self.spec.voltage_v * self.spec.phases)
        if self.spec.bidirectional:  # both directions, each positive in its own measurand
            values = [("Power.Active.Import", round(import_w, 1), "W"),
                      ("Power.Active.Export", round(max(0.0, -self.power_w), 1), "W"),
                      ("Energy.Active.Import.Register", round(self.energy_wh, 1), "Wh"),
                      ("Energy.Active.Export.Register", round(self.energy_export_wh, 1), "Wh"),
                      ("Current.Import", round(current_a, 2), "A")]
        else:
            values = [("Power.Active.Import", round(import_w, 1), "W"),
                      ("Energy.Active.Import.Register", round(self.energy_wh, 1), "Wh"),
                      ("Current.Import", round(current_a, 2), "A")]
        if self.ev is not None:
            values.append(("SoC", round(self.ev.soc_pct, 1), "Percent"))
        if self.spec.ocpp_version == "1.6":
            return [{"value": str(v), "measurand": m, "unit": u, "context": "Sample.Periodic"} for m, v, u in values]
        return [{"value": v, "measurand": m, "unit_of_measure": {"unit": u}, "context": "Sample.Periodic"}
                for m, v, u in values]

    async def _transaction_event(self, event_type: str, trigger: str, *, transaction_id: str | None = None,
                                 with_token: bool = False, stopped_reason: str | None = None) -> None:
        self._seq_no += 1
        info = {"transaction_id": transaction_id or self.transaction_id,
                "charging_state": "Charging" if event_type != "Ended" else "Idle"}
        if stopped_reason:
            info["stopped_reason"] = stopped_reason
        request = self._calls.TransactionEvent(
            event_type=event_type, timestamp=now_iso(), trigger_reason=trigger, seq_no=self._seq_no,
            transaction_info=info, evse={"id": self.spec.evse_id, "connector_id": self.spec.connector_id},
            meter_value=[{"timestamp": now_iso(), "sampled_value": self._sampled_values()}],
            id_token={"id_token": self.ev.id_tag, "type": "ISO14443"} if with_token and self.ev else None)
        await self._call(request)

    async def _send_meter_values(self) -> None:
        if self.transaction_id is None:
            return
        if self.spec.ocpp_version == "1.6":
            await self._call(call16.MeterValues(
                connector_id=self.spec.connector_id, transaction_id=int(self.transaction_id),
                meter_value=[{"timestamp": now_iso(), "sampled_value": self._sampled_values()}]))
        else:
            await self._transaction_event("Updated", "MeterValuePeriodic")

    def _spawn(self, coroutine) -> None:
        # Handlers run inside the receive loop: a CALL awaited there would never see its answer.
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ link

    def _headers(self) -> dict[str, str]:
        if self.spec.password is None:
            return {}
        token = base64.b64encode(f"{self.spec.charge_point_id}:{self.spec.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    async def run(self) -> None:
        """Connect, boot, serve; reconnect with capped backoff and jitter.  Runs until cancelled."""
        meter = asyncio.create_task(self._meter_loop())
        subprotocol = _SUBPROTOCOL[self.spec.ocpp_version]
        attempt = 0
        try:
            while True:
                try:
                    async with connect(self.url, subprotocols=[subprotocol], additional_headers=self._headers(),
                                       ssl=self.ssl_context, open_timeout=5, close_timeout=1,
                                       ping_interval=20, compression=None) as websocket:
                        attempt = 0
                        await self._serve(websocket)
                except InvalidStatus as error:
                    self.connect_errors.append(f"HTTP {error.response.status_code}")
                except (OSError, asyncio.TimeoutError, WebSocketException, ssl.SSLError) as error:
                    self.connect_errors.append(f"{type(error).__name__}: {error}")
                finally:
                    self.connected.clear()
                    self._point = None
                    self._websocket = None
                ceiling = min(self.spec.reconnect_cap_s, 0.1 * 2 ** min(attempt, 20))
                attempt += 1
                await asyncio.sleep(ceiling / 2 + random.random() * ceiling / 2)
        finally:
            meter.cancel()
            for task in list(self._tasks):
                task.cancel()

    async def _serve(self, websocket) -> None:
        point = _POINT[self.spec.ocpp_version](self.spec.charge_point_id, websocket, self)
        receiver = asyncio.create_task(point.start())
        self._point, self._websocket, self._receiver = point, websocket, receiver
        self.connected.set()
        self.connected_mono = time.monotonic()
        self.connections += 1
        greeting = asyncio.create_task(self._greet())
        try:
            await receiver
        except WebSocketException:
            pass
        finally:
            greeting.cancel()
            self._receiver = None

    async def _greet(self) -> None:
        if not self._booted:
            # The answer is recognised by its id in the receive loop (points._StrictCalls).
            self._boot_call_id = str(uuid.uuid4())
            if self.spec.ocpp_version == "1.6":
                reply = await self._call(
                    call16.BootNotification(charge_point_model="SimAC", charge_point_vendor="flexedge"),
                    unique_id=self._boot_call_id)
            else:
                reply = await self._call(self._calls.BootNotification(
                    charging_station={"model": "SimAC", "vendor_name": "flexedge"}, reason="PowerUp"),
                    unique_id=self._boot_call_id)
            self._booted = reply is not None and reply.status == "Accepted"
        await self._send_status()


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
