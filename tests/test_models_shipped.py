"""The shipped simulator models: small, self-describing, consistent with their cards, and they
still detect the faults they were measured on (held-out units, quick evaluation)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from models.evaluate_sim import Plan, evaluate_model
from models.simdata import MODEL_INPUTS, metric_units
from protocol.anomaly import MAX_MODEL_BYTES, ModelCard, card_from_metadata, card_path, sha256_of

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "shipped"
KINDS = {"boiler": "sim-boiler", "meter": "sim-meter"}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_shipped_model_matches_its_card(kind: str) -> None:
    path = SHIPPED / f"{KINDS[kind]}-anomaly.onnx"
    data = path.read_bytes()
    assert 0 < len(data) <= MAX_MODEL_BYTES
    card = ModelCard.model_validate_json(card_path(path).read_text())
    assert card.sha256 == sha256_of(data)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    embedded = card_from_metadata(dict(sess.get_modelmeta().custom_metadata_map), str(path))
    assert embedded == card.model_copy(update={"sha256": None})
    assert card.profile == KINDS[kind] and card.name == f"{KINDS[kind]}-anomaly"
    units = metric_units(kind)  # type: ignore[arg-type]
    assert [(i.metric, i.unit) for i in card.inputs] == [(m, units[m]) for m in MODEL_INPUTS[kind]]  # type: ignore[index]
    (inp,) = sess.get_inputs()
    assert inp.name == "window" and inp.shape[1:] == [card.window, len(card.inputs)]
    assert card.clear_at < card.threshold
    # The card carries what was measured: a detection rate for every fault scenario.
    assert card.quality["false_alarms_per_device_day"] == 0.0
    assert all(0.0 <= float(v) <= 1.0 for k, v in card.quality.items() if k.endswith("detection_rate"))
    assert (path.with_suffix(".md")).read_text().startswith(f"# Model card: {card.name} v{card.version}")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_shipped_model_detects_faults_on_held_out_units(kind: str) -> None:
    path = SHIPPED / f"{KINDS[kind]}-anomaly.onnx"
    result = evaluate_model(path, Plan(days=1.0, hours=12.0, faults_per_kind=2), workers=2)
    assert result["false_alarms_per_device_day"] == 0.0
    rates = {name: f["detection_rate"] for name, f in result["faults"].items()}
    if kind == "meter":
        assert rates == {"tamper": 1.0, "stuck_power": 1.0, "stuck_voltage": 1.0}
    else:
        assert rates["scale_step"] == 1.0 and rates["scale_ramp"] == 1.0
        assert min(rates.values()) >= 0.5, rates


def test_evaluate_sim_cli_last_line_is_json() -> None:
    proc = subprocess.run([sys.executable, "-m", "models.evaluate_sim", "--model",
                           str(SHIPPED / "sim-meter-anomaly.onnx"), "--quick"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["name"] == "sim-meter-anomaly" and doc["profile"] == "sim-meter"
    assert set(doc["faults"]) == {"tamper", "stuck_power", "stuck_voltage"}
    assert doc["faults"]["tamper"]["detection_rate"] == 1.0


def test_train_sim_quick_writes_a_usable_model(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "models.train", "sim", "--kind", "meter", "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary) == {"sim-meter-anomaly"}
    path = tmp_path / "sim-meter-anomaly.onnx"
    card = ModelCard.model_validate_json(card_path(path).read_text())
    assert card.sha256 == sha256_of(path.read_bytes())
    assert summary["sim-meter-anomaly"]["bytes"] == path.stat().st_size
    assert "tamper.detection_rate" in card.quality
