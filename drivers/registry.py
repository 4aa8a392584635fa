"""Every driver, registered in one place.

Each driver package says once, in its ``__init__.py``, what it brings: ``DRIVER =
DriverSpec(...)`` for an asset driver (the ``driver:`` key of an asset, its profile
model, its factory, its one-line description for ``flexedge check``, and optionally
the site-wide hub its assets share, as OCPP's one central system), or ``GRID_LINK =
GridLinkSpec(...)`` for the grid operator's link (the DEIE).  This module lists the
packages; the profile's asset union, the names in its error messages, the daemon's
factories and ``flexedge check``'s lines all come from here.

Adding a driver: write ``drivers/<name>/`` with ``config.py`` (its asset model on
``edge.config.types.AssetBase``, importing nothing heavier) and an ``__init__.py``
that imports its protocol stack only inside ``create``; then add the package to
``ASSET_DRIVERS`` below.

The packages are imported on first use, not when this module is: each driver's
``__init__`` imports ``DriverSpec`` from here.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from edge.asset import AssetDriver, EventSink
from edge.gridorders import GridOperatorLink, GridOrders

# The asset drivers, in the order the profile's schema lists them.
ASSET_DRIVERS = ("drivers.sunspec", "drivers.iec104", "drivers.ocpp")
# The grid operator's link (grid.deie in the profile).
GRID_LINK = "drivers.deie"


@dataclass(frozen=True)
class DriverSpec:
    name: str  # the asset's `driver:` key
    asset_model: type  # pydantic model of one asset (AssetBase, with driver: Literal[name])
    # (asset, cycle_s, emit_event, *, clock): opens nothing.  ``clock`` is the site's cycle clock
    # (edge/runtime/cycle_clock.py), which a polled driver reads its device for.
    create: Callable[..., AssetDriver]
    describe: Callable[[Any], str]  # the asset's transport in one line, for `flexedge check`
    # The link hub the driver's assets share (OCPP: the central system): its section of
    # the profile, and what is called once with the profile before the first of the
    # driver's assets is created, when the profile has one.
    site_model: type | None = None
    prepare_site: Callable[[Any], None] | None = None
    # Keys an asset of this driver takes from the driver's site section (the profile's key of
    # the driver's name) when it does not give them itself: (section as written) -> {key: value}.
    # Only what is valid on its own: the section's own check reports the rest.
    asset_defaults: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # What is wrong between the profile's assets of this driver taken together (assets
    # sharing a field link that cannot share it): (key path, message) for each problem.
    check_assets: Callable[[list[Any]], list[tuple[tuple[Any, ...], str]]] | None = None
    # `flexedge probe <name>`: the module (e.g. "drivers.sunspec.probe") with ``HELP``,
    # ``add_arguments(parser)`` and ``async probe(args, report)``; imported only when the command
    # runs (edge/commission/probe.py says what the functions do).
    probe: str | None = None


@dataclass(frozen=True)
class GridLinkSpec:
    name: str  # the key under grid: in the profile
    config_model: type
    create: Callable[[Any, Callable[[GridOrders], Any], EventSink], GridOperatorLink]


@functools.cache
def drivers() -> dict[str, DriverSpec]:
    """The asset drivers by name, in ``ASSET_DRIVERS`` order."""
    specs = [importlib.import_module(package).DRIVER for package in ASSET_DRIVERS]
    return {spec.name: spec for spec in specs}


@functools.cache
def grid_link() -> GridLinkSpec:
    return importlib.import_module(GRID_LINK).GRID_LINK


def asset_models() -> tuple[type, ...]:
    return tuple(spec.asset_model for spec in drivers().values())


def driver_names() -> tuple[str, ...]:
    return tuple(drivers())


def describe(asset: Any) -> str:
    return drivers()[asset.driver].describe(asset)


def prepare_site(profile: Any) -> None:
    """Each driver's site-wide hub, for the drivers the profile's assets use."""
    used = {asset.driver for asset in profile.assets}
    for name, spec in drivers().items():
        if name in used and spec.prepare_site is not None:
            spec.prepare_site(profile)


def create_driver(asset: Any, cycle_s: float, emit_event: EventSink, *, clock: Any = None) -> AssetDriver:
    """``clock`` is the site's cycle clock: a polled driver reads its device just before each tick."""
    return drivers()[asset.driver].create(asset, cycle_s, emit_event, clock=clock)


def with_site_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """The profile document with each asset given its driver's site defaults (``asset_defaults``)
    for the keys it does not have; a key it gives, even as null, is its own."""
    assets = data.get("assets")
    if not isinstance(assets, list):
        return data
    for name, spec in drivers().items():
        section = data.get(name)
        if spec.asset_defaults is None or not isinstance(section, dict):
            continue
        defaults = spec.asset_defaults(section)
        if defaults:
            assets = [{**defaults, **asset} if isinstance(asset, dict) and asset.get("driver") == name else asset
                      for asset in assets]
    return {**data, "assets": assets}


def asset_problems(assets: list[Any]) -> list[tuple[tuple[Any, ...], str]]:
    """Each driver's check of the profile's assets taken together, as (key path, message)."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    for spec in drivers().values():
        if spec.check_assets is not None:
            problems += spec.check_assets(assets)
    return problems


def create_grid_link(cfg: Any, apply_orders: Callable[[GridOrders], Any], emit_event: EventSink) -> GridOperatorLink:
    return grid_link().create(cfg, apply_orders, emit_event)


def seconds_option(low_s: float, high_s: float) -> Callable[[str], float]:
    """An argparse ``type`` for a probe's ``--timeout-s``: a number of seconds within bounds."""
    import argparse

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not low_s <= value <= high_s:  # NaN fails too
            raise argparse.ArgumentTypeError(f"{value:g} s is outside {low_s:g}..{high_s:g} s")
        return value

    return parse
