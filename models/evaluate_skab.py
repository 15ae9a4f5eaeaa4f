"""Run the SKAB outlier-detection protocol on a folder laid out like SKAB's ``data/``.

    python -m models.evaluate_skab --data ../shared/datasets/skab/data

Every ``*.csv`` under ``--data`` (recursively) with an ``anomaly`` column is one experiment: a
detector is fitted on its first 400 rows with the shipped recipe (``models/shipped/skab-pump.recipe.json``),
exported to ONNX, and every test row is scored through onnxruntime with the window that ends at
it, exactly as the edge scores live data. Files without labels (``anomaly-free.csv``) are skipped.
The last line printed is one JSON object: ``f1`` (0..1), ``far`` and ``mar`` (percent, as on the
SKAB leaderboard), ``files``, ``points`` and the pooled confusion counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from models.detector import WindowDetector, sliding_windows
from models.skab import (
    COLUMNS,
    TRAIN_ROWS,
    Confusion,
    Experiment,
    FileResult,
    ProtocolResult,
    SkabFormatError,
    SkabRecipe,
    causal_scores,
    first_alarm_delay,
    fit_file,
    iter_experiments,
    labelled,
    split,
)
from protocol.anomaly import ModelCard, ModelInput

SHIPPED_RECIPE = Path(__file__).resolve().parent / "shipped" / "skab-pump.recipe.json"
SKAB_UNITS = ("", "", "A", "bar", "degC", "degC", "V", "l/min")
SKAB_METRICS = ("accel1_rms", "accel2_rms", "current", "pressure", "motor_temp", "fluid_temp", "voltage",
                "flow")


def load_recipe(path: Path | None = None) -> SkabRecipe:
    """The shipped recipe (or the one at ``path``)."""
    p = path or SHIPPED_RECIPE
    try:
        return SkabRecipe.model_validate_json(p.read_text())
    except FileNotFoundError:
        raise SystemExit(f"recipe {p} not found: run `python -m models.train skab` first") from None


def skab_card(recipe: SkabRecipe, name: str = "skab-pump", version: int = 1) -> ModelCard:
    """The card of a per-experiment SKAB model (inputs in :data:`COLUMNS` order)."""
    return ModelCard(
        name=name, version=version, profile="skab-pump",
        inputs=[ModelInput(metric=m, unit=u) for m, u in zip(SKAB_METRICS, SKAB_UNITS, strict=True)],
        window=recipe.window, sample_period_s=1.0, threshold=recipe.threshold,
        method=f"{recipe.family}: RMS of floored z-scores of {recipe.window}-sample window means",
        training_data=f"first {TRAIN_ROWS} rows of the experiment (SKAB protocol)",
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), opset=17,
    )


class OnnxScorer:
    """Scores an experiment through the exported ONNX graph, as the edge would."""

    def __init__(self, recipe: SkabRecipe) -> None:
        import onnxruntime as ort

        self._ort = ort
        self._card = skab_card(recipe)
        self._opts = ort.SessionOptions()
        self._opts.intra_op_num_threads = 1
        self._opts.inter_op_num_threads = 1

    def __call__(self, det: WindowDetector, values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Scores of rows ``TRAIN_ROWS..`` of ``values``."""
        sess = self._ort.InferenceSession(det.to_onnx(self._card), self._opts, providers=["CPUExecutionProvider"])
        windows = sliding_windows(values[TRAIN_ROWS - det.window + 1:], det.window).astype(np.float32)
        out: npt.NDArray[np.float64] = sess.run(None, {"window": windows})[0].astype(np.float64)
        return out


def run_protocol(
    experiments: Sequence[Experiment], recipe: SkabRecipe, *, engine: str = "onnx", progress: bool = False,
) -> ProtocolResult:
    """Fit per file, score the test rows, pool the confusion counts."""
    result = ProtocolResult()
    scorer = OnnxScorer(recipe) if engine == "onnx" else None
    todo = labelled(experiments)
    result.skipped = [e.name for e in experiments if e not in todo]
    for exp in tqdm(todo, desc="SKAB files", unit="file", disable=not progress, file=sys.stderr):
        train, truth = split(exp)
        det = fit_file(train, recipe)
        scores = scorer(det, exp.values) if scorer else causal_scores(det, exp.values)[TRAIN_ROWS:]
        alarm = scores > recipe.threshold
        conf = Confusion()
        conf.add(alarm, truth)
        result.total.add(alarm, truth)
        result.files.append(FileResult(exp.name, conf, first_alarm_delay(alarm, truth)))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m models.evaluate_skab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder laid out like SKAB's data/ (searched recursively)")
    ap.add_argument("--recipe", type=Path, default=None, help=f"recipe JSON (default {SHIPPED_RECIPE.name})")
    ap.add_argument("--engine", choices=("onnx", "numpy"), default="onnx",
                    help="score through the exported ONNX graph (default) or the numpy reference")
    args = ap.parse_args(argv)
    recipe = load_recipe(args.recipe)
    try:
        experiments = list(iter_experiments(args.data))
    except (FileNotFoundError, SkabFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_protocol(experiments, recipe, engine=args.engine, progress=True)
    if not result.files:
        print(f"error: no labelled SKAB files (with an '{'anomaly'}' column and > {TRAIN_ROWS} rows) under {args.data}",
              file=sys.stderr)
        return 2
    print(f"{'file':28s} {'f1':>6s} {'far%':>6s} {'mar%':>6s} {'delay_s':>7s}")
    for fr in result.files:
        c = fr.confusion
        delay = "-" if fr.first_alarm_delay_s is None else str(fr.first_alarm_delay_s)
        print(f"{fr.name:28s} {c.f1:6.3f} {c.far:6.1f} {c.mar:6.1f} {delay:>7s}")
    if result.skipped:
        print(f"skipped (no labels): {', '.join(result.skipped)}")
    summary = {**result.summary(), "columns": len(COLUMNS), "threshold": recipe.threshold, "window": recipe.window,
               "engine": args.engine}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
