"""What one SunSpec poll costs on the event loop once the registers are in (drivers/sunspec).

Every asset polls once a cycle, on the one event loop the controller shares: the work done
between the last Modbus answer and the new reading delays everything else on the loop.
Measured per device kind, with the register image of the SunSpec simulator
(``simulators.sunspec``: realistic models, scale factors and measurements):

* ``poll``: the driver's real ``SunSpecDriver._poll()`` against an in-memory reader (the
  reads cost nothing here but the copy of the registers), minus ``reads``, the same reads
  alone: what ``_poll`` does after the reads (header and end-marker checks, the model
  blocks, the volt-var curve layout, the control paths, the reading, the device ratings);
* ``reference``: the same steps as the driver did them before issue #11 (a dict of every
  register, a ``ModelBlock`` per model rebuilt from it, ``_lay_out_curves``,
  ``choose_path``/``choose_var_path``, ``build_reading`` and ``device_ratings`` decoding
  every point by name through the codec; the last two as kept in
  tests/test_sunspec_decoding.py, the reference of the equivalence test).

Before the change, ``poll`` measured the same as ``reference`` (within noise).

Run from the repository root:  python bench/sunspec_decode_bench.py [--polls 2000] [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drivers.sunspec import voltvar  # noqa: E402
from drivers.sunspec.codec import ModelBlock, layout_for  # noqa: E402
from drivers.sunspec.control import choose_path, choose_var_path  # noqa: E402
from drivers.sunspec.driver import SunSpecDriver  # noqa: E402
from drivers.sunspec.config import SunSpecAsset  # noqa: E402
from simulators.sunspec import DeviceSpec  # noqa: E402
from simulators.sunspec.device import SimulatedDevice  # noqa: E402
# measure.build_reading/device_ratings as they were, kept as the equivalence test's reference
from tests.test_sunspec_decoding import reference_build_reading, reference_device_ratings  # noqa: E402

# (label, simulator spec, profile kind)
DEVICES = (
    ("pv (1 103 120 121 123 704)", dict(kind="pv", sun_kw=7.3), "pv"),
    ("pv DER (1 103 120 121 123 701 702 704 705)",
     dict(kind="pv", sun_kw=7.3, models=(1, 103, 120, 121, 123, 701, 702, 704, 705)), "pv"),
    ("storage (1 103 120 121 124 704 802)", dict(kind="storage", soc_pct=63.0), "bess"),
    ("hybrid (1 103 120 121 123 124 704 802)", dict(kind="hybrid", sun_kw=4.1, soc_pct=41.0), "bess"),
    ("meter (1 203)", dict(kind="meter", load_kw=3.2), "meter"),
)


def run_sync(coroutine):
    """Run a coroutine that never suspends (the in-memory reader never does) without a loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("the coroutine suspended")


def device_image(spec: dict) -> tuple[int, list[int]]:
    """(base address, registers) of a simulated device, measurements published."""
    device = SimulatedDevice(DeviceSpec(**spec))
    device.tick(0.0, 0.5)
    device.tick(1.0, 0.5)
    device._publish()
    return device.image.base, list(device.image.regs)


class MemoryLink:
    """Stands in for the driver's ``ModbusLink``: reads served from a register list."""

    def __init__(self, base: int, regs: list[int]):
        self.base, self.regs = base, regs

    async def read(self, address: int, count: int) -> list[int]:
        start = address - self.base
        return self.regs[start:start + count]

    def describe(self) -> str:
        return "memory"

    def close(self) -> None:
        pass


def driver_for(kind: str, base: int, regs: list[int]) -> SunSpecDriver:
    asset = SunSpecAsset(id=f"{kind}1", kind=kind, driver="sunspec", host="127.0.0.1", rated_kw=10.0)
    driver = SunSpecDriver(asset, 1.0, lambda *_: None)
    driver.link = MemoryLink(base, regs)
    run_sync(driver._discover())
    run_sync(driver._poll())
    return driver


def reference_poll(driver: SunSpecDriver, spans: list[tuple[int, list[int]]], layouts: dict) -> tuple:
    """The per-poll work after the reads as ``_poll`` did it before issue #11."""
    model_map = driver.model_map
    image: dict[int, int] = {}
    for address, registers in spans:
        image.update(zip(range(address, address + len(registers)), registers))
    for model_id, (entry, _) in layouts.items():
        header = (image[entry.address], image[entry.address + 1])
        if header != (entry.model_id, entry.length):
            raise RuntimeError("map changed")
    if model_map.end_marker and image[model_map.end_address] != 0xFFFF:
        raise RuntimeError("map changed")
    blocks = {
        model_id: ModelBlock(layout, [image[a] for a in range(entry.address, entry.end)], entry.address)
        for model_id, (entry, layout) in layouts.items()
    }
    block = blocks.get(voltvar.MODEL)  # _lay_out_curves
    counts = voltvar.curve_counts(block) if block is not None else None
    if counts is not None and not block.has(f"Crv[{counts['NCrv']}].Pt[{counts['NPt']}].Var"):
        entry = layouts[voltvar.MODEL][0]
        layout = layout_for(voltvar.MODEL, entry.length, counts)
        layouts[voltvar.MODEL] = (entry, layout)
        blocks[voltvar.MODEL] = ModelBlock(layout, block.registers, block.address)
    kind = driver.asset.kind
    path, var_path = choose_path(kind, blocks), choose_var_path(kind, blocks)
    reading = reference_build_reading(driver.asset, blocks, path, time.time(), var_path)
    return reading, reference_device_ratings(kind, blocks)


def per_call_us(call, polls: int, repeats: int) -> float:
    """The fastest of ``repeats`` runs' mean time of ``polls`` calls, in µs (the least disturbed run:
    other processes only ever add time)."""
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(polls):
            call()
        runs.append((time.perf_counter() - started) / polls * 1e6)
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", type=int, default=2000, help="polls per timed run")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs; the fastest counts")
    args = parser.parse_args()
    print(f"{'device':<46} {'regs':>5} {'reqs':>4} {'reads µs':>9} {'poll µs':>8} {'reference µs':>13}")
    for label, spec, kind in DEVICES:
        base, regs = device_image(spec)
        driver = driver_for(kind, base, regs)
        plan = list(driver._plan)
        layouts = dict(driver._layouts)

        def reads():
            for span in plan:
                run_sync(driver._read(span.address, span.count))

        def poll():
            run_sync(driver._poll())

        spans = [(span.address, run_sync(driver._read(span.address, span.count))) for span in plan]
        reads_us = per_call_us(reads, args.polls, args.repeats)
        poll_us = per_call_us(poll, args.polls, args.repeats) - reads_us
        reference_us = per_call_us(lambda: reference_poll(driver, spans, layouts), args.polls, args.repeats)
        print(f"{label:<46} {sum(s.count for s in plan):>5} {len(plan):>4} {reads_us:>9.1f} {poll_us:>8.1f} "
              f"{reference_us:>13.1f}")


if __name__ == "__main__":
    main()
