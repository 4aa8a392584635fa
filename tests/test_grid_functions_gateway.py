"""FCR droop and Q(U) in the running gateway: frequency and voltage steps in the simulators, commands on the wire."""

from __future__ import annotations

import time

import pytest

from edge.uplink.messages import Telemetry
from edge.config.profile import Profile
from simulators.sunspec import DeviceSpec, SunSpecSimulator
from simulators.vpp import VppSimulator
from tests.test_gateway import SITE, make_profile, online, running_gateway, until


def with_functions(profile: Profile, functions: dict) -> Profile:
    return Profile.model_validate({**profile.model_dump(mode="json", exclude_unset=True), "functions": functions})


async def test_fcr_answers_a_frequency_step_within_its_activation_time(tmp_path, mosquitto):
    specs = [DeviceSpec(kind="pv", rated_kw=20.0, sun_kw=12.0), DeviceSpec(kind="storage", rated_kw=10.0),
             DeviceSpec(kind="meter", load_kw=2.0)]
    async with SunSpecSimulator(specs) as sim:
        pv, bess, meter = sim.devices
        profile = with_functions(make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=0.5),
                                 {"fcr": {"capacity_kw": 8.0, "frequency_source": "meter2", "full_activation_s": 2.0}})
        async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(online(vpp, 3), 10, "assets online")
            base = vpp.telemetry[-1]["site"]["p_kw"]

            # 49.8 Hz: 200 mHz low, full upward response: +8 kW, from the battery (PV cannot rise).
            stepped_at = time.monotonic()
            meter.set_grid(frequency_hz=49.8)
            message = await until(lambda: vpp.telemetry[-1]["functions"]["fcr"]["activation_kw"] == 8.0
                                  and vpp.telemetry[-1], 6, "full FCR response")
            assert time.monotonic() - stepped_at < 2.0 + 2 * 0.5 + 1.0  # full_activation_s, polls, MQTT
            Telemetry.model_validate(message)
            assert message["functions"]["fcr"]["frequency_hz"] == pytest.approx(49.8)
            await until(lambda: abs(bess.power_kw - 8.0) < 0.2, 3, "battery discharges 8 kW")
            await until(lambda: abs(vpp.telemetry[-1]["site"]["p_kw"] - (base + 8.0)) < 0.5, 3, "site +8 kW at the meter")

            # 50.1 Hz: -50 %: -4 kW, shared by the PV (curtails) and the battery (charges).
            meter.set_grid(frequency_hz=50.1)
            await until(lambda: abs(pv.power_kw + bess.power_kw - (12.0 - 4.0)) < 0.2, 6, "site 4 kW down")
            assert bess.power_kw < -0.5 and pv.power_kw < 11.5

            # Inside the deadband: back to 0.
            meter.set_grid(frequency_hz=50.005)
            await until(lambda: vpp.telemetry[-1]["functions"]["fcr"]["activation_kw"] == 0.0, 6, "FCR back to 0")


async def test_q_u_follows_a_voltage_step(tmp_path, mosquitto):
    specs = [DeviceSpec(kind="pv", rated_kw=20.0, sun_kw=12.0), DeviceSpec(kind="meter", load_kw=2.0)]
    curve = [{"v_pu": 0.92, "q_pct": 100}, {"v_pu": 0.97, "q_pct": 0}, {"v_pu": 1.03, "q_pct": 0},
             {"v_pu": 1.08, "q_pct": -100}]
    async with SunSpecSimulator(specs) as sim:
        pv, meter = sim.devices
        profile = with_functions(make_profile(tmp_path, mosquitto.port, sim.devices, cycle_s=0.5), {
            "q_u": {"voltage_source": "meter1", "curve": curve, "q_max_kvar": 6.0, "update_interval_s": 1.0}})
        async with running_gateway(profile), VppSimulator("127.0.0.1", mosquitto.port, "flexedge", SITE) as vpp:
            await until(online(vpp, 2), 10, "assets online")
            stepped_at = time.monotonic()
            meter.set_grid(voltage_v=230 * 1.055)  # halfway up the absorbing slope: -50 % of 6 kvar
            # (a refresh of the 0 kvar in force before the step may still come first on a busy machine)
            write = await pv.next_write("VarSet", model_id=704, after_s=stepped_at, timeout_s=4.0,
                                        where=lambda r: r.value != 0)
            assert write.value == pytest.approx(-3000.0, abs=60)
            await until(lambda: abs(pv.q_kvar + 3.0) < 0.1, 3, "inverter absorbs 3 kvar")
            message = await until(lambda: vpp.telemetry[-1]["functions"]["q_u"]["request_kvar"] == pytest.approx(-3.0, abs=0.05)
                                  and vpp.telemetry[-1], 3, "Q(U) in telemetry")
            assert message["assets"]["pv0"]["q_setpoint_kvar"] == pytest.approx(-3.0, abs=0.05)

            meter.set_grid(voltage_v=230.0)  # back in the flat band: no reactive power
            await until(lambda: abs(pv.q_kvar) < 0.1, 5, "back to 0 kvar")
