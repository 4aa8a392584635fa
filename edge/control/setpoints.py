"""VPP setpoints: parsing and validation of what arrives on `<prefix>/<site>/setpoint`.

A setpoint is accepted only when every check passes; otherwise it is rejected
with a reason that names the field, and it never reaches a device.  The rules
(documented in docs/mqtt-api.md):

- the payload passes edge.uplink.intake (at most 16 KiB of strict UTF-8 JSON, shallow, no
  NaN, no duplicate keys) and is a JSON object with `id` (edge.uplink.intake's id form),
  `ts` (ISO 8601 with a zone, or epoch seconds), exactly one of `valid_s`
  (0 < valid_s <= 3600) or `expires_at` (at most 3600 s after `ts`), and
  `activation_kw` (finite number, + = upward regulation): the structure that
  edge.uplink.messages.SetpointMessage documents, which checks it last;
- `ts` not more than `clock_skew_tolerance_s` in the future, nor older than
  `max_setpoint_age_s`; the setpoint not already expired;
- `id` not seen before (replay), `ts` not older than the setpoint in force;
- `activation_kw` within the site's available band in its direction, plus
  `band_tolerance_pct` (the part beyond the band is then simply not delivered).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from edge.uplink.intake import InboundRejected, bounded, check_model, excerpt, load_message
from edge.uplink.messages import EPOCH_MAX_S, EPOCH_MIN_S, MAX_ABS_KW, SetpointMessage

if TYPE_CHECKING:  # the profile imports modules that import this one (edge.control.ev_planner)
    from edge.config.profile import Control

MAX_VALID_S = 3600.0
MAX_SETPOINT_BYTES = 16 * 1024
REPLAY_MEMORY = 10_000  # ids remembered; at 1 setpoint/s that is almost 3 h


@dataclass(frozen=True, slots=True)
class Setpoint:
    id: str
    issued_at: float  # epoch s (the VPP's ts)
    expires_at: float  # epoch s
    activation_kw: float
    received_at: float  # epoch s, our clock


class SetpointRejected(Exception):
    def __init__(self, setpoint_id: str | None, reason: str):
        reason = bounded(reason)
        super().__init__(reason)
        self.setpoint_id = setpoint_id
        self.reason = reason


def parse_time(value: Any, field: str) -> float:
    """ISO 8601 with a zone, or epoch seconds, to epoch seconds."""
    if isinstance(value, bool):
        raise SetpointRejected(None, f"{field}: must be an ISO 8601 time or epoch seconds, got {value!r}")
    if isinstance(value, (int, float)):
        if not (isinstance(value, int) or math.isfinite(value)) or not EPOCH_MIN_S <= value <= EPOCH_MAX_S:
            raise SetpointRejected(
                None, f"{field}: must be epoch seconds in {EPOCH_MIN_S:.0f}..{EPOCH_MAX_S:.0f} (2001..2100), got {excerpt(value)}")
        return float(value)
    if isinstance(value, str):
        if len(value) > 40:
            raise SetpointRejected(None, f"{field}: not an ISO 8601 time: {excerpt(value)}")
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
        except ValueError:
            raise SetpointRejected(None, f"{field}: not an ISO 8601 time: {excerpt(value)}") from None
        if parsed.tzinfo is None:
            raise SetpointRejected(None, f"{field}: ISO time needs a zone (Z or +hh:mm), got {excerpt(value)}")
        try:
            epoch_s = parsed.timestamp()
        except (OverflowError, ValueError):
            epoch_s = math.nan
        if not EPOCH_MIN_S <= epoch_s <= EPOCH_MAX_S:
            raise SetpointRejected(None, f"{field}: {excerpt(value)} is outside 2001..2100")
        return epoch_s
    raise SetpointRejected(None, f"{field}: must be an ISO 8601 time or epoch seconds, got {type(value).__name__}")


def iso_time(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _finite_number(payload: dict, field: str) -> float:
    value = payload.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SetpointRejected(None, f"{field}: must be a number, got {type(value).__name__ if value is not None else 'nothing'}")
    # An int is finite, and math.isfinite would overflow on a huge one.
    if isinstance(value, float) and not math.isfinite(value):
        raise SetpointRejected(None, f"{field}: must be finite, got {value}")
    if abs(value) > MAX_ABS_KW:
        raise SetpointRejected(None, f"{field}: {excerpt(value)} is beyond +/-{MAX_ABS_KW:g}")
    return float(value)


class SetpointValidator:
    """Stateful checks: remembers ids seen and the ts of the setpoint in force."""

    def __init__(self, control: Control, band_tolerance_pct: float = 10.0):
        self.control = control
        self.band_tolerance_pct = band_tolerance_pct
        self._seen_ids: OrderedDict[str, None] = OrderedDict()

    def validate(
        self,
        raw: bytes,
        now: float,
        band_up_kw: float,
        band_down_kw: float,
        in_force: Setpoint | None,
    ) -> Setpoint:
        """Return the setpoint, or raise SetpointRejected with the reason."""
        try:
            payload = load_message(raw, MAX_SETPOINT_BYTES, SetpointMessage)
        except InboundRejected as error:
            raise SetpointRejected(error.message_id, error.reason) from None
        setpoint_id = payload["id"]
        try:
            issued_at = parse_time(payload.get("ts"), "ts")
            if ("valid_s" in payload) == ("expires_at" in payload):
                raise SetpointRejected(setpoint_id, "give exactly one of valid_s or expires_at")
            if "valid_s" in payload:
                valid_s = _finite_number(payload, "valid_s")
                if not 0 < valid_s <= MAX_VALID_S:
                    raise SetpointRejected(setpoint_id, f"valid_s: must be in (0, {MAX_VALID_S:g}], got {valid_s:g}")
                expires_at = issued_at + valid_s
            else:
                expires_at = parse_time(payload["expires_at"], "expires_at")
                if expires_at - issued_at > MAX_VALID_S:
                    raise SetpointRejected(
                        setpoint_id, f"expires_at: {expires_at - issued_at:.0f} s after ts, more than {MAX_VALID_S:g} s")
            activation_kw = _finite_number(payload, "activation_kw")
            # The contract's model has the last word on structure (types, ranges, id form).
            check_model(SetpointMessage, payload)
        except InboundRejected as error:
            raise SetpointRejected(setpoint_id, error.reason) from None
        except SetpointRejected as error:
            raise SetpointRejected(setpoint_id, error.reason) from None

        control = self.control
        if issued_at > now + control.clock_skew_tolerance_s:
            raise SetpointRejected(
                setpoint_id,
                f"ts: {issued_at - now:.1f} s in the future (tolerance {control.clock_skew_tolerance_s:g} s; check clocks)",
            )
        if issued_at < now - control.max_setpoint_age_s:
            raise SetpointRejected(setpoint_id, f"ts: issued {now - issued_at:.1f} s ago (limit {control.max_setpoint_age_s:g} s)")
        if expires_at <= now:
            raise SetpointRejected(setpoint_id, f"expired {now - expires_at:.1f} s ago")
        if expires_at <= issued_at:
            raise SetpointRejected(setpoint_id, "expires_at: must be after ts")
        if setpoint_id in self._seen_ids:
            raise SetpointRejected(setpoint_id, "id: already received (replay)")
        if in_force is not None and issued_at < in_force.issued_at:
            raise SetpointRejected(
                setpoint_id, f"ts: older than the setpoint in force ({in_force.id}, {in_force.issued_at - issued_at:.3f} s newer)"
            )
        factor = 1.0 + self.band_tolerance_pct / 100.0
        if activation_kw > 0 and activation_kw > band_up_kw * factor + 1e-6:
            raise SetpointRejected(
                setpoint_id, f"activation_kw: {activation_kw:g} kW is beyond the site's upward band of {band_up_kw:.3f} kW"
            )
        if activation_kw < 0 and -activation_kw > band_down_kw * factor + 1e-6:
            raise SetpointRejected(
                setpoint_id, f"activation_kw: {activation_kw:g} kW is beyond the site's downward band of {band_down_kw:.3f} kW"
            )
        self.remember(setpoint_id)
        return Setpoint(setpoint_id, issued_at, expires_at, activation_kw, now)

    def remember(self, setpoint_id: str) -> None:
        """Record an id so that the same setpoint is never applied twice."""
        self._seen_ids[setpoint_id] = None
        while len(self._seen_ids) > REPLAY_MEMORY:
            self._seen_ids.popitem(last=False)
