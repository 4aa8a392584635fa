"""One EV's session as the charger and the car tell it: its charging needs and its energy.

``EvAccount`` keeps the car's last charging needs (``drivers.ocpp.needs``) and the meter's
Import and Export registers: at the start of the transaction (energy charged and
discharged in this session) and when the needs arrived (the energies the car stated are
kept current from the meter between its messages: net energy charged since then is
taken off what it still needs, added to what it has above its V2X minimum, taken off the
room below its maximum).  A register first seen after the start counts from there.
"""

from __future__ import annotations

import time

from edge.asset import EvStatus

from drivers.ocpp.needs import EvNeeds


def _delta_kwh(now_wh: float | None, then_wh: float | None) -> float:
    return 0.0 if now_wh is None or then_wh is None else (now_wh - then_wh) / 1000.0


class EvAccount:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """The EV left (or its transaction ended): nothing known about the next one."""
        self.needs: EvNeeds | None = None
        self.needs_at_s: float | None = None
        self.in_transaction = False
        self.import_wh: float | None = None
        self.export_wh: float | None = None
        self.import_start_wh: float | None = None
        self.export_start_wh: float | None = None
        self.import_at_needs_wh: float | None = None
        self.export_at_needs_wh: float | None = None

    def start_transaction(self, meter_start_wh: float | None) -> None:
        self.in_transaction = True
        self.import_start_wh = meter_start_wh
        self.export_start_wh = None

    def on_registers(self, import_wh: float | None, export_wh: float | None) -> None:
        if import_wh is not None:
            self.import_wh = import_wh
        if export_wh is not None:
            self.export_wh = export_wh
        if self.in_transaction:
            if self.import_start_wh is None:
                self.import_start_wh = self.import_wh
            if self.export_start_wh is None:
                self.export_start_wh = self.export_wh
        if self.needs is not None:
            if self.import_at_needs_wh is None:
                self.import_at_needs_wh = self.import_wh
            if self.export_at_needs_wh is None:
                self.export_at_needs_wh = self.export_wh

    def on_needs(self, needs: EvNeeds, at_s: float | None = None) -> None:
        self.needs = needs
        self.needs_at_s = time.time() if at_s is None else at_s
        self.import_at_needs_wh, self.export_at_needs_wh = self.import_wh, self.export_wh

    # ------------------------------------------------------------ figures

    def charged_kwh(self) -> float:
        return max(0.0, _delta_kwh(self.import_wh, self.import_start_wh))

    def discharged_kwh(self) -> float:
        return max(0.0, _delta_kwh(self.export_wh, self.export_start_wh))

    def net_since_needs_kwh(self) -> float:
        """Energy into the car since its needs arrived (charged minus discharged)."""
        return _delta_kwh(self.import_wh, self.import_at_needs_wh) - _delta_kwh(self.export_wh, self.export_at_needs_wh)

    def energy_to_target_kwh(self) -> float | None:
        needs = self.needs
        if needs is None or needs.energy_request_kwh is None:
            return None
        return max(0.0, needs.energy_request_kwh - self.net_since_needs_kwh())

    def status(self, *, bidirectional: bool, charge_cap_kw: float, discharge_cap_kw: float | None,
               soc_pct: float | None, operation_mode: str | None) -> EvStatus:
        """The session for ``AssetReading.ev``; the caps are the charger's (kW magnitudes; None: it cannot
        discharge)."""
        needs = self.needs
        if needs is None:
            return EvStatus(bidirectional=False, soc_pct=soc_pct, operation_mode=operation_mode,
                            energy_charged_kwh=round(self.charged_kwh(), 4),
                            energy_discharged_kwh=round(self.discharged_kwh(), 4))
        net = self.net_since_needs_kwh()
        above_min = None if needs.min_v2x_energy_kwh is None else -needs.min_v2x_energy_kwh + net
        below_max = None if needs.max_v2x_energy_kwh is None else needs.max_v2x_energy_kwh - net
        max_charge = charge_cap_kw if needs.max_charge_kw is None else min(needs.max_charge_kw, charge_cap_kw)
        max_discharge = None
        if needs.max_discharge_kw is not None:
            max_discharge = 0.0 if discharge_cap_kw is None else min(needs.max_discharge_kw, discharge_cap_kw)
        return EvStatus(
            bidirectional=bidirectional,
            soc_pct=soc_pct if soc_pct is not None else needs.soc_pct,
            capacity_kwh=needs.capacity_kwh,
            departure_s=needs.departure_s,
            energy_to_target_kwh=self.energy_to_target_kwh(),
            energy_above_min_kwh=above_min,
            energy_below_max_kwh=below_max,
            max_charge_kw=max_charge,
            max_discharge_kw=max_discharge,
            min_charge_kw=needs.min_charge_kw,
            min_discharge_kw=needs.min_discharge_kw,
            needs_at_s=self.needs_at_s,
            operation_mode=operation_mode,
            energy_charged_kwh=round(self.charged_kwh(), 4),
            energy_discharged_kwh=round(self.discharged_kwh(), 4),
        )
