"""One Modbus connection (TCP or RTU) to one SunSpec device, on the asyncio loop.

Built on pymodbus' ``AsyncModbusTcpClient`` / ``AsyncModbusSerialClient``
with pymodbus' own retries and reconnects switched off: the driver owns the
retry policy (capped exponential backoff with jitter).

Public API:

``ModbusLink(asset)``
    ``asset`` is a ``drivers.sunspec.config.SunSpecAsset``; ``host``/``port`` select
    TCP, ``serial`` selects RTU.  ``unit_id`` is sent as pymodbus'
    ``device_id``, ``timeout_s`` bounds every request and the connect.

``await link.connect()``
    Opens a fresh connection (closing any previous one).  Raises ``LinkFailure``.

``await link.read(address, count) -> list[int]``
    Reads holding registers (function 3), ``count`` at most 125.

``await link.write(address, values)``
    Writes holding registers (function 16).

Both raise ``DeviceRejected`` (with the Modbus ``exception_code``) for an
exception response and ``LinkFailure`` for a timeout, a lost connection or a
malformed answer.  An ``asyncio.Lock`` keeps one request in flight.
``link.close()`` never raises; ``link.describe()`` names the endpoint for logs.
"""

from __future__ import annotations

import asyncio

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException, ModbusIOException

ILLEGAL_DATA_ADDRESS = 2
MODBUS_EXCEPTIONS = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


class LinkFailure(Exception):
    """The device did not answer (timeout, connection refused or lost, garbled reply)."""


class DeviceRejected(Exception):
    """The device answered a request with a Modbus exception response."""

    def __init__(self, what: str, code: int):
        self.code = code
        super().__init__(f"{what}: exception {code} ({MODBUS_EXCEPTIONS.get(code, 'unknown')})")


def _reraise_swallowed_cancel() -> None:
    # pymodbus awaits its response with asyncio.wait_for, which on Python 3.11
    # returns the result and drops a cancellation that arrives in the same loop
    # iteration as the response.  The task still counts the request, so honour it.
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class ModbusLink:
    def __init__(self, asset):
        self.asset = asset
        self.timeout_s = float(asset.timeout_s)
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self._lock = asyncio.Lock()

    def describe(self) -> str:
        if self.asset.serial is not None:
            s = self.asset.serial
            return f"rtu:{s.port}@{s.baudrate}{s.bytesize}{s.parity}{s.stopbits} unit {self.asset.unit_id}"
        return f"tcp:{self.asset.host}:{self.asset.port} unit {self.asset.unit_id}"

    def _new_client(self):
        common = dict(timeout=self.timeout_s, retries=0, reconnect_delay=0)
        if self.asset.serial is not None:
            s = self.asset.serial
            return AsyncModbusSerialClient(
                s.port, baudrate=s.baudrate, bytesize=s.bytesize, parity=s.parity, stopbits=s.stopbits, **common
            )
        return AsyncModbusTcpClient(self.asset.host, port=self.asset.port, **common)

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    async def connect(self) -> None:
        self.close()
        self._client = self._new_client()
        try:
            async with asyncio.timeout(self.timeout_s + 0.5):
                ok = await self._client.connect()
        except (TimeoutError, OSError, ModbusException) as error:
            self.close()
            raise LinkFailure(f"cannot connect to {self.describe()}: {error or type(error).__name__}") from None
        _reraise_swallowed_cancel()
        if not ok:
            self.close()
            raise LinkFailure(f"cannot connect to {self.describe()}")

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    async def _call(self, what: str, request):
        if self._client is None or not self._client.connected:
            raise LinkFailure(f"{what}: not connected to {self.describe()}")
        async with self._lock:
            try:
                # pymodbus applies timeout_s itself; the outer bound only guards against it hanging.
                async with asyncio.timeout(self.timeout_s * 2 + 0.5):
                    response = await request(self._client)
            except (TimeoutError, ModbusIOException):
                raise LinkFailure(f"{what}: no answer from {self.describe()} within {self.timeout_s:g} s") from None
            except (ModbusException, OSError) as error:
                raise LinkFailure(f"{what}: {error}") from None
        _reraise_swallowed_cancel()
        if response.isError():
            code = getattr(response, "exception_code", 0)
            raise DeviceRejected(what, code)
        return response

    async def read(self, address: int, count: int) -> list[int]:
        what = f"read {count} registers at {address}"
        response = await self._call(
            what, lambda c: c.read_holding_registers(address, count=count, device_id=self.asset.unit_id)
        )
        registers = list(getattr(response, "registers", []) or [])
        if len(registers) != count:
            raise LinkFailure(f"{what}: got {len(registers)} registers")
        return registers

    async def write(self, address: int, values: list[int]) -> None:
        what = f"write {len(values)} registers at {address}"
        await self._call(what, lambda c: c.write_registers(address, values, device_id=self.asset.unit_id))
