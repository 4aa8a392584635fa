"""Reloading the profile (SIGHUP, `systemctl reload`) on the wire: SunSpec simulators, a real
Mosquitto, the VPP simulator and the DEIE simulator.

The spool, the MQTT session and the telemetry sequence go on across a reload; an invalid
profile, or one that changes a key that needs a restart, is refused and the old one keeps
running; the grid operator's limit stays in force.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import yaml

from conftest import free_port, until, wait_port
from edge.config.profile import load_profile
from edge.runtime.daemon import Gateway
from edge.uplink.messages import Event, Status, Telemetry
from simulators.deie import Confirmation, DeieOperator
from simulators.sunspec import DeviceSpec, SunSpecSimulator
from simulators.vpp import VppSimulator

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[1]
SITE = "reload-site"


def document(tmp_path: Path, broker_port: int, devices, **extra) -> dict:
    assets = [{"id": f"pv{i}", "kind": "pv", "driver": "sunspec", "host": "127.0.0.1", "port": d.port,
               "unit_id": d.unit_id, "timeout_s": 0.3} for i, d in enumerate(devices)]
    return {
        "site": {"id": SITE},
        "control": {"cycle_s": 0.5, "setpoint_timeout_s": 60},
        "uplink": {"mqtt": {"host": "127.0.0.1", "port": broker_port},
                   "spool": {"path": str(tmp_path / "spool.sqlite"), "max_mb": 16}},
        "assets": assets,
        **extra,
    }


def write(path: Path, doc: dict) -> str:
    body = yaml.safe_dump(doc).encode()
    path.write_bytes(body)
    return hashlib.sha256(body).hexdigest()


@asynccontextmanager
async def running(path: Path):
    stop = asyncio.Event()
    gateway = Gateway(load_profile(path), profile_path=path)
    task = asyncio.create_task(gateway.run(stop))
    try:
        yield gateway
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def connects(mosquitto, client_id: str) -> int:
    """CONNECTs the broker accepted from ``client_id`` (its own log)."""
    text = (mosquitto.workdir / "mosquitto.log").read_text(errors="replace")
    return sum(1 for line in text.splitlines() if "New client connected" in line and f" as {client_id} " in line)


def events(vpp: VppSimulator, kind: str) -> list[dict]:
    return [e for e in vpp.events if e["type"] == kind]


def contiguous(seqs: list[int]) -> bool:
    ordered = sorted(set(seqs))
    return ordered == list(range(ordered[0], ordered[-1] + 1))


async def test_reload_adds_an_asset_on_the_same_session_and_refuses_what_it_cannot_take(tmp_path, mosquitto):
    specs = [DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=8.0), DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=6.0)]
    async with SunSpecSimulator(specs) as sim:
        path = tmp_path / "site.yaml"
        first = document(tmp_path, mosquitto.port, sim.devices[:1])
        old_sha = write(path, first)
        async with VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp, running(path) as gateway:
            await until(lambda: vpp.telemetry and vpp.telemetry[-1]["assets"]["pv0"]["online"], 10, "pv0 online")
            assert vpp.telemetry[-1]["gateway"]["profile_sha256"] == old_sha
            assert vpp.status["profile"] == {"sha256": old_sha, "version": None}
            setpoint = await vpp.send_setpoint(-2.0, valid_s=60)
            assert (await vpp.wait_ack(setpoint["id"]))["status"] == "accepted"

            # 1. Add pv1 and a version; two reloads in a row run one after the other.
            second = document(tmp_path, mosquitto.port, sim.devices, version="2026-12-04.1")
            new_sha = write(path, second)
            assert await asyncio.gather(gateway.reload(), gateway.reload()) == ["reloaded", "unchanged"]
            message = await until(lambda: vpp.telemetry and vpp.telemetry[-1]["assets"].get("pv1", {}).get("online")
                                  and vpp.telemetry[-1], 10, "pv1 online in telemetry")
            assert message["gateway"]["profile_sha256"] == new_sha
            assert message["gateway"]["profile_version"] == "2026-12-04.1"
            Telemetry.model_validate(message)
            # the VPP's setpoint is still in force, now shared by both inverters
            assert message["mode"] == "setpoint" and message["setpoint_id"] == setpoint["id"]
            await until(lambda: abs(vpp.telemetry[-1]["site"]["p_kw"] - 12.0) < 0.1, 5, "site at 14 - 2 kW")
            reloaded = events(vpp, "profile_reloaded")[0]
            Event.model_validate(reloaded)
            assert reloaded["detail"]["old_sha256"] == old_sha and reloaded["detail"]["new_sha256"] == new_sha
            assert reloaded["detail"]["assets_added"] == ["pv1"] and reloaded["detail"]["assets_changed"] == []
            assert reloaded["detail"]["assets_released"] == []
            assert reloaded["detail"]["sections_changed"] == ["version"]
            await until(lambda: vpp.status and vpp.status.get("profile", {}).get("sha256") == new_sha, 3, "new birth")
            Status.model_validate(vpp.status)
            assert [a["id"] for a in vpp.status["assets"]] == ["pv0", "pv1"]

            # 2. Invalid: refused with every problem named; the old profile keeps running.
            path.write_text(yaml.safe_dump({**second, "control": {"cycle_s": 0}}))
            assert await gateway.reload() == "failed"
            failed = (await until(lambda: events(vpp, "profile_reload_failed"), 3, "reload_failed event"))[0]
            assert any("control.cycle_s" in problem for problem in failed["detail"]["problems"])

            # 3. A new broker port needs a restart: refused, naming the key.
            write(path, {**second, "uplink": {**second["uplink"], "mqtt": {"host": "127.0.0.1", "port": free_port()}}})
            assert await gateway.reload() == "refused"
            refused = (await until(lambda: events(vpp, "profile_reload_refused"), 3, "reload_refused event"))[0]
            assert refused["detail"]["keys"] == ["uplink.mqtt"]

            seen = len(vpp.telemetry)
            await until(lambda: len(vpp.telemetry) >= seen + 3, 5, "telemetry goes on")
            latest = vpp.telemetry[-1]
            assert latest["gateway"]["profile_sha256"] == new_sha and set(latest["assets"]) == {"pv0", "pv1"}
            # One MQTT session throughout, and not a telemetry message lost or skipped.
            assert gateway.uplink.stats.reconnects == 0 and connects(mosquitto, f"flexedge-{SITE}") == 1
            assert contiguous([t["seq"] for t in vpp.telemetry])

            # 4. pv0 removed: released (back to its sun), pv1 takes the whole activation.
            write(path, {**second, "assets": second["assets"][1:]})
            assert await gateway.reload() == "reloaded"
            removal = (await until(lambda: events(vpp, "profile_reloaded")[1:], 3, "the second reload's event"))[0]
            assert removal["detail"]["assets_removed"] == removal["detail"]["assets_released"] == ["pv0"]
            await until(lambda: abs(sim.devices[0].power_kw - 8.0) < 0.1 and abs(sim.devices[1].power_kw - 4.0) < 0.1,
                        5, "pv0 released, pv1 at 6 - 2 kW")


LIMIT_KW = 5.0


async def test_a_grid_operator_limit_stays_in_force_across_reloads(tmp_path, mosquitto):
    """Reload 1 adds an inverter (the DEIE link goes on), which joins the capped site; reload 2 changes the
    DEIE's settings (the link is started again, the order put back in force as persisted): still capped."""
    specs = [DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=8.0), DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=8.0)]
    async with SunSpecSimulator(specs) as sim:
        deie_port = free_port()
        deie = {"host": "127.0.0.1", "port": deie_port, "installed_kw": 20.0, "on_link_loss": "hold",
                "link_loss_timeout_s": 30.0}
        path = tmp_path / "site.yaml"
        write(path, document(tmp_path, mosquitto.port, sim.devices[:1], grid={"deie": deie}))
        site_kw = lambda: sum(d.power_kw for d in sim.devices)  # noqa: E731
        async with VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp, running(path) as gateway:
            await asyncio.to_thread(wait_port, deie_port, 10.0)
            async with DeieOperator("127.0.0.1", deie_port, command_timeout_s=2.0) as operator:
                await until(lambda: vpp.telemetry and vpp.telemetry[-1]["assets"]["pv0"]["online"], 10, "pv0 online")
                assert await operator.send_limit_kw(LIMIT_KW) is Confirmation.POSITIVE
                await until(lambda: sim.devices[0].power_kw <= LIMIT_KW + 0.1, 5, "site (pv0) capped")
                write(path, document(tmp_path, mosquitto.port, sim.devices, grid={"deie": deie}))
                assert await gateway.reload() == "reloaded"
                await until(lambda: vpp.telemetry[-1]["assets"].get("pv1", {}).get("online"), 10, "pv1 online")
                # pv1 ran free until it joined the site; now both share the limit
                await until(lambda: site_kw() <= LIMIT_KW + 0.1, 5, "site (pv0 + pv1) capped")
                orders = vpp.telemetry[-1]["grid_orders"]
                assert orders["export_limit_kw"] == LIMIT_KW and orders["source"] == "deie"
            write(path, document(tmp_path, mosquitto.port, sim.devices, grid={"deie": {**deie, "report_deadband_pct": 2.0}}))
            assert await gateway.reload() == "reloaded"
            await until(lambda: len(events(vpp, "profile_reloaded")) == 2, 3, "the second profile_reloaded event")
            await until(lambda: vpp.telemetry[-1]["grid_orders"]["source"] == "persisted", 5, "orders persisted")
            for _ in range(6):  # three cycles: still capped, by both inverters
                assert vpp.telemetry[-1]["grid_orders"]["export_limit_kw"] == LIMIT_KW
                assert site_kw() <= LIMIT_KW + 0.1
                await asyncio.sleep(0.25)


def _read_notify(sock: socket.socket, until_s: float, stop_after: str) -> list[str]:
    messages: list[str] = []
    sock.settimeout(0.2)
    deadline = time.monotonic() + until_s
    while time.monotonic() < deadline:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if messages[-1].startswith(stop_after):
            break
    return messages


async def test_sighup_reloads_flexedge_run(tmp_path, mosquitto):
    """The real signal to a real `flexedge run`: RELOADING=1, then READY=1, and the new profile in telemetry."""
    async with SunSpecSimulator([DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=5.0)]) as sim:
        path = tmp_path / "site.yaml"
        write(path, document(tmp_path, mosquitto.port, sim.devices, control={"cycle_s": 0.2}))
        sock_path = tmp_path / "notify.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(sock_path))
            env = dict(os.environ, NOTIFY_SOCKET=str(sock_path))
            async with VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "edge.cli", "run", "--log-format", "json", str(path), env=env, cwd=ROOT,
                    stderr=asyncio.subprocess.PIPE)
                try:
                    ready = await asyncio.to_thread(_read_notify, sock, 10.0, "READY=1")
                    assert ready and ready[-1].startswith("READY=1")
                    new_sha = write(path, document(tmp_path, mosquitto.port, sim.devices, version="v2",
                                                   control={"cycle_s": 0.2}))
                    proc.send_signal(signal.SIGHUP)
                    notices = await asyncio.to_thread(_read_notify, sock, 10.0, "READY=1")
                    assert notices[0].startswith("RELOADING=1\nMONOTONIC_USEC=") and notices[-1].startswith("READY=1")
                    await until(lambda: vpp.telemetry and vpp.telemetry[-1]["gateway"]["profile_version"] == "v2"
                                and vpp.telemetry[-1]["gateway"]["profile_sha256"] == new_sha, 5, "v2 in telemetry")
                finally:
                    proc.send_signal(signal.SIGTERM)
                    _, stderr = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, stderr.decode()[-2000:]
        records = [json.loads(line) for line in stderr.decode().splitlines()]
        reloaded = [r for r in records if r.get("event") == "profile_reloaded"]
        assert len(reloaded) == 1 and reloaded[0]["new_sha256"] == new_sha and reloaded[0]["sections_changed"] == ["version"]
        assert all(r["logger"].startswith("flexedge.") for r in records), {r["logger"] for r in records}
