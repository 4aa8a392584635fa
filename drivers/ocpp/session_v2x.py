"""The OCPP 2.1 and EV side of a charger's session (``ChargerSession`` in ``drivers.ocpp.session``).

What the charger can do (``features``, ``drivers.ocpp.features``), what the car needs
(``ev``, ``drivers.ocpp.ev``), whether the session is V2X, its limits both ways, the
reading of a V2X session, and the reports awaited from the charger (GetBaseReport).
The state itself lives on the session (its ``__init__``); this part only reads and
changes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import Any

from edge.asset import AssetReading, EvStatus

from drivers.ocpp.features import ChargerFeatures
from drivers.ocpp.needs import EvNeeds

log = logging.getLogger("flexedge.drivers.ocpp")

MAX_REPORT_ITEMS = 5000  # a report's parts kept for one request: a charger cannot fill memory with them


class V2xSession:
    """Mixed into ``ChargerSession``: the V2X, charging-needs and report methods."""

    def on_features(self, features: ChargerFeatures, version: str) -> None:
        """What the charger can do on this link (``drivers.ocpp.features``); 2.1 links report it."""
        self.features = features
        if version != "2.1":
            return
        if features.source == "default" and not self._default_features_logged:
            self._default_features_logged = True
            log.warning("%s: the charger answered neither GetVariables nor GetBaseReport about V2XChargingCtrlr: "
                        "taken as not bidirectional", self.charger.charge_point_id)
        self.emit("charger_features", {"bidirectional": features.bidirectional, "afrr_signal": features.afrr_signal,
                                       "source": features.source})
        self._v2x_session_check()
        self.request_command()

    def on_charging_needs(self, needs: EvNeeds, at_s: float | None = None) -> None:
        self.ev.on_needs(needs, at_s)
        status = self.ev_status()
        self.emit("ev_charging_needs", {
            "departure": _iso(needs.departure_s), "energy_to_target_kwh": _rounded(status.energy_to_target_kwh),
            "bidirectional": status.bidirectional, "max_charge_kw": _rounded(status.max_charge_kw),
            "max_discharge_kw": _rounded(status.max_discharge_kw)})
        self._v2x_session_check()
        self.request_command()  # the next profile follows the needs within the cycle

    def v2x(self) -> bool:
        """Charger, EV and link agree on bidirectional charging, and an EV is there."""
        needs = self.ev.needs
        return (self.connected and self.ocpp_version == "2.1" and self.features.bidirectional
                and needs is not None and needs.bidirectional_ev
                and (self.ev_present or self.transaction_id is not None))

    def charge_max_kw(self) -> float:
        """The charging maximum: the charger's rating, or the EV's maximum if lower."""
        needs = self.ev.needs
        rated_kw = self.rated_kw()
        return rated_kw if needs is None or needs.max_charge_kw is None else min(rated_kw, needs.max_charge_kw)

    def discharge_max_kw(self) -> float:
        """The discharging maximum of a V2X session: the charger's (v2x.max_discharge_kw) or the EV's if lower."""
        needs = self.ev.needs
        ev_kw = needs.max_discharge_kw if needs is not None and needs.max_discharge_kw is not None else 0.0
        return min(self.charger.max_discharge_kw, ev_kw)

    def ev_status(self) -> EvStatus:
        v2x = self.v2x()
        return self.ev.status(bidirectional=v2x, charge_cap_kw=self.rated_kw(),
                              discharge_cap_kw=self.charger.max_discharge_kw if v2x else None,
                              soc_pct=self.sample.soc_pct if self.ev_present else None,
                              operation_mode=self.operation_mode)

    def _v2x_session_check(self) -> None:
        if self.transaction_id is None or self.v2x_transaction == self.transaction_id or not self.v2x():
            return
        self.v2x_transaction = self.transaction_id
        status = self.ev_status()
        self.emit("v2x_session_started", {
            "transaction_id": self.transaction_id, "max_charge_kw": _rounded(self.charge_max_kw()),
            "max_discharge_kw": _rounded(self.discharge_max_kw()), "departure": _iso(status.departure_s),
            "energy_to_target_kwh": _rounded(status.energy_to_target_kwh)})

    # ---------------------------------------------------------- reports

    def expect_report(self, request_id: int) -> asyncio.Future:
        """A future for the report_data of the NotifyReport(s) answering GetBaseReport ``request_id``."""
        future = asyncio.get_running_loop().create_future()
        self._reports[request_id] = ([], future)
        return future

    def forget_report(self, request_id: int) -> None:
        self._reports.pop(request_id, None)

    def on_report(self, request_id: Any, report_data: list[dict[str, Any]], tbc: bool) -> None:
        entry = self._reports.get(request_id)
        if entry is None:
            return
        items, future = entry
        if len(items) < MAX_REPORT_ITEMS:
            items.extend(report_data[:MAX_REPORT_ITEMS - len(items)])
        if not tbc and not future.done():
            future.set_result(items)

    def _v2x_reading(self) -> AssetReading:
        charge_kw, discharge_kw = self.charge_max_kw(), self.discharge_max_kw()
        needs = self.ev.needs
        min_charge_kw = needs.min_charge_kw if needs is not None else None
        status = self.ev_status()
        detail = (f"V2X: charge up to {charge_kw:.2f} kW, discharge up to {discharge_kw:.2f} kW"
                  f" ({self.operation_mode or 'no profile yet'})") + self._detail_notes()
        return AssetReading(
            online=True,
            p_kw=self.power_kw(),
            soc_pct=status.soc_pct,
            p_min_kw=-charge_kw,
            p_max_kw=discharge_kw,
            p_gap_kw=(-min(min_charge_kw, charge_kw), 0.0) if min_charge_kw else None,
            degraded=self.degraded,
            command_refused=self.command_refused,
            detail=detail,
            read_at=self.sample_at or time.time(),
            ev=status,
            upstream=self.upstream_status(),
        )


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
