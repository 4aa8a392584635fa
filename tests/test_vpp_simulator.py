"""The VPP simulator against a real Mosquitto, with the gateway played by a plain aiomqtt client."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import time
from datetime import datetime
from itertools import count
from typing import Any, Callable

import aiomqtt
import pytest

from conftest import free_port
from simulators.broker import MqttBroker
from simulators.vpp import (
    ConstantPattern,
    RampPattern,
    StepsPattern,
    TracePattern,
    TrackingStats,
    VppSimulator,
    make_pattern,
    utc_iso_ms,
)

HOST = "127.0.0.1"
TS_PATTERN = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class FakeGateway:
    """Answers every setpoint with an ack and one telemetry message, like the real gateway would.

    ``decide(payload)`` returns None to accept or a rejection reason; ``offsets_kw``
    gives, per setpoint, how far the reported site.p_kw is from site.setpoint_kw.
    """

    def __init__(self, port: int, site: str = "demo", prefix: str = "flexedge",
                 decide: Callable[[dict], str | None] = lambda payload: None,
                 offsets_kw: Callable[[int], float | None] = lambda index: 0.0):
        self.port, self.base = port, f"{prefix}/{site}"
        self.decide, self.offsets_kw = decide, offsets_kw
        self.received: list[tuple[float, dict[str, Any]]] = []  # (wall time of arrival, payload)
        self.raw: list[bytes] = []
        self.seq = count(1)

    async def __aenter__(self) -> FakeGateway:
        self.client = aiomqtt.Client(HOST, self.port, identifier="fake-gateway", timeout=3)
        await self.client.__aenter__()
        await self.client.subscribe(f"{self.base}/setpoint", qos=1)
        self.task = asyncio.create_task(self._serve())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.__aexit__(None, None, None)

    async def publish(self, leaf: str, payload: dict[str, Any], retain: bool = False) -> None:
        await self.client.publish(f"{self.base}/{leaf}", json.dumps(payload), qos=1, retain=retain)

    async def _serve(self) -> None:
        async for message in self.client.messages:
            self.raw.append(message.payload)
            try:
                setpoint = json.loads(message.payload)
            except ValueError:
                continue
            self.received.append((time.time(), setpoint))
            reason = self.decide(setpoint)
            await self.publish("setpoint/ack", {
                "id": setpoint["id"], "status": "rejected" if reason else "accepted", "reason": reason,
                "ts": utc_iso_ms(), "activation_kw": setpoint["activation_kw"]})
            offset = self.offsets_kw(len(self.received) - 1)
            target = setpoint["activation_kw"] if not reason else 0.0
            await self.publish("telemetry", {
                "seq": next(self.seq), "ts": utc_iso_ms(), "site_id": "demo", "cycle_s": 2.0, "mode": "setpoint",
                "setpoint_id": setpoint["id"],
                "site": {"p_kw": None if offset is None else target + offset, "setpoint_kw": target}, "assets": {}})

    async def wait_setpoints(self, number: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout_s):
            while len(self.received) < number:
                await asyncio.sleep(0.01)
        return [payload for _, payload in self.received]


# -- patterns ------------------------------------------------------------------


def test_steps_pattern_holds_zero_up_zero_down():
    steps = StepsPattern(5.0, step_s=4.0)
    assert [steps.activation_kw(t) for t in range(0, 20, 2)] == [0, 0, 5, 5, 0, 0, -5, -5, 0, 0]
    assert steps.activation_kw(0.6 * 20 / 3) == 5.0  # 4.000...01 in floating point is still step 1


def test_ramp_pattern_is_a_triangle_through_zero():
    ramp = RampPattern(8.0, period_s=40.0)
    assert [ramp.activation_kw(t) for t in (0, 5, 10, 15, 20, 25, 30, 35, 40)] == \
        [0.0, 4.0, 8.0, 4.0, 0.0, -4.0, -8.0, -4.0, 0.0]


def test_make_pattern_and_bad_parameters():
    assert make_pattern("constant", 3.0).activation_kw(123.0) == 3.0
    with pytest.raises(ValueError, match="unknown pattern 'sine'"):
        make_pattern("sine", 1.0)
    with pytest.raises(ValueError, match="step_s must be greater than 0"):
        StepsPattern(1.0, step_s=0)
    with pytest.raises(ValueError, match="amplitude_kw must be a finite number"):
        ConstantPattern(float("nan"))
    with pytest.raises(ValueError, match="cadence_s must be a finite number"):
        VppSimulator(cadence_s=float("inf"))
    with pytest.raises(ValueError, match="site_id must be a non-empty MQTT topic level"):
        VppSimulator(site_id="a/b")


def test_trace_is_sample_and_hold_from_csv(tmp_path):
    trace_file = tmp_path / "afrr.csv"
    trace_file.write_text("# aFRR test trace\nt_s,activation_kw,comment\n1,2.5,up\n3, -1.0 ,down\n\n6,0,end\n")
    trace = TracePattern.from_csv(trace_file)
    assert trace.points == ((1.0, 2.5), (3.0, -1.0), (6.0, 0.0)) and trace.end_s == 6.0
    assert [trace.activation_kw(t) for t in (0, 1, 2.9, 3, 5.99, 6, 100)] == [0.0, 2.5, 2.5, -1.0, -1.0, 0.0, 0.0]


@pytest.mark.parametrize("text, message", [
    ("t_s,kw\n0,1\n", r"lacks column\(s\) activation_kw"),
    ("t_s,activation_kw\n0,1\n2,abc\n", r"afrr.csv:3: activation_kw 'abc' is not a finite number"),
    ("t_s,activation_kw\n0,1\n\n2,nan\n", r"afrr.csv:4: activation_kw 'nan' is not a finite number"),
    ("t_s,activation_kw\n0,1\n2,2\n2,3\n", r"afrr.csv:4: t_s 2 does not increase \(previous 2\)"),
    ("t_s,activation_kw\n-1,1\n", r"afrr.csv:2: t_s -1 is negative"),
    ("t_s,activation_kw\n", "trace has no data rows"),
])
def test_bad_trace_names_file_and_line(tmp_path, text, message):
    trace_file = tmp_path / "afrr.csv"
    trace_file.write_text(text)
    with pytest.raises(ValueError, match=message):
        TracePattern.from_csv(trace_file)


def test_tracking_stats_use_nearest_rank_p95():
    stats = TrackingStats.of([0.1 * i for i in range(1, 21)])
    assert stats.count == 20 and stats.mean_kw == pytest.approx(1.05)
    assert stats.p95_kw == pytest.approx(1.9) and stats.max_kw == pytest.approx(2.0)
    assert TrackingStats.of([]) == TrackingStats(0, None, None, None)


# -- on the wire -------------------------------------------------------------------


async def test_steps_run_puts_the_pattern_on_the_wire_at_the_cadence(mosquitto):
    async with FakeGateway(mosquitto.port) as gateway, \
               VppSimulator(HOST, mosquitto.port, "flexedge", "demo", pattern=StepsPattern(5.0, step_s=0.4),
                            cadence_s=0.2, valid_s=3.0) as vpp:
        started = time.time()
        summary = await asyncio.wait_for(vpp.run(duration_s=1.6), 5)
        received = gateway.received
    activations = [payload["activation_kw"] for _, payload in received]
    assert activations == [0.0, 0.0, 5.0, 5.0, 0.0, 0.0, -5.0, -5.0]
    ids = [payload["id"] for _, payload in received]
    assert len(set(ids)) == 8 and all(re.fullmatch(rf"{vpp.id_prefix}-\d+", i) for i in ids)
    for arrived, payload in received:
        assert set(payload) == {"id", "ts", "valid_s", "activation_kw"} and payload["valid_s"] == 3.0
        assert TS_PATTERN.match(payload["ts"])
        sent = datetime.fromisoformat(payload["ts"].replace("Z", "+00:00")).timestamp()
        assert 0 <= arrived - sent < 0.5
    span = received[-1][0] - received[0][0]
    assert 1.3 < span < 1.9  # 7 intervals of 0.2 s (absolute deadlines: no drift, some jitter)
    assert time.time() - started >= 1.6  # the run lasts its duration, for the last telemetry
    assert summary["setpoints_sent"] == 8 and summary["acks_accepted"] == 8 and summary["awaiting_ack"] == 0
    assert summary["telemetry"] == 8 and summary["tracking"]["max_kw"] == 0.0
    assert 0 < summary["ack_latency_ms"]["max"] < 500


async def test_tracking_error_from_telemetry(mosquitto):
    offsets = [0.1 * i * (-1) ** i for i in range(1, 21)] + [None]  # signs alternate; the last p_kw is null
    async with FakeGateway(mosquitto.port, offsets_kw=lambda index: offsets[index]), \
               VppSimulator(HOST, mosquitto.port, "flexedge", "demo") as vpp:
        for _ in offsets:
            await vpp.send_setpoint(7.0)
        await vpp.wait_telemetry(len(offsets))
    stats = vpp.tracking_stats()
    assert stats.count == 20
    assert stats.mean_kw == pytest.approx(1.05) and stats.p95_kw == pytest.approx(1.9)
    assert stats.max_kw == pytest.approx(2.0)
    assert "mean 1.050 kW, p95 1.900 kW, max 2.000 kW" in vpp.format_report()


async def test_exact_messages_and_rejections(mosquitto, caplog):
    caplog.set_level(logging.INFO, logger="simulators.vpp")

    def decide(setpoint: dict) -> str | None:
        return "activation_kw 100 exceeds band_up_kw 20" if setpoint["activation_kw"] > 20 else None

    async with FakeGateway(mosquitto.port, decide=decide) as gateway, \
               VppSimulator(HOST, mosquitto.port, "flexedge", "demo") as vpp:
        exact = await vpp.send_setpoint(12.5, valid_s=10, id="vpp-17", ts=1795000000.0)
        assert exact == {"id": "vpp-17", "ts": 1795000000.0, "valid_s": 10, "activation_kw": 12.5}
        assert (await vpp.wait_ack("vpp-17"))["status"] == "accepted"
        expiring = await vpp.send_setpoint(-3.0, expires_at="2026-11-21T10:00:10.000Z")
        assert set(expiring) == {"id", "ts", "expires_at", "activation_kw"}
        too_big = await vpp.send_setpoint(100.0)
        ack = await vpp.wait_ack(too_big["id"])
        assert ack["status"] == "rejected" and vpp.acks_rejected == 1 and vpp.acks_accepted == 2
        await vpp.send_raw(b"{not json")
        with pytest.raises(ValueError, match="use send_raw"):
            await vpp.send_setpoint(float("nan"))
        await gateway.wait_setpoints(3)
        async with asyncio.timeout(3):
            while len(gateway.raw) < 4:
                await asyncio.sleep(0.01)
    assert json.loads(gateway.raw[0]) == exact  # byte-level: what went out is what send_setpoint returned
    assert json.loads(gateway.raw[1]) == expiring
    assert gateway.raw[3] == b"{not json"
    assert f"setpoint {too_big['id']} rejected: activation_kw 100 exceeds band_up_kw 20" in caplog.text


async def test_status_events_and_bad_payloads_are_collected(mosquitto):
    async with FakeGateway(mosquitto.port) as gateway:
        await gateway.publish("status", {"state": "online", "version": "0.1.0", "site_id": "demo", "assets": []},
                              retain=True)
        async with VppSimulator(HOST, mosquitto.port, "flexedge", "demo") as vpp:
            assert (await vpp.wait_status("online"))["version"] == "0.1.0"  # retained, arrives on subscribe
            await gateway.publish("events", {"seq": 1, "type": "asset_offline", "asset_id": "pv1", "detail": {}})
            await gateway.client.publish("flexedge/demo/events", b"\xff garbage", qos=1)
            await gateway.publish("status", {"state": "offline", "site_id": "demo", "reason": "shutdown"}, retain=True)
            assert (await vpp.wait_status("offline"))["reason"] == "shutdown"
            assert [event["type"] for event in vpp.events] == ["asset_offline"] and vpp.bad_messages == 1
            with pytest.raises(TimeoutError, match="no ack for setpoint 'nope' within 0.2 s"):
                await vpp.wait_ack("nope", timeout_s=0.2)


async def test_reconnects_after_a_broker_outage(mosquitto):
    async with VppSimulator(HOST, mosquitto.port, "flexedge", "demo", timeout_s=0.5, reconnect_max_s=0.3) as vpp:
        await vpp.send_setpoint(1.0)
        mosquitto.stop()
        # Depending on whether the loss was already noticed: "not connected within 0.5 s" or the client's error.
        with pytest.raises(ConnectionError, match=rf"setpoint {vpp.id_prefix}-2 not sent.*127.0.0.1:{mosquitto.port}"):
            await vpp.send_setpoint(2.0)
        with pytest.raises(ConnectionError, match=f"not connected to 127.0.0.1:{mosquitto.port} within 0.5 s"):
            await vpp.send_setpoint(2.5)
        mosquitto.start()
        async with asyncio.timeout(3):
            while not vpp.connected:
                await asyncio.sleep(0.05)
        async with aiomqtt.Client(HOST, mosquitto.port, identifier="listener", timeout=3) as listener:
            await listener.subscribe("flexedge/demo/setpoint", qos=1)
            sent = await vpp.send_setpoint(3.0)
            message = await asyncio.wait_for(anext(aiter(listener.messages)), 3)
    assert json.loads(message.payload) == sent and len(vpp.sent) == 2


async def test_no_broker_is_a_clear_error():
    port = free_port()
    with pytest.raises(ConnectionError, match=f"no MQTT broker answered at 127.0.0.1:{port} within 0.5 s"):
        async with VppSimulator(HOST, port, timeout_s=0.5):
            pass


async def test_trace_run_against_the_embedded_broker_ends_after_the_last_row(tmp_path):
    trace_file = tmp_path / "trace.csv"
    trace_file.write_text("t_s,activation_kw\n0,1\n0.3,2\n0.5,-2\n")
    async with MqttBroker(HOST, 0) as broker, FakeGateway(broker.port) as gateway:
        vpp = VppSimulator(HOST, broker.port, pattern=TracePattern.from_csv(trace_file), cadence_s=0.2)
        summary = await asyncio.wait_for(vpp.run(), 5)  # connects, runs t = 0, 0.2, 0.4, 0.6, disconnects
        assert [p["activation_kw"] for p in await gateway.wait_setpoints(4)] == [1.0, 1.0, 2.0, -2.0]
    assert summary["setpoints_sent"] == 4 and summary["acks_accepted"] == 4
    assert summary["tracking"] == {"count": 4, "mean_kw": 0.0, "p95_kw": 0.0, "max_kw": 0.0}


# -- command line --------------------------------------------------------------------


async def test_command_line_run_prints_acks_and_a_summary(mosquitto):
    async with FakeGateway(mosquitto.port, offsets_kw=lambda index: 0.5) as gateway:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "simulators.vpp", "--port", str(mosquitto.port), "--pattern", "constant",
            "--amplitude-kw", "3", "--cadence-s", "0.2", "--duration-s", "1", "--report-s", "0",
            "--client-id", "cli-vpp", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(proc.communicate(), 10)
    text = output.decode()
    assert proc.returncode == 0, text
    assert [payload["activation_kw"] for _, payload in gateway.received] == [3.0] * 5
    assert "accepted (activation 3.0 kW)" in text
    summary = json.loads(text.split("summary: ", 1)[1])
    assert summary["setpoints_sent"] == 5 and summary["acks_accepted"] == 5
    assert summary["tracking"]["mean_kw"] == pytest.approx(0.5)


def test_command_line_rejects_a_bad_trace(tmp_path):
    trace_file = tmp_path / "bad.csv"
    trace_file.write_text("t_s,activation_kw\n0,x\n")
    result = subprocess.run([sys.executable, "-m", "simulators.vpp", "--trace", str(trace_file)],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert f"error: {trace_file}:2: activation_kw 'x' is not a finite number" in result.stdout
