"""Simulated battery energy storage systems (BESS) as IEC 60870-5-104 controlled stations.

In process (on the caller's event loop)::

    from simulators.bess import BessSimulator, BessSpec

    async with BessSimulator([BessSpec(max_discharge_kw=100, soc_pct=50)]) as sim:
        unit = sim.units[0]          # unit.port, unit.common_address
        # connect an IEC 104 client, send C_SE_NC_1 to IOA 1000 ...
        record = await unit.wait_command(timeout_s=2.0)
        unit.reply = "negative"      # or "none": no ACT_CON (timeout tests)
        unit.set_fault(True); unit.set_remote(False)
        await sim.restart(unit.port)

CLI: ``python -m simulators.bess --help``, e.g. ``python -m simulators.bess --port 2404 --count 3``
(CA 1..3 on one port) or ``--per-port`` (ports 2404..2406).  Every command received is logged.
Point map: profiles/templates/bess-generic.yaml (or ``template=``).  Behaviour and every spec field:
``simulators.iec104_unit``.
"""

from __future__ import annotations

import functools

from simulators.iec104_unit import CommandRecord, Iec104UnitSimulator, SimulatedUnit, UnitSpec, run_cli

__all__ = ["BessSimulator", "BessSpec", "CommandRecord", "SimulatedUnit"]

BessSpec = functools.partial(UnitSpec, "bess")


class BessSimulator(Iec104UnitSimulator):
    """``Iec104UnitSimulator`` whose specs default to kind bess."""


if __name__ == "__main__":
    run_cli("bess")
