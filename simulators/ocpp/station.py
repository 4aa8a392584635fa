"""One simulated charge point (OCPP 1.6J or 2.0.1) with an optional EV plugged in.

The station keeps its own state across websocket links: the link drops, the
station reconnects with capped backoff and jitter, the EV keeps charging at
the last limit (as real chargers do).  Messages that would go out while the
link is down are not queued (real chargers queue transaction messages; this
simulator does not).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import ssl
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import ocpp.messages
from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, WebSocketException

log = logging.getLogger("flexedge.simulators.ocpp")

# Schema validation on the loop rather than in the default thread pool: the
# hand-off to a thread cost more than the validation itself, and 250 stations
# in one process each validate every SetChargingProfile (request and answer).
# Stations still validate everything, so a malformed profile from the gateway
# is refused as a real charger would.  A process-wide switch of the library.
ocpp.messages.ASYNC_VALIDATION = False

CALL_TIMEOUT_S = 5.0


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _check(name: str, value: float, lo: float, hi: float) -> None:
    if not (isinstance(value, (int, float)) and lo <= value <= hi):
        raise ValueError(f"{name} must be {lo:g}..{hi:g}, got {value!r}")


@dataclass
class EvSpec:
    """An electric vehicle: battery, charging power it accepts, the ID tag its driver presents."""

    id_tag: str = "SIMTAG01"
    capacity_kwh: float = 40.0
    soc_pct: float = 30.0
    max_power_kw: float = 11.0
    target_soc_pct: float = 100.0

    def __post_init__(self):
        _check("capacity_kwh", self.capacity_kwh, 0.001, 1000.0)
        _check("soc_pct", self.soc_pct, 0.0, 100.0)
        _check("max_power_kw", self.max_power_kw, 0.0, 1000.0)
        _check("target_soc_pct", self.target_soc_pct, 0.0, 100.0)


@dataclass
class StationSpec:
    """A charge point.  ``port``-independent: the simulator gives it its URL."""

    charge_point_id: str
    ocpp_version: str = "1.6"  # "1.6" or "2.0.1"
    password: str | None = None  # HTTP Basic (user = charge_point_id); None sends no credentials
    max_current_a: float = 32.0
    phases: int = 3
    voltage_v: float = 230.0
    meter_interval_s: float = 1.0
    tick_s: float = 0.1
    accept_profiles: bool = True
    connector_id: int = 1  # 1.6 connector / 2.0.1 connector on EVSE ``evse_id``
    evse_id: int = 1
    reconnect_cap_s: float = 2.0
    # False: the station is booted already (as one that reconnects after a gateway restart)
    # and sends no BootNotification.
    send_boot: bool = True
    # A CALL from the central system before the station's boot is accepted is always recorded
    # (Station.early_requests); then "answer" handles it anyway, "call_error" answers CALLERROR
    # SecurityError (as OCPP 2.0.1 asks of a station not yet accepted), "close" closes the link.
    before_boot: str = "answer"
    # Profiles refused although accept_profiles is True: by purpose, and by charging rate unit.
    reject_purposes: tuple[str, ...] = ()
    reject_units: tuple[str, ...] = ()
    # The EVSE's maximum power stated in the 2.0.1 device model (EVSE Power maxLimit, sent in a
    # NotifyReport on GetReport); the station never charges above it.  None: max_current_a x
    # voltage_v x phases.  Lets a test give a station a rating other than the profile's.
    nameplate_kw: float | None = None

    def __post_init__(self):
        if self.ocpp_version not in ("1.6", "2.0.1"):
            raise ValueError(f"ocpp_version must be '1.6' or '2.0.1', got {self.ocpp_version!r}")
        if self.before_boot not in ("answer", "call_error", "close"):
            raise ValueError(f"before_boot must be 'answer', 'call_error' or 'close', got {self.before_boot!r}")
        self.reject_purposes = tuple(self.reject_purposes)
        self.reject_units = tuple(self.reject_units)
        if self.phases not in (1, 3):
            raise ValueError(f"phases must be 1 or 3, got {self.phases!r}")
        _check("max_current_a", self.max_current_a, 0.0, 1000.0)
        if self.nameplate_kw is not None:
            _check("nameplate_kw", self.nameplate_kw, 0.1, 1000.0)
        _check("voltage_v", self.voltage_v, 100.0, 480.0)
        _check("meter_interval_s", self.meter_interval_s, 0.05, 3600.0)
        _check("tick_s", self.tick_s, 0.01, 10.0)
        _check("reconnect_cap_s", self.reconnect_cap_s, 0.05, 600.0)


@dataclass(frozen=True)
class ProfileRecord:
    """A SetChargingProfile as received."""

    received_at: float  # wall clock, s since epoch
    received_mono: float  # time.monotonic()
    purpose: str
    limit: float
    unit: str  # "W" or "A"
    number_phases: int | None
    stack_level: int
    target_id: int  # 1.6 connector id, 2.0.1 evse id
    transaction_id: str | None
    accepted: bool
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


@dataclass(frozen=True)
class RequestRecord:
    """A CALL from the central system as received."""

    action: str
    received_mono: float  # time.monotonic()
    before_boot: bool  # the station's BootNotification was not accepted yet


class Station:
    def __init__(self, spec: StationSpec, url: str, ssl_context: ssl.SSLContext | None = None):
        self.spec = spec
        self.url = url
        self.ssl_context = ssl_context
        self.accept_profiles = spec.accept_profiles
        self.ev: EvSpec | None = None
        self.authorized = False
        self.transaction_id: str | None = None
        self.energy_wh = 0.0
        self.power_w = 0.0
        self.status = "Available"
        self.profiles: list[ProfileRecord] = []
        self.requests: list[RequestRecord] = []
        self.connected_mono: float | None = None  # time.monotonic() of the last connection
        self.limits: dict[str, tuple[float, str, int | None, str | None]] = {}  # purpose -> limit
        self.connected = asyncio.Event()
        self.connections = 0
        self.connect_errors: list[str] = []
        self._point: Any = None
        self._websocket = None
        self._receiver: asyncio.Task | None = None
        self._booted = not spec.send_boot
        self._boot_call_id: str | None = None
        self._seq_no = 0
        self._profile_arrived = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    # ---------------------------------------------------------- public

    @property
    def max_power_w(self) -> float:
        by_current_w = self.spec.max_current_a * self.spec.voltage_v * self.spec.phases
        nameplate_kw = self.spec.nameplate_kw
        return by_current_w if nameplate_kw is None else min(by_current_w, nameplate_kw * 1000.0)

    def limit_w(self) -> float:
        """The charging power allowed by the profiles installed now."""
        def watts(entry):
            value, unit, phases, _ = entry
            if unit == "W":
                return value
            return value * self.spec.voltage_v * min(phases or self.spec.phases, self.spec.phases)

        tx = self.limits.get("TxProfile")
        if tx is not None and tx[3] != self.transaction_id:
            tx = None
        chosen = tx or self.limits.get("TxDefaultProfile")
        caps = [watts(chosen)] if chosen else []
        for purpose in ("ChargePointMaxProfile", "ChargingStationMaxProfile", "ChargingStationExternalConstraints"):
            if purpose in self.limits:
                caps.append(watts(self.limits[purpose]))
        return min([self.max_power_w] + caps)

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
        """Plug an EV in, present its tag, start a transaction if accepted.  True when charging may start."""
        self.ev = ev or EvSpec()
        self.authorized = False
        await self._set_status("Preparing" if self.spec.ocpp_version == "1.6" else "Occupied")
        accepted = await self._authorize(self.ev.id_tag)
        if not accepted:
            return False
        self.authorized = True
        if self.spec.ocpp_version == "1.6":
            reply = await self._call(call16.StartTransaction(
                connector_id=self.spec.connector_id, id_tag=self.ev.id_tag,
                meter_start=int(self.energy_wh), timestamp=_now_iso()))
            if reply is None or reply.id_tag_info["status"] != "Accepted":
                self.authorized = False
                return False
            self.transaction_id = str(reply.transaction_id)
            await self._set_status("Charging")
        else:
            self.transaction_id = str(uuid.uuid4())
            await self._transaction_event("Started", "Authorized", with_token=True)
        return True

    async def unplug(self) -> None:
        """End the transaction (if any) and free the connector."""
        transaction_id, self.transaction_id = self.transaction_id, None
        self.power_w = 0.0
        if transaction_id is not None:
            if self.spec.ocpp_version == "1.6":
                await self._call(call16.StopTransaction(
                    meter_stop=int(self.energy_wh), timestamp=_now_iso(), transaction_id=int(transaction_id),
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
        reply = await self._call(call201.Authorize(id_token={"id_token": tag, "type": "ISO14443"}))
        return reply is not None and reply.id_token_info["status"] == "Accepted"

    async def _set_status(self, status: str) -> None:
        self.status = status
        await self._send_status()

    async def _send_status(self) -> None:
        if self.spec.ocpp_version == "1.6":
            await self._call(call16.StatusNotification(
                connector_id=self.spec.connector_id, error_code="NoError", status=self.status, timestamp=_now_iso()))
        else:
            await self._call(call201.StatusNotification(
                timestamp=_now_iso(), connector_status=self.status, evse_id=self.spec.evse_id,
                connector_id=self.spec.connector_id))

    def _sampled_values(self) -> list[dict[str, Any]]:
        current_a = self.power_w / (self.spec.voltage_v * self.spec.phases)
        values = [("Power.Active.Import", round(self.power_w, 1), "W"),
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
        request = call201.TransactionEvent(
            event_type=event_type, timestamp=_now_iso(), trigger_reason=trigger, seq_no=self._seq_no,
            transaction_info=info, evse={"id": self.spec.evse_id, "connector_id": self.spec.connector_id},
            meter_value=[{"timestamp": _now_iso(), "sampled_value": self._sampled_values()}],
            id_token={"id_token": self.ev.id_tag, "type": "ISO14443"} if with_token and self.ev else None)
        await self._call(request)

    async def _send_meter_values(self) -> None:
        if self.transaction_id is None:
            return
        if self.spec.ocpp_version == "1.6":
            await self._call(call16.MeterValues(
                connector_id=self.spec.connector_id, transaction_id=int(self.transaction_id),
                meter_value=[{"timestamp": _now_iso(), "sampled_value": self._sampled_values()}]))
        else:
            await self._transaction_event("Updated", "MeterValuePeriodic")

    def receive_profile(self, purpose: str, target_id: int, profile: dict[str, Any], schedule: dict[str, Any]) -> bool:
        period = schedule["charging_schedule_period"][0]
        transaction_id = profile.get("transaction_id")
        record = ProfileRecord(
            received_at=time.time(), received_mono=time.monotonic(), purpose=purpose,
            limit=float(period["limit"]), unit=schedule["charging_rate_unit"],
            number_phases=period.get("number_phases"), stack_level=int(profile["stack_level"]),
            target_id=target_id, transaction_id=str(transaction_id) if transaction_id is not None else None,
            accepted=(self.accept_profiles and purpose not in self.spec.reject_purposes
                      and schedule["charging_rate_unit"] not in self.spec.reject_units),
            raw=profile)
        self.profiles.append(record)
        self._profile_arrived.set()
        log.info("%s: profile %s %g %s -> %s", self.spec.charge_point_id, purpose, record.limit, record.unit,
                 "accepted" if record.accepted else "rejected")
        if record.accepted:
            self.limits[purpose] = (record.limit, record.unit, record.number_phases, record.transaction_id)
        return record.accepted

    def _spawn(self, coroutine) -> None:
        # Handlers run inside the receive loop: a CALL awaited there would never see its answer.
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----------------------------------------------------------- loops

    def _physics(self, dt_s: float) -> None:
        ev = self.ev
        if ev is None or self.transaction_id is None or ev.soc_pct >= ev.target_soc_pct:
            self.power_w = 0.0
            return
        self.power_w = max(0.0, min(self.limit_w(), ev.max_power_kw * 1000.0))
        self.energy_wh += self.power_w * dt_s / 3600.0
        ev.soc_pct = min(100.0, ev.soc_pct + self.power_w * dt_s / 3600.0 / 1000.0 / ev.capacity_kwh * 100.0)

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

    def _headers(self) -> dict[str, str]:
        if self.spec.password is None:
            return {}
        token = base64.b64encode(f"{self.spec.charge_point_id}:{self.spec.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    async def run(self) -> None:
        """Connect, boot, serve; reconnect with capped backoff and jitter.  Runs until cancelled."""
        meter = asyncio.create_task(self._meter_loop())
        subprotocol = "ocpp1.6" if self.spec.ocpp_version == "1.6" else "ocpp2.0.1"
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
        point_class = _Point16 if self.spec.ocpp_version == "1.6" else _Point201
        point = point_class(self.spec.charge_point_id, websocket, self)
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
            # The answer is recognised by its id in the receive loop (_StrictCalls).
            self._boot_call_id = str(uuid.uuid4())
            if self.spec.ocpp_version == "1.6":
                reply = await self._call(
                    call16.BootNotification(charge_point_model="SimAC", charge_point_vendor="flexedge"),
                    unique_id=self._boot_call_id)
            else:
                reply = await self._call(call201.BootNotification(
                    charging_station={"model": "SimAC", "vendor_name": "flexedge"}, reason="PowerUp"),
                    unique_id=self._boot_call_id)
            self._booted = reply is not None and reply.status == "Accepted"
        await self._send_status()


class _StrictCalls:
    """Records every CALL from the central system; before the boot is accepted, applies ``before_boot``.

    The boot counts as accepted when its answer is read, in the receive loop: a request
    the central system sends right behind the answer must count as after the boot, even
    if the task awaiting the answer has not run yet.
    """

    station: "Station"

    async def route_message(self, raw_msg):
        station = self.station
        try:
            message = json.loads(raw_msg)
        except ValueError:
            message = None
        if isinstance(message, list) and len(message) >= 3:
            if (message[0] == 3 and message[1] == station._boot_call_id and isinstance(message[2], dict)
                    and message[2].get("status") == "Accepted"):
                station._booted = True
            elif message[0] == 2 and len(message) >= 4:
                early = not station._booted
                station.requests.append(RequestRecord(str(message[2]), time.monotonic(), early))
                if early:
                    log.warning("%s: %s received before the boot was accepted",
                                station.spec.charge_point_id, message[2])
                if early and station.spec.before_boot == "call_error":
                    await self._send(json.dumps([4, message[1], "SecurityError",
                                                 "BootNotification not accepted yet", {}]))
                    return
                if early and station.spec.before_boot == "close":
                    await self._connection.close(1008, "request before BootNotification accepted")
                    return
        await super().route_message(raw_msg)


class _Point16(_StrictCalls, ChargePoint16):
    def __init__(self, cp_id, connection, station: Station):
        super().__init__(cp_id, connection, response_timeout=CALL_TIMEOUT_S, logger=log)
        self.station = station

    @on("SetChargingProfile")
    def on_set_charging_profile(self, connector_id: int, cs_charging_profiles: dict):
        accepted = self.station.receive_profile(cs_charging_profiles["charging_profile_purpose"], connector_id,
                                                cs_charging_profiles, cs_charging_profiles["charging_schedule"])
        return result16.SetChargingProfile(status="Accepted" if accepted else "Rejected")

    @on("TriggerMessage")
    def on_trigger(self, requested_message: str, **extra):
        if requested_message == "StatusNotification":
            self.station._spawn(self.station._send_status())
            return result16.TriggerMessage(status="Accepted")
        return result16.TriggerMessage(status="NotImplemented")


class _Point201(_StrictCalls, ChargePoint201):
    def __init__(self, cp_id, connection, station: Station):
        super().__init__(cp_id, connection, response_timeout=CALL_TIMEOUT_S, logger=log)
        self.station = station

    @on("SetChargingProfile")
    def on_set_charging_profile(self, evse_id: int, charging_profile: dict, **extra):
        accepted = self.station.receive_profile(charging_profile["charging_profile_purpose"], evse_id,
                                                charging_profile, charging_profile["charging_schedule"][0])
        return result201.SetChargingProfile(status="Accepted" if accepted else "Rejected")

    @on("TriggerMessage")
    def on_trigger(self, requested_message: str, **extra):
        if requested_message == "StatusNotification":
            self.station._spawn(self.station._send_status())
            return result201.TriggerMessage(status="Accepted")
        return result201.TriggerMessage(status="NotImplemented")

    @on("GetReport")
    def on_get_report(self, request_id: int, **extra):
        """Only the EVSE Power variable is modelled: a report that asks for it gets it, in a NotifyReport."""
        evse_id = self.station.spec.evse_id
        wanted = extra.get("component_variable")
        if wanted is not None and not any(
                (item.get("component") or {}).get("name") == "EVSE"
                and (item.get("component", {}).get("evse") or {}).get("id", evse_id) == evse_id
                and (item.get("variable") or {}).get("name", "Power") == "Power" for item in wanted):
            return result201.GetReport(status="EmptyResultSet")
        self.station._spawn(self._notify_power(request_id))
        return result201.GetReport(status="Accepted")

    async def _notify_power(self, request_id: int) -> None:
        station = self.station
        await station._call(call201.NotifyReport(request_id=request_id, generated_at=_now_iso(), seq_no=0, report_data=[{
            "component": {"name": "EVSE", "evse": {"id": station.spec.evse_id}},
            "variable": {"name": "Power"},
            "variable_attribute": [{"type": "Actual", "value": str(round(station.power_w, 1)), "mutability": "ReadOnly"}],
            "variable_characteristics": {"unit": "W", "data_type": "decimal", "max_limit": station.max_power_w,
                                         "supports_monitoring": False},
        }]))
