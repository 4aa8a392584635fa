"""Simulated SunSpec devices (PV inverter, hybrid inverter, storage, meter) over Modbus TCP or RTU.

For tests and benchmarks of SunSpec drivers: real pymodbus servers on
loopback (or a serial line) presenting a SunSpec register map, with simple
physics, a record of every write received, and fault injection.

Quick start (on the caller's event loop)::

    from simulators.sunspec import DeviceSpec, SunSpecSimulator

    async with SunSpecSimulator([DeviceSpec(kind="pv", rated_kw=10.0, sun_kw=8.0)]) as sim:
        pv = sim.devices[0]
        # connect a Modbus client to 127.0.0.1:pv.port, unit pv.unit_id ...
        record = await pv.next_write("WMaxLimPctEna", timeout_s=2.0)
        assert pv.power_kw <= 5.0

CLI: ``python -m simulators.sunspec --help``, e.g.
``python -m simulators.sunspec --kind pv --rated-kw 10 --port 1502 --count 3``
(ports 1502-1504), ``--base-address 0``, ``--unit-id 3``, ``--no-704``,
``--serial /dev/pts/5``, ``--frequency-hz 49.8``, ``--voltage-v 245``.  Every write received is logged.

``DeviceSpec`` (dataclass; invalid values raise ValueError naming the field)
---------------------------------------------------------------------------
``kind``            ``"pv"`` | ``"hybrid"`` (PV + battery behind one inverter) | ``"storage"`` | ``"meter"``
``rated_kw=10.0``   AC rating (120 WRtg, 121 WMax, 702 WMaxRtg); also the default charge/discharge power.
``unit_id=1``       Modbus unit (1-247).
``base_address=40000``  where "SunS" sits (40000, 0, 50000 or any address <= 63535).
``models=None``     model ids; None = the kind's default (``DEFAULT_MODELS``):
                    pv (1, 103, 120, 121, 123, 704); hybrid (1, 103, 120, 121, 123, 124, 704, 802);
                    storage (1, 103, 120, 121, 124, 704, 802); meter (1, 203).
                    Model 1 is always first.  Also supported: 101/102 (single/split phase),
                    111-113 (float), 701, 702, 703, meters 201-204, and 705 (volt-var; opt-in: list it,
                    e.g. ``(1, 103, 120, 121, 123, 704, 705)``; not for meters).  Without 704 the 123/124
                    paths apply.
``sun_kw=None``     fixed available PV power; None = daylight curve: ``pv_peak_kw`` * sin between
                    ``daylight_hours=(6.0, 18.0)`` of the local clock, 0 at night.
``pv_peak_kw=None`` PV peak for the daylight curve (default ``rated_kw``).
``capacity_kwh=10.0``, ``soc_pct=50.0``  battery (hybrid, storage).
``max_charge_kw`` / ``max_discharge_kw``  battery power limits (default ``rated_kw``).
``soc_min_pct=0`` / ``soc_max_pct=100``  the device stops discharging / charging there.
``ramp_pct_per_s=100.0``  output ramp in % of ``rated_kw`` per second (0 = jump).  Devices start in
                    steady state (the first tick jumps to the target).
``scale_factors={}`` overrides of SF point values by name (``{"W_SF": -1}``) or ``{"704.WSet_SF": 0}``.
``port=0``          TCP port; 0 = a free port (read ``device.port`` after start).  Specs with the same
                    non-zero port share one server (different unit ids).
``serial_port=None``, ``baudrate=19200``  serve Modbus RTU on this serial device instead of TCP
                    (8N1); specs with the same ``serial_port`` share the line.
``voltage_v=230.0``, ``frequency_hz=50.0``  reported grid values (change with ``set_grid``).
``load_kw=0.0``     meter: site consumption.
``meter_import_positive=True``  meter sign, see below.
``serial_number=None``  model 1 SN (default ``SIM<port>-<unit>``).

Default scale factors (``image.default_scale_factors``; non-trivial on purpose)
-------------------------------------------------------------------------------
Powers and power ratings (W_SF, WRtg_SF, VA_SF, VAr_SF, WMax_SF, WChaMax_SF, MaxChaRte_SF, 802
WChaDisChaMax_SF ...): 1 (raised for ratings above ~270 kW so int16 cannot overflow).
WMaxLimPct_SF, InOutWRte_SF, WSetPct_SF, VarSetPct_SF: -2.  WSet_SF, VarSet_SF: -1.  V_SF: -1.
Hz_SF: -2.  A_SF: -2.  PF_SF: -3 (ratio, 701/704), -1 in 101-103 and 201-204 (PF is a percentage
there).  SoC_SF, ChaState_SF, MinRsvPct_SF: -1.  WHRtg_SF: 1.  Energy counters (WH_SF, TotWh_SF): 0.
Value = raw * 10**SF on read and on write.  Unused points read as "not implemented" markers.

Control semantics (the shared flexedge SunSpec conventions)
-----------------------------------------------------------
* 704: ``WMaxLimPctEna``=1 limits AC export to ``WMaxLimPct`` % of 702 ``WMaxRtg`` (else 120 ``WRtg``).
  ``WSetEna``=1 with ``WSetMod``=1 (WATTS, the default) sets the AC power to ``WSet`` W (+ = export /
  discharge); ``WSetMod``=0 uses ``WSetPct`` % of the rating.  ``VarSetEna``=1 with ``VarSetMod``=4 sets
  reactive power to ``VarSet`` var.
* 705 (volt-var, module ``voltvar``): ``NCrv``=3 curves of ``NPt``=4 points (``models.VOLT_VAR_CURVES``,
  ``VOLT_VAR_POINTS``), named with 0-based indices: SunSpec curve n is ``"Crv[n-1]"``, its points
  ``"Crv[n-1].Pt[j].V"``/``".Var"`` (j = 0..3).  V_SF = DeptRef_SF = -1, RspTms_SF = 0.  Curve 1 is
  the curve in force, ``ReadOnly``=1, writes to it refused; default 4 points (92, +30) (98, 0)
  (102, 0) (108, -30) (V % of nominal 230 V, Var % of VarMax), DeptRef VAR_MAX_PCT, RspTms 10 s.
  Curves 2-3 start as copies with ``ReadOnly``=0.  ``AdptCrvReq``=n (2..3) checks curve n at once
  (ActPt 2..NPt, V strictly increasing within 50..150 %, Var within ±100 %, DeptRef W_MAX_PCT or
  VAR_MAX_PCT, enum values per pysunspec2's definition): valid, it is copied into curve 1 and
  ``AdptCrvRslt``=1 (COMPLETED); invalid, ``AdptCrvRslt``=2 (FAILED), curve 1 unchanged.  ``AdptCrvReq``
  reads 0 afterwards.  ``Ena``=1: the reactive power target is curve 1 at the measured voltage
  (linear between points, flat beyond the ends) times VarMax (0.44 * ``rated_kw``) or, for
  W_MAX_PCT, WMax; it overrides an enabled 704 VarSet and moves at the output ramp
  (``RspTms`` is not simulated).  ``Ena``=0: 705 does nothing.  Reversion (``RvrtTms``, ``RvrtCrv``)
  is not implemented: markers, writes refused.
* 123: ``WMaxLim_Ena``=1 limits export to ``WMaxLimPct`` % of 121 ``WMax`` (else 120 ``WRtg``).
  If 704 and 123 limits are both enabled, the tighter wins.  A 121 (or 702) ``WMax`` written below
  the rating caps the output too.
* 124 (battery): ``StorCtl_Mod`` bit 1 (discharge) set: battery power = ``OutWRte`` % * ``WChaMax``
  (signed); only bit 0 (charge): power = -``InWRte`` % * ``WChaMax``; 0 = released (battery idle).
* Revert timers: any accepted write to a control group (e.g. ``WMaxLimPctEna``, ``WMaxLimPct``,
  ``WMaxLimPctRvrtTms``) restarts its timer with the group's current ``*RvrtTms`` (s; 0 = never) if the
  group is enabled.  When it runs out the enable point takes its reversion value (704 ``*EnaRvrt``,
  default 0; 123/124: 0 / ``StorCtl_Mod``=0), a :class:`RevertRecord` is appended to
  ``device.reverts``.  704 ``*RvrtRem`` show the seconds left.  Timers are checked every tick.
* Physics per kind (every ``tick_s``=0.1 s, monotonic clock): pv output = min(available, limits, WSet);
  storage: battery = WSet or 124 command, limited by rates, export limit and SoC; hybrid: a 704 WSet
  is the AC target met by the battery first covering WSet - PV (PV curtailed if the battery cannot
  absorb), else the 124 command drives the battery and PV fills up to the limits.  Output approaches
  its target at ``ramp_pct_per_s``.  SoC integrates battery power (100 % efficiency).
* Writes are rejected with Modbus exception 2 (read-only point, ID/L/markers) or 3 (enum value not
  defined, the "not implemented" marker, a percentage outside [0, 100] (WSetPct, OutWRte, InWRte:
  [-100, 100]), ``StorCtl_Mod`` > 3, ``|WSet|`` above the rating, WMax/WChaMax outside [0, rating]).
  705: exception 2 for a curve whose ``ReadOnly``=1 and for ``RvrtTms``/``RvrtCrv``, 3 for
  ``AdptCrvReq`` above NCrv; curve ``Pt`` points may be written as "not implemented" (unused points).
  A rejected write changes nothing.

Measurements: 101-103 (and 111-113) ``W``, ``VA``, ``VAr``, ``PF`` (%), ``A``, ``PhVphA..C``, ``Hz``,
``WH``, ``St`` (4 MPPT, 5 THROTTLED when a limit/setpoint is in force, 2 SLEEPING / 8 STANDBY at 0 W);
701 ``W``, ``Var``, ``LNV``, ``Hz`` ...; 124 ``ChaState`` and 802 ``SoC`` (%), 802 ``W`` battery power
(+ = discharge), ``ChaSt``.

Meter sign: the SunSpec JSON definitions of 201-204 do not state a sign for ``W``.  By default the
simulated meter uses the metering convention **positive = import from the grid** (negative =
export); ``meter_import_positive=False`` gives the opposite (SolarEdge-style export positive).  The
meter measures a site whose export = sum of ``power_kw`` of the other devices in the same
simulator - ``load_kw``.  ``TotWhExp``/``TotWhImp`` accumulate.

``SunSpecSimulator(specs, host="127.0.0.1", tick_s=0.1)``
---------------------------------------------------------
``async with`` it, or ``await start()`` / ``await stop()``.  ``.devices`` (same order as specs),
``.device(unit_id, port=None)``, ``await .restart(device)`` (server restart: connections drop),
``await .set_offline(device, True/False)`` (server closed: connections refused, same port later).
Unknown unit ids get exception 0x0B (gateway target failed) on TCP and no answer on RTU.

``SimulatedDevice`` (``sim.devices[i]``)
----------------------------------------
State: ``port``, ``unit_id``, ``kind``, ``base_address``, ``models``, ``rated_kw``, ``power_kw``
(+ export; meter: site export), ``pv_kw``, ``battery_kw`` (+ discharge), ``available_kw``,
``soc_pct``, ``q_kvar``, ``voltage_v``, ``frequency_hz``, ``limit_pct`` / ``limit_kw`` (None when
released; includes a reduced WMax), ``setpoint_kw``, ``control_source`` (models whose controls are in
force: "704", "123", "124", "121", "704+123"..., None), ``requests`` (reads and accepted writes
served).
``writes``: list of :class:`WriteRecord` ``(t_s, unit_id, model_id, point, raw, value, accepted,
reason)``, one per point touched by each write request, ``t_s`` = ``time.monotonic()`` when handled
(a rejected write has ``accepted=False`` and ``value=None``).  ``reverts``: list of RevertRecord.
``image``: the :class:`~simulators.sunspec.image.RegisterImage` (``image.address_of(704, "WSet")``
gives a point's Modbus address; ``image.get(model, point)`` a scaled value).
``read_point(model_id, point)``: the value a client would read now.
``volt_var()``: model 705 as a :class:`~simulators.sunspec.voltvar.VoltVarState` (``enabled``,
``points`` of curve 1 as (V %, Var %), ``dept_ref`` and ``adopt_result`` symbol names, ``adopt_error``,
``rsp_tms_s``); ValueError without 705.  ``var_max_kvar``: the reactive rating.
``await next_write(point=None, model_id=None, timeout_s=5.0, after_s=None, where=None)``: the
earliest record at or after monotonic ``after_s`` (default: call time) matching point, model and
``where(record)`` (e.g. ``lambda r: r.raw == 0``), waiting up to ``timeout_s`` (TimeoutError).
Controls: ``set_grid(voltage_v=None, frequency_hz=None)`` (None leaves a value; reported from the next
read by 101-103/111-113 ``PhVphA..C`` and ``Hz``, 701 ``LNV`` and ``Hz``, meters ``PhV``, ``PhVphA..C``
and ``Hz``), ``set_sun(kw | None)``, ``set_load(kw)``,
``set_soc(pct)``, ``set_refuse_control(bool)`` (every write refused with exception 4, device
failure, as a unit in local mode does; reads go on), ``set_silent(bool)`` (requests are not processed and get no reply: clients time
out), ``set_fault("silent" | "garbage" | "busy" | None)`` ("garbage": replies are random bytes of
the right length; "busy": exception 6), ``await replace_models(models, base_address=None)``
(firmware update: new map; a new base restarts the server on the same port).

Implementation: pymodbus 3.16 ``SimDevice``/``SimData`` (the non-deprecated datastore) with an async
``action`` that serves every read from the device's own register image (re-encoded lazily, only
after a tick or a write changed something) and validates, records and applies every write before
pymodbus stores it, so a write's effect is visible in the same request.  Faults use the server's
``trace_packet``/``trace_pdu`` hooks.
"""

from .device import DEFAULT_MODELS, DeviceSpec, RevertRecord, SimulatedDevice, WriteRecord
from .image import RegisterImage, default_scale_factors
from .server import SunSpecSimulator
from .voltvar import VoltVarState

__all__ = [
    "DEFAULT_MODELS",
    "DeviceSpec",
    "RegisterImage",
    "RevertRecord",
    "SimulatedDevice",
    "SunSpecSimulator",
    "VoltVarState",
    "WriteRecord",
    "default_scale_factors",
]
