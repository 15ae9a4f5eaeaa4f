"""Build the driver of every configured device (one shared link per serial bus)."""

from __future__ import annotations

from collections.abc import Collection

from edge.config import EdgeConfig, IecDeviceConfig, RtuDeviceConfig, TcpDeviceConfig
from edge.drivers.base import Driver
from edge.drivers.iec62056 import Iec62056Driver
from edge.drivers.modbus import ModbusDriver, ModbusLink
from protocol.profile import DeviceProfile


def build_drivers(cfg: EdgeConfig, profiles: dict[str, DeviceProfile], names: Collection[str] | None = None,
                  buses: dict[str, ModbusLink] | None = None) -> dict[str, Driver]:
    """Device name → driver, for the devices in ``names`` (default: all).

    ``buses`` (serial port name → link) lets a running agent add devices to an RS-485 bus that
    devices kept by a reconfiguration still use: an existing link is shared, new ones are added to it.
    """
    buses = {} if buses is None else buses
    drivers: dict[str, Driver] = {}
    for d in cfg.devices:
        if names is not None and d.name not in names:
            continue
        profile = profiles[d.name]
        if isinstance(d, TcpDeviceConfig):
            drivers[d.name] = ModbusDriver(ModbusLink.tcp(d.host, d.port, d.timeout_s), d.unit_id, profile, d.points)
        elif isinstance(d, RtuDeviceConfig):
            port = cfg.serial_port(d.serial_port)
            link = buses.get(port.name)
            if link is None:
                link = buses[port.name] = ModbusLink.rtu(port.device, port.baudrate, port.parity, port.stopbits,
                                                         port.bytesize, port.timeout_s, port.inter_frame_s)
            drivers[d.name] = ModbusDriver(link, d.unit_id, profile, d.points)
        elif isinstance(d, IecDeviceConfig):
            port = cfg.serial_port(d.serial_port)
            drivers[d.name] = Iec62056Driver(port.device, profile, d.address, port.baudrate,
                                             max(port.timeout_s, 1.5), d.points)
    return drivers


def point_intervals(profile: DeviceProfile) -> dict[str, float]:
    """Per-point intervals a profile sets (points without one follow the device's interval)."""
    return {p.name: p.interval_s for p in profile.points if p.interval_s is not None}
