"""The detectors' ONNX graphs compute what their numpy reference computes, and carry their card."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.detector import (
    causal_window_means,
    fit_pca,
    fit_zrms,
    sliding_windows,
    window_features,
)
from protocol.anomaly import CARD_METADATA_KEY, ModelCard, ModelInput, card_from_metadata


def _card(window: int, n_inputs: int) -> ModelCard:
    return ModelCard(
        name="test-model", version=3, profile="sim-meter",
        inputs=[ModelInput(metric=f"m{i}", unit="") for i in range(n_inputs)],
        window=window, sample_period_s=1.0, threshold=2.5, method="test", training_data="random walk",
        created="2026-12-03T00:00:00Z", opset=17,
    )


def _series(rng: np.random.Generator, t: int = 4000) -> np.ndarray:
    walk = np.cumsum(rng.normal(size=(t, 4)), axis=0) * 0.1
    # A large cumulative counter in column 0: float32 must still resolve its increments.
    walk[:, 0] = 9_000.0 + np.cumsum(rng.uniform(0.0, 0.002, size=t))
    walk[:, 3] = np.round(walk[:, 3])  # a quantised input
    return walk


def _run(model: bytes, windows: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    out: np.ndarray = sess.run(None, {"window": windows.astype(np.float32)})[0]
    return out


def test_pca_graph_matches_numpy_reference_for_every_feature() -> None:
    rng = np.random.default_rng(7)
    x = _series(rng)
    window = 60
    train = sliding_windows(x[:3000], window)[::3]
    det = fit_pca(train, window, ("mean", "std", "logstd", "slope", "rate"), keep=list(range(1, 20)),
                  logstd_eps=[1e-3, 1e-2, 1e-3, 0.1])
    model = det.to_onnx(_card(window, 4))
    test = sliding_windows(x[3000:], window)[:400]
    onnx_scores = _run(model, test)
    ref = det.score(test.astype(np.float32).astype(np.float64))
    assert onnx_scores.shape == (400,)
    np.testing.assert_allclose(onnx_scores, ref, rtol=2e-3, atol=2e-3)
    assert np.isfinite(onnx_scores).all() and onnx_scores.max() > 0


def test_zrms_graph_matches_numpy_and_causal_means() -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(size=(1000, 3)) * [1.0, 0.01, 5.0] + [20.0, 0.2, 80.0]
    det = fit_zrms(x[:400], 20, floor_abs=[0.0, 0.0, 10.0], floor_rel=[0.0, 0.5, 0.0])
    assert det.scale[2] == pytest.approx(10.0, rel=1e-6)  # floor beats the spread of 5
    assert det.scale[1] == pytest.approx(0.1, rel=1e-3)  # 50 % of the level 0.2 beats 0.01
    windows = sliding_windows(x[400 - 19:], 20)
    onnx_scores = _run(det.to_onnx(_card(20, 3)), windows)
    z = (causal_window_means(x, 20)[400:] - det.center) / det.scale
    np.testing.assert_allclose(onnx_scores, np.sqrt((z * z).mean(axis=1)), rtol=1e-3, atol=1e-4)


def test_rate_of_a_large_counter_is_exact_in_float32() -> None:
    # 0.01 kWh steps on a 9,000 kWh counter: the window's mean rate must survive float32 input.
    counter = 9_000.0 + 0.01 * np.arange(901)
    x = np.stack([counter, np.zeros_like(counter)], axis=1)[None, :, :]
    feats = window_features(x.astype(np.float32).astype(np.float64), ("rate", "slope"))
    assert feats[0, 0] == pytest.approx(0.01, rel=1e-3)
    assert feats[0, 2] == pytest.approx(0.01, rel=1e-3)


def test_card_is_embedded_and_graph_is_valid() -> None:
    det = fit_zrms(np.random.default_rng(1).normal(size=(400, 2)), 10)
    model = det.to_onnx(_card(10, 2))
    proto = onnx.load_from_string(model)
    onnx.checker.check_model(proto, full_check=True)
    props = {p.key: p.value for p in proto.metadata_props}
    card = card_from_metadata(props, "test")
    assert card.name == "test-model" and card.version == 3 and card.sha256 is None
    assert CARD_METADATA_KEY in props
    inp = proto.graph.input[0]
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "window" and dims == ["batch", 10, 2]
    assert proto.graph.output[0].name == "score"


def test_card_mismatch_is_refused() -> None:
    det = fit_zrms(np.zeros((400, 2)) + 1.0, 10)
    with pytest.raises(ValueError, match="does not match the detector"):
        det.to_onnx(_card(20, 2))
    with pytest.raises(ValueError, match="does not match the detector"):
        det.to_onnx(_card(10, 3))
