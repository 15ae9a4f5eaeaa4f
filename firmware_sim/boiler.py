"""A 24 kW condensing gas boiler heating a building, simple enough to reason about.

One lumped water volume (boiler + circuit) is heated by a modulating burner and cooled by the
building's radiators. The building's heat demand follows a daily schedule scaled by the indoor-
outdoor temperature difference (weather compensation). The burner holds the flow setpoint with a
feed-forward + proportional modulation and switches on/off with a hysteresis band when the demand
is below its minimum output. Protections lock the burner out and set ``fault_code``:

==== ============================================ ==========================================
code condition                                   clears when
==== ============================================ ==========================================
0    no fault
1    low water pressure (< 0.5 bar): burner and   pressure back >= 0.8 bar (:meth:`refill`)
     pump stop
2    overheat (flow > 95 degC): burner stops      flow < 85 degC
3    flue-gas over-temperature (> 120 degC), e.g. flue < 100 degC
     heavy scale: burner stops
==== ============================================ ==========================================

When several apply, the lowest code is reported.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from firmware_sim.model import DeviceModel, SensorFaults, Value, clamp, ou_step, parse_float

NOMINAL_POWER_KW = 24.0
MIN_MODULATION = 20.0
FLOW_SETPOINT_DEFAULT = 70.0
FLOW_SETPOINT_MIN = 30.0
FLOW_SETPOINT_MAX = 80.0

FAULT_NONE = 0
FAULT_LOW_PRESSURE = 1
FAULT_OVERHEAT = 2
FAULT_FLUE_OVERTEMP = 3
FAULT_CODES: dict[int, str] = {
    FAULT_NONE: "no fault",
    FAULT_LOW_PRESSURE: "low water pressure (< 0.5 bar): burner and pump locked out",
    FAULT_OVERHEAT: "overheat (flow temperature > 95 degC): burner locked out",
    FAULT_FLUE_OVERTEMP: "flue-gas over-temperature (> 120 degC): burner locked out",
}

LOW_PRESSURE_BAR, LOW_PRESSURE_RESET_BAR = 0.5, 0.8
OVERHEAT_C, OVERHEAT_RESET_C = 95.0, 85.0
FLUE_LIMIT_C, FLUE_RESET_C = 120.0, 100.0

_CP_WATER = 4.186  # kJ/(kg K)
_HEAT_CAPACITY = 350.0  # kJ/K: ~80 l of water in boiler and circuit, plus the heat exchanger's metal
_HYSTERESIS_K = 5.0
_MIN_OFF_S = 180.0  # anti-cycling: a real burner waits before relighting
_KP = 8.0  # % modulation per K below setpoint
_ROOM_C = 20.0
_RADIATOR_KW_AT_70 = 24.0  # emitters sized for the boiler; less output at lower flow temperatures
_STANDBY_LOSS_KW_PER_K = 0.004
_EXPANSION_BAR_PER_K = 0.008  # pressure rise of a sealed system with an expansion vessel
_MAX_SUBSTEP_S = 1.0

# Heating-demand factor over the day (hour, factor), linear in between: morning warm-up and
# evening comfort period high, night set-back low.
_DEMAND_PROFILE: tuple[tuple[float, float], ...] = (
    (0.0, 0.25), (5.5, 0.25), (6.5, 1.3), (9.0, 1.1), (10.0, 0.7), (16.5, 0.7),
    (17.5, 1.1), (22.0, 1.0), (23.0, 0.25), (24.0, 0.25),
)


def demand_factor(hour: float) -> float:
    """Relative heating demand at ``hour`` of the day (1.0 = full comfort heating)."""
    for (h0, f0), (h1, f1) in itertools.pairwise(_DEMAND_PROFILE):
        if h0 <= hour <= h1:
            return f0 + (f1 - f0) * (hour - h0) / (h1 - h0)
    return _DEMAND_PROFILE[-1][1]


@dataclass
class BoilerFaults(SensorFaults):
    """Fault switches of a boiler (all off by default)."""

    scale: float = 0.0
    """Scale build-up on the heat exchanger, 0..1: lowers heat transfer, raises flue temperature."""
    leak: float = 0.0
    """Water leak, bar lost per simulated hour."""


@dataclass
class BoilerState:
    """Physical state of the boiler (what the sensors measure, before sensor noise and faults)."""

    outdoor_temp: float
    flow_temp: float
    return_temp: float
    flue_temp: float
    pressure: float
    heat_demand: float
    """kW the building asks for."""
    heat_load: float = 0.0
    """kW the radiators actually take from the water."""
    burner_on: bool = False
    modulation: float = 0.0
    pump_on: bool = False
    water_flow: float = 0.0
    burner_seconds: float = 0.0
    burner_starts: int = 0
    fault_code: int = FAULT_NONE
    pressure_lost: float = 0.0
    """bar lost to leaks since the last refill."""
    last_off: float = -math.inf
    """Simulated time the burner last went off (for anti-cycling)."""
    latched: set[int] = field(default_factory=set)
    """Protections currently tripped."""


class BoilerModel(DeviceModel):
    """Simulated condensing gas boiler, served with the ``sim-boiler`` register map."""

    kind = "boiler"
    profile_name = "sim-boiler"
    metrics = ("flow_temp", "return_temp", "pressure", "flue_temp", "modulation", "water_flow",
               "burner_on", "fault_code", "operating_hours", "burner_starts", "outdoor_temp")
    settings = ("flow_setpoint",)
    driftable = frozenset({"flow_temp", "return_temp", "pressure", "flue_temp", "water_flow",
                           "outdoor_temp"})
    default_drift_metric = "flow_temp"

    faults: BoilerFaults

    def __init__(
        self,
        seed: int = 1,
        *,
        stream: int = 0,
        start_hour: float = 0.0,
        flow_setpoint: float = FLOW_SETPOINT_DEFAULT,
        outdoor_mean: float = 5.0,
        outdoor_amplitude: float = 5.0,
        faults: Mapping[str, object] | None = None,
    ) -> None:
        """Build a boiler whose trajectory depends only on (``seed``, ``stream``) and the steps taken.

        ``faults`` maps fault switch names (``scale``, ``leak``, ``stuck``, ``drift``,
        ``drift_metric``) to values, as :meth:`set_fault` takes them.
        """
        super().__init__(seed, stream, start_hour)
        self.faults = BoilerFaults()
        self.flow_setpoint = FLOW_SETPOINT_DEFAULT
        self.write_setting("flow_setpoint", flow_setpoint)
        self.outdoor_mean = outdoor_mean
        self.outdoor_amplitude = outdoor_amplitude
        # Per-unit differences, drawn first so they do not depend on anything else.
        self.building_ua = float(self._rng.uniform(0.45, 0.6))  # kW/K of the heated building
        self.fill_pressure = float(self._rng.uniform(1.45, 1.55))  # bar, cold
        self._outdoor_noise = 0.0
        self._demand_noise = 0.0
        self._flow_noise = 0.0
        self._sensor_noise = (0.0, 0.0, 0.0, 0.0)
        outdoor = self._outdoor_base(self.hour_of_day)
        flow = self.flow_setpoint - 10.0
        self.state = BoilerState(
            outdoor_temp=outdoor, flow_temp=flow, return_temp=flow, flue_temp=flow,
            pressure=self._pressure(flow, 0.0), heat_demand=self._demand(self.hour_of_day, outdoor),
        )
        self._init_faults(faults)

    # --- public helpers ---

    def write_setting(self, name: str, value: float) -> None:
        """Set ``flow_setpoint`` (degC, 30..80) as a Modbus client would."""
        if name != "flow_setpoint":
            super().write_setting(name, value)
        if not (math.isfinite(value) and FLOW_SETPOINT_MIN <= value <= FLOW_SETPOINT_MAX):
            raise ValueError(f"flow_setpoint {value} outside [{FLOW_SETPOINT_MIN}, {FLOW_SETPOINT_MAX}]")
        self.flow_setpoint = float(value)
        if self.reading:
            self.reading["flow_setpoint"] = self.flow_setpoint

    def refill(self) -> None:
        """Top the system up to its fill pressure, as a technician would after a low-pressure fault."""
        self.state.pressure_lost = 0.0

    @property
    def heat_demand_kw(self) -> float:
        """Current heating demand of the building in kW."""
        return self.state.heat_demand

    # --- physics ---

    def _fault_parsers(self) -> dict[str, Callable[[object], Any]]:
        parsers = super()._fault_parsers()
        parsers.update(scale=parse_float(0.0, 1.0), leak=parse_float(0.0, 100.0))
        return parsers

    def _outdoor_base(self, hour: float) -> float:
        # Coldest around 03:00, warmest around 15:00.
        return self.outdoor_mean + self.outdoor_amplitude * math.sin(2 * math.pi * (hour - 9.0) / 24.0)

    def _demand(self, hour: float, outdoor: float) -> float:
        return max(0.0, self.building_ua * (_ROOM_C - outdoor) * demand_factor(hour))

    def _pressure(self, mean_water: float, lost: float) -> float:
        return max(0.0, self.fill_pressure + _EXPANSION_BAR_PER_K * (mean_water - _ROOM_C) - lost)

    def _advance(self, dt: float) -> None:
        # Always the same number of draws per step, whatever the state: see firmware_sim.model.
        z = self._rng.standard_normal(7)
        self._outdoor_noise = ou_step(self._outdoor_noise, dt, 3600.0, 0.8, float(z[0]))
        self._demand_noise = ou_step(self._demand_noise, dt, 600.0, 0.4, float(z[1]))
        self._flow_noise = ou_step(self._flow_noise, dt, 120.0, 0.02, float(z[2]))
        self._sensor_noise = (float(z[3]), float(z[4]), float(z[5]), float(z[6]))

        s = self.state
        hour = ((self.sim_time + dt) % 86_400.0) / 3600.0
        s.outdoor_temp = self._outdoor_base(hour) + self._outdoor_noise
        s.heat_demand = max(0.0, self._demand(hour, s.outdoor_temp) + self._demand_noise)
        n = max(1, math.ceil(dt / _MAX_SUBSTEP_S - 1e-9))
        h = dt / n
        for i in range(n):
            self._substep(h, self.sim_time + (i + 1) * h)

    def _substep(self, h: float, now: float) -> None:
        s = self.state
        f = self.faults
        s.pressure_lost += f.leak * h / 3600.0
        s.pressure = self._pressure((s.flow_temp + s.return_temp) / 2.0, s.pressure_lost)
        s.fault_code = self._protection(s)

        s.pump_on = s.fault_code != FAULT_LOW_PRESSURE and (s.heat_demand > 0.05 or s.burner_on)
        sp = self.flow_setpoint
        if s.fault_code != FAULT_NONE or not s.pump_on:
            if s.burner_on:
                s.burner_on, s.last_off = False, now
        elif s.burner_on and s.flow_temp > sp + _HYSTERESIS_K:
            s.burner_on, s.last_off = False, now
        elif not s.burner_on and s.flow_temp < sp - _HYSTERESIS_K and now - s.last_off >= _MIN_OFF_S:
            s.burner_on = True
            s.burner_starts += 1

        s.water_flow = clamp(1.1 + self._flow_noise, 1.0, 1.2) if s.pump_on else 0.0
        if s.pump_on:
            # Radiators cannot deliver more than their output at the current flow temperature.
            capacity = _RADIATOR_KW_AT_70 * max(0.0, (s.flow_temp - _ROOM_C) / 50.0) ** 1.3
            s.heat_load = min(s.heat_demand, capacity)
            m_cp = s.water_flow / 3.6 * _CP_WATER  # kW/K; 1 m3/h of water is ~1/3.6 kg/s
            drop = min(s.heat_load / m_cp, max(0.0, s.flow_temp - _ROOM_C))
        else:
            s.heat_load = 0.0
            drop = 0.0

        # Condensing gain when the return is cool; scale insulates the heat exchanger.
        efficiency = 0.87 + 0.10 * clamp((55.0 - s.return_temp) / 30.0, 0.0, 1.0) - 0.15 * f.scale
        if s.burner_on:
            feed_forward = 100.0 * s.heat_load / (NOMINAL_POWER_KW * efficiency)
            s.modulation = clamp(feed_forward + _KP * (sp - s.flow_temp), MIN_MODULATION, 100.0)
            s.burner_seconds += h
            heat_in = s.modulation / 100.0 * NOMINAL_POWER_KW * efficiency
        else:
            s.modulation = 0.0
            heat_in = 0.0
        standby_loss = _STANDBY_LOSS_KW_PER_K * (s.flow_temp - _ROOM_C)
        s.flow_temp += (heat_in - s.heat_load - standby_loss) * h / _HEAT_CAPACITY
        s.return_temp = s.flow_temp - drop

        if s.burner_on:
            flue_target = (s.return_temp + 10.0 + 15.0 * (s.modulation - MIN_MODULATION) / 80.0
                           + 50.0 * f.scale)
        else:
            flue_target = s.return_temp
        s.flue_temp += (flue_target - s.flue_temp) * (1.0 - math.exp(-h / 45.0))

    def _protection(self, s: BoilerState) -> int:
        # Each protection trips at one threshold and resets at another, so it does not chatter.
        checks = (
            (FAULT_LOW_PRESSURE, s.pressure < LOW_PRESSURE_BAR, s.pressure >= LOW_PRESSURE_RESET_BAR),
            (FAULT_OVERHEAT, s.flow_temp > OVERHEAT_C, s.flow_temp < OVERHEAT_RESET_C),
            (FAULT_FLUE_OVERTEMP, s.flue_temp > FLUE_LIMIT_C, s.flue_temp < FLUE_RESET_C),
        )
        for code, trip, reset in checks:
            if trip:
                s.latched.add(code)
            elif reset:
                s.latched.discard(code)
        return min(s.latched, default=FAULT_NONE)

    def _measure(self) -> dict[str, Value]:
        s = self.state
        nt, nr, nf, np_ = self._sensor_noise
        return {
            "flow_temp": s.flow_temp + 0.05 * nt,
            "return_temp": s.return_temp + 0.05 * nr,
            "pressure": max(0.0, s.pressure + 0.003 * np_),
            "flue_temp": s.flue_temp + 0.1 * nf,
            "modulation": s.modulation,
            "water_flow": s.water_flow,
            "burner_on": s.burner_on,
            "fault_code": s.fault_code,
            "operating_hours": s.burner_seconds / 3600.0,
            "burner_starts": s.burner_starts,
            "outdoor_temp": s.outdoor_temp,
            "flow_setpoint": self.flow_setpoint,
        }
