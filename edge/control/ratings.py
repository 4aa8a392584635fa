"""The profile's ratings against the device's own: say when they disagree.

A profile can state a rating (``rated_kw: 30``) that the device contradicts (its nameplate,
SunSpec 120 ``WRtg``, says 100 kW).  Either figure may be the mistake, and the gateway must
not choose silently: each driver tells what the device states (``AssetDriver.device_ratings``),
and ``RatingsWatch.check`` compares it with the profile, key by key.  A disagreement beyond the
tolerance is reported once, as a ``rating_mismatch`` event and a warning naming both figures,
and again only when one of the figures moves beyond the tolerance.

Which figure is used is the drivers' rule, stated here because the event says it: **the lower
one** (docs/dispatch.md, "Ratings").  A lower profile figure is a deliberate derating the
gateway must obey (a connection agreement, a cable, a transformer); a device cannot do more
than it states, so a higher profile figure would overstate the band the VPP is offered, and
the shortfall would surface only as an incapacity when it is asked for.

``judge`` is pure; ``RatingsWatch`` keeps what was reported.  Both are cheap enough for every
cycle: the drivers' mappings are compared first, and only a changed one is judged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable

from edge.asset import AssetDriver, DeviceRating, EventSink

log = logging.getLogger("flexedge.ratings")

# Two figures agree when they differ by at most 2 % of the larger, or 0.1 kW: a profile that
# rounds a nameplate (22 kW for a charger's 22.08 kW, 50 kW for a 49.9 kW inverter) or a scale
# factor's resolution is not worth a warning; a derating or a wrong unit is.
RELATIVE_TOLERANCE = 0.02
ABSOLUTE_TOLERANCE_KW = 0.1

# A profile key whose figure the gateway derives: an OCPP charger's rating is max_power_kw or,
# if lower or absent, max_current_a x voltage_v x phases (OcppCharger.rated_kw).
_PROFILE_FIGURE = {"max_power_kw": "rated_kw"}


def differ(a_kw: float, b_kw: float) -> bool:
    """Whether two ratings disagree beyond the tolerance."""
    return abs(a_kw - b_kw) > max(ABSOLUTE_TOLERANCE_KW, RELATIVE_TOLERANCE * max(abs(a_kw), abs(b_kw)))


def profile_rating_kw(asset: Any, key: str) -> float | None:
    """The figure the gateway takes from the profile for ``key``; None if the profile gives none."""
    value = getattr(asset, _PROFILE_FIGURE.get(key, key), None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


@dataclass(frozen=True, slots=True)
class RatingVerdict:
    """A profile figure and a device figure that disagree, and the one used."""

    key: str
    profile_kw: float
    device_kw: float
    source: str  # where the device's figure was read
    used: str  # "profile" or "device": the lower figure
    at_least: bool  # the device's figure is what it can do now, so it can do at least that

    @property
    def used_kw(self) -> float:
        return self.profile_kw if self.used == "profile" else self.device_kw

    def detail(self) -> dict[str, Any]:
        return {"key": self.key, "profile_kw": round(self.profile_kw, 3), "device_kw": round(self.device_kw, 3),
                "source": self.source, "used": self.used, "used_kw": round(self.used_kw, 3)}

    def describe(self, asset_id: str) -> str:
        states = "can deliver now" if self.at_least else "states"
        return (f"{asset_id}: {self.key} is {self.profile_kw:g} kW in the profile, but the device {states} "
                f"{self.device_kw:g} kW ({self.source}); using {self.used_kw:g} kW, the {self.used}'s (the lower figure)")


def judge(key: str, profile_kw: float | None, rating: DeviceRating) -> RatingVerdict | None:
    """The disagreement between the profile's figure and the device's, or None when there is none:
    no profile figure, figures within the tolerance, or an available power below the profile's
    rating (the device is derated now, by its state of charge or temperature: no contradiction)."""
    if profile_kw is None or not math.isfinite(profile_kw) or not math.isfinite(rating.power_kw):
        return None
    if not differ(profile_kw, rating.power_kw):
        return None
    if rating.at_least and rating.power_kw < profile_kw:
        return None
    used = "profile" if profile_kw <= rating.power_kw else "device"
    return RatingVerdict(key, profile_kw, rating.power_kw, rating.source, used, rating.at_least)


class RatingsWatch:
    """Compares each asset's profile ratings with its driver's ``device_ratings()``; reports changes only."""

    def __init__(self, pairs: Iterable[tuple[Any, AssetDriver]], emit_event: EventSink):
        """``pairs``: (the profile's asset, its driver)."""
        self._pairs = list(pairs)
        self.emit_event = emit_event
        self._seen: dict[str, dict[str, DeviceRating]] = {}  # asset id -> the ratings last judged
        self.reported: dict[tuple[str, str], RatingVerdict] = {}  # (asset id, key) -> in force
        self._failing: set[str] = set()  # assets whose driver failed to give its ratings (logged once)

    def check(self) -> list[RatingVerdict]:
        """Judge the ratings that changed since the last call; report and return the new disagreements.

        Never raises for a driver's fault: it runs inside the control cycle.
        """
        new: list[RatingVerdict] = []
        for asset, driver in self._pairs:
            try:
                ratings = driver.device_ratings()
                if ratings == self._seen.get(asset.id):
                    continue
                self._seen[asset.id] = dict(ratings)  # a copy: a driver may update its mapping in place
                new += self._judge_asset(asset, ratings)
                self._failing.discard(asset.id)
            except Exception:  # noqa: BLE001 -- a driver's bug must not stop the control cycle
                if asset.id not in self._failing:
                    self._failing.add(asset.id)
                    log.exception("%s: could not compare the device's ratings with the profile", asset.id)
        return new

    def _judge_asset(self, asset: Any, ratings: dict[str, DeviceRating]) -> list[RatingVerdict]:
        new = []
        for key in [k for (asset_id, k) in self.reported if asset_id == asset.id and k not in ratings]:
            del self.reported[(asset.id, key)]  # the device no longer states it
        for key, rating in ratings.items():
            if not isinstance(rating, DeviceRating):
                raise TypeError(f"device_ratings()[{key!r}] is {rating!r}, not a DeviceRating")
            verdict = judge(key, profile_rating_kw(asset, key), rating)
            previous = self.reported.get((asset.id, key))
            if verdict is None:
                if previous is not None:
                    del self.reported[(asset.id, key)]
                    log.info("%s: %s in the profile and on the device (%s) now agree", asset.id, key, rating.source)
                continue
            if previous is not None and previous.source == verdict.source and previous.used == verdict.used \
                    and not differ(previous.device_kw, verdict.device_kw) \
                    and not differ(previous.profile_kw, verdict.profile_kw):
                continue  # the same disagreement, already reported
            self.reported[(asset.id, key)] = verdict
            log.warning("%s", verdict.describe(asset.id))
            self.emit_event("rating_mismatch", asset.id, verdict.detail())
            new.append(verdict)
        return new
