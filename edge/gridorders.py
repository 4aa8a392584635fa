"""Orders of the grid operator (the DEIE), as the controller sees them.

Grid-operator orders always win: the controller applies them before the grid
connection limits, the VPP's activation and any local function.  They come
from `drivers/deie/link.py` (IEC 104), which validates them and confirms them on the
wire; this module only says what is in force, and what the daemon may ask of the
link (``GridOperatorLink``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol


@dataclass(frozen=True, slots=True)
class GridOrders:
    """What the grid operator has ordered; None means no order of that kind."""

    export_limit_kw: float | None = None  # active-power limit at the connection point (+ export)
    disconnected: bool = False  # "découplage": the site must not produce
    reactive_setpoint_kvar: float | None = None  # Q setpoint (reported; enforced when drivers control Q)
    tan_phi: float | None = None  # tan(phi) setpoint (reported; idem)
    source: str = "none"  # "deie", "link_loss_default", "persisted" (SOURCE_PERSISTED) ...

    def __post_init__(self) -> None:
        for name in ("export_limit_kw", "reactive_setpoint_kvar", "tan_phi"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"GridOrders.{name} must be finite, got {value}")
        if self.export_limit_kw is not None and self.export_limit_kw < 0:
            raise ValueError(f"GridOrders.export_limit_kw must be >= 0, got {self.export_limit_kw}")

    @property
    def active(self) -> bool:
        return self.disconnected or self.export_limit_kw is not None

    def with_(self, **changes) -> "GridOrders":
        return replace(self, **changes)


NO_ORDERS = GridOrders()
# Orders restored at start-up from before a restart (edge/control/order_store.py), until the
# operator's next order, lift or (client role) the DEIE's general interrogation replaces them.
SOURCE_PERSISTED = "persisted"


def effective_export_limit_kw(profile_limit_kw: float | None, orders: GridOrders) -> float | None:
    """The tighter of the connection agreement and the operator's order; 0 when disconnected."""
    if orders.disconnected:
        return 0.0
    limits = [v for v in (profile_limit_kw, orders.export_limit_kw) if v is not None]
    return min(limits) if limits else None


class GridOperatorLink(Protocol):
    """The daemon's one view of the grid operator's telecontrol link (the DEIE, drivers/deie/).

    Built by ``drivers.registry.create_grid_link(cfg, apply_orders, emit_event)``;
    ``apply_orders(GridOrders)`` is called on the loop with every set of orders in force.
    """

    async def run(self) -> None:
        """Serve or connect until cancelled; link trouble never raises out of it."""

    def report(self, p_kw: float | None, q_kvar: float | None, voltage_v: float | None) -> None:
        """The site's measurements, every cycle; non-blocking."""

    def restore(self, orders: GridOrders, link_loss_default: bool = False) -> None:
        """Orders in force before a restart, back in force before any device is commanded."""

    def assume_link_lost(self) -> None:
        """The orders before the restart are unknown: act as on link loss, at once."""
