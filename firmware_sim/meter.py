"""A three-phase energy meter on a small commercial building.

Active power follows a daily load profile (base load, a daytime bump, a smaller evening bump) plus
seeded noise. Voltage, power factor and frequency wander slowly around nominal values; current is
derived from them. ``energy_import`` is the integral of the power over simulated time: the power
reported during a step is the power integrated over that step, so summing ``power * dt`` over the
served values reproduces the counter exactly (until the 32-bit register rolls over, which the
codec handles when it encodes the counter).

Fault switch ``tamper`` (0..1) is the fraction of the energy that bypasses the meter's counter
while the power reading is unaffected: 1 (or ``on``) stops the counter, 0.7 makes it count only
30 % of the energy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from firmware_sim.model import DeviceModel, SensorFaults, Value, clamp, ou_step, parse_float

ENERGY_ROLLOVER_KWH = (2**32) * 0.01
"""The ``energy_import`` register (uint32 x 0.01 kWh) reads 0 again at this energy."""

NOMINAL_VOLTAGE = 230.0
NOMINAL_FREQUENCY = 50.0


@dataclass
class MeterFaults(SensorFaults):
    """Fault switches of a meter (all off by default)."""

    tamper: float = 0.0
    """Fraction of the energy bypassing the counter (1 = counter stopped)."""


def load_shape(hour: float) -> tuple[float, float]:
    """(daytime, evening) load shape at ``hour``, each 0..1."""
    day = math.sin(math.pi * (hour - 7.0) / 12.0) ** 2 if 7.0 <= hour <= 19.0 else 0.0
    evening = math.sin(math.pi * (hour - 18.0) / 4.5) ** 2 if 18.0 <= hour <= 22.5 else 0.0
    return day, evening


class MeterModel(DeviceModel):
    """Simulated three-phase meter, served with the ``sim-meter`` register map."""

    kind = "meter"
    profile_name = "sim-meter"
    metrics = ("energy_import", "power", "voltage", "current", "power_factor", "frequency")
    driftable = frozenset({"power", "voltage", "current", "power_factor", "frequency"})
    default_drift_metric = "voltage"

    faults: MeterFaults

    def __init__(
        self,
        seed: int = 1,
        *,
        stream: int = 0,
        start_hour: float = 0.0,
        start_kwh: float = 0.0,
        faults: Mapping[str, object] | None = None,
    ) -> None:
        """Build a meter whose trajectory depends only on (``seed``, ``stream``) and the steps taken.

        ``start_kwh`` is the counter's initial value. ``faults`` maps fault switch names (``tamper``,
        ``stuck``, ``drift``, ``drift_metric``) to values, as :meth:`set_fault` takes them.
        """
        super().__init__(seed, stream, start_hour)
        if not (math.isfinite(start_kwh) and start_kwh >= 0):
            raise ValueError(f"start_kwh must be >= 0, got {start_kwh}")
        self.faults = MeterFaults()
        self.start_kwh = float(start_kwh)
        self.base_kw = float(self._rng.uniform(1.5, 3.0))
        self.day_kw = float(self._rng.uniform(6.0, 12.0))
        self.evening_kw = float(self._rng.uniform(1.0, 3.0))
        # Counted from 0 rather than from start_kwh so that small increments keep full float precision.
        self.counted_kwh = 0.0
        """Energy the counter registered since start (less than ``true_kwh`` under tamper)."""
        self.true_kwh = 0.0
        """Energy that actually flowed since start."""
        self._power_noise = 0.0
        self._voltage_noise = 0.0
        self._pf_noise = 0.0
        self._freq_noise = 0.0
        self._white = (0.0, 0.0)
        self.power = self.voltage = self.power_factor = self.frequency = self.current = 0.0
        self._update_electrics(self.hour_of_day)
        self._init_faults(faults)

    @property
    def energy_import(self) -> float:
        """Counter value in kWh, before the register's 32-bit roll-over."""
        return self.start_kwh + self.counted_kwh

    def _fault_parsers(self) -> dict[str, Callable[[object], Any]]:
        parsers = super()._fault_parsers()
        parsers.update(tamper=parse_float(0.0, 1.0))
        return parsers

    def _advance(self, dt: float) -> None:
        # The power shown during the step is what flowed during it (zero-order hold).
        kwh = self.power * dt / 3600.0
        self.true_kwh += kwh
        self.counted_kwh += kwh * (1.0 - self.faults.tamper)

        z = self._rng.standard_normal(6)
        self._power_noise = ou_step(self._power_noise, dt, 300.0, 0.04 * self.day_kw, float(z[0]))
        self._voltage_noise = ou_step(self._voltage_noise, dt, 900.0, 1.5, float(z[1]))
        self._pf_noise = ou_step(self._pf_noise, dt, 1800.0, 0.01, float(z[2]))
        self._freq_noise = ou_step(self._freq_noise, dt, 60.0, 0.015, float(z[3]))
        self._white = (float(z[4]), float(z[5]))
        self._update_electrics(((self.sim_time + dt) % 86_400.0) / 3600.0)

    def _update_electrics(self, hour: float) -> None:
        day, evening = load_shape(hour)
        peak = self.base_kw + self.day_kw + self.evening_kw
        self.power = max(0.05, self.base_kw + self.day_kw * day + self.evening_kw * evening
                         + self._power_noise + 0.05 * self._white[0])
        # Voltage sags a little under load; the tap changer keeps it near nominal on average.
        self.voltage = NOMINAL_VOLTAGE + self._voltage_noise - 0.05 * self.power + 0.2 * self._white[1]
        self.power_factor = clamp(0.87 + 0.1 * self.power / peak + self._pf_noise, 0.85, 0.99)
        self.frequency = clamp(NOMINAL_FREQUENCY + self._freq_noise, 49.95, 50.05)
        self.current = self.power * 1000.0 / (3.0 * self.voltage * self.power_factor)

    def _measure(self) -> dict[str, Value]:
        return {
            "energy_import": self.energy_import,
            "power": self.power,
            "voltage": self.voltage,
            "current": self.current,
            "power_factor": self.power_factor,
            "frequency": self.frequency,
        }
