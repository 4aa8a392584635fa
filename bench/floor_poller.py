"""The floor: a bare asyncio pymodbus poller of N SunSpec inverters, for bench/freshness_bench.py.

    python bench/floor_poller.py --ports 15021,15022 --broker-port 1883 --cycle-s 1 --ready-file r.json

It is the least any gateway has to do to report the inverters' power every
cycle: at start it walks each device's SunSpec map (marker at 40000, 0 or
50000) and plans the reads of the models given with --models (the daemon's
`polled_model_ids`, default the SunSpec driver's PV set) plus the end marker,
merged into as few requests of at most 125 registers as drivers/sunspec does
(blocks at most 16 registers apart merged when that adds no request).  Then,
every --cycle-s on the monotonic clock (t0 + k x cycle, missed ticks skipped),
it reads every span of every device, all devices at once (one connection
each, requests of one device in sequence), decodes W with W_SF from the
inverter model (101-103: W at +14, W_SF at +15 from the model's ID register),
and publishes ONE MQTT message (paho-mqtt, QoS 1) with every value to
--topic (default flexedge-floor/bench/values):

    {"seq": 17, "t_cycle": <monotonic s>, "read_ms": 21.3, "errors": 0, "w": {"<port>": 5370.0, ...}}

No validation, no spool, no controller: the lower bound.  Writes {"spans":
[[address, count], ...], "requests_per_cycle": n, "models": [...]} (those of the
first device; all must agree) to --ready-file once it polls.  Stops on SIGTERM
or SIGINT, or after --max-s.  Loopback by default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from pymodbus.client import AsyncModbusTcpClient

SUNS = (0x5375, 0x6E53)
BASES = (40000, 0, 50000)
END_ID = 0xFFFF
MAX_READ = 125
MAX_GAP = 16
# drivers/sunspec/driver.py POLLED_MODELS["pv"] (inverter, 701-705 DER models, nameplate/settings/controls)
DEFAULT_MODELS = (101, 102, 103, 111, 112, 113, 120, 121, 123, 701, 702, 703, 704, 705)
INT_INVERTERS = (101, 102, 103)  # W at +14, W_SF at +15 from the ID register


def plan_reads(blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Fewest requests of at most 125 registers covering the blocks (the same rule as the driver's)."""
    def requests(count: int) -> int:
        return -(-count // MAX_READ)

    merged: list[list[int]] = []  # start, end, requests
    for start, count in sorted(blocks):
        end = start + count
        if merged and start <= merged[-1][1] + MAX_GAP:
            m_start, m_end, m_requests = merged[-1]
            joined_end = max(end, m_end)
            if requests(joined_end - m_start) <= m_requests + requests(max(0, end - max(start, m_end))):
                merged[-1] = [m_start, joined_end, requests(joined_end - m_start)]
                continue
        merged.append([start, end, requests(count)])
    return [(a, min(MAX_READ, end - a)) for start, end, _ in merged for a in range(start, end, MAX_READ)]


def signed(value: int) -> int:
    return value - 0x10000 if value >= 0x8000 else value


class Device:
    def __init__(self, host: str, port: int, unit_id: int, timeout_s: float):
        self.host, self.port, self.unit_id, self.timeout_s = host, port, unit_id, timeout_s
        self.client: AsyncModbusTcpClient | None = None
        self.spans: list[tuple[int, int]] = []
        self.models: list[int] = []
        self.w_address = self.sf_address = 0

    async def read(self, address: int, count: int) -> list[int]:
        response = await self.client.read_holding_registers(address, count=count, device_id=self.unit_id)
        if response.isError():
            raise IOError(f"port {self.port}: read {address}+{count}: {response}")
        return response.registers

    async def connect(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = AsyncModbusTcpClient(self.host, port=self.port, timeout=self.timeout_s, retries=0,
                                           reconnect_delay=0)
        if not await self.client.connect():
            raise IOError(f"cannot connect to {self.host}:{self.port}")

    async def discover(self, wanted: set[int]) -> None:
        for base in BASES:
            try:
                if tuple(await self.read(base, 2)) == SUNS:
                    break
            except IOError:
                continue
        else:
            raise IOError(f"port {self.port}: no SunS marker")
        address, blocks, inverter = base + 2, [], None
        while True:
            model_id, length = await self.read(address, 2)
            if model_id == END_ID or (model_id == 0 and length == 0):
                blocks.append((address, 2))
                break
            if model_id in wanted and model_id not in self.models:
                self.models.append(model_id)
                blocks.append((address, length + 2))
                if model_id in INT_INVERTERS and inverter is None:
                    inverter = address
            address += 2 + length
        if inverter is None:
            raise IOError(f"port {self.port}: no inverter model {INT_INVERTERS} among {self.models}")
        self.spans = plan_reads(blocks)
        self.w_address, self.sf_address = inverter + 14, inverter + 15

    async def poll(self) -> float | None:
        """Every span of this device; the power in W (None on failure)."""
        try:
            if self.client is None or not self.client.connected:
                await self.connect()
            image: dict[int, int] = {}
            for address, count in self.spans:
                image.update(zip(range(address, address + count), await self.read(address, count)))
        except Exception:  # noqa: BLE001 -- a bench: count it, try again next cycle
            return None
        raw, sf = image[self.w_address], image[self.sf_address]
        if raw == 0x8000 or sf == 0x8000:
            return None
        return signed(raw) * 10.0 ** signed(sf)


async def main(ns: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ns.max_s:
        loop.call_later(ns.max_s, stop.set)
    wanted = {int(m) for m in ns.models.split(",")} if ns.models else set(DEFAULT_MODELS)
    devices = [Device(ns.host, int(p), ns.unit_id, ns.timeout_s) for p in ns.ports.split(",")]
    for device in devices:
        await device.connect()
    await asyncio.gather(*(d.discover(wanted) for d in devices))
    if len({tuple(d.spans) for d in devices}) != 1:
        print("floor: devices have different maps", file=sys.stderr)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"flexedge-floor-{ns.broker_port}")
    client.connect(ns.broker_host, ns.broker_port, keepalive=30)
    client.loop_start()
    try:
        ns.ready_file.write_text(json.dumps({"spans": devices[0].spans, "requests_per_cycle": len(devices[0].spans),
                                             "models": sorted(devices[0].models)}))
        next_cycle, seq = time.monotonic(), 0
        while not stop.is_set():
            t_cycle = time.monotonic()
            values = await asyncio.gather(*(d.poll() for d in devices))
            seq += 1
            payload = {"seq": seq, "t_cycle": t_cycle, "read_ms": round(1000 * (time.monotonic() - t_cycle), 2),
                       "errors": sum(v is None for v in values),
                       "w": {str(d.port): v for d, v in zip(devices, values)}}
            client.publish(ns.topic, json.dumps(payload), qos=1)
            next_cycle += ns.cycle_s
            if next_cycle <= time.monotonic():  # late: skip the missed ticks, do not burst
                next_cycle = time.monotonic() + ns.cycle_s
            try:
                await asyncio.wait_for(stop.wait(), next_cycle - time.monotonic())
            except TimeoutError:
                pass
    finally:
        client.loop_stop()
        client.disconnect()
        for device in devices:
            if device.client is not None:
                device.client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ports", required=True, help="comma-separated Modbus TCP ports, one device each")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--unit-id", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=0.5)
    parser.add_argument("--models", default=None, help="comma-separated model ids to read (default: the driver's PV set)")
    parser.add_argument("--cycle-s", type=float, default=2.0)
    parser.add_argument("--broker-host", default="127.0.0.1")
    parser.add_argument("--broker-port", type=int, required=True)
    parser.add_argument("--topic", default="flexedge-floor/bench/values")
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--max-s", type=float, default=None)
    asyncio.run(main(parser.parse_args()))
