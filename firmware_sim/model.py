"""Machinery shared by the simulated devices: seeded noise, a fixed-step clock, sensor faults.

A model's whole state is a function of its seed, its stream and the number of ``step(dt)`` calls
(with a fixed ``dt``): nothing reads the wall clock, and every step draws the same number of random
numbers whatever the state or the active faults. Two runs that differ only by a fault switch
therefore see the same weather, load and sensor noise, so the fault's effect can be measured.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

Value = float | int | bool
"""An engineering value a model reports (before Modbus encoding)."""

SECONDS_PER_DAY = 86_400.0


class FaultError(ValueError):
    """An unknown fault switch or a value it does not accept."""


@dataclass
class SensorFaults:
    """Fault switches every device has. Subclasses add device-specific ones."""

    stuck: str | None = None
    """Metric whose reported value freezes at the value it had when the switch was set."""
    drift: float = 0.0
    """Sensor drift of ``drift_metric``, in its unit per simulated hour (the offset grows linearly)."""
    drift_metric: str = ""
    """Metric that drifts; empty means the model's default (boiler: flow_temp, meter: voltage)."""


def ou_step(x: float, dt: float, tau: float, sigma: float, z: float) -> float:
    """Exact update of an Ornstein-Uhlenbeck process (mean 0, stationary std ``sigma``)."""
    # The exact discretisation keeps the noise statistics independent of the tick length.
    a = math.exp(-dt / tau)
    return a * x + sigma * math.sqrt(1.0 - a * a) * z


def clamp(x: float, lo: float, hi: float) -> float:
    """``x`` limited to ``[lo, hi]``."""
    return lo if x < lo else hi if x > hi else x


def parse_float(lo: float, hi: float) -> Callable[[object], float]:
    """A fault-value parser accepting a number (or numeric text) in ``[lo, hi]``."""

    def parse(value: object) -> float:
        if isinstance(value, bool):
            x = 1.0 if value else 0.0
        elif isinstance(value, int | float):
            x = float(value)
        elif isinstance(value, str):
            text = value.strip().lower()
            if text in ("on", "true", "yes"):
                x = 1.0
            elif text in ("off", "false", "no", ""):
                x = 0.0
            else:
                try:
                    x = float(text)
                except ValueError:
                    raise FaultError(f"{value!r} is not a number") from None
        else:
            raise FaultError(f"{value!r} is not a number")
        if not (math.isfinite(x) and lo <= x <= hi):
            raise FaultError(f"{x} is outside [{lo}, {hi}]")
        return x

    return parse


class DeviceModel(ABC):
    """A simulated device: physics advanced by ``step(dt)``, readings in ``reading``."""

    kind: ClassVar[str]
    """Device kind (``protocol.schema.DeviceKind`` value)."""
    profile_name: ClassVar[str]
    """Built-in profile whose register map serves this model."""
    metrics: ClassVar[tuple[str, ...]]
    """Measured values (input registers), in profile order."""
    settings: ClassVar[tuple[str, ...]] = ()
    """Writable settings (holding registers)."""
    driftable: ClassVar[frozenset[str]]
    """Metrics a ``drift`` fault may apply to (analogue measurements, not counters)."""
    default_drift_metric: ClassVar[str]

    faults: SensorFaults

    def __init__(self, seed: int, stream: int, start_hour: float) -> None:
        if not (math.isfinite(start_hour) and 0.0 <= start_hour < 24.0):
            raise ValueError(f"start_hour must be in [0, 24), got {start_hour}")
        self.seed = seed
        self.stream = stream
        # SeedSequence mixes (seed, stream) so devices sharing a run seed still get unrelated noise.
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream])))
        self.steps = 0
        """Number of ``step`` calls so far."""
        self.sim_time = start_hour * 3600.0
        """Simulated seconds since midnight of day 0."""
        self._drift_offset = 0.0
        self._frozen: tuple[str, Value] | None = None
        self.reading: dict[str, Value] = {}
        """What the device's sensors report now: every metric and setting, by profile point name."""

    def _init_faults(self, faults: Mapping[str, object] | None) -> None:
        # Called by subclasses once their state exists, so 'stuck' can capture an initial value.
        self._refresh()
        for key, value in (faults or {}).items():
            self.set_fault(key, value)

    @property
    def hour_of_day(self) -> float:
        """Simulated local time of day in hours, ``[0, 24)``."""
        return (self.sim_time % SECONDS_PER_DAY) / 3600.0

    def step(self, dt: float) -> None:
        """Advance the simulation by ``dt`` simulated seconds and refresh ``reading``."""
        if not (math.isfinite(dt) and dt > 0):
            raise ValueError(f"dt must be a positive number of seconds, got {dt}")
        self._advance(dt)
        self.sim_time += dt
        self.steps += 1
        self._drift_offset += self.faults.drift * dt / 3600.0
        self._refresh()

    def _refresh(self) -> None:
        values = self._measure()
        if self.faults.drift:
            metric = self.faults.drift_metric or self.default_drift_metric
            values[metric] = float(values[metric]) + self._drift_offset
        stuck = self.faults.stuck
        if stuck is None:
            self._frozen = None
        else:
            if self._frozen is None or self._frozen[0] != stuck:
                # Set by attribute assignment rather than set_fault: freeze the last reported value.
                self._frozen = (stuck, self.reading.get(stuck, values[stuck]))
            values[stuck] = self._frozen[1]
        self.reading = values

    # --- faults ---

    def _fault_parsers(self) -> dict[str, Callable[[object], Any]]:
        metrics = frozenset(self.metrics)

        def metric_or_none(value: object) -> str | None:
            if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
                return None
            if not isinstance(value, str) or value not in metrics:
                raise FaultError(f"{value!r} is not a metric of a {self.kind}; use one of {sorted(metrics)}")
            return value

        def drift_metric(value: object) -> str:
            if not isinstance(value, str) or value not in self.driftable:
                raise FaultError(f"{value!r} cannot drift; use one of {sorted(self.driftable)}")
            return value

        return {"stuck": metric_or_none, "drift": parse_float(-1e6, 1e6), "drift_metric": drift_metric}

    @property
    def fault_keys(self) -> tuple[str, ...]:
        """Names of the fault switches this model accepts."""
        return tuple(self._fault_parsers())

    def set_fault(self, key: str, value: object) -> None:
        """Set fault switch ``key`` (text values as given on the command line are accepted).

        Raises :class:`FaultError` for an unknown key or a bad value.
        """
        parser = self._fault_parsers().get(key)
        if parser is None:
            raise FaultError(f"unknown fault {key!r} for a {self.kind}; known: {list(self.fault_keys)}")
        try:
            parsed = parser(value)
        except FaultError as exc:
            raise FaultError(f"fault {key}: {exc}") from None
        if key == "stuck":
            self._frozen = None if parsed is None else (parsed, self.reading[parsed])
        elif key == "drift" and parsed == 0.0:
            # Clearing the fault means the sensor was recalibrated.
            self._drift_offset = 0.0
        elif key == "drift_metric":
            self._drift_offset = 0.0
        setattr(self.faults, key, parsed)

    def active_faults(self) -> dict[str, Value | str]:
        """Fault switches that differ from their default (empty when the device is healthy)."""
        active: dict[str, Value | str] = {}
        for f in fields(self.faults):
            value = getattr(self.faults, f.name)
            if value != f.default and f.name != "drift_metric":
                active[f.name] = value
        if "drift" in active:
            active["drift_metric"] = self.faults.drift_metric or self.default_drift_metric
        return active

    # --- settings ---

    def write_setting(self, name: str, value: float) -> None:
        """Apply a setting written by a client; ``ValueError`` if unknown or out of range."""
        raise ValueError(f"a {self.kind} has no writable setting {name!r}")

    # --- physics, per model ---

    @abstractmethod
    def _advance(self, dt: float) -> None:
        """Advance the physical state by ``dt`` seconds."""

    @abstractmethod
    def _measure(self) -> dict[str, Value]:
        """Sensor values of the current state, before sensor faults: every metric and setting."""
