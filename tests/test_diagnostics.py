"""`flexedge diagnostics`: one archive with every part, no secret in any byte of it, nothing disturbed.

A real spool written by edge.uplink.spool.Spool (one left open, as a running daemon holds
it), real secret files, a broken profile, the real CLI in a subprocess, and a real gateway
serving its local endpoint (SunSpec simulator, Mosquitto).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml
from hypothesis import given, settings, strategies as st

from edge.cli import main
from edge.commission.redact import MIN_SCRUB_CHARS, REDACTED, Scrubber, redact_profile
from edge.control.order_store import StoredOrders, orders_path, save_orders
from edge.gridorders import GridOrders
from edge.uplink.spool import Spool, inspect_read_only
from tests.conftest import free_port

MQTT_PASSWORD = "Mqtt-S3cret-pw!"
CHARGER_PASSWORD = "charger-pw-7781"
CHARGER_ENV_PASSWORD = "env-charger-pw-5512"
HTTP_PASSWORD = "http-pw-0451"
ID_TAGS = ["RFID-0042-ALPHA", "RFID-0099-BRAVO"]
SALT = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
PRIVATE_KEY_BODY = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"
SECRETS = [MQTT_PASSWORD, CHARGER_PASSWORD, CHARGER_ENV_PASSWORD, HTTP_PASSWORD, SALT, PRIVATE_KEY_BODY, *ID_TAGS]

PARTS = ["profile.yaml", "check.txt", "templates.json", "versions.json", "daemon/health.json", "daemon/state.json",
         "daemon/metrics.txt", "spool.json"]


def site_files(tmp_path: Path, http_port: int) -> Path:
    (tmp_path / "mqtt-password").write_text(MQTT_PASSWORD + "\n")
    (tmp_path / "charger-password").write_text(CHARGER_PASSWORD + "\n")
    (tmp_path / "ocpp-id-salt").write_text(SALT + "\n")
    (tmp_path / "http-users").write_text(f"support:{HTTP_PASSWORD}\n")
    profile = tmp_path / "site.yaml"
    profile.write_text(f"""\
# a site with every kind of secret
site:
  id: diag-site
uplink:
  mqtt:
    host: 127.0.0.1
    port: {free_port()}
    username: gw
    password_file: {tmp_path}/mqtt-password   # the broker's password
  spool:
    path: {tmp_path}/spool/spool.sqlite
    max_mb: 4
local_http:
  port: {http_port}
  basic_auth_file: {tmp_path}/http-users
ocpp:
  port: {free_port()}
  id_tag_salt_file: {tmp_path}/ocpp-id-salt
  authorize:
    mode: local_list
    id_tags:
      - {ID_TAGS[0]}
      - "{ID_TAGS[1]}"   # the manager's card
assets:
  - id: ev1
    kind: ev_charger
    driver: ocpp
    charge_point_id: CP-1
    password_file: {tmp_path}/charger-password
  - id: ev2
    kind: ev_charger
    driver: ocpp
    charge_point_id: CP-2
    password_env: FLEXEDGE_TEST_CHARGER_PW
""")
    return profile


def write_spool(path: Path, messages: int) -> Spool:
    spool = Spool(path, 4 << 20)
    for index in range(messages):
        spool.append("flexedge/diag-site/telemetry", {"ts": time.time(), "p_kw": index}, seq_stream="telemetry")
    spool.append("flexedge/diag-site/events", {"type": "started"}, seq_stream="events")
    return spool


def log_with_secrets(path: Path) -> Path:
    path.write_text(
        "2024-06-01T12:00:00Z info flexedge.uplink: connected\n"
        f"2024-06-01T12:00:01Z debug broker said password={MQTT_PASSWORD}\n"
        f'2024-06-01T12:00:02Z info ocpp: Authorize {{"idTag": "{ID_TAGS[0]}"}} and {ID_TAGS[1]}\n'
        f"2024-06-01T12:00:03Z debug Authorization: Basic c3VwcG9ydDpodHRwLXB3LTA0NTE= for {HTTP_PASSWORD}\n"
        f"-----BEGIN PRIVATE KEY-----\n{PRIVATE_KEY_BODY}\n-----END PRIVATE KEY-----\n"
        f"salt {SALT}; charger {CHARGER_PASSWORD} / {CHARGER_ENV_PASSWORD}\n")
    return path


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        folder = names[0].split("/")[0]
        assert all(name.startswith(folder + "/") for name in names), names
        return {member.name[len(folder) + 1:]: tar.extractfile(member).read() for member in tar.getmembers()}


def assert_no_secret(archive: Path, printed: str = "") -> None:
    raw = gzip.decompress(archive.read_bytes())  # every byte of the tar, headers included
    for secret in SECRETS:
        assert secret.encode() not in raw, f"{secret!r} is in the archive"
        assert secret not in printed, f"{secret!r} was printed"


def file_state(folder: Path) -> dict[str, tuple[int, str] | None]:
    """Every file's mtime and bytes; only the presence of SQLite's shared-memory index, which every
    reader writes its read marks into (the daemon expects readers)."""
    return {path.name: None if path.name.endswith("-shm") else (path.stat().st_mtime_ns,
                                                               hashlib.sha256(path.read_bytes()).hexdigest())
            for path in sorted(folder.iterdir())}


def test_archive_has_every_part_no_secret_and_the_spool_untouched(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLEXEDGE_TEST_CHARGER_PW", CHARGER_ENV_PASSWORD)
    http_port = free_port()  # nothing listens there: the daemon is down
    profile = site_files(tmp_path, http_port)
    spool_path = tmp_path / "spool" / "spool.sqlite"
    spool = write_spool(spool_path, 25)  # left open, as a running daemon holds it: a WAL beside it
    save_orders(orders_path(spool_path), StoredOrders(GridOrders(export_limit_kw=6.0, source="deie"), time.time()))
    log = log_with_secrets(tmp_path / "site.log")
    before = file_state(spool_path.parent)
    archive = tmp_path / "out.tar.gz"
    try:
        status = main(["diagnostics", str(profile), "--output", str(archive), "--no-journal", "--log-file", str(log)])
        assert file_state(spool_path.parent) == before  # not a byte, not an mtime
        assert spool.stats().pending == 26  # and the daemon's connection goes on
    finally:
        spool.close()
    printed = capsys.readouterr().out
    assert status == 0
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert_no_secret(archive, printed)

    found = members(archive)
    manifest = json.loads(found["MANIFEST.json"])
    listed = {part["name"]: part for part in manifest["parts"]}
    assert set(PARTS) | {"logs/site.log"} <= set(listed)
    for name, part in listed.items():
        assert part["status"] in ("ok", "truncated", "missing"), part
        assert name in printed
        if part["status"] != "missing":
            assert hashlib.sha256(found[name]).hexdigest() == part["sha256"]
            assert len(found[name]) == part["size"]
    assert manifest["profile_sha256"] == hashlib.sha256(profile.read_bytes()).hexdigest()
    unreachable = f"daemon not reachable at 127.0.0.1:{http_port}: connection refused"
    for name in ("daemon/health.json", "daemon/state.json", "daemon/metrics.txt"):
        assert listed[name]["status"] == "missing" and listed[name]["error"] == unreachable
    assert unreachable in printed

    # the profile: secrets gone, comments and lines kept
    redacted = found["profile.yaml"].decode()
    assert len(redacted.splitlines()) == len(profile.read_text().splitlines())
    assert "# the broker's password" in redacted and "# the manager's card" in redacted
    assert yaml.safe_load(redacted)["ocpp"]["authorize"]["id_tags"] == [REDACTED, REDACTED]
    assert f"password_file: {tmp_path}/mqtt-password" in redacted  # where the secret is, for support
    assert "exit status: 0" in found["check.txt"].decode()

    spool_report = json.loads(found["spool.json"])
    stats = spool_report["spool"]
    assert stats["waiting_total"] == 26 and stats["last_seq"] == {"telemetry": 25, "events": 1}
    assert {row["topic"]: row["messages"] for row in stats["waiting_by_topic"]} == {
        "flexedge/diag-site/telemetry": 25, "flexedge/diag-site/events": 1}
    assert stats["quick_check"] == ["ok"] and stats["opened"] == "mode=ro"
    assert spool_report["grid_orders"]["export_limit_kw"] == 6.0

    log_text = found["logs/site.log"].decode()
    assert "connected" in log_text and log_text.count(REDACTED) >= 6
    versions = json.loads(found["versions.json"])
    assert versions["distributions"]["pydantic"] and versions["platform"]["machine"]


def test_a_stopped_daemons_spool_is_read_without_creating_a_file(tmp_path, capsys):
    profile = site_files(tmp_path, free_port())
    spool_path = tmp_path / "spool" / "spool.sqlite"
    write_spool(spool_path, 3).close()  # a clean stop: no WAL, and the spool's reading may not make one
    before = file_state(spool_path.parent)
    assert inspect_read_only(spool_path)["waiting_total"] == 4
    assert file_state(spool_path.parent) == before
    archive = tmp_path / "out.tar.gz"
    assert main(["diagnostics", str(profile), "-o", str(archive), "--no-journal"]) == 0
    # The database itself is untouched.  (`flexedge check`, run inside, opens the spool mode=ro,
    # which leaves an empty -wal and a -shm beside a stopped daemon's spool: edge/config/preflight.py.)
    assert file_state(spool_path.parent)["spool.sqlite"] == before["spool.sqlite"]
    stats = json.loads(members(archive)["spool.json"])["spool"]
    assert stats["waiting_total"] == 4 and stats["opened"] == "immutable=1"
    manifest = json.loads(members(archive)["MANIFEST.json"])
    logs = next(part for part in manifest["parts"] if part["name"] == "logs")
    assert logs["status"] == "missing" and "--no-journal" in logs["error"] and "--log-file" in logs["error"]


def test_a_broken_profile_still_yields_an_archive_via_the_real_cli(tmp_path):
    (tmp_path / "mqtt-password").write_text(MQTT_PASSWORD + "\n")
    profile = tmp_path / "site.yaml"
    profile.write_text(f"""\
site:
  id: broken-site
uplink:
  mqtt:
    password_file: {tmp_path}/mqtt-password
ocpp:
  authorize:
    id_tags:
      - {ID_TAGS[0]}
      - {ID_TAGS[1]}   # a comment
  token: {SALT}
assets: [ {{ id: x
""")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "edge.cli", "diagnostics", str(profile), "--timeout-s", "30"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 30
    written = list(tmp_path.glob("flexedge-diagnostics-broken-site-*.tar.gz"))
    assert len(written) == 1 and re.fullmatch(r"flexedge-diagnostics-broken-site-\d{8}T\d{6}Z\.tar\.gz", written[0].name)
    assert f"wrote {written[0].name}" in done.stdout and "the profile is not valid" in done.stdout
    assert_no_secret(written[0], done.stdout + done.stderr)
    found = members(written[0])
    redacted = found["profile.yaml"].decode()
    assert len(redacted.splitlines()) == len(profile.read_text().splitlines())
    assert f'- "{REDACTED}"   # a comment' in redacted and f'token: "{REDACTED}"' in redacted
    assert f"{profile}:" in found["check.txt"].decode() and "exit status: 2" in found["check.txt"].decode()
    manifest = json.loads(found["MANIFEST.json"])
    assert manifest["profile_valid"] is False
    # the journal was asked (none on a CI machine, or this unit has no entries): said, not failed
    assert any(part["name"].startswith("logs") for part in manifest["parts"])


def test_an_unreadable_profile_and_an_unwritable_output(tmp_path, capsys):
    archive = tmp_path / "out.tar.gz"
    assert main(["diagnostics", str(tmp_path / "missing.yaml"), "-o", str(archive), "--no-journal"]) == 0
    manifest = json.loads(members(archive)["MANIFEST.json"])
    profile_part = manifest["parts"][0]
    assert profile_part["name"] == "profile.yaml" and profile_part["status"] == "missing"
    assert "no such file" in profile_part["error"]
    capsys.readouterr()
    assert main(["diagnostics", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "nowhere" / "out.tar.gz"),
                 "--no-journal"]) == 1
    assert "cannot write" in capsys.readouterr().err


# ---------------------------------------------------------------- the redaction rules


@settings(max_examples=60, deadline=None)
@given(tags=st.lists(st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cn", "Co")), min_size=1, max_size=36),
                     min_size=1,
                     max_size=4),
       flow=st.booleans())
def test_id_tags_are_redacted_whatever_they_hold(tags, flow):
    quoted = [json.dumps(tag, ensure_ascii=False) for tag in tags]
    listing = f" [{', '.join(quoted)}]\n" if flow else "\n" + "".join(f"      - {tag}  # card\n" for tag in quoted)
    text = f"site:\n  id: s\nocpp:\n  authorize:\n    id_tags:{listing}  port: 9000\n"
    redacted, how, removed = redact_profile(text)
    assert how == "yaml nodes"
    assert yaml.safe_load(redacted)["ocpp"] == {"authorize": {"id_tags": [REDACTED] * len(tags)}, "port": 9000}
    assert len(redacted.splitlines()) == len(text.splitlines())
    assert set(tags) <= removed  # and so scrubbed from the rest of the archive too


@settings(max_examples=60, deadline=None)
@given(secret=st.text(min_size=MIN_SCRUB_CHARS, max_size=40).filter(lambda s: s not in REDACTED and REDACTED not in s),
       before=st.text(max_size=20), after=st.text(max_size=20))
def test_a_known_secret_is_scrubbed_wherever_it_stands(secret, before, after):
    scrubber = Scrubber({secret})
    assert secret not in scrubber.text(before + secret + after)
    assert json.dumps(secret)[1:-1] not in scrubber.text(json.dumps({"x": before + secret + after}))


# ---------------------------------------------------------------- against a running gateway


async def test_a_running_gateway_is_asked_over_its_local_endpoint(tmp_path, mosquitto):
    from edge.config.profile import Profile
    from edge.runtime.daemon import Gateway
    from simulators.sunspec import DeviceSpec, SunSpecSimulator

    http_port = free_port()
    (tmp_path / "mqtt-password").write_text(MQTT_PASSWORD + "\n")
    (tmp_path / "http-users").write_text(f"support:{HTTP_PASSWORD}\n")
    async with SunSpecSimulator([DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=8.0)]) as sim:
        device = sim.devices[0]
        text = yaml.safe_dump({
            "site": {"id": "diag-live"},
            "control": {"cycle_s": 0.5},
            "uplink": {"mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "username": "gw",
                                "password_file": str(tmp_path / "mqtt-password")},
                       "spool": {"path": str(tmp_path / "spool.sqlite"), "max_mb": 4}},
            "local_http": {"port": http_port, "basic_auth_file": str(tmp_path / "http-users")},
            "assets": [{"id": "pv0", "kind": "pv", "driver": "sunspec", "host": "127.0.0.1", "port": device.port,
                        "unit_id": device.unit_id, "timeout_s": 0.3}],
        })
        profile_path = tmp_path / "site.yaml"
        profile_path.write_text(text)
        stop = asyncio.Event()
        gateway = asyncio.create_task(Gateway(Profile.model_validate(yaml.safe_load(text))).run(stop))
        try:
            await _until_served(http_port, 10)
            archive = tmp_path / "live.tar.gz"
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edge.cli", "diagnostics", str(profile_path), "-o", str(archive), "--no-journal",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(process.communicate(), 30)
        finally:
            stop.set()
            await asyncio.wait_for(gateway, 10)
    assert process.returncode == 0, err.decode()
    assert_no_secret(archive, out.decode())
    found = members(archive)
    listed = {part["name"]: part for part in json.loads(found["MANIFEST.json"])["parts"]}
    for name in ("daemon/health.json", "daemon/state.json", "daemon/metrics.txt"):
        assert listed[name]["status"] == "ok", listed[name]
    state = json.loads(found["daemon/state.json"])
    assert "pv0" in json.dumps(state)
    json.loads(found["daemon/health.json"])
    assert b"# TYPE" in found["daemon/metrics.txt"]


async def _until_served(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"the local endpoint did not listen on port {port} within {timeout_s} s")


def test_where_the_daemon_is_asked_and_with_which_credentials():
    from edge.commission.collect import endpoint_from

    anywhere = endpoint_from(None, {"host": "0.0.0.0", "port": 8750}, None)
    assert anywhere.base_url == "http://127.0.0.1:8750" and anywhere.credentials is None
    assert endpoint_from(None, {"host": "::", "port": 9}, None).base_url == "http://[::1]:9"
    plain = endpoint_from(None, {"port": 8750}, [("ops", "$sha256$ab$cd"), ("support", "pw-1")])
    assert plain.credentials == ("support", "pw-1")
    hashed = endpoint_from(None, {"port": 8750}, [("ops", "$sha256$ab$cd")])
    assert hashed.credentials is None and "--url http://USER:PASSWORD@127.0.0.1:8750" in hashed.auth_note
    given = endpoint_from("http://support:p%40ss@10.0.0.5:8750/", None, None)
    assert given.base_url == "http://10.0.0.5:8750" and given.credentials == ("support", "p@ss")
    assert "local_http is not enabled" in endpoint_from(None, None, None)
    assert "not an http" in endpoint_from("ftp://x", None, None)


def test_a_part_that_hangs_is_given_up_and_the_archive_written_in_time(tmp_path, capsys):
    profile = site_files(tmp_path, free_port())
    fifo = tmp_path / "daemon.log"
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: a stand-in for a hung mount
    archive = tmp_path / "out.tar.gz"
    started = time.monotonic()
    try:
        assert main(["diagnostics", str(profile), "-o", str(archive), "--no-journal", "--log-file", str(fifo),
                     "--timeout-s", "2"]) == 0
        assert time.monotonic() - started < 2.5
    finally:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # lets the abandoned reader thread finish
    logs = next(part for part in json.loads(members(archive)["MANIFEST.json"])["parts"] if part["name"] == "logs")
    assert re.search(r"logs/daemon.log: not gathered within 1\.\d s", logs["error"]), logs
    assert "profile.yaml" in members(archive)
