"""OCPP 1.6J and 2.0.1 driver: a central system for the site's EV chargers.

Public API
----------
``create(asset, cycle_s, emit_event) -> OcppChargerDriver``
    The daemon's per-asset factory (``drivers.registry.create_driver``).  ``asset`` is an
    ``OcppCharger``.  All chargers of a site share one websocket server
    (``drivers.ocpp.driver`` explains how); call ``configure_site(server)``
    with the site's ``OcppServer`` before creating drivers (the daemon does, through
    ``DRIVER.prepare_site``).

``OcppChargerDriver(asset, cycle_s, emit_event, server=None)``
    ``run()`` serves until cancelled; ``reading()`` gives ``online`` (link up),
    ``p_kw`` (negative while charging), the EV's ``soc_pct`` when reported,
    ``p_min_kw`` = minus the charger's rating with an EV plugged in (else 0),
    ``p_max_kw`` = 0, ``p_gap_kw`` = (-min, 0): the charger is off or between
    its minimum and maximum, never in between.
    ``set_target_kw(t)``: t <= 0 charges at most |t| kW, t > 0 means 0, None
    relaxes to the full rating.  Sent as SetChargingProfile when the limit
    moves beyond ``deadband_kw``; below the minimum current the limit is 0.
    Never blocks: the charger's turn is queued with the central system's
    ``LoopPacer`` (``drivers.ocpp.pacing``), which spreads the sends of a
    burst, and the incoming messages, over loop iterations.
    A refused or unanswered limit makes the reading ``degraded`` and
    ``command_refused`` (the charger runs unlimited or not as commanded) until
    a profile is accepted; it is retried with capped backoff, and no new
    target bypasses the backoff.  A charger that refuses its configured
    ChargingStationExternalConstraints purpose or W unit (never accepted
    before) falls back once, for the rest of the run, to TxDefaultProfile in A
    (``charging_profile_fallback`` event).

Boot first: the central system sends no request at all (TriggerMessage,
GetReport, SetChargingProfile, anything added later: the gate is in the
connection's ``call``) before it has sent its Accepted answer to the
charger's BootNotification on that link, or ``OcppServer.boot_grace_s``
(default 5 s) after the charger connected without sending one (it was
booted already and reconnected, e.g. after a gateway restart).  Targets set
meanwhile wait; the newest is sent.

``OcppCentralSystem(server_cfg, chargers, emit_event)`` (``drivers.ocpp.central``)
    The server on its own, e.g. for tools and benchmarks; see its docstring.

``OcppServer``, ``OcppCharger`` (``drivers.ocpp.config``): profile models.
``limit_for_target``, ``needs_sending`` (``drivers.ocpp.limits``): the limit rules.

Events (type, detail): ``asset_online`` {ocpp_version, remote}, ``asset_offline``
{reason}, ``ev_connected``, ``ev_disconnected``, ``session_started``
{transaction_id, id_tag_hash, meter_start_wh}, ``session_stopped``
{transaction_id, id_tag_hash, energy_kwh, reason}, ``authorization_rejected``
{id_tag_hash}, ``command_failed`` {limit, unit, purpose, reason},
``charging_profile_fallback`` {from_purpose, from_unit, to_purpose, to_unit,
reason}, ``asset_degraded`` {reason}, ``ocpp_auth_failed`` {remote, reason}; site-level (asset None):
``ocpp_unknown_charge_point`` {charge_point_id, remote}.  Every charger event
carries ``charge_point_id``.  ID tags never leave the driver: events carry a
salted HMAC-SHA256 (``id_tag_salt_file``).
"""

from __future__ import annotations

from typing import Any

from edge.asset import EventSink

from drivers.ocpp.config import OcppCharger, OcppServer, describe
from drivers.ocpp.limits import ChargeLimit, limit_for_target, needs_sending
from drivers.registry import DriverSpec

__all__ = [
    "DRIVER", "ChargeLimit", "OcppCentralSystem", "OcppCharger", "OcppChargerDriver", "OcppServer",
    "configure_site", "create", "limit_for_target", "needs_sending", "site_server",
]

# The server and driver modules (ocpp, websockets) are imported on first use:
# the profile loads this package for its models, and `flexedge check` has no
# business loading the OCPP stack.
_LAZY = {"OcppCentralSystem": "drivers.ocpp.central", "OcppChargerDriver": "drivers.ocpp.driver",
         "configure_site": "drivers.ocpp.driver", "site_server": "drivers.ocpp.driver"}


def create(asset: OcppCharger, cycle_s: float, emit_event: EventSink, *, clock=None) -> Any:
    # The charger reports by itself (MeterValues): the site clock is not needed.
    from drivers.ocpp.driver import OcppChargerDriver

    return OcppChargerDriver(asset, cycle_s, emit_event)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'drivers.ocpp' has no attribute {name!r}")


def prepare_site(profile: Any) -> None:
    """The chargers share the site's one central system (the profile's ``ocpp`` section)."""
    from drivers.ocpp.driver import configure_site

    configure_site(profile.ocpp)


DRIVER = DriverSpec(name="ocpp", asset_model=OcppCharger, create=create, describe=describe,
                    site_model=OcppServer, prepare_site=prepare_site, probe="drivers.ocpp.probe")
