"""Train the simulator boiler and meter anomaly models: ``python -m models.train sim``.

For each kind: simulate normal operation of many units (training seeds only), cut it into windows,
fit a PCA T² + Q detector on per-input window features (mean, log std, least-squares slope),
calibrate the alarm threshold on *other* normal units (never on faults), then measure the exported
ONNX file on held-out fault scenarios with :mod:`models.evaluate_sim` and write the model, its
``.card.json`` and a Markdown card into ``models/shipped/``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from models.detector import Feature, WindowDetector, fit_pca_features, window_features
from models.evaluate_sim import Plan, evaluate_model, format_table
from models.simdata import (
    MODEL_INPUTS,
    PROFILES,
    Kind,
    ScenarioSpec,
    UnitParams,
    draw_unit,
    generate_many,
    metric_units,
    profile_of,
    sliding_windows,
)
from protocol.anomaly import MAX_MODEL_BYTES, ModelCard, ModelInput, card_json, card_path, sha256_of

FEATURES: tuple[Feature, ...] = ("mean", "logstd", "slope", "rate")
"""Computed for every input; :func:`_keep` keeps ``rate`` only for counters, and ``mean`` and
``slope`` only for the others."""
Float32Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class KindSetup:
    """Training choices of one device kind."""

    window: int
    """Samples (seconds at 1 Hz) per window: long enough to span a burner cycle / enough counter steps."""
    counters: tuple[str, ...] = ()
    """Cumulative inputs: their level says nothing (only their slope and spread are used)."""
    train_units: int = 48
    """Enough units to cover the regimes: warm days with the pump off, cold ones at full load."""
    train_hours: float = 24.0
    calib_units: int = 8
    stride: int = 30
    threshold_quantile: float = 0.9999
    threshold_margin: float = 1.2
    """Threshold = margin x that quantile of window scores on the calibration units (normal data)."""
    clear_ratio: float = 0.7


SETUPS: dict[Kind, KindSetup] = {
    # A burner cycle at low load lasts 5-10 min; 10 min windows see flame-on periods most of the time.
    "boiler": KindSetup(window=600),
    # 15 min: at 1 kW a 0.01 kWh register steps ~25 times, enough to tell a 20 % shortfall.
    "meter": KindSetup(window=900, counters=("energy_import",)),
}
TRAIN_SEED_BASE = 0
CALIB_SEED_BASE = 5_000


def resolutions(kind: Kind) -> npt.NDArray[np.float64]:
    """A tenth of each model input's register resolution (at least 1e-4): the log-std epsilon."""
    points = {p.name: p for p in profile_of(kind).points}
    return np.array([max(1e-4, abs(points[m].scale) / 10.0) for m in MODEL_INPUTS[kind]])


def _keep(kind: Kind, setup: KindSetup) -> list[int]:
    inputs = MODEL_INPUTS[kind]
    keep = []
    for fi, feat in enumerate(FEATURES):
        for ii, metric in enumerate(inputs):
            counter = metric in setup.counters
            if (feat == "rate") == counter or (feat == "logstd"):
                keep.append(fi * len(inputs) + ii)
    return keep


def training_unit(kind: Kind, seed: int) -> UnitParams:
    """The regime of training unit ``seed``: as :func:`draw_unit` draws it, except that every third
    boiler gets a mild climate (daily mean 10-14 degC). On such days the heat demand drops to nothing
    for a while and the pump stops: normal, but rare enough under the plain draw (44 of 137,000
    windows from 48 units) that the model took every pump stop for a fault."""
    unit = draw_unit(kind, seed)
    if kind != "boiler" or seed % 3:
        return unit
    mild = float(np.random.default_rng([seed, 0x3A1D]).uniform(10.0, 14.0))
    return replace(unit, outdoor_mean=round(mild, 1))


def _unit_values(kind: Kind, seeds: range, hours: float, desc: str, workers: int,
                 stratified: bool = False) -> Iterator[Float32Array]:
    specs = [ScenarioSpec(kind, s, hours, unit=training_unit(kind, s) if stratified else None) for s in seeds]
    for series in tqdm(generate_many(specs, workers), total=len(specs), desc=desc, unit="unit"):
        yield series.columns(MODEL_INPUTS[kind])


def _train_features(kind: Kind, setup: KindSetup, seeds: range, workers: int) -> npt.NDArray[np.float64]:
    # Features per unit as it is generated: holding every unit's windows would take gigabytes.
    keep, eps = _keep(kind, setup), resolutions(kind)
    parts = [window_features(sliding_windows(v, setup.window)[::setup.stride].astype(np.float64), FEATURES, keep, eps)
             for v in _unit_values(kind, seeds, setup.train_hours, f"{kind}: training units", workers, stratified=True)]
    return np.concatenate(parts)


def _calibration_scores(det: WindowDetector, kind: Kind, seeds: range, hours: float, workers: int,
                        chunk: int = 4096) -> npt.NDArray[np.float64]:
    # Every window (stride 1), scored in chunks: materialising them all would take gigabytes.
    out: list[npt.NDArray[np.float64]] = []
    for v in _unit_values(kind, seeds, hours, f"{kind}: calibration units", workers):
        windows = sliding_windows(v, det.window)
        for start in range(0, len(windows), chunk):
            out.append(det.score(windows[start:start + chunk].astype(np.float64)))
    return np.concatenate(out)


def card_for(kind: Kind, det: WindowDetector, threshold: float, clear: float, setup: KindSetup, seed: int,
             quality: dict[str, float | int | str]) -> ModelCard:
    """The model card of a trained simulator model."""
    units = metric_units(kind)
    return ModelCard(
        name=f"{PROFILES[kind]}-anomaly", version=1, profile=PROFILES[kind],
        inputs=[ModelInput(metric=m, unit=units[m]) for m in MODEL_INPUTS[kind]],
        window=setup.window, sample_period_s=1.0, threshold=round(threshold, 4), clear_threshold=round(clear, 4),
        method=(f"PCA ({det.components.shape[1]} components) on per-input window mean, log std and slope"
                + (f" (counters {', '.join(setup.counters)}: log std and mean rate)" if setup.counters else "")
                + "; score = max of T², Q, largest residual and largest |z|, each over its 99th percentile"),
        training_data=(f"{setup.train_units} simulated {kind}s x {setup.train_hours:g} h of normal operation"
                       + (" (every third in a mild climate, so pump stops are seen) " if kind == "boiler" else " ")
                       +
                       f"(seeds {TRAIN_SEED_BASE + seed}..{TRAIN_SEED_BASE + seed + setup.train_units - 1}), "
                       f"windows every {setup.stride} s; threshold = {setup.threshold_margin} x the "
                       f"{setup.threshold_quantile:.2%} quantile of window scores on {setup.calib_units} other "
                       f"normal units x {setup.train_hours:g} h"),
        quality=quality, created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), opset=17, seed=seed,
    )


def train_kind(kind: Kind, *, seed: int = 0, quick: bool = False, workers: int = 2,
               plan: Plan | None = None) -> tuple[bytes, ModelCard, dict[str, Any]]:
    """Train, calibrate, export and measure one kind's model: (ONNX bytes, card, evaluation)."""
    setup = SETUPS[kind]
    if quick:
        setup = KindSetup(window=setup.window, counters=setup.counters, train_units=4, train_hours=12.0,
                          calib_units=2, stride=setup.stride)
    train = _train_features(kind, setup, range(TRAIN_SEED_BASE + seed, TRAIN_SEED_BASE + seed + setup.train_units),
                            workers)
    det = fit_pca_features(train, setup.window, FEATURES, len(MODEL_INPUTS[kind]), keep=_keep(kind, setup),
                           logstd_eps=resolutions(kind))
    calib_seeds = range(CALIB_SEED_BASE + seed, CALIB_SEED_BASE + seed + setup.calib_units)
    calib_scores = _calibration_scores(det, kind, calib_seeds, setup.train_hours, workers)
    threshold = setup.threshold_margin * float(np.quantile(calib_scores, setup.threshold_quantile))
    clear = setup.clear_ratio * threshold
    card = card_for(kind, det, threshold, clear, setup, seed, {})
    result = evaluate_model(det.to_onnx(card), plan or (Plan.quick() if quick else Plan()), workers=workers,
                            progress=True)
    quality: dict[str, float | int | str] = {
        "false_alarms_per_device_day": result["false_alarms_per_device_day"],
        "device_days_normal": result["device_days_normal"],
    }
    for fault, f in result["faults"].items():
        quality[f"{fault}.detection_rate"] = f["detection_rate"]
        if f.get("delay_min_p50") is not None:
            quality[f"{fault}.delay_min_p50"] = f["delay_min_p50"]
    card = card.model_copy(update={"quality": quality})
    data = det.to_onnx(card)  # same graph, card now carries the measured quality
    if len(data) > MAX_MODEL_BYTES:
        raise RuntimeError(f"{kind} model is {len(data)} bytes, over the {MAX_MODEL_BYTES} limit")
    return data, card, result


def write_model(data: bytes, card: ModelCard, result: dict[str, Any], out_dir: Path) -> Path:
    """Write ``<name>.onnx``, its ``.card.json`` (with sha256) and a Markdown card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{card.name}.onnx"
    path.write_bytes(data)
    full = card.model_copy(update={"sha256": sha256_of(data)})
    card_path(path).write_text(card_json(full))
    inputs = ", ".join(f"{i.metric} ({i.unit or '-'})" for i in card.inputs)
    lines = [
        f"# Model card: {card.name} v{card.version}",
        "",
        "Generated by `python -m models.train sim`; do not edit by hand.",
        "",
        f"- **Scores:** devices of profile `{card.profile}`; file `{path.name}`, {len(data):,} bytes, "
        f"sha256 `{full.sha256}`.",
        f"- **Inputs (window order):** {inputs}.",
        f"- **Window:** {card.window} samples every {card.sample_period_s:g} s.",
        f"- **Method:** {card.method}.",
        f"- **Threshold:** alarm when score > {card.threshold}; clears at <= {card.clear_at}.",
        f"- **Training data:** {card.training_data}.",
        f"- **Opset:** {card.opset}; seed {card.seed}; built {card.created}.",
        "",
        "## Measured on held-out simulated units (`python -m models.evaluate_sim`)",
        "",
        "```",
        format_table(result),
        "```",
        "",
        f"`{json.dumps({k: v for k, v in result.items() if k != 'model'})}`",
    ]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return path


def main(args: argparse.Namespace) -> int:
    """``python -m models.train sim`` (arguments parsed by :mod:`models.train`)."""
    kinds: list[Kind] = ["boiler", "meter"] if args.kind == "all" else [args.kind]
    summary: dict[str, Any] = {}
    for kind in kinds:
        data, card, result = train_kind(kind, seed=args.seed, quick=args.quick)
        path = write_model(data, card, result, args.out)
        print(format_table(result))
        print(f"wrote {path} ({len(data):,} bytes)")
        summary[card.name] = {"bytes": len(data), "threshold": card.threshold,
                              "false_alarms_per_device_day": result["false_alarms_per_device_day"],
                              "detection_rate": {k: v["detection_rate"] for k, v in result["faults"].items()}}
    print(json.dumps(summary))
    return 0
