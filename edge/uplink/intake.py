"""The front door for what arrives over MQTT: bytes to a checked JSON object, or a short reason.

Every inbound message (setpoint, schedule, EV preferences) passes here before any
field is looked at, so that nothing hostile reaches the validators, the controller
or a device, and nothing it carries can later break the gateway's own messages:

- bounded size (per topic) and nesting depth, checked *before* parsing (deep nesting
  would raise RecursionError inside ``json``);
- strict UTF-8: ``json.loads(bytes)`` would accept lone surrogates (``ED A0 80``) that
  later fail to encode; escaped ones (``"\\ud800"``) are refused after parsing;
- JSON as the RFC has it: no NaN or Infinity (refused naming the field), no duplicate keys, no integer literal
  longer than ``MAX_INT_DIGITS`` (Python refuses over 4,300 digits with ValueError,
  and a huge int would overflow ``math.isfinite``), no float that rounds to infinity,
  each refused naming its field;
- a structural check against the pydantic model that documents the message
  (edge/uplink/messages.py), reported as one short reason naming the field.

Reasons are bounded (``bounded()``) and echo no more than a short, escaped excerpt of
what was sent: they go into the ack, an event and a log line.
"""

from __future__ import annotations

import json
import re
from array import array
from itertools import accumulate
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

MAX_DEPTH = 16  # the deepest message (a schedule of limit objects) needs 3
MAX_INT_DIGITS = 20  # 10**20 kW or s is far past any real figure, still exact as a float
MAX_REASON_CHARS = 240
MAX_UNKNOWN_NAMED = 5

# Letters, digits and . _ : @ -, starting with a letter or digit: safe in a log line, a
# file name and an MQTT topic level (no / + # or spaces), and what UUIDs, ISO times and
# the usual "vpp-000123" ids are made of.
MESSAGE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
MESSAGE_ID_RULE = "a non-empty string of at most 128 characters: A-Z a-z 0-9 . _ : @ -, the first a letter or digit"
_MESSAGE_ID = re.compile(MESSAGE_ID_PATTERN)

# To measure nesting outside strings: escapes removed first, then strings are plain "...".
_ESCAPE = re.compile(r"\\.", re.S)
_PLAIN_STRING = re.compile(r'"[^"]*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEPS = str.maketrans({"[": "\x01", "{": "\x01", "]": "\xff", "}": "\xff"})
# Where an escaped UTF-16 surrogate may stand (a false alarm, such as an escaped backslash
# before "ud8", only costs the walk that then finds nothing).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

Model = TypeVar("Model", bound=BaseModel)


class InboundRejected(Exception):
    """A message refused; ``reason`` is short, names the field, and is safe to publish."""

    def __init__(self, reason: str, message_id: str | None = None):
        reason = bounded(reason)
        super().__init__(reason)
        self.reason = reason
        self.message_id = message_id


# Control characters (C0, DEL, C1) escaped: a reason goes into a log line, and a sender must
# not be able to start a forged line or drive a terminal with it.
_CONTROL_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}


def bounded(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` made encodable, control characters escaped, cut to ``limit`` characters, saying how much was cut."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8").translate(_CONTROL_ESCAPES)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} characters cut)"


def excerpt(value: Any, limit: int = 32) -> str:
    """A short, escaped rendering of a value someone sent, for a reason."""
    if isinstance(value, str):
        shown = repr(value[:limit]) + ("..." if len(value) > limit else "")
    elif isinstance(value, (dict, list)):
        shown = f"{type(value).__name__} of {len(value)}"
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        shown = f"an integer of about {int(value.bit_length() * 0.30103)} digits"  # repr() refuses > 4300 digits
    else:
        shown = repr(value)[:limit]
    return shown.encode("ascii", "backslashreplace").decode("ascii")


def readable_id(value: Any) -> str | None:
    """``value`` when it is a well-formed message id (safe to echo in an ack), else None."""
    return value if isinstance(value, str) and _MESSAGE_ID.fullmatch(value) else None


def check_message_id(value: Any, field: str = "id") -> str:
    if not isinstance(value, str):
        got = "nothing" if value is None else type(value).__name__
        raise InboundRejected(f"{field}: must be {MESSAGE_ID_RULE}, got {got}")
    if not _MESSAGE_ID.fullmatch(value):
        raise InboundRejected(f"{field}: must be {MESSAGE_ID_RULE}, got {excerpt(value)}")
    return value


def load_object(raw: bytes, max_bytes: int, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """Parse ``raw`` as a JSON object under the rules above, or raise InboundRejected."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise InboundRejected(f"payload: expected bytes, got {type(raw).__name__}")
    if len(raw) > max_bytes:
        raise InboundRejected(f"payload: {len(raw)} bytes, more than the {max_bytes} allowed")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as error:
        raise InboundRejected(f"not valid JSON: invalid UTF-8 at byte {error.start}") from None
    depth = _nesting_depth(text, max_depth)
    if depth > max_depth:
        raise InboundRejected(f"not valid JSON: nested more than {max_depth} levels deep")
    suspect = _Suspect()
    try:
        payload = json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_constant=suspect.constant,  # NaN, Infinity: refused below, naming the field
            parse_int=suspect.integer,
            parse_float=suspect.float,  # a literal past the range becomes inf: refused below
        )
    except InboundRejected:
        raise
    except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise InboundRejected(f"not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise InboundRejected(f"must be a JSON object, got {type(payload).__name__}")
    # The walk that names the bad field runs only when there is something to find: a
    # week-long schedule of 30,000 values would otherwise cost tens of ms on the loop.
    if suspect.seen or _SURROGATE_ESCAPE.search(text):
        try:
            _check_values(payload, "")
        except InboundRejected as error:  # the ack can still name a well-formed id
            raise InboundRejected(error.reason, readable_id(payload.get("id"))) from None
    return payload


class _Suspect:
    """json.loads hooks that note a value the walk must find: NaN, infinity, a huge integer."""

    __slots__ = ("seen",)

    def __init__(self):
        self.seen = False

    def constant(self, name: str) -> float:
        self.seen = True
        return float(name)

    def integer(self, literal: str) -> int | "_HugeInt":
        if len(literal) > MAX_INT_DIGITS:  # a sign counts: cheap, and the walk decides
            digits = len(literal.lstrip("-"))
            if digits > MAX_INT_DIGITS:
                self.seen = True
                return _HugeInt(digits)
        return int(literal)

    def float(self, literal: str) -> float:
        value = float(literal)
        if value - value != 0.0:  # inf (a finite literal cannot be NaN)
            self.seen = True
        return value


def load_message(raw: bytes, max_bytes: int, model: type[BaseModel]) -> dict[str, Any]:
    """``load_object``, then the head every identified message shares: a well-formed ``id`` and
    no field ``model`` does not know.  InboundRejected carries the id when it is well-formed."""
    payload = load_object(raw, max_bytes)
    try:
        check_message_id(payload.get("id"))
        check_known_fields(model, payload)
    except InboundRejected as error:
        raise InboundRejected(error.reason, readable_id(payload.get("id"))) from None
    return payload


def check_known_fields(model: type[BaseModel], payload: dict[str, Any]) -> None:
    """Unknown fields by name (the first few, then a count): thousands of them cost one pass."""
    unknown = [key for key in payload if key not in model.model_fields]
    if unknown:
        named = ", ".join(excerpt(key).strip("'") for key in sorted(unknown)[:MAX_UNKNOWN_NAMED])
        more = f" and {len(unknown) - MAX_UNKNOWN_NAMED} more" if len(unknown) > MAX_UNKNOWN_NAMED else ""
        raise InboundRejected(f"unknown field(s): {named}{more}")


def check_model(model: type[Model], payload: dict[str, Any]) -> Model:
    """Validate ``payload`` against ``model`` (strict); one short reason naming the first bad field."""
    check_known_fields(model, payload)
    try:
        return model.model_validate(payload, strict=True)
    except ValidationError as error:
        raise InboundRejected(describe(error)) from None


def describe(error: ValidationError) -> str:
    """The first problem of a pydantic error as ``field: what``, plus how many more there were."""
    problems = error.errors(include_url=False, include_context=True, include_input=True)
    first = problems[0]
    where = _location(first["loc"])
    kind, message, value = first["type"], first["msg"], first.get("input")
    if kind == "missing":
        what = "missing"
    elif kind in ("float_type", "int_type", "float_parsing", "int_parsing"):
        what = f"must be a number, got {_type_name(value)}"
    elif kind == "finite_number":
        what = "must be finite"
    elif kind == "string_type":
        what = f"must be a string, got {_type_name(value)}"
    elif kind == "string_pattern_mismatch":
        what = f"does not have the form asked for, got {excerpt(value)}"
    else:
        what = message[:1].lower() + message[1:]
        if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            what += f", got {excerpt(value)}"
    more = len({_location(p["loc"]) for p in problems}) - 1
    return f"{where}: {what}" + (f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else "")


def _location(loc: tuple) -> str:
    """('values', 3, 'float') -> 'values[3]': union member tags are not field names."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and (part in _UNION_TAGS or "[" in part or part.startswith("function-")):
            continue
        else:
            text += ("." if text else "") + str(part)
    return text or "payload"


_UNION_TAGS = frozenset({"str", "float", "int", "bool", "none", "list", "dict", "constrained-str", "constrained-float"})


def _type_name(value: Any) -> str:
    return "nothing" if value is None else {"str": "str", "bool": "bool", "dict": "object", "list": "array"}.get(
        type(value).__name__, type(value).__name__)


def _nesting_depth(text: str, max_depth: int) -> int:
    """The deepest nesting of ``text`` outside its strings; 0 when it cannot exceed ``max_depth``."""
    if text.count("{") + text.count("[") <= max_depth:  # the common flat message: nothing to count
        return 0
    # Without its escapes (\" among them), a string is just "...": every step below is linear,
    # whatever the text (a string regex with escapes rescans an unclosed string from every quote).
    plain = _ESCAPE.sub("", text)
    if plain.count('"') % 2:
        raise InboundRejected("not valid JSON: a string is not closed")
    # Brackets outside strings as signed bytes (+1 opens, -1 closes); their running sum is the depth.
    brackets = _NOT_BRACKET.sub("", _PLAIN_STRING.sub("", plain)).translate(_BRACKET_STEPS)
    return max(accumulate(array("b", brackets.encode("latin-1"))), default=0)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InboundRejected(f"{excerpt(key).strip(chr(39))}: given more than once")
            seen.add(key)
    return result


class _HugeInt:
    """An integer literal too long to be a real figure; refused by ``_check_values``, naming its field."""

    __slots__ = ("digits",)

    def __init__(self, digits: int):
        self.digits = digits




def _check_values(value: Any, where: str) -> None:
    """Every string encodable, every number finite: what the gateway may later echo or compute with."""
    if isinstance(value, str):
        _encodable(value, where)
    elif isinstance(value, _HugeInt):
        raise InboundRejected(f"{bounded(where, 64)}: an integer of {value.digits} digits is out of range "
                              f"(at most {MAX_INT_DIGITS})")
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise InboundRejected(f"{bounded(where, 64)}: must be finite, got {value} (NaN and Infinity are not JSON numbers)")
    elif isinstance(value, dict):
        for key, item in value.items():
            _encodable(key, where or "payload")
            _check_values(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_values(item, f"{where}[{index}]")


def _encodable(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        where = bounded(where, 64)
        raise InboundRejected(f"{where}: has a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text") from None
