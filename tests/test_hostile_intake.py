"""Hostile input on the inbound topics: every message is answered, none reaches a device
unless valid, nothing it carries breaks the gateway's own messages (issue #10, item 1).

Property-based: hypothesis builds hostile bytes and JSON (invalid UTF-8, lone surrogates,
deep nesting, huge integers, NaN, duplicate and unknown keys, ids of any form) mixed into
otherwise valid messages.  The validators are fuzzed directly; then the same generator
floods a real gateway through Mosquitto beside valid setpoints.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.control.ev_planner import EvDefaults
from edge.control.ev_sessions import EvSession, EvSessions
from edge.uplink.intake import MAX_REASON_CHARS, MESSAGE_ID_PATTERN
from edge.config.profile import Control
from edge.control.schedules import ScheduleBook, ScheduleRejected, ScheduleValidator
from edge.control.setpoints import SetpointRejected, SetpointValidator, iso_time
from edge.uplink.spool import encode_payload_checked

NOW = 1_800_000_000.0
ID = re.compile(MESSAGE_ID_PATTERN)
REASON_LIMIT = MAX_REASON_CHARS + 40  # the "... (N characters cut)" tail

# ------------------------------------------------------------ hostile values

# Raw JSON fragments (text, so that they can carry what json.dumps would never write).
HOSTILE_FRAGMENTS = [
    "NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e308", "-1e308", "1" + "0" * 400, "9" * 5000,
    "-" + "9" * 30, "0", "-0", "true", "false", "null", '""', '"\\ud800"', '"a\\udfffb"', '"\\u0000"',
    '"' + "x" * 5000 + '"', '"5"', "[]", "{}", '{"a": 1}', "[" * 2000 + "]" * 2000, '"2027-13-45T99:99:99Z"',
    '"9999-12-31T23:59:59+00:00"', '"0001-01-01T00:00:00+00:00"', '"yesterday"', '"2027-01-15T10:00:00"',
    '"vpp/1"', '"vpp#1"', '"vpp 1"', '"-starts-with-dash"', '"' + "a" * 129 + '"',
]
SURROGATE_BYTES = b"\xed\xa0\x80"
SETPOINT_FIELDS = ("id", "ts", "valid_s", "expires_at", "activation_kw")
# (field, fragment) pairs that make a valid setpoint after all: never drawn as hostile.
HARMLESS = {("id", '"5"'), ("id", '"yesterday"'), ("id", '"2027-13-45T99:99:99Z"'), ("id", '"2027-01-15T10:00:00"'),
            ("activation_kw", "0"), ("activation_kw", "-0")}
# Times are placeholders, filled in when the message is sent: a hostile message must be
# refused for what it is, not only for being stale.
NOW_MARK, START_MARK = b"__NOW__", b"__START__"


def materialize(raw: bytes, now: float) -> bytes:
    return raw.replace(NOW_MARK, str(now).encode()).replace(START_MARK, str(now - now % 900).encode())


def _text(fields: dict[str, str]) -> bytes:
    return ("{" + ",".join(f'"{key}":{value}' for key, value in fields.items()) + "}").encode("utf-8", "surrogatepass")


@st.composite
def hostile_setpoint(draw) -> bytes:
    """A setpoint with at least one thing wrong that must get it refused (times as placeholders)."""
    fields = {"id": json.dumps(f"h-{draw(st.integers(0, 10**6))}"), "ts": "__NOW__", "valid_s": "10",
              "activation_kw": json.dumps(draw(st.sampled_from([4.321, -4.321])))}
    kind = draw(st.sampled_from(["fragment", "fragment", "surrogate_bytes", "unknown", "duplicate", "deep",
                                 "expires", "missing", "bytes", "json"]))
    if kind == "fragment":
        field = draw(st.sampled_from(SETPOINT_FIELDS))
        fragment = draw(st.sampled_from([f for f in HOSTILE_FRAGMENTS if (field, f) not in HARMLESS]))
        if field == "expires_at":
            fields.pop("valid_s")
        fields[field] = fragment
        return _text(fields)
    if kind == "surrogate_bytes":
        return _text(fields).replace(b'"h-', b'"h-' + SURROGATE_BYTES, 1)
    if kind == "unknown":
        fields.update({f"x{i}": "1" for i in range(draw(st.integers(1, 3000)))})
        return _text(fields)
    if kind == "duplicate":
        return _text(fields)[:-1] + b',"activation_kw":-1000}'
    if kind == "deep":
        depth = draw(st.integers(20, 50_000))
        fields["activation_kw"] = "[" * depth + "1" + "]" * depth
        return _text(fields)
    if kind == "expires":
        fields.pop("valid_s")
        fields["expires_at"] = draw(st.sampled_from(["1e308", "4102444800", "1e11"]))
        return _text(fields)
    if kind == "missing":
        fields.pop(draw(st.sampled_from(["id", "ts", "activation_kw"])))
        return _text(fields)
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    value = draw(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
                              lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4),
                              max_leaves=12))
    return json.dumps(value).encode("utf-8", "surrogatepass")


@st.composite
def hostile_schedule(draw) -> bytes:
    """A schedule with one field broken (times as placeholders), or bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=100))
    fields = {"id": json.dumps(f"s-{draw(st.integers(0, 10**6))}"), "ts": "__NOW__", "kind": '"activation"',
              "start": "__START__", "resolution_s": "900", "values": "[1, 2, null]"}
    field = draw(st.sampled_from(sorted(fields) + ["currency", "asset_id", "extra"]))
    broken = [f for f in HOSTILE_FRAGMENTS if (field, f) not in HARMLESS]
    if field == "values":
        broken += ["[NaN]", '[{"import_limit_kw": -1}]', "[" + "1," * 50_000 + "1]", '[{"import_limit_kw": 1e999}]',
                   '["\\udc00"]']
    fields[field] = draw(st.sampled_from(broken))
    return _text(fields)


def _check_reason(reason: str) -> None:
    assert isinstance(reason, str) and reason
    assert len(reason) <= REASON_LIMIT, len(reason)
    reason.encode("utf-8")  # publishable


def _check_id(message_id) -> None:
    assert message_id is None or ID.fullmatch(message_id), message_id


# -------------------------------------------------------- the validators


@settings(max_examples=400, deadline=None)
@given(raw=hostile_setpoint())
def test_a_hostile_setpoint_is_always_refused_with_a_short_reason(raw):
    with pytest.raises(SetpointRejected) as caught:
        SetpointValidator(Control()).validate(materialize(raw, NOW), NOW, band_up_kw=50.0, band_down_kw=50.0,
                                              in_force=None)
    _check_reason(caught.value.reason)
    _check_id(caught.value.setpoint_id)


@settings(max_examples=300, deadline=None)
@given(setpoint_id=st.text(max_size=140), activation_kw=st.floats(), valid_s=st.floats() | st.integers(),
       ts=st.floats() | st.integers() | st.text(max_size=40))
def test_whatever_is_accepted_keeps_the_contract(setpoint_id, activation_kw, valid_s, ts):
    raw = json.dumps({"id": setpoint_id, "ts": ts, "valid_s": valid_s, "activation_kw": activation_kw}).encode(
        "utf-8", "surrogatepass")
    try:
        setpoint = SetpointValidator(Control()).validate(raw, NOW, band_up_kw=50.0, band_down_kw=50.0, in_force=None)
    except SetpointRejected as rejection:
        _check_reason(rejection.reason)
        _check_id(rejection.setpoint_id)
        return
    assert ID.fullmatch(setpoint.id)
    assert math.isfinite(setpoint.activation_kw) and abs(setpoint.activation_kw) <= 55.0
    assert 0 < setpoint.expires_at - setpoint.issued_at <= 3600
    assert encode_payload_checked("t", {"id": setpoint.id, "ack": iso_time(setpoint.expires_at)})[1] is None


@pytest.mark.parametrize("raw, reason", [
    (b'{"id":"a\xed\xa0\x80","ts":1800000000,"valid_s":10,"activation_kw":1}', "invalid UTF-8"),
    (b'{"id":"a\\ud800","ts":1800000000,"valid_s":10,"activation_kw":1}', "id: has a lone UTF-16 surrogate"),
    (b'{"id":"a","ts":1800000000,"valid_s":10,"activation_kw":' + b"[" * 5000 + b"]" * 5000 + b"}",
     "nested more than"),
    (b'{"id":"a","ts":1800000000,"valid_s":10,"activation_kw":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "bytes, more than the 16384 allowed"),
    (b'{"id":"a","ts":1800000000,"valid_s":10,"activation_kw":' + b"[" * 20 + b'"' + b'\\"' * 5000,
     "a string is not closed"),
    (b'{"id":"a","ts":1800000000,"valid_s":10,"activation_kw":' + b"9" * 5000 + b"}", "activation_kw: an integer of 5000 digits"),
    (b'{"id":"a","ts":1800000000,"valid_s":10,"activation_kw":' + b"1" + b"0" * 400 + b"}", "activation_kw: an integer of 401 digits"),
    (b'{"id":"a","ts":1800000000,"valid_s":' + b"1" + b"0" * 400 + b',"activation_kw":1}', "valid_s: an integer of 401"),
    (b'{"id":"a","ts":' + b"1" + b"0" * 400 + b',"valid_s":10,"activation_kw":1}', "ts: an integer of 401"),
    (b'{"id":"a","ts":1800000000,"valid_s":10,"activation_kw":1e400}', "activation_kw: must be finite"),
    (b'{"id":"a","ts":1800000000,"valid_s":10,"activation_kw":10000000000000000000}', "beyond"),
    (b'{"id":"a","ts":1800000000,"expires_at":1e308,"activation_kw":1}', "expires_at"),
    (b'{"id":"a","ts":1800000000,"valid_s":10,"activation_kw":1,"activation_kw":-40}', "given more than once"),
    (b'{"id":"vpp/1","ts":1800000000,"valid_s":10,"activation_kw":1}', "id: must be"),
    (b'{"id":"a","ts":99999999999,"valid_s":10,"activation_kw":1}', "ts: must be epoch seconds"),
    (b'{"id":"a","ts":"9999-12-31T23:59:59+00:00","valid_s":10,"activation_kw":1}', "outside 2001..2100"),
])
def test_each_hostile_setpoint_seen_in_the_field_is_refused_by_name(raw, reason):
    with pytest.raises(SetpointRejected) as caught:
        SetpointValidator(Control()).validate(raw, NOW, band_up_kw=50.0, band_down_kw=50.0, in_force=None)
    assert reason in caught.value.reason
    _check_reason(caught.value.reason)


def test_a_megabyte_of_unknown_keys_gets_a_short_reason():
    raw = json.dumps({"id": "a", "ts": NOW, "valid_s": 10, "activation_kw": 1,
                      **{f"k{i}": 1 for i in range(75_000)}}).encode()
    assert len(raw) > 900_000
    with pytest.raises(SetpointRejected) as caught:
        SetpointValidator(Control()).validate(raw, NOW, band_up_kw=50.0, band_down_kw=50.0, in_force=None)
    assert "bytes, more than" in caught.value.reason and len(caught.value.reason) < 100
    small = json.dumps({"id": "a", "ts": NOW, "valid_s": 10, "activation_kw": 1,
                        **{f"k{i}": 1 for i in range(1000)}}).encode()
    with pytest.raises(SetpointRejected) as caught:
        SetpointValidator(Control()).validate(small, NOW, band_up_kw=50.0, band_down_kw=50.0, in_force=None)
    assert caught.value.reason.startswith("unknown field(s): k0, k1, k10, k100, k101 and 995 more")


@settings(max_examples=300, deadline=None)
@given(raw=hostile_schedule())
def test_a_hostile_schedule_is_always_refused_with_a_short_reason(raw):
    with pytest.raises(ScheduleRejected) as caught:
        ScheduleValidator().validate(materialize(raw, NOW), NOW, ScheduleBook())
    _check_reason(caught.value.reason)
    _check_id(caught.value.schedule_id)


@st.composite
def hostile_preferences(draw) -> bytes:
    base = {"asset_id": '"ev1"', "departure": json.dumps(iso_time(NOW + 3600)), "energy_kwh": "10"}
    field = draw(st.sampled_from(sorted(base) + ["target_soc_pct", "battery_capacity_kwh", "ev_max_kw", "extra"]))
    base[field] = draw(st.sampled_from(HOSTILE_FRAGMENTS))
    return _text(base) if draw(st.booleans()) else draw(st.binary(max_size=80))


@settings(max_examples=300, deadline=None)
@given(raw=hostile_preferences())
def test_hostile_ev_preferences_are_refused_with_a_short_reason_or_are_valid(raw):
    sessions = EvSessions(EvDefaults(), ScheduleBook(), lambda *event: None)
    sessions.sessions["ev1"] = EvSession("ev1", NOW - 60)
    asset_id, reason = sessions.on_preferences(raw, NOW, {})
    _check_id(asset_id)
    if reason is not None:
        _check_reason(reason)
    else:
        prefs = sessions.sessions["ev1"].preferences
        json.dumps(prefs, allow_nan=False).encode("utf-8")


# ------------------------------------------------------------ on the wire


def _flood_on_the_wire(payloads: list[bytes], tmp_path, broker_port: int) -> None:
    asyncio.run(_flood(payloads, tmp_path, broker_port))


async def _flood(hostile: list[bytes], tmp_path, broker_port: int) -> None:
    from simulators.sunspec import DeviceSpec, SunSpecSimulator
    from simulators.vpp import VppSimulator
    from tests.test_gateway import SITE, make_profile, online, running_gateway, until

    cycle_s = 0.5
    valid_kw = [1.0, -2.0, 3.0, -1.5, 2.5]
    for spool in tmp_path.glob("spool.sqlite*"):
        spool.unlink()
    async with SunSpecSimulator([DeviceSpec(kind="storage", rated_kw=10.0)]) as sim:
        bess = sim.devices[0]
        profile = make_profile(tmp_path, broker_port, sim.devices, cycle_s=cycle_s)
        async with running_gateway(profile) as gateway, \
                VppSimulator("127.0.0.1", broker_port, "flexedge", SITE) as vpp:
            await until(online(vpp, 1), 10, "asset online")
            writes_before = len(bess.writes)
            telemetry_before = len(vpp.telemetry)
            started = time.monotonic()
            valid_ids = []

            async def send_valid():
                for activation_kw in valid_kw:
                    sent = await vpp.send_setpoint(activation_kw, valid_s=30)
                    valid_ids.append(sent["id"])
                    await asyncio.sleep(0.4)

            async def send_hostile():
                for index, raw in enumerate(hostile):
                    leaf = ("setpoint", "setpoint", "schedule", "ev/preferences")[index % 4]
                    await vpp.send_raw(materialize(raw, time.time()), leaf=leaf)
                    await asyncio.sleep(1 / 200)

            await asyncio.gather(send_valid(), send_hostile())
            setpoints_sent = len(valid_kw) + sum(1 for i in range(len(hostile)) if i % 4 in (0, 1))
            schedules_sent = sum(1 for i in range(len(hostile)) if i % 4 == 2)
            preferences_sent = sum(1 for i in range(len(hostile)) if i % 4 == 3)
            # every message is answered
            await until(lambda: len(vpp.acks) >= setpoints_sent, 10, f"{setpoints_sent} setpoint acks")
            await until(lambda: len(vpp.schedule_acks) >= schedules_sent, 10, "schedule acks")
            await until(lambda: len(vpp.preference_acks) >= preferences_sent, 10, "preference acks")
            await asyncio.sleep(2 * cycle_s)
            elapsed_s = time.monotonic() - started
            assert len(vpp.acks) == setpoints_sent and vpp.acks_accepted == len(valid_kw)
            assert {a["id"] for a in vpp.acks if a["status"] == "accepted"} == set(valid_ids)
            assert all(a["status"] == "rejected" for a in vpp.schedule_acks)
            for ack in [*vpp.acks, *vpp.schedule_acks, *vpp.preference_acks]:
                _check_reason(ack["reason"]) if ack["status"] == "rejected" else None
                _check_id(ack.get("id"))
            # only the valid setpoints' activations reached the battery (idle: baseline 0 kW)
            commanded_w = {round(w.value) for w in bess.writes[writes_before:] if w.point == "WSet"}
            assert commanded_w and commanded_w <= {round(kw * 1000) for kw in valid_kw} | {0}, commanded_w
            # telemetry kept its cadence: a message every cycle, seq without a gap, nothing repaired
            window = list(vpp.telemetry)[telemetry_before:]
            seqs = [m["seq"] for m in window]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
            assert len(window) >= 0.8 * elapsed_s / cycle_s, (len(window), elapsed_s)
            assert {m["setpoint_id"] for m in window} <= set(valid_ids) | {None}
            assert window[-1]["gateway"]["messages_repaired"] == 0
            assert not [e for e in vpp.events if e["type"] == "message_repaired"]
            assert gateway.controller.intake_failures == 0


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.data_too_large, HealthCheck.too_slow])
@given(hostile=st.lists(hostile_setpoint() | hostile_schedule() | hostile_preferences(), min_size=300, max_size=300))
def test_a_hostile_flood_is_answered_and_never_reaches_a_device(hostile, tmp_path, mosquitto):
    _flood_on_the_wire(hostile, tmp_path, mosquitto.port)


def test_a_reason_cannot_forge_a_log_line():
    raw = b'{"id":"x1","ts":1800000000,"valid_s":10,"activation_kw":1,"evil\\nCRITICAL forged \\u001b[2J":NaN}'
    with pytest.raises(SetpointRejected) as caught:
        SetpointValidator(Control()).validate(raw, NOW, band_up_kw=50.0, band_down_kw=50.0, in_force=None)
    reason = caught.value.reason
    assert "\n" not in reason and "\x1b" not in reason and "\\x0a" in reason, reason
    schedule = (b'{"id":"s1","ts":1800000000,"kind":"connection_limits","start":1799999100,"resolution_s":900,'
                b'"values":[{"x\\nforged":1}]}')
    with pytest.raises(ScheduleRejected) as caught:
        ScheduleValidator().validate(schedule, NOW, ScheduleBook())
    assert "\n" not in caught.value.reason, caught.value.reason
