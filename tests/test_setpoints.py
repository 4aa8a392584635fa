"""Setpoint validation: every rejection names its reason; nothing invalid is accepted."""

from __future__ import annotations

import json
import math

import pytest

from edge.config.profile import Control
from edge.control.setpoints import SetpointRejected, SetpointValidator, iso_time, parse_time

NOW = 1_800_000_000.0
BAND = dict(band_up_kw=50.0, band_down_kw=50.0)


def message(**fields) -> bytes:
    payload = {"id": "sp-1", "ts": iso_time(NOW), "valid_s": 10, "activation_kw": 5.0}
    payload.update(fields)
    return json.dumps({k: v for k, v in payload.items() if v is not ...}).encode()


@pytest.fixture
def validator():
    return SetpointValidator(Control())


def test_accepts_a_good_setpoint(validator):
    setpoint = validator.validate(message(), NOW, in_force=None, **BAND)
    assert setpoint.id == "sp-1" and setpoint.activation_kw == 5.0
    assert setpoint.expires_at == pytest.approx(NOW + 10)


def test_epoch_ts_and_expires_at(validator):
    setpoint = validator.validate(message(ts=NOW - 1, valid_s=..., expires_at=iso_time(NOW + 5)), NOW, in_force=None, **BAND)
    assert setpoint.expires_at == pytest.approx(NOW + 5)


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xff\xfe", "not valid JSON"),
        (message(id=""), "id: must be a non-empty string"),
        (message(id=7), "id: must be a non-empty string"),
        (message(activation_kw="5"), "activation_kw: must be a number, got str"),
        (message(activation_kw=True), "activation_kw: must be a number"),
        (message(activation_kw=...), "activation_kw: must be a number, got nothing"),
        (b'{"id":"x","ts":1800000000,"valid_s":10,"activation_kw":NaN}', "activation_kw: must be finite"),
        (b'{"id":"x","ts":1800000000,"valid_s":10,"activation_kw":Infinity}', "activation_kw: must be finite"),
        (message(valid_s=0), "valid_s: must be in (0, 3600]"),
        (message(valid_s=...), "give exactly one of valid_s or expires_at"),
        (message(expires_at=iso_time(NOW + 5)), "give exactly one of valid_s or expires_at"),
        (message(ts="yesterday"), "ts: not an ISO 8601 time"),
        (message(ts="2027-01-15T10:00:00"), "ts: ISO time needs a zone"),
        (message(ts=iso_time(NOW + 30)), "ts: 30.0 s in the future"),
        (message(ts=iso_time(NOW - 120), valid_s=3000), "ts: issued 120.0 s ago"),
        (message(ts=iso_time(NOW - 20), valid_s=10), "expired 10.0 s ago"),
        (message(activation_kw=60.0), "beyond the site's upward band of 50.000 kW"),
        (message(activation_kw=-56.0), "beyond the site's downward band of 50.000 kW"),
        (message(extra=1), "unknown field(s): extra"),
    ],
)
def test_rejections_name_the_problem(validator, raw, reason):
    with pytest.raises(SetpointRejected) as caught:
        validator.validate(raw, NOW, in_force=None, **BAND)
    assert reason in caught.value.reason


def test_rejection_keeps_the_id_for_the_ack(validator):
    with pytest.raises(SetpointRejected) as caught:
        validator.validate(message(id="sp-9", activation_kw="x"), NOW, in_force=None, **BAND)
    assert caught.value.setpoint_id == "sp-9"


def test_replayed_id_and_older_setpoint_are_rejected(validator):
    first = validator.validate(message(id="a", ts=iso_time(NOW - 1)), NOW, in_force=None, **BAND)
    with pytest.raises(SetpointRejected, match="replay"):
        validator.validate(message(id="a", ts=iso_time(NOW)), NOW, in_force=first, **BAND)
    with pytest.raises(SetpointRejected, match="older than the setpoint in force"):
        validator.validate(message(id="b", ts=iso_time(NOW - 2)), NOW, in_force=first, **BAND)
    newer = validator.validate(message(id="c", ts=iso_time(NOW)), NOW, in_force=first, **BAND)
    assert newer.id == "c"


def test_within_band_tolerance_is_accepted(validator):
    assert validator.validate(message(activation_kw=54.0), NOW, in_force=None, **BAND).activation_kw == 54.0


def test_parse_time_refuses_non_finite():
    with pytest.raises(SetpointRejected):
        parse_time(math.inf, "ts")
