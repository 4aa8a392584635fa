"""The checks across a profile's sections, and the warnings about what will surprise at run time.

They run on the document as written, next to pydantic's field validation rather than after
it, so ``flexedge check`` reports everything in one pass: what can be checked is checked on
the parts that are valid (an asset whose own fields are wrong takes no part in the checks
between assets, so it brings no follow-on noise).  Each problem carries the line of the key
it is about.

Errors stop ``run``; warnings (``WarningText`` messages) are combinations that are legal but
rarely meant: a setpoint timeout shorter than the cycle, a revert timer the cycle cannot
refresh in time, chargers anyone may use, two assets answering at one address.
"""

from __future__ import annotations

import functools
import ipaddress
import typing
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from edge.config.functions import source_problems
from edge.config.yamlsource import ProfileProblem, WarningText, YamlDocument

Loc = tuple[Any, ...]
Found = list[tuple[Loc, str]]

# An asset's timers that must be longer than the cycle, by key (units in the names: seconds).
REFRESHED_TIMERS = {
    "revert_timeout_s": "the device drops the gateway's command unless it is refreshed within this time, and the "
                        "gateway refreshes it once a cycle",
}
# An asset's timeouts that must be shorter than the cycle.
CYCLE_BOUND_TIMEOUTS = {
    "timeout_s": "one unanswered request then holds the asset's reading past the next cycle",
}
LOOPBACK_NAMES = ("localhost", "ip6-localhost")


@functools.cache
def _adapter(annotation: Any) -> TypeAdapter:
    return TypeAdapter(annotation)


def _field_value(model: type[BaseModel], raw: Any, name: str) -> Any:
    """The valid value of ``name`` in the section ``raw`` of ``model``: its default when absent, None when invalid."""
    info = model.model_fields[name]
    if not isinstance(raw, dict) or name not in raw:
        return None if info.is_required() else info.get_default(call_default_factory=True)
    annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    try:
        return _adapter(annotation).validate_python(raw[name])
    except ValidationError:
        return None


def _section_model(root: type[BaseModel], *path: str) -> type[BaseModel] | None:
    model: Any = root
    for name in path:
        annotation = model.model_fields[name].annotation
        members = [a for a in typing.get_args(annotation) or (annotation,) if isinstance(a, type)]
        model = next((m for m in members if issubclass(m, BaseModel)), None)
        if model is None:
            return None
    return model


def _get(data: Any, *path: Any) -> Any:
    for part in path:
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return None
    return data


def _is_loopback(host: Any) -> bool:
    if not isinstance(host, str):
        return False
    if host.strip().lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip()).is_loopback
    except ValueError:
        return False


def _host_key(host: str) -> str:
    host = host.strip().lower()
    return "127.0.0.1" if host in LOOPBACK_NAMES else host


class _Site:
    """The profile's parts that are valid, for the checks between them."""

    def __init__(self, doc: YamlDocument, root: type[BaseModel], assets: list[Any] | None):
        self.doc = doc
        self.root = root
        data = doc.data if isinstance(doc.data, dict) else {}
        self.data = data
        raw_assets = data.get("assets")
        self.raw_assets: list[Any] = raw_assets if isinstance(raw_assets, list) else []
        if assets is None:
            adapter = _adapter(typing.get_args(root.model_fields["assets"].annotation)[0])
            assets = []
            for item in self.raw_assets:
                try:
                    assets.append(adapter.validate_python(item))
                except (ValidationError, ValueError, TypeError):
                    assets.append(None)
        self.assets: list[Any] = assets  # a model per raw item, None where it is invalid
        control = _section_model(root, "control")
        self.cycle_s = _field_value(control, data.get("control"), "cycle_s") if control else None

    def raw(self, index: int) -> dict:
        item = self.raw_assets[index] if index < len(self.raw_assets) else None
        return item if isinstance(item, dict) else {}

    def at_line(self, loc: Loc) -> str:
        """`` at line N`` where the document has ``loc``; nothing for a profile built in code."""
        return f" at line {self.doc.line_of(loc)}" if self.doc.has(loc) else ""

    def key_loc(self, base: Loc, *keys: str) -> Loc:
        """The first of ``keys`` written under ``base``, else ``base``: where a problem about them points."""
        for key in keys:
            if self.doc.has(base + (key,)):
                return base + (key,)
        return base


# ------------------------------------------------------------------- errors


def _duplicate_ids(site: _Site) -> Found:
    found: Found = []
    first: dict[str, int] = {}
    for index, item in enumerate(site.raw_assets):
        asset_id = item.get("id") if isinstance(item, dict) else None
        if not isinstance(asset_id, str):
            continue
        if asset_id in first:
            other = first[asset_id]
            found.append((("assets", index, "id"), f"asset id {asset_id!r} is used twice (also by assets[{other}]"
                                                   f"{site.at_line(('assets', other, 'id'))}): ids must be unique"))
        else:
            first[asset_id] = index
    return found


def _connection_points(site: _Site) -> Found:
    found: Found = []
    first: int | None = None
    for index, item in enumerate(site.raw_assets):
        if not (isinstance(item, dict) and item.get("connection_point") is True):
            continue
        if first is None:
            first = index
            continue
        other = site.raw(first).get("id", f"assets[{first}]")
        found.append((("assets", index, "connection_point"),
                      f"a second connection-point meter: {other!r} (assets[{first}]"
                      f"{site.at_line(('assets', first, 'connection_point'))}) is one already; at most one meter "
                      f"measures the site's connection point"))
    return found


def _function_sources(site: _Site) -> Found:
    drivers = {}
    for item in site.raw_assets:
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            drivers.setdefault(item["id"], item.get("driver"))
    return [(("functions",) + loc, message) for loc, message in source_problems(site.data.get("functions"), drivers)]


def _charge_point_ids(site: _Site) -> Found:
    found: Found = []
    first: dict[str, int] = {}
    for index, asset in enumerate(site.assets):
        cp_id = getattr(asset, "charge_point_id", None)
        if cp_id is None:
            continue
        if cp_id in first:
            found.append((("assets", index, "charge_point_id"),
                          f"charge point id {cp_id!r} is used twice (also by asset {site.assets[first[cp_id]].id!r}, "
                          f"assets[{first[cp_id]}]): the central system tells chargers apart by it"))
        else:
            first[cp_id] = index
    return found


# ----------------------------------------------------------------- warnings


def _timers(site: _Site) -> Found:
    cycle = site.cycle_s
    if cycle is None:
        return []
    found: Found = []
    control = _section_model(site.root, "control")
    timeout = _field_value(control, site.data.get("control"), "setpoint_timeout_s") if control else None
    if timeout is not None and timeout <= cycle:
        found.append((site.key_loc(("control",), "setpoint_timeout_s", "cycle_s"),
                      WarningText(f"setpoint_timeout_s ({timeout:g} s) is not longer than the cycle (cycle_s "
                                  f"{cycle:g} s): the gateway falls back between two setpoints sent every cycle")))
    for index, asset in enumerate(site.assets):
        if asset is None:
            continue
        for key, why in REFRESHED_TIMERS.items():
            value = getattr(asset, key, None)
            if isinstance(value, (int, float)) and 0 < value <= cycle:  # 0: the timer is off
                found.append((site.key_loc(("assets", index), key),
                              WarningText(f"{key} ({value:g} s) is not longer than the cycle ({cycle:g} s): {why}")))
        for key, why in CYCLE_BOUND_TIMEOUTS.items():
            value = getattr(asset, key, None)
            if isinstance(value, (int, float)) and value >= cycle:
                found.append((site.key_loc(("assets", index), key),
                              WarningText(f"{key} ({value:g} s) is not shorter than the cycle ({cycle:g} s): {why}")))
    fcr_age = _get(site.data, "functions", "fcr", "max_measurement_age_s")
    fcr = _section_model(site.root, "functions", "fcr")
    age = _field_value(fcr, _get(site.data, "functions", "fcr"), "max_measurement_age_s") if fcr else None
    if age is not None and age <= cycle and isinstance(_get(site.data, "functions", "fcr"), dict):
        found.append((site.key_loc(("functions", "fcr"), "max_measurement_age_s") if fcr_age is not None
                      else ("control", "cycle_s") if site.doc.has(("control", "cycle_s")) else ("functions", "fcr"),
                      WarningText(f"max_measurement_age_s ({age:g} s) is not longer than the cycle ({cycle:g} s): the "
                                  f"frequency is measured once a cycle, so FCR would see it stale and stop")))
    return found


def _chargers(site: _Site) -> Found:
    found: Found = []
    chargers = [i for i, item in enumerate(site.raw_assets) if isinstance(item, dict) and item.get("driver") == "ocpp"]
    server_model = _section_model(site.root, "ocpp")
    raw_server = site.data.get("ocpp")
    if server_model is None:
        return found
    if "ocpp" in site.data and not chargers:
        found.append((("ocpp",), WarningText("no asset has driver: ocpp, so this central system is not started")))
    if not chargers:
        return found
    if raw_server is None:
        found.append((site.key_loc(("assets", chargers[0]), "driver"),
                      WarningText("chargers but no `ocpp:` section: their central system then listens on "
                                  "0.0.0.0:9000 with security profile 1 and an empty ID tag list (every Authorize "
                                  "is refused); see docs/drivers/ocpp.md")))
    host = _field_value(server_model, raw_server, "host")
    security = _field_value(server_model, raw_server, "security_profile")
    authorize = _field_value(server_model, raw_server, "authorize")
    mode = getattr(authorize, "mode", None)
    if mode == "accept_all":
        found.append((site.key_loc(("ocpp", "authorize"), "mode"),
                      WarningText("accept_all: any ID tag may charge (anyone with a card of any kind)")))
    elif mode == "local_list" and not authorize.id_tags and raw_server is not None:
        found.append((site.key_loc(("ocpp",), "authorize"),
                      WarningText("no ID tag in the local list: every Authorize is refused, so no EV driver can start "
                                  "a charge with a card")))
    if security is not None and security < 3 and host is not None and not _is_loopback(host):
        for index in chargers:
            asset = site.assets[index]
            if asset is not None and asset.password_file is None and asset.password_env is None:
                found.append((("assets", index),
                              WarningText(f"charger {asset.id!r} has no password (password_file or password_env): "
                                          f"with security profile {security} anyone who reaches port "
                                          f"{_field_value(server_model, raw_server, 'port')} of this gateway can "
                                          f"connect as {asset.charge_point_id!r}")))
    return found


def _endpoints(site: _Site) -> Found:
    """Two assets at one address: other protocols on one port, or one device twice."""
    found: Found = []
    on_link: dict[tuple, int] = {}
    at_address: dict[tuple, int] = {}
    for index, asset in enumerate(site.assets):
        link = getattr(asset, "link_key", None)
        if link is None and isinstance(getattr(asset, "host", None), str) and isinstance(getattr(asset, "port", None), int):
            link = ("tcp", asset.host.strip().lower(), asset.port)
        if link is None:
            continue
        if link[0] == "tcp":
            link = ("tcp", _host_key(link[1]), link[2])
        where = f"{link[1]}:{link[2]}" if link[0] == "tcp" else f"serial port {link[1]}"
        first = on_link.setdefault(link, index)
        other = site.assets[first]
        if other.driver != asset.driver:
            found.append((site.key_loc(("assets", index), "port", "host", "serial"),
                          WarningText(f"{where} is also the address of asset {other.id!r} (assets[{first}], driver "
                                      f"{other.driver}): one port speaks one protocol")))
            continue
        if hasattr(asset, "link_key"):
            continue  # a driver with shared links checks its own (drivers/*/config.py, check_assets)
        address = getattr(asset, "unit_id", getattr(asset, "common_address", None))
        owner = at_address.setdefault(link + (asset.driver, address), index)
        if owner != index:
            name = "unit id" if hasattr(asset, "unit_id") else "common address"
            found.append((site.key_loc(("assets", index), "unit_id", "common_address"),
                          WarningText(f"asset {asset.id!r} and asset {site.assets[owner].id!r} (assets[{owner}]) both use "
                                      f"{name} {address} on {where}: the same device twice? (their commands would "
                                      f"overwrite each other)")))
    return found


def _unused(site: _Site) -> Found:
    found: Found = []
    drivers = [item.get("driver") for item in site.raw_assets if isinstance(item, dict)]
    if isinstance(site.data.get("ev_charging"), dict) and "ocpp" not in drivers:
        found.append((("ev_charging",), WarningText("no charger (driver: ocpp) among the assets: smart charging has "
                                                    "nothing to plan")))
    control = _section_model(site.root, "control")
    allocation = _field_value(control, site.data.get("control"), "allocation") if control else None
    if allocation == "pro_rata":
        ranked = [i for i, item in enumerate(site.raw_assets) if isinstance(item, dict)
                  and ("priority" in item or "dispatch_cost_per_mwh" in item)]
        if ranked:
            found.append((site.key_loc(("assets", ranked[0]), "priority", "dispatch_cost_per_mwh"),
                          WarningText(f"{len(ranked)} asset(s) set priority or dispatch_cost_per_mwh, but "
                                      f"control.allocation is pro_rata, which ignores them (merit_order uses them)")))
    q_u_mode = _get(site.data, "functions", "q_u", "mode")
    if q_u_mode == "inverter" and not any(getattr(a, "driver", None) == "sunspec" and getattr(a, "kind", None) != "meter"
                                          for a in site.assets):
        found.append((("functions", "q_u", "mode"), WarningText("inverter: no SunSpec inverter among the assets to "
                                                                "write the curve into")))
    return found


def _uplink(site: _Site) -> Found:
    mqtt = _get(site.data, "uplink", "mqtt")
    if not isinstance(mqtt, dict):
        return []
    port = mqtt.get("port", 1883)
    if mqtt.get("tls") is not None and port == 1883:
        return [(site.key_loc(("uplink", "mqtt"), "port", "tls"),
                 WarningText("TLS on port 1883, the port of plain MQTT: brokers serve TLS on 8883 as a rule"))]
    if "tls" not in mqtt and port == 8883:
        return [(("uplink", "mqtt", "port"),
                 WarningText("port 8883 is MQTT over TLS as a rule, but there is no tls: section (plain TCP)"))]
    return []


def _listeners(site: _Site) -> Found:
    """The site's servers (the OCPP central system, the DEIE in server role) on one port."""
    ocpp, deie = site.data.get("ocpp"), _get(site.data, "grid", "deie")
    if not isinstance(ocpp, dict) or not isinstance(deie, dict) or deie.get("role", "server") != "server":
        return []
    ports = (ocpp.get("port", 9000), deie.get("port", 2404))
    hosts = (str(ocpp.get("host", "0.0.0.0")), str(deie.get("host", "0.0.0.0")))
    if ports[0] != ports[1] or not ("0.0.0.0" in hosts or "::" in hosts or _host_key(hosts[0]) == _host_key(hosts[1])):
        return []
    return [(site.key_loc(("ocpp",), "port"),
             WarningText(f"the OCPP central system and the DEIE link both listen on port {ports[0]}: the second to "
                         f"start fails"))]


def _local_http(site: _Site) -> Found:
    """The status page and metrics beyond this machine with no password: anyone on that network reads the site."""
    local = site.data.get("local_http")
    if not isinstance(local, dict) or local.get("basic_auth_file") is not None:
        return []
    host = local.get("host", "127.0.0.1")
    if not isinstance(host, str) or _is_loopback(host):
        return []
    return [(("local_http", "host"),
             WarningText(f"the status page and metrics listen on {host} with no basic_auth_file: anyone who reaches "
                         f"this address reads the site's state (keep 127.0.0.1 and use `ssh -L`, or set "
                         f"basic_auth_file; docs/local.md)"))]


# -------------------------------------------------------------------- all

ERROR_CHECKS = (_duplicate_ids, _connection_points, _function_sources, _charge_point_ids)
WARNING_CHECKS = (_timers, _chargers, _endpoints, _unused, _uplink, _listeners, _local_http)


def cross_problems(doc: YamlDocument, root: type[BaseModel], driver_checks: Callable[[list[Any]], Found],
                   assets: list[Any] | None = None) -> list[ProfileProblem]:
    """Every problem between the profile's parts, errors and warnings, each at its line.

    ``driver_checks`` is drivers.registry.asset_problems (each driver's check of its assets
    taken together); it gets the asset models with None for each invalid one.  ``assets``:
    the models when the whole profile is already valid, else they are validated one by one.
    """
    site = _Site(doc, root, assets)
    found: Found = []
    for check in ERROR_CHECKS:
        found += check(site)
    from_drivers = driver_checks(site.assets)
    found += from_drivers
    errors_at = {tuple(loc) for loc, message in found if not isinstance(message, WarningText)}
    # an asset whose driver checks its own links is not warned about twice
    checked = {tuple(loc[:2]) for loc, _ in from_drivers}
    for check in WARNING_CHECKS:
        found += [(loc, message) for loc, message in check(site)
                  if loc not in errors_at and not (check is _endpoints and tuple(loc[:2]) in checked)]
    problems, seen = [], set()
    for loc, message in found:
        if (tuple(loc), str(message)) in seen:
            continue
        seen.add((tuple(loc), str(message)))
        severity = "warning" if isinstance(message, WarningText) else "error"
        problems.append(doc.problem(tuple(loc), str(message), severity))
    return problems

