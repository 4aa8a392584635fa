"""Q(U): a reactive-power request from the local voltage along a static droop curve.

Pure: no I/O, the caller passes the measurement and the time.  The controller
calls ``update()`` every cycle; the request changes only about once per
``update_interval_s`` (MAESHA UC2: once a minute), which keeps the voltage
control slow next to the inverters' own dynamics and the other sites'.

Signs: + reactive power is over-excited (injecting), which raises the local
voltage; so a typical curve asks for + q at low voltage and - q (absorbing) at
high voltage.

Rules (docs/grid-functions.md):

- ``v_pu = voltage_v / nominal_v``; the request is ``q_pct(v_pu) / 100 *
  q_max_kvar`` with ``q_pct`` linear between the curve's points and flat
  beyond its end points;
- it is recomputed at the first valid call, then at the first valid call in
  each later interval slot ``[t0 + k * update_interval_s, t0 + (k + 1) *
  update_interval_s)`` of the time ``t0`` of that first computation; between,
  the last request stands;
- a missing, non-finite, implausible (outside 0.5..1.5 pu) or stale (older
  than ``update_interval_s``) voltage sets ``measurement_ok`` False and keeps
  the last request for at most one interval from when the trouble began; then
  the request is None (no request: the controller releases it).  The next
  valid voltage computes a new request at once and restarts the slots.

Public API: ``QuDroop(config)``, ``update(voltage_v, now_s, measured_at_s=None) ->
float | None`` (kvar), ``q_for(voltage_v) -> float``; telemetry attributes
``voltage_v``, ``v_pu``, ``request_kvar``, ``computed_at_s``,
``measurement_ok``, ``measurement_problem``.
"""

from __future__ import annotations

import bisect
import math

from edge.config.functions import QuConfig

# Outside this range (per unit of nominal) a "voltage" is a measurement fault, not a grid state.
PLAUSIBLE_PU = (0.5, 1.5)
# Tolerance of the slot arithmetic, so a call exactly one interval later is not lost to rounding.
_SLOT_EPSILON = 1e-9


class QuDroop:
    """Reactive-power request from the voltage, updated once per interval; see the module docstring."""

    def __init__(self, config: QuConfig):
        self.config = config
        self._v_pu = [point.v_pu for point in config.curve]
        self._q_kvar = [point.q_pct / 100.0 * config.q_max_kvar for point in config.curve]
        self.voltage_v: float | None = None  # the last valid measurement; None while not ok
        self.request_kvar: float | None = None  # + over-excited; None: no request
        self.computed_at_s: float | None = None
        self.measurement_ok = False
        self.measurement_problem: str | None = "no measurement yet"
        self._anchor_s: float | None = None  # t0 of the interval slots; None: compute at the next valid call
        self._slot = 0
        self._invalid_since_s: float | None = None

    @property
    def v_pu(self) -> float | None:
        return None if self.voltage_v is None else self.voltage_v / self.config.nominal_v

    def q_for(self, voltage_v: float) -> float:
        """The curve's reactive power at ``voltage_v`` (kvar, + over-excited); no timing."""
        v_pu = voltage_v / self.config.nominal_v
        xs, ys = self._v_pu, self._q_kvar
        if v_pu <= xs[0]:
            return ys[0]
        if v_pu >= xs[-1]:
            return ys[-1]
        right = bisect.bisect_right(xs, v_pu)
        x0, x1, y0, y1 = xs[right - 1], xs[right], ys[right - 1], ys[right]
        return y0 + (y1 - y0) * (v_pu - x0) / (x1 - x0)

    def update(self, voltage_v: float | None, now_s: float, measured_at_s: float | None = None) -> float | None:
        """Advance to ``now_s`` with this measurement; the reactive-power request (kvar) or None.

        ``now_s`` is any clock that does not jump; ``measured_at_s``, on the
        same clock, is when the voltage was measured (None: now).
        """
        interval_s = self.config.update_interval_s
        problem = self._problem(voltage_v, now_s, measured_at_s)
        self.measurement_ok = problem is None
        self.measurement_problem = problem
        if problem is not None:
            self.voltage_v = None
            if self._invalid_since_s is None:
                self._invalid_since_s = now_s
            if now_s - self._invalid_since_s >= interval_s:
                self.request_kvar = None
                self._anchor_s = None
            return self.request_kvar
        self._invalid_since_s = None
        self.voltage_v = voltage_v
        if self._anchor_s is None:
            self._anchor_s, self._slot = now_s, 0
        else:
            slot = math.floor((now_s - self._anchor_s) / interval_s + _SLOT_EPSILON)
            if slot <= self._slot:
                return self.request_kvar
            self._slot = slot
        self.request_kvar = self.q_for(voltage_v)
        self.computed_at_s = now_s
        return self.request_kvar

    def _problem(self, voltage_v: float | None, now_s: float, measured_at_s: float | None) -> str | None:
        if voltage_v is None:
            return "no voltage measurement"
        if not math.isfinite(voltage_v):
            return f"voltage is not a number ({voltage_v})"
        low, high = PLAUSIBLE_PU
        nominal_v = self.config.nominal_v
        if not low * nominal_v <= voltage_v <= high * nominal_v:
            return f"implausible voltage {voltage_v:g} V (outside {low:g}..{high:g} x {nominal_v:g} V)"
        if measured_at_s is not None:
            age_s = now_s - measured_at_s
            if not math.isfinite(age_s) or age_s > self.config.update_interval_s:
                return f"stale voltage ({age_s:.1f} s old, max {self.config.update_interval_s:g} s)"
        return None
