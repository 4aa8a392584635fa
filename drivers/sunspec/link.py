"""One asset's Modbus link (TCP or RTU) to its SunSpec device, on the asyncio loop.

A ``ModbusLink`` is the asset's handle onto the shared link of its endpoint
(drivers/sunspec/hub.py): every asset on one TCP endpoint (host, port) or one serial
line uses one pymodbus client (``AsyncModbusTcpClient`` / ``AsyncModbusSerialClient``,
pymodbus' own retries and reconnects switched off), whose requests are served one at a
time.  The driver owns the retry policy (capped exponential backoff with jitter); the hub
makes sure that several assets reconnecting at once make one connect.

Public API:

``ModbusLink(asset, on_link_down=None)``
    ``asset`` is an ``drivers.sunspec.config.SunSpecAsset``; ``host``/``port`` select TCP,
    ``serial`` selects RTU.  ``unit_id`` is sent as pymodbus' ``device_id``,
    ``timeout_s`` bounds every request and the connect.  ``on_link_down(reason)`` is
    called when the shared link is lost or given up while this handle is attached (all
    assets on the link are told at once).

``await link.connect()``
    Attaches to the link of the asset's endpoint and returns once it is open: at once if
    it already is, else through the one connect under way for all its assets.  Raises
    ``LinkFailure`` (also for serial settings that differ from those the line was opened
    with).

``await link.read(address, count) -> list[int]``
    Reads holding registers (function 3), ``count`` at most 125.

``await link.write(address, values)``
    Writes holding registers (function 16).

Both raise ``DeviceRejected`` (with the Modbus ``exception_code``) for an exception
response and ``LinkFailure`` for a timeout, a lost connection or a malformed answer;
``UnitUnreachable`` (a ``LinkFailure``) when a gateway answers exception 0x0A or 0x0B for
the unit.  A timeout of one unit does not close the link for the others (the hub's
docstring says when the link itself is given up).  ``link.close()`` detaches (the link
closes when its last asset detaches) and never raises; ``link.connected`` says whether
this handle is attached to an open link; ``link.describe()`` names the endpoint and unit
for logs; ``link.hub`` is the shared ``LinkHub`` (None before the first connect).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from drivers.sunspec.hub import (  # noqa: F401  (part of this module's API)
    MODBUS_EXCEPTIONS,
    DeviceRejected,
    LinkFailure,
    LinkHub,
    UnitUnreachable,
    hub_for,
)

ILLEGAL_DATA_ADDRESS = 2

__all__ = [
    "ILLEGAL_DATA_ADDRESS", "MODBUS_EXCEPTIONS", "DeviceRejected", "LinkFailure", "ModbusLink", "UnitUnreachable",
]


class ModbusLink:
    def __init__(self, asset, on_link_down: Callable[[str], None] | None = None):
        self.asset = asset
        self.unit_id = asset.unit_id
        self.timeout_s = float(asset.timeout_s)
        self.on_link_down = on_link_down
        self._hub: LinkHub | None = None

    def describe(self) -> str:
        if self.asset.serial is not None:
            s = self.asset.serial
            return f"rtu:{s.port}@{s.baudrate}{s.bytesize}{s.parity}{s.stopbits} unit {self.unit_id}"
        return f"tcp:{self.asset.host}:{self.asset.port} unit {self.unit_id}"

    @property
    def hub(self) -> LinkHub | None:
        return self._hub

    @property
    def connected(self) -> bool:
        hub = self._hub
        return hub is not None and self in hub.handles and hub.connected

    async def connect(self) -> None:
        hub = self._hub
        if hub is None or hub.loop is not asyncio.get_running_loop():
            self.close()  # a link of another (finished) loop
            hub = self._hub = hub_for(self.asset)
        await hub.connect(self)

    def close(self) -> None:
        if self._hub is not None:
            try:
                self._hub.detach(self)
            except Exception:
                pass

    async def read(self, address: int, count: int) -> list[int]:
        what = f"read {count} registers at {address}"
        response = await self._request(
            what, lambda c: c.read_holding_registers(address, count=count, device_id=self.unit_id)
        )
        registers = list(getattr(response, "registers", []) or [])
        if len(registers) != count:
            raise LinkFailure(f"{what}: got {len(registers)} registers")
        return registers

    async def write(self, address: int, values: list[int]) -> None:
        what = f"write {len(values)} registers at {address}"
        await self._request(what, lambda c: c.write_registers(address, values, device_id=self.unit_id))

    async def _request(self, what: str, call):
        if self._hub is None:
            raise LinkFailure(f"{what}: not connected to {self.describe()}")
        return await self._hub.request(self, what, call)
