"""The status page in a real browser: headless Chromium (tests/cdp.py) against `flexedge demo`.

The page loads with every asset, its chart moves when the VPP steps, and the grid operator's
limit shows in the banner and on the chart.  Chromium missing: a failure under CI, else a skip.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cdp import Chromium, chromium_binary, in_ci
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO_ASSETS = ["pv-roof", "pv-carport", "bess-1", "bess-2", "boiler-1", "cp16-1", "cp16-2", "cp201-1", "cp201-2", "cp21-v2x",
               "meter-poc"]


def require_chromium() -> None:
    if chromium_binary() is None:
        message = "chromium is not installed (./dev test installs it: apt-get install chromium)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)


@contextlib.contextmanager
def demo(tmp_path: Path, deie_script: str, duration_s: float):
    """`flexedge demo` on a copy of the demo profile whose status page has a free port; (url, process)."""
    profile = yaml.safe_load((ROOT / "profiles" / "demo.yaml").read_text())
    port = free_port()
    profile["local_http"] = {"host": "127.0.0.1", "port": port}
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(profile))
    log = open(tmp_path / "demo.out", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "demo", "--profile", str(path), "--duration-s", str(duration_s),
         "--workdir", str(tmp_path / "work"), "--deie-script", deie_script],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise AssertionError(f"the demo's status page did not come up on port {port}:\n"
                                     + (tmp_path / "demo.out").read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/", proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


async def test_the_page_shows_the_site_live_and_the_grid_operators_limit(tmp_path):
    require_chromium()
    # The VPP starts once every asset answers; its first step comes 10 s later, the limit 6 s after its start.
    with demo(tmp_path, "limit:5@6,limit:none@40", duration_s=45) as (url, proc):
        async with Chromium() as browser:
            page = await browser.new_page(url)
            assets = await page.wait_for(
                "document.querySelectorAll('#assets tbody tr').length === 11 && "
                "Array.from(document.querySelectorAll('#assets tbody tr strong')).map(e => e.textContent)",
                20, "the assets table")
            assert assets == DEMO_ASSETS
            assert await page.evaluate("window.flexedge.connected") is True
            assert await page.evaluate("document.getElementById('link').textContent") == "live"
            first_path = await page.wait_for(
                "document.querySelector('#chart path.s-p')?.getAttribute('d')", 10, "the site's power on the chart")

            # The grid operator's limit: in the banner, on the chart, and the site obeys it.
            banner = await page.wait_for(
                "!document.getElementById('order-banner').hidden && document.getElementById('order-banner').textContent",
                30, "the grid operator's banner")
            assert "export limited to 5.0 kW" in banner and "deie" in banner, banner
            await page.wait_for("window.flexedge.chart.drawn.deie_limit_kw >= 2", 10, "the DEIE limit on the chart")
            assert await page.evaluate("document.getElementById('deie').textContent") == "link up"

            # The VPP steps (+15 kW, 10 s after it started): the requested power on the chart moves with it.
            await page.wait_for(
                "(() => { const r = window.flexedge.history.map(p => p.requested_kw).filter(v => v !== null);"
                " return r.length > 2 && Math.max(...r) - Math.min(...r) >= 10; })()",
                30, "the requested power to step")
            history = await page.evaluate("window.flexedge.history")
            in_force = [p for p in history if p["deie_limit_kw"] == 5.0]
            assert in_force and in_force[-1]["export_limit_kw"] == 5.0
            assert min(p["p_kw"] for p in in_force[-3:]) <= 5.5, in_force[-3:]  # the site obeys the limit
            assert await page.evaluate("document.querySelector('#chart path.s-p').getAttribute('d')") != first_path
            assert await page.evaluate("window.flexedge.messages") >= 5
            assert page.console_errors() == []

            png = await page.screenshot(tmp_path / "status-page.png")
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000

            # The gateway gone, the page says so at once.
            os.killpg(proc.pid, signal.SIGINT)
            await page.wait_for("document.getElementById('link').textContent.startsWith('disconnected')", 15,
                                "the page to show the link is lost")
