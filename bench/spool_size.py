"""How many days of telemetry fit in the spool, and how fast it appends, reads and removes.

Builds telemetry exactly as docs/mqtt-api.md describes it (site block plus one block
per asset, 20 assets by default), appends it to a real spool file with the daemon's
settings (WAL, synchronous=FULL, zlib) and measures:

* bytes per message: raw JSON, stored body, and database pages in use per message;
* days of a site at the given cadence that fit in the cap (default 1024 MB);
* append rate (one fsync'd transaction each, as the daemon does), oldest() read rate
  and remove() rate in batches.

Values random-walk like real measurements.  ``--precision`` rounds them (the daemon's
choice); ``--precision -1`` keeps full float precision, the worst case for zlib.

Run from the repository root:  python bench/spool_size.py [--assets 20] [--messages 3000]
The spool file is created in a temporary directory under --dir (default: the system's
temporary directory).  Point --dir at the target's data disk: on a tmpfs fsync is free
and the append rate means nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge.uplink.spool import Spool, encode_payload  # noqa: E402

MB = 1024 * 1024
ASSET_FIELDS = ("p_kw", "q_kvar", "baseline_kw", "setpoint_kw", "activation_kw", "band_up_kw", "band_down_kw", "soc_pct")


class TelemetrySource:
    """Plausible 20-asset telemetry: values drift a little every cycle, like a real site."""

    def __init__(self, assets: int, precision: int, cycle_s: float, seed: int = 1):
        self.rng = random.Random(seed)
        self.precision = precision
        self.cycle_s = cycle_s
        self.asset_ids = [f"{kind}-{i:02d}" for i, kind in zip(range(assets), ["pv", "bess", "meter", "pv", "ev"] * assets)]
        self.state = {a: {f: self.rng.uniform(-50, 50) for f in ASSET_FIELDS} for a in self.asset_ids}
        self.t0 = time.time()
        self.n = 0

    def _value(self, asset: str, field: str) -> float:
        value = self.state[asset][field] + self.rng.gauss(0, 0.8)
        self.state[asset][field] = value
        if field == "soc_pct":
            value = min(100.0, max(0.0, abs(value)))
        return round(value, self.precision) if self.precision >= 0 else value

    def next(self) -> dict:
        self.n += 1
        ts = datetime.fromtimestamp(self.t0 + self.n * self.cycle_s, timezone.utc)
        assets = {}
        for a in self.asset_ids:
            block = {f: self._value(a, f) for f in ASSET_FIELDS}
            if a.startswith(("pv", "meter", "ev")):
                block["soc_pct"] = None
            block["online"] = True
            assets[a] = block
        site = {f: round(sum((b[f] or 0.0) for b in assets.values()), max(self.precision, 0)) for f in ASSET_FIELDS[:-1]}
        site.update(activation_requested_kw=site["activation_kw"], soc_pct=55.5, online=True)
        return {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "site_id": "bench-site",
            "cycle_s": self.cycle_s,
            "mode": "setpoint",
            "setpoint_id": f"vpp-{self.n}",
            "site": site,
            "assets": assets,
        }


def measure(args: argparse.Namespace, precision: int) -> None:
    source = TelemetrySource(args.assets, precision, args.cycle_s)
    label = f"{precision} decimals" if precision >= 0 else "full float precision"
    with tempfile.TemporaryDirectory(prefix="spool-bench-", dir=args.dir) as tmp:
        spool = Spool(Path(tmp) / "spool.sqlite", int(args.cap_mb * MB))
        topic = "flexedge/bench-site/telemetry"
        raw_bytes = 0
        base_used = spool.stats().bytes_used
        started = time.perf_counter()
        for _ in range(args.messages):
            result = spool.append_message(topic, source.next(), seq_stream="telemetry")
            raw_bytes += len(result.message.payload)
        append_s = time.perf_counter() - started
        stats = spool.stats()
        stored = spool._db.execute("SELECT SUM(LENGTH(body)) FROM messages").fetchone()[0]  # noqa: SLF001
        per_msg = (stats.bytes_used - base_used) / args.messages
        msgs_per_day = 86400 / args.cycle_s
        days = args.cap_mb * MB / per_msg / msgs_per_day

        started = time.perf_counter()
        ids, after = [], 0
        while batch := spool.oldest(args.batch, after):
            ids.extend(m.id for m in batch)
            after = batch[-1].id
        read_s = time.perf_counter() - started

        started = time.perf_counter()
        for i in range(0, len(ids), args.batch):
            spool.remove(ids[i : i + args.batch])
        remove_s = time.perf_counter() - started
        spool.close()

    print(f"--- {args.assets} assets, values with {label}, {args.messages} messages")
    print(f"raw JSON per telemetry message     {raw_bytes / args.messages:8.0f} B")
    print(f"stored (zlib) per message          {stored / args.messages:8.0f} B  (ratio {raw_bytes / stored:.1f}x)")
    print(f"database pages used per message    {per_msg:8.0f} B")
    print(f"days at {args.cycle_s:g} s cadence in {args.cap_mb:g} MB   {days:8.1f} days  (need >= 5)")
    print(f"append (fsync'd txn each)          {args.messages / append_s:8.0f} msg/s  ({append_s / args.messages * 1e3:.2f} ms each)")
    print(f"oldest({args.batch}) read              {len(ids) / read_s:8.0f} msg/s")
    print(f"remove (batches of {args.batch})          {len(ids) / remove_s:8.0f} msg/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--assets", type=int, default=20)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--cycle-s", type=float, default=2.0)
    parser.add_argument("--cap-mb", type=float, default=1024.0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--precision", type=int, action="append", help="decimals; -1 = full precision (repeatable)")
    parser.add_argument("--dir", default=None, help="where to create the temporary spool (default: system temp)")
    args = parser.parse_args()
    sample = TelemetrySource(args.assets, 3, args.cycle_s).next()
    print(f"sample telemetry: {len(encode_payload('t', sample))} B of JSON, e.g. {json.dumps(sample)[:160]}...")
    for precision in args.precision or [3, -1]:
        measure(args, precision)


if __name__ == "__main__":
    main()
