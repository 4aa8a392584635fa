"""IEC 60870-5-104 driver: batteries (BESS) and power-to-heat/hydrogen units as controlled stations.

The gateway is the controlling station (a c104.Client per asset, a fresh one
for every connection attempt; the process's IEC 104 drivers share one send
thread and one loop inbox,
``drivers/iec104/bridge.py``).  The
daemon calls ``create(asset, cycle_s, emit_event)`` once per ``driver: iec104``
asset and runs the returned driver's ``run()`` as its own task.  Profile keys,
point maps, templates and command semantics: docs/drivers/iec104.md.

Public API
----------

``create(asset: drivers.iec104.config.Iec104Asset, cycle_s: float, emit_event: edge.asset.EventSink) -> Iec104Driver``
    Build the driver; nothing is opened until ``run()``.

``class Iec104Driver(edge.asset.AssetDriver)``

    ``await driver.run()``
        Connects (STARTDT, general interrogation, clock sync on every
        connection), then takes spontaneous, periodic and interrogated values
        as they arrive.  A quiet link is probed with a read command (C_RD_NA_1
        of ``p_measured``, or of another monitored point while a read is still
        in flight) every half cycle; no frame for two cycles, or the
        connection closing, marks the asset offline and reconnects with capped
        exponential backoff and equal jitter (0.05-0.1 s first, at most 10 s,
        ``RECONNECT_CAP_S``; ``Iec104Driver(..., backoff=Backoff(...))`` to
        change it).  Every attempt has its own client, stopped once the
        attempt fails or the link is lost, so that c104 makes no attempt of
        its own: one attempt per backoff step, no thread left behind; the
        delays start again from the first after a link that stayed up for
        the cap.  Online
        (``asset_online``) as soon as a new link's general interrogation has
        ended.  Runs until cancelled.

    ``driver.reading() -> edge.asset.AssetReading``
        Never blocks.  Offline: all values None, ``detail`` says why.
        BESS band: ``p_min_kw = -min(max_charge_kw, available charge)``,
        ``p_max_kw = min(max_discharge_kw, available discharge)``, the side
        blocked by ``soc_min_pct``/``soc_max_pct`` shrunk to 0.  P2H band:
        ``[-max_load_kw, 0]`` with the gap ``p_gap_kw = (-min_load_kw, 0)``:
        the unit is off or between its minimum and maximum load (``p_min_kw
        = 0`` and no gap when the store is full).
        Fault or local mode: degraded, band collapsed to the measured power.
        A failed command or a bad-quality value: degraded with the reason.
        ``command_refused``: the last setpoint was refused (negative ACT_CON
        or ACT_TERM), not confirmed within ``command_timeout_s`` or could not
        be sent (local mode, fault, a value its type cannot carry); kept
        until a setpoint is confirmed.  A lost link does not set it.

    ``driver.set_target_kw(target_kw: float | None) -> None``
        Non-blocking, newest wins.  Sends a setpoint command (the
        ``p_setpoint`` point, C_SE_NC_1 in the templates) at once; success
        is a positive ACT_CON (and ACT_TERM with ``confirm: act_term``)
        within ``command_timeout_s``.  A confirmed target is not re-sent
        (IEC 104 setpoints latch) except after a reconnect.  None sends 0 kW.

    ``driver.device_ratings() -> dict[str, edge.asset.DeviceRating]``
        BESS: the highest available charge / discharge power reported since
        start, as ``max_charge_kw`` / ``max_discharge_kw`` ("at least"
        figures); the daemon reports one above the profile's rating.

    Diagnostics: ``commands_sent``, ``commands_failed``, ``last_command_s``
    (round trip of the last confirmed command: from handing it to c104 to its
    confirmation), ``points`` (merged point map), ``endpoint``.  The logger
    ``flexedge.drivers.iec104.commands`` logs every confirmed command's round
    trip at DEBUG.

Events: ``asset_online`` / ``asset_offline`` (``reason``, ``endpoint``),
``asset_degraded`` (``reason``), ``command_failed`` (``target_kw``,
``sent_kw``, ``reason``, ``ioa``, ``type``, ``raw``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge.asset import EventSink

from drivers.iec104.config import Iec104Asset, PointSpec, describe, load_template
from drivers.registry import DriverSpec

if TYPE_CHECKING:
    from drivers.iec104.driver import Backoff, Iec104Driver

__all__ = ["Backoff", "DRIVER", "Iec104Asset", "Iec104Driver", "PointSpec", "create", "load_template"]


def create(asset: Iec104Asset, cycle_s: float, emit_event: EventSink, *, clock=None) -> "Iec104Driver":
    # The unit reports by itself (spontaneous and cyclic transmission): the site clock is not needed.
    # Imported here: the profile loads this package for its model, and
    # `flexedge check` has no business starting the IEC 104 stack.
    from drivers.iec104.driver import Iec104Driver

    if asset.driver != "iec104":
        raise ValueError(f"asset {asset.id!r}: driver is {asset.driver!r}, not 'iec104'")
    if not cycle_s > 0:
        raise ValueError(f"asset {asset.id!r}: cycle_s must be positive, got {cycle_s!r}")
    return Iec104Driver(asset, cycle_s, emit_event, clock=clock)


def __getattr__(name: str) -> Any:
    if name in ("Backoff", "Iec104Driver"):
        from drivers.iec104 import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'drivers.iec104' has no attribute {name!r}")


DRIVER = DriverSpec(name="iec104", asset_model=Iec104Asset, create=create, describe=describe,
                    probe="drivers.iec104.probe")
