"""Device simulators: a condensing gas boiler and a three-phase meter served over Modbus TCP or
Modbus RTU (a pty), and IEC 62056-21 mode C meters (a pty each), with injectable faults.

See ``docs/simulators.md``. In-process use (tests)::

    async with run_simulators(SimConfig(boilers=1, meters=1, base_port=0)) as sim:
        port = sim.device("boiler-1").port
    async with run_simulators(SimConfig(boilers=2, meters=1, rtu=True, iec_meters=1)) as sim:
        bus_path = sim.bus.path                      # e.g. /dev/pts/7; unit ids 1, 2, 3
        meter_path = sim.iec_meter("iec-meter-1").path
"""

from firmware_sim.boiler import BoilerFaults, BoilerModel
from firmware_sim.iec import IecMeter
from firmware_sim.inject import FAULT_KINDS, FaultInjector, InjectSpec, parse_inject
from firmware_sim.line import LineSettings
from firmware_sim.meter import MeterFaults, MeterModel
from firmware_sim.model import DeviceModel, FaultError, SensorFaults
from firmware_sim.rtu import RtuBus
from firmware_sim.server import (
    SimConfig,
    SimulatedDevice,
    Simulators,
    SimulatorStartError,
    run_simulators,
)

__all__ = [
    "FAULT_KINDS",
    "BoilerFaults",
    "BoilerModel",
    "DeviceModel",
    "FaultError",
    "FaultInjector",
    "IecMeter",
    "InjectSpec",
    "LineSettings",
    "MeterFaults",
    "MeterModel",
    "RtuBus",
    "SensorFaults",
    "SimConfig",
    "SimulatedDevice",
    "SimulatorStartError",
    "Simulators",
    "parse_inject",
    "run_simulators",
]
