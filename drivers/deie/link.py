"""The DEIE link: the grid operator's orders over IEC 60870-5-104 (c104).

The French DEIE is the grid operator's telecontrol box at a producer site.  Its
orders always win over the VPP: ``DeieLink`` validates each one, confirms it on
the wire and hands it to the controller (``apply_orders``) in the same loop
iteration.  Configuration is ``drivers.deie.config.DeieConfig``; behaviour and the
point list are documented in docs/deie.md.

Public API
----------
``DeieLink(cfg, apply_orders, emit_event)``
    ``cfg`` a ``DeieConfig``; ``apply_orders(GridOrders)`` is called on the
    event loop with the complete set of orders in force after every change
    (normally ``Controller.apply_grid_orders``); ``emit_event`` is the daemon's
    ``EventSink``.

``await DeieLink.run()``
    Runs until cancelled.  It never raises for link trouble: a busy port or an
    unreachable DEIE is retried with capped exponential backoff and jitter.

``DeieLink.report(p_kw, q_kvar, voltage_v, breaker_closed=None)``
    Non-blocking; called by the daemon every cycle.  Non-finite or None values
    are skipped.  Reports go out cyclically (COT 1, every
    ``report_interval_s``) and spontaneously (COT 3) when a value moves by more
    than ``report_deadband_pct`` or a status changes.  Server role only.

``DeieLink.restore(orders, link_loss_default=False)``
    Before ``run()``: put orders persisted before a restart in force (source
    ``"persisted"``, see ``edge/control/order_store.py``), as the status points report them.
``DeieLink.assume_link_lost()``
    Before ``run()``: the orders before the restart are unknown (unreadable
    file): apply ``on_link_loss`` now rather than after ``link_loss_timeout_s``.

``DeieLink.orders``  the ``GridOrders`` in force (``NO_ORDERS`` at start).
``DeieLink.serving``  server role: listening; client role: connecting or connected.
``DeieLink.link_up``  True while an operator connection is open (server role:
at least one active client; client role: the connection to the DEIE is open).

Orders (server role)
--------------------
Each command is validated in c104's callback thread (finite; ``p_limit`` in
[0, 1.1 * installed_kw] kW or [0, 100] %; ``q_setpoint`` in
[-1.1, 1.1] * installed_kw kvar; ``|tan_phi| <= max_abs_tan_phi``; switch
commands ON/OFF only, and ``p_limit_end`` ON only).  Valid: positive ACT_CON,
then on the loop ``apply_orders`` and the "received"/"applied" status points.
Invalid: negative ACT_CON, a ``grid_order_rejected`` event with the reason,
and nothing changes.

Events: ``grid_order_received``, ``deie_order_applied``, ``grid_order_rejected``,
``grid_order_apply_failed``, ``deie_link`` ({"up": bool}), ``deie_link_loss``
({"action": "hold" | "default_limit", ...}).
"""

# No `from __future__ import annotations`: c104 checks callback annotations as objects.

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import c104

from edge.asset import EventSink
from edge.runtime.backoff import Backoff
from drivers.deie.config import CLIENT_ORDER_TYPE, ORDER_SIGNALS, DeieConfig, DeiePoint
from edge.gridorders import NO_ORDERS, SOURCE_PERSISTED, GridOrders

log = logging.getLogger("flexedge.deie")

LIMIT_HEADROOM = 1.1  # a kW order may exceed installed_kw by 10 % (rounding, overload rating)
POLL_S = 0.05  # link-state and report supervision period
UNKNOWN_UNTIL_REPORTED = ("p_measured", "q_measured", "u_measured", "breaker_closed")
ORDER_STATUS = {  # order signal -> (received point, applied point)
    "p_limit": ("p_limit_received", "p_limit_applied"),
    "p_limit_end": ("p_limit_received", "p_limit_applied"),
    "q_setpoint": ("q_order_received", "q_order_applied"),
    "tan_phi_setpoint": ("q_order_received", "q_order_applied"),
    "disconnect": ("disconnect_received", "disconnect_applied"),
}


class OrderRejected(ValueError):
    """An order that fails validation; the message is the reason sent upstream."""


@dataclass(frozen=True, slots=True)
class Order:
    """A validated order: which signal and its value in flexedge units."""

    signal: str
    value: float | bool | None  # kW / kvar / tan(phi); True/False for switches; None for p_limit_end

    def apply_to(self, orders: GridOrders) -> GridOrders:
        """The orders in force once this one is applied."""
        if self.signal == "p_limit":
            return orders.with_(export_limit_kw=self.value, source="deie")
        if self.signal == "p_limit_end":
            return orders.with_(export_limit_kw=None, source="deie")
        if self.signal == "q_setpoint":
            return orders.with_(reactive_setpoint_kvar=self.value, tan_phi=None, source="deie")
        if self.signal == "tan_phi_setpoint":
            return orders.with_(tan_phi=self.value, reactive_setpoint_kvar=None, source="deie")
        if self.signal == "disconnect":
            return orders.with_(disconnected=bool(self.value), source="deie")
        raise OrderRejected(f"unknown order signal {self.signal!r}")


def interpret_order(cfg: DeieConfig, signal: str, raw: Any, scale: float = 1.0) -> Order:
    """Validate one raw order value; raise ``OrderRejected`` naming what is wrong.

    ``raw`` is a float for setpoints, a bool for single commands, or the name of
    a double-command state ("ON", "OFF", "INTERMEDIATE", "INDETERMINATE").
    """
    if signal in ("p_limit", "q_setpoint", "tan_phi_setpoint"):
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise OrderRejected(f"{signal}: expected a number, got {raw!r}")
        value = float(raw) * scale
        if not math.isfinite(value):
            raise OrderRejected(f"{signal}: value must be finite, got {value}")
        if signal == "p_limit":
            if cfg.limit_unit == "pct":
                if not 0.0 <= value <= 100.0:
                    raise OrderRejected(f"p_limit: {value:g} % outside 0..100 %")
                return Order(signal, cfg.installed_kw * value / 100.0)
            top = cfg.installed_kw * LIMIT_HEADROOM
            if not 0.0 <= value <= top:
                raise OrderRejected(f"p_limit: {value:g} kW outside 0..{top:g} kW")
            return Order(signal, value)
        if signal == "q_setpoint":
            top = cfg.installed_kw * LIMIT_HEADROOM
            if not -top <= value <= top:
                raise OrderRejected(f"q_setpoint: {value:g} kvar outside -{top:g}..{top:g} kvar")
            return Order(signal, value)
        if abs(value) > cfg.max_abs_tan_phi:
            raise OrderRejected(f"tan_phi_setpoint: {value:g} outside -{cfg.max_abs_tan_phi:g}..{cfg.max_abs_tan_phi:g}")
        return Order(signal, value)
    if signal in ("p_limit_end", "disconnect"):
        if raw in (True, "ON"):
            on = True
        elif raw in (False, "OFF"):
            on = False
        else:
            raise OrderRejected(f"{signal}: unknown command value {raw!r} (ON or OFF expected)")
        if signal == "p_limit_end":
            if not on:
                raise OrderRejected("p_limit_end: only ON (lift the limit) is meaningful, got OFF")
            return Order(signal, None)
        return Order(signal, on)
    raise OrderRejected(f"unknown order signal {signal!r}")


class DeieLink:
    """The gateway's end of the DEIE link; see the module docstring."""

    backoff_initial_s = 0.5
    backoff_max_s = 30.0

    def __init__(self, cfg: DeieConfig, apply_orders: Callable[[GridOrders], Any], emit_event: EventSink):
        self.cfg = cfg
        self._apply_orders = apply_orders
        self._emit = emit_event
        self._spec = cfg.point_map()
        self._orders = NO_ORDERS
        self._link_up = False
        self._serving = False
        self._down_since = time.monotonic()  # a link never opened counts as lost from start
        self._loss_handled = False
        self._loss_default = False
        self._status: dict[str, bool] = {"coupled": True}
        self._measured: dict[str, float] = {}
        self._sent: dict[str, Any] = {}  # last value transmitted spontaneously
        self._written: dict[str, Any] = {}  # last value set on the c104 point
        self._signal_of: dict[int, str] = {}  # IOA -> order signal
        self._breaker: bool | None = None
        self._points: dict[str, Any] = {}  # signal -> c104.Point of the running server
        self._probe: Callable[[], bool] = lambda: False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    # ------------------------------------------------------------ public

    @property
    def orders(self) -> GridOrders:
        return self._orders

    @property
    def link_up(self) -> bool:
        return self._link_up

    @property
    def serving(self) -> bool:
        """Server role: listening; client role: a connection attempt is under way or open."""
        return self._serving

    def report(self, p_kw: float | None, q_kvar: float | None, voltage_v: float | None,
               breaker_closed: bool | None = None) -> None:
        for signal, value in (("p_measured", p_kw), ("q_measured", q_kvar), ("u_measured", voltage_v)):
            if value is not None and math.isfinite(value):
                self._measured[signal] = float(value)
        if breaker_closed is not None:
            self._breaker = bool(breaker_closed)
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        role = self._serve if self.cfg.role == "server" else self._connect
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._supervise())
            tasks.create_task(role())

    def restore(self, orders: GridOrders, link_loss_default: bool = False) -> None:
        """Orders in force before a restart, back in force before any device is commanded."""
        self._loss_default = link_loss_default
        signals = ("p_limit", "q_setpoint", "disconnect")
        for signal in signals:
            # The link-loss default is not an order received from the operator (as in _on_link_loss).
            received = self._in_force(signal, orders) and not (signal == "p_limit" and link_loss_default)
            self._status[ORDER_STATUS[signal][0]] = received
        self._put_in_force(orders)
        for signal in signals:
            received, applied = ORDER_STATUS[signal]
            self._status[applied] = self._status[received] and self._orders == orders

    def assume_link_lost(self) -> None:
        """Whether an order was in force before the restart is unknown: act on link loss at once."""
        self._loss_handled = True
        self._on_link_loss(reason="orders before the restart unknown")

    # ------------------------------------------------------------ orders

    def _on_command(self, point: c104.Point, previous_info: c104.Information,
                    message: c104.IncomingMessage) -> c104.ResponseState:
        """c104 callback (its thread): validate, confirm, hand to the loop."""
        signal = self._signal_of.get(point.io_address)
        value = point.value
        raw = value.name if isinstance(value, c104.Double) else value
        try:
            if signal is None:
                raise OrderRejected(f"no order signal at IOA {point.io_address}")
            order = interpret_order(self.cfg, signal, raw, self._spec[signal].scale)
        except OrderRejected as exc:
            self._loop.call_soon_threadsafe(self._reject, signal, point.io_address, raw, str(exc))
            return c104.ResponseState.FAILURE
        self._loop.call_soon_threadsafe(self._accept, order, raw)
        return c104.ResponseState.SUCCESS

    def _on_monitored_order(self, point: c104.Point, previous_info: c104.Information,
                            message: c104.IncomingMessage) -> c104.ResponseState:
        """c104 callback, client role: the DEIE reports an order as a monitored value."""
        signal = self._signal_of.get(point.io_address)
        value = point.value
        raw = value.name if isinstance(value, c104.Double) else value
        if signal == "p_limit_end" and raw in (False, "OFF"):
            return c104.ResponseState.NONE  # "no end of limitation" is not an order
        try:
            order = interpret_order(self.cfg, signal, raw, self._spec[signal].scale)
        except OrderRejected as exc:
            self._loop.call_soon_threadsafe(self._reject, signal, point.io_address, raw, str(exc))
            return c104.ResponseState.NONE
        self._loop.call_soon_threadsafe(self._accept, order, raw, True)
        return c104.ResponseState.NONE

    def _reject(self, signal: str | None, ioa: int, raw: Any, reason: str) -> None:
        log.warning("DEIE order refused: %s", reason)
        self._emit("grid_order_rejected", None, {"signal": signal, "ioa": ioa, "value": _jsonable(raw), "reason": reason})

    def _accept(self, order: Order, raw: Any, only_if_changed: bool = False) -> None:
        new = order.apply_to(self._orders)
        if order.signal in ("p_limit", "p_limit_end"):
            self._loss_default = False  # the operator's own limit replaces the link-loss default
        if only_if_changed and new == self._orders:
            return
        self._emit("grid_order_received", None, {"signal": order.signal, "value": _jsonable(raw), "interpreted": order.value})
        received, applied = ORDER_STATUS[order.signal]
        in_force = self._in_force(order.signal, new)
        self._status[received] = in_force
        self._status[applied] = False
        self._put_in_force(new)
        self._status[applied] = in_force if self._orders == new else False
        self._emit("deie_order_applied", None, {"signal": order.signal, "export_limit_kw": new.export_limit_kw,
                                                "disconnected": new.disconnected})

    @staticmethod
    def _in_force(signal: str, orders: GridOrders) -> bool:
        if signal in ("p_limit", "p_limit_end"):
            return orders.export_limit_kw is not None
        if signal in ("q_setpoint", "tan_phi_setpoint"):
            return orders.reactive_setpoint_kvar is not None or orders.tan_phi is not None
        return orders.disconnected

    def _put_in_force(self, orders: GridOrders) -> None:
        self._orders = orders
        self._status["coupled"] = not orders.disconnected
        try:
            self._apply_orders(orders)
        except Exception as exc:  # the controller's fault must not kill the link
            log.exception("apply_orders failed")
            self._emit("grid_order_apply_failed", None, {"error": repr(exc)})
            self._orders = orders.with_(source=orders.source + ":unapplied")
        if self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------------ link supervision

    async def _supervise(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            except TimeoutError:
                pass
            self._wake.clear()
            up = bool(self._probe())
            if up != self._link_up:
                self._link_up = up
                if not up:
                    self._down_since = time.monotonic()
                self._loss_handled = False
                # A link coming up is news; one going down is a warning (the orders stay in force).
                log.log(logging.INFO if up else logging.WARNING, "DEIE link %s", "up" if up else "down")
                self._emit("deie_link", None, {"up": up, "role": self.cfg.role})
            if not up and not self._loss_handled and time.monotonic() - self._down_since >= self.cfg.link_loss_timeout_s:
                self._loss_handled = True
                self._on_link_loss()
            if self._points:
                await self._flush_reports()

    def _on_link_loss(self, reason: str | None = None) -> None:
        detail = {"action": self.cfg.on_link_loss, "timeout_s": self.cfg.link_loss_timeout_s,
                  "export_limit_kw": self._orders.export_limit_kw, "disconnected": self._orders.disconnected}
        if reason is not None:
            detail["reason"] = reason
        held_kw = self._orders.export_limit_kw
        if (self.cfg.on_link_loss == "default_limit" and self._orders.source.startswith(SOURCE_PERSISTED)
                and held_kw is not None and held_kw <= self.cfg.default_limit_kw):
            # A limit from before the restart that is at least as strict as the default stays:
            # the stricter wins, so a restart never loosens what the operator had ordered.
            detail["kept"] = SOURCE_PERSISTED
        elif self.cfg.on_link_loss == "default_limit":
            self._loss_default = True
            new = self._orders.with_(export_limit_kw=self.cfg.default_limit_kw, source="link_loss_default")
            detail["export_limit_kw"] = self.cfg.default_limit_kw
            self._status["p_limit_received"] = self._status["p_limit_applied"] = False
            self._put_in_force(new)
        log.warning("DEIE link lost %s: %s", reason or f"for {self.cfg.link_loss_timeout_s:.1f} s",
                    self.cfg.on_link_loss)
        self._emit("deie_link_loss", None, detail)

    # ------------------------------------------------------------ reports

    def _report_values(self) -> dict[str, Any]:
        values: dict[str, Any] = dict(self._measured)
        limit = self._orders.export_limit_kw
        if limit is None:
            values["p_limit_in_force"] = -1.0
        elif self.cfg.limit_unit == "pct":
            values["p_limit_in_force"] = limit / self.cfg.installed_kw * 100.0
        else:
            values["p_limit_in_force"] = limit
        values.update(self._status)
        values["link_loss_default"] = self._loss_default
        if self._breaker is not None:
            values["breaker_closed"] = self._breaker
        return {s: v for s, v in values.items() if s in self._points}

    def _moved(self, signal: str, value: Any) -> bool:
        last = self._sent.get(signal)
        if last is None or isinstance(value, bool) or signal == "p_limit_in_force":
            return last != value
        base = abs(last) if signal == "u_measured" else self.cfg.installed_kw
        return abs(value - last) > base * self.cfg.report_deadband_pct / 100.0

    async def _flush_reports(self) -> None:
        changes = []
        for signal, value in self._report_values().items():
            if self._written.get(signal) == value:
                continue
            self._written[signal] = value
            spontaneous = self._moved(signal, value)
            if spontaneous:
                self._sent[signal] = value
            changes.append((self._points[signal], self._spec[signal], value, spontaneous))
        if changes:
            await asyncio.to_thread(_write_points, changes)

    # ------------------------------------------------------------ roles

    async def _serve(self) -> None:
        backoff = Backoff(self.backoff_initial_s, self.backoff_max_s)
        while True:
            try:
                server = await asyncio.to_thread(self._start_server)
            except Exception as exc:
                delay = backoff.next_delay()
                log.error("DEIE server on %s:%d cannot start (%s); retry in %.1f s",
                          self.cfg.host, self.cfg.port, exc, delay)
                self._emit("deie_link", None, {"up": False, "role": "server", "error": str(exc)})
                await asyncio.sleep(delay)
                continue
            self._probe = lambda: server.has_active_connections
            self._serving = True
            try:
                await asyncio.Future()  # serve until cancelled
            finally:
                self._serving = False
                self._probe = lambda: False
                self._points = {}
                await asyncio.to_thread(server.stop)

    def _start_server(self):
        server = c104.Server(ip=self.cfg.host, port=self.cfg.port, tick_rate_ms=50,
                             transport_security=self._tls())
        station = server.add_station(common_address=self.cfg.common_address)
        points, self._signal_of = {}, {}
        for signal, spec in self._spec.items():
            if signal in ORDER_SIGNALS:
                point = station.add_point(io_address=spec.ioa, type=getattr(c104.Type, spec.type))
                point.on_receive(callable=self._on_command)
                self._signal_of[spec.ioa] = signal
            else:
                cyclic = spec.type.startswith("M_ME")  # periodic COT is for measurands
                point = station.add_point(io_address=spec.ioa, type=getattr(c104.Type, spec.type),
                                          report_ms=int(self.cfg.report_interval_s * 1000) if cyclic else 0)
                points[signal] = point
        self._points, self._sent, self._written = points, {}, {}
        # Initial values before the first client can interrogate, so GI never shows stale defaults.
        initial = self._report_values()
        self._sent.update(initial)
        self._written.update(initial)
        _write_points([(points[s], self._spec[s], v, False) for s, v in initial.items()])
        for signal in UNKNOWN_UNTIL_REPORTED:
            if signal in points and signal not in initial:
                points[signal].quality = c104.Quality.Invalid  # IV until the daemon reports it
        try:
            server.start()
        except Exception:
            self._points = {}
            server.stop()
            raise
        return server

    async def _connect(self) -> None:
        backoff = Backoff(self.backoff_initial_s, self.backoff_max_s)
        while True:
            client = await asyncio.to_thread(self._start_client)
            connection = client.connections[0]
            self._serving = True
            opened = lambda: connection.state == c104.ConnectionState.OPEN  # noqa: E731
            try:
                deadline = time.monotonic() + self.cfg.command_timeout_s
                while not opened() and time.monotonic() < deadline:
                    await asyncio.sleep(POLL_S)
                    if connection.state == c104.ConnectionState.OPEN_MUTED and time.monotonic() > deadline - 0.5 * self.cfg.command_timeout_s:
                        # c104 2.2.1 now and then leaves a fresh connection muted (no STARTDT sent)
                        await asyncio.to_thread(self._unmute_and_interrogate, connection)
                if opened():
                    backoff.reset()
                    self._probe = opened
                    while opened():
                        await asyncio.sleep(POLL_S)
                    self._probe = lambda: False
            finally:
                self._serving = False
                self._probe = lambda: False
                await asyncio.to_thread(client.stop)
            delay = backoff.next_delay()
            log.warning("DEIE at %s:%d not reachable; retry in %.1f s", self.cfg.host, self.cfg.port, delay)
            await asyncio.sleep(delay)

    def _unmute_and_interrogate(self, connection: c104.Connection) -> None:
        if connection.unmute():
            connection.interrogation(common_address=self.cfg.common_address)

    def _start_client(self):
        client = c104.Client(tick_rate_ms=50, command_timeout_ms=int(self.cfg.command_timeout_s * 1000),
                             transport_security=self._tls())
        connection = client.add_connection(ip=self.cfg.host, port=self.cfg.port, init=c104.Init.ALL)
        station = connection.add_station(common_address=self.cfg.common_address)
        self._signal_of = {}
        for signal, spec in self._spec.items():
            if signal in ORDER_SIGNALS:
                kind = CLIENT_ORDER_TYPE.get(spec.type, spec.type)
                point = station.add_point(io_address=spec.ioa, type=getattr(c104.Type, kind))
                point.on_receive(callable=self._on_monitored_order)
                self._signal_of[spec.ioa] = signal
        client.start()
        return client

    def _tls(self):
        if self.cfg.tls is None:
            return None
        tls = self.cfg.tls
        security = c104.TransportSecurity(validate=True, only_known=bool(tls.peer_cert_files))
        security.set_certificate(cert=str(tls.cert_file), key=str(tls.key_file))
        security.set_ca_certificate(cert=str(tls.ca_file))
        for path in tls.peer_cert_files:
            security.add_allowed_remote_certificate(cert=str(path))
        return security


def _write_points(changes: list[tuple[Any, DeiePoint, Any, bool]]) -> None:
    """Set report points (worker thread) and transmit the spontaneous ones."""
    for point, spec, value, spontaneous in changes:
        point.quality = c104.Quality()
        if isinstance(value, bool):
            point.value = (c104.Double.ON if value else c104.Double.OFF) if spec.type.startswith("M_DP") else value
        else:
            point.value = float(value) / spec.scale
        if spontaneous:
            point.transmit(cause=c104.Cot.SPONTANEOUS)


def _jsonable(raw: Any) -> Any:
    if isinstance(raw, float) and not math.isfinite(raw):
        return str(raw)
    return raw
