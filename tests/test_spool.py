"""The on-disk spool: ordering, sequence numbers, the size cap, bad input, and kill -9."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.uplink.spool import MIN_MAX_BYTES, Spool, SpoolError

REPO = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


@pytest.fixture
def spool(tmp_path):
    store = Spool(tmp_path / "sub" / "spool.sqlite", 16 * MB)
    yield store
    store.close()


def decoded(messages):
    return [json.loads(m.payload) for m in messages]


def test_creates_parent_directory_and_runs_wal_with_full_fsync(spool, tmp_path):
    assert (tmp_path / "sub" / "spool.sqlite").exists()
    assert spool._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_seq_rises_per_stream_and_keeps_rising_after_reopen_of_an_emptied_spool(tmp_path):
    path = tmp_path / "spool.sqlite"
    with Spool(path, 16 * MB) as spool:
        payload = {"ts": "t", "v": 1}
        assert spool.append("s/telemetry", payload, seq_stream="telemetry") == 1
        assert payload["seq"] == 1  # the caller's dict gets its seq
        assert spool.append("s/telemetry", {"v": 2}, seq_stream="telemetry") == 2
        assert spool.append("s/events", {"type": "x"}, seq_stream="events") == 1
        spool.remove(m.id for m in spool.oldest(10))
        assert spool.pending == 0
    with Spool(path, 16 * MB) as spool:
        assert spool.append("s/telemetry", {"v": 3}, seq_stream="telemetry") == 3
        assert spool.append("s/events", {"type": "y"}, seq_stream="events") == 2
        assert [p["seq"] for p in decoded(spool.oldest(10))] == [3, 2]


def test_oldest_returns_the_json_in_append_order_with_topic_qos_and_retain(spool):
    big = {"assets": {f"a{i}": {"p_kw": i * 1.5, "online": True} for i in range(50)}}
    first = spool.append("site/telemetry", big, seq_stream="telemetry")
    row = spool.append("site/status", {"state": "x"}, qos=0, retain=True)
    messages = spool.oldest(10)
    assert [m.topic for m in messages] == ["site/telemetry", "site/status"]
    assert [(m.qos, m.retain) for m in messages] == [(1, False), (0, True)]
    assert decoded(messages)[0] == {"seq": first, **big}
    assert messages[0].payload.startswith(b'{"seq":1,')  # seq first, compact JSON
    assert messages[1].id == row
    stored = spool._db.execute("SELECT encoding, LENGTH(body) FROM messages ORDER BY id").fetchall()
    assert stored[0][0] == 1 and stored[0][1] < len(messages[0].payload) / 3  # compressed
    assert spool.oldest(10, after_id=messages[0].id) == messages[1:]
    assert spool.oldest(1) == messages[:1]


def test_remove_takes_acknowledged_ids_and_ignores_unknown_ones(spool):
    ids = [spool.append("t", {"n": n}) for n in range(5)]
    assert spool.remove([ids[1], ids[3], 999_999]) == 2
    assert [m.id for m in spool.oldest(10)] == [ids[0], ids[2], ids[4]]
    assert spool.pending == 3 and spool.stats().pending == 3
    assert spool.remove([]) == 0


def test_overflow_drops_the_oldest_keeps_the_cap_and_counts_persistently(tmp_path):
    path = tmp_path / "spool.sqlite"
    cap = 256 * 1024
    noise = os.urandom(600).hex()  # does not compress much below 600 bytes
    total_dropped = 0
    with Spool(path, cap) as spool:
        for n in range(1, 601):
            result = spool.append_message("t", {"noise": noise[n % 7 :], "n": n}, seq_stream="telemetry")
            total_dropped += result.dropped
            assert spool.stats().bytes_used <= cap
        remaining = [p["seq"] for p in decoded(spool.oldest(1000))]
        stats = spool.stats()
    assert total_dropped > 100
    assert stats.dropped_total == total_dropped
    assert remaining == list(range(total_dropped + 1, 601))  # the newest, contiguous, in order
    assert stats.pending + stats.dropped_total == 600
    with Spool(path, cap) as spool:
        assert spool.dropped_total == total_dropped
        assert spool.pending == len(remaining)


def test_a_message_that_cannot_be_encoded_is_repaired_not_lost(spool):
    """A value we built badly (NaN, lone surrogate, an object) never costs the message or its seq."""
    first = spool.append_message("site/telemetry", {"p_kw": float("nan"), "id": "a\ud800b"}, seq_stream="telemetry")
    assert first.seq == 1 and "could not be encoded" in first.encoding_problem
    assert json.loads(first.message.payload) == {"seq": 1, "p_kw": None, "id": "a\\ud800b"}
    second = spool.append_message("site/events", {"when": object(), "deep": [[[float("inf")]]]})
    assert second.encoding_problem and json.loads(second.message.payload)["deep"] == [[[None]]]
    clean = spool.append_message("site/telemetry", {"p_kw": 1.0}, seq_stream="telemetry")
    assert clean.seq == 2 and clean.encoding_problem is None
    assert [json.loads(m.payload).get("seq") for m in spool.oldest(10)] == [1, None, 2]


def test_bad_input_is_refused_with_what_and_where(spool, tmp_path):
    with pytest.raises(ValueError, match="wildcards"):
        spool.append("site/#", {})
    with pytest.raises(ValueError, match="qos"):
        spool.append("t", {}, qos=3)
    with pytest.raises(ValueError, match="at least 65536"):
        Spool(tmp_path / "small.sqlite", 1000)
    with pytest.raises(ValueError, match="quarter of the spool cap"):
        Spool(tmp_path / "tiny.sqlite", MIN_MAX_BYTES).append("t", {"x": os.urandom(20_000).hex()})
    # a refused message does not use up a sequence number
    assert spool.append("site/telemetry", {}, seq_stream="telemetry") == 1


def test_a_file_that_is_not_a_spool_gives_a_clear_error(tmp_path):
    junk = tmp_path / "spool.sqlite"
    junk.write_bytes(b"this is not SQLite" * 300)
    with pytest.raises(SpoolError, match=rf"^spool {junk} is not an SQLite database"):
        Spool(junk, 16 * MB)


def unusable(path: Path) -> str:
    with pytest.raises(SpoolError) as caught:
        Spool(path, 16 * MB)
    # one line that says it all: no chained traceback to read the cause from
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    return str(caught.value)


def test_an_unusable_place_gives_one_line_naming_the_path_and_the_cause(tmp_path):
    (tmp_path / "file").write_text("")
    assert unusable(tmp_path / "file" / "spool.sqlite") == (
        f"spool {tmp_path}/file/spool.sqlite cannot be created: {tmp_path}/file is a file, not a folder")
    (tmp_path / "folder.sqlite").mkdir()
    assert unusable(tmp_path / "folder.sqlite") == f"spool {tmp_path}/folder.sqlite is a folder, not a file"
    if Path("/sys/kernel").is_dir():  # refuses new files even to root (was: AttributeError: ... no attribute '_db')
        assert unusable(Path("/sys/kernel/spool.sqlite")).startswith(
            "spool /sys/kernel/spool.sqlite cannot be created: folder /sys/kernel does not accept new files: ")


def test_closed_spool_raises(tmp_path):
    spool = Spool(tmp_path / "s.sqlite", 16 * MB)
    spool.close()
    spool.close()  # idempotent
    with pytest.raises(SpoolError, match="closed"):
        spool.append("t", {})


def test_stats_report_age_and_disk_use(spool):
    assert spool.stats().oldest_age_s is None
    spool.append("t", {"n": 1})
    time.sleep(0.05)
    stats = spool.stats()
    assert 0.04 < stats.oldest_age_s < 5
    assert stats.bytes_on_disk >= stats.bytes_used > 0


def test_concurrent_appends_from_threads_get_unique_gapless_seqs(spool):
    def worker():
        for _ in range(40):
            spool.append("t", {"x": 1}, seq_stream="telemetry")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    seqs = [p["seq"] for p in decoded(spool.oldest(1000))]
    assert seqs == list(range(1, 161))  # row order and seq order agree
    assert spool.pending == 160


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.integers(0, 3).map(lambda n: ("append", n)), st.integers(0, 5).map(lambda n: ("remove", n))), max_size=25))
def test_oldest_matches_a_plain_fifo_model(tmp_path_factory, operations):
    with Spool(tmp_path_factory.mktemp("model") / "s.sqlite", 16 * MB) as spool:
        model: list[int] = []
        for op, n in operations:
            if op == "append":
                model.append(spool.append("t", {"n": n}, seq_stream="s"))
            elif model:
                victim = model.pop(n % len(model))
                ids = {json.loads(m.payload)["seq"]: m.id for m in spool.oldest(100)}
                spool.remove([ids[victim]])
        assert [p["seq"] for p in decoded(spool.oldest(100))] == model
        assert spool.pending == len(model)


APPENDER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from edge.uplink.spool import Spool
    spool = Spool(Path(sys.argv[2]), 64 * 1024 * 1024)
    while True:
        seq = spool.append("site/telemetry", {"p_kw": 1.5, "pad": "x" * 500}, seq_stream="telemetry")
        print(seq, flush=True)
    """
)


def test_kill_9_while_appending_loses_no_committed_message(tmp_path):
    script = tmp_path / "appender.py"
    script.write_text(APPENDER)
    path = tmp_path / "spool.sqlite"
    proc = subprocess.Popen([sys.executable, str(script), str(REPO), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        printed = []
        deadline = time.monotonic() + 10
        while len(printed) < 150 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            printed.append(int(line))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        proc.stdout.close()
    assert len(printed) >= 150, "the appender did not get going"
    with Spool(path, 64 * MB) as spool:
        seqs = [p["seq"] for p in decoded(spool.oldest(100_000))]
        # every append that returned is there; at most the ones after it were in flight
        assert seqs[: len(printed)] == printed
        assert seqs == list(range(1, len(seqs) + 1))
        assert spool.pending == len(seqs)
        assert spool.append("site/telemetry", {}, seq_stream="telemetry") == len(seqs) + 1
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
