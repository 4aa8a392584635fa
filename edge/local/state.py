"""The status the page shows and /api/state returns, built from the gateway on demand.

Kept between requests: the chart's history (one point a cycle, the last 10 minutes) and
the last 100 events.  A snapshot costs O(assets) and reads only what the cycle already
computed (its telemetry and process image): nothing here asks a device anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import deque
from typing import Any

from edge import __version__
from edge.control.setpoints import iso_time
from edge.local.health import Health, judge, spool_problem
from edge.local.source import StatusSource, profile_sha256

HISTORY_S = 600.0
HISTORY_MAX_POINTS = 6000  # 10 min at the shortest cycle (0.2 s), with room
EVENTS_KEPT = 100
_MAX_DEPTH = 8


def jsonable(value: Any, depth: int = 0) -> Any:
    """A copy that encodes as strict JSON: non-finite numbers become None, anything odd a string."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= _MAX_DEPTH:
        return str(value)[:200]
    if isinstance(value, dict):
        return {str(key): jsonable(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item, depth + 1) for item in value]
    return str(value)[:200]


def encode(document: dict[str, Any]) -> str:
    try:
        return json.dumps(document, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError):
        return json.dumps(jsonable(document), allow_nan=False, separators=(",", ":"))


class StatusBook:
    def __init__(self, source: StatusSource):
        self.source = source
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_MAX_POINTS)
        self.events: deque[tuple[int, dict[str, Any]]] = deque(maxlen=EVENTS_KEPT)
        self._event_serial = 0
        self._events_sent = 0  # serial of the last event a live message carried
        self.model_maps: dict[str, dict[str, Any]] = {}  # asset id -> what its device said it is (models_discovered)
        self.last_cycle_mono: float | None = None

    # ----------------------------------------------------------- feeding

    def note_event(self, payload: dict[str, Any]) -> None:
        """Keep the event; ``serial`` numbers them, so the page can tell a new one from one it has."""
        self._event_serial += 1
        event = {"serial": self._event_serial, **jsonable(payload)}
        self.events.append((self._event_serial, event))
        if event.get("type") in ("models_discovered", "models_changed") and event.get("asset_id"):
            self.model_maps[event["asset_id"]] = event.get("detail")

    def events_sent_up_to_now(self) -> None:
        """No live client: the next live message carries only the events from now on."""
        self._events_sent = self._event_serial

    def after_cycle(self) -> dict[str, Any] | None:
        """Record the cycle just finished; the chart's new point (None before the first telemetry)."""
        self.last_cycle_mono = time.monotonic()
        controller = self.source.controller
        telemetry = controller.last_telemetry if controller is not None else None
        if not telemetry:
            return None
        now = time.time()
        site = telemetry["site"]
        orders = telemetry.get("grid_orders") or {}
        baseline, requested = site.get("baseline_kw"), site.get("activation_requested_kw")
        point = {
            "t": round(now, 3),
            "p_kw": site.get("p_kw"),
            "requested_kw": None if baseline is None or requested is None else round(baseline + requested, 3),
            "target_kw": site.get("setpoint_kw"),
            "export_limit_kw": site.get("export_limit_kw"),
            "import_limit_kw": site.get("import_limit_kw"),
            "deie_limit_kw": _order_limit_kw(orders),
        }
        self.history.append(point)
        while self.history and self.history[0]["t"] < now - HISTORY_S:
            self.history.popleft()
        return point

    # ---------------------------------------------------------- reading

    def health(self) -> Health:
        source = self.source
        return judge(source.profile.control.cycle_s, self.last_cycle_mono, source.stats.cycles, source.spool_writes)

    def snapshot(self, with_history: bool = True) -> dict[str, Any]:
        """Everything /api/state shows (docs/local.md); JSON-serialisable."""
        source = self.source
        profile = source.profile
        controller = source.controller
        telemetry = controller.last_telemetry if controller is not None else None
        state = controller.state if controller is not None else None
        orders = (telemetry or {}).get("grid_orders") or (
            _orders_dict(controller.grid_orders) if controller is not None else None)
        document = {
            "ts": iso_time(time.time()),
            "telemetry_ts": telemetry["ts"] if telemetry else None,
            "gateway": {
                "version": __version__,
                "site_id": profile.site.id,
                "site_name": profile.site.name,
                "profile_sha256": profile_sha256(source),
                "cycle_s": profile.control.cycle_s,
                "telemetry": (telemetry or {}).get("gateway"),  # the gateway block of the last telemetry
            },
            "health": self.health().body(),
            "mode": state.mode if state else None,
            "setpoint": _setpoint(state.setpoint) if state and state.setpoint else None,
            "schedule_id": state.schedule_id if state else None,
            "site": telemetry["site"] if telemetry else None,
            "limits": {
                "export_limit_kw": telemetry["site"].get("export_limit_kw") if telemetry else None,
                "import_limit_kw": telemetry["site"].get("import_limit_kw") if telemetry else None,
                "profile_export_limit_kw": profile.grid.export_limit_kw,
                "profile_import_limit_kw": profile.grid.import_limit_kw,
                "deie_export_limit_kw": _order_limit_kw(orders or {}),
            },
            "grid_orders": None if orders is None else {**orders, "in_force": _in_force(orders)},
            "deie": self._deie(),
            "uplink": self._uplink(),
            "spool": self._spool(),
            "assets": self._assets(telemetry, controller),
            "events": [event for _, event in self.events],
        }
        if with_history:
            document["history"] = list(self.history)
        return document

    def live_message(self, point: dict[str, Any] | None) -> dict[str, Any]:
        """One cycle's message on /api/live: the snapshot without the history, the new point and events."""
        document = self.snapshot(with_history=False)
        document["events"] = [event for serial, event in self.events if serial > self._events_sent]
        self._events_sent = self._event_serial
        document["point"] = point
        return document

    # ---------------------------------------------------------- helpers

    def _assets(self, telemetry: dict[str, Any] | None, controller: Any) -> list[dict[str, Any]]:
        reported = telemetry["assets"] if telemetry else {}
        image = controller.process_image if controller is not None else {}
        names = {asset.id: asset.name for asset in self.source.profile.assets}
        out = []
        for asset in self.source.assets:
            values = reported.get(asset.id) or {}
            reading = image.get(asset.id)
            log = getattr(asset.driver, "command_log", None)
            if not values.get("online", reading.online if reading else False):
                condition = "offline"
            elif reading is not None and reading.command_refused:
                condition = "refusing"
            elif values.get("degraded") or (reading is not None and reading.degraded):
                condition = "degraded"
            else:
                condition = "online"
            out.append({
                **values,
                "id": asset.id,
                "name": names.get(asset.id, ""),
                "kind": asset.kind,
                "driver": asset.driver_name,
                "controllable": asset.controllable,
                "state": condition,
                "detail": reading.detail if reading is not None else "",
                "commanded_kw": _finite(asset.commanded_kw),
                "control_path": getattr(asset.driver, "control_path", None),
                "model_map": self.model_maps.get(asset.id),
                "command": None if log is None else {
                    "asked": log.last_asked, "ok": log.last_ok, "answer": log.last_answer,
                    "at": iso_time(log.last_at) if log.last_at else None,
                    "succeeded": log.succeeded, "failed": log.failed,
                },
            })
        return out

    def _deie(self) -> dict[str, Any]:
        deie = self.source.deie
        return {
            "configured": self.source.profile.grid.deie is not None,
            "link_up": getattr(deie, "link_up", None) if deie is not None else None,
            "serving": getattr(deie, "serving", None) if deie is not None else None,
        }

    def _uplink(self) -> dict[str, Any]:
        uplink = self.source.uplink
        if uplink is None:
            return {"connected": False, "started": False}
        stats = dataclasses.asdict(uplink.stats)
        mqtt = self.source.profile.uplink.mqtt
        return {**stats, "started": True, "broker": f"{mqtt.host}:{mqtt.port}"}

    def _spool(self) -> dict[str, Any]:
        source = self.source
        uplink = source.uplink
        problem = spool_problem(source.profile.control.cycle_s, source.spool_writes)
        return {
            "pending_messages": uplink.stats.backlog_pending if uplink is not None else None,
            "dropped_messages_total": uplink.stats.dropped if uplink is not None else None,
            "writable": problem is None,
            "problem": problem,
            "outbox_messages": source.outbox.qsize(),
            "outbox_dropped_total": source.dropped_outbox,
            "path": str(source.profile.uplink.spool.path),
        }


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 3)


def _order_limit_kw(orders: dict[str, Any]) -> float | None:
    """The grid operator's export limit: 0 when it ordered a disconnection, None without an order."""
    if orders.get("disconnected"):
        return 0.0
    return orders.get("export_limit_kw")


def _in_force(orders: dict[str, Any]) -> bool:
    return bool(orders.get("disconnected")) or any(
        orders.get(key) is not None for key in ("export_limit_kw", "reactive_setpoint_kvar", "tan_phi"))


def _orders_dict(orders: Any) -> dict[str, Any]:
    return {"export_limit_kw": orders.export_limit_kw, "disconnected": orders.disconnected,
            "reactive_setpoint_kvar": orders.reactive_setpoint_kvar, "tan_phi": orders.tan_phi,
            "source": orders.source}


def _setpoint(setpoint: Any) -> dict[str, Any]:
    return {"id": setpoint.id, "activation_kw": setpoint.activation_kw, "issued_at": iso_time(setpoint.issued_at),
            "expires_at": iso_time(setpoint.expires_at), "received_at": iso_time(setpoint.received_at)}
