"""DEIE link over real IEC 104 on loopback: c104 on both sides, no mocks.

The gateway side is ``drivers.deie.link.DeieLink`` with a recording ``apply_orders``
(the controller's enforcement is tested elsewhere); the operator side is
``simulators.deie.DeieOperator``.  One test decodes the frames with tshark.
"""

import asyncio
import contextlib
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import c104
import pytest

from conftest import free_port
from drivers.deie.link import DeieLink, interpret_order, OrderRejected
from drivers.deie.config import DeieConfig, DeiePoint
from edge.gridorders import GridOrders
from simulators.deie import Confirmation, DeieOperator, parse_script

pytestmark = pytest.mark.timeout(30)
ROOT = Path(__file__).resolve().parents[1]


async def wait_until(predicate, timeout_s: float = 3.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_link(**overrides):
    port = overrides.pop("port", None) or free_port()
    settings = {"host": "127.0.0.1", "port": port, "installed_kw": 100.0, **overrides}
    cfg = DeieConfig(**settings)
    applied: list[GridOrders] = []
    events: list[tuple[str, dict]] = []
    link = DeieLink(cfg, applied.append, lambda kind, asset, detail: events.append((kind, detail)))
    link.backoff_initial_s, link.backoff_max_s = 0.05, 0.2
    task = asyncio.create_task(link.run())
    try:
        if cfg.role == "server":
            await wait_until(lambda: link.serving, what="the DEIE server listening")
        yield SimpleNamespace(link=link, cfg=cfg, port=port, applied=applied, events=events,
                              kinds=lambda: [kind for kind, _ in events])
    finally:
        task.cancel()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 5)
        assert task.cancelled(), "DeieLink.run() must only end by cancellation"


def operator_for(site, **kwargs) -> DeieOperator:
    return DeieOperator(port=site.port, points=site.cfg.point_map(), command_timeout_s=1.0, **kwargs)


# ------------------------------------------------------------------ orders


async def test_limit_kw_confirmed_and_applied():
    async with running_link() as site, operator_for(site) as operator:
        sent_at = time.monotonic()
        assert await operator.send_limit_kw(50.0) is Confirmation.POSITIVE
        await wait_until(lambda: site.applied, what="apply_orders")
        assert site.applied[-1] == GridOrders(export_limit_kw=50.0, source="deie")
        assert site.link.orders.export_limit_kw == 50.0
        await operator.wait_measurement("p_limit_received", lambda v: v is True, after=sent_at)
        await operator.wait_measurement("p_limit_applied", lambda v: v is True, after=sent_at)
        await operator.wait_measurement("p_limit_in_force", lambda v: v == 50.0, after=sent_at)
        assert "grid_order_received" in site.kinds() and "deie_order_applied" in site.kinds()

        assert await operator.send_limit(None) is Confirmation.POSITIVE  # p_limit_end ON
        await wait_until(lambda: site.link.orders.export_limit_kw is None, what="limit lifted")
        await operator.wait_measurement("p_limit_in_force", lambda v: v == -1.0, after=sent_at)


async def test_pct_limit_is_converted_with_installed_kw():
    async with running_link(installed_kw=200.0, limit_unit="pct") as site, operator_for(site) as operator:
        assert await operator.send_limit_pct(25.0) is Confirmation.POSITIVE
        await wait_until(lambda: site.applied, what="apply_orders")
        assert site.applied[-1].export_limit_kw == pytest.approx(50.0)
        await operator.wait_measurement("p_limit_in_force", lambda v: v == pytest.approx(25.0))
        assert await operator.send_limit_pct(100.5) is Confirmation.NEGATIVE
        assert site.link.orders.export_limit_kw == pytest.approx(50.0)


async def test_disconnection_and_reconnection():
    async with running_link() as site, operator_for(site) as operator:
        await operator.wait_measurement("coupled", lambda v: v is True)
        assert await operator.send_disconnect() is Confirmation.POSITIVE
        await wait_until(lambda: site.link.orders.disconnected, what="disconnection")
        assert site.applied[-1].disconnected is True
        await operator.wait_measurement("coupled", lambda v: v is False)
        await operator.wait_measurement("disconnect_applied", lambda v: v is True)

        reconnect_at = time.monotonic()
        assert await operator.send_reconnect() is Confirmation.POSITIVE
        await wait_until(lambda: not site.link.orders.disconnected, what="reconnection")
        await operator.wait_measurement("coupled", lambda v: v is True, after=reconnect_at)
        assert [o.disconnected for o in site.applied] == [True, False]


async def test_reactive_power_and_tan_phi_orders_replace_each_other():
    async with running_link() as site, operator_for(site) as operator:
        assert await operator.send_q_kvar(-20.0) is Confirmation.POSITIVE
        await wait_until(lambda: site.link.orders.reactive_setpoint_kvar == -20.0, what="Q order")
        assert await operator.send_tan_phi(0.3) is Confirmation.POSITIVE
        await wait_until(lambda: site.link.orders.tan_phi == pytest.approx(0.3), what="tan(phi) order")
        assert site.link.orders.reactive_setpoint_kvar is None
        await operator.wait_measurement("q_order_applied", lambda v: v is True)


INVALID_ORDERS = [
    ("p_limit NaN", 5001, "C_SE_NC_1", math.nan, "finite"),
    ("p_limit negative", 5001, "C_SE_NC_1", -5.0, "outside"),
    ("p_limit above 1.1 x installed", 5001, "C_SE_NC_1", 111.0, "outside"),
    ("p_limit infinite", 5001, "C_SE_NC_1", math.inf, "finite"),
    ("disconnect INTERMEDIATE", 5005, "C_DC_NA_1", "INTERMEDIATE", "unknown command value"),
    ("disconnect INDETERMINATE", 5005, "C_DC_NA_1", "INDETERMINATE", "unknown command value"),
    ("p_limit_end OFF", 5002, "C_SC_NA_1", False, "only ON"),
    ("tan(phi) out of range", 5004, "C_SE_NC_1", 5.0, "outside"),
    ("Q above range", 5003, "C_SE_NC_1", 500.0, "outside"),
]


async def test_invalid_orders_get_negative_confirmation_and_change_nothing():
    async with running_link() as site, operator_for(site) as operator:
        assert await operator.send_limit_kw(40.0) is Confirmation.POSITIVE
        await wait_until(lambda: len(site.applied) == 1, what="first order")
        before = site.link.orders
        for label, ioa, kind, value, reason in INVALID_ORDERS:
            count = len(site.events)
            assert await operator.send_raw(ioa, kind, value) is Confirmation.NEGATIVE, label
            await wait_until(lambda: len(site.events) > count, what=f"event for {label}")
            kind_seen, detail = site.events[-1]
            assert kind_seen == "grid_order_rejected", label
            assert reason in detail["reason"] and detail["ioa"] == ioa, (label, detail)
        await asyncio.sleep(0.1)
        assert site.link.orders == before and len(site.applied) == 1
        assert operator.measurements["p_limit_in_force"].value == 40.0


def test_interpret_order_ranges():
    cfg = DeieConfig(installed_kw=100.0)
    assert interpret_order(cfg, "p_limit", 110.0).value == 110.0
    assert interpret_order(cfg, "p_limit", 0.0).value == 0.0
    assert interpret_order(cfg, "p_limit", 50.0, scale=0.5).value == 25.0
    assert interpret_order(cfg, "disconnect", "ON").value is True
    with pytest.raises(OrderRejected, match="expected a number"):
        interpret_order(cfg, "p_limit", True)


# ------------------------------------------------------------------ reports


async def test_reports_reach_the_operator_cyclically_and_on_change():
    async with running_link(report_interval_s=0.2) as site, operator_for(site) as operator:
        site.link.report(42.5, -3.0, 231.0, breaker_closed=True)
        await operator.wait_measurement("p_measured", lambda v: v == pytest.approx(42.5))
        await operator.wait_measurement("q_measured", lambda v: v == pytest.approx(-3.0))
        await operator.wait_measurement("u_measured", lambda v: v == pytest.approx(231.0))
        await operator.wait_measurement("breaker_closed", lambda v: v is True)
        periodic = await operator.wait_measurement("p_measured", lambda v: True, timeout_s=2.0,
                                                   after=time.monotonic())
        assert periodic.cot in ("PERIODIC", "SPONTANEOUS")
        await operator.wait_measurement("p_measured", lambda v: True, timeout_s=2.0, after=time.monotonic())
        assert any(m.cot == "PERIODIC" and m.signal == "p_measured" for m in operator.history)

        changed_at = time.monotonic()
        site.link.report(80.0, -3.0, float("nan"))  # NaN voltage is skipped, not sent
        m = await operator.wait_measurement("p_measured", lambda v: v == pytest.approx(80.0), after=changed_at)
        assert m.cot == "SPONTANEOUS"
        assert operator.measurements["u_measured"].value == pytest.approx(231.0)


# ------------------------------------------------------------------ link loss


async def test_link_loss_holds_the_last_order():
    async with running_link(link_loss_timeout_s=0.3, on_link_loss="hold") as site:
        async with operator_for(site) as operator:
            assert await operator.send_limit_kw(30.0) is Confirmation.POSITIVE
            await wait_until(lambda: site.link.link_up, what="link up")
        await wait_until(lambda: "deie_link_loss" in site.kinds(), timeout_s=3, what="link-loss event")
        assert not site.link.link_up
        assert site.link.orders == GridOrders(export_limit_kw=30.0, source="deie")
        assert [d["up"] for k, d in site.events if k == "deie_link"] == [True, False]
        assert dict(site.events)["deie_link_loss"]["action"] == "hold"


async def test_link_loss_applies_the_default_limit_until_the_next_order():
    async with running_link(link_loss_timeout_s=0.3, on_link_loss="default_limit", default_limit_kw=10.0) as site:
        async with operator_for(site) as operator:
            assert await operator.send_limit_kw(30.0) is Confirmation.POSITIVE
            assert await operator.send_disconnect() is Confirmation.POSITIVE
            await wait_until(lambda: site.link.link_up, what="link up")
        lost_at = time.monotonic()
        await wait_until(lambda: site.link.orders.source == "link_loss_default", timeout_s=3, what="default")
        assert time.monotonic() - lost_at >= 0.25
        assert site.applied[-1] == GridOrders(export_limit_kw=10.0, disconnected=True, source="link_loss_default")

        async with operator_for(site) as operator:  # back: the default stays until the operator's next order
            await operator.wait_measurement("link_loss_default", lambda v: v is True)
            await operator.wait_measurement("p_limit_in_force", lambda v: v == 10.0)
            assert site.link.orders.export_limit_kw == 10.0
            assert await operator.send_limit_kw(45.0) is Confirmation.POSITIVE
            await wait_until(lambda: site.link.orders.export_limit_kw == 45.0, what="operator's new limit")
            await operator.wait_measurement("link_loss_default", lambda v: v is False)
            assert site.link.orders.disconnected  # reconnection needs its own order


# ------------------------------------------------------------------ client role


async def test_client_role_reads_orders_and_reconnects_with_backoff():
    port = free_port()
    async with running_link(role="client", port=port, command_timeout_s=0.3) as site:
        await asyncio.sleep(0.5)  # DEIE not there yet: the link backs off and retries
        assert not site.link.link_up

        deie = c104.Server(ip="127.0.0.1", port=port, tick_rate_ms=50)
        station = deie.add_station(common_address=1)
        limit = station.add_point(io_address=5001, type=c104.Type.M_ME_NC_1)
        limit.value = 70.0
        coupling = station.add_point(io_address=5005, type=c104.Type.M_DP_NA_1)
        coupling.value = c104.Double.OFF
        await asyncio.to_thread(deie.start)
        try:
            await wait_until(lambda: site.link.orders.export_limit_kw == 70.0, timeout_s=5, what="GI order")
            await wait_until(lambda: site.link.link_up, what="link up")  # polled every 50 ms
            coupling.value = c104.Double.ON
            await asyncio.to_thread(coupling.transmit, cause=c104.Cot.SPONTANEOUS)
            await wait_until(lambda: site.link.orders.disconnected, what="monitored disconnection")
            limit.value = -1.0
            await asyncio.to_thread(limit.transmit, cause=c104.Cot.SPONTANEOUS)
            await wait_until(lambda: "grid_order_rejected" in site.kinds(), what="rejection of -1 kW")
            assert site.link.orders.export_limit_kw == 70.0
        finally:
            await asyncio.to_thread(deie.stop)
        await wait_until(lambda: not site.link.link_up, what="link down")


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("settings, message", [
    ({"on_link_loss": "default_limit"}, "default_limit_kw"),
    ({"points": {"p_limt": {"ioa": 1, "type": "C_SE_NC_1"}}}, "unknown signal"),
    ({"points": {"p_limit": {"ioa": 6001, "type": "C_SE_NC_1"}}}, "share IOA 6001"),
    ({"points": {"p_limit": {"ioa": 7000, "type": "M_ME_NC_1"}}}, "cannot carry"),
    ({"template": "missing"}, "cannot read"),
    ({"role": "client"}, "needs host"),
    ({"installed_kw": float("nan")}, "finite"),
])
def test_config_errors_name_the_problem(settings, message):
    with pytest.raises(ValueError, match=message):
        DeieConfig(**{"installed_kw": 100.0, **settings})


def test_point_override_replaces_one_signal():
    cfg = DeieConfig(installed_kw=100.0, points={"p_limit": {"ioa": 42, "type": "C_SE_TC_1", "scale": 0.1}})
    points = cfg.point_map()
    assert points["p_limit"] == DeiePoint(ioa=42, type="C_SE_TC_1", scale=0.1)
    assert points["disconnect"].ioa == 5005


# ------------------------------------------------------------------ simulator CLI


def test_script_parsing():
    assert parse_script("limit:50@5,disconnect@15,reconnect@25,limit:none@30")[0] == (5.0, "limit", ["50"])
    for bad, message in [("limit:50", "lacks '@"), ("jump@1", "bad command"), ("limit:1@x", "not a number")]:
        with pytest.raises(ValueError, match=message):
            parse_script(bad)


async def test_simulator_cli_runs_a_script_against_the_gateway():
    async with running_link() as site:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "simulators.deie", "--port", str(site.port), "--linger-s", "0.3",
            "--script", "limit:50@0,raw:5001:C_SE_NC_1:-1@0.05,disconnect@0.1,limit:none@0.15",
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 15)
        text = out.decode()
        assert process.returncode == 0, err.decode()
        assert "-> limit 50: positive" in text and "-> raw 5001 C_SE_NC_1 -1: negative" in text
        assert "-> disconnect : positive" in text and "-> limit none: positive" in text
        assert site.link.orders == GridOrders(export_limit_kw=None, disconnected=True, source="deie")


# ------------------------------------------------------------------ wire


def _tshark_fields(pcap: Path, port: int) -> list[dict[str, str]]:
    fields = ["iec60870_asdu.typeid", "iec60870_asdu.causetx", "iec60870_asdu.nega",
              "iec60870_asdu.ioa", "iec60870_asdu.float", "iec60870_asdu.dco.on"]
    cmd = ["tshark", "-r", str(pcap), "-d", f"tcp.port=={port},iec60870_104", "-Y", "iec60870_asdu",
           "-T", "fields", "-E", "separator=|", "-E", "occurrence=f"] + [a for f in fields for a in ("-e", f)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout
    return [dict(zip(["type", "cot", "neg", "ioa", "float", "dco"], line.split("|"))) for line in out.splitlines()]


async def test_frames_on_the_wire_decoded_by_tshark(tmp_path):
    if not shutil.which("dumpcap") or not shutil.which("tshark"):
        pytest.skip("tshark/dumpcap not installed (apt-get install -y tshark)")
    port = free_port()
    pcap = tmp_path / "deie.pcapng"
    capture = await asyncio.create_subprocess_exec(
        "dumpcap", "-q", "-i", "lo", "-f", f"tcp port {port}", "-w", str(pcap),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await wait_until(lambda: pcap.exists() or capture.returncode is not None, timeout_s=5, what="dumpcap")
        if capture.returncode is not None:
            pytest.skip(f"cannot capture on lo here: {(await capture.stderr.read()).decode().strip()}")
        await asyncio.sleep(0.3)  # the capture filter is live once the file exists, give it a moment
        async with running_link(port=port) as site, operator_for(site) as operator:
            site.link.report(12.5, 0.0, 230.0)
            await operator.wait_measurement("p_measured", lambda v: v == 12.5)
            assert await operator.send_limit_kw(50.0) is Confirmation.POSITIVE
            assert await operator.send_limit_kw(-5.0) is Confirmation.NEGATIVE
            assert await operator.send_disconnect() is Confirmation.POSITIVE
            await operator.wait_measurement("disconnect_applied", lambda v: v is True)
        await asyncio.sleep(0.3)
    finally:
        if capture.returncode is None:
            capture.terminate()
        await asyncio.wait_for(capture.wait(), 5)
    frames = await asyncio.to_thread(_tshark_fields, pcap, port)

    def find(**want):
        return [f for f in frames if all(f[k] == v for k, v in want.items())]

    # C_SE_NC_1 (50) activation (6), IOA 5001, 50.0, and its positive ACT_CON (7)
    assert find(type="50", cot="6", ioa="5001", float="50"), frames
    assert find(type="50", cot="7", ioa="5001", neg="0", float="50")
    # the -5 kW order: negative ACT_CON (P/N bit set)
    assert find(type="50", cot="7", ioa="5001", neg="1", float="-5")
    # C_DC_NA_1 (46) disconnection: DCS 2 = ON, confirmed
    assert find(type="46", cot="6", ioa="5005", dco="2") and find(type="46", cot="7", ioa="5005", neg="0")
    # reports: P as M_ME_NC_1 (13), order state as M_SP_NA_1 (1), spontaneous (3)
    assert find(type="13", ioa="6001", float="12.5")
    assert find(type="1", cot="3", ioa="6106")
