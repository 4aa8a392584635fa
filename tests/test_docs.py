"""The documented contracts match the code: profile keys and MQTT schemas."""

from __future__ import annotations

import json
import re
from pathlib import Path

from edge.uplink.messages import schemas
from edge.config.profile import Profile

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _key_paths(model, prefix=""):
    for name, field in model.model_fields.items():
        yield prefix + name
        annotation = field.annotation
        for candidate in getattr(annotation, "__args__", (annotation,)):
            if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
                yield from _key_paths(candidate, prefix + name + ".")


def test_every_profile_key_is_documented():
    text = (DOCS / "profile.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", text, re.M)) | set(re.findall(r"^##+ `([^`]+)`", text, re.M))
    from drivers.iec104.config import Iec104Asset
    from drivers.ocpp.config import OcppCharger
    from drivers.sunspec.config import SunSpecAsset

    expected = {p for p in _key_paths(Profile) if not p.startswith("assets")}
    for asset_model in (SunSpecAsset, Iec104Asset, OcppCharger):
        expected |= set(_key_paths(asset_model))
    def covered(path: str) -> bool:
        return path in documented or path.split(".")[-1] in documented or any(d.startswith(path + ".") for d in documented)

    missing = {p for p in expected if not covered(p)}
    assert not missing, f"undocumented profile keys: {sorted(missing)}"


def test_mqtt_api_schemas_match_the_code():
    text = (DOCS / "mqtt-api.md").read_text()
    blocks = re.findall(r"^### `([^`]+)`\n\n```json\n(.*?)\n```", text, re.M | re.S)
    documented = {topic: json.loads(body) for topic, body in blocks}
    assert documented == schemas(), "regenerate the schemas in docs/mqtt-api.md with `python -m edge.uplink.messages`"
