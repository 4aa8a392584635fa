"""Profile model of a SunSpec Modbus asset (``driver: sunspec``; keys in docs/drivers/sunspec.md).

Imports only edge.config.types: the profile loads this module, through
drivers.registry, without loading pymodbus or pysunspec2.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from edge.config.types import AssetBase, Percent, Port, PositiveKw, Strict, UnitId, _ranged


class Serial(Strict):
    port: str = Field(description="Serial device, e.g. /dev/ttyUSB0.")
    baudrate: Literal[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200] = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8


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


def describe(asset: SunSpecAsset) -> str:
    """The asset's transport, one line for `flexedge check`."""
    if asset.serial is not None:
        s = asset.serial
        return f"rtu {s.port} {s.baudrate} {s.bytesize}{s.parity}{s.stopbits} unit {asset.unit_id}"
    return f"tcp {asset.host}:{asset.port} unit {asset.unit_id}"
