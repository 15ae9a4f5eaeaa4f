"""SKAB: the shipped recipe beats the published leaderboard, and the CLI handles any SKAB-like folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.evaluate_skab import load_recipe, main, run_protocol
from models.skab import COLUMNS, TRAIN_ROWS, SkabFormatError, iter_experiments, read_experiment, skab_data_dir
from models.train_skab import train_skab

ROOT = Path(__file__).resolve().parents[1]
HEADER = "datetime;" + ";".join(COLUMNS)


def _skab_data() -> Path:
    data = skab_data_dir()
    if not data.is_dir():
        pytest.fail(f"SKAB data set missing at {data}: it is provided beside the project in ../shared "
                    "(see ../shared/datasets/skab/SOURCE.md), or set SKAB_DATA; these tests need it")
    return data


def _last_json(stdout: str) -> dict[str, float]:
    doc: dict[str, float] = json.loads(stdout.strip().splitlines()[-1])
    return doc


def test_cli_on_shipped_data_beats_conv_ae() -> None:
    data = _skab_data()
    proc = subprocess.run([sys.executable, "-m", "models.evaluate_skab", "--data", str(data)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    out = _last_json(proc.stdout)
    assert out["files"] == 26  # every labelled file; anomaly-free.csv is skipped
    # Published leaderboard best: Conv-AE F1 0.78 at FAR 13.55 %.
    assert out["f1"] > 0.78
    assert out["far"] < 13.55
    assert out["mar"] < 30.0
    assert out["tp"] + out["fp"] + out["fn"] + out["tn"] == out["points"] == 18_623
    assert "skipped (no labels): anomaly-free/anomaly-free.csv" in proc.stdout


def test_onnx_and_numpy_engines_agree() -> None:
    experiments = list(iter_experiments(_skab_data() / "valve1"))
    recipe = load_recipe()
    onnx_result = run_protocol(experiments, recipe, engine="onnx").total
    numpy_result = run_protocol(experiments, recipe, engine="numpy").total
    # float32 vs float64 may flip a handful of points that sit exactly on the threshold.
    assert abs(onnx_result.tp - numpy_result.tp) <= 5
    assert abs(onnx_result.fp - numpy_result.fp) <= 5


def test_training_reproduces_the_shipped_recipe() -> None:
    experiments = list(iter_experiments(_skab_data()))
    recipe, rows = train_skab(experiments, progress=False)
    shipped = load_recipe()
    assert recipe.threshold == shipped.threshold
    assert recipe.floor_abs == shipped.floor_abs
    families = {r["family"]: r for r in rows}
    assert set(families) == {"zrms", "zrms-nofloor", "pca-t2q", "iforest"}
    assert max(rows, key=lambda r: float(r["f1"]))["family"] == "zrms"  # type: ignore[arg-type]


def _write(path: Path, values: np.ndarray, labels: np.ndarray | None, crlf: bool) -> None:
    nl = "\r\n" if crlf else "\n"
    header = HEADER + (";anomaly;changepoint" if labels is not None else "")
    lines = [header]
    for i, row in enumerate(values):
        cells = [f"2021-01-01 00:{i // 60 % 60:02d}:{i % 60:02d}"] + [f"{v:.6f}" for v in row]
        if labels is not None:
            cells += [f"{float(labels[i]):.1f}", "0.0"]
        lines.append(";".join(cells))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((nl.join(lines) + nl).encode())


def _synthetic(seed: int, n: int = 1000, start: int = 600, end: int = 850) -> tuple[np.ndarray, np.ndarray]:
    # A pump-like experiment never seen before: noise around a level, then the flow drops by 20 %.
    rng = np.random.default_rng(seed)
    level = np.array([0.2, 0.27, 2.5, 0.3, 80.0, 26.0, 230.0, 120.0])
    x = level + rng.normal(size=(n, 8)) * level * 0.01
    y = np.zeros(n, dtype=bool)
    y[start:end] = True
    x[start:end, 7] *= 0.8
    return x, y


def test_cli_on_unseen_folder_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Nested sub-folders, mixed line endings, an unlabelled file, a too-short file: like SKAB's data/.
    for i, (sub, crlf) in enumerate([("valve2", True), ("valve2", False), ("other/deep", True)]):
        x, y = _synthetic(i)
        _write(tmp_path / sub / f"{i}.csv", x, y, crlf)
    _write(tmp_path / "anomaly-free" / "free.csv", _synthetic(9)[0], None, False)
    short_x, short_y = _synthetic(5, n=TRAIN_ROWS)
    _write(tmp_path / "other" / "short.csv", short_x, short_y, False)
    assert main(["--data", str(tmp_path)]) == 0
    out = _last_json(capsys.readouterr().out)
    assert out["files"] == 3
    assert out["points"] == 3 * 600
    assert out["tp"] + out["fn"] == 3 * 250
    assert out["f1"] > 0.9  # a 20 % flow drop is obvious to any detector worth shipping
    assert out["far"] < 5.0


def test_bad_files_name_file_and_line(tmp_path: Path) -> None:
    x, y = _synthetic(1)
    path = tmp_path / "bad.csv"
    _write(path, x, y, False)
    lines = path.read_text().splitlines()
    lines[42] = lines[42].replace(";", ";x", 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SkabFormatError, match=r"bad\.csv:43: bad row"):
        read_experiment(path)
    (tmp_path / "nocol.csv").write_text("datetime;Current\n2021-01-01 00:00:00;1.0\n")
    with pytest.raises(SkabFormatError, match=r"nocol\.csv:1: missing column"):
        read_experiment(tmp_path / "nocol.csv")


def test_cli_errors_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    missing = subprocess.run([sys.executable, "-m", "models.evaluate_skab", "--data", str(tmp_path / "nope")],
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=60, check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    empty = subprocess.run([sys.executable, "-m", "models.evaluate_skab", "--data", str(tmp_path)],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=60, check=False)
    assert empty.returncode == 2 and "no labelled SKAB files" in empty.stderr
