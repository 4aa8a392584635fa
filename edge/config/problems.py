"""pydantic's validation errors, told as a field engineer reads them: the line of the key at
fault, its key path, and a message in plain words, with "did you mean" where a name is close.

Where a model's own check names a key at the start of its message (``points.p_set: unknown
signal``, ``soc_min_pct (10) must be below ...``), the problem points at that key's line.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from edge.config.yamlsource import ProfileProblem, YamlDocument, did_you_mean, path_loc, path_text

_NUMBER_TYPES = ("float_parsing", "int_parsing", "int_from_float", "float_type", "int_type", "bool_parsing",
                 "bool_type", "string_type", "path_type", "int_parsing_size")
_MAPPING_TYPES = ("model_type", "model_attributes_type", "dict_type")


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, bool):
        return f"{value!r} (a yes/no value)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return repr(value)


def clean_loc(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """pydantic's location with its own parts (union tags, validator names) taken out."""
    out: list[Any] = []
    current = data
    for part in loc:
        if isinstance(current, dict):
            if part in current:
                out.append(part)
                current = current[part]
                continue
            if isinstance(part, str) and (part in [v for v in current.values() if isinstance(v, str)]
                                          or part.startswith("function-") or "[" in part):
                continue  # a discriminated union's tag (the asset's driver) or a validator's name
            out.append(part)
            current = None
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            out.append(part)
            current = current[part]
        elif isinstance(part, str) and out and current is not None and not isinstance(current, (dict, list)):
            continue  # a union member's name under a scalar ("float", "lax-or-strict[...]")
        else:
            out.append(part)
            current = None
    return tuple(out)


def _members(annotation: Any) -> list[Any]:
    """The types an annotation allows, Annotated/Optional/Union unwrapped."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _model_at(root: type[BaseModel], loc: tuple[Any, ...], data: Any) -> type[BaseModel] | None:
    """The model whose keys are at ``loc`` in ``data`` (a union's member chosen by the data's tag)."""
    candidates: list[Any] = [root]
    value = data
    for part in loc:
        model = _pick(candidates, value)
        if model is None:
            return None
        info = model.model_fields.get(part) if isinstance(part, str) else None
        if info is not None:
            candidates = _members(info.annotation)
            value = value.get(part) if isinstance(value, dict) else None
            continue
        # a list or dict of models: the part is the index or the key
        inner = [a for c in candidates for a in typing.get_args(c)[-1:]] if candidates else []
        candidates = [m for a in inner for m in _members(a)]
        value = value[part] if isinstance(value, (list, dict)) and _has(value, part) else None
    return _pick(candidates, value)


def _has(container: Any, part: Any) -> bool:
    if isinstance(container, list):
        return isinstance(part, int) and 0 <= part < len(container)
    return part in container


def _pick(candidates: list[Any], value: Any) -> type[BaseModel] | None:
    # a list[...] or dict[...] annotation still to be indexed
    flat = []
    for candidate in candidates:
        if typing.get_origin(candidate) in (list, dict):
            return None
        flat.append(candidate)
    models = [c for c in flat if isinstance(c, type) and issubclass(c, BaseModel)]
    if len(models) <= 1:
        return models[0] if models else None
    if isinstance(value, dict):  # a discriminated union: the member whose Literal tag matches
        for model in models:
            for name, info in model.model_fields.items():
                args = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is typing.Literal else ()
                if args and value.get(name) in args and name in ("driver", "mode", "kind"):
                    return model
    return None


def _choices(expected: str) -> list[str]:
    return [m.group(1) if m.group(1) is not None else m.group(2)
            for m in re.finditer(r"'([^']*)'|([^,\s']+)", expected) if (m.group(2) or "") != "or"]


def _unknown_key(loc: tuple[Any, ...], root: type[BaseModel], data: Any) -> str:
    model = _model_at(root, loc[:-1], data)
    key = loc[-1]
    if model is None:
        return "unknown key (check the spelling; see docs/profile.md)"
    allowed = list(model.model_fields)
    hint = did_you_mean(key, allowed)
    if hint:
        return f"unknown key{hint}"
    if len(allowed) <= 12:
        return f"unknown key (the keys here: {', '.join(allowed)})"
    return "unknown key (check the spelling; see docs/profile.md)"


def _relocate(loc: tuple[Any, ...], message: str, doc: YamlDocument) -> tuple[tuple[Any, ...], str]:
    """A model's own check that names a key first points at that key's line."""
    named = re.match(r"([A-Za-z_]\w*(?:\.\w+|\[\d+\])*)(: | \(| )", message)
    if not named:
        return loc, message
    key = path_loc(named.group(1))
    rest = message[named.end():] if named.group(2) == ": " else message
    for candidate in (loc + key, key):
        if doc.has(candidate):
            return candidate, rest
    if named.group(2) == ": " and len(key) > 1 and doc.has(loc + key[:1]):  # points.x: the map is there, not x
        return loc + key, rest
    if named.group(2) == ": " and not loc:
        return key, rest
    return loc, message


def _suggest_from_list(message: str) -> str:
    """A model's check that lists the names it knows, "(available: ...)": say which one was meant."""
    listed = re.search(r" \((?:available|known|expected one of): ([^)]*)\)", message)
    if not listed:
        return message
    before = message[:listed.start()]
    named = re.findall(r"'([^']+)'", before) or re.findall(r"(?:^|\.)(\w+): ", before)
    if not named:
        return message
    hint = did_you_mean(named[-1], [n.strip() for n in listed.group(1).split(",")])
    return before + hint + message[listed.end():] if hint else message


def _template_loc(loc: tuple[Any, ...], message: str, doc: YamlDocument) -> tuple[Any, ...]:
    """A template that cannot be had is the fault of the ``template`` key, where there is one."""
    if "template" in message and doc.has(loc + ("template",)):
        return loc + ("template",)
    return loc


def problems_from(error: ValidationError, doc: YamlDocument, root: type[BaseModel]) -> list[ProfileProblem]:
    """Each of pydantic's errors as a problem at its line, in plain words."""
    problems: list[ProfileProblem] = []
    seen: set[tuple[Any, ...]] = set()
    for item in error.errors():
        kind = item["type"]
        loc = clean_loc(tuple(item["loc"]), doc.data)
        given = item.get("input")
        ctx = item.get("ctx") or {}
        message = item["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        if kind == "extra_forbidden":
            message = _unknown_key(loc, root, doc.data)
        elif kind == "missing":
            message = "required key is missing"
        elif kind == "literal_error":
            expected = ctx.get("expected", "")
            hint = did_you_mean(given, _choices(expected))
            if not isinstance(given, str) and str(given) in _choices(expected) and f"'{given}'" in expected:
                hint = f" (write it in quotes: \"{given}\"; unquoted, YAML reads a number)"
            message = f"must be {expected}, got {_kind(given)}{hint}"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            tag = ctx.get("discriminator", "").strip("'")
            loc += (tag,)
            names = _choices(ctx.get("expected_tags", ""))
            if kind == "union_tag_invalid":
                got = given.get(tag) if isinstance(given, dict) else given
                message = f"unknown {tag} {got!r}" + (did_you_mean(got, names) or f" (expected one of: {', '.join(names)})")
            else:
                message = "required key is missing" + (f" (one of: {', '.join(names)})" if names else "")
        elif kind == "string_pattern_mismatch":
            message = f"must be letters, digits, '_', '.' or '-' (at most 64), got {_kind(given)}"
        elif kind in _MAPPING_TYPES:
            message = f"must be a mapping (`key: value` lines indented below it), got {_kind(given)}"
        elif kind == "list_type":
            message = f"must be a list (lines starting with '- '), got {_kind(given)}"
        elif kind == "invalid_key":
            message = f"keys must be text, got {given!r}"
        elif kind in _NUMBER_TYPES:
            message = f"{message[0].lower()}{message[1:]}, got {_kind(given)}"
        elif kind == "value_error":
            message = _suggest_from_list(message)
            loc, message = _relocate(loc, message, doc)
            loc = _template_loc(loc, message, doc)
        if (loc, message) in seen:
            continue
        seen.add((loc, message))
        problems.append(ProfileProblem(doc.name, doc.line_of(loc), path_text(loc), message))
    return problems
