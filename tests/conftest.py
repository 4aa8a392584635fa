"""Shared fixtures: free loopback ports and a real Mosquitto broker."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def terminate(proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """Stop a helper process: SIGTERM, then SIGKILL if it has not ended within ``timeout_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    """``predicate()``'s first true value, polled on the loop; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


def wait_port(port: int, timeout_s: float = 5.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s}s")


class DriverTask:
    """``async with``: a driver's ``run()`` as a task, cancelled on leaving.  Subclasses set ``self.driver``."""

    driver = None

    async def __aenter__(self):
        self.task = asyncio.create_task(self.driver.run())
        return self

    async def __aexit__(self, *exc):
        self.task.cancel()
        await asyncio.wait_for(asyncio.gather(self.task, return_exceptions=True), 5)


class Mosquitto:
    """A real Mosquitto on a loopback port; stop() and start() simulate an outage."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.port = port or free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_inflight_messages 0\n"
            "max_queued_messages 100000\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = open(self.workdir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc:
            terminate(self.proc)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
            self.log = None


@pytest.fixture
def mosquitto(tmp_path):
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.fail("mosquitto is not installed: run the README's test command, which installs it")
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()
