"""Make docs/images/status-page.png: the status page of `flexedge demo` in headless Chromium.

    .venv/bin/python docs/screenshot.py [--wait-s 180] [--out docs/images/status-page.png]

Runs the demo (the grid operator limits export to 5 kW a minute before the capture), lets
the chart fill for ``--wait-s`` seconds, and captures the whole page over the DevTools protocol
with the tests' client (tests/cdp.py).  Needs Debian's chromium.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from cdp import Chromium  # noqa: E402
from test_status_page import demo  # noqa: E402


async def capture(out: Path, wait_s: float) -> None:
    with tempfile.TemporaryDirectory(prefix="flexedge-screenshot-") as folder:
        # The grid operator's limit comes a minute before the capture and lasts beyond it.
        limit = f"limit:5@{max(10.0, wait_s - 60):g},limit:none@{wait_s + 120:g}"
        with demo(Path(folder), limit, duration_s=wait_s + 60) as (url, _):
            async with Chromium() as browser:
                page = await browser.new_page(url, width=1280, height=1000)
                await page.wait_for("window.flexedge.messages > 0", 30, "the first live update")
                await asyncio.sleep(wait_s)
                await page.wait_for("!document.getElementById('order-banner').hidden", 60, "the grid operator's limit")
                out.parent.mkdir(parents=True, exist_ok=True)
                await page.screenshot(out)
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait-s", type=float, default=180.0, help="how long the chart fills before the capture")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "status-page.png")
    args = parser.parse_args()
    asyncio.run(capture(args.out, args.wait_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
