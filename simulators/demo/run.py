"""`flexedge demo`: the demo site on bundled simulators, shown live in the terminal.

Starts, on loopback and in one process: an MQTT broker (a private Mosquitto when
one is installed, else the embedded broker), a simulated device for every asset
of the profile (``simulators.demo.sites``), the gateway itself, then the VPP simulator
sending step activations and, when the profile has a DEIE link, the grid
operator sending an export limit part-way through.  Every cycle it prints what
the VPP sees on the wire: the setpoint, the site's power, the grid operator's
order in force and each asset's power.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from simulators.demo.sites import DEFAULT_DEIE_SCRIPT, SimulatedSite, play_deie
from edge.config.profile import Profile, ProfileError, load_profile

log = logging.getLogger("flexedge.demo")

VPP_AMPLITUDE_KW = 15.0
VPP_STEP_S = 10.0
READY_TIMEOUT_S = 20.0  # the VPP starts when every asset answers and the EVs charge, or after this
# Events the screen leaves out: start-up chatter, and DEIE orders, which the
# operator's confirmation and the DEIE column already show.
QUIET_EVENTS = {"gateway_started", "models_discovered", "grid_order_received", "deie_order_applied",
                "grid_order_applied"}


class MosquittoProcess:
    """A private Mosquitto on the demo's port, so a system broker is left alone."""

    def __init__(self, binary: str, host: str, port: int, workdir: Path):
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(f"listener {port} {host}\nallow_anonymous true\npersistence false\n")
        self.command = [binary, "-c", str(self.conf)]
        self.proc: subprocess.Popen | None = None
        self.host, self.port = host, port

    async def __aenter__(self):
        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode(errors='replace').strip()}")
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 0.5)
                writer.close()
                return self
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.host}:{self.port}")

    async def __aexit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            await asyncio.to_thread(self.proc.wait, 5)


def _broker(profile: Profile, workdir: Path, choice: str = "auto"):
    mqtt = profile.uplink.mqtt
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if choice == "mosquitto" and not binary:
        raise RuntimeError("--broker mosquitto: mosquitto is not installed (apt-get install mosquitto)")
    if binary and choice != "embedded":
        return "Mosquitto", MosquittoProcess(binary, mqtt.host, mqtt.port, workdir)
    from simulators.broker import MqttBroker

    return "embedded broker", MqttBroker(mqtt.host, mqtt.port)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "   -  "
    if abs(value) < 0.05:
        value = 0.0  # not "-0.0": an idle device is neither exporting nor importing
    return f"{value:+6.1f}" if signed else f"{value:6.1f}"


def _grid_order_text(orders: dict[str, Any] | None) -> str:
    """The DEIE column: the export limit in force, OFF when disconnected, - when none."""
    if not orders:
        return "-"
    if orders.get("disconnected"):
        return "OFF"
    limit = orders.get("export_limit_kw")
    return "-" if limit is None else f"{limit:.1f}"


def _event_text(event: dict[str, Any]) -> str:
    detail = event.get("detail") or {}
    # The asset id is shown already; a charger's id is in its asset's profile entry.
    items = ", ".join(f"{key}={value}" for key, value in detail.items() if value is not None and key != "charge_point_id")
    return " ".join(part for part in ("event", event.get("type"), event.get("asset_id"), items) if part)


class Screen:
    """Prints one line per telemetry message, as the VPP receives it."""

    def __init__(self, assets: list[tuple[str, str]], grid_orders: bool = False, out=sys.stdout):
        # Room for the state of charge next to a battery's power, and for "offline".
        self.columns = [(asset_id, kind, max(len(asset_id), 10 if kind == "bess" else 7)) for asset_id, kind in assets]
        self.grid_orders = grid_orders
        self.out = out
        self.lines = 0
        self.last_orders: dict[str, Any] | None = None

    def header(self) -> None:
        assets = "".join(f" {asset_id:>{width}}" for asset_id, _, width in self.columns)
        deie = f" {'DEIE':>6}" if self.grid_orders else ""
        print(f"\n{'time':8} {'mode':8} {'request':>8} {'site P':>7} {'target':>7} {'base':>7}{deie} |{assets}"
              "   (kW, + export)", file=self.out)

    def telemetry(self, message: dict[str, Any]) -> None:
        if self.lines % 20 == 0:
            self.header()
        self.lines += 1
        site = message["site"]
        cells = []
        for asset_id, kind, width in self.columns:
            values = message["assets"].get(asset_id, {})
            text = _fmt(values.get("p_kw")).strip() if values.get("online") else "offline"
            # A battery's state of charge is the site's flexibility; an EV's would only widen the line.
            if kind == "bess" and values.get("online") and values.get("soc_pct") is not None:
                text += f" {values['soc_pct']:.0f}%"
            cells.append(f" {text:>{width}}")
        orders = message.get("grid_orders")
        deie = f" {_grid_order_text(orders):>6}" if self.grid_orders else ""
        limited = f"  [{site['limited_by']}]" if site.get("limited_by") else ""
        print(
            f"{message['ts'][11:19]:8} {message['mode']:8} {_fmt(site.get('activation_requested_kw'), True):>8} "
            f"{_fmt(site.get('p_kw')):>7} {_fmt(site.get('setpoint_kw')):>7} {_fmt(site.get('baseline_kw')):>7}{deie} |"
            + "".join(cells) + limited + self._order_change(orders),
            file=self.out,
            flush=True,
        )

    def _order_change(self, orders: dict[str, Any] | None) -> str:
        """Marks the first line on which the grid operator's orders differ from the line before."""
        previous, self.last_orders = self.last_orders, orders
        if not self.grid_orders or orders is None or orders == previous:
            return ""
        if previous is None and _grid_order_text(orders) == "-":
            return ""  # the first line, no order in force: nothing has changed
        if orders.get("disconnected"):
            return "  << DEIE: disconnection"
        if orders.get("export_limit_kw") is not None:
            return f"  << DEIE: export limit {orders['export_limit_kw']:g} kW ({orders.get('source')})"
        return "  << DEIE: limit lifted"

    def note(self, text: str) -> None:
        print(f"          >> {text}", file=self.out, flush=True)


async def _show(vpp, screen: Screen) -> None:
    shown_telemetry = shown_events = shown_rejections = 0
    while True:
        await asyncio.sleep(0.1)
        telemetry = list(vpp.telemetry)
        for message in telemetry[shown_telemetry:]:
            screen.telemetry(message)
        shown_telemetry = len(telemetry)
        events = list(vpp.events)
        for event in events[shown_events:]:
            if event.get("type") not in QUIET_EVENTS:
                screen.note(_event_text(event))
        shown_events = len(events)
        rejected = [a for a in vpp.acks if a.get("status") == "rejected"]
        for ack in rejected[shown_rejections:]:
            screen.note(f"setpoint {ack.get('id')} rejected: {ack.get('reason')}")
        shown_rejections = len(rejected)


async def _site_ready(vpp, site: SimulatedSite, asset_ids: list[str], timeout_s: float) -> list[str]:
    """Wait until the EVs charge and the VPP's latest telemetry has every asset online; the ids still offline."""
    deadline = time.monotonic() + timeout_s
    offline = list(asset_ids)
    while time.monotonic() < deadline:
        if vpp.telemetry:
            assets = vpp.telemetry[-1]["assets"]
            offline = [a for a in asset_ids if not assets.get(a, {}).get("online")]
            if not offline and site.plugged_in.is_set():
                return []
        await asyncio.sleep(0.1)
    return offline


def _demo_profile(profile: Profile, folder: Path) -> Profile:
    """The profile with everything the gateway writes moved into the demo's folder."""
    spool = profile.uplink.spool.model_copy(update={"path": folder / "spool.sqlite"})
    updates: dict[str, Any] = {"uplink": profile.uplink.model_copy(update={"spool": spool})}
    if profile.ocpp is not None:
        updates["ocpp"] = profile.ocpp.model_copy(update={"id_tag_salt_file": folder / "ocpp-id-salt"})
    return profile.model_copy(update=updates)


def _status_page_line(profile: Profile) -> str:
    """Where the gateway's status page is (docs/local.md), when the profile turns it on."""
    local = profile.local_http
    if local is None:
        return ""
    host = "127.0.0.1" if local.host in ("0.0.0.0", "") else "::1" if local.host == "::" else local.host
    return f"\nStatus page: http://{f'[{host}]' if ':' in host else host}:{local.port}/"


def _describe_deie(script: str, limit_unit: str) -> str:
    from simulators.deie import parse_script

    unit = "%" if limit_unit == "pct" else " kW"
    steps = []
    for at_s, name, args in parse_script(script):
        if name == "limit":
            steps.append(f"lifts it at {at_s:g} s" if args[0].lower() == "none" else f"limits export to {args[0]}{unit} at {at_s:g} s")
        else:
            steps.append(f"{':'.join([name, *args])} at {at_s:g} s")
    return "grid operator (DEIE) " + ", ".join(steps) if steps else "no DEIE orders"


async def run_demo(profile_path: Path, duration_s: float | None = None, workdir: str | None = None,
                   broker_choice: str = "auto", deie_script: str | None = None) -> int:
    from edge.runtime.daemon import Gateway
    from simulators.vpp import StepsPattern, VppSimulator

    try:
        profile = load_profile(profile_path)
    except ProfileError as error:
        print(f"{profile_path}:\n{error}", file=sys.stderr)
        return 2
    deie = profile.grid.deie
    deie_script = DEFAULT_DEIE_SCRIPT if deie_script is None else deie_script
    try:
        deie_plan = _describe_deie(deie_script, deie.limit_unit) if deie is not None else None
    except ValueError as error:
        print(f"demo: --deie-script: {error}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        folder = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flexedge-demo-")))
        folder.mkdir(parents=True, exist_ok=True)
        profile = _demo_profile(profile, folder)
        mqtt = profile.uplink.mqtt
        try:
            broker_name, broker = _broker(profile, folder, broker_choice)
        except RuntimeError as error:
            print(f"demo could not start: {error}", file=sys.stderr)
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        site = SimulatedSite(profile)
        print(f"flexedge demo: site {profile.site.id}, {site.describe()}, {broker_name} on {mqtt.host}:{mqtt.port}; "
              f"cycle {profile.control.cycle_s:g} s.\nOnce every asset answers: VPP steps of {VPP_AMPLITUDE_KW:g} kW "
              f"every {VPP_STEP_S:g} s" + (f"; {deie_plan} (s from the VPP's start)" if deie_plan else "")
              + ".  Ctrl-C stops." + _status_page_line(profile), flush=True)
        try:
            async with broker, site:
                gateway_task = asyncio.create_task(Gateway(profile).run(stop))
                vpp = VppSimulator(mqtt.host, mqtt.port, mqtt.topic_prefix, profile.site.id,
                                   pattern=StepsPattern(VPP_AMPLITUDE_KW, step_s=VPP_STEP_S),
                                   cadence_s=profile.control.cycle_s, valid_s=max(4.0, 3 * profile.control.cycle_s))
                async with vpp:
                    screen = Screen([(a.id, a.kind) for a in profile.assets], grid_orders=deie is not None)
                    shower = asyncio.create_task(_show(vpp, screen))
                    # Let the gateway find its devices and the EVs start charging before the VPP
                    # asks: its baselines are then the site's real ones.
                    ready = asyncio.create_task(_site_ready(vpp, site, [a.id for a in profile.assets], READY_TIMEOUT_S))
                    await asyncio.wait([ready, asyncio.create_task(stop.wait()), gateway_task],
                                       return_when=asyncio.FIRST_COMPLETED)
                    if ready.done() and ready.result():
                        screen.note(f"still offline after {READY_TIMEOUT_S:g} s: {', '.join(ready.result())}; the VPP starts anyway")
                    ready.cancel()
                    vpp_and_operator = []
                    if not stop.is_set() and not gateway_task.done():
                        screen.note("the VPP starts" + (" (the DEIE orders' times count from here)" if deie_plan else ""))
                        vpp_and_operator.append(asyncio.create_task(vpp.run()))
                        if deie is not None and deie_script:
                            vpp_and_operator.append(asyncio.create_task(play_deie(deie, deie_script, screen.note)))
                        await asyncio.wait([asyncio.create_task(stop.wait()), gateway_task], timeout=duration_s,
                                           return_when=asyncio.FIRST_COMPLETED)
                    for task in vpp_and_operator:
                        task.cancel()
                    await asyncio.sleep(0.3)  # the last telemetry reaches the screen
                    shower.cancel()
                    stop.set()
                    await asyncio.gather(shower, *vpp_and_operator, return_exceptions=True)
                    await gateway_task
                    print(f"\n{vpp.format_report()}", flush=True)
        except OSError as error:
            print(f"demo could not start: {error} (is another demo running? ports are in {profile_path})", file=sys.stderr)
            return 1
    return 0
