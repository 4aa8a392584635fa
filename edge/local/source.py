"""What the local endpoint reads of the gateway, and nothing more.

The endpoint holds the gateway itself and looks every part up through it at each use:
a profile reload may replace the controller, the drivers or the uplink, so none of them
is kept here.  ``edge.runtime.daemon.Gateway`` is the one implementation.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from edge.config.profile import Profile
    from edge.control.cycle import ControlledAsset, Controller
    from edge.local.health import SpoolWrites
    from edge.runtime.health import CycleStats
    from edge.uplink.mqtt import Uplink


class StatusSource(Protocol):
    profile: "Profile"
    stats: "CycleStats"  # cycles, missed cycles, durations, lateness, loop lag
    assets: "list[ControlledAsset]"  # id, kind, driver_name, controllable, commanded_kw, driver.command_log
    controller: "Controller | None"  # last_telemetry, process_image, state, grid_orders
    uplink: "Uplink | None"  # connected, stats
    # The grid operator's link; read with getattr for ``link_up`` and ``serving``, which
    # drivers.deie's DeieLink has and edge.gridorders.GridOperatorLink does not promise.
    deie: Any
    outbox: "asyncio.Queue[Any]"
    dropped_outbox: int
    spool_writes: "SpoolWrites"

    def emit_event(self, event_type: str, asset_id: str | None, detail: dict[str, Any]) -> None:
        """Report an event upstream (and to the status page)."""


def profile_sha256(source: StatusSource) -> str | None:
    """SHA-256 of the profile file the gateway runs, when it was loaded from one."""
    return getattr(source.profile, "source_sha256", None)
