"""OCPP 1.6J, 2.0.1 and 2.1 driver: a central system for the site's EV chargers.

Public API
----------
``create(asset, cycle_s, emit_event) -> OcppChargerDriver``
    The daemon's per-asset factory (``drivers.registry.create_driver``).  ``asset`` is an
    ``OcppCharger``.  All chargers of a site share one websocket server
    (``drivers.ocpp.driver`` explains how); ``prepare_site(profile)`` (the daemon calls it,
    through ``DRIVER.prepare_site``, before creating drivers) sets the site's ``OcppServer``
    and each charger's failsafe share of the site's connection limits.

``OcppChargerDriver(asset, cycle_s, emit_event, server=None, failsafe=None)``
    ``run()`` serves until cancelled; ``reading()`` gives ``online`` (link up),
    ``p_kw`` (negative while charging: Export - Import), the EV's ``soc_pct`` when reported,
    ``p_min_kw`` = minus the charger's rating with an EV plugged in (else 0),
    ``p_max_kw`` = 0, ``p_gap_kw`` = (-min, 0): the charger is off or between
    its minimum and maximum, never in between; ``ev`` (``EvStatus``) once the car sent
    its charging needs.  A V2X session (OCPP 2.1, a bidirectional charger and EV) reads
    ``p_min_kw`` = -min(rating, EV), ``p_max_kw`` = +min(v2x.max_discharge_kw, EV).
    ``set_target_kw(t)``: t <= 0 charges at most |t| kW, t > 0 means 0 (a V2X session:
    a CentralSetpoint at t, discharging when t > 0); None releases (the plan alone, else
    ClearChargingProfile).  Sent as SetChargingProfile when it moves beyond
    ``deadband_kw``; below the minimum current the limit is 0.
    ``set_plan(PowerPlan | None)``: the periods after the current target, so a charger
    that loses the gateway keeps the plan (``drivers.ocpp.schedule``).
    ``wants_dispatch_context`` / ``set_dispatch_context(ctx)``: a charger that follows
    OCPP 2.1 AFRRSignal gets CentralFrequency and the signal.
    Never blocks: the charger's turn is queued with the central system's
    ``LoopPacer`` (``drivers.ocpp.pacing``), which spreads the sends of a
    burst, and the incoming messages, over loop iterations.
    A refused or unanswered command makes the reading ``degraded`` and
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
meanwhile wait; the newest is sent.  Then, once per connection, the
greeting (``drivers.ocpp.greeting``): status, rating, V2X features, failsafe.

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
reason} or {from_operation_mode, to_operation_mode, reason}, ``asset_degraded``
{reason}, ``charger_features`` {bidirectional, afrr_signal, source},
``ev_charging_needs`` {departure, energy_to_target_kwh, bidirectional,
max_charge_kw, max_discharge_kw}, ``v2x_session_started`` {transaction_id,
max_charge_kw, max_discharge_kw, departure, energy_to_target_kwh},
``v2x_session_stopped`` {transaction_id, energy_charged_kwh,
energy_discharged_kwh, reason}, ``ocpp_auth_failed`` {remote, reason}; site-level (asset None):
``ocpp_unknown_charge_point`` {charge_point_id, remote}.  Every charger event
carries ``charge_point_id``.  ID tags never leave the driver: events carry a
salted HMAC-SHA256 (``id_tag_salt_file``).
"""

from __future__ import annotations

from typing import Any

from edge.asset import EventSink

from drivers.ocpp.config import OcppCharger, OcppServer, describe, site_upstream
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
    """The chargers share the site's one central system (the profile's ``ocpp`` section); each gets
    its failsafe share of the site's connection limits (``limits.failsafe_shares``)."""
    from drivers.ocpp.driver import configure_failsafe, configure_site
    from drivers.ocpp.limits import failsafe_shares

    configure_site(profile.ocpp)
    chargers = [asset for asset in profile.assets if isinstance(asset, OcppCharger)]
    grid = getattr(profile, "grid", None)
    configure_failsafe(failsafe_shares(chargers, getattr(grid, "import_limit_kw", None),
                                       getattr(grid, "export_limit_kw", None)))


DRIVER = DriverSpec(name="ocpp", asset_model=OcppCharger, create=create, describe=describe,
                    site_model=OcppServer, prepare_site=prepare_site, asset_defaults=site_upstream,
                    probe="drivers.ocpp.probe")
