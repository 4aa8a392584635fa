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


@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
def test_demo_runs_the_site_and_shows_every_cycle(broker, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "edge.cli", "demo", "--duration-s", "14", "--broker", broker, "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=90, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "flexedge demo: site demo-site" in out and ("Mosquitto" if broker == "mosquitto" else "embedded broker") in out
    assert "pv-roof" in out and "bess-1" in out and "meter-poc" in out
    lines = [line for line in out.splitlines() if line[:2].isdigit() and line[2] == ":"]
    assert len(lines) >= 5, out  # one line per 2 s cycle
    assert not any("offline" in line for line in lines[1:]), out
    assert "acks" in out and "0 rejected" in out  # the VPP's closing report
    assert (tmp_path / "spool.sqlite").exists()


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
