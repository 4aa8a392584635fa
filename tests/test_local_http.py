"""The local HTTP endpoint on a real gateway (SunSpec simulators, a real Mosquitto): /metrics,
/health, /api/state, Basic auth, read-only, the live websocket, and a port already taken."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import sqlite3
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import free_port
from edge.config.local_http import LocalHttp
from edge.local.auth import AuthFileError, BasicAuth, hashed_line
from simulators.sunspec import DeviceSpec, SunSpecSimulator
from simulators.vpp import VppSimulator
from test_gateway import SITE, make_profile, running_gateway, until

DEVICES = [DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=8.0), DeviceSpec(kind="storage", rated_kw=5.0)]


def with_local_http(profile, **local_http):
    return profile.model_copy(update={"local_http": LocalHttp.model_validate({"port": free_port(), **local_http})})


def request(port: int, path: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One HTTP request (blocking: run it with asyncio.to_thread); (status, headers, body)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


async def get(port: int, path: str, **kwargs) -> tuple[int, dict, bytes]:
    return await asyncio.to_thread(request, port, path, **kwargs)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_state_and_health_follow_the_cycle_and_the_spool(tmp_path, mosquitto):
    async with SunSpecSimulator(DEVICES) as sim:
        profile = with_local_http(make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=0.5))
        port = profile.local_http.port
        async with running_gateway(profile) as gateway, VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(lambda: vpp.telemetry and all(a["online"] for a in vpp.telemetry[-1]["assets"].values()),
                        10, "both assets online")
            sent = await vpp.send_setpoint(-6.0, valid_s=30)
            await vpp.wait_ack(sent["id"], timeout_s=2)
            await until(lambda: all(a.driver.command_log.succeeded for a in gateway.assets), 5, "the commands")
            await until(lambda: gateway.uplink.connected and gateway.stats.cycles >= 4, 5, "a few cycles")

            status, headers, body = await get(port, "/metrics")
            assert status == 200 and headers["Content-Type"].startswith("text/plain"), headers
            found = samples(body.decode())
            assert found[("flexedge_cycles_total", ())] >= 4
            assert found[("flexedge_missed_cycles_total", ())] == 0
            assert found[("flexedge_cycle_duration_seconds_count", ())] >= 4
            assert 0 < found[("flexedge_cycle_duration_seconds_sum", ())] < found[("flexedge_cycle_duration_seconds_count", ())] * 0.1
            assert found[("flexedge_cycle_lateness_seconds_count", ())] >= 4
            assert 0 <= found[("flexedge_loop_lag_p99_seconds", ())] < 0.5
            pv = (("asset", "pv0"), ("driver", "sunspec"), ("kind", "pv"))
            assert found[("flexedge_asset_online", pv)] == 1 and found[("flexedge_asset_degraded", pv)] == 0
            assert 0 <= found[("flexedge_asset_p_kw", pv)] <= 10
            assert found[("flexedge_command_successes_total", (("asset", "pv0"), ("driver", "sunspec")))] >= 1
            assert found[("flexedge_command_failures_total", (("asset", "storage1"), ("driver", "sunspec")))] == 0
            assert found[("flexedge_uplink_connected", ())] == 1 and found[("flexedge_spool_writable", ())] == 1
            assert found[("flexedge_spool_pending_messages", ())] >= 0
            assert found[("flexedge_spool_dropped_messages_total", ())] == 0
            assert ("flexedge_gateway_info", (("profile_sha256", ""), ("site", SITE), ("version", "0.1.0"))) in found
            assert found[("flexedge_site_setpoint_kw", ())] < found[("flexedge_site_baseline_kw", ())]

            status, headers, body = await get(port, "/metrics", headers={"Accept": "application/openmetrics-text"})
            assert headers["Content-Type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")

            status, _, body = await get(port, "/api/state")
            state = json.loads(body)
            assert status == 200 and [a["id"] for a in state["assets"]] == ["pv0", "storage1"]
            pv_state = state["assets"][0]
            assert pv_state["state"] == "online" and pv_state["driver"] == "sunspec" and pv_state["band_down_kw"] > 0
            assert pv_state["command"]["ok"] is True and pv_state["command"]["asked"].startswith("target_kw=")
            assert state["setpoint"]["id"] == sent["id"] and state["mode"] == "setpoint"
            assert state["uplink"]["connected"] and state["spool"]["writable"] and state["health"]["status"] == "ok"
            assert state["history"] and state["history"][-1]["requested_kw"] is not None
            assert {"gateway_started", "asset_online"} <= {e["type"] for e in state["events"]}
            assert state["gateway"]["telemetry"]["cycles"] >= 1

            # Read-only, and nothing else is there.
            status, headers, _ = await get(port, "/api/state", method="POST")
            assert status == 405 and headers["Allow"] == "GET, HEAD"
            assert (await get(port, "/metrics", method="DELETE"))[0] == 405
            status, headers, body = await get(port, "/", method="HEAD")
            assert status == 200 and body == b"" and int(headers["Content-Length"]) > 500
            assert (await get(port, "/../etc/passwd"))[0] == 404
            assert (await get(port, "/api/live"))[0] == 426

            status, _, body = await get(port, "/health")
            assert status == 200 and json.loads(body)["status"] == "ok"

            # Another process holds the spool's write lock: writes wait, then fail; /health says so.
            holder = sqlite3.connect(profile.uplink.spool.path, timeout=1)
            holder.execute("BEGIN EXCLUSIVE")
            try:
                locked_at = time.monotonic()
                while (answer := await get(port, "/health"))[0] == 200:
                    assert time.monotonic() - locked_at < 9, "health still 200 with the spool locked"
                    await asyncio.sleep(0.25)
                assert "spool write" in json.loads(answer[2])["reasons"][0], answer
            finally:
                holder.rollback()
                holder.close()
            await until(lambda: gateway.spool_writes.error is None and gateway.spool_writes.started_mono is None, 12,
                        "the spool to take writes again")
            assert (await get(port, "/health"))[0] == 200

            # The control cycle stops: /health says so within 3 cycles.
            controller_task = next(t for t in asyncio.all_tasks() if t.get_name() == "controller")
            controller_task.cancel()
            stopped_at = time.monotonic()
            status, _, body = await until_status(port, "/health", 503, 3)
            assert time.monotonic() - stopped_at < 2.5
            assert json.loads(body)["reasons"][0].startswith("no control cycle for"), body


async def until_status(port: int, path: str, status: int, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        answer = await get(port, path)
        if answer[0] == status or time.monotonic() > deadline:
            assert answer[0] == status, answer
            return answer
        await asyncio.sleep(0.1)


async def test_basic_auth_guards_every_path_and_the_websocket(tmp_path, mosquitto):
    users = tmp_path / "users"
    users.write_text("# operators\nalice:plain-secret\n" + hashed_line("bob", "s3cret:with colon") + "\n")
    os.chmod(users, 0o600)
    async with SunSpecSimulator(DEVICES[:1]) as sim:
        profile = with_local_http(make_profile(tmp_path, mosquitto.port, sim.devices), basic_auth_file=str(users))
        port = profile.local_http.port
        async with running_gateway(profile) as gateway:
            await until(lambda: gateway.local_http.bound, 5, "the endpoint to listen")

            def basic(user: str, password: str) -> dict:
                return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

            for path in ("/", "/metrics", "/health", "/api/state", "/static/app.js"):
                status, headers, _ = await get(port, path)
                assert status == 401 and headers["WWW-Authenticate"].startswith("Basic realm="), (path, status)
            assert (await get(port, "/metrics", headers=basic("alice", "wrong")))[0] == 401
            assert (await get(port, "/metrics", headers=basic("mallory", "plain-secret")))[0] == 401
            assert (await get(port, "/metrics", headers={"Authorization": "Basic !!notbase64"}))[0] == 401
            assert (await get(port, "/metrics", headers=basic("alice", "plain-secret")))[0] == 200
            assert (await get(port, "/api/state", headers=basic("bob", "s3cret:with colon")))[0] == 200
            assert (await get(port, "/api/state", method="POST", headers=basic("bob", "s3cret:with colon")))[0] == 405

            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"ws://127.0.0.1:{port}/api/live", open_timeout=3):
                    pass
            assert refused.value.response.status_code == 401
            async with connect(f"ws://127.0.0.1:{port}/api/live", additional_headers=basic("alice", "plain-secret"),
                               open_timeout=3) as live:
                message = json.loads(await asyncio.wait_for(live.recv(), 5))
                assert message["assets"][0]["id"] == "pv0"


async def test_the_live_socket_sends_every_cycle_and_a_stalled_client_never_delays_one(tmp_path, mosquitto):
    async with SunSpecSimulator(DEVICES) as sim:
        profile = with_local_http(make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=0.2))
        port = profile.local_http.port
        async with running_gateway(profile) as gateway:
            await until(lambda: gateway.local_http.bound and gateway.stats.cycles >= 2, 5, "cycles and the endpoint")
            async with connect(f"ws://127.0.0.1:{port}/api/live", open_timeout=3) as live:
                first = json.loads(await asyncio.wait_for(live.recv(), 2))
                cycles_before = gateway.stats.cycles
                messages = [first] + [json.loads(await asyncio.wait_for(live.recv(), 2)) for _ in range(10)]
                cycles = gateway.stats.cycles - cycles_before
                assert cycles in (10, 11), cycles  # one message per cycle, none skipped
                times = [m["point"]["t"] for m in messages]
                assert times == sorted(set(times)) and 0.1 < (times[-1] - times[0]) / 10 < 0.3
                assert {"site", "assets", "grid_orders", "uplink", "spool", "health", "events"} <= set(first)

                # A client that never reads: its socket fills, its queue fills, it is dropped; the cycle never waits.
                received = []
                reader = asyncio.create_task(read_into(live, received))
                stalled = await asyncio.to_thread(stalled_client, port)
                try:
                    await until(lambda: len(gateway.local_http.clients) == 2, 3, "the stalled client to connect")
                    cycles_before = gateway.stats.cycles
                    await until(lambda: gateway.local_http.clients_dropped == 1, 15, "the stalled client dropped")
                    cycles = gateway.stats.cycles - cycles_before
                    lateness = list(gateway.stats.lateness_s)[-cycles:]
                    assert cycles >= 10 and max(lateness) < 0.05, lateness
                    assert gateway.stats.missed_cycles == 0
                    await asyncio.sleep(0.5)
                finally:
                    stalled.close()
                    reader.cancel()
                # The reading client kept up all along, one message a cycle.
                assert len(gateway.local_http.clients) == 1
                assert len(received) >= cycles and received[-1]["point"]["t"] > times[-1]


async def read_into(live, received: list) -> None:
    async for raw in live:
        received.append(json.loads(raw))


def stalled_client(port: int) -> socket.socket:
    """A websocket client on a tiny receive buffer that completes the handshake and never reads again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.settimeout(3)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /api/live HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_a_taken_port_is_reported_once_and_the_gateway_cycles_on(tmp_path, mosquitto, caplog):
    caplog.set_level(logging.INFO)
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        async with SunSpecSimulator(DEVICES[:1]) as sim:
            profile = make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=0.2)
            profile = profile.model_copy(update={"local_http": LocalHttp(port=taken.getsockname()[1])})
            async with running_gateway(profile) as gateway:
                await until(lambda: gateway.stats.cycles >= 10, 5, "cycles without the endpoint")
        errors = [r for r in caplog.records if r.name == "flexedge.local" and r.levelno == logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert f"cannot listen on 127.0.0.1:{taken.getsockname()[1]}" in errors[0].getMessage()
        assert "Address already in use; the gateway runs without it" in errors[0].getMessage()
        assert gateway.local_http.bound is None
        failed = [e for _, e in gateway.local_http.book.events if e["type"] == "local_http_failed"]
        assert len(failed) == 1 and failed[0]["detail"]["port"] == taken.getsockname()[1], failed
    finally:
        taken.close()


def test_auth_file_problems_name_the_file_and_the_line_never_the_secret(tmp_path):
    path = tmp_path / "users"
    for text, expected in [
        ("alice:hunter2\nbob\n", "users:2: expected user:password"),
        ("alice:hunter2\nalice:other\n", "users:2: user 'alice' appears twice"),
        ("carol:$sha256$salt$hunter2\n", "users:1: a hashed password is $sha256$<salt>$<64 hex digits>"),
        ("# nobody yet\n\n", "names no user"),
    ]:
        path.write_text(text)
        with pytest.raises(AuthFileError) as error:
            BasicAuth.load(path)
        assert expected in str(error.value) and "hunter2" not in str(error.value), str(error.value)
    with pytest.raises(AuthFileError, match="cannot be read"):
        BasicAuth.load(tmp_path / "missing")
    path.write_text(hashed_line("dave", "pw") + "\n")
    auth = BasicAuth.load(path)
    assert auth.allows("Basic " + base64.b64encode(b"dave:pw").decode())
    assert not auth.allows("Basic " + base64.b64encode(b"dave:pw ").decode()) and not auth.allows("Bearer x")
