"""Protocol drivers, one package each, all behind edge.asset.AssetDriver.

``create_driver`` picks the package by the asset's ``driver`` key; a driver's
package is imported only when a profile uses it.
"""

from __future__ import annotations

import importlib
from typing import Any

from edge.asset import AssetDriver, EventSink
from edge.cycle_clock import CycleClock

DRIVER_MODULES = {
    "sunspec": "drivers.sunspec",
    "iec104": "drivers.iec104",
    "ocpp": "drivers.ocpp",
}


def create_driver(asset: Any, cycle_s: float, emit_event: EventSink, *, clock: CycleClock | None = None) -> AssetDriver:
    """``clock`` is the site's cycle clock: a polled driver reads its device just before each tick."""
    module = importlib.import_module(DRIVER_MODULES[asset.driver])
    return module.create(asset, cycle_s, emit_event, clock=clock)
