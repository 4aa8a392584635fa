"""What a profile reload (SIGHUP, ``systemctl reload``) may change in place, and what it changes.

For edge/runtime/daemon.py: the daemon reads the file in a thread (:func:`read_for_reload`,
with the checks `run` makes), asks :func:`compare` what differs, and either keeps the profile
in force (the new one is invalid, or changes a key that needs a restart) or swaps it in.

The keys in :data:`RESTART_KEYS` belong to the parts that live as long as the process:
the MQTT session and the spool (their seq counters, the backlog), the OCPP central
system all chargers share, and the local HTTP endpoint.  Adding or removing ``grid.deie``
needs a restart too (the grid operator's orders are kept beside the spool only when there
is a DEIE); changing its settings does not: the link is started again with the orders in
force.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from edge.config.preflight import check_files
from edge.config.profile import Profile, ProfileError, load_profile

RESTART_KEYS = ("site.id", "uplink.mqtt", "uplink.spool", "ocpp", "local_http")


@dataclass(frozen=True)
class ProfileRead:
    """A profile file read again: the profile, or the problems that keep it out."""

    profile: Profile | None
    problems: list[str]


def read_for_reload(path: Path) -> ProfileRead:
    """Blocking (file I/O, the spool's SQLite header): run in a thread.  The checks `run` makes at start-up."""
    try:
        profile = load_profile(path)
    except ProfileError as error:
        return ProfileRead(None, [str(problem) for problem in error.problems])
    problems = [str(problem) for problem in check_files(profile)]
    return ProfileRead(None if problems else profile, problems)


@dataclass(frozen=True)
class ProfileChanges:
    restart_keys: list[str] = field(default_factory=list)  # changed keys that need a restart
    sections: list[str] = field(default_factory=list)  # top-level keys whose value changed (not assets)
    added: list[str] = field(default_factory=list)  # asset ids
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # same id, other settings: its driver starts again

    @property
    def none(self) -> bool:
        return not (self.sections or self.added or self.removed or self.changed)


def _value(profile: Profile, dotted: str) -> Any:
    value: Any = profile
    for part in dotted.split("."):
        value = getattr(value, part, None)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def compare(old: Profile, new: Profile) -> ProfileChanges:
    restart = [key for key in RESTART_KEYS if _value(old, key) != _value(new, key)]
    if (old.grid.deie is None) != (new.grid.deie is None):
        restart.append("grid.deie")  # added or removed; changed settings need no restart
    sections = [key for key in type(new).model_fields if key != "assets" and _value(old, key) != _value(new, key)]
    before = {asset.id: asset for asset in old.assets}
    after = {asset.id: asset for asset in new.assets}
    # Each driver was built for the cycle period: with another, every driver starts again.
    same_cycle = old.control.cycle_s == new.control.cycle_s
    changed = [asset_id for asset_id in after if asset_id in before
               and (not same_cycle or before[asset_id].model_dump() != after[asset_id].model_dump())]
    return ProfileChanges(
        restart_keys=restart,
        sections=sections,
        added=[asset_id for asset_id in after if asset_id not in before],
        removed=[asset_id for asset_id in before if asset_id not in after],
        changed=changed,
    )
