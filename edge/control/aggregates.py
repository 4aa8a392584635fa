"""Wall-clock interval aggregates of the telemetry: 1-min consumption data, 15-min validation data.

MAESHA asks for consumption data every minute (IE-02-01) and validation data
(baseline, P, U) every 15 minutes (IE-03-01).  :class:`Aggregator` is fed the
telemetry message of every control cycle (with the voltages the daemon reads)
and returns the finished messages of the intervals that sample closed.  It is
pure: no I/O and no clock of its own (times come from the caller), so the
control cycle can call it inline.

Intervals
    ``[k * interval_s, (k + 1) * interval_s)`` in Unix time, which has no leap
    seconds: whole UTC minutes and quarter hours.  An interval closes at the
    first sample at or after its end.

Integration
    Between two consecutive samples a quantity is taken to move linearly
    (trapezoidal rule).  A segment that straddles an interval boundary is split
    there at the interpolated value, so the energies of consecutive intervals
    add up to the integral over both.  Export (+) and import (-) are integrated
    separately, a segment that crosses zero being split at the zero.  Means are
    time-weighted over the covered time; min and max are over the samples in
    the interval and the interpolated values at its edges, so that
    ``min <= mean <= max`` always holds.

Coverage and gaps
    A segment counts only when both its samples are valid (finite numbers) and
    at most ``GAP_CYCLES`` control cycles apart; anything else is a gap, neither
    integrated nor covered.  ``coverage_pct`` is the covered share of the
    interval, so an offline asset, a stalled daemon or a restart shows as
    coverage below 100 instead of being averaged away.  Energies are what was
    measured in the covered time, never extrapolated; with nothing covered
    they and the means are None.

Partial intervals
    ``partial`` is true when the gateway's sampling did not run across the
    interval's start or its end: the first interval after a start (it began
    before the daemon did), the last one before a stop (:meth:`Aggregator.flush`),
    and the intervals on either side of a clock jump or of a stall longer than
    the gap limit.  An interval in which the gateway took no sample at all is
    not reported: its absence (and the neighbours' coverage) is the gap.

Clock jumps
    With ``mono_s`` (``time.monotonic()``) given, a wall-clock step of more than
    ``CLOCK_JUMP_TOLERANCE_S`` between two samples is told apart from a stall;
    the segment across it is not integrated.  After a step back, the interval
    in progress is closed (partial) and a new one opened (partial) even if it
    has the same start: consumers may then see an interval twice, both partial,
    as they do after a restart within an interval.

Public API::

    Aggregator(site_id, consumption_interval_s=60.0, validation_interval_s=900.0)
    aggregator.add(telemetry, site_voltage_v=None, asset_voltages_v=None, *, at_s=None, mono_s=None)
        -> list[(stream, payload)]     # stream "consumption" | "validation"; payload without seq
    aggregator.flush(at_s) -> list[(stream, payload)]   # close the open intervals, partial (at shutdown)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping

from edge.control.setpoints import iso_time

__all__ = [
    "Aggregator",
    "CONSUMPTION_INTERVAL_S",
    "VALIDATION_INTERVAL_S",
    "GAP_CYCLES",
    "CLOCK_JUMP_TOLERANCE_S",
]

CONSUMPTION_INTERVAL_S = 60.0  # MAESHA IE-02-01
VALIDATION_INTERVAL_S = 900.0  # MAESHA IE-03-01, and the European settlement period
# Samples further apart than this many cycles are a gap.  3.5 bridges one or two
# missed cycles (a late cycle skips ticks) plus scheduling jitter, not more.
GAP_CYCLES = 3.5
CLOCK_JUMP_TOLERANCE_S = 1.0  # wall-clock vs monotonic disagreement that counts as a step
_DEFAULT_CYCLE_S = 2.0  # when a telemetry message lacks a usable cycle_s
_SECONDS_PER_HOUR = 3600.0

_P, _BASELINE, _ACTIVATION, _VOLTAGE = "p_kw", "baseline_kw", "activation_kw", "voltage_v"
_SITE: None = None  # entity key of the site; assets are keyed by their id

Entity = str | None
Values = dict[tuple[Entity, str], float]  # valid (finite) values of one sample only


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _epoch_s(ts: Any) -> float:
    if not isinstance(ts, str):
        raise ValueError(f"telemetry ts must be an ISO 8601 string, got {ts!r}")
    moment = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"telemetry ts has no time zone: {ts!r}")
    return moment.timestamp()


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


@dataclass(slots=True)
class _Quantity:
    """One quantity of one entity over one interval."""

    covered_s: float = 0.0
    integral: float = 0.0  # value x s
    positive: float = 0.0  # integral of max(value, 0), value x s
    negative: float = 0.0  # integral of max(-value, 0), value x s
    minimum: float = math.inf
    maximum: float = -math.inf

    def extreme(self, value: float) -> None:
        if value < self.minimum:
            self.minimum = value
        if value > self.maximum:
            self.maximum = value

    def add_piece(self, duration_s: float, start: float, end: float) -> None:
        """A linear piece from ``start`` to ``end`` lasting ``duration_s``."""
        self.covered_s += duration_s
        self.integral += (start + end) / 2 * duration_s
        if start >= 0 and end >= 0:
            self.positive += (start + end) / 2 * duration_s
        elif start <= 0 and end <= 0:
            self.negative -= (start + end) / 2 * duration_s
        else:  # crosses zero: two triangles
            zero_at_s = duration_s * start / (start - end)
            above, below = (start, end) if start > 0 else (end, start)
            above_s = zero_at_s if start > 0 else duration_s - zero_at_s
            self.positive += above * above_s / 2
            self.negative -= below * (duration_s - above_s) / 2
        self.extreme(start)
        self.extreme(end)

    def mean(self) -> float | None:
        return self.integral / self.covered_s if self.covered_s > 0 else None


@dataclass(slots=True)
class _EntityInterval:
    kind: str | None = None
    samples: int = 0  # samples with a valid active power
    samples_missing: int = 0  # samples without one (offline, unknown, not finite)
    quantities: dict[str, _Quantity] = field(default_factory=dict)

    def quantity(self, name: str) -> _Quantity:
        found = self.quantities.get(name)
        if found is None:
            found = self.quantities[name] = _Quantity()
        return found


@dataclass(slots=True)
class _Interval:
    index: int  # starts at index * interval_s
    partial: bool
    entities: dict[Entity, _EntityInterval] = field(default_factory=dict)

    def entity(self, key: Entity) -> _EntityInterval:
        found = self.entities.get(key)
        if found is None:
            found = self.entities[key] = _EntityInterval()
        return found


@dataclass(frozen=True, slots=True)
class _Sample:
    at_s: float
    mono_s: float | None
    values: Values
    kinds: dict[str, str | None]  # asset id -> kind, in telemetry order
    gap_s: float  # a segment ending at this sample longer than this is a gap


class _Series:
    """The intervals of one stream."""

    def __init__(self, stream: str, interval_s: float, validation: bool):
        self.stream = stream
        self.interval_s = interval_s
        self.validation = validation
        self.current: _Interval | None = None

    def _index(self, at_s: float) -> int:
        return math.floor(at_s / self.interval_s)

    def advance(self, previous: _Sample, sample: _Sample) -> list[_Interval]:
        """Integrate the segment between two continuous samples; return the intervals it closed."""
        current = self.current
        assert current is not None  # the previous sample opened it
        closed: list[_Interval] = []
        t0, t1 = previous.at_s, sample.at_s
        last_index = max(self._index(t1), current.index)
        pairs = [(key, previous.values[key], value) for key, value in sample.values.items() if key in previous.values]
        piece_start_s = t0
        while True:
            piece_end_s = min(t1, (current.index + 1) * self.interval_s)
            if piece_end_s > piece_start_s:
                at_start, at_end = (piece_start_s - t0) / (t1 - t0), (piece_end_s - t0) / (t1 - t0)
                for (entity, name), v0, v1 in pairs:
                    current.entity(entity).quantity(name).add_piece(
                        piece_end_s - piece_start_s, v0 + (v1 - v0) * at_start, v0 + (v1 - v0) * at_end
                    )
            if current.index >= last_index:
                break
            closed.append(current)
            piece_start_s = max(piece_start_s, (current.index + 1) * self.interval_s)
            current = _Interval(current.index + 1, partial=False)
        self.current = current
        return closed

    def restart(self, sample: _Sample, force_new: bool) -> list[_Interval]:
        """A discontinuity before ``sample``: close the interval in progress if the sample is not in it."""
        index = self._index(sample.at_s)
        closed: list[_Interval] = []
        if self.current is not None and (force_new or self.current.index != index):
            self.current.partial = True
            closed.append(self.current)
            self.current = None
        if self.current is None:
            self.current = _Interval(index, partial=True)
        return closed

    def record(self, sample: _Sample) -> None:
        """Count the sample and take its values into min and max."""
        interval = self.current
        assert interval is not None
        for asset_id, kind in sample.kinds.items():
            interval.entity(asset_id).kind = kind
        for key in dict.fromkeys([_SITE, *interval.entities]):  # an asset gone from telemetry counts as missing
            entity = interval.entity(key)
            if (key, _P) in sample.values:
                entity.samples += 1
            else:
                entity.samples_missing += 1
        for (key, name), value in sample.values.items():
            interval.entity(key).quantity(name).extreme(value)

    def close(self) -> _Interval | None:
        interval, self.current = self.current, None
        if interval is not None:
            interval.partial = True
        return interval

    def message(self, interval: _Interval, site_id: str, closed_at_s: float) -> dict[str, Any]:
        start_s = interval.index * self.interval_s
        site = interval.entity(_SITE)
        return {
            "ts": iso_time(closed_at_s),
            "site_id": site_id,
            "interval_start": iso_time(start_s),
            "interval_end": iso_time(start_s + self.interval_s),
            "interval_s": self.interval_s,
            "partial": interval.partial,
            "site": self._values(site),
            "assets": {key: {"kind": entity.kind, **self._values(entity)}
                       for key, entity in interval.entities.items() if key is not _SITE},
        }

    def _values(self, entity: _EntityInterval) -> dict[str, Any]:
        power = entity.quantities.get(_P, _Quantity())
        covered = power.covered_s > 0
        out: dict[str, Any] = {
            "p_mean_kw": _round(power.mean(), 3),
            "p_min_kw": _round(power.minimum, 3) if math.isfinite(power.minimum) else None,
            "p_max_kw": _round(power.maximum, 3) if math.isfinite(power.maximum) else None,
            "energy_import_kwh": round(power.negative / _SECONDS_PER_HOUR, 6) if covered else None,
            "energy_export_kwh": round(power.positive / _SECONDS_PER_HOUR, 6) if covered else None,
            "samples": entity.samples,
            "samples_missing": entity.samples_missing,
            "coverage_pct": self._coverage_pct(power),
        }
        if self.validation:
            voltage = entity.quantities.get(_VOLTAGE, _Quantity())
            out["baseline_mean_kw"] = _round(entity.quantities.get(_BASELINE, _Quantity()).mean(), 3)
            out["activation_mean_kw"] = _round(entity.quantities.get(_ACTIVATION, _Quantity()).mean(), 3)
            out["voltage_mean_v"] = _round(voltage.mean(), 2)
            out["voltage_coverage_pct"] = self._coverage_pct(voltage)
        return out

    def _coverage_pct(self, quantity: _Quantity) -> float:
        # rounding of interpolated piece ends can add up to a hair over 100
        return round(min(100.0, quantity.covered_s / self.interval_s * 100), 2)


class Aggregator:
    """Consumption (1 min) and validation (15 min) aggregates of the telemetry, aligned to UTC."""

    def __init__(self, site_id: str, consumption_interval_s: float = CONSUMPTION_INTERVAL_S,
                 validation_interval_s: float = VALIDATION_INTERVAL_S):
        for name, interval_s in (("consumption_interval_s", consumption_interval_s),
                                 ("validation_interval_s", validation_interval_s)):
            # dividing the day keeps the intervals on whole minutes / quarter hours every day
            if not (_finite(interval_s) and interval_s > 0 and (86400 / interval_s).is_integer()):
                raise ValueError(f"{name} must divide a day (86400 s) into whole intervals, got {interval_s!r}")
        self.site_id = site_id
        self._series = (
            _Series("consumption", float(consumption_interval_s), validation=False),
            _Series("validation", float(validation_interval_s), validation=True),
        )
        self._last: _Sample | None = None

    def add(
        self,
        telemetry: Mapping[str, Any],
        site_voltage_v: float | None = None,
        asset_voltages_v: Mapping[str, float | None] | None = None,
        *,
        at_s: float | None = None,
        mono_s: float | None = None,
    ) -> list[tuple[str, dict[str, Any]]]:
        """Take one cycle's telemetry; return the messages of the intervals it closed, oldest first.

        ``at_s`` (epoch s) defaults to the telemetry's ``ts``; ``mono_s`` is the
        monotonic clock at the same moment, for telling clock steps from stalls.
        """
        sample = self._sample(telemetry, site_voltage_v, asset_voltages_v, at_s, mono_s)
        previous = self._last
        closed: list[tuple[str, dict[str, Any]]] = []
        continuous, stepped_back = self._continuity(previous, sample)
        for series in self._series:
            if continuous:
                assert previous is not None
                finished = series.advance(previous, sample)
            else:
                finished = series.restart(sample, force_new=stepped_back)
            series.record(sample)
            closed += [(series.stream, series.message(interval, self.site_id, sample.at_s)) for interval in finished]
        self._last = sample
        return closed

    def flush(self, at_s: float) -> list[tuple[str, dict[str, Any]]]:
        """Close the intervals in progress as partial (the daemon is stopping); the next add() starts afresh."""
        closed = []
        for series in self._series:
            interval = series.close()
            if interval is not None:
                closed.append((series.stream, series.message(interval, self.site_id, at_s)))
        self._last = None
        return closed

    # -------------------------------------------------------------- helpers

    @staticmethod
    def _continuity(previous: _Sample | None, sample: _Sample) -> tuple[bool, bool]:
        """(integrate the segment from ``previous``, the wall clock went back)."""
        if previous is None:
            return False, False
        elapsed_s = sample.at_s - previous.at_s
        stepped = False
        if previous.mono_s is not None and sample.mono_s is not None:
            stepped = abs(elapsed_s - (sample.mono_s - previous.mono_s)) > CLOCK_JUMP_TOLERANCE_S
        continuous = not stepped and 0 < elapsed_s <= max(previous.gap_s, sample.gap_s)
        # only a sample earlier than the last one can fall into time already reported
        return continuous, elapsed_s < 0

    @staticmethod
    def _sample(telemetry: Mapping[str, Any], site_voltage_v: float | None,
                asset_voltages_v: Mapping[str, float | None] | None, at_s: float | None, mono_s: float | None) -> _Sample:
        when_s = _finite(at_s) if at_s is not None else _epoch_s(telemetry.get("ts"))
        if when_s is None:
            raise ValueError(f"at_s must be a finite number, got {at_s!r}")
        cycle_s = _finite(telemetry.get("cycle_s"))
        gap_s = GAP_CYCLES * (cycle_s if cycle_s is not None and cycle_s > 0 else _DEFAULT_CYCLE_S)
        values: Values = {}

        def put(entity: Entity, name: str, value: Any) -> None:
            number = _finite(value)
            if number is not None:
                values[(entity, name)] = number

        site = telemetry.get("site")
        site = site if isinstance(site, Mapping) else {}
        for name in (_P, _BASELINE, _ACTIVATION):
            put(_SITE, name, site.get(name))
        put(_SITE, _VOLTAGE, site_voltage_v)
        kinds: dict[str, str | None] = {}
        assets = telemetry.get("assets")
        for asset_id, asset in (assets.items() if isinstance(assets, Mapping) else ()):
            asset = asset if isinstance(asset, Mapping) else {}
            kind = asset.get("kind")
            kinds[str(asset_id)] = kind if isinstance(kind, str) else None
            for name in (_P, _BASELINE, _ACTIVATION):
                put(str(asset_id), name, asset.get(name))
            if asset_voltages_v is not None:
                put(str(asset_id), _VOLTAGE, asset_voltages_v.get(asset_id))
        return _Sample(when_s, _finite(mono_s), values, kinds, gap_s)
