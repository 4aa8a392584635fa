"""Simulated power-to-heat (electric boiler) and power-to-hydrogen (electrolyser) units over IEC 104.

In process (on the caller's event loop)::

    from simulators.p2h import P2hSimulator, P2hSpec

    async with P2hSimulator([P2hSpec(min_load_kw=50, max_load_kw=500)]) as sim:
        boiler = sim.units[0]
        record = await boiler.wait_command(timeout_s=2.0)
        print(boiler.power_kw, boiler.storage_temp_c)

``P2hSpec(template="electrolyser")`` serves the electrolyser point map (scaled 16-bit values,
double-point running state, no heat store).  A setpoint above 0 but below the minimum load is
accepted and switches the unit OFF; above ``max_load_kw`` or negative it is refused (negative
ACT_CON).  CLI: ``python -m simulators.p2h --help``.  Behaviour and every spec field:
``simulators.iec104_unit``.
"""

from __future__ import annotations

import functools

from simulators.iec104_unit import CommandRecord, Iec104UnitSimulator, SimulatedUnit, UnitSpec, run_cli

__all__ = ["CommandRecord", "P2hSimulator", "P2hSpec", "SimulatedUnit"]

P2hSpec = functools.partial(UnitSpec, "p2h")


class P2hSimulator(Iec104UnitSimulator):
    """``Iec104UnitSimulator`` whose specs default to kind p2h."""


if __name__ == "__main__":
    run_cli("p2h")
