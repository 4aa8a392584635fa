"""SunSpec Modbus driver: PV inverters, batteries and meters over Modbus TCP or RTU.

The daemon calls ``create(asset, cycle_s, emit_event)`` once per ``driver:
sunspec`` asset of the profile and runs the returned driver's ``run()`` as
its own asyncio task.  Transport is pymodbus' asyncio clients; pysunspec2 is
used only for its model definitions and type codec, never its blocking
client.  Behaviour, model preference and the profile keys used are described
in docs/drivers/sunspec.md.

Public API
----------

``create(asset: drivers.sunspec.config.SunSpecAsset, cycle_s: float, emit_event: edge.asset.EventSink) -> SunSpecDriver``
    Build the driver (nothing is opened until ``run()``).

``class SunSpecDriver(edge.asset.AssetDriver)``

    ``await driver.run()``
        Connects, discovers the SunSpec map (probing ``base_address`` or, for
        ``auto``, 40000, 0, 50000), polls every ``cycle_s`` and writes
        targets.  Runs until cancelled; device and network problems never
        raise out of it.  Every request is bounded by the asset's
        ``timeout_s``; reconnects use capped exponential backoff with jitter
        (first retry after about 0.1 s, at most 30 s).

    ``driver.reading() -> edge.asset.AssetReading``
        The latest snapshot, never blocking.  ``online`` turns False when the
        device has not answered for two cycles; then every value is None and
        ``detail`` says why.  ``degraded`` (with ``detail``) when a value was
        implausible, the inverter reports a fault, the last command failed
        or a poll was refused.

    ``driver.set_target_kw(target_kw: float | None) -> None``
        Non-blocking, newest wins.  Wakes the driver task, which writes at
        once (not at its next poll) and then rewrites the command, revert
        timer included, every cycle while the target is in force.  None
        releases control (the model's enable point is written 0).  Raises
        ValueError for a value that is not a finite number; for a meter or an
        asset with ``controllable: false`` it only emits ``command_failed``.

    ``driver.set_volt_var(curve: edge.asset.VoltVarCurve | None) -> None``
        Non-blocking, idempotent: have the inverter run a Q(U) curve itself
        (model 705: written into a writable curve, adopted, enabled; checked
        every poll and written again when no longer in force), or switch it
        off (None).  ``volt_var_available`` / ``volt_var_in_force`` say
        whether it can and whether it does.  Emits ``volt_var_written``, or
        ``command_failed`` with ``volt_var`` and ``reason``.

    ``driver.device_ratings() -> dict[str, edge.asset.DeviceRating]``
        What the device states, as last polled: ``rated_kw`` (the lower of
        702 ``WMaxRtg``/120 ``WRtg`` and 702/121 ``WMax``) and, for a battery,
        ``max_charge_kw`` / ``max_discharge_kw``.  The reading's band uses the
        lower of each and the profile's; the daemon reports a disagreement.

    Attributes for diagnostics: ``model_map`` (``ModelMap`` or None),
    ``control_path`` (``"704-set"``, ``"704-limit"``, ``"124-rate"``,
    ``"123-limit"`` or None), ``identity`` (manufacturer/model/version/serial
    from model 1), ``link`` (the ``ModbusLink``).

Events (``emit_event(type, asset_id, detail)``)
-----------------------------------------------

``models_discovered``  first map found: ``base_address``, ``model_ids``,
                       ``polled_model_ids``, ``requests_per_cycle`` and the
                       identity keys.
``models_changed``     the map differs from the previous one (firmware
                       update): same keys plus ``previous_base_address``,
                       ``previous_model_ids``.
``asset_online``       a poll succeeded after start or after being offline:
                       ``reason``, ``endpoint``.
``asset_offline``      no answer for two cycles: ``reason``, ``endpoint``.
``asset_degraded``     the reading became degraded: ``reason``.
``command_failed``     a target could not be written: ``target_kw``,
                       ``reason``, ``path`` and, when the device refused a
                       write, ``written`` (points, address, registers) and
                       ``answer`` (the Modbus exception).  A failure repeated
                       identically by the per-cycle refresh is reported once.

Sign convention: + is export (PV production, battery discharge).  SunSpec
meters (201-204, 211-214) count + as import, so their ``W`` and ``VAR`` are
negated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge.asset import EventSink
from edge.runtime.cycle_clock import CycleClock

from drivers.registry import DriverSpec
from drivers.sunspec.config import Serial, SunSpecAsset, describe, shared_link_problems

if TYPE_CHECKING:
    from drivers.sunspec.driver import Backoff, SunSpecDriver

__all__ = ["Backoff", "DRIVER", "Serial", "SunSpecAsset", "SunSpecDriver", "create"]


def create(asset, cycle_s: float, emit_event: EventSink, *, clock: CycleClock | None = None) -> "SunSpecDriver":
    # Imported here: the profile loads this package for its model, and
    # `flexedge check` has no business loading pymodbus and pysunspec2.
    from drivers.sunspec.driver import SunSpecDriver

    if asset.driver != "sunspec":
        raise ValueError(f"asset {asset.id!r}: driver is {asset.driver!r}, not 'sunspec'")
    if not cycle_s > 0:
        raise ValueError(f"asset {asset.id!r}: cycle_s must be positive, got {cycle_s!r}")
    return SunSpecDriver(asset, cycle_s, emit_event, clock=clock)


def __getattr__(name: str) -> Any:
    if name in ("Backoff", "SunSpecDriver"):
        from drivers.sunspec import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'drivers.sunspec' has no attribute {name!r}")


DRIVER = DriverSpec(name="sunspec", asset_model=SunSpecAsset, create=create, describe=describe,
                    check_assets=shared_link_problems, probe="drivers.sunspec.probe")
