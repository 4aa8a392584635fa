"""The grid operator's orders survive a restart (issue #10, item 5).

On the wire: the real daemon (`flexedge run`, a subprocess), SunSpec inverter
simulators, Mosquitto, the VPP simulator and the DEIE simulator.  The operator
caps the site, the daemon is killed -9, the operator is gone; the restarted
daemon's first command to the inverters respects the cap.  Around it, the
store (edge/control/order_store.py) and DeieLink.restore on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import c104
import pytest
import yaml

from conftest import free_port, until, wait_port
from edge.runtime.daemon import Gateway
from drivers.deie.link import DeieLink
from drivers.deie.config import DeieConfig
from edge.gridorders import NO_ORDERS, SOURCE_PERSISTED, GridOrders
from edge.uplink.messages import Telemetry
from edge.control.order_store import (
    FORMAT_VERSION, OrderStore, OrderStoreError, StoredOrders, load_orders, orders_path, save_orders,
)
from edge.config.profile import Profile
from simulators.deie import Confirmation, DeieOperator
from simulators.sunspec import DeviceSpec, SunSpecSimulator
from simulators.vpp import VppSimulator

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[1]
SITE = "restart-site"
LIMIT_KW = 6.0  # the operator's order: two 10 kW inverters in 8 kW of sun, 16 kW unlimited
DEFAULT_LIMIT_KW = 12.0  # the profile's link-loss default: looser than the order


def site_profile(tmp_path: Path, broker_port: int, deie_port: int, devices=(), **deie) -> dict:
    assets = [{"id": f"pv{i}", "kind": "pv", "driver": "sunspec", "host": "127.0.0.1", "port": d.port,
               "unit_id": d.unit_id, "timeout_s": 0.3, "revert_timeout_s": 2} for i, d in enumerate(devices)]
    deie_cfg = {"host": "127.0.0.1", "port": deie_port, "installed_kw": 20.0, "on_link_loss": "default_limit",
                "default_limit_kw": DEFAULT_LIMIT_KW, "link_loss_timeout_s": 2.0, **deie}
    return {
        "site": {"id": SITE},
        "control": {"cycle_s": 0.5},
        "uplink": {"mqtt": {"host": "127.0.0.1", "port": broker_port},
                   "spool": {"path": str(tmp_path / "spool.sqlite"), "max_mb": 16}},
        "grid": {"deie": deie_cfg},
        "assets": assets,
    }


def start_daemon(profile_path: Path, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log_file:
        return subprocess.Popen([sys.executable, "-m", "edge.cli", "run", str(profile_path)],
                                cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)


def stored(path: Path) -> GridOrders | None:
    result = load_orders(path)
    return None if result is None else result.orders


@contextlib.asynccontextmanager
async def operator_at(port: int, attempts: int = 3):
    """The DEIE simulator connected; c104 2.2.1 now and then drops a fresh connection
    (docs/deie.md), and a daemon that is just starting can be slow to answer: try again."""
    for attempt in range(1, attempts + 1):
        operator = DeieOperator("127.0.0.1", port, command_timeout_s=2.0)
        try:
            await operator.__aenter__()
            break
        except ConnectionError:
            if attempt == attempts:
                raise
    try:
        yield operator
    finally:
        await operator.close()


def first_request(device, after_s: float) -> list:
    """The write records of the first Modbus write the device handled at or after ``after_s``."""
    records = [r for r in device.writes if r.t_s >= after_s]
    return [r for r in records if r.t_s == records[0].t_s] if records else []


# ------------------------------------------------------------------ on the wire


async def test_kill_9_under_a_limit_the_first_command_after_restart_respects_it(tmp_path, mosquitto):
    specs = [DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=8.0), DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=8.0)]
    async with SunSpecSimulator(specs) as sim:
        deie_port = free_port()
        document = site_profile(tmp_path, mosquitto.port, deie_port, sim.devices)
        Profile.model_validate(document)  # a bad profile fails here, not in the subprocess
        profile_path = tmp_path / "site.yaml"
        profile_path.write_text(yaml.safe_dump(document))
        store_path = orders_path(tmp_path / "spool.sqlite")
        log_path = tmp_path / "daemon.log"
        site_kw = lambda: sum(d.power_kw for d in sim.devices)  # noqa: E731
        daemons: list[subprocess.Popen] = []
        try:
            # 1. The operator caps the site at 6 kW; the inverters get it; the order is on disk.
            daemons.append(start_daemon(profile_path, log_path))
            await asyncio.to_thread(wait_port, deie_port, 20.0)
            async with operator_at(deie_port) as operator:
                await until(lambda: all(d.requests for d in sim.devices), 10, "the inverters polled")
                assert await operator.send_limit_kw(LIMIT_KW) is Confirmation.POSITIVE
                await until(lambda: site_kw() <= LIMIT_KW + 0.1, 5, "site capped by the order")
                await until(lambda: stored(store_path) == GridOrders(export_limit_kw=LIMIT_KW, source="deie"),
                            2, "the order saved beside the spool")
                # 2. kill -9 under the limit; then the operator is gone: nobody can send it again.
                daemons[0].send_signal(signal.SIGKILL)
                await asyncio.to_thread(daemons[0].wait, 5)
            # The inverters' revert timers (2 s) run out: the site exports all it can, as after a crash.
            await until(lambda: site_kw() > 15.0, 8, "inverters reverted to full power")

            # 3. Restart: the first command written to each inverter respects the limit.
            async with VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
                restarted_at = time.monotonic()
                daemons.append(start_daemon(profile_path, log_path))
                for device in sim.devices:
                    await device.next_write(after_s=restarted_at, timeout_s=15)
                allowed_kw = 0.0
                for device in sim.devices:
                    request = {r.point: r.value for r in first_request(device, restarted_at)}
                    assert request.get("WMaxLimPctEna", 1) == 1, f"first write releases the limit: {request}"
                    assert "WMaxLimPct" in request, f"first write is not a power limit: {request}"
                    allowed_kw += request["WMaxLimPct"] / 100.0 * device.rated_kw
                assert allowed_kw <= LIMIT_KW + 0.05, f"first commands allow {allowed_kw:.2f} kW"
                await until(lambda: site_kw() <= LIMIT_KW + 0.1, 5, "site capped again")

                # Telemetry and an event say that a persisted order is in force.
                message = await until(lambda: vpp.telemetry and vpp.telemetry[-1], 10, "telemetry")
                assert message["grid_orders"]["source"] == SOURCE_PERSISTED
                assert message["grid_orders"]["export_limit_kw"] == LIMIT_KW
                Telemetry.model_validate(message)
                restored = await until(lambda: [e for e in vpp.events if e["type"] == "grid_order_restored"],
                                       5, "grid_order_restored event")
                detail = restored[0]["detail"]
                assert detail["export_limit_kw"] == LIMIT_KW and detail["source"] == "deie"
                assert detail["given_at"].endswith("Z") and detail["path"] == str(store_path)
                # The link-loss default (12 kW, 2 s without a link) is looser: the persisted order stays.
                loss = await until(lambda: [e for e in vpp.events if e["type"] == "deie_link_loss"],
                                   6, "link-loss event")
                assert loss[0]["detail"]["kept"] == SOURCE_PERSISTED
                assert vpp.telemetry[-1]["grid_orders"]["source"] == SOURCE_PERSISTED
                assert vpp.telemetry[-1]["grid_orders"]["export_limit_kw"] == LIMIT_KW

                # 4. The operator comes back: general interrogation shows the order; a lift replaces it.
                async with operator_at(deie_port) as operator:
                    await operator.wait_measurement("p_limit_in_force", lambda v: v == LIMIT_KW)
                    await operator.wait_measurement("p_limit_received", lambda v: v is True)
                    assert await operator.send_limit(None) is Confirmation.POSITIVE
                    await until(lambda: stored(store_path) == NO_ORDERS.with_(source="deie"), 3,
                                "the file says no order")
                    await until(lambda: vpp.telemetry[-1]["grid_orders"]["source"] == "deie"
                                and vpp.telemetry[-1]["grid_orders"]["export_limit_kw"] is None, 3, "lift in telemetry")
            daemons[1].send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(daemons[1].wait, 15) == 0
        except BaseException:
            print(log_path.read_text(errors="replace")[-6000:] if log_path.exists() else "no daemon log")
            raise
        finally:
            for daemon in daemons:
                if daemon.poll() is None:
                    daemon.kill()
                    daemon.wait(5)


# ------------------------------------------------------------------ start-up with a bad file


class RecordingGateway(Gateway):
    def __init__(self, *args, **kwargs):
        self.events: list[tuple[str, dict]] = []
        super().__init__(*args, **kwargs)

    def emit_event(self, event_type, asset_id, detail):
        self.events.append((event_type, detail))
        super().emit_event(event_type, asset_id, detail)


VALID = {"version": FORMAT_VERSION, "orders": {"export_limit_kw": 6.0, "disconnected": False,
                                               "reactive_setpoint_kvar": None, "tan_phi": None},
         "source": "deie", "given_at_s": 1.7e9}


def _partial(path: Path) -> None:
    text = json.dumps(VALID)
    path.write_text(text[: len(text) // 2])  # what a non-atomic write cut by a crash would leave


@pytest.mark.parametrize("damage, cause", [
    (_partial, "not valid JSON"),
    (lambda path: path.write_bytes(b"\x00\xff\xfe garbage"), "not valid JSON"),
    (lambda path: path.write_text(json.dumps({**VALID, "version": 99})), "format version 99"),
    (lambda path: path.write_text(json.dumps({**VALID, "orders": {**VALID["orders"], "export_limit_kw": -3}})),
     "must be >= 0"),
    (lambda path: path.mkdir(), "cannot read it"),
], ids=["partial", "garbage", "other-version", "negative-limit", "unreadable"])
async def test_a_bad_orders_file_is_reported_and_start_up_goes_on(tmp_path, mosquitto, caplog, damage, cause):
    document = site_profile(tmp_path, mosquitto.port, free_port())
    store_path = orders_path(tmp_path / "spool.sqlite")
    damage(store_path)
    gateway = RecordingGateway(Profile.model_validate(document))
    stop = asyncio.Event()
    with caplog.at_level(logging.ERROR, logger="flexedge"):
        task = asyncio.create_task(gateway.run(stop))
        try:
            failed = await until(lambda: [d for k, d in gateway.events if k == "grid_order_restore_failed"],
                                 5, "grid_order_restore_failed")
            assert failed[0]["path"] == str(store_path) and cause in failed[0]["error"]
            assert str(store_path) in failed[0]["error"]
            # Unknown orders: the link-loss default at once, not after link_loss_timeout_s.
            assert gateway.controller.grid_orders == GridOrders(export_limit_kw=DEFAULT_LIMIT_KW,
                                                                source="link_loss_default")
            assert any(k == "deie_link_loss" for k, _ in gateway.events)
            assert not task.done()
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(str(store_path) in line and cause in line for line in logged), logged


# ------------------------------------------------------------------ the store


async def test_store_saves_atomically_newest_wins_and_says_when_no_order(tmp_path):
    path = orders_path(tmp_path / "spool.sqlite")
    assert path == tmp_path / "spool.grid-orders.json"
    events = []
    store = OrderStore(path, lambda kind, asset, detail: events.append(kind), clock_s=lambda: 1_700_000_000.0)
    assert await store.load() is None  # first start: no file, no error
    for limit_kw in (30.0, 20.0, 10.0):  # a burst: the last one reaches the disk
        store.put(GridOrders(export_limit_kw=limit_kw, source="deie"))
    store.put(GridOrders(export_limit_kw=10.0, disconnected=True, source="deie:unapplied"))
    await store.flush(timeout_s=2.0)
    assert store.saved and not events
    assert load_orders(path) == StoredOrders(GridOrders(export_limit_kw=10.0, disconnected=True, source="deie"),
                                             1_700_000_000.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left

    store.put(NO_ORDERS.with_(source="deie"))
    await store.flush(timeout_s=2.0)
    cleared = load_orders(path)
    assert cleared is not None and not cleared.in_force


async def test_a_failed_save_is_reported(tmp_path):
    path = tmp_path / "missing-folder" / "spool.grid-orders.json"
    events = []
    store = OrderStore(path, lambda kind, asset, detail: events.append((kind, detail)))
    store.put(GridOrders(export_limit_kw=5.0, source="deie"))
    await until(lambda: events, 2, "grid_order_persist_failed")
    assert events[0][0] == "grid_order_persist_failed" and str(path) in events[0][1]["error"]
    assert not store.saved
    await store.flush(timeout_s=2.0)  # returns at once: the error is reported already
    store._writer.cancel()  # it would retry in RETRY_S
    await asyncio.gather(store._writer, return_exceptions=True)
    with pytest.raises(OrderStoreError, match="cannot write"):
        save_orders(path, StoredOrders(NO_ORDERS, 0.0))


# ------------------------------------------------------------------ DeieLink.restore


@contextlib.asynccontextmanager
async def restored_link(orders: GridOrders, link_loss_default: bool = False, **overrides):
    cfg = DeieConfig(**{"host": "127.0.0.1", "port": free_port(), "installed_kw": 20.0, **overrides})
    applied: list[GridOrders] = []
    events: list[tuple[str, dict]] = []
    link = DeieLink(cfg, applied.append, lambda kind, asset, detail: events.append((kind, detail)))
    link.backoff_initial_s, link.backoff_max_s = 0.05, 0.2
    link.restore(orders, link_loss_default=link_loss_default)
    assert applied == [orders]  # in force before run(): before any driver could be commanded
    task = asyncio.create_task(link.run())
    try:
        yield link, cfg, applied, events
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("persisted_kw, expected_kw, expected_source", [
    (LIMIT_KW, LIMIT_KW, SOURCE_PERSISTED),  # stricter than the default: kept
    (15.0, DEFAULT_LIMIT_KW, "link_loss_default"),  # looser: the default wins
])
async def test_link_loss_default_and_persisted_limit_the_stricter_wins(persisted_kw, expected_kw, expected_source):
    orders = GridOrders(export_limit_kw=persisted_kw, disconnected=True, source=SOURCE_PERSISTED)
    async with restored_link(orders, on_link_loss="default_limit", default_limit_kw=DEFAULT_LIMIT_KW,
                             link_loss_timeout_s=0.2) as (link, cfg, applied, events):
        await until(lambda: any(k == "deie_link_loss" for k, _ in events), 3, "link loss")
        assert link.orders.export_limit_kw == expected_kw and link.orders.source == expected_source
        assert link.orders.disconnected  # a disconnection is lifted only by a reconnection order


async def test_restored_orders_show_at_interrogation_and_the_next_order_replaces_them():
    orders = GridOrders(export_limit_kw=LIMIT_KW, tan_phi=-0.2, source=SOURCE_PERSISTED)
    async with restored_link(orders) as (link, cfg, applied, events):
        await until(lambda: link.serving, 3, "server listening")
        async with DeieOperator(port=cfg.port, points=cfg.point_map(), command_timeout_s=1.0) as operator:
            await operator.wait_measurement("p_limit_in_force", lambda v: v == LIMIT_KW)
            await operator.wait_measurement("p_limit_applied", lambda v: v is True)
            await operator.wait_measurement("q_order_received", lambda v: v is True)
            await operator.wait_measurement("link_loss_default", lambda v: v is False)
            assert await operator.send_limit_kw(8.0) is Confirmation.POSITIVE
            await until(lambda: link.orders.source == "deie", 2, "the operator's order")
            assert link.orders == GridOrders(export_limit_kw=8.0, tan_phi=-0.2, source="deie")


async def test_client_role_interrogation_tells_the_truth_after_restart():
    """The operator lifted everything while the gateway was down: the DEIE's GI replaces the persisted orders."""
    port = free_port()
    deie = c104.Server(ip="127.0.0.1", port=port, tick_rate_ms=50)
    station = deie.add_station(common_address=1)
    limit_end = station.add_point(io_address=5002, type=c104.Type.M_SP_NA_1)
    limit_end.value = True  # end of limitation
    coupling = station.add_point(io_address=5005, type=c104.Type.M_DP_NA_1)
    coupling.value = c104.Double.OFF  # reconnection allowed
    await asyncio.to_thread(deie.start)
    try:
        orders = GridOrders(export_limit_kw=LIMIT_KW, disconnected=True, source=SOURCE_PERSISTED)
        async with restored_link(orders, role="client", port=port, command_timeout_s=0.5) as (link, *_):
            await until(lambda: link.orders == GridOrders(source="deie"), 5, "GI replacing the persisted orders")
    finally:
        await asyncio.to_thread(deie.stop)
