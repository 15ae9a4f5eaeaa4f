"""Device simulators: a condensing gas boiler and a three-phase meter served over Modbus TCP.

See ``docs/simulators.md``. In-process use (tests)::

    async with run_simulators(SimConfig(boilers=1, meters=1, base_port=0)) as sim:
        port = sim.device("boiler-1").port
"""

from firmware_sim.boiler import BoilerFaults, BoilerModel
from firmware_sim.meter import MeterFaults, MeterModel
from firmware_sim.model import DeviceModel, FaultError, SensorFaults
from firmware_sim.server import (
    SimConfig,
    SimulatedDevice,
    Simulators,
    SimulatorStartError,
    run_simulators,
)

__all__ = [
    "BoilerFaults",
    "BoilerModel",
    "DeviceModel",
    "FaultError",
    "MeterFaults",
    "MeterModel",
    "SensorFaults",
    "SimConfig",
    "SimulatedDevice",
    "SimulatorStartError",
    "Simulators",
    "run_simulators",
]
