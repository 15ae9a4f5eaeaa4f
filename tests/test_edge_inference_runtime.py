"""Edge inference, the parts below the agent: model checks, scoring off the event loop, windows, config."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge.cli import main as edge_cli
from edge.config import load_config
from edge.inference import ModelLoadError, SampleWindow, ScoringEngine, read_model_file
from edge.inference.rollout import download
from edge.reading import Reading
from protocol.anomaly import MAX_MODEL_BYTES, ModelFileError, sha256_of
from protocol.schema import Quality
from protocol.tomlconfig import ConfigError
from tests.edge_onnx import card, div_zero_model, log_model, mad_model, mad_score, two_output_model
from tests.edgetools import ModelServer

CENTRE = [60.0, 1.5]


@pytest.fixture
def engine() -> ScoringEngine:
    e = ScoringEngine()
    yield e  # type: ignore[misc]
    e.close()


def test_good_model_loads_with_its_card_and_hash(engine: ScoringEngine) -> None:
    data = mad_model(card(), CENTRE)
    model = engine.load_bytes(data, "good.onnx", expected_sha256=sha256_of(data), profile="sim-boiler")
    assert (model.card.name, model.card.version, model.card.window) == ("test-boiler", 1, 4)
    assert model.card.input_metrics == ("flow_temp", "pressure")
    assert model.sha256 == sha256_of(data) and model.size == len(data)
    window = np.array([[61, 1.5], [59, 1.0], [60, 2.0], [62, 1.5]], np.float32)
    assert model.score_sync(window[None]).tolist() == [1.25]  # (1+1+0+2)/4 + (0+.5+.5+0)/4


BROKEN = [
    ("no card", lambda: mad_model(None, CENTRE), "card", "no model card (metadata property 'twin.card' missing)"),
    ("rank 2", lambda: mad_model(card(), CENTRE, rank=2), "shape",
     "input 'window' has rank 2 ['N', 2], expected rank 3 [batch, 4, 2]"),
    ("3 features for 2 inputs", lambda: mad_model(card(), [0.0, 0.0, 0.0]), "shape",
     "input 'window' has 3 features (last dimension), but the card lists 2 inputs ['flow_temp', 'pressure']"),
    ("window 5 for a card of 4", lambda: mad_model(card(), CENTRE, window=5), "shape",
     "input 'window' has a window of 5 samples, but the card says 4"),
    ("fixed batch", lambda: mad_model(card(), CENTRE, batch=4), "shape", "fixed batch dimension of 4"),
    ("input name", lambda: mad_model(card(), CENTRE, input_name="x"), "shape",
     "model inputs are ['x'], expected exactly ['window']"),
    ("output name", lambda: two_output_model(card()), "shape", "model outputs are ['anomaly'], no 'score'"),
    ("card of another profile", lambda: mad_model(card(profile="sim-meter"), CENTRE), "card",
     "its card is for profile 'sim-meter', not 'sim-boiler'"),
    ("opset from the future", lambda: mad_model(card(), CENTRE, opset=99), "opset",
     "uses opset 99 of domain ai.onnx, but onnxruntime"),
    ("IR version from the future", lambda: mad_model(card(), CENTRE, ir_version=99), "opset",
     "has ONNX IR version 99, but onnxruntime"),
    ("truncated", lambda: mad_model(card(), CENTRE)[:60], "corrupt", "not a readable ONNX model (corrupt or truncated"),
    ("garbage", lambda: b"\x00\xff not onnx at all" * 10, "corrupt", "not a readable ONNX model"),
    ("empty", lambda: b"", "corrupt", "empty file"),
    ("too big", lambda: b"\0" * (MAX_MODEL_BYTES + 1), "too-big", f"more than the {MAX_MODEL_BYTES} a model may have"),
]


@pytest.mark.parametrize(("label", "build", "kind", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_models_are_refused_with_a_clear_reason(engine: ScoringEngine, label: str, build: object,
                                                       kind: str, message: str) -> None:
    with pytest.raises(ModelFileError) as err:
        engine.load_bytes(build(), f"/models/{label}.onnx", profile="sim-boiler")  # type: ignore[operator]
    assert isinstance(err.value, ModelLoadError) and err.value.kind == kind
    assert str(err.value).startswith(f"/models/{label}.onnx: ")
    assert message in str(err.value)


def test_wrong_sha256_is_refused(engine: ScoringEngine) -> None:
    data = mad_model(card(), CENTRE)
    with pytest.raises(ModelLoadError) as err:
        engine.load_bytes(data, "m.onnx", expected_sha256="0" * 64)
    assert err.value.kind == "sha256"
    assert str(err.value) == f"m.onnx: SHA-256 is {sha256_of(data)}, expected {'0' * 64}"


def test_model_files_missing_too_big_or_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        read_model_file(tmp_path / "nope.onnx")
    assert (err.value.kind, str(err.value)) == ("missing", f"{tmp_path / 'nope.onnx'}: model file not found")
    big = tmp_path / "big.onnx"
    big.write_bytes(b"\0" * (MAX_MODEL_BYTES + 1))
    with pytest.raises(ModelLoadError) as err:
        read_model_file(big)
    assert err.value.kind == "too-big" and f"{MAX_MODEL_BYTES + 1} bytes" in str(err.value)
    with pytest.raises(ModelLoadError) as err:
        read_model_file(tmp_path)
    assert err.value.kind == "unreadable"


@pytest.mark.parametrize("build", [log_model, div_zero_model], ids=["log-of-negative", "div-by-zero"])
async def test_self_test_refuses_non_finite_scores(engine: ScoringEngine, build: object) -> None:
    model = await engine.load(build(card()), "nan.onnx")  # type: ignore[operator]
    probe = np.full((1, 4, 2), -1.0, np.float32)  # log(-1) = NaN; -1/0 = -inf
    with pytest.raises(ModelLoadError) as err:
        await model.self_test(probe)
    assert err.value.kind == "self-test"
    assert "nan.onnx: self-test score is not finite" in str(err.value)
    assert "on a window of 2 inputs x 4 samples" in str(err.value)


async def test_log_model_passes_self_test_on_positive_inputs(engine: ScoringEngine) -> None:
    model = await engine.load(log_model(card()), "log.onnx")
    scores = await model.self_test(np.full((2, 4, 2), np.e, np.float32))
    assert scores.tolist() == pytest.approx([2.0, 2.0], rel=1e-6)


async def test_scoring_runs_on_the_worker_thread_not_the_event_loop(engine: ScoringEngine) -> None:
    model = await engine.load(mad_model(card(), CENTRE), "m.onnx")
    windows = np.stack([np.full((4, 2), v, np.float32) for v in (60.0, 61.0, 58.0)])
    windows[:, :, 1] = 1.5
    scores = await model.score(windows)
    assert scores.dtype == np.float32 and scores.tolist() == [0.0, 1.0, 2.0]  # one call, three windows
    assert model.last_thread is not None and model.last_thread != threading.get_ident()
    names = {t.ident: t.name for t in threading.enumerate()}
    assert names[model.last_thread].startswith("edge-inference")
    # Every model shares that one thread.
    other = await engine.load(mad_model(card(name="other"), CENTRE), "o.onnx")
    await other.score(windows)
    assert other.last_thread == model.last_thread


async def test_event_loop_keeps_running_while_a_batch_scores(engine: ScoringEngine) -> None:
    model = await engine.load(mad_model(card(window=512), CENTRE), "m.onnx")
    windows = np.random.default_rng(1).normal(60, 1, (4000, 512, 2)).astype(np.float32)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)
    ticker = asyncio.create_task(tick())
    t0 = time.perf_counter()
    scores = await model.score(windows)
    elapsed = time.perf_counter() - t0
    ticker.cancel()
    assert scores.shape == (4000,)
    assert scores[0] == pytest.approx(mad_score(windows[0], CENTRE), rel=1e-5)
    # The loop ticked all along (a blocked loop would tick once or twice).
    assert elapsed > 0.01 and ticks >= min(5, elapsed / 0.004), (ticks, elapsed)


async def test_batch_dimension_fixed_at_one_is_scored_window_by_window(engine: ScoringEngine) -> None:
    model = await engine.load(mad_model(card(), CENTRE, batch=1), "b1.onnx")
    windows = np.zeros((3, 4, 2), np.float32)
    windows[1] += 1
    assert (await model.score(windows)).tolist() == [61.5, 59.5, 61.5]


# -- windows -------------------------------------------------------------------------------

def poll(ts: int, flow: object = 60.0, pressure: object = 1.5, burner: object = True,
         bad: tuple[str, ...] = ()) -> list[Reading]:
    values = {"flow_temp": flow, "pressure": pressure, "burner_on": burner, "fault_code": 0}
    return [Reading("boiler-1", m, ts, None if m in bad else v, "", Quality.BAD if m in bad else Quality.GOOD)
            for m, v in values.items() if v is not None or m in bad]


def test_window_fills_in_card_order_and_wraps() -> None:
    w = SampleWindow(("pressure", "flow_temp", "burner_on"), 3, period_s=1.0)
    assert w.observe(poll(1000, 60.0, 1.5, True))
    assert not w.full and w.array().tolist() == [[1.5, 60.0, 1.0]]
    assert w.observe(poll(2000, 61.0, 1.25, False))
    assert w.observe(poll(3000, 62.0, 1.0, True))
    assert w.full
    assert w.observe(poll(4000, 63.0, 0.75, False))
    assert w.array().tolist() == [[1.25, 61.0, 0.0], [1.0, 62.0, 1.0], [0.75, 63.0, 0.0]]  # oldest first
    assert w.array().dtype == np.float32
    assert w.last_sample().tolist() == [0.75, 63.0, 0.0]  # type: ignore[union-attr]


def test_bad_missing_or_non_numeric_inputs_add_no_sample() -> None:
    w = SampleWindow(("flow_temp", "pressure"), 2, period_s=1.0)
    assert w.observe(poll(1000)) is True
    assert w.observe(poll(2000, bad=("pressure",))) is False  # bad quality
    assert w.observe(poll(2500, pressure=None)) is False  # missing from the poll
    assert w.observe(poll(2600, flow="n/a")) is False  # a string
    assert w.observe([Reading("boiler-1", "burner_on", 2700, True, "")]) is None  # no input at all: not a sample
    assert (w.count, w.skipped, w.resets) == (1, 3, 0)
    assert w.observe(poll(3000, 62.0)) is True  # 2 s after the last sample: within 3 periods
    assert w.full and w.array().tolist() == [[60.0, 1.5], [62.0, 1.5]]


def test_a_gap_restarts_the_window() -> None:
    w = SampleWindow(("flow_temp", "pressure"), 3, period_s=1.0, gap_factor=3.0)
    for i in range(3):
        w.observe(poll(1000 * (i + 1), 60.0 + i))
    assert w.full
    w.observe(poll(7001, 70.0))  # 4.001 s after the last sample > 3 periods
    assert (w.full, w.count, w.resets) == (False, 1, 1)
    assert w.array().tolist() == [[70.0, 1.5]]
    w.observe(poll(10001, 71.0))  # exactly 3 periods later: no gap
    assert (w.count, w.resets) == (2, 1)
    w.observe(poll(9000, 72.0))  # the clock went back: restart too
    assert (w.count, w.resets) == (1, 2)


# -- configuration -------------------------------------------------------------------------

CONFIG = """\
[gateway]
site = "site-1"
name = "gw-1"

[buffer]
path = "var/buf.db"

[inference]
intra_op_threads = 2
hub_url = "http://hub.local:8000"

[[models]]
profile = "sim-boiler"
path = "models/boiler.onnx"

[[devices]]
name = "boiler-1"
profile = "sim-boiler"
host = "127.0.0.1"
"""


def test_inference_config_defaults_and_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(CONFIG)
    cfg, _ = load_config(path)
    assert cfg.inference.intra_op_threads == 2
    assert cfg.models[0].path == tmp_path / "models" / "boiler.onnx"
    assert cfg.model_dir == tmp_path / "var" / "models"  # default: beside the buffer
    path.write_text(CONFIG.replace("[inference]\n", '[inference]\nmodel_dir = "dl"\n'))
    cfg, _ = load_config(path)
    assert cfg.model_dir == tmp_path / "dl"
    assert (cfg.inference.download_timeout_s, cfg.inference.gap_factor) == (60.0, 3.0)


@pytest.mark.parametrize(("change", "expected"), [
    (("intra_op_threads = 2", "intra_op_threads = 0"),
     ":9: inference.intra_op_threads: Input should be greater than or equal to 1"),
    (('hub_url = "http://hub.local:8000"', 'hub_url = "ftp://hub"'), ":10: inference.hub_url: String should match"),
    (('profile = "sim-boiler"\npath', 'profile = "sim-meter"\npath'),
     ":13: models[0].profile: no device uses profile 'sim-meter' (devices use: ['sim-boiler'])"),
    (('path = "models/boiler.onnx"', 'path = "models/boiler.onnx"\ncolour = 1'), ":15: models[0].colour: Extra"),
    (('path = "models/boiler.onnx"\n', 'path = "models/boiler.onnx"\n\n[[models]]\nprofile = "sim-boiler"\n'
      'path = "b.onnx"\n'), "one [[models]] entry per profile; repeated: ['sim-boiler']"),
])
def test_inference_config_errors_name_line_and_key(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(CONFIG.replace(*change))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert any(expected in p for p in err.value.problems), err.value.problems


def test_check_config_warns_about_an_unusable_model_but_passes(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(CONFIG)
    assert edge_cli(["check-config", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"warning: [[models]] profile 'sim-boiler': {tmp_path / 'models' / 'boiler.onnx'}: model file not found" \
        in err
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "boiler.onnx").write_bytes(mad_model(card(), CENTRE))
    assert edge_cli(["check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "1 local model(s)" in out and err == ""
    (tmp_path / "models" / "boiler.onnx").write_bytes(
        mad_model(card(inputs=[{"metric": "flow_temp", "unit": "bar"}, {"metric": "pressure", "unit": "bar"}]),
                  CENTRE))
    assert edge_cli(["check-config", "--config", str(path)]) == 0
    assert "input 'flow_temp' is in 'bar' on the card but 'degC' in profile 'sim-boiler'" in capsys.readouterr().err


def test_example_config_still_validates() -> None:
    root = Path(__file__).resolve().parents[1]
    assert edge_cli(["check-config", "--config", str(root / "examples" / "edge.toml")]) == 0


# -- downloads -------------------------------------------------------------------------------

def test_download_fetches_http_only_within_size_and_reports_failures() -> None:
    with ModelServer() as server:
        server.files["/m"] = b"x" * 100
        assert download(server.url("/m"), 100, 5) == b"x" * 100
        with pytest.raises(ModelLoadError) as err:
            download(server.url("/m"), 50, 5)
        assert (err.value.kind, err.value.reason) == ("download", "the server sends 100 bytes, more than the 50 "
                                                                  "expected")
        with pytest.raises(ModelLoadError) as err:
            download(server.url("/nope"), 50, 5)
        assert str(err.value) == f"{server.url('/nope')}: HTTP 404 no such model"
        port = server.url("").rsplit(":", 1)[1]
    with pytest.raises(ModelLoadError) as err:
        download(f"http://127.0.0.1:{port}/m", 50, 5)  # the server is gone
    assert err.value.kind == "download" and "cannot fetch" in err.value.reason
    with pytest.raises(ModelLoadError) as err:
        download("file:///etc/passwd", 50, 5)
    assert err.value.reason == "only http and https URLs are fetched, not 'file'"


def test_an_agent_without_models_loads_neither_onnxruntime_nor_numpy() -> None:
    # About 33 MB of RSS on a gateway that may have no model at all.
    code = "import sys, edge.agent, edge.cli; print(sorted(m for m in ('numpy', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_onnxruntime_telemetry_is_off(tmp_path: Path) -> None:
    # onnxruntime >= 1.29 writes ~/.cache/Microsoft and tries to reach a collector unless told not
    # to; the edge's loader must tell it, whatever the environment of the process says.
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env["HOME"] = str(tmp_path)
    code = ("import os; from edge.inference.runtime import onnxruntime_version; onnxruntime_version(); "
            "print(os.environ['ORT_DISABLE_TELEMETRY'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                          cwd=Path(__file__).resolve().parents[1], check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"
    assert not (tmp_path / ".cache" / "Microsoft").exists()
