"""SKAB (Skoltech Anomaly Benchmark): loading, the upstream evaluation protocol, and our recipe.

Protocol (upstream ``core/utils.py`` and ``core/metrics.py``, see the data set's SOURCE.md): in each
labelled experiment file the first 400 rows are training data, the rest is test data; a model is
fitted per file on its training rows and scores every test row; TP/FP/FN/TN are pooled over the
test rows of all files; F1 = TP / (TP + (FP + FN) / 2), FAR = FP / (FP + TN) * 100 and
MAR = FN / (FN + TP) * 100 (both in percent, as the leaderboard prints them).

Everything that is not refitted per file (window, floors, threshold, family) is fixed by
:mod:`models.train` once for all files, the threshold from normal data only; nothing is tuned
per file, so the recipe can be run on experiments it has never seen.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from models.detector import WindowDetector, causal_window_means, fit_zrms

TRAIN_ROWS = 400
"""Upstream ``train_test_split(train_size=400, shuffle=False)``."""

COLUMNS: tuple[str, ...] = (
    "Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature", "Thermocouple",
    "Voltage", "Volume Flow RateRMS",
)
LABEL = "anomaly"


SKAB_ENV = "SKAB_DATA"
_PROJECT = Path(__file__).resolve().parents[1]
_CANDIDATES = (
    _PROJECT.parent / "shared" / "datasets" / "skab" / "data",  # ../shared beside the checkout
    Path("/work/shared/datasets/skab/data"),  # where the team's machines keep it, for clones elsewhere
)


def skab_data_dir() -> Path:
    """SKAB's ``data/`` folder: ``$SKAB_DATA`` if set, else ``../shared/datasets/skab/data`` beside
    the project, else the team machines' ``/work/shared/...``. The first candidate is returned when
    none exists, so error messages name the expected place."""
    env = os.environ.get(SKAB_ENV)
    if env:
        return Path(env)
    return next((c for c in _CANDIDATES if c.is_dir()), _CANDIDATES[0])


class SkabFormatError(ValueError):
    """A file that is not laid out like SKAB's data (names the file, line and column)."""


@dataclass(frozen=True)
class Experiment:
    """One SKAB CSV file: sensor rows ``[T, 8]`` in :data:`COLUMNS` order and labels (if any)."""

    path: Path
    name: str
    values: npt.NDArray[np.float64]
    labels: npt.NDArray[np.bool_] | None


def read_experiment(path: Path, root: Path | None = None) -> Experiment:
    """Read a ``;``-separated SKAB file (LF or CRLF endings); :class:`SkabFormatError` if it is not one."""
    name = str(path.relative_to(root)) if root else path.name
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter=";")
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise SkabFormatError(f"{path}: empty file") from None
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise SkabFormatError(f"{path}:1: missing column(s) {missing}; header is {header}")
        idx = [header.index(c) for c in COLUMNS]
        li = header.index(LABEL) if LABEL in header else None
        rows: list[list[float]] = []
        labels: list[bool] = []
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                rows.append([float(row[i]) for i in idx])
                if li is not None:
                    labels.append(float(row[li]) > 0.5)
            except (ValueError, IndexError) as exc:
                raise SkabFormatError(f"{path}:{lineno}: bad row ({exc}): {';'.join(row)[:120]}") from None
    values = np.asarray(rows, dtype=np.float64).reshape(-1, len(COLUMNS))
    if not np.isfinite(values).all():
        raise SkabFormatError(f"{path}: non-finite sensor values")
    return Experiment(path, name, values, np.asarray(labels, dtype=bool) if li is not None else None)


def iter_experiments(root: Path) -> Iterator[Experiment]:
    """Every ``*.csv`` under ``root`` (recursively, sorted), labelled or not."""
    if not root.is_dir():
        raise FileNotFoundError(f"SKAB data folder {root} does not exist")
    for path in sorted(root.rglob("*.csv")):
        yield read_experiment(path, root)


class SkabRecipe(BaseModel):
    """The fixed part of the SKAB detector: what :mod:`models.train` decides once for all files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str = "zrms"
    window: int = 20
    floor_abs: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 1.0, 0.2, 0.0, 0.0)
    """Per column (:data:`COLUMNS` order): the motor body temperature wanders by ~1 K and the fluid
    by ~0.2 K between runs of the rig with nothing wrong; smaller moves are not evidence."""
    floor_rel: tuple[float, ...] = (0.05, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    """Vibration RMS levels differ by a few percent after every restart of the pump."""
    threshold: float = 1.0
    threshold_source: str = ""
    """How the threshold was obtained (normal data only)."""


def fit_file(train: npt.NDArray[np.float64], recipe: SkabRecipe) -> WindowDetector:
    """The per-file fit of the protocol: a detector from the file's first rows."""
    return fit_zrms(train, recipe.window, floor_abs=recipe.floor_abs, floor_rel=recipe.floor_rel)


def causal_scores(det: WindowDetector, values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Score every row with the window ending at it (shorter windows at the very start), in numpy."""
    z = (causal_window_means(values, det.window) - det.center) / det.scale
    out: npt.NDArray[np.float64] = np.sqrt((z * z).mean(axis=1))
    return out


@dataclass
class Confusion:
    """Pooled point counts."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, alarm: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> None:
        """Count one file's test rows."""
        self.tp += int((alarm & truth).sum())
        self.fp += int((alarm & ~truth).sum())
        self.fn += int((~alarm & truth).sum())
        self.tn += int((~alarm & ~truth).sum())

    @property
    def f1(self) -> float:
        """F1 as upstream computes it."""
        d = self.tp + (self.fp + self.fn) / 2
        return self.tp / d if d else math.nan

    @property
    def far(self) -> float:
        """False-alarm rate, percent of normal test points."""
        d = self.fp + self.tn
        return 100.0 * self.fp / d if d else math.nan

    @property
    def mar(self) -> float:
        """Missed-alarm rate, percent of anomalous test points."""
        d = self.fn + self.tp
        return 100.0 * self.fn / d if d else math.nan


@dataclass
class FileResult:
    """One experiment's outcome."""

    name: str
    confusion: Confusion
    first_alarm_delay_s: int | None
    """Rows (seconds) from the first labelled anomalous test row to the first alarm on it."""


@dataclass
class ProtocolResult:
    """The protocol's outcome over a folder."""

    total: Confusion = field(default_factory=Confusion)
    files: list[FileResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, float | int]:
        """The figures the CLI prints as JSON."""
        return {
            "f1": round(self.total.f1, 4), "far": round(self.total.far, 2), "mar": round(self.total.mar, 2),
            "files": len(self.files), "points": self.total.tp + self.total.fp + self.total.fn + self.total.tn,
            "tp": self.total.tp, "fp": self.total.fp, "fn": self.total.fn, "tn": self.total.tn,
        }


def split(exp: Experiment) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Training rows and the test labels of a labelled experiment."""
    assert exp.labels is not None
    return exp.values[:TRAIN_ROWS], exp.labels[TRAIN_ROWS:]


def first_alarm_delay(alarm: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> int | None:
    """Rows from the first anomalous row to the first alarm at or after it (None if never)."""
    if not truth.any():
        return None
    start = int(np.argmax(truth))
    hits = np.flatnonzero(alarm[start:] & truth[start:])
    return int(hits[0]) if len(hits) else None


def labelled(experiments: Sequence[Experiment]) -> list[Experiment]:
    """The experiments the protocol can score (labelled and longer than the training part)."""
    return [e for e in experiments if e.labels is not None and len(e.values) > TRAIN_ROWS]
