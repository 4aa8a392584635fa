"""Profiles: what a field engineer sees from `flexedge check`, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge.config.profile import Profile, ProfileError, load_profile

ROOT = Path(__file__).resolve().parent.parent


def check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", "check", str(path)], capture_output=True, text=True, timeout=60)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


GOOD = """\
site:
  id: test-site
uplink:
  mqtt:
    host: broker.example
assets:
  - id: pv1
    kind: pv
    driver: sunspec
    host: 127.0.0.1
"""


@pytest.mark.parametrize("profile", sorted((ROOT / "profiles").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_profile_passes_check(profile):
    result = check(profile)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_summary_names_site_assets_drivers_uplink(tmp_path):
    result = check(write(tmp_path, GOOD))
    assert result.returncode == 0, result.stderr
    assert "test-site" in result.stdout
    assert "pv1" in result.stdout and "sunspec" in result.stdout
    assert "broker.example:1883" in result.stdout


def test_every_problem_with_file_line_and_key_path(tmp_path):
    text = GOOD + """\
  - id: pv2
    kind: pv
    driver: sunspec
    host: 127.0.0.1
    port: 70000
  - id: bess1
    kind: bess
    driver: sunspec
    serial:
      port: /dev/ttyUSB0
      baudrate: 9601
    hots: 127.0.0.1
  - id: x
    kind: pv
    driver: modbusx
control:
  cycle_s: .nan
"""
    result = check(write(tmp_path, text))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0].endswith("5 problems")
    assert [int(l.split(":")[1].split()[0]) for l in lines[1:]] == [15, 21, 22, 25, 27]  # in file order
    assert "site.yaml:15 assets[1].port: must be 1..65535, got 70000" in result.stderr
    assert "site.yaml:21 assets[2].serial.baudrate:" in result.stderr
    assert "site.yaml:22 assets[2].hots: unknown key" in result.stderr
    assert "site.yaml:25 assets[3].driver: unknown driver 'modbusx'" in result.stderr
    assert "control.cycle_s: must be a finite number" in result.stderr


def test_duplicate_keys_are_errors_not_silently_overwritten(tmp_path):
    result = check(write(tmp_path, GOOD + "grid:\n  export_limit_kw: 10\n  export_limit_kw: 100\n"))
    assert result.returncode == 2
    assert "site.yaml:13 grid.export_limit_kw: duplicate key `export_limit_kw` (also at line 12)" in result.stderr


def test_cross_checks(tmp_path):
    text = GOOD + "  - id: pv1\n    kind: pv\n    driver: sunspec\n    host: 127.0.0.2\n"
    with pytest.raises(ProfileError, match="asset id 'pv1' is used twice"):
        load_profile(write(tmp_path, text))
    text = GOOD.replace("    host: 127.0.0.1\n", "    host: 127.0.0.1\n    serial: {port: /dev/ttyS0}\n")
    with pytest.raises(ProfileError, match=r"site.yaml:7 assets\[0\]: give exactly one of host"):
        load_profile(write(tmp_path, text))
    # a cross-check naming a key points at that key's line
    text = GOOD + "functions:\n  fcr:\n    capacity_kw: 10\n    frequency_source: nowhere\n"
    line = text.splitlines().index("    frequency_source: nowhere") + 1
    with pytest.raises(ProfileError, match=rf"site.yaml:{line} functions.fcr.frequency_source: no asset 'nowhere'"):
        load_profile(write(tmp_path, text))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "site.yaml:1 the file is empty"),
        ("site: [unclosed\n", "site.yaml:1 column 7: a '[' opened here is never closed"),
        ("- a\n- b\n", "a profile is a mapping"),
        ("site:\n  name: x\n", "site.yaml:1 site.id: required key is missing"),
        ("site:\n  id: 'has space'\n", "site.yaml:2 site.id: must be letters, digits"),
    ],
)
def test_malformed_files(tmp_path, text, expected):
    result = check(write(tmp_path, text))
    assert result.returncode == 2
    assert expected in result.stderr


def test_missing_file_is_reported(tmp_path):
    result = check(tmp_path / "nope.yaml")
    assert result.returncode == 2 and result.stderr == f"{tmp_path / 'nope.yaml'}: does not exist\n"


def test_schema_command_prints_json_schema():
    result = subprocess.run([sys.executable, "-m", "edge.cli", "schema"], capture_output=True, text=True, timeout=60)
    schema = json.loads(result.stdout)
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"site", "version", "control", "uplink", "grid", "ocpp", "functions",
                                           "ev_charging", "local_http", "assets"}
    assert schema["title"] == "flexedge site profile"


def test_password_is_read_from_env_and_file(tmp_path, monkeypatch):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    profile = Profile.model_validate({"site": {"id": "s"}, "uplink": {"mqtt": {"username": "u", "password_file": str(secret)}}})
    assert profile.uplink.mqtt.password() == "s3cret"
    monkeypatch.setenv("FLEXEDGE_PW", "from-env")
    profile = Profile.model_validate({"site": {"id": "s"}, "uplink": {"mqtt": {"username": "u", "password_env": "FLEXEDGE_PW"}}})
    assert profile.uplink.mqtt.password() == "from-env"
    assert "from-env" not in repr(profile)


def test_check_warns_about_what_is_missing_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.delenv("FLEXEDGE_TEST_UNSET", raising=False)
    text = GOOD.replace("uplink:\n  mqtt:\n    host: broker.example\n", (
        "uplink:\n  mqtt:\n    host: broker.example\n    password_env: FLEXEDGE_TEST_UNSET\n"
        f"    tls: {{ca_file: {tmp_path}/nope-ca.pem}}\n  spool: {{path: {tmp_path}/spool.sqlite}}\n"
    )) + "  - id: rtu1\n    kind: pv\n    driver: sunspec\n    serial: {port: /dev/ttyNOPE0}\n"
    result = check(write(tmp_path, text))
    assert result.returncode == 0, result.stderr  # warnings, not errors
    # each at the line of the key that names it
    assert f"warning: site.yaml:7 uplink.mqtt.tls.ca_file: CA file {tmp_path}/nope-ca.pem does not exist" in result.stderr
    assert "warning: site.yaml:6 uplink.mqtt.password_env: environment variable FLEXEDGE_TEST_UNSET is not set" in result.stderr
    assert "warning: site.yaml:17 assets[1].serial.port: /dev/ttyNOPE0 does not exist" in result.stderr
    assert "uplink.spool.path" not in result.stderr  # tmp_path exists
