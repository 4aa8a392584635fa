"""Closed loop: the site's metered power follows the VPP's activation steps and ramps.

A site of a SunSpec PV inverter and battery behind a connection-point meter
with 4 kW of uncontrolled load, all simulated with their physics (output
ramps of 100 %/s, SoC).  The VPP sends a new setpoint every cycle along a
profile of steps and ramps.  Tolerance (docs/dispatch.md): from the second
cycle after a step, and all along a ramp with one cycle of delay, the
metered site power is within 0.5 kW + 5 % of |activation| of
baseline + activation.  The baseline is the metered power before the first
activation: the load and the sun do not change in this test.
"""

from __future__ import annotations

import asyncio

from simulators.sunspec import DeviceSpec, SunSpecSimulator
from simulators.vpp import VppSimulator
from tests.test_gateway import SITE, make_profile, online, running_gateway, until

CYCLE_S = 1.0


def activation_profile() -> list[float]:
    """One value per cycle: steps up and down, then a ramp up and back down."""
    steps = [6.0] * 4 + [-12.0] * 4 + [4.0] * 4 + [-20.0] * 4
    ramp = [-20.0 + 2.0 * i for i in range(1, 15)] + [8.0 - 2.0 * i for i in range(1, 9)]
    return steps + ramp


def tolerance_kw(activation_kw: float) -> float:
    return 0.5 + 0.05 * abs(activation_kw)


async def test_site_power_follows_steps_and_ramps(tmp_path, mosquitto):
    specs = [DeviceSpec(kind="pv", rated_kw=20.0, sun_kw=14.0), DeviceSpec(kind="storage", rated_kw=8.0),
             DeviceSpec(kind="meter", load_kw=4.0)]
    async with SunSpecSimulator(specs) as sim:
        profile = make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=CYCLE_S, setpoint_timeout_s=5)
        async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(online(vpp, 3), 10, "assets online")
            baseline_kw = vpp.telemetry[-1]["site"]["p_kw"]
            assert abs(baseline_kw - 10.0) < 0.1  # 14 kW of sun, 4 kW of load
            errors = []
            history: list[float] = []
            for activation in activation_profile():
                history.append(activation)
                sent = await vpp.send_setpoint(activation, valid_s=10)
                await vpp.wait_ack(sent["id"])
                await asyncio.sleep(CYCLE_S)
                if len(history) < 3:
                    continue
                site_kw = vpp.telemetry[-1]["site"]["p_kw"]
                if history[-1] == history[-2]:  # settled on a step: from its second cycle on
                    expected = [history[-1]]
                else:  # on a ramp: the current value, or the one a cycle earlier (the meter is polled once a cycle)
                    expected = [history[-1], history[-2]]
                error = min(abs(site_kw - (baseline_kw + a)) for a in expected)
                if abs(history[-1] - history[-2]) <= 2.0 or history[-1] == history[-2]:
                    errors.append(error)
                    assert error <= tolerance_kw(history[-1]), (
                        f"activation {history[-1]:+.1f} kW (before {history[-2]:+.1f}): site {site_kw:.2f} kW, "
                        f"baseline {baseline_kw:.2f} kW")
            print(f"tracking: {len(errors)} cycles checked, worst error {max(errors):.3f} kW, "
                  f"mean {sum(errors) / len(errors):.3f} kW")
            assert len(errors) >= 25
