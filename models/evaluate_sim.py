"""Per-fault evaluation of any contract-conforming anomaly model on held-out simulator scenarios.

``python -m models.evaluate_sim --model PATH.onnx [--days N] [--seed S] [--quick]``

The model's card (ONNX metadata ``twin.card``) says which profile it scores, which metrics in which
order, its window, sample period and threshold. For that device kind the harness generates, with
:mod:`models.simdata`, ``--days`` device-days of normal runs plus ``--faults-per-kind`` runs of every
fault scenario, all from evaluation seeds (``>= simdata.EVAL_SEED_BASE``, never used for training):

* normal run *i*: seed ``S + i``; run *j* of the *k*-th fault in ``simdata.FAULTS[kind]``: seed
  ``S + 1000 (k + 1) + j`` (``S`` = ``--seed``, default 10_000).

Every sample from the ``window``-th on is scored (sliding windows, stride 1, many windows per
``run`` call) and turned into an alarm state the way the edge does it: an alarm rises when
``score > threshold`` and, once raised, clears only when ``score <= card.clear_at`` (hysteresis).
The first ``window - 1`` samples of a run have no score and no alarm.

Reported per fault: the detection rate (fraction of runs with an alarm while the fault is active,
i.e. between its onset and its end), and the detection delay from onset to the first alarmed sample
(median and 90th percentile in minutes, over the detected runs). On normal runs: false alarms per
device-day (alarm episodes, counted by their rising edges, per 24 h of scored normal data) and the
fraction of scored normal samples that are alarmed. The last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from models.simdata import (
    EVAL_SEED_BASE,
    FAULTS,
    KINDS,
    PROFILES,
    BoolArray,
    FloatArray,
    Kind,
    ScenarioSpec,
    Series,
    draw_fault,
    generate_many,
    metric_units,
    sliding_windows,
)
from protocol.anomaly import INPUT_NAME, OUTPUT_NAME, ModelCard, card_from_metadata

SEED_BLOCK = 1000
"""Seeds per scenario group (normal runs, then each fault kind): at most this many runs per group."""
BATCH_ELEMENTS = 1 << 22
"""Window values per ``run`` call (16 MiB of float32), whatever the window and feature count."""


@dataclass(frozen=True)
class Plan:
    """Scenario sizes of one evaluation."""

    days: float = 7.0
    """Device-days of normal data (runs of ``hours`` each)."""
    hours: float = 24.0
    """Length of every run."""
    faults_per_kind: int = 8
    """Runs per fault scenario."""

    @classmethod
    def quick(cls) -> Plan:
        """A smoke-test sized evaluation (a few seconds for a boiler model)."""
        return cls(days=1.0, hours=6.0, faults_per_kind=2)


# --- model loading and scoring ---


def open_session(model: str | Path | bytes) -> ort.InferenceSession:
    """An onnxruntime CPU session with one intra-op thread (as the edge runs it)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def session_card(session: ort.InferenceSession, source: str = "model") -> ModelCard:
    """The card embedded in a loaded model; ``protocol.anomaly.ModelFileError`` if absent or invalid."""
    metadata: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)
    return card_from_metadata(metadata, source)


def card_kind(card: ModelCard) -> Kind:
    """The simulator kind whose profile the card names; ``ValueError`` if none, or if inputs do not match it."""
    kinds = {PROFILES[k]: k for k in KINDS}
    if card.profile not in kinds:
        raise ValueError(f"model profile {card.profile!r} is not a simulator profile ({sorted(kinds)})")
    kind = kinds[card.profile]
    units = metric_units(kind)
    for i in card.inputs:
        if i.metric not in units:
            raise ValueError(f"model input {i.metric!r} is not a metric of {card.profile}")
        if i.unit != units[i.metric]:
            raise ValueError(f"model input {i.metric!r} in {i.unit!r}, but {card.profile} reads it in "
                             f"{units[i.metric]!r}")
    return kind


def score_series(session: ort.InferenceSession, card: ModelCard, series: Series,
                 batch_elements: int = BATCH_ELEMENTS) -> FloatArray:
    """``(T,)`` score of every sample (window ending there); NaN for the first ``window - 1`` samples."""
    values = series.columns(card.input_metrics)
    out = np.full(len(series), np.nan, dtype=np.float64)
    w = card.window
    if len(series) < w:
        return out
    windows = sliding_windows(values, w)
    batch = max(1, batch_elements // (w * values.shape[1]))
    for start in range(0, windows.shape[0], batch):
        chunk = np.ascontiguousarray(windows[start : start + batch], dtype=np.float32)
        (scores,) = session.run([OUTPUT_NAME], {INPUT_NAME: chunk})
        scores = np.asarray(scores)
        if scores.shape != (chunk.shape[0],):
            raise ValueError(f"model returned {OUTPUT_NAME} of shape {scores.shape} for {chunk.shape[0]} windows")
        out[w - 1 + start : w - 1 + start + chunk.shape[0]] = scores
    return out


def alarm_states(scores: FloatArray, threshold: float, clear_at: float | None = None) -> BoolArray:
    """Alarm state per sample as the edge keeps it: rises when ``score > threshold``, clears when
    ``score <= clear_at`` (default ``threshold``), else holds. NaN (no score yet) holds; starts off."""
    s = np.asarray(scores, dtype=np.float64)
    clear = threshold if clear_at is None else clear_at
    if clear > threshold:
        # An odd card, but the edge's rule (edge.inference.scorer) still applies, step by step.
        state = np.zeros(len(s), dtype=np.bool_)
        active = False
        for i, x in enumerate(s.tolist()):
            if not math.isnan(x):
                active = x > clear if active else x > threshold
            state[i] = active
        return state
    with np.errstate(invalid="ignore"):
        rise = s > threshold
        fall = ~rise & (s <= clear)
    event = np.where(rise, 1, np.where(fall, 0, -1))
    last = np.maximum.accumulate(np.where(event >= 0, np.arange(len(s)), -1)) if len(s) else np.zeros(0, int)
    return np.where(last >= 0, event[np.maximum(last, 0)] == 1, False)


def rising_edges(alarm: BoolArray) -> int:
    """Alarm episodes: samples where the alarm is on and was off before (on at the first sample counts)."""
    a = np.asarray(alarm, dtype=bool)
    if not len(a):
        return 0
    return int(a[0]) + int(np.count_nonzero(a[1:] & ~a[:-1]))


# --- tallies ---


@dataclass
class _FaultTally:
    scenarios: int = 0
    detected: int = 0
    delays_min: list[float] = field(default_factory=list)


@dataclass
class Tally:
    """Accumulates scored runs (normal and faulty) into the evaluation figures."""

    threshold: float
    clear_at: float | None = None
    normal_runs: int = 0
    normal_scored: int = 0
    normal_flagged: int = 0
    normal_seconds: float = 0.0
    false_alarms: int = 0
    faults: dict[str, _FaultTally] = field(default_factory=dict)

    def add(self, series: Series, scores: FloatArray) -> dict[str, Any]:
        """Count one run; returns its own figures (alarm episodes, detection, delay)."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (len(series),):
            raise ValueError(f"{len(series)} samples but scores of shape {scores.shape}")
        alarm = alarm_states(scores, self.threshold, self.clear_at)
        scored = np.isfinite(scores)
        episodes = rising_edges(alarm)
        if series.fault is None:
            self.normal_runs += 1
            self.normal_scored += int(np.count_nonzero(scored))
            self.normal_flagged += int(np.count_nonzero(alarm & scored))
            self.normal_seconds += float(np.count_nonzero(scored)) * series.period_s
            self.false_alarms += episodes
            return {"seed": series.seed, "fault": None, "alarm_episodes": episodes}
        tally = self.faults.setdefault(series.fault, _FaultTally())
        tally.scenarios += 1
        active = np.flatnonzero(series.label)
        result: dict[str, Any] = {"seed": series.seed, "fault": series.fault, "alarm_episodes": episodes,
                                  "detected": False, "delay_min": None}
        if active.size:
            first, last = int(active[0]), int(active[-1])
            hits = np.flatnonzero(alarm[first : last + 1])
            if hits.size:
                onset = series.onset_s if series.onset_s is not None else float(series.t_s[first])
                delay = (float(series.t_s[first + int(hits[0])]) - onset) / 60.0
                tally.detected += 1
                tally.delays_min.append(delay)
                result.update(detected=True, delay_min=delay)
        return result

    def result(self) -> dict[str, Any]:
        """The figures so far (delays ``None`` for a fault never detected)."""
        days = self.normal_seconds / 86_400.0
        faults: dict[str, dict[str, Any]] = {}
        for name, t in self.faults.items():
            p50 = p90 = None
            if t.delays_min:
                p50, p90 = (round(float(x), 3) for x in np.percentile(t.delays_min, [50, 90]))
            faults[name] = {"scenarios": t.scenarios, "detected": t.detected,
                            "detection_rate": round(t.detected / t.scenarios, 4) if t.scenarios else None,
                            "delay_min_p50": p50, "delay_min_p90": p90}
        rates = [f["detection_rate"] for f in faults.values() if f["detection_rate"] is not None]
        return {
            "normal_scenarios": self.normal_runs,
            "device_days_normal": round(days, 4),
            "false_alarms": self.false_alarms,
            "false_alarms_per_device_day": round(self.false_alarms / days, 4) if days > 0 else None,
            "normal_fraction_flagged": round(self.normal_flagged / self.normal_scored, 6)
            if self.normal_scored else None,
            "detection_rate_mean": round(sum(rates) / len(rates), 4) if rates else None,
            "faults": faults,
        }


def evaluate_scores(runs: Iterable[tuple[Series, FloatArray]], threshold: float,
                    clear_at: float | None = None) -> dict[str, Any]:
    """Evaluation figures of already-scored runs (per-sample scores, NaN where not scored).

    For training code that scores with its own (not yet exported) model: same alarm logic and
    figures as :func:`evaluate_model`.
    """
    tally = Tally(threshold, clear_at)
    for series, scores in runs:
        tally.add(series, scores)
    return tally.result()


# --- scenarios ---


def plan_scenarios(kind: Kind, plan: Plan, *, seed: int = EVAL_SEED_BASE, period_s: float = 1.0,
                   min_onset_h: float = 0.0, faults: Sequence[str] | None = None) -> list[ScenarioSpec]:
    """The held-out runs: ``ceil(days * 24 / hours)`` normal runs, ``faults_per_kind`` runs per fault."""
    if seed < EVAL_SEED_BASE:
        raise ValueError(f"evaluation seeds start at {EVAL_SEED_BASE} (lower ones are for training), got {seed}")
    if not (math.isfinite(plan.hours) and plan.hours > 0):
        raise ValueError(f"hours must be > 0, got {plan.hours}")
    if not (math.isfinite(plan.days) and plan.days >= 0) or plan.faults_per_kind < 0:
        raise ValueError("days and faults_per_kind must be >= 0")
    names = list(FAULTS[kind]) if faults is None else list(faults)
    for name in names:
        if name not in FAULTS[kind]:
            raise ValueError(f"unknown {kind} fault {name!r}; known: {list(FAULTS[kind])}")
    n_normal = math.ceil(plan.days * 24.0 / plan.hours - 1e-9)
    if max(n_normal, plan.faults_per_kind) > SEED_BLOCK:
        raise ValueError(f"at most {SEED_BLOCK} runs per group")
    specs = [ScenarioSpec(kind, seed + i, plan.hours, None, period_s) for i in range(n_normal)]
    for name in names:
        k = FAULTS[kind].index(name)
        for j in range(plan.faults_per_kind):
            s = seed + SEED_BLOCK * (k + 1) + j
            specs.append(ScenarioSpec(kind, s, plan.hours, draw_fault(kind, name, s, plan.hours,
                                                                      min_onset_h=min_onset_h), period_s))
    return specs


def evaluate_model(
    model: str | Path | bytes | ort.InferenceSession,
    plan: Plan | None = None,
    *,
    seed: int = EVAL_SEED_BASE,
    faults: Sequence[str] | None = None,
    workers: int | None = None,
    progress: bool = False,
    runs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (a path, ONNX bytes or a session) on held-out scenarios; the JSON summary as a dict.

    ``runs``, if given, receives every run's own figures (seed, fault, alarm episodes, delay).
    """
    plan = plan or Plan()
    if isinstance(model, ort.InferenceSession):
        session, name = model, None
    else:
        session = open_session(model)
        name = str(model) if isinstance(model, str | Path) else None
    card = session_card(session, name or "model")
    kind = card_kind(card)
    period = card.sample_period_s
    # Leave room for full windows of normal data before any fault starts.
    min_onset_h = 2.0 * card.window * period / 3600.0
    specs = plan_scenarios(kind, plan, seed=seed, period_s=period, min_onset_h=min_onset_h, faults=faults)
    tally = Tally(card.threshold, card.clear_at)
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    with tqdm(total=len(specs), desc=f"{card.name} v{card.version}", unit="run", disable=not progress,
              file=sys.stderr) as bar:
        for series in generate_many(specs, workers):
            figures = tally.add(series, score_series(session, card, series))
            if runs is not None:
                runs.append(figures)
            bar.update(1)
    summary = tally.result()
    return {
        "model": name or f"{card.name} v{card.version}",
        "name": card.name,
        "version": card.version,
        "profile": card.profile,
        "window": card.window,
        "sample_period_s": period,
        "threshold": card.threshold,
        "clear_at": card.clear_at,
        "seed": seed,
        "scenario_hours": plan.hours,
        **summary,
    }


def format_table(result: dict[str, Any]) -> str:
    """A human-readable table of :func:`evaluate_model`'s result."""

    def num(x: float | None, fmt: str = "{:.1f}") -> str:
        return "-" if x is None else fmt.format(x)

    lines = [
        f"model {result['model']} ({result['profile']}, window {result['window']} x {result['sample_period_s']} s, "
        f"threshold {result['threshold']:g}, clears at {result['clear_at']:g})",
        f"normal: {result['normal_scenarios']} runs, {result['device_days_normal']:.2f} device-days, "
        f"{result['false_alarms']} alarm episodes = {num(result['false_alarms_per_device_day'], '{:.3f}')} "
        f"false alarms/device-day, {num(result['normal_fraction_flagged'], '{:.4%}')} of samples flagged",
        f"{'fault':<20} {'runs':>5} {'detected':>9} {'rate':>7} {'delay p50':>10} {'delay p90':>10}  (min)",
    ]
    for fault, f in result["faults"].items():
        lines.append(f"{fault:<20} {f['scenarios']:>5} {f['detected']:>9} {num(f['detection_rate'], '{:.0%}'):>7} "
                     f"{num(f['delay_min_p50']):>10} {num(f['delay_min_p90']):>10}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.evaluate_sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="ONNX model file with an embedded card")
    parser.add_argument("--quick", action="store_true", help="small evaluation: 1 device-day normal, 6 h runs, "
                                                              "2 runs per fault")
    parser.add_argument("--days", type=float, help="device-days of normal runs (default 7; quick: 1)")
    parser.add_argument("--hours", type=float, help="length of every run (default 24; quick: 6)")
    parser.add_argument("--faults-per-kind", type=int, help="runs per fault scenario (default 8; quick: 2)")
    parser.add_argument("--fault", action="append", dest="faults", help="only this fault scenario (repeatable)")
    parser.add_argument("--seed", type=int, default=EVAL_SEED_BASE,
                        help=f"first evaluation seed (>= {EVAL_SEED_BASE}; lower seeds are for training)")
    parser.add_argument("--workers", type=int, default=None, help="generator processes (default: CPUs, at most 4)")
    args = parser.parse_args(argv)
    base = Plan.quick() if args.quick else Plan()
    plan = Plan(days=base.days if args.days is None else args.days,
                hours=base.hours if args.hours is None else args.hours,
                faults_per_kind=base.faults_per_kind if args.faults_per_kind is None else args.faults_per_kind)
    if not args.model.is_file():
        parser.error(f"no model file {args.model}")
    try:
        result = evaluate_model(args.model, plan, seed=args.seed, faults=args.faults, workers=args.workers,
                                progress=True)
    except ValueError as exc:  # includes ModelFileError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
