"""The SunSpec simulator's model 705 (DERVoltVar), over the wire: layout, curve writes, adoption, Q(U)."""

from __future__ import annotations

import asyncio
import time

import pytest
from sunspec2.device import Model

from simulators.sunspec import DeviceSpec, SunSpecSimulator
from simulators.sunspec.models import VOLT_VAR_CURVES, VOLT_VAR_POINTS, layout
from simulators.sunspec.voltvar import symbol
from tests.test_sunspec_simulator import read, scan, tcp_client, write

pytestmark = pytest.mark.timeout(30)

MODELS = (1, 103, 120, 121, 123, 701, 704, 705)
VAR_MAX_PCT = symbol("DeptRef", "VAR_MAX_PCT")  # from pysunspec2's definition, not hard-coded
W_MAX_PCT = symbol("DeptRef", "W_MAX_PCT")
COMPLETED, FAILED = symbol("AdptCrvRslt", "COMPLETED"), symbol("AdptCrvRslt", "FAILED")


def spec(**overrides) -> DeviceSpec:
    # ramp 0: reactive power jumps to its target at the next tick
    return DeviceSpec(**{"kind": "pv", "rated_kw": 10.0, "sun_kw": 5.0, "models": MODELS, "ramp_pct_per_s": 0.0,
                         **overrides})


async def read_705(client, device) -> Model:
    return (await scan(client, device.base_address))[705]


async def write_curve(client, device, number: int, points, dept_ref: int = VAR_MAX_PCT) -> None:
    """Write curve ``number`` (SunSpec numbering from 1, layout name ``Crv[number-1]``) in two requests:
    ActPt/DeptRef, then the V/Var pairs (ReadOnly sits between them and refuses writes)."""
    image, prefix = device.image, f"Crv[{number - 1}]."
    response = await write(client, image.address_of(705, prefix + "ActPt"), [len(points), dept_ref])
    assert not response.isError(), response
    regs = []
    for v_pct, var_pct in points:  # V_SF = DeptRef_SF = -1
        regs += [round(v_pct * 10), round(var_pct * 10) & 0xFFFF]
    response = await write(client, image.address_of(705, prefix + "Pt[0].V"), regs)
    assert not response.isError(), response


async def adopt(client, device, number: int) -> int:
    """Request adoption of curve ``number``; AdptCrvRslt afterwards."""
    response = await write(client, device.image.address_of(705, "AdptCrvReq"), number)
    assert not response.isError(), response
    return (await read(client, device.image.address_of(705, "AdptCrvRslt"), 1))[0]


def curve_of(model: Model, index: int) -> list[tuple[float, float]]:
    curve = model.Crv[index]
    return [(pt.V.cvalue, pt.Var.cvalue) for pt in curve.Pt[: curve.ActPt.value]]


async def reactive_w(client, device) -> tuple[float, float]:
    """(701 Var, 103 VAr) as a client reads them, scaled."""
    models = await scan(client, device.base_address)
    return models[701].Var.cvalue, models[103].VAr.cvalue


async def eventually_q(client, device, expected_var: float, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        q701, q103 = await reactive_w(client, device)
        if q701 == pytest.approx(expected_var, abs=10) and q103 == pytest.approx(expected_var, abs=10):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"Q is {q701} var (701) / {q103} var (103), expected {expected_var}")
        await asyncio.sleep(0.05)


def test_layout_names_and_counts():
    model = layout(705)
    assert model.counts == {"NCrv": VOLT_VAR_CURVES, "NPt": VOLT_VAR_POINTS} == {"NCrv": 3, "NPt": 4}
    # 13 top-level registers after ID/L, then per curve 10 registers + 2 per point
    assert model.length == 13 + 3 * (10 + 4 * 2)
    assert model.points["Crv[0].ActPt"].offset == 15
    assert model.points["Crv[1].ActPt"].offset == 15 + 18
    assert model.points["Crv[2].Pt[3].Var"].offset == model.length + 1
    assert model.points["Crv[1].RspTms"].size == 2 and model.points["Crv[1].Pt[2].V"].sf == "V_SF"
    assert "Crv[3].ActPt" not in model.points and "Crv[0].Pt[4].V" not in model.points
    other = layout(705, {"NCrv": 2, "NPt": 5})
    assert other.length == 13 + 2 * (10 + 5 * 2) and "Crv[1].Pt[4].Var" in other.points
    with pytest.raises(ValueError, match="count no group"):
        layout(705, {"NCurves": 2})
    with pytest.raises(ValueError, match=">= 1"):
        layout(705, {"NCrv": 0})
    # a model with a point-counted group and no count given: laid out once, unindexed, count point 1
    assert layout(706).counts == {"NCrv": 1, "NPt": 1} and "Crv.Pt.V" in layout(706).points


def test_705_is_opt_in_and_not_for_meters():
    assert 705 not in DeviceSpec(kind="pv").models
    for kind in ("pv", "hybrid", "storage"):
        assert 705 in DeviceSpec(kind=kind, models=(103, 120, 121, 704, 705)).models
    with pytest.raises(ValueError, match="705"):
        DeviceSpec(kind="meter", models=(203, 705))


async def test_705_layout_found_by_walking_the_map():
    async with SunSpecSimulator([spec()]) as sim, tcp_client(sim.devices[0].port) as client:
        pv = sim.devices[0]
        models = await scan(client, pv.base_address)
        assert list(models) == list(MODELS)
        vv = models[705]
        assert (vv.NCrv.value, vv.NPt.value) == (3, 4)
        assert len(vv.Crv) == 3 and all(len(curve.Pt) == 4 for curve in vv.Crv)
        assert vv.Crv[1].Pt[2].V.offset == pv.image.address_of(705, "Crv[1].Pt[2].V") - pv.image.address_of(705)
        assert (vv.V_SF.value, vv.DeptRef_SF.value, vv.RspTms_SF.value) == (-1, -1, 0)
        assert (vv.Ena.value, vv.AdptCrvReq.value, vv.AdptCrvRslt.value) == (0, 0, COMPLETED)
        assert [curve.ReadOnly.value for curve in vv.Crv] == [1, 0, 0]
        first = vv.Crv[0]
        assert (first.ActPt.value, first.DeptRef.value, first.RspTms.cvalue) == (4, VAR_MAX_PCT, 10)
        assert curve_of(vv, 0) == [(92.0, 30.0), (98.0, 0.0), (102.0, 0.0), (108.0, -30.0)]
        state = pv.volt_var()
        assert not state.enabled and state.dept_ref == "VAR_MAX_PCT" and state.adopt_result == "COMPLETED"
        assert state.points == ((92.0, 30.0), (98.0, 0.0), (102.0, 0.0), (108.0, -30.0))


async def test_write_curve_2_and_adopt_it():
    async with SunSpecSimulator([spec()]) as sim, tcp_client(sim.devices[0].port) as client:
        pv = sim.devices[0]
        new_curve = [(95.0, 40.0), (99.0, 0.0), (101.0, 0.0), (105.0, -40.0)]
        await write_curve(client, pv, 2, new_curve)
        names = [r.point for r in pv.writes]
        assert names[:2] == ["Crv[1].ActPt", "Crv[1].DeptRef"] and names[2:4] == ["Crv[1].Pt[0].V", "Crv[1].Pt[0].Var"]
        assert all(r.accepted and r.model_id == 705 for r in pv.writes)
        assert pv.writes[3].raw == 400 and pv.writes[3].value == pytest.approx(40.0)
        assert curve_of(await read_705(client, pv), 0)[0] == (92.0, 30.0)  # not in force before adoption

        assert await adopt(client, pv, 2) == COMPLETED
        vv = await read_705(client, pv)
        assert curve_of(vv, 0) == new_curve and vv.Crv[0].ReadOnly.value == 1 and vv.Crv[0].DeptRef.value == VAR_MAX_PCT
        assert vv.AdptCrvReq.value == 0  # the request is consumed
        assert pv.writes[-1].point == "AdptCrvReq" and pv.writes[-1].raw == 2
        assert pv.volt_var().points == tuple(new_curve) and pv.volt_var().adopt_result == "COMPLETED"

        # a shorter curve: ActPt 2, the unused points may stay "not implemented"
        await write_curve(client, pv, 3, [(90.0, 20.0), (110.0, -20.0)], dept_ref=W_MAX_PCT)
        unused = await write(client, pv.image.address_of(705, "Crv[2].Pt[2].V"), [0xFFFF, 0x8000, 0xFFFF, 0x8000])
        assert not unused.isError(), unused
        assert await adopt(client, pv, 3) == COMPLETED
        assert pv.volt_var().points == ((90.0, 20.0), (110.0, -20.0)) and pv.volt_var().dept_ref == "W_MAX_PCT"


async def test_invalid_curves_fail_adoption_and_leave_curve_1():
    async with SunSpecSimulator([spec()]) as sim, tcp_client(sim.devices[0].port) as client:
        pv = sim.devices[0]
        before = curve_of(await read_705(client, pv), 0)
        await write_curve(client, pv, 2, [(95.0, 40.0), (99.0, 0.0), (98.0, 0.0), (105.0, -40.0)])
        assert await adopt(client, pv, 2) == FAILED
        assert "does not increase" in pv.volt_var().adopt_error and pv.volt_var().adopt_result == "FAILED"
        vv = await read_705(client, pv)
        assert curve_of(vv, 0) == before and vv.AdptCrvReq.value == 0

        for bad_curve, why in (
            ([(40.0, 10.0), (99.0, 0.0)], "outside 50..150"),
            ([(95.0, 110.0), (99.0, 0.0)], "outside -100..100"),
            ([(95.0, 10.0)], "ActPt 1"),
        ):
            await write_curve(client, pv, 3, bad_curve)
            assert await adopt(client, pv, 3) == FAILED
            assert why in pv.volt_var().adopt_error
        await write_curve(client, pv, 3, [(95.0, 10.0), (99.0, 0.0)], dept_ref=symbol("DeptRef", "VAR_AVAL_PCT"))
        assert await adopt(client, pv, 3) == FAILED and "not supported" in pv.volt_var().adopt_error
        assert curve_of(await read_705(client, pv), 0) == before

        # a curve that does not exist: the write itself is refused
        response = await write(client, pv.image.address_of(705, "AdptCrvReq"), 4)
        assert response.isError() and response.exception_code == 3
        # a valid adoption clears the error
        await write_curve(client, pv, 2, [(95.0, 40.0), (105.0, -40.0)])
        assert await adopt(client, pv, 2) == COMPLETED and pv.volt_var().adopt_error == ""


async def test_writes_to_curve_1_and_read_only_points_are_refused():
    async with SunSpecSimulator([spec()]) as sim, tcp_client(sim.devices[0].port) as client:
        pv = sim.devices[0]
        image = pv.image
        for point, values in (
            ("Crv[0].Pt[0].V", [900]),  # curve 1 is the curve in force
            ("Crv[0].ActPt", [2]),
            ("Crv[1].ReadOnly", [1]),  # a read-only point of a writable curve
            ("AdptCrvRslt", [1]),
            ("NCrv", [5]),
            ("RvrtTms", [0, 60]),  # reversion is not simulated
        ):
            response = await write(client, image.address_of(705, point), values)
            assert response.isError() and response.exception_code == 2, point
            record = pv.writes[-1]
            assert (record.model_id, record.point, record.accepted) == (705, point, False)
        assert "read-only curve" in pv.writes[0].reason
        vv = await read_705(client, pv)
        assert curve_of(vv, 0)[0] == (92.0, 30.0) and vv.Crv[0].ActPt.value == 4 and vv.NCrv.value == 3
        assert vv.Crv[1].ReadOnly.value == 0


async def test_enabled_curve_drives_reactive_power_with_voltage():
    async with SunSpecSimulator([spec()]) as sim, tcp_client(sim.devices[0].port) as client:
        pv = sim.devices[0]
        image = pv.image
        var_max = 10_000 * 0.44  # the simulator's reactive rating: 0.44 * rated
        # 704 VarSet asks for 2000 var; an enabled 705 curve overrides it
        await write(client, image.address_of(704, "VarSetEna"), 1)
        await write(client, image.address_of(704, "VarSet"), [0, 20000])  # int32, VarSet_SF -1
        await eventually_q(client, pv, 2000.0)
        assert not (await write(client, image.address_of(705, "Ena"), 1)).isError()
        assert pv.volt_var().enabled
        await eventually_q(client, pv, 0.0)  # 230 V = 100 %: the dead band
        for volts, var_pct in (
            (207.0, 30.0),  # 90 %: below the first point, flat
            (220.8, 10.0),  # 96 %: between 92 % (+30) and 98 % (0)
            (241.5, -15.0),  # 105 %: between 102 % (0) and 108 % (-30)
            (253.0, -30.0),  # 110 %: beyond the last point
        ):
            pv.set_grid(voltage_v=volts)
            await eventually_q(client, pv, var_pct / 100 * var_max)
            assert pv.q_kvar == pytest.approx(var_pct / 100 * var_max / 1000, abs=1e-6)

        # an adopted W_MAX_PCT curve takes percent of WMax (10 kW) instead
        await write_curve(client, pv, 2, [(95.0, 20.0), (105.0, -20.0)], dept_ref=W_MAX_PCT)
        assert await adopt(client, pv, 2) == COMPLETED
        await eventually_q(client, pv, -2000.0)  # still 110 %

        # disabled: 705 does nothing, the 704 VarSet is back in force
        await write(client, image.address_of(705, "Ena"), 0)
        pv.set_grid(voltage_v=207.0)
        await eventually_q(client, pv, 2000.0)
