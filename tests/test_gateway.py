"""The whole gateway on the wire: simulators, a real Mosquitto, the VPP simulator.

Each test starts SunSpec simulators, the gateway (in-process, or as a real
`flexedge run` process where crashes matter), and talks MQTT to it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import yaml

from edge.runtime.daemon import Gateway
from edge.uplink.messages import Event, Telemetry
from edge.config.profile import Profile
from edge.uplink.spool import Spool
from simulators.sunspec import DeviceSpec, SunSpecSimulator
from simulators.vpp import VppSimulator

SITE = "test-site"


def make_profile(tmp_path: Path, broker_port: int, devices, cycle_s: float = 0.5, grid: dict | None = None,
                 **control) -> Profile:
    assets = []
    for index, device in enumerate(devices):
        kind = {"pv": "pv", "storage": "bess", "hybrid": "bess", "meter": "meter"}[device.kind]
        asset = {"id": f"{device.kind}{index}", "kind": kind, "driver": "sunspec", "host": "127.0.0.1",
                 "port": device.port, "unit_id": device.unit_id, "timeout_s": 0.3}
        if kind == "meter":
            asset["connection_point"] = True
        assets.append(asset)
    return Profile.model_validate({
        "site": {"id": SITE},
        "control": {"cycle_s": cycle_s, **control},
        "uplink": {"mqtt": {"host": "127.0.0.1", "port": broker_port},
                   "spool": {"path": str(tmp_path / "spool.sqlite"), "max_mb": 16}},
        "grid": grid or {},
        "assets": assets,
    })


@asynccontextmanager
async def running_gateway(profile: Profile):
    stop = asyncio.Event()
    gateway = Gateway(profile)
    task = asyncio.create_task(gateway.run(stop))
    try:
        yield gateway
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def until(predicate, timeout_s: float, what: str, interval_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def online(vpp: VppSimulator, count: int):
    return lambda: vpp.telemetry and sum(a["online"] for a in vpp.telemetry[-1]["assets"].values()) == count


async def test_setpoint_reaches_the_inverter_register_within_one_cycle(tmp_path, mosquitto):
    specs = [DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=8.0), DeviceSpec(kind="storage", rated_kw=5.0)]
    async with SunSpecSimulator(specs) as sim:
        pv, bess = sim.devices
        profile = make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=1.0)
        async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(online(vpp, 2), 10, "both assets online")
            sent_at = time.monotonic()
            sent = await vpp.send_setpoint(-6.5, valid_s=30)
            ack = await vpp.wait_ack(sent["id"], timeout_s=2)
            assert ack["status"] == "accepted", ack
            # pro rata by band: PV 8 kW down, battery 5 kW down (charge) -> 6.5 * 8/13 and 6.5 * 5/13
            pv_write = await pv.next_write("WMaxLimPct", model_id=704, after_s=sent_at, timeout_s=1.0)
            bess_write = await bess.next_write("WSet", model_id=704, after_s=sent_at, timeout_s=1.0)
            assert pv_write.t_s - sent_at < profile.control.cycle_s
            assert bess_write.t_s - sent_at < profile.control.cycle_s
            assert pv_write.value == pytest.approx((8.0 - 4.0) / 10.0 * 100, abs=0.02)  # percent of rating
            assert bess_write.value == pytest.approx(-2500.0, abs=1.0)  # W, charging
            # the simulator applied it, and the VPP sees it in telemetry
            message = await until(
                lambda: vpp.telemetry and abs(vpp.telemetry[-1]["site"]["p_kw"] - (8.0 - 6.5)) < 0.05 and vpp.telemetry[-1],
                5, "site power to follow")
            assert message["mode"] == "setpoint" and message["setpoint_id"] == sent["id"]
            assert message["site"]["activation_kw"] == pytest.approx(-6.5, abs=0.01)
            Telemetry.model_validate(message)
            for event in vpp.events:
                Event.model_validate(event)


async def test_rejected_setpoints_never_reach_a_device(tmp_path, mosquitto):
    async with SunSpecSimulator([DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=8.0)]) as sim:
        pv = sim.devices[0]
        profile = make_profile(tmp_path, mosquitto.port, sim.devices)
        async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(online(vpp, 1), 10, "asset online")
            writes_before = len(pv.writes)
            now = time.time()
            bad = [
                b"not json",
                json.dumps({"id": "nan", "ts": now, "valid_s": 10, "activation_kw": float("nan")}).encode(),
                json.dumps({"id": "future", "ts": now + 120, "valid_s": 10, "activation_kw": -1}).encode(),
                json.dumps({"id": "expired", "ts": now - 30, "valid_s": 10, "activation_kw": -1}).encode(),
                json.dumps({"id": "beyond", "ts": now, "valid_s": 10, "activation_kw": -50}).encode(),
                json.dumps({"id": "upward-pv", "ts": now, "valid_s": 10, "activation_kw": 3}).encode(),
                json.dumps({"id": "type", "ts": now, "valid_s": 10, "activation_kw": "3"}).encode(),
            ]
            for raw in bad:
                await vpp.send_raw(raw)
            await until(lambda: vpp.acks_rejected == len(bad), 5, "all rejections acked")
            reasons = {a["id"]: a["reason"] for a in vpp.acks}
            assert "in the future" in reasons["future"] and "expired" in reasons["expired"]
            assert "downward band" in reasons["beyond"] and "upward band" in reasons["upward-pv"]
            assert "finite" in reasons["nan"] and "must be a number" in reasons["type"]
            assert reasons[None].startswith("not valid JSON")
            # a replay of an accepted setpoint is rejected too
            good = await vpp.send_setpoint(-1.0, valid_s=30)
            await vpp.wait_ack(good["id"])
            await vpp.send_raw(json.dumps(good).encode())
            await until(lambda: vpp.acks_rejected == len(bad) + 1, 5, "replay rejected")
            assert "replay" in vpp.acks[-1]["reason"]
            # only the good setpoint's value ever reached the device (refreshed every cycle)
            limit_writes = [w for w in pv.writes[writes_before:] if w.point == "WMaxLimPct"]
            assert limit_writes and {round(w.value, 1) for w in limit_writes} == {70.0}
            await until(lambda: sum(e["type"] == "setpoint_rejected" for e in vpp.events) == len(bad) + 1, 5, "events")


async def test_fallback_ramps_to_zero_and_releases_the_devices(tmp_path, mosquitto):
    async with SunSpecSimulator([DeviceSpec(kind="storage", rated_kw=10.0)]) as sim:
        bess = sim.devices[0]
        profile = make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=0.5, setpoint_timeout_s=1.5,
                               fallback={"ramp_kw_per_s": 4.0})
        async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(online(vpp, 1), 10, "asset online")
            sent = await vpp.send_setpoint(6.0, valid_s=60)
            await vpp.wait_ack(sent["id"])
            await until(lambda: bess.setpoint_kw == pytest.approx(6.0), 2, "6 kW commanded")
            fallback = await until(lambda: next((e for e in vpp.events if e["type"] == "fallback"), None), 5, "fallback event")
            assert fallback["detail"]["reason"] == "timeout"
            released = await bess.next_write("WSetEna", model_id=704, where=lambda r: r.raw == 0, timeout_s=5)
            # 6 kW at 4 kW/s: about 1.5 s of ramp, through intermediate values
            ramp = [w.value for w in bess.writes if w.point == "WSet" and w.t_s <= released.t_s]
            assert any(100.0 < value < 5900.0 for value in ramp), ramp
            await until(lambda: vpp.telemetry[-1]["mode"] == "idle", 3, "idle after the ramp")
            assert "fallback" in [t["mode"] for t in vpp.telemetry]


async def test_silent_inverter_goes_offline_and_others_keep_their_cadence(tmp_path, mosquitto):
    specs = [DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=5.0) for _ in range(3)]
    async with SunSpecSimulator(specs) as sim:
        profile = make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=0.5)
        async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(online(vpp, 3), 10, "assets online")
            silenced_at = time.monotonic()
            sim.devices[0].set_silent(True)
            requests_before = [d.requests for d in sim.devices]
            event = await until(lambda: next((e for e in vpp.events if e["type"] == "asset_offline"), None), 3, "offline event")
            assert event["asset_id"] == "pv0"
            assert time.monotonic() - silenced_at < 2 * profile.control.cycle_s + 0.5
            count = len(vpp.telemetry)
            await vpp.wait_telemetry(count + 6, timeout_s=5)
            recent = list(vpp.telemetry)[count:]
            stamps = [time.mktime(time.strptime(t["ts"][:19], "%Y-%m-%dT%H:%M:%S")) + float(t["ts"][19:-1] or 0) for t in recent]
            gaps = [b - a for a, b in zip(stamps, stamps[1:])]
            assert max(gaps) < profile.control.cycle_s * 1.5, gaps
            assert all(not t["assets"]["pv0"]["online"] and t["assets"]["pv1"]["online"] for t in recent[1:])
            assert sim.devices[1].requests > requests_before[1] and sim.devices[2].requests > requests_before[2]
            assert max(t["gateway"]["cycle_lateness_ms_last"] for t in recent) < 100
            sim.devices[0].set_silent(False)
            await until(lambda: any(e["type"] == "asset_online" and e["asset_id"] == "pv0" and e["ts"] > event["ts"]
                                    for e in vpp.events), 15, "back online")


async def test_export_limit_holds_with_the_connection_point_meter(tmp_path, mosquitto):
    specs = [DeviceSpec(kind="pv", rated_kw=20.0, sun_kw=18.0), DeviceSpec(kind="meter", load_kw=3.0)]
    async with SunSpecSimulator(specs) as sim:
        pv, meter = sim.devices
        profile = make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=0.5, grid={"export_limit_kw": 10.0})
        async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            # no setpoint at all: the limit alone curtails the PV to 10 + 3 kW of load
            await until(lambda: abs(meter.power_kw - 10.0) < 0.1, 10, "site export at the limit")
            assert pv.power_kw == pytest.approx(13.0, abs=0.1)
            event = await until(lambda: next((e for e in vpp.events if e["type"] == "grid_limit"), None), 5, "event")
            assert event["detail"]["limit"] == "export_limit" and event["detail"]["state"] == "reached"
            message = await until(lambda: vpp.telemetry and vpp.telemetry[-1]["site"]["metered"]
                                  and abs(vpp.telemetry[-1]["site"]["p_kw"] - 10.0) < 0.1 and vpp.telemetry[-1], 5, "metered")
            assert message["site"]["limited_by"] == "export_limit"
            assert message["assets"]["pv0"]["setpoint_kw"] == pytest.approx(13.0, abs=0.1)
            # the load grows: the limit still holds
            meter.set_load(8.0)
            await until(lambda: abs(pv.power_kw - 18.0) < 0.1, 5, "PV back to its sun")
            assert meter.power_kw <= 10.0 + 0.1


def _read_notify(sock: socket.socket, until_s: float) -> list[str]:
    messages = []
    deadline = time.monotonic() + until_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            messages.append(sock.recv(4096).decode())
        except (socket.timeout, BlockingIOError):
            break
    return messages


def _write_profile(tmp_path: Path, profile: Profile) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(profile.model_dump(mode="json", exclude_none=True)))
    return path


async def test_flexedge_run_notifies_systemd_and_pings_the_watchdog_per_cycle(tmp_path, mosquitto):
    async with SunSpecSimulator([DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=5.0)]) as sim:
        path = _write_profile(tmp_path, make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=0.2))
        sock_path = tmp_path / "notify.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(sock_path))
            env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="2000000")
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "edge.cli", "run", str(path), env=env,
                                                        stderr=asyncio.subprocess.PIPE)
            try:
                messages = await asyncio.to_thread(_read_notify, sock, 4.0)
            finally:
                proc.send_signal(signal.SIGTERM)
                _, stderr = await asyncio.wait_for(proc.communicate(), 10)
            assert proc.returncode == 0, stderr.decode()[-2000:]
        assert messages[0].startswith("READY=1")
        assert messages.count("WATCHDOG=1") >= 10  # 0.2 s cycles for about 4 s


async def test_kill_9_loses_no_spooled_telemetry(tmp_path, mosquitto):
    """The broker is away while the daemon runs; the daemon is killed -9; after a restart everything arrives."""
    async with SunSpecSimulator([DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=5.0)]) as sim:
        path = _write_profile(tmp_path, make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=0.2))
        mosquitto.stop()
        first = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", str(path)], stderr=subprocess.DEVNULL)
        await asyncio.sleep(3.0)  # about 15 telemetry messages spooled
        first.send_signal(signal.SIGKILL)
        first.wait(5)
        spool = Spool(tmp_path / "spool.sqlite", 16 * 1024 * 1024)
        spooled = [json.loads(m.payload) for m in spool.oldest(10_000) if m.topic.endswith("/telemetry")]
        spool.close()
        backlog_seqs = [m["seq"] for m in spooled]
        assert len(backlog_seqs) >= 5 and backlog_seqs == list(range(1, len(backlog_seqs) + 1))
        mosquitto.start()
        async with VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            second = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", str(path)], stderr=subprocess.DEVNULL)
            try:
                def complete():
                    seqs = sorted({t["seq"] for t in vpp.telemetry})
                    return len(seqs) > len(backlog_seqs) + 10 and seqs == list(range(1, seqs[-1] + 1)) and seqs
                seqs = await until(complete, 20, "every sequence number from 1 on", interval_s=0.1)
            finally:
                second.send_signal(signal.SIGTERM)
                second.wait(10)
        assert seqs[0] == 1
        # the backlog (what the killed daemon spooled) came oldest first, beside live telemetry
        arrival = [t["seq"] for t in vpp.telemetry if t["seq"] in set(backlog_seqs)]
        assert arrival[: len(backlog_seqs)] == backlog_seqs


def test_systemd_unit_verifies(tmp_path):
    analyze = "/usr/bin/systemd-analyze"
    if not Path(analyze).exists():
        pytest.skip("systemd-analyze not installed")
    unit = (Path(__file__).resolve().parent.parent / "systemd" / "flexedge.service").read_text()
    flexedge = Path(sys.executable).parent / "flexedge"
    unit_path = tmp_path / "flexedge.service"
    unit_path.write_text(unit.replace("/opt/flexedge/bin/flexedge", str(flexedge)))
    result = subprocess.run([analyze, "verify", str(unit_path)], capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines() if "flexedge.service" in line and "Unknown" in line or "Failed" in line]
    assert not problems, result.stderr
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "User=flexedge" in unit


async def test_grid_operator_orders_win_over_the_vpp_at_once(tmp_path, mosquitto):
    from edge.gridorders import NO_ORDERS, GridOrders

    specs = [DeviceSpec(kind="pv", rated_kw=20.0, sun_kw=16.0), DeviceSpec(kind="storage", rated_kw=10.0)]
    async with SunSpecSimulator(specs) as sim:
        pv, bess = sim.devices
        profile = make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=1.0)
        async with running_gateway(profile) as gateway, VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(online(vpp, 2), 10, "assets online")
            sent = await vpp.send_setpoint(8.0, valid_s=60)  # VPP: battery discharges 8 kW -> site 24 kW
            await vpp.wait_ack(sent["id"])
            await until(lambda: abs(pv.power_kw + bess.power_kw - 24.0) < 0.2, 3, "VPP activation delivered")

            ordered_at = time.monotonic()
            gateway.controller.apply_grid_orders(GridOrders(export_limit_kw=12.0, source="deie"))
            # enforced at once, not at the next cycle: the writes follow within milliseconds
            await bess.next_write("WSet", model_id=704, after_s=ordered_at, timeout_s=0.5)
            # the devices then ramp (the battery from +8 to -1.5 kW at 10 kW/s: about 1 s)
            await until(lambda: pv.power_kw + bess.power_kw <= 12.0 + 0.1, 2.0, "site capped by the order")
            message = await until(lambda: vpp.telemetry[-1]["grid_orders"]["export_limit_kw"] == 12.0 and vpp.telemetry[-1],
                                  3, "order in telemetry")
            assert message["site"]["activation_requested_kw"] == 8.0 and message["site"]["limited_by"] == "export_limit"
            Telemetry.model_validate(message)
            assert any(e["type"] == "grid_order_applied" for e in vpp.events) or await until(
                lambda: any(e["type"] == "grid_order_applied" for e in vpp.events), 3, "order event")

            gateway.controller.apply_grid_orders(GridOrders(disconnected=True, source="deie"))
            await until(lambda: pv.power_kw < 0.1 and bess.power_kw <= 0.01, 2.0, "nothing produces")

            gateway.controller.apply_grid_orders(NO_ORDERS)  # lifted: the VPP's activation again
            await until(lambda: abs(pv.power_kw + bess.power_kw - 24.0) < 0.2, 3, "activation back")


@asynccontextmanager
async def deie_site(tmp_path, broker_port: int):
    """A 20 kW PV inverter and a 10 kW battery, the gateway with a DEIE server, the VPP:
    yields (pv, bess, gateway, vpp, deie_port) once all are up."""
    from conftest import free_port

    specs = [DeviceSpec(kind="pv", rated_kw=20.0, sun_kw=16.0), DeviceSpec(kind="storage", rated_kw=10.0)]
    async with SunSpecSimulator(specs) as sim:
        pv, bess = sim.devices
        deie_port = free_port()
        profile = make_profile(tmp_path, broker_port, sim.devices, cycle_s=1.0)
        grid = {"deie": {"host": "127.0.0.1", "port": deie_port, "installed_kw": 30.0}}
        profile = Profile.model_validate({**profile.model_dump(mode="json"), "grid": grid})
        async with running_gateway(profile) as gateway, VppSimulator("127.0.0.1", broker_port, "flexedge", SITE) as vpp:
            await until(online(vpp, 2), 10, "assets online")
            await until(lambda: gateway.deie is not None and gateway.deie.serving, 5, "DEIE server listening")
            yield pv, bess, gateway, vpp, deie_port


async def test_deie_orders_over_iec104_cap_the_site_and_lift(tmp_path, mosquitto):
    """The grid operator's side (simulators.deie) sends real IEC 104 orders to the running gateway."""
    from simulators.deie import Confirmation, DeieOperator

    async with deie_site(tmp_path, mosquitto.port) as (pv, bess, gateway, vpp, deie_port):
        sent = await vpp.send_setpoint(8.0, valid_s=60)
        await vpp.wait_ack(sent["id"])
        await until(lambda: abs(pv.power_kw + bess.power_kw - 24.0) < 0.2, 3, "VPP activation delivered")
        async with DeieOperator("127.0.0.1", deie_port) as operator:
            ordered_at = time.monotonic()
            assert await operator.send_limit_kw(12.0) == Confirmation.POSITIVE
            # enforced within the cycle: the devices get their commands at once, then ramp
            await bess.next_write("WSet", model_id=704, after_s=ordered_at, timeout_s=0.5)
            await until(lambda: pv.power_kw + bess.power_kw <= 12.1, 2.5, "site capped by the DEIE")
            # the operator sees the site's power reported back
            await operator.wait_measurement("p_measured", lambda v: v is not None and v <= 12.5, timeout_s=15)
            assert await operator.send_limit_kw(float("nan")) == Confirmation.NEGATIVE
            assert gateway.controller.grid_orders.export_limit_kw == 12.0  # invalid order changed nothing
            assert await operator.send_disconnect() == Confirmation.POSITIVE
            await until(lambda: pv.power_kw < 0.1 and bess.power_kw <= 0.01, 2.5, "nothing produces")
            assert await operator.send_reconnect() == Confirmation.POSITIVE
            assert await operator.send_limit(None) == Confirmation.POSITIVE  # lift the limit
            await until(lambda: abs(pv.power_kw + bess.power_kw - 24.0) < 0.2, 3, "VPP activation back")
        # link lost: the last orders (none now) stay; an event says the link went down
        await until(lambda: any(e["type"] == "deie_link" and e["detail"].get("up") is False for e in vpp.events),
                    5, "link-down event")
        types = {e["type"] for e in vpp.events}
        assert {"grid_order_received", "grid_order_rejected", "grid_order_applied"} <= types


async def test_deie_reactive_power_and_tan_phi_orders_reach_the_inverters(tmp_path, mosquitto):
    """Q and tan(phi) orders from the grid operator become 704 VarSet writes, shared by reactive rating."""
    from simulators.deie import Confirmation, DeieOperator

    # Reactive ratings (702 VarMaxInj/VarMaxAbs in the simulator): 0.44 x rating: 8.8 and 4.4 kvar.
    async with deie_site(tmp_path, mosquitto.port) as (pv, bess, gateway, vpp, deie_port):
        async with DeieOperator("127.0.0.1", deie_port) as operator:
            ordered_at = time.monotonic()
            assert await operator.send_q_kvar(-6.0) == Confirmation.POSITIVE  # absorb 6 kvar
            write = await pv.next_write("VarSet", model_id=704, after_s=ordered_at, timeout_s=0.5)
            assert write.value == pytest.approx(-4000.0, abs=20)  # 6 x 8.8 / 13.2 kvar, in var
            write = await bess.next_write("VarSet", model_id=704, after_s=ordered_at, timeout_s=0.5)
            assert write.value == pytest.approx(-2000.0, abs=20)
            await until(lambda: abs(pv.q_kvar + bess.q_kvar + 6.0) < 0.1, 3, "site absorbs 6 kvar")
            message = await until(lambda: vpp.telemetry[-1]["site"]["q_requested_kvar"] == -6.0 and vpp.telemetry[-1],
                                  3, "the order in telemetry")
            Telemetry.model_validate(message)
            assert message["grid_orders"]["reactive_setpoint_kvar"] == -6.0
            assert message["assets"]["pv0"]["q_setpoint_kvar"] == pytest.approx(-4.0, abs=0.05)

            # tan(phi) = Q / P: the site exports 16 kW, so -0.25 asks for -4 kvar.
            ordered_at = time.monotonic()
            assert await operator.send_tan_phi(-0.25) == Confirmation.POSITIVE
            write = await pv.next_write("VarSet", model_id=704, after_s=ordered_at, timeout_s=0.5)
            assert write.value == pytest.approx(-4000.0 * 8.8 / 13.2, rel=0.05)
            await until(lambda: abs(pv.q_kvar + bess.q_kvar + 4.0) < 0.3, 3, "site follows tan(phi)")

            # An order beyond the site's reactive ratings: all they have, and telemetry shows the gap.
            assert await operator.send_q_kvar(30.0) == Confirmation.POSITIVE
            message = await until(lambda: vpp.telemetry[-1]["site"]["q_requested_kvar"] == 30.0 and vpp.telemetry[-1],
                                  3, "the large order in telemetry")
            assert message["site"]["q_setpoint_kvar"] == pytest.approx(13.2, abs=0.1)
    # Stopping the gateway releases reactive control too (VarSetEna = 0).
    assert pv.image.get_raw(704, "VarSetEna") == 0


async def test_qu_in_inverter_mode_runs_in_the_inverter_and_yields_to_a_grid_order(tmp_path, mosquitto):
    """functions.q_u mode inverter: the PV inverter (with 705) gets the curve and follows its own voltage, the
    battery (without) gets the gateway's share; a grid operator's Q order switches the curve off until lifted."""
    from edge.gridorders import NO_ORDERS, GridOrders

    pv_models = (1, 103, 120, 121, 123, 701, 702, 704, 705)
    specs = [DeviceSpec(kind="pv", rated_kw=20.0, sun_kw=16.0, models=pv_models, ramp_pct_per_s=0.0),
             DeviceSpec(kind="storage", rated_kw=10.0, ramp_pct_per_s=0.0)]
    async with SunSpecSimulator(specs) as sim:
        pv, bess = sim.devices
        profile = make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=0.5)
        functions = {"q_u": {"voltage_source": "pv0", "q_max_kvar": 13.2, "update_interval_s": 1, "mode": "inverter",
                             "curve": [{"v_pu": 0.92, "q_pct": 100}, {"v_pu": 0.97, "q_pct": 0},
                                       {"v_pu": 1.03, "q_pct": 0}, {"v_pu": 1.08, "q_pct": -100}]}}
        profile = Profile.model_validate({**profile.model_dump(mode="json"), "functions": functions})
        async with running_gateway(profile) as gateway, VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(online(vpp, 2), 10, "assets online")
            await until(lambda: pv.volt_var().enabled, 5, "curve in the inverter")
            assert pv.volt_var().points == ((92.0, 100.0), (97.0, 0.0), (103.0, 0.0), (108.0, -100.0))
            message = await until(lambda: vpp.telemetry[-1]["functions"]["q_u"]["inverter_curve_assets"] == ["pv0"]
                                  and vpp.telemetry[-1], 3, "inverter mode in telemetry")
            Telemetry.model_validate(message)

            pv.set_grid(voltage_v=1.06 * 230)  # -60 %: the inverter absorbs 60 % of its 8.8 kvar on its own,
            await until(lambda: abs(pv.q_kvar + 5.28) < 0.1, 3, "the inverter on its curve")
            # ... and the battery takes the rest of the site's request: -60 % of 13.2 kvar x 4.4 / 13.2
            await until(lambda: abs(bess.q_kvar + 2.64) < 0.1, 5, "the battery's share")
            assert pv.image.get_raw(704, "VarSetEna") != 1  # the gateway commands no reactive power to the pv

            gateway.controller.apply_grid_orders(GridOrders(reactive_setpoint_kvar=3.0, source="deie"))
            await until(lambda: not pv.volt_var().enabled, 2, "curve off under the order")
            await until(lambda: abs(pv.q_kvar + bess.q_kvar - 3.0) < 0.1, 3, "the order shared by both")
            assert pv.q_kvar == pytest.approx(2.0, abs=0.1)  # 3 x 8.8 / 13.2

            gateway.controller.apply_grid_orders(NO_ORDERS)
            await until(lambda: pv.volt_var().enabled, 3, "curve back once the order is lifted")
            await until(lambda: abs(pv.q_kvar + 5.28) < 0.1 and abs(bess.q_kvar + 2.64) < 0.1, 5, "Q(U) again")
        assert any(e["type"] == "volt_var_written" and e["asset_id"] == "pv0" for e in vpp.events)
