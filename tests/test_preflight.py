"""Broken files and settings, through the real CLI: `check` lists every problem, `run` refuses to start
with one log record (one JSON line with --log-format json), and both name the path and the cause.

Running as root makes most "not writable" set-ups writable, so these use what even root
cannot write: a file where a folder should be, /sys, a read-only bind mount in a private
mount namespace (unshare), an immutable file (chattr +i).  Only where nothing of the kind
exists is a case skipped as root.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from edge.uplink.spool import Spool

ROOT = Path(__file__).resolve().parent.parent
EXIT_FILES_UNUSABLE = 3
AS_ROOT = os.geteuid() == 0


def cli(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def write_profile(tmp_path: Path, spool: Path | None = None, **mqtt) -> Path:
    profile = tmp_path / "site.yaml"
    document = {"site": {"id": "files"},
                "uplink": {"mqtt": {"port": free_port(), **mqtt}, "spool": {"path": str(spool or tmp_path / "spool.sqlite")}}}
    profile.write_text(json.dumps(document))  # JSON is YAML
    return profile


def assert_refused(profile: Path, *expected: str, prefix: tuple[str, ...] = ()) -> None:
    """`check` exits 3 listing each problem first; `run` exits 3 with one JSON record naming them all."""
    check = cli("check", str(profile), prefix=prefix)
    assert check.returncode == EXIT_FILES_UNUSABLE, check.stdout + check.stderr
    lines = check.stderr.splitlines()
    count = len(expected)
    assert lines[0] == f"{profile}: valid, but {count} problem{'s' if count != 1 else ''} on this machine", check.stderr
    # at the line of the key naming the path (a JSON profile is all on line 1)
    assert [line.strip() for line in lines[1:1 + count]] == [f"{profile.name}:1 {e}" for e in expected], check.stderr
    assert "OK" not in check.stdout.splitlines()[0] and "site     files" in check.stdout  # the summary still follows

    run = cli("run", str(profile), "--log-format", "json", prefix=prefix)
    assert run.returncode == EXIT_FILES_UNUSABLE, run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""
    records = [json.loads(line) for line in run.stderr.splitlines()]  # every line is JSON
    assert len(records) == 1, run.stderr
    [record] = records
    assert (record["level"], record["logger"]) == ("error", "flexedge.cli")
    assert record["msg"] == "cannot start: " + "; ".join(expected)


def assert_warned_by_check_refused_by_run(profile: Path, expected: str) -> None:
    """Missing altogether: `check` (often run off-site) warns and passes; `run` cannot do without it."""
    check = cli("check", str(profile))
    assert check.returncode == 0, check.stderr
    assert f"warning: {profile.name}:1 {expected}" in check.stderr.splitlines()
    run = cli("run", str(profile), "--log-format", "json")
    assert run.returncode == EXIT_FILES_UNUSABLE, run.stderr
    [record] = [json.loads(line) for line in run.stderr.splitlines()]
    assert record["msg"] == f"cannot start: {expected}"


# -------------------------------------------------------------------- spool


def test_spool_under_a_file_used_as_its_folder(tmp_path):
    (tmp_path / "state").write_text("a file, not a folder")
    spool = tmp_path / "state" / "spool.sqlite"
    assert_refused(write_profile(tmp_path, spool),
                   f"uplink.spool.path: spool {spool} cannot be created: {tmp_path / 'state'} is a file, not a folder")


def test_spool_two_levels_under_a_file(tmp_path):
    (tmp_path / "state").write_text("a file, not a folder")
    spool = tmp_path / "state" / "flexedge" / "spool.sqlite"
    assert_refused(write_profile(tmp_path, spool),
                   f"uplink.spool.path: spool {spool} cannot be created: {tmp_path / 'state'} is a file, not a folder")


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs sysfs at /sys")
def test_spool_in_a_folder_nobody_may_write_even_root(tmp_path):
    # sysfs refuses new files to everyone, root included (os.access says yes to root)
    spool = Path("/sys/kernel/spool.sqlite")
    check = cli("check", str(write_profile(tmp_path, spool)))
    cause = "permission denied" if "permission denied" in check.stderr else "operation not permitted"
    assert_refused(write_profile(tmp_path, spool),
                   f"uplink.spool.path: spool {spool} cannot be created: folder /sys/kernel does not accept new files: {cause}")


@pytest.mark.skipif(AS_ROOT, reason="root writes in a mode 0555 folder; the /sys and read-only mount cases cover root")
def test_spool_in_a_folder_without_write_permission(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o555)
    spool = folder / "spool.sqlite"
    assert_refused(write_profile(tmp_path, spool),
                   f"uplink.spool.path: spool {spool} cannot be created: folder {folder} does not accept new files: "
                   "permission denied")


def read_only_mount(folder: Path) -> tuple[str, ...]:
    """A command prefix that runs the rest in a private mount namespace where ``folder`` is read-only."""
    script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'
    flags = ("--mount",) if AS_ROOT else ("--mount", "--map-root-user")
    prefix = ("unshare", *flags, "sh", "-c", script, "sh", str(folder))
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private read-only mount here: {probe.stderr.strip()}")
    return prefix


def test_new_spool_on_a_read_only_file_system(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    spool = folder / "spool.sqlite"
    assert_refused(write_profile(tmp_path, spool),
                   f"uplink.spool.path: spool {spool} cannot be created: folder {folder} does not accept new files: "
                   "read-only file system", prefix=read_only_mount(folder))


def test_existing_spool_on_a_read_only_file_system(tmp_path):
    folder = tmp_path / "ro"
    spool = folder / "spool.sqlite"
    with Spool(spool, 1 << 20) as store:
        store.append("t", {"n": 1})
    assert_refused(write_profile(tmp_path, spool),
                   f"uplink.spool.path: spool {spool} cannot be opened for writing: read-only file system",
                   prefix=read_only_mount(folder))


def test_spool_path_is_a_folder(tmp_path):
    spool = tmp_path / "spool.sqlite"
    spool.mkdir()
    assert_refused(write_profile(tmp_path, spool), f"uplink.spool.path: spool {spool} is a folder, not a file")


def test_spool_is_not_a_database(tmp_path):
    spool = tmp_path / "spool.sqlite"
    spool.write_text("these are someone's notes, not a spool\n" * 50)
    assert_refused(write_profile(tmp_path, spool),
                   f"uplink.spool.path: spool {spool} is not an SQLite database (another kind of file, or damaged)")


def test_spool_is_a_damaged_database(tmp_path):
    spool = tmp_path / "spool.sqlite"
    with Spool(spool, 1 << 20) as store:
        for n in range(20):
            store.append("t", {"n": n, "pad": "x" * 400}, seq_stream="telemetry")
    data = bytearray(spool.read_bytes())
    data[100:4096] = b"\xa5" * 3996  # the header survives; the schema page behind it does not
    spool.write_bytes(data)
    assert_refused(write_profile(tmp_path, spool),
                   f"uplink.spool.path: spool {spool} is a damaged SQLite database (database disk image is malformed)")


def test_check_leaves_a_stopped_daemons_spool_folder_as_it_was(tmp_path):
    """No -wal/-shm files appear beside a spool nobody has open (they would belong to whoever ran check)."""
    spool = tmp_path / "spool.sqlite"
    with Spool(spool, 1 << 20) as store:
        store.append("t", {"n": 1}, seq_stream="telemetry")
    before = sorted(p.name for p in tmp_path.iterdir())
    content, mtime = spool.read_bytes(), spool.stat().st_mtime_ns
    check = cli("check", str(write_profile(tmp_path, spool)))
    assert check.returncode == 0, check.stdout + check.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["site.yaml"])
    assert spool.read_bytes() == content and spool.stat().st_mtime_ns == mtime


def test_spool_written_by_a_newer_flexedge(tmp_path):
    spool = tmp_path / "spool.sqlite"
    Spool(spool, 1 << 20).close()
    with sqlite3.connect(spool) as db:
        db.execute("PRAGMA user_version = 99")
    db.close()
    assert_refused(write_profile(tmp_path, spool),
                   f"uplink.spool.path: spool {spool} was written by a newer flexedge (schema 99; this one reads 1)")


def test_spool_file_that_may_not_be_written(tmp_path):
    spool = tmp_path / "spool.sqlite"
    Spool(spool, 1 << 20).close()
    if AS_ROOT:  # root ignores modes, not the immutable attribute
        locked = subprocess.run(["chattr", "+i", str(spool)], capture_output=True, text=True) if shutil.which("chattr") else None
        if locked is None or locked.returncode != 0:
            pytest.skip("as root, only an immutable file refuses writing, and chattr +i is not available here")
        cause = "operation not permitted"
    else:
        spool.chmod(0o444)
        cause = "permission denied"
    try:
        assert_refused(write_profile(tmp_path, spool), f"uplink.spool.path: spool {spool} cannot be opened for writing: {cause}")
    finally:
        if AS_ROOT:
            subprocess.run(["chattr", "-i", str(spool)], check=True)


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs sysfs at /sys")
def test_spool_folder_missing_and_not_creatable_warns_in_check_and_stops_run(tmp_path):
    spool = Path("/sys/flexedge-test/spool.sqlite")
    profile = write_profile(tmp_path, spool)
    check = cli("check", str(profile))
    cause = "operation not permitted" if "operation not permitted" in check.stderr else "permission denied"
    assert_warned_by_check_refused_by_run(
        profile, f"uplink.spool.path: spool {spool} cannot be created: folder /sys/flexedge-test does not exist and "
                 f"cannot be created in /sys: {cause}")


def test_spool_folder_to_be_created_is_fine_and_check_creates_nothing(tmp_path):
    profile = write_profile(tmp_path, tmp_path / "state" / "flexedge" / "spool.sqlite")
    check = cli("check", str(profile))
    assert check.returncode == 0 and check.stdout.startswith(f"{profile}: OK"), check.stderr
    assert "warning" not in check.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.yaml"]  # the probe left nothing behind


# ------------------------------------------------------------------- uplink


@pytest.mark.parametrize("content", ["", " \t\n\n"], ids=["empty", "whitespace"])
def test_empty_password_file(tmp_path, content):
    secret = tmp_path / "mqtt-password"
    secret.write_text(content)
    assert_refused(write_profile(tmp_path, username="gateway", password_file=str(secret)),
                   f"uplink.mqtt.password_file: password file {secret} is empty")


def test_password_file_with_a_blank_first_line(tmp_path):
    secret = tmp_path / "mqtt-password"
    secret.write_text("\ns3cret\n")
    assert_refused(write_profile(tmp_path, username="gateway", password_file=str(secret)),
                   f"uplink.mqtt.password_file: password file {secret} has a blank first line (the password is the first line)")


def test_password_file_is_a_folder_or_a_pipe(tmp_path):
    folder, pipe = tmp_path / "pw-folder", tmp_path / "pw-pipe"
    folder.mkdir()
    os.mkfifo(pipe)  # reading it would block the daemon: refused without opening
    assert_refused(write_profile(tmp_path, username="gateway", password_file=str(folder)),
                   f"uplink.mqtt.password_file: password file {folder} is a folder, not a file")
    assert_refused(write_profile(tmp_path, username="gateway", password_file=str(pipe)),
                   f"uplink.mqtt.password_file: password file {pipe} is not a regular file")


def test_missing_password_file_warns_in_check_and_stops_run(tmp_path):
    secret = tmp_path / "nope"
    assert_warned_by_check_refused_by_run(write_profile(tmp_path, username="gateway", password_file=str(secret)),
                                          f"uplink.mqtt.password_file: password file {secret} does not exist")


@pytest.mark.skipif(AS_ROOT, reason="root reads a mode 0000 file, and no attribute stops it reading")
def test_unreadable_password_file(tmp_path):
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    secret.chmod(0)
    assert_refused(write_profile(tmp_path, username="gateway", password_file=str(secret)),
                   f"uplink.mqtt.password_file: password file {secret} cannot be read: permission denied")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a client certificate and its key, an unrelated key, and the certificate in DER."""
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-new", *ec, "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=gateway")
    openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-out", "client.pem")
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", "other.key")
    openssl("x509", "-in", "client.pem", "-outform", "DER", "-out", "client.der")
    return d


def tls(pki: Path, **files: Path) -> dict:
    return {"tls": {"ca_file": str(files.get("ca", pki / "ca.pem")), "cert_file": str(files.get("cert", pki / "client.pem")),
                    "key_file": str(files.get("key", pki / "client.key"))}}


def test_good_tls_files_pass(tmp_path, pki):
    check = cli("check", str(write_profile(tmp_path, **tls(pki))))
    assert check.returncode == 0 and "warning" not in check.stderr, check.stderr


def test_tls_files_that_are_not_pem(tmp_path, pki):
    notes = tmp_path / "notes.txt"
    notes.write_text("remember to ask the VPP for the CA\n")
    assert_refused(write_profile(tmp_path, **tls(pki, ca=notes)),
                   f"uplink.mqtt.tls.ca_file: CA file {notes} is not a PEM certificate (no -----BEGIN CERTIFICATE----- line)")
    der = pki / "client.der"
    assert_refused(write_profile(tmp_path, **tls(pki, cert=der)),
                   f"uplink.mqtt.tls.cert_file: client certificate {der} is not a PEM certificate "
                   "(no -----BEGIN CERTIFICATE----- line)")
    swapped = pki / "client.pem"  # the certificate given as the key
    assert_refused(write_profile(tmp_path, **tls(pki, key=swapped)),
                   f"uplink.mqtt.tls.key_file: client key {swapped} is not a PEM private key "
                   "(it holds PEM, but no -----BEGIN PRIVATE KEY----- line)")


def test_tls_file_empty_or_a_folder(tmp_path, pki):
    empty, folder = tmp_path / "empty.key", tmp_path / "ca.d"
    empty.write_text("")
    folder.mkdir()
    assert_refused(write_profile(tmp_path, **tls(pki, ca=folder, key=empty)),
                   f"uplink.mqtt.tls.ca_file: CA file {folder} is a folder, not a file",
                   f"uplink.mqtt.tls.key_file: client key {empty} is empty")


def test_tls_key_that_does_not_match_the_certificate(tmp_path, pki):
    other = pki / "other.key"
    check = cli("check", str(write_profile(tmp_path, **tls(pki, key=other))))
    assert check.returncode == EXIT_FILES_UNUSABLE
    problem = check.stderr.splitlines()[1].strip().split(" ", 1)[1]  # without "site.yaml:1"
    assert problem.startswith(f"uplink.mqtt.tls.cert_file: client certificate {pki / 'client.pem'} does not match key {other}")
    assert_refused(write_profile(tmp_path, **tls(pki, key=other)), problem)


def test_missing_tls_file_warns_in_check_and_stops_run(tmp_path, pki):
    nope = tmp_path / "nope-ca.pem"
    assert_warned_by_check_refused_by_run(write_profile(tmp_path, **tls(pki, ca=nope)),
                                          f"uplink.mqtt.tls.ca_file: CA file {nope} does not exist")


def test_every_problem_in_one_pass(tmp_path, pki):
    (tmp_path / "state").write_text("")
    spool = tmp_path / "state" / "spool.sqlite"
    secret = tmp_path / "pw"
    secret.write_text("\n")
    notes = tmp_path / "ca.txt"
    notes.write_text("not a certificate")
    assert_refused(
        write_profile(tmp_path, spool, username="gateway", password_file=str(secret), **tls(pki, ca=notes)),
        f"uplink.spool.path: spool {spool} cannot be created: {tmp_path / 'state'} is a file, not a folder",
        f"uplink.mqtt.password_file: password file {secret} is empty",
        f"uplink.mqtt.tls.ca_file: CA file {notes} is not a PEM certificate (no -----BEGIN CERTIFICATE----- line)",
    )
