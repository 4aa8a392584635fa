"""The grid operator's DEIE telecontrol box over IEC 60870-5-104 (docs/deie.md).

The daemon sees it only as an ``edge.gridorders.GridOperatorLink``, built by
``drivers.registry.create_grid_link``; ``drivers.deie.link.DeieLink`` is the
implementation, ``drivers.deie.config.DeieConfig`` the profile's ``grid.deie``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from edge.asset import EventSink
from edge.gridorders import GridOrders

from drivers.deie.config import DeieConfig
from drivers.registry import GridLinkSpec

if TYPE_CHECKING:
    from drivers.deie.link import DeieLink

__all__ = ["GRID_LINK", "DeieConfig", "create"]


def create(cfg: DeieConfig, apply_orders: Callable[[GridOrders], Any], emit_event: EventSink) -> "DeieLink":
    # Imported here: the profile loads this package for its model, and
    # `flexedge check` has no business starting the IEC 104 stack.
    from drivers.deie.link import DeieLink

    return DeieLink(cfg, apply_orders, emit_event)


GRID_LINK = GridLinkSpec(name="deie", config_model=DeieConfig, create=create)
