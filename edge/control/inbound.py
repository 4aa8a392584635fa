"""What the VPP sends the controller: setpoints, schedules and EV preferences, each
validated, acknowledged and applied at once (docs/mqtt-api.md).  Mixed into
``edge.control.cycle.Controller``, whose state it uses.
"""

from __future__ import annotations

import asyncio
import logging
import time

from edge.control.schedules import ScheduleDraft, ScheduleRejected
from edge.control.setpoints import SetpointRejected, iso_time

log = logging.getLogger("flexedge.control")

MAX_LARGE_SCHEDULES_IN_CHECK = 2  # more at once are refused "busy": the thread's queue stays short
SCHEDULE_ON_LOOP_BYTES = 64 * 1024  # larger schedules are structure-checked in a worker thread


class InboundMixin:
    def on_setpoint(self, raw: bytes, *, apply_soon: bool = False) -> None:
        """Validate a setpoint from the uplink, ack it, and apply it at once.

        ``apply_soon`` (the daemon): on the loop's next turn, with the same readings.  Judging the
        setpoint and sharing it are a few ms each at hundreds of assets; the links (an OCPP frame
        to forward) are served between them rather than behind both."""
        now = time.time()
        readings = self.take_image()  # once: the band the setpoint is judged by is the one it is shared over
        band_up, band_down = self._band_now(readings)
        try:
            setpoint = self.validator.validate(raw, now, band_up, band_down, self.state.setpoint)
        except Exception as error:  # noqa: BLE001 -- a validator bug refuses the message too, never applies it
            rejection = error if isinstance(error, SetpointRejected) else \
                SetpointRejected(None, self._intake_bug("setpoint", error))
            log.warning("setpoint %s rejected: %s", rejection.setpoint_id or "(no id)", rejection.reason)
            self.publish_live(
                "setpoint/ack",
                {"id": rejection.setpoint_id, "status": "rejected", "reason": rejection.reason, "ts": iso_time(now), "activation_kw": None},
            )
            self.emit_event("setpoint_rejected", None, {"id": rejection.setpoint_id, "reason": rejection.reason})
            return
        self.state.setpoint = setpoint
        self.state.last_setpoint_at = now
        if self.state.mode != "setpoint":
            log.info("setpoint %s in force: %+.3f kW", setpoint.id, setpoint.activation_kw)
        self.state.mode = "setpoint"
        self.publish_live(
            "setpoint/ack",
            {"id": setpoint.id, "status": "accepted", "reason": None, "ts": iso_time(now), "activation_kw": setpoint.activation_kw},
        )
        if apply_soon:
            asyncio.get_running_loop().call_soon(self._apply_setpoint, now, readings)
        else:
            self.step(now, readings)

    def _apply_setpoint(self, now: float, readings: dict) -> None:
        if not self._stopped:  # a stop in between: nothing is commanded any more
            self.step(now, readings)

    def on_schedule(self, raw: bytes) -> None:
        """Validate a schedule from the uplink, ack it, and put it in the book (docs/schedules.md).

        The structure of a large schedule (a week of 1-minute slots is about 0.1 s of CPU) is
        checked on a thread of its own, so the loop keeps its cadence; the rest, and the ack, on the loop.
        """
        if len(raw) > SCHEDULE_ON_LOOP_BYTES:
            if len(self._tasks) >= MAX_LARGE_SCHEDULES_IN_CHECK or self._stopped:
                self._schedule_refused(ScheduleRejected(None, f"busy: {len(self._tasks)} large schedules (over "
                                       f"{SCHEDULE_ON_LOOP_BYTES // 1024} KiB) are being checked; send it again later"))
                return
            task = asyncio.get_running_loop().create_task(self._on_large_schedule(raw))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        try:
            draft = self.schedule_validator.structure(raw)
        except Exception as error:  # noqa: BLE001 -- ScheduleRejected, or a validator bug: refused either way
            self._schedule_refused(error)
            return
        self._judge_schedule(draft)

    async def _on_large_schedule(self, raw: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            draft = await loop.run_in_executor(self._schedule_checker, self.schedule_validator.structure, raw)
        except Exception as error:  # noqa: BLE001 -- ScheduleRejected, or a validator bug: refused either way
            self._schedule_refused(error)
            return
        if not self._stopped:
            self._judge_schedule(draft)

    def _judge_schedule(self, draft: ScheduleDraft) -> None:
        now = time.time()
        try:
            schedule = self.schedule_validator.judge(draft, now, self.schedules)
            if schedule.kind == "baseline" and schedule.asset_id not in {a.id for a in self.assets if a.controllable}:
                raise ScheduleRejected(schedule.id, f"asset_id: no controllable asset {schedule.asset_id!r} on this site")
        except Exception as error:  # noqa: BLE001 -- ScheduleRejected, or a validator bug: refused either way
            self._schedule_refused(error, draft.kind)
            return
        self.schedules.add(schedule)
        log.info("schedule %s (%s) accepted: %d slots of %d s from %s", schedule.id, schedule.kind,
                 len(schedule.values), schedule.resolution_s, iso_time(schedule.start_s))
        self.publish_live("schedule/ack", {"id": schedule.id, "status": "accepted", "reason": None,
                                           "ts": iso_time(now), "kind": schedule.kind})
        self.step(now)

    def _schedule_refused(self, error: Exception, kind: str | None = None) -> None:
        rejection = error if isinstance(error, ScheduleRejected) else \
            ScheduleRejected(None, self._intake_bug("schedule", error))
        log.warning("schedule %s rejected: %s", rejection.schedule_id or "(no id)", rejection.reason)
        self.publish_live("schedule/ack", {"id": rejection.schedule_id, "status": "rejected",
                                           "reason": rejection.reason, "ts": iso_time(time.time()), "kind": kind})
        self.emit_event("schedule_rejected", None, {"id": rejection.schedule_id, "reason": rejection.reason})

    def on_ev_preferences(self, raw: bytes) -> None:
        """A driver's departure time and energy need for the EV at a charger (docs/schedules.md)."""
        now = time.time()
        if self.ev is None:
            asset_id, reason = None, "smart charging is off on this site (no ev_charging in the profile)"
        else:
            readings = self.take_image()
            try:
                asset_id, reason = self.ev.on_preferences(raw, now, readings)
            except Exception as error:  # noqa: BLE001 -- a validator bug refuses the message, never applies it
                asset_id, reason = None, self._intake_bug("ev/preferences", error)
        self.publish_live("ev/preferences/ack", {"asset_id": asset_id, "status": "rejected" if reason else "accepted",
                                                 "reason": reason, "ts": iso_time(now)})
        if reason:
            log.warning("EV preferences for %s rejected: %s", asset_id, reason)
            self.emit_event("ev_preferences_rejected", asset_id, {"reason": reason})
            return
        self.step(now)

    def _intake_bug(self, topic: str, error: Exception) -> str:
        """An unexpected failure while validating an inbound message: counted, logged, and the reason for its ack."""
        self.intake_failures += 1
        if self.intake_failures in (1, 10) or self.intake_failures % 1000 == 0:
            log.error("validating a message on %s failed (%d so far); it is rejected", topic, self.intake_failures,
                      exc_info=error)
        return f"internal error while validating ({type(error).__name__}); the message was not applied"
