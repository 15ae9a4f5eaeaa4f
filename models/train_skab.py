"""Train (choose and calibrate) the SKAB detector recipe: ``python -m models.train skab --data DIR``.

SKAB's protocol refits a model on the first 400 rows of every experiment, so what is trained here
is the part that is *not* refitted: the model family and its threshold. Several families are run
through the same protocol; each one's threshold is calibrated on normal data only — the
``anomaly-free`` experiment, cut into protocol-sized pieces (fit on 400 rows, score the next 700)
— as the given quantile of those normal scores. The labelled experiments are used only to
measure, and the family that measures best is kept.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from models.detector import causal_window_means, fit_pca, sliding_windows
from models.skab import (
    TRAIN_ROWS,
    Confusion,
    Experiment,
    SkabRecipe,
    causal_scores,
    fit_file,
    labelled,
    split,
)

Array = npt.NDArray[np.float64]
Scorer = Callable[[Array], Array]
"""Fitted on training rows: maps an experiment's rows to a causal score per row."""

CALIBRATION_SEGMENT = 1100
CALIBRATION_STEP = 200
DEFAULT_QUANTILE = 0.95

# Published SKAB outlier-detection leaderboard (upstream README): F1, FAR %, MAR %.
LEADERBOARD: tuple[tuple[str, float, float | None, float | None], ...] = (
    ("Conv-AE", 0.78, 13.55, 28.02),
    ("MSET", 0.78, 39.73, 14.13),
    ("T²+Q (PCA)", 0.76, 26.62, 24.92),
    ("LSTM-AE", 0.74, None, None),
    ("T²", 0.66, None, None),
    ("Isolation forest", 0.29, None, None),
)


@dataclass(frozen=True)
class Family:
    """A candidate: a name, how it is fitted per file, and its recipe fields."""

    name: str
    fit: Callable[[Array], Scorer]
    description: str


def _zrms(recipe: SkabRecipe) -> Callable[[Array], Scorer]:
    def fit(train: Array) -> Scorer:
        det = fit_file(train, recipe)
        return lambda values: causal_scores(det, values)
    return fit


def _pca(window: int) -> Callable[[Array], Scorer]:
    def fit(train: Array) -> Scorer:
        det = fit_pca(sliding_windows(train, window), window, ("mean",), variance=0.9)

        def score(values: Array) -> Array:
            return det.score_features(causal_window_means(values, window))
        return score
    return fit


def _iforest(window: int, seed: int) -> Callable[[Array], Scorer]:
    from sklearn.ensemble import IsolationForest  # type: ignore[import-untyped]

    def fit(train: Array) -> Scorer:
        feats = causal_window_means(train, window)
        mu, sd = feats.mean(0), feats.std(0) + 1e-9
        forest = IsolationForest(n_estimators=100, random_state=seed).fit((feats - mu) / sd)

        def score(values: Array) -> Array:
            out: Array = -forest.score_samples((causal_window_means(values, window) - mu) / sd)
            return out
        return score
    return fit


def families(base: SkabRecipe, seed: int) -> list[Family]:
    """The candidates compared (all on the same window of means, so only the scoring differs)."""
    w = base.window
    unfloored = base.model_copy(update={"floor_abs": (0.0,) * 8, "floor_rel": (0.0,) * 8})
    return [
        Family("zrms", _zrms(base), f"RMS of z-scores of {w}-s window means, with sensor floors"),
        Family("zrms-nofloor", _zrms(unfloored), f"RMS of z-scores of {w}-s window means, no floors"),
        Family("pca-t2q", _pca(w), f"PCA (90 % variance) T² + Q of {w}-s window means"),
        Family("iforest", _iforest(w, seed), f"isolation forest (100 trees) on {w}-s window means"),
    ]


def normal_scores(fit: Callable[[Array], Scorer], normal: Sequence[Experiment]) -> Array:
    """Scores of normal data under the protocol: fit on 400 rows, score the following 700."""
    out: list[Array] = []
    for exp in normal:
        v = exp.values
        for start in range(0, len(v) - CALIBRATION_SEGMENT + 1, CALIBRATION_STEP):
            seg = v[start:start + CALIBRATION_SEGMENT]
            out.append(fit(seg[:TRAIN_ROWS])(seg)[TRAIN_ROWS:])
    if not out:
        raise ValueError(f"no normal experiment with >= {CALIBRATION_SEGMENT} rows to calibrate on")
    return np.concatenate(out)


def protocol(fit: Callable[[Array], Scorer], threshold: float, experiments: Sequence[Experiment]) -> Confusion:
    """Pooled confusion counts of one family at one threshold."""
    total = Confusion()
    for exp in labelled(experiments):
        train, truth = split(exp)
        total.add(fit(train)(exp.values)[TRAIN_ROWS:] > threshold, truth)
    return total


def train_skab(experiments: Sequence[Experiment], *, quantile: float = DEFAULT_QUANTILE, seed: int = 0,
               progress: bool = True) -> tuple[SkabRecipe, list[dict[str, object]]]:
    """Compare the families, calibrate each on normal data, return the best recipe and the table."""
    normal = [e for e in experiments if e.labels is None]
    if not normal:
        raise ValueError("no unlabelled (anomaly-free) experiment to calibrate thresholds on")
    if not labelled(experiments):
        raise ValueError("no labelled experiment to measure on")
    base = SkabRecipe()
    rows: list[dict[str, object]] = []
    thresholds: dict[str, float] = {}
    f1s: dict[str, float] = {}
    for fam in tqdm(families(base, seed), desc="families", unit="family", disable=not progress):
        threshold = float(np.quantile(normal_scores(fam.fit, normal), quantile))
        conf = protocol(fam.fit, threshold, experiments)
        thresholds[fam.name], f1s[fam.name] = threshold, conf.f1
        rows.append({"family": fam.name, "description": fam.description, "threshold": round(threshold, 4),
                     "f1": round(conf.f1, 4), "far": round(conf.far, 2), "mar": round(conf.mar, 2)})
    top = max(f1s, key=lambda name: f1s[name])
    if not top.startswith("zrms"):
        # evaluate_skab exports zrms graphs only; a better family needs its exporter first.
        raise RuntimeError(f"family {top} measured best; shipping it needs an ONNX exporter for it")
    recipe = base.model_copy(update={
        "threshold": round(thresholds[top], 4),
        "threshold_source": f"{quantile:.0%} quantile of protocol scores on "
                            f"{', '.join(e.name for e in normal)} (normal data only)",
        **({"floor_abs": (0.0,) * 8, "floor_rel": (0.0,) * 8} if top == "zrms-nofloor" else {}),
    })
    return recipe, rows


def write_outputs(recipe: SkabRecipe, rows: list[dict[str, object]], final: Mapping[str, object],
                  out_dir: Path) -> Path:
    """Write the recipe JSON and its model card (Markdown) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "skab-pump.recipe.json"
    path.write_text(recipe.model_dump_json(indent=2) + "\n")
    lines = [
        "# Model card: skab-pump (SKAB water-circulation testbed)",
        "",
        "Generated by `python -m models.train skab`; do not edit by hand.",
        "",
        "- **Task:** point-wise outlier detection on the SKAB testbed (pump, valves, 8 sensors at 1 Hz).",
        "- **Inputs (order, unit):** Accelerometer1RMS (g), Accelerometer2RMS (g), Current (A), Pressure (bar), "
        "Temperature (motor body, °C), Thermocouple (fluid, °C), Voltage (V), Volume Flow RateRMS (l/min).",
        f"- **Window:** {recipe.window} samples (s), causal: the score at t uses rows t-{recipe.window - 1}..t only.",
        f"- **Method:** {recipe.family}: per input, the window mean's distance from the training mean in units of "
        "max(training std, floor); score = RMS over inputs. Floors: motor temperature 1 K, fluid temperature "
        "0.2 K, vibration 5 % of level.",
        f"- **Threshold:** {recipe.threshold} ({recipe.threshold_source}).",
        "- **Training data:** per experiment, its first 400 rows (SKAB protocol); the threshold and family are "
        "fixed once for all experiments.",
        "",
        "## Families compared (same protocol, thresholds from normal data only)",
        "",
        "| family | description | threshold | F1 | FAR % | MAR % |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['family']} | {r['description']} | {r['threshold']} | {r['f1']} | {r['far']} | {r['mar']} |")
    lines += [
        "",
        "## Measured quality of the shipped recipe (through ONNX, as the edge scores)",
        "",
        f"`{json.dumps(final)}`",
        "",
        "Published SKAB outlier-detection leaderboard, for comparison:",
        "",
        "| detector | F1 | FAR % | MAR % |",
        "|---|---|---|---|",
    ]
    for name, f1, far, mar in LEADERBOARD:
        lines.append(f"| {name} | {f1} | {'' if far is None else far} | {'' if mar is None else mar} |")
    (out_dir / "skab-pump.md").write_text("\n".join(lines) + "\n")
    return path
