"""Labelled time series straight from the simulators' physics, with injected process and sensor faults.

No Modbus and no network: a :class:`~firmware_sim.boiler.BoilerModel` or
:class:`~firmware_sim.meter.MeterModel` is stepped with the simulators' default tick (1 s) and its
reading sampled every ``period_s`` (default 1 s, the rate the edge polls the simulated devices at).
Every value goes through the register encoding of the device's profile and back, exactly as the
edge decodes it (``flow_temp`` int16 x 0.1 reads in steps of 0.1 degC, ``energy_import`` uint32 x
0.01 kWh, a negative value in an unsigned register reads as 0), so training data looks like live
data. Bools read as 0.0/1.0.

Everything is a function of the seed: the unit (building, fill pressure, load sizes; drawn by the
physics model itself), its operating regime (:class:`UnitParams`: outdoor temperature, start hour,
flow setpoint, meter start reading) and the fault parameters (:func:`draw_fault`). A fault run and
the normal run of the same seed share weather, load and sensor noise (the physics models draw the
same random numbers whatever the faults), so they are identical up to the fault onset.

Seeds: training uses :data:`TRAIN_SEEDS` (0..9_999); held-out evaluation (``models.evaluate_sim``)
uses seeds from :data:`EVAL_SEED_BASE` (10_000) up. The live simulators (``twin-sim``) draw their
noise from other ``(seed, stream)`` pairs (:data:`STREAMS`), so a live device is never a training unit.

Fault scenarios (:data:`FAULTS`, parameters drawn by :func:`draw_fault` unless given):

=================== ======= ====================================================================
name                kind    what happens from the onset on
=================== ======= ====================================================================
``scale_ramp``      boiler  ``scale`` grows linearly from 0 to 0.4..0.7 over 6..12 h, then holds
``scale_step``      boiler  ``scale`` jumps to 0.3..0.6 (e.g. after a descaling job went wrong)
``leak``            boiler  water leak of 0.02..0.2 bar/h (log-uniform); the boiler locks out
                            below 0.5 bar, which the label still counts as the fault
``stuck_<metric>``  boiler  ``flow_temp``, ``return_temp``, ``pressure`` or ``flue_temp`` freezes
                            for 2..8 h, then reads live again (label: only while stuck)
``tamper``          meter   0.2..0.6 of the energy bypasses the counter; ``power`` is unaffected
``stuck_<metric>``  meter   ``power`` or ``voltage`` freezes for 2..8 h
=================== ======= ====================================================================

The onset is drawn in 10..30 % of the run (never before ``min_onset_h``); the label is True from
the onset sample on (stuck faults: until the sensor reads live again).
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import operator
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from firmware_sim.boiler import BoilerModel
from firmware_sim.meter import MeterModel
from firmware_sim.model import DeviceModel
from protocol.codec import INTEGER_TYPES
from protocol.profile import DeviceProfile, Point, builtin_profile

Kind = Literal["boiler", "meter"]
KINDS: tuple[Kind, ...] = get_args(Kind)
PROFILES: dict[Kind, str] = {"boiler": "sim-boiler", "meter": "sim-meter"}
"""Built-in profile a kind's devices are read with (the model card's ``profile``)."""

TRAIN_SEEDS = range(0, 10_000)
"""Seeds training code draws its units from."""
EVAL_SEED_BASE = 10_000
"""Held-out evaluation uses seeds >= this (never seen in training)."""
STREAMS: dict[Kind, int] = {"boiler": 7_000, "meter": 7_001}
"""Noise stream of the physics models here; ``twin-sim`` uses streams 1..N (boilers), 1001.. and 2001.."""
TICK_S = 1.0
"""Simulated seconds per physics step: the simulators' default ``--tick``."""

MODEL_INPUTS: dict[Kind, tuple[str, ...]] = {
    # The analogue process values plus the burner state, which explains most of their movement
    # (flow temperature saw-tooth, flue temperature, modulation). Scale shows in flue_temp and
    # modulation relative to the heat delivered (flow - return); a leak in the pressure trend; a stuck
    # sensor as a flat line that no longer follows the burner cycles. outdoor_temp gives the demand
    # context (how hard the burner has to work). Left out: fault_code (the boiler's own lockout
    # diagnosis: a model keyed on it only repeats what the device already reports), the counters
    # operating_hours and burner_starts (their level says how old the unit is, not how it is doing),
    # and flow_setpoint (a setting, constant per unit; its effect is visible in flow_temp).
    "boiler": ("flow_temp", "return_temp", "pressure", "flue_temp", "modulation", "water_flow", "burner_on",
               "outdoor_temp"),
    # All six. energy_import raw (a cumulative counter; the model differences it itself): tamper is
    # only visible as energy increments falling short of the integral of power. current ties power,
    # voltage and power factor together (I = P / (3 U pf)), which a stuck power or voltage breaks.
    # frequency is grid-wide and carries no fault here, but a stuck frequency sensor is a fault too,
    # and one feature costs little.
    "meter": ("energy_import", "power", "voltage", "current", "power_factor", "frequency"),
}
"""Metrics an anomaly model of each kind should take as its window features, in this order."""

STUCK_METRICS: dict[Kind, tuple[str, ...]] = {
    "boiler": ("flow_temp", "return_temp", "pressure", "flue_temp"),
    "meter": ("power", "voltage"),
}
FAULTS: dict[Kind, tuple[str, ...]] = {
    "boiler": ("scale_ramp", "scale_step", "leak", *(f"stuck_{m}" for m in STUCK_METRICS["boiler"])),
    "meter": ("tamper", *(f"stuck_{m}" for m in STUCK_METRICS["meter"])),
}
"""Fault scenarios per kind (see the module docstring)."""

FloatArray = npt.NDArray[np.float64]
Float32Array = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class UnitParams:
    """Operating regime of one simulated unit (the physics model draws the unit's own constants)."""

    start_hour: float = 0.0
    """Time of day of the first sample."""
    outdoor_mean: float = 5.0
    """Boiler: daily mean outdoor temperature, degC."""
    outdoor_amplitude: float = 5.0
    """Boiler: half the day-night outdoor temperature swing, K."""
    flow_setpoint: float = 70.0
    """Boiler: flow temperature setpoint, degC."""
    start_kwh: float = 0.0
    """Meter: energy counter at the start (kept below 10 MWh so float32 windows resolve 0.01 kWh)."""


def draw_unit(kind: Kind, seed: int) -> UnitParams:
    """The operating regime of unit ``seed``: start hour, outdoor -5..12 degC mean, setpoint 60..75 degC."""
    rng = np.random.default_rng([seed, 0x0417, KINDS.index(kind)])
    start_hour = float(np.floor(rng.uniform(0.0, 24.0) * 60.0) / 60.0)  # whole minutes
    if kind == "boiler":
        return UnitParams(
            start_hour=start_hour,
            outdoor_mean=round(float(rng.uniform(-5.0, 12.0)), 1),
            outdoor_amplitude=round(float(rng.uniform(2.0, 7.0)), 1),
            flow_setpoint=float(np.round(rng.uniform(60.0, 75.0) * 2.0) / 2.0),  # as a person sets it
        )
    return UnitParams(start_hour=start_hour, start_kwh=round(float(rng.uniform(0.0, 10_000.0)), 2))


@dataclass(frozen=True)
class FaultSpec:
    """One injected fault (see the module docstring for the scenarios)."""

    name: str
    """Scenario name, one of :data:`FAULTS` of the device kind."""
    onset_h: float
    """Hours after the first sample at which the fault starts (rounded to the sample grid)."""
    severity: float = 0.0
    """``scale_*``: final scale 0..1; ``leak``: bar/h; ``tamper``: bypassed fraction 0..1; stuck: unused."""
    ramp_h: float = 0.0
    """``scale_ramp``: hours from 0 to ``severity`` (0 = a step)."""
    duration_h: float | None = None
    """``stuck_*``: hours the sensor stays stuck (None: to the end of the run)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.onset_h) and self.onset_h >= 0):
            raise ValueError(f"onset_h must be >= 0, got {self.onset_h}")
        if self.name.startswith("stuck_"):
            if self.duration_h is not None and not (math.isfinite(self.duration_h) and self.duration_h > 0):
                raise ValueError(f"duration_h must be > 0, got {self.duration_h}")
            return
        limits = {"scale_ramp": 1.0, "scale_step": 1.0, "tamper": 1.0, "leak": 100.0}
        if self.name not in limits:
            raise ValueError(f"unknown fault {self.name!r}")
        if not (math.isfinite(self.severity) and 0.0 < self.severity <= limits[self.name]):
            raise ValueError(f"{self.name}: severity must be in (0, {limits[self.name]}], got {self.severity}")
        if not (math.isfinite(self.ramp_h) and self.ramp_h >= 0):
            raise ValueError(f"ramp_h must be >= 0, got {self.ramp_h}")

    @property
    def stuck_metric(self) -> str | None:
        """The metric a ``stuck_*`` fault freezes (None for other faults)."""
        return self.name.removeprefix("stuck_") if self.name.startswith("stuck_") else None


def draw_fault(kind: Kind, name: str, seed: int, hours: float, *, min_onset_h: float = 0.0) -> FaultSpec:
    """Fault ``name`` with parameters drawn from ``seed`` for a run of ``hours`` (module docstring ranges)."""
    if name not in FAULTS[kind]:
        raise ValueError(f"unknown {kind} fault {name!r}; known: {list(FAULTS[kind])}")
    rng = np.random.default_rng([seed, 0xFA17, zlib.crc32(name.encode())])
    onset = max(min_onset_h, float(rng.uniform(0.1, 0.3)) * hours)
    if onset >= hours:
        raise ValueError(f"a {hours} h run has no room for a fault after {min_onset_h} h")
    remaining = hours - onset
    # Always the same draws, in the same order, so one parameter does not shift the others.
    u_sev, u_ramp, u_dur = (float(x) for x in rng.uniform(0.0, 1.0, 3))
    onset = round(onset, 4)
    if name == "scale_ramp":
        return FaultSpec(name, onset, severity=round(0.4 + 0.3 * u_sev, 3),
                         ramp_h=round(min(6.0 + 6.0 * u_ramp, 0.75 * remaining), 4))
    if name == "scale_step":
        return FaultSpec(name, onset, severity=round(0.3 + 0.3 * u_sev, 3))
    if name == "leak":
        return FaultSpec(name, onset, severity=round(0.02 * 10.0**u_sev, 4))
    if name == "tamper":
        return FaultSpec(name, onset, severity=round(0.2 + 0.4 * u_sev, 3))
    return FaultSpec(name, onset, duration_h=round(min(2.0 + 6.0 * u_dur, remaining), 4))


@dataclass(frozen=True, eq=False)
class Series:
    """A sampled, labelled run of one simulated unit, as the edge would have read it."""

    kind: Kind
    seed: int
    metrics: tuple[str, ...]
    """Every point of the profile (measurements, then settings), in profile order."""
    values: Float32Array
    """``(T, len(metrics))`` engineering values after register encoding; bools as 0.0/1.0."""
    t_s: FloatArray
    """``(T,)`` seconds since the first sample (``0, period_s, 2 period_s, ...``)."""
    label: BoolArray
    """``(T,)`` True where the fault is active."""
    fault: str | None
    onset_s: float | None
    """Time of the first faulty sample (``t_s`` scale), None for a normal run."""
    end_s: float | None
    """Time of the first sample after the fault (stuck sensors), None if it lasts to the end."""
    period_s: float
    params: dict[str, float | str] = field(default_factory=dict)
    """Unit, regime and fault parameters, for reports."""

    def __len__(self) -> int:
        return len(self.t_s)

    @property
    def hours(self) -> float:
        """Time the series covers (samples x period), in hours."""
        return len(self.t_s) * self.period_s / 3600.0

    def columns(self, metrics: Sequence[str]) -> Float32Array:
        """``(T, len(metrics))`` values of ``metrics`` in that order (e.g. a model card's inputs)."""
        index = {m: i for i, m in enumerate(self.metrics)}
        missing = [m for m in metrics if m not in index]
        if missing:
            raise KeyError(f"a {self.kind} series has no metrics {missing}; it has {list(self.metrics)}")
        return np.ascontiguousarray(self.values[:, [index[m] for m in metrics]])


@dataclass(frozen=True)
class ScenarioSpec:
    """Everything :func:`generate` needs, as one picklable value (for worker processes)."""

    kind: Kind
    seed: int
    hours: float
    fault: FaultSpec | None = None
    period_s: float = 1.0
    unit: UnitParams | None = None
    warmup_h: float = 0.5


# --- register encoding, vectorised ---


def quantise(point: Point, values: npt.ArrayLike) -> FloatArray:
    """``values`` as the edge decodes them after the simulator encoded them into ``point``'s registers.

    The same arithmetic as ``protocol.codec.encode``/``decode`` with the simulator's saturation
    (``firmware_sim.server``): integers round half to even, signed registers clip at their limits,
    unsigned ones read 0 below zero and wrap above their range (counters), float32 loses precision.
    """
    v = np.asarray(values, dtype=np.float64)
    if point.type == "bool":
        flags: FloatArray = np.not_equal(v, 0.0).astype(np.float64)
        return flags
    if point.type in ("float32", "float64"):
        raw = (v - point.offset) / point.scale
        if point.type == "float32":
            raw = raw.astype(np.float32).astype(np.float64)
    elif point.type in INTEGER_TYPES:
        bits = 16 * point.registers
        raw = np.round((v - point.offset) / point.scale)
        if point.type.startswith("u"):
            raw = np.mod(np.maximum(raw, 0.0), float(1 << bits))
        else:
            raw = np.clip(raw, -float(1 << (bits - 1)), float((1 << (bits - 1)) - 1))
    else:
        raise ValueError(f"{point.name}: cannot quantise a {point.type} point")
    if point.scale == 1 and point.offset == 0:
        return raw
    return np.round(raw * point.scale + point.offset, point.decimals)


_PROFILE_CACHE: dict[Kind, DeviceProfile] = {}


def profile_of(kind: Kind) -> DeviceProfile:
    """The built-in profile a ``kind`` is read with."""
    if kind not in _PROFILE_CACHE:
        _PROFILE_CACHE[kind] = builtin_profile(PROFILES[kind])
    return _PROFILE_CACHE[kind]


def metric_units(kind: Kind) -> dict[str, str]:
    """Unit of every metric of ``kind``, as the profile declares it (what a model card's inputs must say)."""
    return profile_of(kind).units


# --- generation ---


def _build_model(kind: Kind, seed: int, unit: UnitParams, start_hour: float) -> DeviceModel:
    if kind == "boiler":
        return BoilerModel(seed, stream=STREAMS[kind], start_hour=start_hour, flow_setpoint=unit.flow_setpoint,
                           outdoor_mean=unit.outdoor_mean, outdoor_amplitude=unit.outdoor_amplitude)
    if kind == "meter":
        return MeterModel(seed, stream=STREAMS[kind], start_hour=start_hour, start_kwh=unit.start_kwh)
    raise ValueError(f"unknown kind {kind!r}; use one of {list(KINDS)}")


def _fault_switch(model: DeviceModel, fault: FaultSpec, onset_s: float,
                  end_s: float | None) -> Callable[[float], None]:
    """A callable setting the model's fault switches for the step that ends at sample time ``t``."""
    faults = model.faults
    metric = fault.stuck_metric
    if metric is not None:
        if metric not in model.metrics:
            raise ValueError(f"a {model.kind} has no metric {metric!r}")

        def stuck(t: float) -> None:
            active = onset_s <= t and (end_s is None or t < end_s)
            if active and faults.stuck is None:
                model.set_fault("stuck", metric)  # freezes the value the sensor shows now
            elif not active and faults.stuck is not None:
                model.set_fault("stuck", None)

        return stuck
    attr = {"scale_ramp": "scale", "scale_step": "scale", "leak": "leak", "tamper": "tamper"}[fault.name]
    if not hasattr(faults, attr):
        raise ValueError(f"fault {fault.name!r} does not apply to a {model.kind}")
    ramp_s = fault.ramp_h * 3600.0 if fault.name == "scale_ramp" else 0.0
    severity = fault.severity

    def process(t: float) -> None:
        if t < onset_s:
            return
        level = severity if ramp_s <= 0 or t - onset_s >= ramp_s else severity * (t - onset_s) / ramp_s
        setattr(faults, attr, level)

    return process


def _steps_per_sample(period_s: float) -> tuple[float, int]:
    if not (math.isfinite(period_s) and period_s > 0):
        raise ValueError(f"period_s must be > 0, got {period_s}")
    tick = min(TICK_S, period_s)
    k = round(period_s / tick)
    if abs(k * tick - period_s) > 1e-9 * period_s:
        raise ValueError(f"period_s must be a whole number of {TICK_S} s ticks (or shorter than one), got {period_s}")
    return tick, k


def generate(spec: ScenarioSpec) -> Series:
    """Run one scenario. The physics steps every second (the live tick) whatever ``period_s``."""
    kind, seed = spec.kind, spec.seed
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {list(KINDS)}")
    if not (math.isfinite(spec.hours) and spec.hours > 0):
        raise ValueError(f"hours must be > 0, got {spec.hours}")
    if not (math.isfinite(spec.warmup_h) and spec.warmup_h >= 0):
        raise ValueError(f"warmup_h must be >= 0, got {spec.warmup_h}")
    tick, k = _steps_per_sample(spec.period_s)
    period = tick * k
    n = math.floor(spec.hours * 3600.0 / period + 1e-9)
    if n < 1:
        raise ValueError(f"{spec.hours} h hold no sample of {period} s")
    unit = spec.unit if spec.unit is not None else draw_unit(kind, seed)

    # Warm up from a cold start so that the first sample shows a unit in normal operation.
    warmup_steps = round(spec.warmup_h * 3600.0 / tick)
    start_hour = (unit.start_hour - warmup_steps * tick / 3600.0) % 24.0
    model = _build_model(kind, seed, unit, 0.0 if start_hour >= 24.0 else start_hour)
    for _ in range(warmup_steps):
        model.step(tick)

    onset_s = end_s = None
    switch: Callable[[float], None] | None = None
    fault = spec.fault
    if fault is not None:
        if fault.name not in FAULTS[kind]:
            raise ValueError(f"unknown {kind} fault {fault.name!r}; known: {list(FAULTS[kind])}")
        onset_s = round(fault.onset_h * 3600.0 / period) * period
        if fault.duration_h is not None:
            end_s = onset_s + max(1, round(fault.duration_h * 3600.0 / period)) * period
        switch = _fault_switch(model, fault, onset_s, end_s)

    profile = profile_of(kind)
    metrics = tuple(p.name for p in profile.points)
    getter = operator.itemgetter(*metrics)
    rows: list[tuple[float | int | bool, ...]] = [getter(model.reading)]
    step = model.step
    for i in range(1, n):
        base = (i - 1) * period
        for j in range(1, k + 1):
            if switch is not None:
                switch(base + j * tick)  # fault state of the sample this step produces
            step(tick)
        rows.append(getter(model.reading))
    raw = np.array(rows, dtype=np.float64)
    values = np.empty(raw.shape, dtype=np.float32)
    for col, p in enumerate(profile.points):
        values[:, col] = quantise(p, raw[:, col])

    t_s = np.arange(n, dtype=np.float64) * period
    label = np.zeros(n, dtype=np.bool_)
    if onset_s is not None:
        label = (t_s >= onset_s) & (t_s < (end_s if end_s is not None else math.inf))
    wanted = ("start_hour", "outdoor_mean", "outdoor_amplitude", "flow_setpoint") if kind == "boiler" \
        else ("start_hour", "start_kwh")
    params: dict[str, float | str] = {k_: getattr(unit, k_) for k_ in wanted}
    if isinstance(model, BoilerModel):
        params.update(building_ua=round(model.building_ua, 4), fill_pressure=round(model.fill_pressure, 4))
    elif isinstance(model, MeterModel):
        params.update(base_kw=round(model.base_kw, 3), day_kw=round(model.day_kw, 3),
                      evening_kw=round(model.evening_kw, 3))
    if fault is not None:
        params.update({f"fault_{k_}": v for k_, v in asdict(fault).items() if v is not None and k_ != "name"})
    return Series(kind=kind, seed=seed, metrics=metrics, values=values, t_s=t_s, label=label,
                  fault=fault.name if fault is not None else None, onset_s=onset_s, end_s=end_s,
                  period_s=period, params=params)


def normal_series(kind: Kind, seed: int, hours: float, period_s: float = 1.0, *,
                  start_hour: float | None = None, unit: UnitParams | None = None,
                  warmup_h: float = 0.5) -> Series:
    """A fault-free run of unit ``seed`` (regime from :func:`draw_unit` unless ``unit`` is given)."""
    unit = _with_start(kind, seed, unit, start_hour)
    return generate(ScenarioSpec(kind, seed, hours, None, period_s, unit, warmup_h))


def fault_series(kind: Kind, fault: str, seed: int, hours: float, onset_h: float | None = None, *,
                 severity: float | None = None, ramp_h: float | None = None, duration_h: float | None = None,
                 period_s: float = 1.0, start_hour: float | None = None, unit: UnitParams | None = None,
                 warmup_h: float = 0.5) -> Series:
    """Unit ``seed`` with fault ``fault`` (one of :data:`FAULTS`); unset parameters are drawn from the seed.

    Identical to ``normal_series(kind, seed, hours, ...)`` before the onset.
    """
    drawn = draw_fault(kind, fault, seed, hours)
    spec = FaultSpec(
        fault,
        onset_h=drawn.onset_h if onset_h is None else onset_h,
        severity=drawn.severity if severity is None else severity,
        ramp_h=drawn.ramp_h if ramp_h is None else ramp_h,
        duration_h=drawn.duration_h if duration_h is None else duration_h,
    )
    unit = _with_start(kind, seed, unit, start_hour)
    return generate(ScenarioSpec(kind, seed, hours, spec, period_s, unit, warmup_h))


def _with_start(kind: Kind, seed: int, unit: UnitParams | None, start_hour: float | None) -> UnitParams:
    unit = unit if unit is not None else draw_unit(kind, seed)
    if start_hour is None:
        return unit
    if not (math.isfinite(start_hour) and 0.0 <= start_hour < 24.0):
        raise ValueError(f"start_hour must be in [0, 24), got {start_hour}")
    return UnitParams(**{**asdict(unit), "start_hour": start_hour})


def generate_many(specs: Iterable[ScenarioSpec], workers: int = 1) -> Iterator[Series]:
    """:func:`generate` over ``specs``, in order; ``workers`` > 1 runs them in that many processes."""
    specs = list(specs)
    if workers <= 1 or len(specs) <= 1:
        yield from map(generate, specs)
        return
    # spawn, not fork: the caller may hold an onnxruntime session and its threads.
    context = multiprocessing.get_context("spawn")
    workers = min(workers, len(specs))
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        # A bounded number in flight, so that a slow consumer does not pile up finished runs in memory.
        pending: deque[Future[Series]] = deque()
        todo = iter(specs)
        for spec in itertools.islice(todo, 2 * workers):
            pending.append(pool.submit(generate, spec))
        while pending:
            series = pending.popleft().result()
            for spec in itertools.islice(todo, 1):
                pending.append(pool.submit(generate, spec))
            yield series


def sliding_windows(values: npt.NDArray[np.float32], window: int) -> npt.NDArray[np.float32]:
    """A read-only ``(T - window + 1, window, F)`` view of ``(T, F)`` values: row ``i`` ends at sample
    ``i + window - 1``, oldest first (the model contract's ``window`` layout). No copy."""
    if values.ndim != 2:
        raise ValueError(f"values must be (T, F), got shape {values.shape}")
    if not 1 <= window <= values.shape[0]:
        raise ValueError(f"window {window} does not fit {values.shape[0]} samples")
    view = np.lib.stride_tricks.sliding_window_view(values, window, axis=0)  # (N, F, W)
    return view.transpose(0, 2, 1)
