"""Reactive power: the site's request (the grid operator's Q or tan(phi) order, else
Q(U)) shared across the assets that can follow it, and the volt-var curve for
inverters that run Q(U) themselves (docs/grid-functions.md).  Mixed into
``edge.control.cycle.Controller``, whose state it uses.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from edge.control.allocation import Allocation
from edge.asset import AssetReading, VoltVarCurve


@dataclass(frozen=True, slots=True)
class ReactiveShare:
    """A site reactive-power request shared across the assets that can follow it."""

    requested_kvar: float  # at the connection point, + over-excited (injecting)
    targets_kvar: dict[str, float]
    site_kvar: float  # predicted site reactive power with these targets


def _volt_var_curve(config) -> VoltVarCurve:
    """The profile's Q(U) curve for an inverter: v_pu as % of its nominal voltage, q_pct of its VarMax."""
    return VoltVarCurve(tuple((point.v_pu * 100.0, point.q_pct) for point in config.curve), config.response_time_s)


class ReactiveMixin:
    def _qu_request_kvar(self, readings: dict[str, AssetReading]) -> float | None:
        qu = self.qu
        reading = readings.get(qu.config.voltage_source)
        mono, now = time.monotonic(), time.time()
        voltage = reading.voltage_v if reading is not None and reading.online else None
        measured_at = mono - max(0.0, now - reading.read_at) if reading is not None and reading.online else None
        request = qu.update(voltage, mono, measured_at)
        self._function_state("q_u", qu.measurement_problem if not qu.measurement_ok else None, qu.config.voltage_source)
        return request

    def _share_reactive(self, readings: dict[str, AssetReading], allocation: Allocation) -> ReactiveShare | None:
        """The grid operator's Q or tan(phi) order, else the Q(U) request, shared pro rata to
        each asset's reactive rating.

        tan(phi) = Q / P at the connection point, both in the flexedge signs,
        with P the site power this cycle's targets give.  For the grid
        operator's orders, reactive power the controller cannot command
        (other assets; with a connection-point meter, all the site's) is
        measured and compensated, as for P; Q(U) asks the controlled assets
        for their curve's reactive power, so nothing is compensated.
        """
        orders = self.grid_orders
        compensate = True
        if orders.reactive_setpoint_kvar is not None:
            requested = orders.reactive_setpoint_kvar
        elif orders.tan_phi is not None:
            requested = orders.tan_phi * allocation.site_kw
        elif self.qu is not None and (q_u := self._qu_request_kvar(readings)) is not None:
            requested, compensate = q_u, False
        else:
            return None
        capable: dict[str, float] = {}
        running_curve_kvar = 0.0  # the reactive capability of the inverters that run the curve themselves
        measured_capable = uncontrolled = 0.0
        for asset in self.assets:
            reading = readings[asset.id]
            if asset.kind == "meter" or not reading.online:
                continue
            q_max = reading.q_max_kvar
            q_max = q_max if q_max is not None and math.isfinite(q_max) and q_max > 0 else None
            if not compensate and asset.id in self._curve_assets:
                running_curve_kvar += q_max or 0.0
                continue
            q_kvar = reading.q_kvar if reading.q_kvar is not None and math.isfinite(reading.q_kvar) else 0.0
            if asset.controllable and q_max is not None:
                capable[asset.id] = q_max
                measured_capable += q_kvar
            else:
                uncontrolled += q_kvar
        if self._meter is not None:
            meter = readings[self._meter.id]
            if meter.online and meter.q_kvar is not None and math.isfinite(meter.q_kvar):
                uncontrolled = meter.q_kvar - measured_capable
        total_capability = sum(capable.values())
        if not compensate:
            uncontrolled = 0.0
            if running_curve_kvar > 0:  # the inverters that run the curve deliver their part of it
                requested *= total_capability / (total_capability + running_curve_kvar)
        wanted = min(max(requested - uncontrolled, -total_capability), total_capability)
        targets = {asset_id: wanted * q_max / total_capability for asset_id, q_max in capable.items()}
        return ReactiveShare(requested, targets, uncontrolled + sum(targets.values()))

    def _inverter_curves(self, readings: dict[str, AssetReading]) -> frozenset[str]:
        """Q(U) in inverter mode: keep the curve in every inverter that can run it, and say which run it now.

        Only an inverter that reads back the curve as in force counts as running it; until then
        (and if it refuses the curve) it gets its share of the gateway's request like any asset.
        A grid operator's reactive-power or tan(phi) order switches the curves off: the order is
        then shared among all assets like any other, and the curves come back when it ends.
        """
        curve = self._inverter_curve
        if curve is None:
            return frozenset()
        orders = self.grid_orders
        order_in_force = orders.reactive_setpoint_kvar is not None or orders.tan_phi is not None
        running = set()
        for asset in self.assets:
            driver = asset.driver
            if not asset.controllable or not driver.volt_var_available:
                continue
            driver.set_volt_var(None if order_in_force else curve)
            if not order_in_force and driver.volt_var_in_force and readings[asset.id].online:
                running.add(asset.id)
        return frozenset(running)
