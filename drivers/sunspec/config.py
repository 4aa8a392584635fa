"""Profile model of a SunSpec Modbus asset (``driver: sunspec``; keys in docs/drivers/sunspec.md).

Imports only edge.config.types: the profile loads this module, through
drivers.registry, without loading pymodbus or pysunspec2.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from edge.config.types import AssetBase, Percent, Port, PositiveKw, Strict, UnitId, _ranged
from edge.config.yamlsource import WarningText


class Serial(Strict):
    port: str = Field(description="Serial device, e.g. /dev/ttyUSB0.")
    baudrate: Literal[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200] = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    inter_frame_delay_ms: Annotated[float, _ranged(0.0, 1000.0)] | None = Field(
        None, description="Silence on the line before each request (ms); default: Modbus RTU's 3.5 character "
                          "times (1.75 ms above 19200 baud). The line uses the largest of its assets' values.",
    )

    # Serial settings every asset on one line must share (a second client cannot open the port).
    LINE_KEYS: ClassVar[tuple[str, ...]] = ("baudrate", "bytesize", "parity", "stopbits")

    @property
    def inter_frame_s(self) -> float:
        """The silent interval before each request: ``inter_frame_delay_ms``, else 3.5 characters."""
        if self.inter_frame_delay_ms is not None:
            return self.inter_frame_delay_ms / 1000.0
        if self.baudrate > 19200:
            return 0.00175  # the Modbus RTU spec's fixed t3.5 at high rates
        bits = 1 + self.bytesize + (self.parity != "N") + self.stopbits  # start, data, parity, stop
        return 3.5 * bits / self.baudrate


class SunSpecAsset(AssetBase):
    kind: Literal["pv", "bess", "meter"]
    driver: Literal["sunspec"]
    host: str | None = Field(None, description="Modbus TCP host; give host or serial.")
    port: Port = Field(502, description="Modbus TCP port.")
    serial: Serial | None = Field(None, description="Modbus RTU line instead of TCP.")
    unit_id: UnitId = Field(1, description="Modbus unit (device) id.")
    base_address: Literal["auto", 0, 40000, 50000] = Field(
        "auto", description="SunSpec base register; auto probes 40000, 0, 50000."
    )
    timeout_s: Annotated[float, _ranged(0.05, 30.0)] = Field(1.0, description="Timeout of every Modbus request.")
    rated_kw: PositiveKw | None = Field(None, description="Override of the device's rated power (model 120 WRtg).")
    max_charge_kw: PositiveKw | None = Field(None, description="Storage: maximum charge power (default: device's).")
    max_discharge_kw: PositiveKw | None = Field(None, description="Storage: maximum discharge power (default: device's).")
    soc_min_pct: Percent = Field(5.0, description="Storage: no discharge below this state of charge.")
    soc_max_pct: Percent = Field(95.0, description="Storage: no charge above this state of charge.")
    revert_timeout_s: Annotated[int, _ranged(0, 65535)] = Field(
        60, description="Revert timer written with each control; refreshed every cycle. 0 disables it."
    )
    connection_point: bool = Field(
        False, description="Meter only: this meter measures the site's connection point."
    )

    @model_validator(mode="after")
    def _transport(self) -> "SunSpecAsset":
        if (self.host is None) == (self.serial is None):
            raise ValueError("give exactly one of host (Modbus TCP) or serial (Modbus RTU)")
        if self.connection_point and self.kind != "meter":
            raise ValueError("connection_point applies to kind meter only")
        if self.soc_min_pct >= self.soc_max_pct:
            raise ValueError(f"soc_min_pct ({self.soc_min_pct:g}) must be below soc_max_pct ({self.soc_max_pct:g})")
        return self

    @property
    def link_key(self) -> tuple:
        """The field link this asset is reached through: assets with equal keys share one
        connection (drivers/sunspec/hub.py): ("tcp", host, port) or ("rtu", serial device)."""
        if self.serial is not None:
            return ("rtu", os.path.realpath(self.serial.port))  # /dev/serial/by-id/... names the same line
        return ("tcp", self.host.strip().lower(), self.port)

    def link_text(self) -> str:
        return f"serial port {self.serial.port}" if self.serial is not None else f"{self.host}:{self.port}"


def shared_link_problems(assets: list[Any]) -> list[tuple[tuple[Any, ...], str]]:
    """Conflicts between SunSpec assets on one link, as (key path, message): serial settings
    that differ on one serial line, and two assets with the same link and unit id; a warning
    (``WarningText``) where a meter shares its unit id with an inverter, as it may."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    first_on_link: dict[tuple, int] = {}
    unit_owner: dict[tuple, int] = {}
    for index, asset in enumerate(assets):
        if not isinstance(asset, SunSpecAsset):
            continue
        key = asset.link_key
        first = first_on_link.setdefault(key, index)
        if asset.serial is not None and first != index:
            other = assets[first]
            for name in Serial.LINE_KEYS:
                mine, theirs = getattr(asset.serial, name), getattr(other.serial, name)
                if mine != theirs:
                    problems.append((("assets", index, "serial", name),
                                     f"asset {asset.id!r} sets {name} {mine} on {asset.link_text()}, asset {other.id!r} "
                                     f"(assets[{first}]) sets {theirs} on the same port: the assets of one serial "
                                     f"line share one client and its settings ({', '.join(Serial.LINE_KEYS)})"))
        # An inverter's SunSpec chain may carry the meter at its connection point too (models
        # 201-204 after its own), so a meter may share a unit id with one inverter, no more.
        owner = unit_owner.setdefault(key + (asset.unit_id, asset.kind == "meter"), index)
        partner = unit_owner.get(key + (asset.unit_id, asset.kind != "meter"))
        if owner == index and partner is not None:
            meter, inverter = (asset, assets[partner]) if asset.kind == "meter" else (assets[partner], asset)
            problems.append((("assets", index, "unit_id"), WarningText(
                f"meter {meter.id!r} and {inverter.kind} {inverter.id!r} share unit id {asset.unit_id} on "
                f"{asset.link_text()}: right only when that device's SunSpec chain carries the meter (models "
                f"201-204 after its own); otherwise give the meter its own unit id")))
        if owner != index:
            problems.append((("assets", index, "unit_id"),
                             f"asset {asset.id!r} and asset {assets[owner].id!r} (assets[{owner}]) both use unit id "
                             f"{asset.unit_id} on {asset.link_text()}: each device on a shared link needs its own "
                             f"unit id (only a meter may share one with an inverter whose chain carries it)"))
    return problems


def describe(asset: SunSpecAsset) -> str:
    """The asset's transport, one line for `flexedge check`."""
    if asset.serial is not None:
        s = asset.serial
        return f"rtu {s.port} {s.baudrate} {s.bytesize}{s.parity}{s.stopbits} unit {asset.unit_id}"
    return f"tcp {asset.host}:{asset.port} unit {asset.unit_id}"
