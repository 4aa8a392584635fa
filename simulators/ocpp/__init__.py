"""Simulated OCPP charge points (1.6J, 2.0.1 and 2.1) with EVs, for tests and benchmarks.

Many stations per process, each its own websocket client of a central system,
with an EV that arrives (``plug_in``) and leaves (``unplug``), charges (or, 2.1
bidirectional, discharges) as its charging profiles say, and reports MeterValues
(power, energy registers, current, SoC) every ``meter_interval_s``.  Every
SetChargingProfile received is recorded (``station.profiles``) and installed whole:
multi-period schedules run on the station's own clock, also while the link is down.

Quick start (on the caller's event loop)::

    from simulators.ocpp import EvSpec, OcppSimulator, StationSpec

    specs = [StationSpec("CP1", ocpp_version="2.1", bidirectional=True, password="secret")]
    async with OcppSimulator("ws://127.0.0.1:9000/ocpp", specs) as sim:
        cp = sim.stations[0]
        await cp.wait_connected(timeout_s=3)
        await cp.plug_in(EvSpec(id_tag="04A1B2C3", max_power_kw=11, bidirectional=True, min_soc_pct=30))
        record = await cp.next_profile(timeout_s=2)   # a ProfileRecord
        print(record.purpose, record.operation_mode, record.setpoint, cp.power_w, cp.active_period())
        await cp.unplug()

CLI: ``python -m simulators.ocpp --help``, e.g.
``python -m simulators.ocpp --url ws://127.0.0.1:9000/ocpp --count 10 --version 1.6 --ev`` or
``... --version 2.1 --bidirectional --afrr-signal --ev --ev-min-soc-pct 30 --departure-in-s 14400``.

API
---
``OcppSimulator(base_url, specs, *, ca_file=None, cert_file=None, key_file=None, ssl_context=None)``
    Async context manager; starts one task per station (station URL =
    ``base_url/<charge_point_id>``).  ``wss://`` URLs use TLS, verified against
    ``ca_file`` (security profile 2); ``cert_file``/``key_file`` add a client
    certificate (profile 3).  ``stations`` (list), ``station(cp_id)``.
``StationSpec(charge_point_id, ocpp_version="1.6", password=None, max_current_a=32,
phases=3, voltage_v=230, meter_interval_s=1.0, tick_s=0.1, accept_profiles=True,
connector_id=1, evse_id=1, reconnect_cap_s=2.0, nameplate_kw=None, bidirectional=False,
max_discharge_kw=None, afrr_signal=False, clock_offset_s=0.0)``; invalid values raise
ValueError naming the field.  ``ocpp_version`` "1.6", "2.0.1" or "2.1" (subprotocol
``ocpp2.1``, the ocpp library's ``v21`` messages).  ``nameplate_kw`` caps the station's
charging power and is what a 2.x station reports as its EVSE Power maxLimit (a NotifyReport
in answer to GetReport); default max_current_a x voltage_v x phases.  2.1 only:
``bidirectional`` (the charger can discharge, up to ``max_discharge_kw``, default its
charging rating), ``afrr_signal`` (it follows AFRRSignal under CentralFrequency).
``clock_offset_s``: the station's clock runs that far ahead (its schedules see it, not its
message timestamps); ``station.clock_offset_s`` moves it later.
Strict chargers: ``send_boot=False`` makes a station that is booted already (it sends no
BootNotification, as after a gateway restart); ``before_boot`` is what a station does with
a CALL that arrives before its BootNotification is accepted, which it always records:
``"answer"`` (default, handle it anyway), ``"call_error"`` (CALLERROR SecurityError) or
``"close"`` (close the link).  ``reject_purposes`` / ``reject_units`` (tuples, e.g.
``("ChargingStationExternalConstraints",)``, ``("W",)``) refuse such profiles.
``EvSpec(id_tag="SIMTAG01", capacity_kwh=40, soc_pct=30, max_power_kw=11, target_soc_pct=100,
bidirectional=False, min_soc_pct=20, max_soc_pct=100, max_discharge_kw=None (= max_power_kw),
min_charge_kw=0, min_discharge_kw=0, departure_s=None, send_charging_needs=None)``.
``min_soc_pct`` is the car's V2X floor, announced, not enforced by the station (the gateway
must); the car runs at 0 or between its minimum and maximum powers.  ``send_charging_needs``
None: NotifyEVChargingNeeds on 2.1, not on 2.0.1 (True asks for it there too).
``Station``: ``plug_in(ev) -> bool`` (Authorize, then StartTransaction (1.6) or
TransactionEvent Started (2.x) then, if the EV sends them, its charging needs; False when
the tag is refused), ``unplug()``, ``send_charging_needs() -> status | None`` (again, from
``station.ev`` as it is now), ``drop_link()`` (abort the TCP connection; the station
reconnects with backoff), ``next_profile(timeout_s, after=None) -> ProfileRecord``,
``wait_connected(timeout_s)``, ``active_period() -> ActivePeriod`` (``purpose``,
``profile_id``, ``period_index`` (None: no profile governs), ``operation_mode``,
``power_w``), ``clock()`` (the station's epoch s; replaceable by any callable).
Attributes: ``accept_profiles`` (False: answer Rejected), ``profiles``, ``stack`` (the
installed profiles, ``stack.profiles``), ``limits`` (per purpose, the period in force),
``limit_w()``, ``power_w`` (+ charging the EV, - discharging), ``operation_mode``,
``energy_wh`` / ``energy_export_wh`` (meter registers), ``energy_charged_wh`` /
``energy_discharged_wh`` / ``min_soc_seen_pct`` (this session), ``charging_needs_answers``
(statuses, None for no answer), ``afrr_signals`` (``AfrrSignalRecord``: ``signal``,
``timestamp``, ``received_at``, ``received_mono``), ``status``, ``transaction_id``,
``connected`` (asyncio.Event), ``connections`` (count), ``connected_mono`` (monotonic
time of the last connection), ``connect_errors`` (e.g. "HTTP 401"), ``requests`` (every
CALL received, a ``RequestRecord``: ``action``, ``received_mono``, ``before_boot``) and
``early_requests`` (those received before the boot was accepted).
``ProfileRecord``: ``received_at``, ``received_mono``, ``purpose``, ``limit``, ``unit``,
``number_phases``, ``stack_level``, ``target_id`` (1.6 connector / 2.x EVSE),
``transaction_id``, ``accepted``, ``raw``, ``charging_profile_id``, ``operation_mode`` (2.1),
``setpoint``, ``discharge_limit`` (of the period in force on receipt, else period 0; in
the schedule's unit), ``periods`` (the raw periods), ``reason`` (the refusal's reasonCode).

Profiles (``simulators.ocpp.schedule``): same id replaces, same purpose + stack level +
target replaces; Absolute (from startSchedule), Relative (from the transaction start) and
Recurring, validFrom/validTo and ``duration`` honoured.  Each tick the TxProfile (else
TxDefaultProfile) with the highest stack level in force chooses the operation and the max /
external-constraints profiles cap it.  2.1 operation modes: ChargingOnly, CentralSetpoint,
Idle, CentralFrequency (``afrr_signal`` stations: v2xBaseline + v2xSignalWattCurve at the
last AFRRSignal); others are refused with reasonCode UnsupportedParam, a setpoint outside
its period's [dischargeLimit, limit] with InvalidValue, a discharge asked of a station or
EV that cannot with NoDischarge.  ClearChargingProfile (1.6, 2.x) by id or criteria:
Accepted, or Unknown when nothing matched.  TxProfiles end with their transaction.

A station sends BootNotification once per run (not after a reconnection), a
StatusNotification after each connection and when asked by TriggerMessage.  2.x stations
answer GetVariables, GetReport and GetBaseReport (``simulators.ocpp.device_model``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

from simulators.ocpp.station import (ActivePeriod, AfrrSignalRecord, EvSpec, ProfileRecord, RequestRecord, Station,
                                     StationSpec)

__all__ = ["ActivePeriod", "AfrrSignalRecord", "EvSpec", "OcppSimulator", "ProfileRecord", "RequestRecord", "Station",
           "StationSpec", "client_ssl_context"]

log = logging.getLogger("simulators.ocpp")


def client_ssl_context(ca_file: str | Path | None, cert_file: str | Path | None = None,
                       key_file: str | Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    if cert_file:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return context


class OcppSimulator:
    def __init__(self, base_url: str, specs: list[StationSpec], *, ca_file=None, cert_file=None, key_file=None,
                 ssl_context: ssl.SSLContext | None = None):
        if not base_url.startswith(("ws://", "wss://")):
            raise ValueError(f"base_url must start with ws:// or wss://, got {base_url!r}")
        ids = [s.charge_point_id for s in specs]
        if len(set(ids)) != len(ids):
            raise ValueError("charge_point_id values must be unique")
        if ssl_context is None and base_url.startswith("wss://"):
            ssl_context = client_ssl_context(ca_file, cert_file, key_file)
        base = base_url.rstrip("/")
        self.stations = [Station(spec, f"{base}/{spec.charge_point_id}", ssl_context) for spec in specs]
        self._tasks: list[asyncio.Task] = []

    def station(self, charge_point_id: str) -> Station:
        for station in self.stations:
            if station.spec.charge_point_id == charge_point_id:
                return station
        raise KeyError(charge_point_id)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(s.run(), name=f"ocpp-sim-{s.spec.charge_point_id}") for s in self.stations]

    async def stop(self, timeout_s: float = 5.0) -> None:
        # Cancel again while a task lingers: on Python 3.11 a cancellation that
        # arrives together with a result (websockets and ocpp use wait_for) can
        # be swallowed, and a plain gather would then wait forever.
        pending = set(self._tasks)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while pending:
            for task in pending:
                task.cancel()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                log.warning("%d station task(s) did not stop within %.1f s", len(pending), timeout_s)
                break
            _, pending = await asyncio.wait(pending, timeout=min(0.5, remaining))
        self._tasks = []

    async def __aenter__(self) -> "OcppSimulator":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
