"""The SunSpec driver task: connect, discover, poll, command, reconnect.

See the package docstring (``drivers/sunspec/__init__.py``) for the public API
and docs/drivers/sunspec.md for behaviour.  One ``SunSpecDriver`` per asset;
its ``run()`` is the only code that touches its Modbus connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any

from edge.asset import AssetDriver, AssetReading, DeviceRating, EventSink, VoltVarCurve
from edge.runtime.backoff import Backoff  # noqa: F401  (re-exported: tests and callers use drivers.*.Backoff)
from edge.runtime.cycle_clock import CycleClock, PollSlot

from drivers.sunspec.codec import ModelBlock, ModelLayout, layout_for
from drivers.sunspec.control import CommandError, build_writes, choose_path, choose_var_path
from drivers.sunspec.discovery import (
    AUTO_BASES,
    END_MODEL_ID,
    ModelEntry,
    ModelMap,
    NotSunSpec,
    ReadSpan,
    discover,
    plan_reads,
)
from drivers.sunspec.link import ILLEGAL_DATA_ADDRESS, DeviceRejected, LinkFailure, ModbusLink
from drivers.sunspec import voltvar
from drivers.sunspec.measure import ReadingDecoder

log = logging.getLogger("flexedge.drivers.sunspec")

_INVERTER_AND_DER = (101, 102, 103, 111, 112, 113, 120, 121, 123, 701, 702, 703, 704, voltvar.MODEL)
POLLED_MODELS = {
    "pv": _INVERTER_AND_DER,
    "bess": _INVERTER_AND_DER + (124, 802),
    "meter": (201, 202, 203, 204, 211, 212, 213, 214),
}
COMMON_MODEL = 1
# Firmware can swap a model the driver does not poll without moving any it does;
# a periodic walk of the chain (a few two-register reads) catches that too.
RESCAN_INTERVAL_S = 600.0
REFRESH_MAX_S = 60.0  # a command in force is written again at least this often
RESCAN_AFTER_TICK_S = 0.005  # a due rescan runs this long after the tick its poll was for
VOLT_VAR_RETRY_S = 30.0  # a volt-var curve found not in force is written again at most this often


class MapChanged(Exception):
    """The device's model map no longer matches what discovery found."""


@dataclass
class _Setting:
    """One commanded quantity (active or reactive power): its target and what was written."""

    key: str  # the target's name in events: "target_kw" or "target_kvar"
    unit: str
    what: str  # for logs and errors
    target: float | None = None
    pending: bool = False  # a new target waits to be written
    release_unconfirmed: bool = False  # a release could not be written yet
    last_written: float = 0.0  # monotonic time of the last write with the revert timer
    last_refused: float = 0.0  # monotonic time the device last refused a write of it
    refusals: int = 0  # writes refused in a row
    path: str | None = None  # control path in drivers.sunspec.control
    problem: str | None = None  # the last write's failure, until one succeeds

    @property
    def needs_write(self) -> bool:
        return self.target is not None or self.release_unconfirmed or self.pending


class SunSpecDriver(AssetDriver):
    def __init__(self, asset, cycle_s: float, emit_event: EventSink, *, backoff: Backoff | None = None,
                 clock: CycleClock | None = None):
        super().__init__(asset.id, cycle_s, emit_event)
        self.asset = asset
        # The site's clock wakes this driver to poll just before each control tick; a driver
        # made on its own (a test, a tool) runs a clock of its own.
        self.clock = clock if clock is not None else CycleClock(cycle_s)
        self._own_clock = clock is None
        self._slot: PollSlot | None = None  # its place in the clock's poll groups, while run() runs
        self._poll_for: int | None = None  # the tick the clock asked a poll for, not yet done
        # A power command went out after the poll for the coming tick: read the device again at
        # this moment (monotonic), as late before the tick as the polls are, to see it obey.
        self._reread_at: float | None = None
        self._rescan_at: float | None = None  # the periodic rescan, due just after a tick
        # Checked by the clock's watchdog and whenever the reading is taken.
        self.offline_after_s = self.clock.offline_after_s
        self.backoff = backoff or Backoff(first_s=min(0.1, cycle_s), cap_s=30.0)
        self.link = ModbusLink(asset, on_link_down=self._link_down)  # shared per endpoint (drivers/sunspec/hub.py)
        self.model_map: ModelMap | None = None
        self.identity: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._active = _Setting("target_kw", "kW", "active-power")
        self._reactive = _Setting("target_kvar", "kvar", "reactive-power")
        self._settings = (self._active, self._reactive)
        # Q(U) in the inverter (model 705): the curve wanted, and whether it must be (re)written.
        self._volt_var: VoltVarCurve | None = None
        self._volt_var_pending = False
        self._volt_var_on = False  # the device confirmed the curve and it was enabled
        self._volt_var_tried = 0.0
        self._volt_var_problem: str | None = None
        self._layouts: dict[int, tuple[ModelEntry, ModelLayout]] = {}
        self._plan: list[ReadSpan] = []
        self._blocks: dict[int, ModelBlock] = {}
        self._reading = AssetReading(online=False, detail="not connected yet")
        # Kept while offline: a nameplate does not change because the link is down.
        self._device_ratings: dict[str, DeviceRating] = {}
        self._online: bool | None = None
        self._started = time.monotonic()
        self._last_answer: float | None = None
        self._last_error = "not connected yet"
        self._last_error_at: float | None = None
        self._next_rescan = 0.0
        self._poll_problem: str | None = None
        self._degraded_reported = False
        self._failures_logged = 0
        if asset.revert_timeout_s and asset.revert_timeout_s < 2 * cycle_s:
            log.warning(
                "%s: revert_timeout_s %s is shorter than two cycles (%.3g s): the device may revert between refreshes",
                self.asset_id, asset.revert_timeout_s, 2 * cycle_s,
            )

    # ------------------------------------------------------------ public API

    @property
    def control_path(self) -> str | None:
        """Active-power control path (``"704-set"``, ``"704-limit"``, ``"124-rate"``, ``"123-limit"``) or None."""
        return self._active.path

    @property
    def var_control_path(self) -> str | None:
        """Reactive-power control path (``"704-var"``) or None."""
        return self._reactive.path

    @property
    def volt_var_available(self) -> bool:
        """Whether the device has model 705 with a writable curve (known after the first poll)."""
        block = self._blocks.get(voltvar.MODEL)
        return block is not None and voltvar.writable_curve(block) is not None

    @property
    def volt_var_in_force(self) -> bool:
        """Whether the curve asked for with ``set_volt_var`` runs in the device, as last read."""
        block = self._blocks.get(voltvar.MODEL)
        return self._volt_var is not None and block is not None and voltvar.in_force(block, self._volt_var)

    def set_volt_var(self, curve: VoltVarCurve | None) -> None:
        """Run ``curve`` in the inverter (model 705), or switch its volt-var function off (None).

        Non-blocking; written at once, then checked every poll and written again when the
        device no longer runs it (a restart).  Idempotent: the same curve again does nothing.
        """
        if curve == self._volt_var and not (curve is None and self._volt_var_on):
            return
        if curve is not None and (self.asset.kind == "meter" or not self.asset.controllable):
            self._emit("command_failed", {"volt_var": _curve_detail(curve), "reason": "asset is not controllable"})
            return
        self._volt_var = curve
        self._volt_var_pending = True
        self._wake.set()

    def device_ratings(self) -> dict[str, DeviceRating]:
        """The device's rated_kw (702 WMaxRtg/120 WRtg, or its WMax setting if lower) and, for a
        battery, max_charge_kw / max_discharge_kw, as last polled (docs/drivers/sunspec.md)."""
        return self._device_ratings

    def reading(self) -> AssetReading:
        self._check_liveness()
        if not self._online:
            return AssetReading(online=False, detail=self._last_error, read_at=time.time())
        reading = self._reading
        extra = [p for p in (self._poll_problem, *(s.problem for s in self._settings), self._volt_var_problem) if p]
        if extra:
            return dataclasses.replace(
                reading, degraded=True, detail="; ".join(p for p in (reading.detail, *extra) if p),
                # the active-power target the device refused stays refused until a write of it succeeds
                command_refused=self._active.problem is not None,
            )
        return reading

    def set_target_kw(self, target_kw: float | None) -> None:
        self._set(self._active, target_kw)

    def set_target_kvar(self, target_kvar: float | None) -> None:
        self._set(self._reactive, target_kvar)

    def _set(self, setting: _Setting, target: float | None) -> None:
        if target is not None:
            if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
                raise ValueError(f"{self.asset_id}: {setting.key} must be a finite number of {setting.unit} or None, "
                                 f"got {target!r}")
            if self.asset.kind == "meter" or not self.asset.controllable:
                self._emit("command_failed", {setting.key: target, "reason": "asset is not controllable"})
                return
            target = float(target)
        setting.target = target
        setting.pending = True
        self._wake.set()

    async def run(self) -> None:
        self._started = time.monotonic()
        self._slot = self.clock.join(self._poll_due, self._check_liveness)
        try:
            if self._own_clock:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self.clock.run(), name=f"sunspec-{self.asset_id}-clock")
                    await self._connection_loop()
            else:
                await self._connection_loop()
        finally:
            self.clock.leave(self._slot)
            self._slot = None
            self.link.close()

    # ---------------------------------------------------------- connection

    async def _connection_loop(self) -> None:
        while True:
            try:
                if not self.link.connected:
                    await self.link.connect()
                await self._discover()
                await self._poll()
                for setting in self._settings:
                    if setting.needs_write:
                        await self._write(setting)
                if self._volt_var_pending or (self._volt_var is not None and not self.volt_var_in_force):
                    await self._write_volt_var()
                self.backoff.reset()
                self._failures_logged = 0
                self._poll_for = self._reread_at = self._rescan_at = None  # just read and walked
                await self._serve()
            except MapChanged as change:
                log.warning("%s: model map changed (%s); rescanning", self.asset_id, change)
            except (LinkFailure, NotSunSpec, DeviceRejected) as error:
                self._note_failure(str(error))
                self.link.close()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a bug must not kill the driver task
                log.exception("%s: unexpected error", self.asset_id)
                self._note_failure(f"internal error: {error!r}")
                self.link.close()
            await asyncio.sleep(self.backoff.next_delay())

    def _note_failure(self, reason: str) -> None:
        self._last_error = reason
        self._last_error_at = time.monotonic()
        level = logging.WARNING if self._failures_logged == 0 else logging.DEBUG
        log.log(level, "%s: %s", self.asset_id, reason)
        self._failures_logged += 1

    def _link_down(self, reason: str) -> None:
        """The link (shared with the other assets on its endpoint) is lost: offline now, all together."""
        self._last_error = reason
        self._last_error_at = time.monotonic()
        if self._online is not False:
            self._set_online(False)

    async def _read(self, address: int, count: int) -> list[int]:
        registers = await self.link.read(address, count)
        self._last_answer = time.monotonic()
        return registers

    def _check_liveness(self) -> None:
        if self._online is False:
            return
        since = self._last_answer if self._last_answer is not None else self._started
        silent_s = time.monotonic() - since
        if silent_s > self.offline_after_s:
            if self._last_error_at is None or self._last_error_at < since:
                self._last_error = f"no answer for {silent_s:.2f} s"
            self._set_online(False)

    def _poll_due(self, tick: int) -> None:
        self._poll_for = tick
        self._wake.set()

    def _set_online(self, online: bool) -> None:
        self._online = online
        if online:
            log.info("%s: online (%s)", self.asset_id, self.link.describe())
            self._emit("asset_online", {"reason": "answering", "endpoint": self.link.describe()})
        else:
            log.warning("%s: offline: %s", self.asset_id, self._last_error)
            self._degraded_reported = False
            self._emit("asset_offline", {"reason": self._last_error, "endpoint": self.link.describe()})

    # ----------------------------------------------------------- discovery

    def _bases(self) -> tuple[int, ...]:
        if self.asset.base_address != "auto":
            return (int(self.asset.base_address),)
        if self.model_map is not None:  # where it was last time first, to reconnect quickly
            found = self.model_map.base_address
            return (found,) + tuple(b for b in AUTO_BASES if b != found)
        return AUTO_BASES

    async def _discover(self) -> bool:
        """Walk the map; True when it differs from the one in use (then everything is re-planned)."""
        new_map = await discover(self._read, self._bases())
        # Jittered so that a site's drivers, discovered together, never walk together.
        self._next_rescan = time.monotonic() + RESCAN_INTERVAL_S * random.uniform(0.75, 1.25)
        previous = self.model_map
        if previous is not None and previous == new_map:
            return False
        # The map is taken only once everything below is done: a read of the identity that fails
        # leaves the previous map, so the next discovery plans again instead of finding "no change".
        self.identity = await self._read_identity(new_map)
        self.model_map = new_map
        self._layouts = {}
        wanted = POLLED_MODELS[self.asset.kind]
        for model_id in wanted:
            entry = new_map.first([model_id])
            if entry is None:
                continue
            layout = layout_for(model_id, entry.length)
            if layout is not None:
                self._layouts[model_id] = (entry, layout)
        blocks = [(entry.address, entry.length + 2) for entry, _ in self._layouts.values()]
        if new_map.end_marker:
            blocks.append((new_map.end_address, 2))
        self._plan = plan_reads(blocks)
        self._blocks = {}
        self._compile_poll(new_map)
        detail: dict[str, Any] = {
            "base_address": new_map.base_address,
            "model_ids": new_map.model_ids,
            "polled_model_ids": sorted(self._layouts),
            "requests_per_cycle": len(self._plan),
            **self.identity,
        }
        log.info(
            "%s: SunSpec map at %d: models %s (%s); polling %s in %d request(s)",
            self.asset_id, new_map.base_address, new_map.model_ids,
            " ".join(f"{k}={v}" for k, v in self.identity.items()) or "no common model",
            sorted(self._layouts), len(self._plan),
        )
        if previous is None:
            self._emit("models_discovered", detail)
        else:
            detail.update(previous_base_address=previous.base_address, previous_model_ids=previous.model_ids)
            self._emit("models_changed", detail)
        return True

    def _compile_poll(self, model_map: ModelMap) -> None:
        """Resolve once per map what every poll needs: where each model and the end marker sit
        in the registers the plan's reads return (one list, the reads in order), the decoder of
        the reading, and (at the first poll) the control paths."""
        starts: list[tuple[int, int]] = []  # (address of a read, index of its first register in the list)
        index = 0
        for span in self._plan:
            starts.append((span.address, index))
            index += span.count

        def index_of(address: int) -> int:
            # A model lies inside one run of adjacent reads (plan_reads merges whole blocks), so its
            # registers follow each other in the list.
            span_address, span_index = max((s for s in starts if s[0] <= address), key=lambda s: s[0])
            return span_index + address - span_address

        self._poll_models = tuple((model_id, entry, index_of(entry.address))
                                  for model_id, (entry, _) in self._layouts.items())
        self._end_index = index_of(model_map.end_address) if model_map.end_marker else None
        self._decoder = ReadingDecoder(
            self.asset, {model_id: (self._layouts[model_id][1], start) for model_id, _, start in self._poll_models})
        # choose_path and choose_var_path look only at which points the models have (their layouts):
        # chosen at the first poll of a map, they hold until the next.
        self._paths: tuple[tuple[_Setting, str | None], ...] | None = None
        # 705's curves are laid out again only when its NCrv or NPt registers change.
        layout = self._layouts[voltvar.MODEL][1] if voltvar.MODEL in self._layouts else None
        self._curve_count_spans = () if layout is None else tuple(
            (spec.offset, spec.offset + spec.size) for name in ("NCrv", "NPt") if (spec := layout.points.get(name)))
        self._curve_counts_seen: list[list[int]] | None = None

    async def _read_identity(self, model_map: ModelMap) -> dict[str, str]:
        entry = model_map.first([COMMON_MODEL])
        layout = layout_for(COMMON_MODEL, entry.length) if entry else None
        if entry is None or layout is None:
            return {}
        registers: list[int] = []
        for span in plan_reads([(entry.address, entry.length + 2)]):
            registers += await self._read(span.address, span.count)
        block = ModelBlock(layout, registers, entry.address)
        names = {"manufacturer": "Mn", "model": "Md", "version": "Vr", "serial": "SN"}
        return {key: text for key, point in names.items() if (text := block.text(point))}

    # ------------------------------------------------------------- polling

    async def _serve(self) -> None:
        # Polls come when the site's clock asks (just before each control tick, in the
        # asset's phase group); commands go out the moment they are set.
        while True:
            for setting in self._settings:
                if setting.pending:
                    await self._write(setting)
            if self._volt_var_pending:
                await self._write_volt_var()
            if self._reread_at is not None and time.monotonic() >= self._reread_at:
                # A power command went out after this cycle's poll: read the device again, so
                # the coming tick (its telemetry, the DEIE's report) shows what it did.
                self._reread_at = None
                await self._poll()
                continue
            if self._rescan_at is not None and time.monotonic() >= self._rescan_at:
                # Just after a tick, outside the poll window: the walk of the map delays no poll
                # (nor another asset's on a shared link), and its time is not a poll's.
                self._rescan_at = None
                if await self._discover():
                    log.warning("%s: model map changed (periodic rescan)", self.asset_id)
                    await self._poll()
                continue
            if self._poll_for is not None:
                tick, self._poll_for = self._poll_for, None
                woken = time.monotonic()
                await self._poll()
                self.clock.poll_done(self._slot, tick, time.monotonic() - woken)
                if woken >= self._next_rescan and self._rescan_at is None:
                    self._rescan_at = max(time.monotonic(), self.clock.tick_at(tick) + RESCAN_AFTER_TICK_S)
                for setting in self._settings:
                    if (setting.release_unconfirmed or setting.target is not None) and self._refresh_due(setting):
                        await self._write(setting, refresh=True)
                if self._volt_var is not None and not self.volt_var_in_force \
                        and time.monotonic() - self._volt_var_tried >= VOLT_VAR_RETRY_S:
                    await self._write_volt_var()
                continue
            self._wake.clear()
            if any(setting.pending for setting in self._settings) or self._volt_var_pending:
                continue
            timed = [at for at in (self._reread_at, self._rescan_at) if at is not None]
            if not timed:
                await self._wake.wait()
                continue
            try:
                async with asyncio.timeout(max(0.0, min(timed) - time.monotonic())):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _poll(self) -> None:
        model_map = self.model_map
        assert model_map is not None
        regs: list[int] = []  # the plan's reads end to end (positions resolved by _compile_poll)
        for span in self._plan:
            try:
                registers = await self._read(span.address, span.count)
            except DeviceRejected as error:
                self._last_answer = time.monotonic()
                if error.code == ILLEGAL_DATA_ADDRESS:
                    raise MapChanged(str(error)) from None
                self._poll_problem = f"poll refused: {error}"
                self._report_degraded()
                return
            if len(registers) != span.count:  # the link checks this; every position below depends on it
                raise LinkFailure(f"read {span.count} registers at {span.address}: got {len(registers)} registers")
            regs += registers
        for model_id, entry, start in self._poll_models:
            if regs[start] != entry.model_id or regs[start + 1] != entry.length:
                header = (regs[start], regs[start + 1])
                raise MapChanged(f"model {model_id} header at {entry.address} now reads {header}")
        if self._end_index is not None and regs[self._end_index] != END_MODEL_ID:
            raise MapChanged(f"end marker at {model_map.end_address} now reads {regs[self._end_index]:#06x}")
        layouts = self._layouts
        self._blocks = {
            model_id: ModelBlock(layouts[model_id][1], regs[start:start + entry.length + 2], entry.address)
            for model_id, entry, start in self._poll_models
        }
        self._lay_out_curves()
        if self._paths is None:
            self._paths = ((self._active, choose_path(self.asset.kind, self._blocks)),
                           (self._reactive, choose_var_path(self.asset.kind, self._blocks)))
        for setting, path in self._paths:
            if path != setting.path:
                log.info("%s: %s control through %s", self.asset_id, setting.what, path or "nothing")
                setting.path = path
        self._poll_problem = None
        self._reading, self._device_ratings = self._decoder.decode(
            regs, self._active.path, time.time(), self._reactive.path)
        if self._online is not True:
            self._set_online(True)
        self._report_degraded()

    def _lay_out_curves(self) -> None:
        """Model 705's curves: their layout depends on NCrv and NPt, read from the device
        (looked at again only when their registers change: the same registers lay out the same)."""
        block = self._blocks.get(voltvar.MODEL)
        if block is None:
            return
        seen = [block.registers[start:end] for start, end in self._curve_count_spans]
        if seen == self._curve_counts_seen:
            return
        self._curve_counts_seen = seen
        counts = voltvar.curve_counts(block)
        if counts is None or block.has(f"Crv[{counts['NCrv']}].Pt[{counts['NPt']}].Var"):
            return
        entry = self._layouts[voltvar.MODEL][0]
        layout = layout_for(voltvar.MODEL, entry.length, counts)
        self._layouts[voltvar.MODEL] = (entry, layout)
        self._blocks[voltvar.MODEL] = ModelBlock(layout, block.registers, block.address)

    def _report_degraded(self) -> None:
        reading = self.reading()
        if reading.degraded and not self._degraded_reported:
            log.warning("%s: degraded: %s", self.asset_id, reading.detail)
            self._emit("asset_degraded", {"reason": reading.detail})
        self._degraded_reported = reading.degraded

    # ------------------------------------------------------------- control

    def _refresh_due(self, setting: _Setting) -> bool:
        """Whether to write the command again now: often enough that the revert timer
        never runs out (a quarter of it), never more than once a cycle, and at least
        once a minute, which also restores a command a rebooted device forgot."""
        revert_s = float(self.asset.revert_timeout_s)
        interval_s = min(REFRESH_MAX_S, revert_s / 4) if revert_s > 0 else REFRESH_MAX_S
        now = time.monotonic()
        if setting.refusals:
            # A refused write is tried again after a cycle, then 2, 4 ... cycles, up to the refresh
            # interval: a busy device gets it back at once, one that refuses is not asked every poll.
            retry_s = min(interval_s, self.cycle_s * 2 ** min(setting.refusals - 1, 16))
            return now - setting.last_refused >= max(0.0, retry_s - self.cycle_s / 2)
        return now - setting.last_written >= max(0.0, interval_s - self.cycle_s / 2)

    async def _write(self, setting: _Setting, refresh: bool = False) -> None:
        target = setting.target
        setting.pending = False
        if not self._blocks:  # no successful poll on this map yet: the next cycle's refresh writes it
            setting.release_unconfirmed = target is None
            return
        if setting.path is None:
            if target is not None:
                models = "704, 123 or 124" if setting is self._active else "704 with VarSet"
                self._command_failed(setting, f"no {setting.what} control model ({models}) on the device", refresh)
            return
        try:
            writes = build_writes(
                setting.path, target, int(self.asset.revert_timeout_s), self._blocks, self.asset.rated_kw,
                refresh=refresh,
            )
        except CommandError as error:
            self._command_failed(setting, str(error), refresh)
            return
        try:
            for write in writes:
                await self.link.write(write.address, list(write.values))
                self._last_answer = time.monotonic()
        except DeviceRejected as error:
            self._last_answer = time.monotonic()
            self._command_failed(setting, f"{write}: {error}", refresh, written=str(write), answer=str(error))
            if error.code == ILLEGAL_DATA_ADDRESS:
                raise MapChanged(str(error)) from None
            return
        except LinkFailure:
            setting.pending = True  # write it again as soon as the link is back
            raise
        if not refresh or setting.problem:
            log.info(
                "%s: %s written via %s: %s", self.asset_id,
                "release" if target is None else f"target {target:g} {setting.unit}", setting.path,
                "; ".join(map(str, writes)),
            )
        setting.release_unconfirmed = False
        self.command_log.note(setting.key, target, True, f"written via {setting.path}")
        if not refresh and self._slot is not None and self.clock.polled_for_upcoming(self._slot):
            clock = self.clock
            self._reread_at = max(time.monotonic(), clock.tick_at(clock.upcoming_tick()) - clock.guard_s)
        if refresh or any(label.endswith("RvrtTms") for write in writes for label in write.points):
            setting.last_written = time.monotonic()  # only a write with the timer restarts it everywhere
        setting.refusals = 0
        if setting.problem:
            setting.problem = None
            self._report_degraded()

    async def _write_volt_var(self) -> None:
        curve = self._volt_var
        self._volt_var_pending = False
        self._volt_var_tried = time.monotonic()
        block = self._blocks.get(voltvar.MODEL)
        if block is None:
            if curve is not None and self._blocks:
                self._volt_var_failed(curve, "the device has no volt-var model (705)")
            return  # not polled yet: the connection loop writes it after the first poll
        try:
            writes = await voltvar.apply(self.link.write, self._read, block, curve, self.asset.timeout_s)
        except CommandError as error:
            self._volt_var_failed(curve, str(error))
            return
        except DeviceRejected as error:
            self._last_answer = time.monotonic()
            self._volt_var_failed(curve, f"write refused: {error}", answer=str(error))
            if error.code == ILLEGAL_DATA_ADDRESS:
                raise MapChanged(str(error)) from None
            return
        except LinkFailure:
            self._volt_var_pending = True
            raise
        self._last_answer = time.monotonic()
        self._volt_var_on = curve is not None
        log.info("%s: volt-var curve %s: %s", self.asset_id,
                 "off" if curve is None else _curve_detail(curve), "; ".join(map(str, writes)))
        self._emit("volt_var_written", {"volt_var": None if curve is None else _curve_detail(curve),
                                        "path": str(voltvar.MODEL)})
        if self._volt_var_problem:
            self._volt_var_problem = None
            self._report_degraded()

    def _volt_var_failed(self, curve: VoltVarCurve | None, reason: str, **wire: str) -> None:
        problem = f"volt-var command failed: {reason}"
        if problem != self._volt_var_problem:
            log.warning("%s: %s", self.asset_id, problem)
            self._emit("command_failed", {"volt_var": None if curve is None else _curve_detail(curve),
                                          "reason": reason, "path": str(voltvar.MODEL), **wire})
        self._volt_var_problem = problem
        self._report_degraded()

    def _command_failed(self, setting: _Setting, reason: str, refresh: bool, **wire: str) -> None:
        target = setting.target
        self.command_log.note(setting.key, target, False, reason)
        setting.last_refused = time.monotonic()
        setting.refusals += 1
        setting.release_unconfirmed = target is None
        problem = f"{setting.what} command failed: {reason}" if setting is self._reactive else f"command failed: {reason}"
        repeated = refresh and setting.problem == problem
        setting.problem = problem
        if not repeated:
            log.warning("%s: %s command %s failed: %s", self.asset_id, setting.what, target, reason)
            self._emit("command_failed", {setting.key: target, "reason": reason, "path": setting.path, **wire})
        self._report_degraded()

    # -------------------------------------------------------------- events

    def _emit(self, kind: str, detail: dict[str, Any]) -> None:
        try:
            self.emit_event(kind, self.asset_id, detail)
        except Exception:
            log.exception("%s: event sink failed on %s", self.asset_id, kind)


def _curve_detail(curve: VoltVarCurve) -> dict[str, Any]:
    return {"points": [{"v_pct": v, "q_pct": q} for v, q in curve.points], "response_s": curve.response_s}
