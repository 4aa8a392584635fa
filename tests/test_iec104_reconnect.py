"""IEC 104 reconnects, checked on the wire (loopback).

A dead unit is retried at the driver's backoff pace, one attempt per backoff step and
no more (c104's own reconnect never runs: one client per attempt, stopped when it
fails); threads stay flat over many attempts; a unit that comes back is online within
a cycle of its interrogation passing on the wire; a refused setpoint shows in the
reading (``command_refused``) until one is confirmed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import threading
import time

import pytest

from conftest import free_port
from drivers.iec104 import Iec104Asset
from drivers.iec104.driver import Iec104Driver
from edge.runtime.backoff import Backoff
from simulators.bess import BessSimulator, BessSpec
from tests.conftest import DriverTask

CYCLE_S = 0.5
# A unit that accepts and at once closes crashes c104 2.2.1 now and then (its client sends
# STARTDT on a socket its connection thread is freeing: a segfault in Socket_write).  The proxy
# closes a little later, after STARTDT has gone out.
DEAD_CLOSE_AFTER_S = 0.05


class RecordingBackoff(Backoff):
    """The driver's backoff, noting when each delay was drawn (monotonic) and how long it was."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.drawn: list[tuple[float, float]] = []

    def next_delay(self) -> float:
        delay_s = super().next_delay()
        self.drawn.append((time.monotonic(), delay_s))
        return delay_s


class WireProxy:
    """A TCP proxy on 127.0.0.1 in front of a unit.

    Notes the time of every connection the driver opens and of every general-interrogation
    ACT_TERM (C_IC_NA_1, COT 10) the unit sends through it.  With nothing upstream (the unit
    is down) it closes the connection, as a unit whose IEC 104 server is not running would.
    ``hang_up_after_gi_s``: close every connection that long after its interrogation ended.
    """

    def __init__(self, upstream_port: int, hang_up_after_gi_s: float | None = None):
        self.upstream_port = upstream_port
        self.hang_up_after_gi_s = hang_up_after_gi_s
        self.accepted: list[float] = []
        self.gi_terms: list[float] = []
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> "WireProxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.append(time.monotonic())
        self._tasks.add(asyncio.current_task())
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.upstream_port), 1.0)
            except (OSError, TimeoutError):
                await asyncio.sleep(DEAD_CLOSE_AFTER_S)
                return
            hang_up = asyncio.Event()
            pipes = [asyncio.ensure_future(self._pipe(reader, up_writer, None)),
                     asyncio.ensure_future(self._pipe(up_reader, writer, hang_up))]
            try:
                await asyncio.wait([*pipes, asyncio.ensure_future(hang_up.wait())], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                up_writer.close()
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()
            self._tasks.discard(asyncio.current_task())

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hang_up: asyncio.Event | None) -> None:
        """Forward one direction; the unit's direction (``hang_up`` given) is watched for GI ACT_TERMs."""
        pending = b""
        try:
            while data := await reader.read(65536):
                if hang_up is not None:
                    pending, interrogated = self._scan(pending + data)
                    if interrogated and self.hang_up_after_gi_s is not None:
                        asyncio.get_running_loop().call_later(self.hang_up_after_gi_s, hang_up.set)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass

    def _scan(self, stream: bytes) -> tuple[bytes, bool]:
        """Note GI ACT_TERMs among the whole APDUs in ``stream``: (the incomplete rest, whether one came)."""
        seen = False
        while len(stream) >= 2 and len(stream) >= 2 + stream[1]:
            apdu, stream = stream[:2 + stream[1]], stream[2 + stream[1]:]
            is_i_frame = apdu[0] == 0x68 and len(apdu) >= 9 and apdu[2] & 1 == 0
            if is_i_frame and apdu[6] == 100 and apdu[8] & 0x3F == 10:
                self.gi_terms.append(time.monotonic())
                seen = True
        return stream, seen


class Driven(DriverTask):
    """An IEC 104 driver task with its events and when each came (monotonic)."""

    def __init__(self, port: int, backoff: Backoff, **extra):
        asset = Iec104Asset(id="bess1", kind="bess", driver="iec104", host="127.0.0.1", port=port, common_address=1,
                            template="bess-generic", max_charge_kw=100, max_discharge_kw=100,
                            connect_timeout_s=1.0, command_timeout_s=extra.pop("command_timeout_s", 2.0), **extra)
        self.events: list[tuple[float, str, dict]] = []
        self.driver = Iec104Driver(asset, CYCLE_S, lambda kind, _, detail: self.events.append((time.monotonic(), kind, detail)),
                                   backoff=backoff)

    async def until(self, predicate, timeout_s: float = 3.0, what: str = "condition"):
        deadline = time.monotonic() + timeout_s
        while not predicate(self.driver.reading()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached in {timeout_s} s; reading {self.driver.reading()}")
            await asyncio.sleep(0.01)
        return self.driver.reading()

    def times(self, kind: str) -> list[float]:
        return [at for at, k, _ in self.events if k == kind]


def process_threads() -> int:
    """Threads of this process, c104's native ones included (threading.active_count() sees only Python's)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


def process_rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def per_window(times: list[float], start: float, window_s: float, count: int) -> list[int]:
    return [sum(1 for t in times if start + i * window_s <= t < start + (i + 1) * window_s) for i in range(count)]


def assert_one_attempt_per_step(attempts: list[float], drawn: list[tuple[float, float]], tolerance_s: float = 0.01):
    """Each backoff delay passes with no attempt in it, and every attempt but the first follows one delay."""
    for drawn_at, delay_s in drawn:
        early = [t - drawn_at for t in attempts if drawn_at < t < drawn_at + delay_s - tolerance_s]
        assert not early, f"attempt {early[0]:.3f} s into a {delay_s:.3f} s backoff delay"
    # The last delay drawn may still be running, or its attempt under way.
    assert len(drawn) <= len(attempts) <= len(drawn) + 1, (len(attempts), len(drawn))


async def test_dead_unit_attempts_follow_the_backoff():
    # Cap 1.5 s: c104's own retry (about 1 s after a failure) would land inside a backoff delay.
    backoff = RecordingBackoff(first_s=0.05, cap_s=1.5)
    async with WireProxy(free_port()) as proxy, Driven(proxy.port, backoff) as run:
        started = time.monotonic()
        await asyncio.sleep(8.0)
        attempts = list(proxy.accepted)
        drawn = list(backoff.drawn)
    counts = per_window(attempts, started, 2.0, 4)
    print(f"attempts per 2 s: {counts}; delays drawn: {[round(d, 2) for _, d in drawn]}")
    assert_one_attempt_per_step(attempts, drawn)
    # At the cap an attempt comes every 0.75 to 1.5 s (plus the attempt itself): 1 to 3 per 2 s, and no growth.
    assert all(1 <= n <= 3 for n in counts[1:]), counts
    assert [k for _, k, _ in run.events] == ["asset_offline"]


async def test_threads_and_memory_stay_flat_while_a_unit_is_dead():
    backoff = RecordingBackoff(first_s=0.02, cap_s=0.1)
    threads_before = process_threads()
    async with WireProxy(free_port()) as proxy, Driven(proxy.port, backoff):
        samples: list[tuple[float, int, int]] = []
        started = time.monotonic()
        rss_start_kb = None
        while time.monotonic() - started < 7.0:
            await asyncio.sleep(0.1)
            samples.append((time.monotonic() - started, process_threads(), threading.active_count()))
            if rss_start_kb is None and time.monotonic() - started > 2.0:
                rss_start_kb = process_rss_kb()
        rss_growth_kb = process_rss_kb() - rss_start_kb
        attempts = len(proxy.accepted)
        assert_one_attempt_per_step(list(proxy.accepted), list(backoff.drawn))
    early = [n for t, n, _ in samples if t < 3.5]
    late = [n for t, n, _ in samples if t >= 3.5]
    print(f"{attempts} attempts; threads before {threads_before}, first half max {max(early)}, second half max {max(late)}; "
          f"Python threads max {max(p for _, _, p in samples)}; RSS growth after the first 2 s {rss_growth_kb} kB")
    assert attempts >= 35
    # An attempt's client has its own two threads while it runs, and the driver's pool and send
    # thread start on first use; a client left running would add two for every attempt.
    assert max(late) <= max(early) and max(late) <= threads_before + 6
    assert max(p for _, _, p in samples[len(samples) // 2:]) <= max(p for _, _, p in samples[:len(samples) // 2])
    assert rss_growth_kb < 1024


def _tshark_usable() -> bool:
    return shutil.which("tshark") is not None and os.geteuid() == 0


async def _capturing(capture: asyncio.subprocess.Process, port: int) -> bool:
    """Whether tshark sees a SYN of our own: it says "Capturing on" a little before it does."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and capture.returncode is None:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
        except OSError:
            pass  # refused: nothing listens, which is the point
        try:
            await asyncio.wait_for(capture.stdout.readline(), 0.2)
            return True
        except TimeoutError:
            continue
    return False


@pytest.mark.skipif(not _tshark_usable(), reason="needs tshark and the right to capture on lo")
async def test_refused_port_syns_follow_the_backoff():
    """Nothing listens (the unit's server is down): count the driver's SYNs with tshark."""
    port = free_port()
    capture = await asyncio.create_subprocess_exec(
        "tshark", "-i", "lo", "-l", "-n", "-f", f"tcp dst port {port} and tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn",
        "-T", "fields", "-e", "frame.time_epoch",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    if not await _capturing(capture, port):
        capture.kill()
        await capture.wait()
        pytest.skip("tshark could not capture on lo")
    backoff = RecordingBackoff(first_s=0.05, cap_s=1.5)
    driver_from = time.time()  # tshark's clock: the SYNs before are our own probes
    async with Driven(port, backoff):
        await asyncio.sleep(8.0)
        drawn = [delay_s for _, delay_s in backoff.drawn]
    await asyncio.sleep(0.3)  # the last SYNs through tshark's buffer
    capture.send_signal(signal.SIGINT)
    out, _ = await asyncio.wait_for(capture.communicate(), 10)
    syns = [float(line) for line in out.decode().split() if float(line) >= driver_from]
    gaps = [b - a for a, b in zip(syns, syns[1:])]
    print(f"{len(syns)} SYNs in 8 s, gaps {[round(g, 2) for g in gaps]}, delays {[round(d, 2) for d in drawn]}")
    assert len(drawn) <= len(syns) <= len(drawn) + 1
    # SYN k+1 follows SYN k by the k-th delay and the attempt's own few milliseconds, never less.
    assert all(gap >= delay_s - 0.01 for gap, delay_s in zip(gaps, drawn)), list(zip(gaps, drawn))
    assert all(gap <= delay_s + 0.3 for gap, delay_s in zip(gaps, drawn)), list(zip(gaps, drawn))


async def test_unit_back_is_online_within_a_cycle_of_its_interrogation():
    # A cap above the cycle: a link opened behind the driver's back (c104's own retry) would be
    # seen only when the driver's delay ends, up to 2 s after its interrogation.
    backoff = RecordingBackoff(first_s=0.05, cap_s=2.0)
    async with BessSimulator([BessSpec()]) as sim:
        unit = sim.units[0]
        async with WireProxy(unit.port) as proxy, Driven(proxy.port, backoff) as run:
            await run.until(lambda r: r.online and r.soc_pct is not None, what="online")
            await asyncio.to_thread(sim.stop_port, unit.port)
            await run.until(lambda r: not r.online, timeout_s=2 * CYCLE_S + 0.3, what="offline")
            dead_from = time.monotonic()
            await asyncio.sleep(4.0)
            dead_attempts = [t for t in proxy.accepted if t >= dead_from]
            back_at = time.monotonic()
            await asyncio.to_thread(sim.start_port, unit.port)
            await run.until(lambda r: r.online, timeout_s=2.0 + 2.0, what="online again")
            online_at = run.times("asset_online")[-1]
            [gi_term_at] = [t for t in proxy.gi_terms if t >= back_at]
            drawn = [(at, d) for at, d in backoff.drawn if at >= dead_from]
            assert_one_attempt_per_step([t for t in proxy.accepted if t >= dead_from], drawn)
            assert run.driver.reading().online
    print(f"{len(dead_attempts)} attempts in 4 s down; online {online_at - gi_term_at:.4f} s after the "
          f"interrogation's ACT_TERM on the wire, {online_at - back_at:.3f} s after the unit came back")
    assert 0 <= online_at - gi_term_at < CYCLE_S
    assert online_at - back_at < 2.0 + 1.0  # at most one capped delay, then connect and interrogate
    assert len(dead_attempts) <= 8  # 0.05 s doubling to at most 2 s: about 6 in 4 s
    assert [k for _, k, _ in run.events if k.startswith("asset_o")] == ["asset_online", "asset_offline", "asset_online"]


async def test_command_refused_until_a_setpoint_is_confirmed():
    async with BessSimulator([BessSpec()]) as sim:
        unit = sim.units[0]
        async with Driven(unit.port, Backoff(first_s=0.05, cap_s=0.5), command_timeout_s=0.5) as run:
            reading = await run.until(lambda r: r.online and r.soc_pct is not None, what="online")
            assert not reading.command_refused
            unit.reply = "negative"
            run.driver.set_target_kw(10.0)
            reading = await run.until(lambda r: r.command_refused, what="refused after a negative ACT_CON")
            assert reading.degraded and "negative ACT_CON" in reading.detail
            await asyncio.sleep(2 * CYCLE_S)  # fresh values keep coming; the refusal stays
            assert run.driver.reading().command_refused
            unit.reply = "positive"
            run.driver.set_target_kw(20.0)
            reading = await run.until(lambda r: not r.command_refused, what="cleared by a confirmed setpoint")
            assert not reading.degraded
            unit.reply = "none"
            run.driver.set_target_kw(30.0)
            reading = await run.until(lambda r: r.command_refused, timeout_s=2.0, what="refused after no ACT_CON")
            assert "no ACT_CON" in reading.detail
            unit.reply = "positive"
            unit.set_remote(False)
            await run.until(lambda r: "local mode" in r.detail, what="local mode")
            run.driver.set_target_kw(40.0)  # not sent: the unit is in local mode
            await run.until(lambda r: "not sent" in r.detail, what="not sent")
            assert run.driver.reading().command_refused
            unit.set_remote(True)
            await run.until(lambda r: r.p_min_kw != r.p_max_kw, what="remote again")  # band no longer collapsed
            run.driver.set_target_kw(40.0)
            reading = await run.until(lambda r: not r.command_refused and not r.degraded, what="cleared again")
            assert [r.accepted for r in unit.commands] == [False, True, None, True]


async def test_unit_hanging_up_after_each_interrogation_is_retried_at_the_backoff_pace():
    """A link that drops soon after opening is no success: the backoff keeps growing."""
    backoff = RecordingBackoff(first_s=0.05, cap_s=0.8)
    async with BessSimulator([BessSpec()]) as sim:
        async with WireProxy(sim.units[0].port, hang_up_after_gi_s=0.1) as proxy, Driven(proxy.port, backoff) as run:
            await asyncio.sleep(5.0)
            attempts = list(proxy.accepted)
            drawn = list(backoff.drawn)
    print(f"{len(attempts)} connections in 5 s, each hung up 0.1 s after its interrogation; "
          f"delays {[round(d, 2) for _, d in drawn]}")
    assert_one_attempt_per_step(attempts, drawn)
    # Delays of 0.05 s doubling to 0.4-0.8 s, each after a link of about 0.13 s: 8 to 12 in 5 s;
    # reset after every link, they would stay at 0.025-0.05 s: over 25.
    assert len(attempts) <= 14
    assert all(d >= 0.4 for _, d in drawn[4:]), drawn
    # Every link was open and interrogated (the last one perhaps not yet when the driver stopped).
    assert len(attempts) - 1 <= len(run.times("asset_online")) <= len(attempts)
