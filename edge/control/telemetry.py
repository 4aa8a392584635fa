"""The telemetry message built from the cycle's result (docs/mqtt-api.md).  Mixed into
``edge.control.cycle.Controller``, whose state it uses.
"""

from __future__ import annotations

import math
from typing import Any

from edge.asset import AssetReading
from edge.control.setpoints import iso_time
from edge.control.bands import held_range


def _freshness(reading: AssetReading, now: float) -> dict[str, Any]:
    """When the asset's values were measured, and how old they are at the tick."""
    if not reading.online or not math.isfinite(reading.read_at):
        return {"read_at": None, "age_ms": None}
    read_at = min(reading.read_at, now)  # a device clock ahead of ours cannot make a value younger than 0
    return {"read_at": iso_time(read_at), "age_ms": int(round((now - read_at) * 1000))}


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, 3)


class TelemetryMixin:
    def telemetry(self, now: float, readings: dict[str, AssetReading] | None = None) -> dict[str, Any]:
        """The cycle's message, from its process image (``readings``) and its decision."""
        allocation = self.state.allocation
        if readings is None:
            readings = self.take_image()
        targets = allocation.targets_kw if allocation else {}
        assets_out: dict[str, Any] = {}
        sum_p = sum_q = 0.0
        any_p = any_q = False
        socs = []
        site_baseline = 0.0
        for asset in self.assets:
            reading = readings[asset.id]
            baseline = baseline_method = None
            if asset.kind != "meter" and reading.online and reading.p_kw is not None:
                if asset.id in self._planned_kw:
                    baseline, baseline_method = self._planned_kw[asset.id]
                elif asset.frozen_baseline_kw is not None:
                    baseline, baseline_method = asset.frozen_baseline_kw, "frozen"
                else:
                    baseline, baseline_method = reading.p_kw, "measured"
            target = targets.get(asset.id) if asset.commanded_kw is not None else None
            reactive = self.state.reactive
            q_target = reactive.targets_kvar.get(asset.id) if reactive is not None and asset.commanded_kvar is not None else None
            band_up = band_down = 0.0
            if asset.id in targets and baseline is not None:
                p_min, p_max = held_range(reading, *self._range(asset, reading, baseline))
                band_up, band_down = max(0.0, p_max - baseline), max(0.0, baseline - p_min)
            assets_out[asset.id] = {
                "kind": asset.kind,
                "online": reading.online,
                "degraded": reading.degraded,
                "p_kw": _round(reading.p_kw),
                "q_kvar": _round(reading.q_kvar),
                "baseline_kw": _round(baseline),
                "baseline_method": baseline_method,
                "setpoint_kw": _round(target),
                "activation_kw": _round(target - baseline if target is not None and baseline is not None else 0.0 if baseline is not None else None),
                "band_up_kw": _round(band_up),
                "band_down_kw": _round(band_down),
                "band_gap_kw": [_round(v) for v in reading.p_gap_kw] if reading.p_gap_kw and asset.id in targets else None,
                "soc_pct": _round(reading.soc_pct),
                "q_setpoint_kvar": _round(q_target),
                **_freshness(reading, now),
            }
            if asset.kind == "ev_charger":
                assets_out[asset.id]["ev"] = self._ev_telemetry(asset.id, reading, now)
            if reading.upstream is not None:
                link = reading.upstream
                assets_out[asset.id]["upstream"] = {"connected": link.connected, "queued": link.queued,
                                                    "host": link.host}
            if asset.kind != "meter":
                if reading.online and reading.p_kw is not None:
                    sum_p += reading.p_kw
                    any_p = True
                    site_baseline += baseline if baseline is not None else 0.0
                if reading.online and reading.q_kvar is not None:
                    sum_q += reading.q_kvar
                    any_q = True
                if reading.online and reading.soc_pct is not None:
                    socs.append(reading.soc_pct)
        site_p = sum_p if any_p else None
        site_q = sum_q if any_q else None
        meter_online = False
        if self._meter is not None:
            meter_reading = readings[self._meter.id]
            if meter_reading.online and meter_reading.p_kw is not None:
                meter_online = True
                # The meter sees uncontrolled load too: the site baseline is the
                # meter's power minus the activation the assets deliver.
                site_baseline = meter_reading.p_kw - (sum_p - site_baseline)
                site_p = meter_reading.p_kw
                site_q = meter_reading.q_kvar
        activation = allocation.activation_kw if allocation else 0.0
        return {
            "ts": iso_time(now),
            "site_id": self.profile.site.id,
            "cycle_s": self.profile.control.cycle_s,
            "mode": self.state.mode,
            "setpoint_id": self.state.setpoint.id if self.state.setpoint else None,
            "schedule_id": self.state.schedule_id,
            "site": {
                "p_kw": _round(site_p),
                "q_kvar": _round(site_q),
                "baseline_kw": _round(site_baseline if any_p or meter_online else None),
                "setpoint_kw": _round(site_baseline + activation if any_p or meter_online else None),
                "activation_requested_kw": _round(self.state.last_requested_kw),
                "activation_kw": _round(activation),
                "band_up_kw": _round(allocation.band_up_kw if allocation else 0.0),
                "band_down_kw": _round(allocation.band_down_kw if allocation else 0.0),
                "soc_pct": _round(sum(socs) / len(socs)) if socs else None,
                "online": any(r.online for r in readings.values()),
                "metered": meter_online,
                "limited_by": self._limited_by(allocation),
                "import_limit_kw": _round(self.state.limits_kw[0]),
                "export_limit_kw": _round(self.state.limits_kw[1]),
                "q_requested_kvar": _round(self.state.reactive.requested_kvar) if self.state.reactive else None,
                "q_setpoint_kvar": _round(self.state.reactive.site_kvar) if self.state.reactive else None,
            },
            "assets": assets_out,
            "grid_orders": {
                "export_limit_kw": self.grid_orders.export_limit_kw,
                "disconnected": self.grid_orders.disconnected,
                "reactive_setpoint_kvar": self.grid_orders.reactive_setpoint_kvar,
                "tan_phi": self.grid_orders.tan_phi,
                "source": self.grid_orders.source,
            },
            "functions": self._functions_telemetry(),
            "gateway": {**self.stats.snapshot(), "profile_sha256": self.profile.source_sha256,
                        "profile_version": self.profile.version},
        }

    def _functions_telemetry(self) -> dict[str, Any]:
        fcr, qu = self.fcr, self.qu
        return {
            "fcr": None if fcr is None else {
                "frequency_hz": _round(fcr.frequency_hz), "deviation_mhz": _round(fcr.deviation_mhz),
                "target_kw": round(fcr.target_kw, 3), "activation_kw": round(fcr.activation_kw, 3),
                "measurement_ok": fcr.measurement_ok,
            },
            "q_u": None if qu is None else {
                "voltage_v": _round(qu.voltage_v), "v_pu": _round(qu.v_pu), "request_kvar": _round(qu.request_kvar),
                "measurement_ok": qu.measurement_ok, "mode": qu.config.mode,
                "inverter_curve_assets": sorted(self._curve_assets),
            },
        }
