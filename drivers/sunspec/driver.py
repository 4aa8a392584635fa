"""The SunSpec driver task: connect, discover, poll, command, reconnect.

See the package docstring (``drivers/sunspec/__init__.py``) for the public API
and docs/drivers/sunspec.md for behaviour.  One ``SunSpecDriver`` per asset;
its ``run()`` is the only code that touches its Modbus connection.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import zlib
from typing import Any

from edge.asset import AssetDriver, AssetReading, EventSink
from edge.backoff import Backoff  # noqa: F401  (re-exported: tests and callers use drivers.*.Backoff)

from drivers.sunspec.codec import ModelBlock, ModelLayout, layout_for
from drivers.sunspec.control import CommandError, build_writes, choose_path
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
from drivers.sunspec.measure import build_reading

log = logging.getLogger("flexedge.drivers.sunspec")

_INVERTER_AND_DER = (101, 102, 103, 111, 112, 113, 120, 121, 123, 701, 702, 703, 704)
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


class MapChanged(Exception):
    """The device's model map no longer matches what discovery found."""


def poll_phase(asset_id: str) -> float:
    """A stable fraction of the cycle in [0.1, 1.1) for this asset's polls."""
    return 0.1 + (zlib.crc32(asset_id.encode()) % 1000) / 1000.0


class SunSpecDriver(AssetDriver):
    def __init__(self, asset, cycle_s: float, emit_event: EventSink, *, backoff: Backoff | None = None):
        super().__init__(asset.id, cycle_s, emit_event)
        self.asset = asset
        # Checked every cycle/8, so the verdict comes at most two cycles after the last answer.
        self._liveness_check_s = cycle_s / 8
        self.offline_after_s = 2.0 * cycle_s - self._liveness_check_s
        self.backoff = backoff or Backoff(first_s=min(0.1, cycle_s), cap_s=30.0)
        self.link = ModbusLink(asset)
        self.model_map: ModelMap | None = None
        self.control_path: str | None = None
        self.identity: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._target: float | None = None
        self._target_pending = False
        self._release_unconfirmed = False
        self._last_written = 0.0
        self._layouts: dict[int, tuple[ModelEntry, ModelLayout]] = {}
        self._plan: list[ReadSpan] = []
        self._blocks: dict[int, ModelBlock] = {}
        self._reading = AssetReading(online=False, detail="not connected yet")
        self._online: bool | None = None
        self._started = time.monotonic()
        self._last_answer: float | None = None
        self._last_error = "not connected yet"
        self._last_error_at: float | None = None
        self._next_rescan = 0.0
        self._poll_problem: str | None = None
        self._command_problem: str | None = None
        self._degraded_reported = False
        self._failures_logged = 0
        if asset.revert_timeout_s and asset.revert_timeout_s < 2 * cycle_s:
            log.warning(
                "%s: revert_timeout_s %s is shorter than two cycles (%.3g s): the device may revert between refreshes",
                self.asset_id, asset.revert_timeout_s, 2 * cycle_s,
            )

    # ------------------------------------------------------------ public API

    def reading(self) -> AssetReading:
        if not self._online:
            return AssetReading(online=False, detail=self._last_error, read_at=time.time())
        reading = self._reading
        problems = [p for p in (reading.detail, self._poll_problem, self._command_problem) if p]
        if problems != ([reading.detail] if reading.detail else []):
            return AssetReading(
                online=True, p_kw=reading.p_kw, q_kvar=reading.q_kvar, soc_pct=reading.soc_pct,
                p_min_kw=reading.p_min_kw, p_max_kw=reading.p_max_kw, p_available_kw=reading.p_available_kw,
                voltage_v=reading.voltage_v, frequency_hz=reading.frequency_hz, degraded=True,
                detail="; ".join(problems), read_at=reading.read_at,
            )
        return reading

    def set_target_kw(self, target_kw: float | None) -> None:
        if target_kw is not None:
            if isinstance(target_kw, bool) or not isinstance(target_kw, (int, float)) or not math.isfinite(target_kw):
                raise ValueError(f"{self.asset_id}: target_kw must be a finite number of kW or None, got {target_kw!r}")
            if self.asset.kind == "meter" or not self.asset.controllable:
                self._emit("command_failed", {"target_kw": target_kw, "reason": "asset is not controllable"})
                return
            target_kw = float(target_kw)
        self._target = target_kw
        self._target_pending = True
        self._wake.set()

    async def run(self) -> None:
        self._started = time.monotonic()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._watch_liveness(), name=f"sunspec-{self.asset_id}-liveness")
                await self._connection_loop()
        finally:
            self.link.close()

    # ---------------------------------------------------------- connection

    async def _connection_loop(self) -> None:
        while True:
            try:
                if not self.link.connected:
                    await self.link.connect()
                await self._discover()
                await self._poll()
                if self._target is not None or self._release_unconfirmed or self._target_pending:
                    await self._write_target()
                self.backoff.reset()
                self._failures_logged = 0
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

    async def _read(self, address: int, count: int) -> list[int]:
        registers = await self.link.read(address, count)
        self._last_answer = time.monotonic()
        return registers

    async def _watch_liveness(self) -> None:
        while True:
            await asyncio.sleep(self._liveness_check_s)
            since = self._last_answer if self._last_answer is not None else self._started
            silent_s = time.monotonic() - since
            if silent_s > self.offline_after_s and self._online is not False:
                if self._last_error_at is None or self._last_error_at < since:
                    self._last_error = f"no answer for {silent_s:.2f} s"
                self._set_online(False)

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
        self.model_map = new_map
        self.identity = await self._read_identity(new_map)
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
        # Each asset polls at its own phase of the cycle (stable per asset id), so
        # that a site's devices are not all read in one burst: a burst delays the
        # loop, and with it a setpoint arriving at that moment.
        next_poll = time.monotonic() + self.cycle_s * poll_phase(self.asset_id)
        while True:
            if self._target_pending:
                await self._write_target()
            if time.monotonic() >= next_poll:
                if time.monotonic() >= self._next_rescan and await self._discover():
                    log.warning("%s: model map changed (periodic rescan)", self.asset_id)
                await self._poll()
                if self._release_unconfirmed or (self._target is not None and self._refresh_due()):
                    await self._write_target(refresh=True)
                next_poll += self.cycle_s
                if next_poll <= time.monotonic():  # fell behind: do not burst to catch up
                    next_poll = time.monotonic() + self.cycle_s
                continue
            self._wake.clear()
            if self._target_pending:
                continue
            try:
                async with asyncio.timeout(max(0.0, next_poll - time.monotonic())):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _poll(self) -> None:
        model_map = self.model_map
        assert model_map is not None
        image: dict[int, int] = {}
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
            image.update(zip(range(span.address, span.end), registers))
        for model_id, (entry, _) in self._layouts.items():
            header = (image[entry.address], image[entry.address + 1])
            if header != (entry.model_id, entry.length):
                raise MapChanged(f"model {model_id} header at {entry.address} now reads {header}")
        if model_map.end_marker and image[model_map.end_address] != END_MODEL_ID:
            raise MapChanged(f"end marker at {model_map.end_address} now reads {image[model_map.end_address]:#06x}")
        self._blocks = {
            model_id: ModelBlock(layout, [image[a] for a in range(entry.address, entry.end)], entry.address)
            for model_id, (entry, layout) in self._layouts.items()
        }
        path = choose_path(self.asset.kind, self._blocks)
        if path != self.control_path:
            log.info("%s: active-power control through %s", self.asset_id, path or "nothing (not controllable)")
            self.control_path = path
        self._poll_problem = None
        self._reading = build_reading(self.asset, self._blocks, path, time.time())
        if self._online is not True:
            self._set_online(True)
        self._report_degraded()

    def _report_degraded(self) -> None:
        reading = self.reading()
        if reading.degraded and not self._degraded_reported:
            log.warning("%s: degraded: %s", self.asset_id, reading.detail)
            self._emit("asset_degraded", {"reason": reading.detail})
        self._degraded_reported = reading.degraded

    # ------------------------------------------------------------- control

    def _refresh_due(self) -> bool:
        """Whether to write the command again now: often enough that the revert timer
        never runs out (a quarter of it), never more than once a cycle, and at least
        once a minute, which also restores a command a rebooted device forgot."""
        revert_s = float(self.asset.revert_timeout_s)
        interval_s = min(REFRESH_MAX_S, revert_s / 4) if revert_s > 0 else REFRESH_MAX_S
        return time.monotonic() - self._last_written >= max(0.0, interval_s - self.cycle_s / 2)

    async def _write_target(self, refresh: bool = False) -> None:
        target = self._target
        self._target_pending = False
        if not self._blocks:  # no successful poll on this map yet: the next cycle's refresh writes it
            self._release_unconfirmed = target is None
            return
        if self.control_path is None:
            if target is not None:
                self._command_failed(target, "no control model (704, 123 or 124) on the device", refresh)
            return
        try:
            writes = build_writes(
                self.control_path, target, int(self.asset.revert_timeout_s), self._blocks, self.asset.rated_kw,
                refresh=refresh,
            )
        except CommandError as error:
            self._command_failed(target, str(error), refresh)
            return
        try:
            for write in writes:
                await self.link.write(write.address, list(write.values))
                self._last_answer = time.monotonic()
        except DeviceRejected as error:
            self._last_answer = time.monotonic()
            self._command_failed(target, f"{write}: {error}", refresh, written=str(write), answer=str(error))
            if error.code == ILLEGAL_DATA_ADDRESS:
                raise MapChanged(str(error)) from None
            return
        except LinkFailure:
            self._target_pending = True  # write it again as soon as the link is back
            raise
        if not refresh or self._command_problem:
            log.info(
                "%s: %s written via %s: %s", self.asset_id,
                "release" if target is None else f"target {target:g} kW", self.control_path,
                "; ".join(map(str, writes)),
            )
        self._release_unconfirmed = False
        if refresh or any(label.endswith("RvrtTms") for write in writes for label in write.points):
            self._last_written = time.monotonic()  # only a write with the timer restarts it everywhere
        if self._command_problem:
            self._command_problem = None
            self._report_degraded()

    def _command_failed(self, target: float | None, reason: str, refresh: bool, **wire: str) -> None:
        self._release_unconfirmed = target is None
        problem = f"command failed: {reason}"
        repeated = refresh and self._command_problem == problem
        self._command_problem = problem
        if not repeated:
            log.warning("%s: command %s failed: %s", self.asset_id, target, reason)
            self._emit("command_failed", {"target_kw": target, "reason": reason, "path": self.control_path, **wire})
        self._report_degraded()

    # -------------------------------------------------------------- events

    def _emit(self, kind: str, detail: dict[str, Any]) -> None:
        try:
            self.emit_event(kind, self.asset_id, detail)
        except Exception:
            log.exception("%s: event sink failed on %s", self.asset_id, kind)
