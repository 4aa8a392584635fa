"""`flexedge demo`: the demo site on bundled simulators, shown live in the terminal.

Starts, on loopback and in one process: an MQTT broker (a private Mosquitto when
one is installed, else the embedded broker), a simulated device for every asset
of the profile, the VPP simulator sending step activations, and the gateway
itself.  Every cycle it prints what the VPP sees on the wire: the setpoint, the
site's power and each asset's power.
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

from edge.profile import Profile, ProfileError, load_profile

log = logging.getLogger("flexedge.demo")

# How the demo's devices behave (what a real site's devices would decide).
DEMO_DEVICES: dict[str, dict[str, Any]] = {
    "pv-roof": {"kind": "pv", "rated_kw": 30.0, "sun_kw": 24.0},
    "pv-carport": {"kind": "pv", "rated_kw": 20.0, "sun_kw": 14.0, "models": (1, 103, 120, 121, 123)},
    "bess-1": {"kind": "storage", "rated_kw": 25.0, "capacity_kwh": 50.0, "soc_pct": 60.0},
    "meter-poc": {"kind": "meter", "load_kw": 12.0},
}
SIM_KIND = {"pv": "pv", "bess": "storage", "meter": "meter"}
VPP_AMPLITUDE_KW = 15.0
VPP_STEP_S = 10.0


def device_specs(profile: Profile) -> list[Any]:
    from simulators.sunspec import DeviceSpec

    specs = []
    for asset in profile.assets:
        if asset.driver != "sunspec" or asset.host is None:
            continue
        settings = dict(DEMO_DEVICES.get(asset.id, {"kind": SIM_KIND[asset.kind]}))
        base = 40000 if asset.base_address == "auto" else asset.base_address
        specs.append(DeviceSpec(port=asset.port, unit_id=asset.unit_id, base_address=base, **settings))
    return specs


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
    return f"{value:+6.1f}" if signed else f"{value:6.1f}"


class Screen:
    """Prints one line per telemetry message, as the VPP receives it."""

    def __init__(self, asset_ids: list[str], out=sys.stdout):
        self.asset_ids = asset_ids
        self.out = out
        self.lines = 0

    def header(self) -> None:
        assets = "".join(f" {a[:11]:>11}" for a in self.asset_ids)
        print(f"\n{'time':8} {'mode':8} {'request':>8} {'site P':>7} {'target':>7} {'base':>7} |{assets}   (kW, + export)", file=self.out)

    def telemetry(self, message: dict[str, Any]) -> None:
        if self.lines % 20 == 0:
            self.header()
        self.lines += 1
        site = message["site"]
        cells = []
        for asset_id in self.asset_ids:
            values = message["assets"].get(asset_id, {})
            text = _fmt(values.get("p_kw")) if values.get("online") else " offline"
            if values.get("soc_pct") is not None:
                text += f" {values['soc_pct']:.0f}%"
            cells.append(f" {text:>11}")
        limited = f"  [{site['limited_by']}]" if site.get("limited_by") else ""
        print(
            f"{message['ts'][11:19]:8} {message['mode']:8} {_fmt(site.get('activation_requested_kw'), True):>8} "
            f"{_fmt(site.get('p_kw')):>7} {_fmt(site.get('setpoint_kw')):>7} {_fmt(site.get('baseline_kw')):>7} |"
            + "".join(cells) + limited,
            file=self.out,
            flush=True,
        )

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
            if event.get("type") not in ("gateway_started", "models_discovered"):
                screen.note(f"event {event.get('type')} {event.get('asset_id') or ''} {event.get('detail')}")
        shown_events = len(events)
        rejected = [a for a in vpp.acks if a.get("status") == "rejected"]
        for ack in rejected[shown_rejections:]:
            screen.note(f"setpoint {ack.get('id')} rejected: {ack.get('reason')}")
        shown_rejections = len(rejected)


async def run_demo(profile_path: Path, duration_s: float | None = None, workdir: str | None = None,
                   broker_choice: str = "auto") -> int:
    from edge.daemon import Gateway
    from simulators.sunspec import SunSpecSimulator
    from simulators.vpp import StepsPattern, VppSimulator

    try:
        profile = load_profile(profile_path)
    except ProfileError as error:
        print(f"{profile_path}:\n{error}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        folder = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flexedge-demo-")))
        folder.mkdir(parents=True, exist_ok=True)
        spool = profile.uplink.spool.model_copy(update={"path": folder / "spool.sqlite"})
        profile = profile.model_copy(update={"uplink": profile.uplink.model_copy(update={"spool": spool})})
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

        specs = device_specs(profile)
        print(f"flexedge demo: site {profile.site.id}, {len(specs)} simulated SunSpec devices, {broker_name} on "
              f"{mqtt.host}:{mqtt.port}, VPP steps of {VPP_AMPLITUDE_KW:g} kW every {VPP_STEP_S:g} s; "
              f"cycle {profile.control.cycle_s:g} s.  Ctrl-C stops.", flush=True)
        try:
            async with broker, SunSpecSimulator(specs) as _sim:
                gateway_task = asyncio.create_task(Gateway(profile).run(stop))
                vpp = VppSimulator(mqtt.host, mqtt.port, mqtt.topic_prefix, profile.site.id,
                                   pattern=StepsPattern(VPP_AMPLITUDE_KW, step_s=VPP_STEP_S),
                                   cadence_s=profile.control.cycle_s, valid_s=max(4.0, 3 * profile.control.cycle_s))
                async with vpp:
                    screen = Screen([a.id for a in profile.assets])
                    shower = asyncio.create_task(_show(vpp, screen))
                    # Let the gateway discover its devices before the VPP starts asking.
                    await asyncio.sleep(2 * profile.control.cycle_s)
                    runner = asyncio.create_task(vpp.run())
                    waiters = [asyncio.create_task(stop.wait()), gateway_task]
                    await asyncio.wait(waiters, timeout=duration_s, return_when=asyncio.FIRST_COMPLETED)
                    runner.cancel()
                    await asyncio.sleep(0.3)
                    shower.cancel()
                    stop.set()
                    await asyncio.gather(runner, shower, return_exceptions=True)
                    await gateway_task
                    print(f"\n{vpp.format_report()}", flush=True)
        except OSError as error:
            print(f"demo could not start: {error} (is another demo running? ports are in {profile_path})", file=sys.stderr)
            return 1
    return 0
