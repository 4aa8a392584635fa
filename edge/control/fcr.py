"""FCR droop: frequency containment activation from a measured grid frequency.

Pure: no I/O, the caller passes the measurement and the time.  The controller
calls ``update()`` once per cycle and adds the result to the FRR activation.

Signs: + activation is upward regulation (more export / less import).  A
frequency below nominal means the grid lacks generation, so it asks for
MORE export (+); above nominal, for less (-).

Rules (docs/grid-functions.md):

- deviation ``df = f - nominal_hz``; ``|df| <= deadband`` gives target 0;
- beyond the deadband ``target = -capacity * df / full_deviation``, clamped to
  +/- capacity.  The line goes through the nominal frequency, NOT through the
  deadband edge: the deadband only suppresses small responses (so there is a
  step of ``capacity * deadband / full_deviation`` at its edge, 5 % with the
  defaults), and the response at any deviation outside it is exactly the droop
  the product defines, full at ``full_deviation`` (SOGL: full at 200 mHz).
- the output moves toward the target at most ``capacity / full_activation_s``
  per second, so any response is fully delivered within ``full_activation_s``
  (<= 30 s) of the frequency step;
- a missing, non-finite, implausible (outside 45..65 Hz) or stale
  measurement sets ``measurement_ok`` False and the target to 0: the output
  ramps back to 0 at the same rate.  The controller reports it.

Public API: ``FcrDroop(config)``, ``update(frequency_hz, now_s, measured_at_s=None)
-> float`` (activation, kW); telemetry attributes ``frequency_hz``,
``deviation_mhz``, ``target_kw``, ``activation_kw``, ``measurement_ok``,
``measurement_problem``.
"""

from __future__ import annotations

import math

from edge.config.functions import FcrConfig

# Outside this range a "frequency" is a measurement fault, not a grid state.
PLAUSIBLE_HZ = (45.0, 65.0)


class FcrDroop:
    """Rate-limited proportional response to the frequency deviation; see the module docstring."""

    def __init__(self, config: FcrConfig):
        self.config = config
        self.rate_kw_per_s = config.capacity_kw / config.full_activation_s
        self.frequency_hz: float | None = None  # the last valid measurement used; None while not ok
        self.target_kw = 0.0  # the static droop response to that measurement (0 while not ok)
        self.activation_kw = 0.0  # the rate-limited output
        self.measurement_ok = False
        self.measurement_problem: str | None = "no measurement yet"
        self._last_update_s: float | None = None

    @property
    def deviation_mhz(self) -> float | None:
        """f - nominal in mHz, for telemetry; None while the measurement is not ok."""
        if self.frequency_hz is None:
            return None
        return (self.frequency_hz - self.config.nominal_hz) * 1000.0

    def target_for(self, frequency_hz: float) -> float:
        """Steady-state response to ``frequency_hz`` (kW, + upward); no rate limit."""
        config = self.config
        deviation_mhz = (frequency_hz - config.nominal_hz) * 1000.0
        if abs(deviation_mhz) <= config.deadband_mhz:
            return 0.0
        target = -config.capacity_kw * deviation_mhz / config.full_deviation_mhz
        return min(max(target, -config.capacity_kw), config.capacity_kw)

    def update(self, frequency_hz: float | None, now_s: float, measured_at_s: float | None = None) -> float:
        """Advance to ``now_s`` with this measurement and return the activation (kW, + upward).

        ``now_s`` is any clock that does not jump (the first call only sets the
        start); ``measured_at_s``, on the same clock, is when the frequency was
        measured (None: now).  Older than ``max_measurement_age_s`` is stale.
        """
        dt_s = 0.0 if self._last_update_s is None else max(0.0, now_s - self._last_update_s)
        self._last_update_s = now_s
        problem = self._problem(frequency_hz, now_s, measured_at_s)
        self.measurement_ok = problem is None
        self.measurement_problem = problem
        if problem is None:
            self.frequency_hz = frequency_hz
            self.target_kw = self.target_for(frequency_hz)
        else:
            self.frequency_hz = None
            self.target_kw = 0.0
        self.activation_kw = _approach(self.activation_kw, self.target_kw, self.rate_kw_per_s * dt_s)
        return self.activation_kw

    def _problem(self, frequency_hz: float | None, now_s: float, measured_at_s: float | None) -> str | None:
        if frequency_hz is None:
            return "no frequency measurement"
        if not math.isfinite(frequency_hz):
            return f"frequency is not a number ({frequency_hz})"
        low, high = PLAUSIBLE_HZ
        if not low <= frequency_hz <= high:
            return f"implausible frequency {frequency_hz:g} Hz (outside {low:g}..{high:g})"
        if measured_at_s is not None:
            age_s = now_s - measured_at_s
            if not math.isfinite(age_s) or age_s > self.config.max_measurement_age_s:
                return f"stale frequency ({age_s:.1f} s old, max {self.config.max_measurement_age_s:g} s)"
        return None


def _approach(current: float, target: float, step: float) -> float:
    if abs(target - current) <= step:
        return target
    return current + step if target > current else current - step
