"""What checking an inbound message costs on the event loop (edge/uplink/intake.py and the validators).

Every setpoint, schedule and EV-preferences message is validated on the loop, before the
controller acts on it: its cost is part of the setpoint-to-command latency, and a hostile
one must not cost more than a valid one.  Measured per message, median and p99 of
``--messages`` runs each:

* a valid setpoint (the VPP's every-2-s message), and ``json.loads`` of it alone, the floor;
* hostile setpoints refused at each gate: 16 KiB of unknown keys, 5,000-deep nesting, a
  5,000-digit integer, a lone surrogate, 1 MB (refused by size before parsing);
* a day-ahead schedule (96 quarter hours) and the largest accepted, a week of 1-minute
  connection-limit slots (about 565 KB);
* the event loop's worst lag while that week-long schedule is checked on the loop, and in a
  worker thread as the controller does for schedules over 64 KiB.

Run from the repository root:  python bench/intake_bench.py [--messages 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge.config.profile import Control  # noqa: E402
from edge.control.schedules import ScheduleBook, ScheduleRejected, ScheduleValidator  # noqa: E402
from edge.control.setpoints import SetpointRejected, SetpointValidator, iso_time  # noqa: E402


def timed_us(call, count: int) -> tuple[float, float]:
    samples = []
    for index in range(count):
        started = time.perf_counter()
        call(index)
        samples.append((time.perf_counter() - started) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    count = args.messages
    now = time.time()
    setpoints = SetpointValidator(Control())

    def valid_setpoint(index: int) -> None:
        raw = b'{"id":"vpp-%d","ts":"%s","valid_s":10,"activation_kw":12.5}' % (index, iso_time(now).encode())
        setpoints.validate(raw, now, 100.0, 100.0, None)

    base = '{"id":"h","ts":%f,"valid_s":10,"activation_kw":%s%s}'
    hostile = {
        "16 KiB of unknown keys": (base % (now, "1", "".join(f',"k{i}":1' for i in range(1800)))).encode()[:16_000] + b"}",
        "5,000-deep nesting": (base % (now, "[" * 5000 + "1" + "]" * 5000, "")).encode(),
        "5,000-digit integer": (base % (now, "9" * 5000, "")).encode(),
        "lone surrogate": (base % (now, '"\\ud800"', "")).encode(),
        "1 MB": (base % (now, "1", "")).encode() + b" " * 1_000_000,
    }
    rows = [("valid setpoint", *timed_us(valid_setpoint, count))]
    floor_raw = b'{"id":"vpp-1","ts":"%s","valid_s":10,"activation_kw":12.5}' % iso_time(now).encode()
    rows.append(("  json.loads alone (floor)", *timed_us(lambda _: json.loads(floor_raw), count)))
    for name, raw in hostile.items():
        def refuse(_: int, raw=raw) -> None:
            try:
                setpoints.validate(raw, now, 100.0, 100.0, None)
            except SetpointRejected:
                return
            raise AssertionError(f"{name}: accepted")
        rows.append((f"hostile: {name}", *timed_us(refuse, count)))

    start = now - now % 900
    day = {"ts": now, "kind": "activation", "start": start, "resolution_s": 900, "values": [10.0] * 96}
    week = {"ts": now, "kind": "connection_limits", "start": now - now % 60, "resolution_s": 60,
            "values": [{"import_limit_kw": 1234.5, "export_limit_kw": 1234.5}] * 10080}
    for name, schedule, runs in (("schedule, 96 slots", day, count), ("schedule, a week of 1-min limits", week, 20)):
        validator = ScheduleValidator()

        def validate(index: int, schedule=schedule, validator=validator) -> None:
            raw = json.dumps({"id": f"s-{index}", **schedule}).encode()
            try:
                validator.validate(raw, now, ScheduleBook())
            except ScheduleRejected as error:
                raise AssertionError(error.reason) from None
        size_kb = len(json.dumps({"id": "s-0", **schedule})) / 1000
        rows.append((f"{name} ({size_kb:.0f} KB)", *timed_us(validate, runs)))

    print(f"{'message':48} {'median us':>10} {'p99 us':>10}")
    for name, median_us, p99_us in rows:
        print(f"{name:48} {median_us:10.1f} {p99_us:10.1f}")

    # What the week-long schedule costs the event loop: checked on it, or (as the controller does
    # above 64 KiB) in a worker thread while the loop goes on.
    raw = json.dumps({"id": "s-lag", **week}).encode()
    for where in ("on the loop", "in a worker thread"):
        lag_ms = asyncio.run(_loop_lag_ms(raw, where == "in a worker thread"))
        print(f"week-long schedule checked {where}: event-loop lag max {lag_ms:.1f} ms")


async def _loop_lag_ms(raw: bytes, threaded: bool, tick_s: float = 0.005) -> float:
    validator = ScheduleValidator()
    worst_s = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst_s
        loop = asyncio.get_running_loop()
        while not done.is_set():
            started = loop.time()
            await asyncio.sleep(tick_s)
            worst_s = max(worst_s, loop.time() - started - tick_s)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    for _ in range(5):
        if threaded:
            await asyncio.to_thread(validator.structure, raw)
        else:
            validator.structure(raw)
        await asyncio.sleep(0.02)
    done.set()
    await task
    return worst_s * 1000


if __name__ == "__main__":
    main()
