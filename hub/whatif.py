"""What-if simulator: run the simulated boiler's physics with chosen inputs and faults, score the
trajectory with the profile's anomaly model and the hub's alert rules, and say when alarms fire.

One run (``docs/whatif.md``):

1. A :class:`firmware_sim.boiler.BoilerModel` (the same physics the Modbus simulator serves) warms
   up from a cold start for :data:`WARMUP_S` (unreported: it settles the start-up transient and
   gives the model its first window of history), then steps every :data:`STEP_S` for the horizon.
   No sockets, no wall clock: the trajectory depends only on the inputs and the seed.
2. Readings are quantised as the gateway decodes them from the registers (``int16`` at 0.1 degC,
   ``uint16`` pressure at 1 mbar ...), so the model and the rules see what they see in the field.
3. The anomaly model (ONNX, :mod:`protocol.anomaly` contract) scores sliding windows of the
   card's inputs every ``score_every_s``; the alarm follows the edge's hysteresis (on when
   ``score > threshold``, off when ``score <= clear_at``).
4. The hub's threshold and rate rules that apply to the profile are evaluated on every sample,
   with the alert engine's semantics (``hub.alerts.engine``); the boiler's own lock-outs
   (``fault_code``) are reported too.

:func:`simulate` is CPU-bound and blocking (about 1-2 s for 48 h); :func:`run` picks the model
from the registry and runs it in a thread.

A run may be about one boiler of the fleet (:func:`fleet_boiler`): its latest setpoint and outdoor
temperature are then the scenario's defaults, and the model is the one its gateway is assigned
(:func:`hub.rollout.effective_assignments`: the gateway's own assignment, else the fleet-wide one).
"""

from __future__ import annotations

import asyncio
import math
import operator
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from firmware_sim.boiler import FAULT_CODES, BoilerModel
from hub import queries, rollout
from hub.alerts.rules import RateRule, Rule, ThresholdRule
from hub.db import Database
from hub.errors import RequestRefused
from protocol.anomaly import INPUT_NAME, OUTPUT_NAME, ModelCard, import_onnxruntime
from protocol.profile import DeviceProfile, Point, builtin_profile

if TYPE_CHECKING:
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float64]
    BoolArray = npt.NDArray[np.bool_]

PROFILE = "sim-boiler"
"""The one profile the what-if simulator models (the simulated boiler's register map)."""
KIND = "boiler"
STEP_S = 1.0
"""Physics step and sample period: the simulator's live tick and the edge's poll rate."""
WARMUP_S = 1800.0
"""Unreported run-in from a cold start before ``t = 0``."""
MAX_HISTORY_S = 7200.0
"""Longest run-in, for models with long windows; windows needing more history stay unscored."""
MAX_HORIZON_H = 48.0
MAX_POINTS = 500
"""Points per returned series at most (bucket means; bucket maxima for the anomaly score)."""
MAX_WINDOWS = 6000
"""Anomaly windows scored per run at most: ``score_every_s`` grows with the horizon to stay below."""
MIN_SCORE_EVERY_S = 10.0
_BATCH_WINDOWS = 256

CHARTED: tuple[str, ...] = ("flow_temp", "return_temp", "flue_temp", "pressure", "modulation", "water_flow",
                            "burner_on", "fault_code", "outdoor_temp")
"""Metrics returned as series (counters ``operating_hours``/``burner_starts`` only in the summary)."""
_EXTRA = ("heat_demand", "heat_load")
"""Physical state returned beside the readings (kW; not a register of the device)."""


class WhatIfRefused(RequestRefused):
    """A what-if request that cannot be run (``status``, ``message``: see :class:`RequestRefused`)."""


@dataclass(frozen=True)
class Scenario:
    """The inputs of one run, in the simulator's units (validated by the API)."""

    horizon_h: float = 24.0
    seed: int = 1
    start_hour: float = 0.0
    """Time of day at ``t = 0`` (the building's demand follows the time of day)."""
    flow_setpoint_c: float = 70.0
    outdoor_temp_c: float = 5.0
    """Daily mean outdoor temperature."""
    outdoor_swing_c: float = 5.0
    """Amplitude of the daily outdoor swing (coldest ~03:00, warmest ~15:00)."""
    heat_demand_kw: float | None = None
    """Constant demand of the building; ``None``: the weather-compensated daily schedule."""
    scale: float = 0.0
    """Scale fouling of the heat exchanger, 0..1 (reached ``scale_ramp_h`` after the onset)."""
    scale_ramp_h: float = 0.0
    leak_bar_per_h: float = 0.0
    fault_onset_h: float = 0.0
    """When scale and leak start (hours after ``t = 0``)."""


@dataclass(frozen=True)
class LoadedModel:
    """A model file from the registry, with where it came from."""

    name: str
    version: int
    sha256: str
    card: ModelCard
    data: bytes
    source: str
    """``assigned`` (the fleet-wide assignment of the profile), ``chosen`` (named in the request) or
    ``gateway`` (what the chosen boiler's gateway is assigned)."""
    gateway: str | None = None
    """With ``source`` ``gateway``: that gateway's id ``site.gateway``."""
    scope: str | None = None
    """The assignment it came from: ``fleet`` or ``gateway`` (the gateway's own); ``None`` when chosen."""

    def describe(self) -> dict[str, Any]:
        """Where the model came from, for the answer."""
        return {"source": self.source, "gateway": self.gateway, "scope": self.scope}


DEVICE_DEFAULTS: dict[str, str] = {"flow_setpoint_c": "flow_setpoint", "outdoor_temp_c": "outdoor_temp"}
"""Scenario field -> the boiler's metric whose latest reading is the field's default."""


@dataclass(frozen=True)
class FleetBoiler:
    """A boiler of the fleet as a what-if starting point."""

    device: queries.DeviceRow
    defaults: dict[str, float]
    """Scenario fields from the device's latest readings (:data:`DEVICE_DEFAULTS`)."""
    missing: dict[str, str]
    """Scenario fields of :data:`DEVICE_DEFAULTS` it gives no default for, with the reason."""

    @property
    def gateway(self) -> str:
        """Its gateway's id ``site.gateway``."""
        return f"{self.device.site}.{self.device.gateway}"


class _WhatIfBoiler(BoilerModel):
    """The simulator's boiler with an optional constant heat demand instead of the daily schedule."""

    def __init__(self, demand_kw: float | None, **kwargs: Any) -> None:
        self._fixed_demand = demand_kw  # set first: BoilerModel.__init__ already asks for the demand
        super().__init__(**kwargs)

    def _demand(self, hour: float, outdoor: float) -> float:
        if self._fixed_demand is None:
            return super()._demand(hour, outdoor)
        return self._fixed_demand


_PROFILE_CACHE: list[DeviceProfile] = []


def profile() -> DeviceProfile:
    """The ``sim-boiler`` profile (register map, units, the setpoint's safe range)."""
    if not _PROFILE_CACHE:
        _PROFILE_CACHE.append(builtin_profile(PROFILE))
    return _PROFILE_CACHE[0]


def quantise(point: Point, values: FloatArray) -> FloatArray:
    """``values`` as the gateway decodes them after the simulator encoded them into ``point``:
    booleans 0/1, integers rounded to the scale (unsigned ones read 0 below zero, signed ones clip)."""
    if point.type == "bool":
        flags: FloatArray = np.not_equal(values, 0.0).astype(np.float64)
        return flags
    raw = np.round((values - point.offset) / point.scale)
    if point.type.startswith("u"):
        raw = np.maximum(raw, 0.0)
    elif point.type.startswith("int"):
        bits = 16 * point.registers
        raw = np.clip(raw, -float(1 << (bits - 1)), float((1 << (bits - 1)) - 1))
    else:  # float registers: keep the value (float32 precision is far below the sensor noise)
        raw = (values - point.offset) / point.scale
    out: FloatArray = np.round(raw * point.scale + point.offset, point.decimals)
    return out


def hysteresis(rise: BoolArray, fall: BoolArray) -> BoolArray:
    """State per sample that turns on where ``rise``, off where ``fall`` (and not ``rise``), and
    otherwise holds; off before the first event."""
    event = np.where(rise, 1, np.where(fall, 0, -1))
    idx = np.where(event >= 0, np.arange(len(event)), -1)
    last = np.maximum.accumulate(idx) if len(idx) else idx
    state: BoolArray = np.where(last >= 0, event[np.maximum(last, 0)] == 1, False)
    return state


def rising_edges(state: BoolArray) -> Any:
    """Indices where ``state`` turns on (index 0 if it starts on)."""
    s = state.astype(np.int8)
    return np.flatnonzero(np.diff(s, prepend=0) == 1)


def batch_windows(values: npt.NDArray[np.float32], window: int, ends: Any) -> Any:
    """Windows ``[len(ends), window, F]`` (oldest sample first) of ``(T, F)`` values ending at rows
    ``ends`` (each ``>= window - 1``): the model contract's ``window`` layout, one contiguous copy."""
    view = np.lib.stride_tricks.sliding_window_view(values, window, axis=0)  # (T - w + 1, F, w)
    return np.ascontiguousarray(view[np.asarray(ends) - (window - 1)].transpose(0, 2, 1), dtype=np.float32)


class _Sessions:
    """A few onnxruntime sessions by sha256 (a run reuses the previous run's session)."""

    def __init__(self, entries: int = 4) -> None:
        self._entries = entries
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Any] = OrderedDict()

    def get(self, sha256: str, data: bytes) -> Any:
        with self._lock:
            session = self._cache.get(sha256)
            if session is not None:
                self._cache.move_to_end(sha256)
                return session
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one core per run: the hub serves ingest beside it
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
        with self._lock:
            self._cache[sha256] = session
            while len(self._cache) > self._entries:
                self._cache.popitem(last=False)
        return session


SESSIONS = _Sessions()


def _model_problem(card: ModelCard, units: dict[str, str]) -> str | None:
    """Why the simulator cannot feed this model, or None."""
    if card.profile != PROFILE:
        return f"model is made for profile {card.profile!r}, not {PROFILE!r}"
    for i in card.inputs:
        if i.metric not in units:
            return f"model input {i.metric!r} is not a metric of {PROFILE}"
        if i.unit != units[i.metric]:
            return f"model input {i.metric!r} in {i.unit!r}, but {PROFILE} reads it in {units[i.metric]!r}"
    k = card.sample_period_s / STEP_S
    if k < 1 or abs(k - round(k)) > 1e-9 * k:
        return f"model sample period {card.sample_period_s:g} s is not a whole number of {STEP_S:g} s steps"
    return None


def _buckets(n: int) -> Any:
    """Bucket edges splitting ``n`` samples into at most :data:`MAX_POINTS` nearly equal runs."""
    b = min(MAX_POINTS, n)
    return np.linspace(0, n, b + 1).round().astype(np.int64)[:-1]


def _rounded(values: Any, digits: int = 4) -> list[float | None]:
    return [None if not math.isfinite(v) else round(v, digits) for v in np.asarray(values, dtype=np.float64).tolist()]


def _rule_applies(rule: Rule, where: tuple[str, str, str]) -> bool:
    # The generic boiler has no site, gateway or device name (where = ("", "", "")): rules narrowed
    # to one do not apply. A boiler of the fleet gets the rules narrowed to its site, gateway, name.
    return isinstance(rule, ThresholdRule | RateRule) and rule.matches(*where, KIND, PROFILE)


def _rule_states(rule: ThresholdRule | RateRule, values: FloatArray, t0: int) -> tuple[BoolArray, FloatArray]:
    """(abnormal state, the value the rule judges) per sample from row ``t0`` on, as the alert
    engine keeps them for readings arriving every :data:`STEP_S` (history before ``t0`` is used as
    look-back for rates, the state starts normal at ``t0``)."""
    if isinstance(rule, ThresholdRule):
        v = values[t0:]
        breached = np.zeros(len(v), dtype=np.bool_)
        normal = np.ones(len(v), dtype=np.bool_)
        if rule.below is not None:
            breached |= v < rule.below
            normal &= v >= rule.below + rule.clear_margin
        if rule.above is not None:
            breached |= v > rule.above
            normal &= v <= rule.above - rule.clear_margin
        return hysteresis(breached, normal & ~breached), v
    # Rate: slope between the oldest reading inside the window and this one, once the readings span
    # at least half the window (hub.alerts.engine.AlertEngine._rate).
    i = np.arange(t0, len(values))
    lag = math.floor(rule.window_s / STEP_S + 1e-9)
    j = np.maximum(i - lag, 0)
    span_s = (i - j) * STEP_S
    valid = span_s >= rule.window_s / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        per_min = np.where(valid, (values[i] - values[j]) / (span_s / 60.0), np.nan)
    breached = valid & ((per_min > rule.max_rise_per_min) if rule.max_rise_per_min > 0
                        else (per_min < rule.max_rise_per_min))
    return hysteresis(breached, valid & ~breached), per_min


def simulate(scn: Scenario, rules: Sequence[Rule] = (), model: LoadedModel | None = None,
             model_problem: str | None = None, where: tuple[str, str, str] = ("", "", "")) -> dict[str, Any]:
    """Run one scenario (blocking, CPU-bound) and return the result document (``docs/whatif.md``);
    ``where`` (site, gateway, device name) selects the rules narrowed to a boiler of the fleet."""
    if not (0 < scn.horizon_h <= MAX_HORIZON_H):
        raise ValueError(f"horizon_h must be in (0, {MAX_HORIZON_H:g}]")
    prof = profile()
    units = prof.units
    problem = model_problem
    card = model.card if model is not None else None
    if card is not None and problem is None:
        problem = _model_problem(card, units)
    use_model = card is not None and problem is None
    k = round(card.sample_period_s / STEP_S) if use_model and card is not None else 1
    history_s = WARMUP_S
    if use_model and card is not None:
        history_s = min(MAX_HISTORY_S, max(WARMUP_S, (card.window - 1) * k * STEP_S))
    n_warm = int(history_s / STEP_S)
    n_steps = round(scn.horizon_h * 3600.0 / STEP_S)

    boiler = _WhatIfBoiler(
        scn.heat_demand_kw, seed=scn.seed, start_hour=(scn.start_hour - history_s / 3600.0) % 24.0,
        flow_setpoint=scn.flow_setpoint_c, outdoor_mean=scn.outdoor_temp_c, outdoor_amplitude=scn.outdoor_swing_c)
    metrics = BoilerModel.metrics
    getter = operator.itemgetter(*metrics)
    rows = np.empty((n_warm + n_steps + 1, len(metrics)), dtype=np.float64)
    extra = np.empty((n_warm + n_steps + 1, len(_EXTRA)), dtype=np.float64)
    state = boiler.state
    faults = boiler.faults
    onset_s = scn.fault_onset_h * 3600.0
    ramp_s = scn.scale_ramp_h * 3600.0
    faulty = scn.scale > 0 or scn.leak_bar_per_h > 0
    step = boiler.step
    rows[0] = getter(boiler.reading)
    extra[0] = (state.heat_demand, state.heat_load)
    for n in range(1, n_warm + n_steps + 1):
        t = (n - n_warm) * STEP_S  # time at the end of this step
        if faulty and t > onset_s:
            # The step ending at t runs with the fault state of t (as models.simdata switches them).
            faults.leak = scn.leak_bar_per_h
            faults.scale = scn.scale if ramp_s <= 0 else scn.scale * min(1.0, (t - onset_s) / ramp_s)
        step(STEP_S)
        rows[n] = getter(boiler.reading)
        extra[n] = (state.heat_demand, state.heat_load)

    values = {m: quantise(prof.point(m), rows[:, c]) for c, m in enumerate(metrics)}
    t_all = (np.arange(len(rows)) - n_warm) * STEP_S
    n_out = n_steps + 1
    edges = _buckets(n_out)
    counts = np.diff(np.append(edges, n_out))
    t_series = np.add.reduceat(t_all[n_warm:], edges) / counts
    series: dict[str, Any] = {}
    for m in CHARTED:
        series[m] = {"unit": units[m], "values": _rounded(np.add.reduceat(values[m][n_warm:], edges) / counts)}
    for c, name in enumerate(_EXTRA):
        series[name] = {"unit": "kW", "values": _rounded(np.add.reduceat(extra[n_warm:, c], edges) / counts)}

    alarms: list[dict[str, Any]] = []

    def alarm(t_s: float, source: str, name: str, severity: str, metric: str | None, value: float | None,
              message: str, episodes: int) -> None:
        alarms.append({"t_s": round(t_s, 3), "t_h": round(t_s / 3600.0, 4), "source": source, "name": name,
                       "severity": severity, "metric": metric,
                       "value": None if value is None or not math.isfinite(value) else round(value, 4),
                       "message": message, "episodes": episodes})

    evaluated: list[dict[str, Any]] = []
    for rule in rules:
        if not _rule_applies(rule, where):
            continue
        assert isinstance(rule, ThresholdRule | RateRule)
        if rule.metric not in values:
            continue
        states, judged = _rule_states(rule, values[rule.metric], n_warm)
        starts = rising_edges(states)
        evaluated.append({"name": rule.name, "type": rule.type, "metric": rule.metric,
                          "severity": rule.severity.value, "fired": bool(len(starts))})
        if len(starts):
            first = int(starts[0])
            value = float(judged[first])
            unit = units[rule.metric]
            if isinstance(rule, ThresholdRule):
                message = rule.describe(value, unit)
            else:
                sign = "rising" if rule.max_rise_per_min > 0 else "falling"
                message = (f"{rule.metric} {sign} {abs(value):.3g} {unit}/min over {rule.window_s:g} s "
                           f"(limit {abs(rule.max_rise_per_min):g})")
            alarm(first * STEP_S, "rule", rule.name, rule.severity.value, rule.metric, value, message, len(starts))

    codes = values["fault_code"][n_warm:]
    for code in sorted({int(c) for c in np.unique(codes)} - {0}):
        on = codes == code
        starts = rising_edges(on)
        alarm(float(starts[0]) * STEP_S, "device", f"fault-code-{code}", "critical", "fault_code", float(code),
              f"boiler lock-out: {FAULT_CODES.get(code, f'fault code {code}')}", len(starts))

    anomaly: dict[str, Any] = {"status": "no_model", "detail": "no anomaly model is assigned to profile "
                               f"{PROFILE!r}", "model": None}
    if model is not None and card is not None:
        anomaly.update(model={"name": model.name, "version": model.version, "sha256": model.sha256,
                              **model.describe(), "inputs": list(card.input_metrics), "window": card.window,
                              "sample_period_s": card.sample_period_s},
                       threshold=card.threshold, clear_threshold=card.clear_at)
        if not use_model:
            anomaly.update(status="unusable", detail=problem)
        else:
            anomaly.update(_score(model, card, values, n_warm, n_steps, k))
            if anomaly["first_alarm_s"] is not None:
                alarm(anomaly["first_alarm_s"], "model", f"{model.name} v{model.version}", "warning", None,
                      anomaly["first_alarm_score"], f"anomaly score {anomaly['first_alarm_score']:.3g} above "
                      f"threshold {card.threshold:g}", anomaly["episodes"])
    alarms.sort(key=lambda a: (a["t_s"], a["source"], a["name"]))

    trajectory = slice(n_warm, None)
    summary = {
        "burner_starts": int(values["burner_starts"][-1] - values["burner_starts"][n_warm]),
        "burner_hours": round(float(values["operating_hours"][-1] - values["operating_hours"][n_warm]), 3),
        "min_pressure_bar": round(float(values["pressure"][trajectory].min()), 3),
        "max_flue_temp_c": round(float(values["flue_temp"][trajectory].max()), 1),
        "mean_heat_demand_kw": round(float(extra[trajectory, 0].mean()), 3),
        "mean_heat_load_kw": round(float(extra[trajectory, 1].mean()), 3),
    }
    return {
        "profile": PROFILE,
        "scenario": {f: getattr(scn, f) for f in Scenario.__dataclass_fields__},
        "step_s": STEP_S,
        "samples": n_out,
        "unit": {"building_ua_kw_per_k": round(boiler.building_ua, 4),
                 "fill_pressure_bar": round(boiler.fill_pressure, 4)},
        "series": {"t_s": _rounded(t_series, 1), "metrics": series},
        "anomaly": anomaly,
        "rules": evaluated,
        "alarms": alarms,
        "summary": summary,
    }


def _score(model: LoadedModel, card: ModelCard, values: dict[str, FloatArray], n_warm: int, n_steps: int,
           k: int) -> dict[str, Any]:
    """Anomaly scores every ``score_every_s`` over the trajectory, their alarm state and first alarm."""
    session = SESSIONS.get(model.sha256, model.data)
    cols = np.stack([values[m] for m in card.input_metrics], axis=1).astype(np.float32)
    # Samples every k steps, one of them at t = 0 (row n_warm).
    sub_idx = np.arange(n_warm % k, len(cols), k)
    samples = cols[sub_idx]
    w = card.window
    period_s = k * STEP_S
    horizon_s = n_steps * STEP_S
    every = max(MIN_SCORE_EVERY_S, period_s, horizon_s / MAX_WINDOWS)
    stride = max(1, math.ceil(every / period_s - 1e-9))
    first = (n_warm - sub_idx[0]) // k  # sub-sample at t = 0
    ends = np.arange(first, len(samples), stride)
    ends = ends[ends >= w - 1]  # not enough history yet for the first ones (very long windows)
    scores = np.empty(len(ends), dtype=np.float64)
    for start in range(0, len(ends), _BATCH_WINDOWS):
        chunk = batch_windows(samples, w, ends[start:start + _BATCH_WINDOWS])
        (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: chunk})
        out = np.asarray(out, dtype=np.float64).reshape(-1)
        if out.shape != (chunk.shape[0],):
            raise WhatIfRefused(422, f"model returned {OUTPUT_NAME} of shape {out.shape} for {chunk.shape[0]} "
                                     "windows")
        scores[start:start + len(out)] = out
    t_s = (sub_idx[ends] - n_warm) * STEP_S
    finite = np.isfinite(scores)
    with np.errstate(invalid="ignore"):
        state = hysteresis(finite & (scores > card.threshold), finite & (scores <= card.clear_at))
    starts = rising_edges(state)
    out_scores: list[float | None] = []
    out_t: list[float | None] = []
    if len(scores):
        edges = _buckets(len(scores))
        counts = np.diff(np.append(edges, len(scores)))
        # The maximum per bucket: a short excursion above the threshold stays visible on the chart.
        out_scores = _rounded(np.maximum.reduceat(np.where(finite, scores, -np.inf), edges))
        out_t = _rounded(np.add.reduceat(t_s, edges) / counts, 1)
    first_s = float(t_s[starts[0]]) if len(starts) else None
    return {"status": "scored", "detail": f"{len(scores)} windows scored",
            "score_every_s": stride * period_s,
            "series": {"t_s": out_t, "score": out_scores, "reduce": "max"},
            "max_score": round(float(np.nanmax(scores)), 4) if finite.any() else None,
            "alarm_fraction": round(float(state.mean()), 4) if len(state) else 0.0,
            "first_alarm_s": first_s,
            "first_alarm_score": round(float(scores[starts[0]]), 4) if len(starts) else None,
            "episodes": len(starts)}


async def load_model(db: Database, name: str | None = None, version: int | None = None,
                     boiler: FleetBoiler | None = None) -> LoadedModel | None:
    """The model named (``name``, ``version``), else the one ``boiler``'s gateway is assigned (its
    own assignment, else the fleet-wide one), else the one assigned fleet-wide to the profile;
    ``None`` when nothing is assigned. :class:`WhatIfRefused` 404 for an unknown named version."""
    source, gateway, scope = "chosen", None, None
    if name is None or version is None:
        if boiler is not None:
            rows = await rollout.effective_assignments(db, boiler.device.site, boiler.device.gateway)
            source, gateway = "gateway", boiler.gateway
        else:
            rows = await rollout.list_assignments(db, profile=PROFILE)
            rows = [a for a in rows if a.gateway is None]
            source = "assigned"
        assigned = [a for a in rows if a.profile == PROFILE]
        if not assigned:
            return None
        name, version = assigned[0].name, assigned[0].version
        scope = "fleet" if assigned[0].gateway is None else "gateway"
    row = await rollout.get_version(db, name, version)
    stored = await rollout.version_file(db, name, version)
    if row is None or stored is None:
        raise WhatIfRefused(404, f"unknown model {name!r} v{version}")
    data, sha = stored
    return LoadedModel(name=name, version=version, sha256=sha, card=ModelCard.model_validate(row.card), data=data,
                       source=source, gateway=gateway, scope=scope)


def _boiler(device: queries.DeviceRow, latest: Sequence[queries.ReadingRow]) -> FleetBoiler:
    units = profile().units
    by_metric = {r.metric: r for r in latest}
    defaults: dict[str, float] = {}
    missing: dict[str, str] = {}
    for field, metric in DEVICE_DEFAULTS.items():
        reading = by_metric.get(metric)
        value = reading.typed_value if reading is not None else None
        if reading is None:
            missing[field] = f"no {metric} reading"
        elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            missing[field] = f"latest {metric} reading has no number (quality {reading.quality!r})"
        elif reading.unit != units[metric]:
            missing[field] = f"latest {metric} reading is in {reading.unit!r}, not {units[metric]!r}"
        else:
            defaults[field] = float(value)
    return FleetBoiler(device, defaults, missing)


async def fleet_boiler(db: Database, uid: str) -> FleetBoiler:
    """The boiler ``site.gateway.device`` with its latest setpoint and outdoor temperature;
    :class:`WhatIfRefused` 404 for an unknown device, 422 for one that is not a :data:`PROFILE` boiler."""
    device = await queries.find_device(db, uid)
    if device is None:
        raise WhatIfRefused(404, f"unknown device {uid!r}")
    if device.profile != PROFILE:
        raise WhatIfRefused(422, f"device {uid!r} is a {device.kind or 'device'} of profile "
                                 f"{device.profile or 'unknown'!r}; the what-if simulates only {PROFILE!r} boilers")
    return _boiler(device, await queries.latest(db, device.pk))


async def fleet_boilers(db: Database) -> list[FleetBoiler]:
    """Every :data:`PROFILE` boiler of the fleet (ordered by site, gateway, name) with its latest
    setpoint and outdoor temperature."""
    devices = [d for d in await queries.list_devices(db) if d.profile == PROFILE]
    return [_boiler(d, await queries.latest(db, d.pk)) for d in devices]


class RunSlots:
    """At most ``limit`` runs at once in this process; the rest are refused, not queued (a queue of
    CPU-bound runs would only make every caller wait longer)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self.running = 0

    def try_acquire(self) -> bool:
        """Take a slot if one is free."""
        with self._lock:
            if self.running >= self.limit:
                return False
            self.running += 1
            return True

    def release(self) -> None:
        """Give a slot back."""
        with self._lock:
            self.running -= 1


async def run(db: Database, scn: Scenario, rules: Sequence[Rule], *, model_name: str | None = None,
              model_version: int | None = None, use_model: bool = True, boiler: FleetBoiler | None = None,
              from_device: dict[str, float] | None = None,
              not_from_device: dict[str, str] | None = None) -> dict[str, Any]:
    """Pick the model from the registry and simulate in a worker thread. With ``boiler``, the
    answer names the device, the defaults taken from it (``from_device``) and why the other
    defaults were not (``not_from_device``)."""
    model = await load_model(db, model_name, model_version, boiler) if use_model else None
    where = (boiler.device.site, boiler.device.gateway, boiler.device.name) if boiler is not None else ("", "", "")
    result = await asyncio.to_thread(simulate, scn, list(rules), model, None, where)
    if not use_model:
        result["anomaly"]["detail"] = "anomaly model not requested"
        result["anomaly"]["status"] = "not_requested"
    elif model is None and boiler is not None:
        result["anomaly"]["detail"] = (f"no anomaly model is assigned to profile {PROFILE!r}, neither on gateway "
                                       f"{boiler.gateway} nor fleet-wide")
    result["device"] = boiler.device.uid if boiler is not None else None
    result["from_device"] = dict(from_device or {})
    result["not_from_device"] = dict(not_from_device or {})
    return result
