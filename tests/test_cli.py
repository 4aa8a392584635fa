"""The commands a person types: `flexedge demo` (the README's main job) and `flexedge run`'s logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


DEMO_ASSETS = ["pv-roof", "pv-carport", "bess-1", "bess-2", "boiler-1", "cp16-1", "cp16-2", "cp201-1", "cp201-2",
               "cp21-v2x", "meter-poc"]
CHARGERS = [asset for asset in DEMO_ASSETS if asset.startswith("cp") and not asset.endswith("v2x")]  # one-way


def _cell(header: str, line: str, asset: str) -> str:
    """An asset's value on a screen line: the cells are right-aligned under the asset's name,
    so a cell runs from the end of the column before to the end of the name."""
    start = header.index(f" {asset}")
    end = start + 1 + len(asset)
    return line[len(header[:start].rstrip()):end].strip()


@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
def test_demo_runs_the_site_and_shows_every_cycle(broker, tmp_path):
    # The grid operator's limit comes and goes before the VPP's first step (at 10 s): a short run shows both.
    result = subprocess.run(
        [sys.executable, "-m", "edge.cli", "demo", "--duration-s", "12", "--broker", broker, "--workdir", str(tmp_path),
         "--deie-script", "limit:5@3,limit:none@8"],
        capture_output=True, text=True, timeout=90, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "flexedge demo: site demo-site" in out and ("Mosquitto" if broker == "mosquitto" else "embedded broker") in out
    header = next(line for line in out.splitlines() if line.startswith("time "))
    assert "DEIE" in header and all(f" {asset}" in header for asset in DEMO_ASSETS), header
    lines = [line for line in out.splitlines() if line[:2].isdigit() and line[2] == ":"]
    assert len(lines) >= 5, out  # one line per 2 s cycle
    assert ">> the VPP starts" in out, out  # once every asset answers: none goes offline after
    assert not any("offline" in line for line in out.split(">> the VPP starts")[1].splitlines() if line in lines), out
    last = lines[-1]
    assert all(float(_cell(header, last, charger)) < 0 for charger in CHARGERS), out  # the EVs charge
    assert _cell(header, last, "bess-2").endswith("%"), out  # an IEC 104 battery, with its state of charge
    float(_cell(header, last, "cp21-v2x"))  # the bidirectional EV: charging or discharging, online
    float(_cell(header, last, "boiler-1"))

    assert "grid operator (DEIE) limits export to 5 kW: positive confirmation" in out
    assert "grid operator (DEIE) lifts the limit: positive confirmation" in out
    in_force = [line for line in lines if line.split()[6] == "5.0"]  # the DEIE column
    assert in_force and "<< DEIE: export limit 5 kW" in in_force[0], out
    assert any(float(line.split()[3]) <= 5.05 for line in in_force), out  # the site came down to the limit
    assert any("<< DEIE: limit lifted" in line for line in lines), out
    assert "acks" in out and "0 rejected" in out  # the VPP's closing report
    assert (tmp_path / "spool.sqlite").exists() and (tmp_path / "ocpp-id-salt").exists()


def test_run_logs_json_lines_on_request(tmp_path):
    profile = tmp_path / "site.yaml"
    profile.write_text(
        "site: {id: json-log}\n"
        f"uplink: {{mqtt: {{port: {free_port()}}}, spool: {{path: {tmp_path / 'spool.sqlite'}}}}}\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", str(profile), "--log-format", "json"],
                            stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0, stderr
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert any("flexedge 0.1.0: site json-log" in r["msg"] for r in records)
    assert any(r["msg"] == "stopped" for r in records)


def test_invalid_profile_stops_run_before_anything_starts(tmp_path):
    profile = tmp_path / "site.yaml"
    profile.write_text("site: {id: x}\ncontrol: {cycle_s: 0}\n")
    result = subprocess.run([sys.executable, "-m", "edge.cli", "run", str(profile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "site.yaml:2 control.cycle_s: must be 0.2..60, got 0" in result.stderr


@pytest.mark.parametrize("name", ["sunspec", "vpp", "broker", "bess", "p2h", "ocpp"])
def test_every_simulator_has_a_help(name):
    result = subprocess.run([sys.executable, "-m", f"simulators.{name}", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0 and "usage" in result.stdout.lower()
