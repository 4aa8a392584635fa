"""Schedules from the VPP and the DSO: validation, and the book of schedules in force.

Pure: no I/O, no clock (every call takes ``now_s``).  The MQTT topic and the
controller integration are wired elsewhere; docs/schedules.md describes the
contract.

A schedule is a profile over time: ``start``, ``resolution_s`` and one value
per slot, of one ``kind``:

- ``activation``: kW of activation per slot (+ = upward regulation), or null;
- ``site_power``: kW of site power at the connection point per slot (+ = export),
  or null; the activation is then (scheduled site power - site baseline);
- ``connection_limits``: ``{"import_limit_kw": x|null, "export_limit_kw": y|null}``
  per slot (magnitudes, >= 0), or null; they only ever tighten the profile's limits;
- ``tariff``: price per kWh in ``currency`` per slot (negative prices allowed).

Validation follows edge/control/setpoints.py: a schedule is accepted only when every
check passes, otherwise ``ScheduleRejected`` carries a reason that names the
field.  Times are parsed by ``edge.control.setpoints.parse_time``.

Replacement, exactly: within one kind, at every instant the schedule with the
latest ``ts`` that covers that instant decides (equal ``ts``: the one received
last), *including when its value there is null*: a newer schedule replaces the
whole overlapping part of older ones, so a VPP cancels part of a schedule by
sending nulls over it.  Outside a newer schedule's span an older one still
applies.  A late-arriving schedule with an older ``ts`` is accepted but only
fills instants no newer schedule covers.

The rules the controller applies (see ``ScheduleBook.scheduled_activation_kw``
and ``ScheduleBook.grid_limits_kw``):

1. grid-operator (DEIE) orders first, then the grid connection limits: the
   profile's, tightened (never loosened) by a ``connection_limits`` schedule;
2. then the activation: a valid real-time setpoint overrides any scheduled
   activation while it is valid; without one, the scheduled activation
   (``activation`` or ``site_power``, whichever of the two deciding schedules is
   newer); without either, the fallback ramp or zero as before.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Sequence

from pydantic import Field

from edge.uplink.intake import InboundRejected, bounded, check_model, load_message
from edge.uplink.messages import ScheduleMessage
from edge.config.types import Strict, _ranged
from edge.control.setpoints import SetpointRejected, parse_time

ScheduleKind = Literal["activation", "site_power", "connection_limits", "tariff", "baseline"]
KINDS: tuple[str, ...] = ("activation", "site_power", "connection_limits", "tariff", "baseline")
LIMIT_FIELDS = frozenset({"import_limit_kw", "export_limit_kw"})

MIN_RESOLUTION_S = 60
MAX_RESOLUTION_S = 3600
DAY_S = 86400
MAX_ABS_KW = 1_000_000.0  # same bound as the profile's PositiveKw
MAX_ABS_PRICE_PER_KWH = 100_000.0  # far above any real price; catches unit mistakes (per MWh sent as per kWh is fine)
REPLAY_MEMORY = 10_000  # schedule ids remembered
MAX_SCHEDULE_BYTES = 1024 * 1024  # a week of 1-min connection-limit slots is about 520 KB


class ScheduleRules(Strict):
    """Bounds of schedule validation (a profile section once wired; defaults fit aFRR/mFRR and day-ahead use)."""

    clock_skew_tolerance_s: Annotated[float, _ranged(0.0, 300.0)] = Field(
        5.0, description="A schedule whose ts lies further in the future than this is rejected."
    )
    max_age_s: Annotated[float, _ranged(1.0, 7 * 86400.0)] = Field(
        3600.0, description="A schedule issued (ts) longer ago than this is rejected as stale."
    )
    max_start_past_s: Annotated[float, _ranged(0.0, 7 * 86400.0)] = Field(
        86400.0, description="A schedule whose start lies further in the past than this is rejected."
    )
    max_start_future_s: Annotated[float, _ranged(0.0, 31 * 86400.0)] = Field(
        7 * 86400.0, description="A schedule whose start lies further in the future than this is rejected."
    )
    max_span_s: Annotated[float, _ranged(60.0, 31 * 86400.0)] = Field(
        7 * 86400.0, description="Longest schedule accepted: slots x resolution_s (7 days by default)."
    )


class ScheduleRejected(Exception):
    """A schedule refused; ``reason`` names the field (the same shape as SetpointRejected)."""

    def __init__(self, schedule_id: str | None, reason: str):
        reason = bounded(reason)
        super().__init__(reason)
        self.schedule_id = schedule_id
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Connection limits of one slot, as magnitudes in kW; None: no limit of that direction."""

    import_limit_kw: float | None = None
    export_limit_kw: float | None = None


SlotValue = float | ConnectionLimits | None


@dataclass(frozen=True, slots=True)
class Schedule:
    id: str
    kind: str
    issued_at: float  # epoch s, the sender's ts
    start_s: float  # epoch s, start of slot 0
    resolution_s: int
    values: tuple[SlotValue, ...]
    received_at: float  # epoch s, our clock
    currency: str | None = None  # tariff only
    asset_id: str | None = None  # baseline only: the asset whose prosumption plan it is

    @property
    def book_key(self) -> str:
        """Where the book keeps it: its kind, or ``baseline:<asset id>`` (one plan per asset)."""
        return f"{self.kind}:{self.asset_id}" if self.asset_id else self.kind

    @property
    def end_s(self) -> float:
        return self.start_s + len(self.values) * self.resolution_s

    def covers(self, t_s: float) -> bool:
        return self.start_s <= t_s < self.end_s

    def slot_index(self, t_s: float) -> int | None:
        """Index of the slot containing ``t_s`` (slot k is [start + k*res, start + (k+1)*res)); None outside."""
        if not self.covers(t_s):
            return None
        return min(len(self.values) - 1, int(math.floor((t_s - self.start_s) / self.resolution_s)))

    def slot_start_s(self, index: int) -> float:
        return self.start_s + index * self.resolution_s

    def value_at(self, t_s: float) -> SlotValue:
        index = self.slot_index(t_s)
        return None if index is None else self.values[index]


@dataclass(frozen=True, slots=True)
class ScheduleSlot:
    """A stretch of time decided by one slot of one schedule (value None: that slot is null)."""

    start_s: float
    end_s: float
    value: SlotValue
    schedule_id: str


# ---------------------------------------------------------------- validation


def _number(value: Any, field: str, schedule_id: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        got = "nothing" if value is None else type(value).__name__
        raise ScheduleRejected(schedule_id, f"{field}: must be a number, got {got}")
    if not math.isfinite(value):
        raise ScheduleRejected(schedule_id, f"{field}: must be finite, got {value}")
    return float(value)


def _kw(value: Any, field: str, schedule_id: str) -> float | None:
    if value is None:
        return None
    kw = _number(value, field, schedule_id)
    if abs(kw) > MAX_ABS_KW:
        raise ScheduleRejected(schedule_id, f"{field}: {kw:g} kW is beyond ±{MAX_ABS_KW:g} kW")
    return kw


def _limit_kw(value: Any, field: str, schedule_id: str) -> float | None:
    kw = _kw(value, field, schedule_id)
    if kw is not None and kw < 0:
        raise ScheduleRejected(schedule_id, f"{field}: a limit is a magnitude and must be >= 0, got {kw:g}")
    return kw


def _limits(value: Any, field: str, schedule_id: str) -> ConnectionLimits | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ScheduleRejected(
            schedule_id, f"{field}: must be an object with import_limit_kw and/or export_limit_kw, or null, "
                         f"got {type(value).__name__}"
        )
    unknown = set(value) - LIMIT_FIELDS
    if unknown:
        raise ScheduleRejected(schedule_id, f"{field}: unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    return ConnectionLimits(
        import_limit_kw=_limit_kw(value.get("import_limit_kw"), f"{field}.import_limit_kw", schedule_id),
        export_limit_kw=_limit_kw(value.get("export_limit_kw"), f"{field}.export_limit_kw", schedule_id),
    )


def _price(value: Any, field: str, schedule_id: str) -> float:
    if value is None:
        # A tariff with holes would leave the EV planner guessing; send a shorter tariff instead.
        raise ScheduleRejected(schedule_id, f"{field}: a tariff needs a price in every slot, got null")
    price = _number(value, field, schedule_id)
    if abs(price) > MAX_ABS_PRICE_PER_KWH:
        raise ScheduleRejected(schedule_id, f"{field}: {price:g} per kWh is beyond ±{MAX_ABS_PRICE_PER_KWH:g}")
    return price


@dataclass(frozen=True, slots=True)
class ScheduleDraft:
    """A schedule whose structure is checked, not yet judged against the clock and the book."""

    schedule_id: str
    kind: ScheduleKind
    issued_at: float
    start_s: float
    resolution_s: int
    values: tuple[SlotValue, ...]
    span_s: float
    currency: str | None
    asset_id: str | None


class ScheduleValidator:
    """Stateful checks: remembers the ids accepted (replay protection across all kinds)."""

    def __init__(self, rules: ScheduleRules | None = None):
        self.rules = rules or ScheduleRules()
        self._seen_ids: OrderedDict[str, None] = OrderedDict()

    def validate(self, raw: bytes, now_s: float, book: "ScheduleBook | None" = None) -> Schedule:
        """Return the schedule, or raise ScheduleRejected with the reason.

        ``book``: the schedules in force, to refuse a tariff in another currency
        than the tariff in force.  The id is remembered only when accepted.
        """
        return self.judge(self.structure(raw), now_s, book)

    def structure(self, raw: bytes) -> "ScheduleDraft":
        """The checks that need neither the clock nor any state: safe to run in a worker thread
        for a large schedule (a week of 1-minute slots costs about 0.1 s of CPU)."""
        try:
            payload = load_message(raw, MAX_SCHEDULE_BYTES, ScheduleMessage)
        except InboundRejected as error:
            raise ScheduleRejected(error.message_id, error.reason) from None
        schedule_id = payload["id"]

        kind = payload.get("kind")
        if kind not in KINDS:
            raise ScheduleRejected(schedule_id, f"kind: must be one of {', '.join(KINDS)}, got {str(kind)[:32]!r}")
        for field in ("ts", "start", "resolution_s", "values"):
            if field not in payload:
                raise ScheduleRejected(schedule_id, f"{field}: missing")
        try:
            issued_at = parse_time(payload["ts"], "ts")
            start_s = parse_time(payload["start"], "start")
        except SetpointRejected as error:
            raise ScheduleRejected(schedule_id, error.reason) from None

        resolution = _number(payload["resolution_s"], "resolution_s", schedule_id)
        if not resolution.is_integer() or not MIN_RESOLUTION_S <= resolution <= MAX_RESOLUTION_S:
            raise ScheduleRejected(
                schedule_id, f"resolution_s: must be a whole number of seconds in {MIN_RESOLUTION_S}..{MAX_RESOLUTION_S}, "
                             f"got {resolution:g}"
            )
        resolution_s = int(resolution)
        if DAY_S % resolution_s:
            # Slots that divide the day line up with day and quarter-hour boundaries.
            raise ScheduleRejected(schedule_id, f"resolution_s: must divide 86400 (a day) evenly, got {resolution_s}")

        values = payload["values"]
        if not isinstance(values, list) or not values:
            raise ScheduleRejected(schedule_id, "values: must be a non-empty array")
        span_s = len(values) * resolution_s
        if span_s > self.rules.max_span_s:
            raise ScheduleRejected(
                schedule_id, f"values: {len(values)} slots of {resolution_s} s span {span_s / 3600:g} h, "
                             f"more than the {self.rules.max_span_s / 3600:g} h allowed"
            )

        currency = payload.get("currency")
        if kind == "tariff":
            if not (isinstance(currency, str) and len(currency) == 3 and currency.isascii()
                    and currency.isalpha() and currency.isupper()):
                raise ScheduleRejected(schedule_id, f"currency: a tariff needs an ISO 4217 code such as EUR, got {currency!r}")
        elif "currency" in payload:
            raise ScheduleRejected(schedule_id, f"currency: only a tariff has a currency, not {kind}")
        asset_id = payload.get("asset_id")
        if kind == "baseline":
            if not (isinstance(asset_id, str) and 0 < len(asset_id) <= 64):
                raise ScheduleRejected(schedule_id, f"asset_id: a baseline schedule names its asset, got {asset_id!r}")
        elif "asset_id" in payload:
            raise ScheduleRejected(schedule_id, f"asset_id: only a baseline schedule names an asset, not {kind}")

        parse_value: Callable[[Any, str, str], SlotValue] = {
            "activation": _kw, "site_power": _kw, "connection_limits": _limits, "tariff": _price, "baseline": _kw,
        }[kind]
        parsed = tuple(parse_value(value, f"values[{i}]", schedule_id) for i, value in enumerate(values))
        try:
            # The contract's model has the last word on structure (types, ranges, id forms).
            check_model(ScheduleMessage, payload)
        except InboundRejected as error:
            raise ScheduleRejected(schedule_id, error.reason) from None
        return ScheduleDraft(schedule_id, kind, issued_at, start_s, resolution_s, parsed, span_s, currency, asset_id)

    def judge(self, draft: "ScheduleDraft", now_s: float, book: "ScheduleBook | None" = None) -> Schedule:
        """The checks against the clock, the ids already seen and the book; on the loop."""
        schedule_id, kind, issued_at, start_s = draft.schedule_id, draft.kind, draft.issued_at, draft.start_s
        currency, span_s = draft.currency, draft.span_s
        rules = self.rules
        if issued_at > now_s + rules.clock_skew_tolerance_s:
            raise ScheduleRejected(
                schedule_id,
                f"ts: {issued_at - now_s:.1f} s in the future (tolerance {rules.clock_skew_tolerance_s:g} s; check clocks)",
            )
        if issued_at < now_s - rules.max_age_s:
            raise ScheduleRejected(schedule_id, f"ts: issued {now_s - issued_at:.1f} s ago (limit {rules.max_age_s:g} s)")
        if start_s < now_s - rules.max_start_past_s:
            raise ScheduleRejected(
                schedule_id, f"start: {(now_s - start_s) / 3600:.2f} h in the past (limit {rules.max_start_past_s / 3600:g} h)"
            )
        if start_s > now_s + rules.max_start_future_s:
            raise ScheduleRejected(
                schedule_id,
                f"start: {(start_s - now_s) / 3600:.2f} h in the future (limit {rules.max_start_future_s / 3600:g} h)",
            )
        end_s = start_s + span_s
        if end_s <= now_s:
            raise ScheduleRejected(schedule_id, f"values: the schedule ended {now_s - end_s:.1f} s ago")
        if schedule_id in self._seen_ids:
            raise ScheduleRejected(schedule_id, "id: already received (replay)")
        if kind == "tariff" and book is not None:
            for other in book.in_force("tariff"):
                if other.currency != currency and other.end_s > now_s:
                    raise ScheduleRejected(
                        schedule_id, f"currency: {currency} differs from the tariff in force ({other.id}, {other.currency})"
                    )
        self.remember(schedule_id)
        return Schedule(schedule_id, kind, issued_at, start_s, draft.resolution_s, draft.values, now_s, currency,
                        draft.asset_id)

    def remember(self, schedule_id: str) -> None:
        self._seen_ids[schedule_id] = None
        while len(self._seen_ids) > REPLAY_MEMORY:
            self._seen_ids.popitem(last=False)


# ---------------------------------------------------------------------- book


class ScheduleBook:
    """The schedules in force, per kind; the newest (ts, then arrival) decides each instant."""

    def __init__(self) -> None:
        self._arrivals = 0
        # Per kind, newest first, as (issued_at, arrival, schedule).
        # Keyed by kind, and "baseline:<asset id>" for the assets' baseline plans.
        self._entries: dict[str, list[tuple[float, int, Schedule]]] = {kind: [] for kind in KINDS if kind != "baseline"}

    def add(self, schedule: Schedule) -> None:
        if schedule.kind not in KINDS:
            raise ValueError(f"unknown schedule kind {schedule.kind!r}")
        self._arrivals += 1
        entries = self._entries.setdefault(schedule.book_key, [])
        entries.append((schedule.issued_at, self._arrivals, schedule))
        entries.sort(key=lambda entry: (entry[0], entry[1]), reverse=True)

    def in_force(self, kind: str) -> tuple[Schedule, ...]:
        """The schedules kept for ``kind``, newest first (some may be shadowed in part)."""
        return tuple(entry[2] for entry in self._entries.get(kind, ()))

    def deciding(self, kind: str, t_s: float) -> Schedule | None:
        """The schedule that decides instant ``t_s``: the newest covering it."""
        return self._deciding_entry(kind, t_s)[2]

    def _deciding_entry(self, kind: str, t_s: float) -> tuple[float, int, Schedule | None]:
        for entry in self._entries.get(kind, ()):
            if entry[2].covers(t_s):
                return entry
        return (-math.inf, 0, None)

    def value_at(self, kind: str, t_s: float) -> SlotValue:
        """The value in force at ``t_s``; None when no schedule covers it or the deciding slot is null."""
        schedule = self.deciding(kind, t_s)
        return None if schedule is None else schedule.value_at(t_s)

    def slots(self, kind: str, start_s: float, end_s: float) -> list[ScheduleSlot]:
        """What is decided over [start_s, end_s): in time order, each stretch within one slot of
        one schedule, clipped to the window.  Null slots are included (value None); stretches no
        schedule covers are left out."""
        if end_s <= start_s:
            return []
        cuts = {start_s, end_s}
        for _, _, schedule in self._entries.get(kind, ()):
            lo, hi = max(start_s, schedule.start_s), min(end_s, schedule.end_s)
            if lo >= hi:
                continue
            first = math.ceil((lo - schedule.start_s) / schedule.resolution_s)
            last = math.floor((hi - schedule.start_s) / schedule.resolution_s)
            cuts.update(schedule.slot_start_s(k) for k in range(first, last + 1))
            cuts.update((lo, hi))
        points = sorted(t for t in cuts if start_s <= t <= end_s)
        result: list[ScheduleSlot] = []
        last_key: tuple[str, int] | None = None
        for a, b in zip(points, points[1:]):
            if b <= a:
                continue
            # The midpoint, not ``a``: a cut computed as start + k*res may round a hair
            # below the slot boundary it stands for.
            middle = (a + b) / 2
            schedule = self.deciding(kind, middle)
            if schedule is None:
                last_key = None
                continue
            index = schedule.slot_index(middle)
            assert index is not None
            key = (schedule.id, index)
            if key == last_key and result and result[-1].end_s == a:
                result[-1] = ScheduleSlot(result[-1].start_s, b, result[-1].value, schedule.id)
            else:
                result.append(ScheduleSlot(a, b, schedule.values[index], schedule.id))
            last_key = key
        return result

    def expire(self, now_s: float) -> list[Schedule]:
        """Drop what can no longer decide anything: schedules ended by ``now_s``, and schedules
        whose remaining span [now_s, end) newer schedules cover entirely.  Returns those dropped."""
        dropped: list[Schedule] = []
        for kind, entries in self._entries.items():
            kept: list[tuple[float, int, Schedule]] = []
            for entry in entries:  # newest first: ``kept`` holds every newer survivor
                schedule = entry[2]
                lo = max(now_s, schedule.start_s)
                if schedule.end_s <= now_s or _covered(lo, schedule.end_s, [e[2] for e in kept]):
                    dropped.append(schedule)
                else:
                    kept.append(entry)
            self._entries[kind] = kept
        return dropped

    # ------------------------------------------------ rules for the controller

    def scheduled_activation_kw(self, now_s: float, site_baseline_kw: float | None) -> tuple[float | None, Schedule | None]:
        """The scheduled activation at ``now_s`` and the schedule it comes from.

        Of the deciding ``activation`` and ``site_power`` schedules, the newer
        decides.  ``site_power`` gives (scheduled site power - site baseline); it
        gives None while the baseline is unknown.  (None, schedule) also means
        the deciding slot is null: no scheduled activation then.  The controller
        uses this only while no valid real-time setpoint is in force.
        """
        candidates = [self._deciding_entry(kind, now_s) for kind in ("activation", "site_power")]
        _, _, schedule = max(candidates, key=lambda entry: (entry[0], entry[1]))
        if schedule is None:
            return None, None
        value = schedule.value_at(now_s)
        if value is None:
            return None, schedule
        assert not isinstance(value, ConnectionLimits)
        if schedule.kind == "site_power":
            if site_baseline_kw is None or not math.isfinite(site_baseline_kw):
                return None, schedule
            return value - site_baseline_kw, schedule
        return value, schedule

    def grid_limits_kw(
        self, now_s: float, import_limit_kw: float | None, export_limit_kw: float | None
    ) -> tuple[float | None, float | None]:
        """(import, export) limits in force: the profile's, tightened by a connection-limits
        schedule; a scheduled limit above the profile's is ignored (never loosened)."""
        scheduled = self.value_at("connection_limits", now_s)
        if not isinstance(scheduled, ConnectionLimits):
            return import_limit_kw, export_limit_kw
        return (_tighter(import_limit_kw, scheduled.import_limit_kw),
                _tighter(export_limit_kw, scheduled.export_limit_kw))


def _tighter(a: float | None, b: float | None) -> float | None:
    values = [v for v in (a, b) if v is not None]
    return min(values) if values else None


def _covered(lo: float, hi: float, schedules: Sequence[Schedule]) -> bool:
    """Whether the union of the schedules' spans covers [lo, hi)."""
    reach = lo
    for schedule in sorted(schedules, key=lambda s: s.start_s):
        if schedule.start_s > reach:
            break
        reach = max(reach, schedule.end_s)
        if reach >= hi:
            return True
    return reach >= hi


# ------------------------------------------------------------ resampling


def on_grid(
    slots: Sequence[ScheduleSlot],
    grid_start_s: float,
    resolution_s: float,
    count: int,
    reduce: Callable[[list[tuple[float, Any]]], Any],
) -> list[Any]:
    """Resample decided stretches (from ``ScheduleBook.slots``, in time order) onto a regular grid
    of ``count`` cells: cell i is [grid_start + i*res, grid_start + (i+1)*res).  Each cell gets
    ``reduce([(overlap_s, value), ...])`` over the non-null stretches overlapping it, or None when
    none does (a cell covered in part is reduced over the covered part only)."""
    result: list[Any] = []
    first = 0
    for i in range(count):
        lo = grid_start_s + i * resolution_s
        hi = lo + resolution_s
        while first < len(slots) and slots[first].end_s <= lo:
            first += 1
        parts: list[tuple[float, Any]] = []
        j = first
        while j < len(slots) and slots[j].start_s < hi:
            overlap = min(hi, slots[j].end_s) - max(lo, slots[j].start_s)
            if overlap > 0 and slots[j].value is not None:
                parts.append((overlap, slots[j].value))
            j += 1
        result.append(reduce(parts) if parts else None)
    return result


def time_weighted_mean(parts: list[tuple[float, float]]) -> float:
    """Reducer for prices and powers: the mean weighted by overlap."""
    return sum(w * v for w, v in parts) / sum(w for w, _ in parts)


def tightest_limits(parts: list[tuple[float, ConnectionLimits]]) -> ConnectionLimits:
    """Reducer for connection limits: the tightest of each direction over the cell."""
    imports = [v.import_limit_kw for _, v in parts if v.import_limit_kw is not None]
    exports = [v.export_limit_kw for _, v in parts if v.export_limit_kw is not None]
    return ConnectionLimits(min(imports) if imports else None, min(exports) if exports else None)
