"""What `flexedge diagnostics` hides: secrets in the profile's text, and their values anywhere else.

Two layers, so that a secret is caught even where no rule foresaw it:

* the profile's text is redacted where it holds a secret (a key such as ``password`` or
  ``token``, and OCPP's ``id_tags``): on the YAML nodes' positions when the text parses,
  line by line when it does not, so comments and line numbers stay as support needs them;
* every member of the archive then passes :class:`Scrubber`: the secret values themselves
  (the MQTT and chargers' passwords from their files or variables, the local endpoint's
  Basic auth entries, the OCPP ID tags and salt) are replaced wherever they appear, and so
  is anything that looks like a secret (a PEM private key, ``password=...``, a Basic
  ``Authorization`` header, a password in a URL).

Files that hold passwords are read (bounded) only to learn what to scrub; their contents
are never written.  Key files are never opened: a private key is caught by its PEM armour.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

REDACTED = "<redacted>"
# A value shorter than this is scrubbed in the profile only: replacing "A1" in every log
# line would make the archive unreadable, and such a tag guards nothing.
MIN_SCRUB_CHARS = 4
_MAX_SECRET_FILE_BYTES = 64 * 1024

# Profile keys whose value is a secret.  A key ending in _file or _env names where the
# secret is (a path, a variable): support needs that, so it stays.
_SECRET_KEY = re.compile(r"(?:^|_)(?:password|passwd|passphrase|secret|token|api_?key|private_key|salt|id_tags)$",
                         re.IGNORECASE)

_PATTERNS = [
    # a private key in PEM armour, complete or cut off
    (re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)"),
     "<redacted private key>"),
    # an HTTP Authorization header's credentials
    (re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?(?:basic|bearer|digest)\s+)[A-Za-z0-9+/=._~-]+"),
     rf"\g<1>{REDACTED}"),
    # password=..., "token": "...", idTag: ...  (a value that is a string or a bare word)
    (re.compile(r"(?i)((?:password|passwd|passphrase|secret|token|api_?key|id_?tag|id_?token|salt)[\"']?\s*[:=]\s*)"
                r"(\"(?:[^\"\\\n]|\\.)*\"|'[^'\n]*'|[^\s,;}\]\"'{\[]+)"),
     rf'\g<1>"{REDACTED}"'),
    # a password in a URL: scheme://user:password@host
    (re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:)[^@\s/]+@"), rf"\g<1>{REDACTED}@"),
]


class Scrubber:
    """Replaces known secret values and secret-looking text; applied to every member of the archive."""

    def __init__(self, secrets: set[str]):
        variants: set[str] = set()
        for secret in secrets:
            if len(secret) < MIN_SCRUB_CHARS:
                continue
            variants.add(secret)
            variants.add(json.dumps(secret)[1:-1])  # as it appears inside a JSON string
        # longest first, so that a secret containing another is replaced whole
        self._literals = sorted(variants, key=len, reverse=True)
        self.short_secrets = sum(1 for secret in secrets if len(secret) < MIN_SCRUB_CHARS)

    def text(self, text: str) -> str:
        for literal in self._literals:
            text = text.replace(literal, REDACTED)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def data(self, data: bytes) -> bytes:
        # surrogateescape: bytes that are not UTF-8 (a damaged log) pass through unchanged
        return self.text(data.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")


# --------------------------------------------------------------- the profile's text


def redact_profile(text: str) -> tuple[str, str, set[str]]:
    """(the text with every secret value replaced, how: "yaml nodes" or "line by line", the values replaced).

    The values replaced go to the Scrubber: a check that quotes the line where the YAML
    breaks must not quote a secret either.
    """
    removed: set[str] = set()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return _redact_lines(text, removed), "line by line: the text is not valid YAML", removed
    spans: set[tuple[int, int]] = set()
    if root is not None:
        _secret_spans(root, False, spans, set(), removed)
    for start, end in sorted(spans, reverse=True):
        removed.add(text[start:end].strip().strip("'\""))  # as written, escapes and all
        # keep the line count: support maps lines of this copy to lines of theirs
        text = text[:start] + f'"{REDACTED}"' + "\n" * text.count("\n", start, end) + text[end:]
    return text, "yaml nodes", removed


def _secret_spans(node: yaml.Node, secret: bool, spans: set[tuple[int, int]], seen: set[int], values: set[str]) -> None:
    if id(node) in seen:  # an alias brings the same node back
        return
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        if secret and node.value != "":
            spans.add((node.start_mark.index, node.end_mark.index))
            values.add(node.value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _secret_spans(item, secret, spans, seen, values)
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            is_secret = secret or (isinstance(key, yaml.ScalarNode) and bool(_SECRET_KEY.search(str(key.value))))
            _secret_spans(value, is_secret, spans, seen, values)


_KEY_LINE = re.compile(r"^(?P<lead>\s*(?:-\s+)?)[\"']?(?P<key>[A-Za-z0-9_.-]+)[\"']?\s*:(?:\s+|$)(?P<value>.*)$")


def _redact_lines(text: str, removed: set[str]) -> str:
    """For a profile that does not parse: a secret key's value on its line, and the block under it."""
    out = []
    block_indent: int | None = None  # inside the block of a secret key with no value on its line
    for line in text.split("\n"):
        indent = len(line) - len(line.lstrip())
        stripped = line.strip()
        if block_indent is not None:
            if not stripped or stripped.startswith("#"):
                out.append(line)
                continue
            if indent > block_indent or (indent == block_indent and stripped.startswith("- ")):
                dash = "- " if stripped.startswith("- ") else ""
                comment = _comment_of(stripped[len(dash):])
                removed.add(stripped[len(dash):len(stripped) - len(comment)].strip().strip("'\""))
                out.append(f'{line[:indent]}{dash}"{REDACTED}"{comment}')
                continue
            block_indent = None
        match = _KEY_LINE.match(line)
        if match and _SECRET_KEY.search(match["key"]):
            comment = _comment_of(match["value"])
            value = match["value"][:len(match["value"]) - len(comment)]
            if value.strip() in ("", "|", ">", "|-", ">-", "|+", ">+"):
                block_indent = len(match["lead"]) if match["lead"].strip() else indent
                out.append(line)
            else:
                removed.add(value.strip().strip("'\""))
                removed.update(item.strip().strip("'\"") for item in value.strip().strip("[]").split(","))
                out.append(f'{line[:match.start("value")]}"{REDACTED}"{comment}')
            continue
        out.append(line)
    return "\n".join(out)


def _comment_of(value: str) -> str:
    """The trailing ``  # comment`` of a YAML value (with the blanks before it), or ""; a quoted value's '#' is its own."""
    start = 0
    if value[:1] in ("'", '"'):
        quote, index = value[0], 1
        while index < len(value) and value[index] != quote:
            index += 2 if value[index] == "\\" and quote == '"' else 1
        start = index + 1
    found = re.search(r"\s#", value[start:])
    if found is None:
        return ""
    at = start + found.start()
    while at > 0 and value[at - 1].isspace():
        at -= 1
    return value[at:]


# ------------------------------------------------------------- the secrets' values


def secret_values(data: Any, text: str = "") -> tuple[set[str], list[str]]:
    """(every secret value the profile leads to, notes on those that could not be read).

    Works on the parsed YAML, valid profile or not: a broken profile is when support needs
    diagnostics most.  When even the YAML is broken, ``text``'s ``key: value`` lines stand in.
    """
    secrets: set[str] = set()
    notes: list[str] = []
    if not isinstance(data, dict):
        data = _data_from_lines(text)

    def section(*keys: str) -> dict:
        node: Any = data
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}

    def from_file(key: str, path: Any, first_line_only: bool = True) -> None:
        if not isinstance(path, str) or not path:
            return
        try:
            with open(path, "rb") as handle:
                raw = handle.read(_MAX_SECRET_FILE_BYTES)
        except OSError as error:
            notes.append(f"{key}: {path} not read ({error.strerror or error}); its value cannot be scrubbed from logs")
            return
        lines = raw.decode("utf-8", "replace").splitlines()
        for line in lines[:1] if first_line_only else lines:
            if line.strip():
                secrets.add(line.strip())
                secrets.add(line)

    def from_env(key: str, name: Any) -> None:
        if isinstance(name, str) and os.environ.get(name):
            secrets.add(os.environ[name])

    mqtt = section("uplink", "mqtt")
    from_file("uplink.mqtt.password_file", mqtt.get("password_file"))
    from_env("uplink.mqtt.password_env", mqtt.get("password_env"))
    assets = data.get("assets")
    for index, asset in enumerate(assets if isinstance(assets, list) else []):
        if isinstance(asset, dict):
            from_file(f"assets[{index}].password_file", asset.get("password_file"))
            from_env(f"assets[{index}].password_env", asset.get("password_env"))
    ocpp = data.get("ocpp")
    tags = section("ocpp", "authorize").get("id_tags")
    secrets.update(str(tag) for tag in (tags if isinstance(tags, list) else []) if tag is not None)
    if isinstance(ocpp, dict):
        from_file("ocpp.id_tag_salt_file", ocpp.get("id_tag_salt_file", "/var/lib/flexedge/ocpp-id-salt"),
                  first_line_only=False)
    auth_file = section("local_http").get("basic_auth_file")
    if isinstance(auth_file, str):
        for user, password in basic_auth_entries(Path(auth_file)):
            secrets.add(password)
    _walk_secret_keys(data, secrets)
    return secrets, notes


def _data_from_lines(text: str) -> dict[str, Any]:
    """A profile whose YAML is broken, as the sections secret_values reads, from its ``key: value`` lines."""
    found: dict[str, list[str]] = {}
    for line in text.split("\n"):
        match = _KEY_LINE.match(line)
        if match and match["value"].strip():
            value = match["value"].split(" #")[0].strip().strip("'\"")
            found.setdefault(match["key"], []).append(value)
    first = {key: values[0] for key, values in found.items()}
    data: dict[str, Any] = {
        "uplink": {"mqtt": {key: first[key] for key in ("password_file", "password_env") if key in first}},
        "assets": [{"password_file": path} for path in found.get("password_file", [])[1:]]
                  + [{"password_env": name} for name in found.get("password_env", [])[1:]],
        "local_http": {key: first[key] for key in ("basic_auth_file",) if key in first},
    }
    if re.search(r"(?m)^ocpp:", text):
        data["ocpp"] = {key: first[key] for key in ("id_tag_salt_file",) if key in first}
    return data


def _walk_secret_keys(node: Any, secrets: set[str], inside: bool = False) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _walk_secret_keys(value, secrets, inside or bool(_SECRET_KEY.search(str(key))))
    elif isinstance(node, list):
        for item in node:
            _walk_secret_keys(item, secrets, inside)
    elif inside and node is not None and not isinstance(node, bool):
        secrets.add(str(node))


def basic_auth_entries(path: Path) -> list[tuple[str, str]]:
    """(user, password or stored hash) of each line of the local endpoint's Basic auth file; [] if unreadable.

    The format is docs/local.md's: ``user:password`` or ``user:$sha256$<salt>$<hex>``, one per line.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_SECRET_FILE_BYTES)
    except OSError:
        return []
    entries = []
    for line in raw.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            user, _, password = line.partition(":")
            if password:
                entries.append((user, password))
    return entries
