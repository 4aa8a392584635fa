"""A small Chrome DevTools Protocol client: Debian's headless Chromium, driven over its websocket.

Enough for the status page's test and docs/screenshot.py: open a page, evaluate JavaScript,
wait for a condition, take a screenshot.  No Playwright: the `websockets` library speaks CDP.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import websockets

from conftest import terminate

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 15.0


def chromium_binary() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class CdpError(RuntimeError):
    pass


class Chromium:
    """``async with Chromium() as browser``: a headless Chromium with a fresh profile, stopped on leaving."""

    def __init__(self, binary: str | None = None):
        self.binary = binary or chromium_binary()
        if self.binary is None:
            raise FileNotFoundError("chromium is not installed (apt-get install chromium; ./dev test does it)")
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.events: list[dict[str, Any]] = []

    async def __aenter__(self) -> "Chromium":
        self._profile = tempfile.TemporaryDirectory(prefix="flexedge-chromium-")
        folder = Path(self._profile.name)
        self.log_path = folder / "chromium.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={folder}", "--remote-debugging-port=0", "about:blank"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            port, path = await self._devtools_address(folder / "DevToolsActivePort")
            self.ws = await websockets.connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=10)
        except BaseException:
            self._stop()
            raise
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.call("Browser.close"), 5)
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self.ws.close()
        self._stop()

    def _stop(self) -> None:
        terminate(self.proc)
        self._log.close()
        self._profile.cleanup()

    async def _devtools_address(self, marker: Path) -> tuple[int, str]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CdpError(f"chromium exited with {self.proc.returncode}: {self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                lines = marker.read_text().split()
            except FileNotFoundError:
                lines = []
            if len(lines) >= 2:
                return int(lines[0]), lines[1]
            await asyncio.sleep(0.05)
        raise CdpError(f"chromium wrote no DevToolsActivePort in {START_TIMEOUT_S:g} s")

    async def _read(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            future = self._pending.pop(message.get("id"), None)
            if future is None:
                if len(self.events) < 10_000:
                    self.events.append(message)
            elif not future.done():
                if "error" in message:
                    future.set_exception(CdpError(f"{message['error']}"))
                else:
                    future.set_result(message.get("result", {}))

    async def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
                   timeout_s: float = CALL_TIMEOUT_S) -> dict[str, Any]:
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        future = self._pending[ident] = asyncio.get_running_loop().create_future()
        await self.ws.send(json.dumps(message))
        try:
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._pending.pop(ident, None)

    async def new_page(self, url: str, width: int = 1280, height: int = 1000) -> "Page":
        target = await self.call("Target.createTarget", {"url": "about:blank"})
        attached = await self.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"])
        await page.call("Page.enable")
        await page.call("Runtime.enable")
        await page.call("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        await page.call("Page.navigate", {"url": url})
        return page


class Page:
    def __init__(self, browser: Chromium, session: str):
        self.browser = browser
        self.session = session

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.call(method, params, session=self.session)

    async def evaluate(self, expression: str) -> Any:
        """The expression's value (JSON-able); a JavaScript exception raises CdpError."""
        result = await self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r}: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
        """Evaluate until the expression is truthy; its value."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(CdpError):
                last = await self.evaluate(expression)
                if last:
                    return last
            await asyncio.sleep(interval_s)
        raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last value {last!r})")

    async def screenshot(self, path: Path | None = None, full_page: bool = True) -> bytes:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = await self.call("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
            params["captureBeyondViewport"] = True
        png = base64.b64decode((await self.call("Page.captureScreenshot", params))["data"])
        if path is not None:
            path.write_bytes(png)
        return png

    def console_errors(self) -> list[str]:
        """Errors the page logged or threw, as CDP reported them so far."""
        out = []
        for event in self.browser.events:
            if event.get("sessionId") != self.session:
                continue
            params = event.get("params", {})
            if event.get("method") == "Runtime.exceptionThrown":
                out.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif event.get("method") == "Runtime.consoleAPICalled" and params.get("type") == "error":
                out.append(json.dumps(params.get("args", []))[:500])
        return out


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
