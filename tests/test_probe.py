"""`flexedge probe`: the real command, run as the field engineer runs it, against the bundled simulators."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from drivers.iec104.config import load_template
from drivers.sunspec.probe import MAX_UNIT_ID, parse_unit_range
from edge.cli import main as flexedge
from simulators.bess import BessSimulator, BessSpec
from simulators.ocpp import OcppSimulator, StationSpec
from simulators.sunspec import DeviceSpec
from tests.conftest import free_port
from tests.test_sunspec_driver import pty_pair, simulated  # noqa: F401  (pty_pair: a fixture)

ROOT = Path(__file__).resolve().parent.parent


async def probe(*args: str, timeout_s: float = 20.0) -> tuple[int, str, str]:
    """``flexedge probe ARGS`` in its own process: (exit status, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge.cli", "probe", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    return process.returncode, out.decode(), err.decode()


def fragment_of(out: str) -> str:
    marker = "# profile fragment (checked: it loads into a profile)\n"
    assert marker in out, out
    return out.split(marker, 1)[1]


def check_profile(tmp_path: Path, fragment: str) -> int:
    """``flexedge check`` on the fragment with the smallest site around it."""
    path = tmp_path / "site.yaml"
    path.write_text("site:\n  id: probe-test\n" + fragment)
    return flexedge(["check", str(path)])


# ------------------------------------------------------------------ SunSpec


async def test_sunspec_over_tcp_prints_identity_models_control_ratings_and_values(tmp_path):
    async with simulated(DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=8.0, unit_id=4,
                                  serial_number="INV-0042")) as sim:
        port = sim.devices[0].port
        status, out, err = await probe("sunspec", f"127.0.0.1:{port}", "--unit", "4", "--fragment")
    assert status == 0, err
    assert f"tcp 127.0.0.1:{port} unit 4, SunSpec map at 40000, 6 models" in out
    assert "identity  manufacturer flexedge, model sim-pv, serial INV-0042, version 1.0.0" in out
    for model_id, name in ((1, "common"), (103, "inverter_three_phase"), (123, "controls"), (704, "DERCtlAC")):
        assert any(line.split()[:2] == [str(model_id), name] for line in out.splitlines()), out
    assert "active power    704-limit" in out and "reactive power  704-var" in out
    assert "rated_kw 10 kW (SunSpec 120 WRtg)" in out
    assert "P 8.000 kW" in out and "U 230.0 V" in out and "f 50.00 Hz" in out
    fragment = fragment_of(out)
    assert yaml.safe_load(fragment)["assets"][0] == {
        "id": "pv-4", "kind": "pv", "driver": "sunspec", "host": "127.0.0.1", "port": port, "unit_id": 4,
        "base_address": 40000}
    assert check_profile(tmp_path, fragment) == 0


async def test_sunspec_over_a_serial_line(pty_pair, tmp_path):  # noqa: F811
    device_end, probe_end = pty_pair
    async with simulated(DeviceSpec(kind="storage", rated_kw=5.0, serial_port=device_end, baudrate=115200, unit_id=3,
                                  base_address=0)):
        status, out, err = await probe("sunspec", probe_end, "--baudrate", "115200", "--unit", "3", "--fragment")
    assert status == 0, err
    assert f"rtu {probe_end} 115200 8N1 unit 3, SunSpec map at 0" in out
    assert "kind bess (from the models" in out and "active power    704-set" in out
    assert "SoC 50.0 %" in out
    fragment = fragment_of(out)
    assert yaml.safe_load(fragment)["assets"][0]["serial"] == {
        "port": probe_end, "baudrate": 115200, "parity": "N", "bytesize": 8, "stopbits": 1}
    assert check_profile(tmp_path, fragment) == 0


async def test_a_unit_scan_finds_exactly_the_units_present():
    port = free_port()
    async with simulated(DeviceSpec(kind="pv", port=port, unit_id=2), DeviceSpec(kind="meter", port=port, unit_id=5)):
        status, out, err = await probe("sunspec", f"127.0.0.1:{port}", "--scan", "1-7", "--timeout-s", "0.3")
    assert status == 0, err
    found = [line.split()[1] for line in out.splitlines() if line.startswith("unit ")]
    assert found == ["2", "5"], out
    assert "found 2 SunSpec devices among unit ids 1-7 (5 without answer, 0 not SunSpec)" in out


async def test_a_refused_port_is_one_clear_line():
    status, out, err = await probe("sunspec", f"127.0.0.1:{free_port()}", "--timeout-s", "0.5")
    assert status == 1 and out == ""
    assert err.strip().endswith("connection refused (nothing listens on port " + err.split(":")[1].split()[0] + ")")
    assert len(err.strip().splitlines()) == 1


async def test_a_silent_device_is_one_clear_line():
    async def accept_and_say_nothing(reader, writer):
        await reader.read()  # holds the connection open, never answers

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        status, out, err = await probe("sunspec", f"127.0.0.1:{port}", "--unit", "3", "--timeout-s", "0.3")
    finally:
        server.close()
    assert status == 1 and out == ""
    assert err.strip() == f"no answer from tcp:127.0.0.1:{port} unit 3 within 0.3 s"


async def test_a_unit_without_sunspec_map_is_named():
    async with simulated(DeviceSpec(kind="pv", base_address=50000)) as sim:
        status, _, err = await probe("sunspec", f"127.0.0.1:{sim.devices[0].port}", "--base-address", "40000",
                                     "--timeout-s", "0.5")
    assert status == 1
    assert err.strip() == f"127.0.0.1:{sim.devices[0].port} unit 1 answered but has no SunSpec marker at 40000"


def test_bad_arguments_exit_2(capsys):
    assert flexedge(["probe", "sunspec", "127.0.0.1:70000"]) == 2
    assert flexedge(["probe", "sunspec", "h", "--scan", "0-300"]) == 2
    assert flexedge(["probe", "modbus", "h"]) == 2
    err = capsys.readouterr().err
    assert "port 70000 in '127.0.0.1:70000' is outside 1..65535" in err
    assert "unknown protocol 'modbus' (one of: sunspec, iec104, ocpp)" in err


@given(st.integers(1, MAX_UNIT_ID), st.integers(0, MAX_UNIT_ID))
def test_unit_ranges_are_bounded(first, span):
    last = first + span
    if last <= MAX_UNIT_ID:
        assert list(parse_unit_range(f"{first}-{last}")) == list(range(first, last + 1))
    else:
        with pytest.raises(Exception, match="unit ids go from 1 to 247"):
            parse_unit_range(f"{first}-{last}")


# ------------------------------------------------------------------ IEC 104


async def test_iec104_interrogation_rows_match_the_template(tmp_path):
    async with BessSimulator([BessSpec(common_address=3, soc_pct=40)]) as sim:
        unit = sim.units[0]
        status, out, err = await probe("iec104", f"127.0.0.1:{unit.port}", "--ca", "3", "--timeout-s", "3",
                                       "--fragment")
    assert status == 0, err
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["3"]]
    expected = sorted((spec.ioa, spec.type) for spec in load_template("bess-generic").values()
                      if spec.type.startswith("M_"))
    assert [(int(row[1]), row[2]) for row in rows] == expected
    assert ["3", "2002", "M_ME_NC_1", "40", "good"] in rows
    assert "template  bess-generic matches: 8 of 8 monitored points" in out
    assert "p_setpoint IOA 1000 C_SE_NC_1" in out
    assert check_profile(tmp_path, fragment_of(out)) == 0


async def test_iec104_wrong_common_address_is_one_clear_line():
    async with BessSimulator([BessSpec(common_address=1)]) as sim:
        status, out, err = await probe("iec104", f"127.0.0.1:{sim.units[0].port}", "--ca", "9", "--timeout-s", "2")
    assert status == 1 and out == ""
    assert err.strip().startswith(f"127.0.0.1:{sim.units[0].port} refused the interrogation of CA 9")


# ------------------------------------------------------------------ OCPP


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
async def test_ocpp_charger_is_probed(version, tmp_path):
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge.cli", "probe", "ocpp", "--host", "127.0.0.1", "--port", str(port),
        "--timeout-s", "15", "--fragment", cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    first = await asyncio.wait_for(process.stdout.readline(), 10)
    assert first.decode().startswith(f"listening on ws://127.0.0.1:{port}/ocpp/<charge point id>")
    async with OcppSimulator(f"ws://127.0.0.1:{port}/ocpp", [StationSpec("CP-7", ocpp_version=version)]):
        rest, err = await asyncio.wait_for(process.communicate(), 15)
    out = rest.decode()
    assert process.returncode == 0, err.decode()
    assert f"charger   CP-7 from 127.0.0.1:" in out and f"OCPP {version}" in out
    if version == "1.6":
        assert "boot      chargePointModel SimAC, chargePointVendor flexedge; answered Accepted" in out
        assert "config    GetConfiguration: NotImplementedError" in out  # the simulator has no configuration
        assert "status    connector 1: Available" in out
    else:
        assert "boot      model SimAC, vendorName flexedge, reason PowerUp; answered Accepted" in out
        assert "EVSE[1].Power" in out and "maxLimit 22080" in out
        assert "status    evse 1 connector 1: Available" in out
    fragment = fragment_of(out)
    asset = yaml.safe_load(fragment)["assets"][0]
    assert asset["charge_point_id"] == "CP-7" and asset["ocpp_version"] == version
    assert asset.get("max_power_kw") == (22.08 if version == "2.0.1" else None)
    assert check_profile(tmp_path, fragment) == 0


async def test_ocpp_without_charger_ends_at_its_timeout():
    status, out, err = await probe("ocpp", "--host", "127.0.0.1", "--port", str(free_port()), "--timeout-s", "1")
    assert status == 1 and out.startswith("listening on")
    assert err.strip().endswith("within 1 s")


async def test_ctrl_c_exits_130_without_a_traceback():
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge.cli", "probe", "ocpp", "--host", "127.0.0.1", "--port", str(free_port()),
        "--timeout-s", "30", cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    await asyncio.wait_for(process.stdout.readline(), 10)  # listening
    process.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 130
    assert err.decode().strip() == "interrupted"
