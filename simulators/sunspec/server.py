"""Serving simulated devices over Modbus TCP or RTU with pymodbus, and ticking their physics.

:class:`SunSpecSimulator` is the entry point (documented in the package
docstring).  Each TCP port or serial line is an :class:`_Endpoint`: one
pymodbus server whose ``SimDevice`` entries (one per unit id) delegate every
access to :meth:`SimulatedDevice.modbus_action`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from .device import WINDOW_REGISTERS, DeviceSpec, SimulatedDevice, daylight_fraction

log = logging.getLogger("simulators.sunspec")


class _Endpoint:
    """One pymodbus server (a TCP port or a serial line) carrying one or more unit ids."""

    def __init__(self, devices: list[SimulatedDevice], host: str, port: int, serial_port: str | None, baudrate: int):
        self.devices = devices
        self.host = host
        self.port = port
        self.serial_port = serial_port
        self.baudrate = baudrate
        self.server: ModbusTcpServer | ModbusSerialServer | None = None
        self._by_unit = {device.unit_id: device for device in devices}
        if len(self._by_unit) != len(devices):
            where = serial_port or f"port {port}"
            raise ValueError(f"two devices on {where} share a unit id: {[d.unit_id for d in devices]}")

    async def start(self) -> None:
        async def unknown_unit(*_args) -> ExcCodes:
            return ExcCodes.GATEWAY_NO_RESPONSE

        sim_devices = [
            SimDevice(
                id=device.unit_id,
                simdata=SimData(
                    address=device.image.base, count=WINDOW_REGISTERS, values=0, datatype=DataType.REGISTERS
                ),
                action=device.modbus_action,
            )
            for device in self.devices
        ]
        # Unit id 0 catches requests for unknown units; trace_pdu turns its answer into 0x0B.
        sim_devices.append(
            SimDevice(id=0, simdata=SimData(address=0, values=[0], datatype=DataType.REGISTERS), action=unknown_unit)
        )
        if self.serial_port:
            self.server = ModbusSerialServer(
                sim_devices,
                framer=FramerType.RTU,
                port=self.serial_port,
                baudrate=self.baudrate,
                trace_packet=self._trace_packet,
                trace_pdu=self._trace_pdu,
            )
        else:
            self.server = ModbusTcpServer(
                sim_devices,
                address=(self.host, self.port),
                trace_packet=self._trace_packet,
                trace_pdu=self._trace_pdu,
            )
        try:
            await self.server.serve_forever(background=True)
        except RuntimeError as exc:
            where = self.serial_port or f"{self.host}:{self.port}"
            raise OSError(f"SunSpec simulator cannot listen on {where}: {exc}") from exc
        if not self.serial_port:
            self.port = self.server.transport.sockets[0].getsockname()[1]
        for device in self.devices:
            device.port = self.port if not self.serial_port else 0
        log.info(
            "serving %s on %s",
            ", ".join(f"{d.kind} unit {d.unit_id} base {d.base_address}" for d in self.devices),
            self.serial_port or f"{self.host}:{self.port}",
        )

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.shutdown()
            self.server = None

    async def restart(self) -> None:
        """Stop and serve again on the same port (connections drop), e.g. after a base-address change."""
        await self.stop()
        await self.start()

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if sending and pdu.dev_id not in self._by_unit and not self.serial_port:
            return ExceptionResponse(
                pdu.function_code & 0x7F,
                ExcCodes.GATEWAY_NO_RESPONSE,
                device_id=pdu.dev_id,
                transaction=pdu.transaction_id,
            )
        return pdu

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        unit_index = 0 if self.serial_port else 6  # RTU: first byte; TCP: after the 6-byte MBAP prefix
        if not sending or len(data) <= unit_index:
            return data
        unit = data[unit_index]
        device = self._by_unit.get(unit)
        if device is None:
            return b"" if self.serial_port else data  # RTU: nobody on the line answers
        if device.fault == "silent":
            return b""
        if device.fault == "garbage":
            return random.randbytes(len(data))
        return data


class SunSpecSimulator:
    """Serve simulated SunSpec devices; see the package docstring."""

    def __init__(self, specs: DeviceSpec | Sequence[DeviceSpec], host: str = "127.0.0.1", tick_s: float = 0.1):
        if isinstance(specs, DeviceSpec):
            specs = [specs]
        if not specs:
            raise ValueError("SunSpecSimulator needs at least one DeviceSpec")
        if not 0.005 <= tick_s <= 10:
            raise ValueError(f"tick_s={tick_s!r}: must be in [0.005, 10] s")
        self.host = host
        self.tick_s = tick_s
        self.devices = [SimulatedDevice(spec) for spec in specs]
        groups: dict[tuple, list[SimulatedDevice]] = {}
        for index, device in enumerate(self.devices):
            spec = device.spec
            if spec.serial_port:
                key: tuple = ("serial", spec.serial_port)
            elif spec.port:
                key = ("tcp", spec.port)
            else:
                key = ("tcp-any", index)
            groups.setdefault(key, []).append(device)
        self._endpoints: list[_Endpoint] = []
        self._endpoint_of: dict[int, _Endpoint] = {}
        for (kind, where), devices in groups.items():
            serial = where if kind == "serial" else None
            port = where if kind == "tcp" else 0
            endpoint = _Endpoint(devices, host, port, serial, devices[0].spec.baudrate)
            self._endpoints.append(endpoint)
            for device in devices:
                self._endpoint_of[id(device)] = endpoint
                device._replace_hook = self._on_base_change
        self._tick_task: asyncio.Task | None = None

    async def start(self) -> None:
        self._tick(time.monotonic())  # devices start in steady state
        started: list[_Endpoint] = []
        try:
            for endpoint in self._endpoints:
                await endpoint.start()
                started.append(endpoint)
        except BaseException:
            for endpoint in started:
                await endpoint.stop()
            raise
        self._tick_task = asyncio.create_task(self._tick_loop(), name="sunspec-sim-tick")

    async def stop(self) -> None:
        if self._tick_task is not None:
            self._tick_task.cancel()
            try:
                await self._tick_task
            except asyncio.CancelledError:
                pass
            self._tick_task = None
        for endpoint in self._endpoints:
            await endpoint.stop()

    async def __aenter__(self) -> SunSpecSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    def device(self, unit_id: int = 1, port: int | None = None) -> SimulatedDevice:
        """The device with ``unit_id`` (on ``port`` if given)."""
        for device in self.devices:
            if device.unit_id == unit_id and (port is None or device.port == port):
                return device
        raise KeyError(f"no simulated device with unit id {unit_id}" + (f" on port {port}" if port else ""))

    async def restart(self, device: SimulatedDevice) -> None:
        """Restart the server carrying ``device`` (all its connections drop), like a reboot."""
        await self._endpoint_of[id(device)].restart()

    async def set_offline(self, device: SimulatedDevice, offline: bool = True) -> None:
        """Close (True) or reopen (False) the server carrying ``device``: connections drop and new
        ones are refused until it is back, on the same port."""
        endpoint = self._endpoint_of[id(device)]
        if offline:
            await endpoint.stop()
        elif endpoint.server is None:
            await endpoint.start()

    async def _on_base_change(self, device: SimulatedDevice, _old_base: int) -> None:
        endpoint = self._endpoint_of[id(device)]
        if endpoint.server is not None:
            await endpoint.restart()

    def _tick(self, now: float) -> None:
        local = time.localtime()
        hour = local.tm_hour + local.tm_min / 60 + local.tm_sec / 3600
        fractions: dict[tuple[float, float], float] = {}
        total_kw = 0.0
        meters = []
        for device in self.devices:
            if device.kind == "meter":
                meters.append(device)
                continue
            hours = device.spec.daylight_hours
            if hours not in fractions:
                fractions[hours] = daylight_fraction(hour, *hours)
            device.tick(now, fractions[hours])
            total_kw += device.power_kw
        for meter in meters:
            meter.meter_tick(now, total_kw)

    async def _tick_loop(self) -> None:
        next_tick = time.monotonic()
        while True:
            next_tick += self.tick_s
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            now = time.monotonic()
            if now - next_tick > 1.0:  # fell far behind (suspended loop): do not try to catch up
                next_tick = now
            self._tick(now)
