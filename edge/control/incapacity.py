"""Incapacity: what the site cannot deliver now (activation or committed band), its
causes and its events, and the grid-limit events (docs/dispatch.md).  Mixed into
``edge.control.cycle.Controller``, whose state it uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from edge.control.allocation import Allocation

log = logging.getLogger("flexedge.control")


@dataclass(frozen=True, slots=True)
class Incapacity:
    """What the site cannot deliver now: the activation asked for, or the band committed to."""

    causes: tuple[str, ...]  # "band", "discrete_band", "export_limit", "import_limit", "grid_order", "committed_band_up", ...
    shortfall_kw: float  # activation asked for but not deliverable (kW, >= 0)
    band_shortfall_up_kw: float  # committed upward band not available
    band_shortfall_down_kw: float


class IncapacityMixin:
    def _incapacity(self, requested_kw: float, allocation: Allocation) -> Incapacity | None:
        """The shortfall to report, or None.  Ramping toward an activation the band
        covers is not an incapacity: the assets are on their way."""
        control = self.profile.control
        threshold = control.incapacity_threshold_kw
        causes: list[str] = []
        deliverable = min(max(requested_kw, -allocation.band_down_kw), allocation.band_up_kw)
        if allocation.limited_by in ("export_limit", "import_limit", "discrete_band"):
            deliverable = allocation.activation_kw
        shortfall = abs(requested_kw - deliverable)
        if shortfall > threshold:
            cause = allocation.limited_by or "band"
            if cause == "export_limit" and self.grid_orders.active:
                cause = "grid_order"
            refused = self._refused
            lost_kw = refused.up_kw if requested_kw > deliverable else refused.down_kw
            if cause == "band" and lost_kw > threshold:
                # the band the refusing devices took with them explains all of it, or part
                causes.extend(("command_refused",) if lost_kw >= shortfall - threshold else (cause, "command_refused"))
            else:
                causes.append(cause)
        else:
            shortfall = 0.0
        short_up = short_down = 0.0
        if control.committed_band_up_kw is not None and allocation.band_up_kw < control.committed_band_up_kw - threshold:
            short_up = control.committed_band_up_kw - allocation.band_up_kw
            causes.append("committed_band_up")
        if control.committed_band_down_kw is not None and allocation.band_down_kw < control.committed_band_down_kw - threshold:
            short_down = control.committed_band_down_kw - allocation.band_down_kw
            causes.append("committed_band_down")
        if not causes:
            return None
        return Incapacity(tuple(causes), shortfall, short_up, short_down)

    def _limited_by(self, allocation: Allocation | None) -> str | None:
        if allocation is None:
            return None
        incapacity = self.state.incapacity
        if incapacity is not None and incapacity.causes[:1] == ("command_refused",):
            return "command_refused"
        return allocation.limited_by

    def _incapacity_events(self, incapacity: Incapacity | None) -> None:
        """``incapacity`` at once when a shortfall starts or its causes change, and when it ends."""
        previous, self.state.incapacity = self.state.incapacity, incapacity
        if incapacity is None:
            if previous is not None:
                log.info("incapacity ended (was: %s)", ", ".join(previous.causes))
                self.emit_event("incapacity", None, {"state": "ended", "causes": list(previous.causes)})
            return
        if previous is not None and previous.causes == incapacity.causes:
            return
        allocation = self.state.allocation
        log.warning("incapacity: %s, shortfall %.1f kW", ", ".join(incapacity.causes), incapacity.shortfall_kw)
        self.emit_event("incapacity", None, {
            "state": "started" if previous is None else "changed",
            "causes": list(incapacity.causes),
            "shortfall_kw": round(incapacity.shortfall_kw, 3),
            "band_shortfall_up_kw": round(incapacity.band_shortfall_up_kw, 3),
            "band_shortfall_down_kw": round(incapacity.band_shortfall_down_kw, 3),
            "requested_kw": round(self.state.last_requested_kw, 3),
            "refusing_assets": list(self._refused.asset_ids),
            "band_up_kw": round(allocation.band_up_kw, 3) if allocation else None,
            "band_down_kw": round(allocation.band_down_kw, 3) if allocation else None,
        })

    def _limit_events(self, allocation: Allocation, now: float) -> None:
        kind = allocation.limited_by if allocation.limited_by in ("export_limit", "import_limit") else None
        if allocation.limit_violation_kw > 0:
            kind = kind or "limit_violation"
        if kind != self.state.limit_event:
            if kind:
                self.emit_event(
                    "grid_limit",
                    None,
                    {"limit": kind, "state": "reached", "requested_kw": round(allocation.requested_kw, 3),
                     "activation_kw": round(allocation.activation_kw, 3), "predicted_site_kw": round(allocation.site_kw, 3),
                     "violation_kw": round(allocation.limit_violation_kw, 3)},
                )
            else:
                self.emit_event("grid_limit", None, {"limit": self.state.limit_event, "state": "cleared"})
            self.state.limit_event = kind
