"""Anomaly scoring on the edge: latency, throughput, memory, and SKAB quality.

``python -m bench.inference [--quick]`` — the last line is one JSON object:

* ``p50_ms`` / ``p99_ms`` — one poll of one device, from ``AnomalyScorer.observe`` (the poll's
  readings handed to the scorer) to the score and flag readings handed to the buffer: window
  assembly, the hop to the scoring thread, onnxruntime, the verdict. The shipped boiler model
  (600 x 8 window). The agent adds its batching delay (``coalesce_s``, 5 ms) on top, on purpose.
* ``windows_per_s`` — batched scoring (256 windows per call) through the agent's scoring thread,
  one intra-op thread, as on a gateway.
* ``rss_added_mb`` — median RSS of a real ``twin-edge run`` process polling 2 simulated boilers and
  2 meters with both shipped models loaded and scoring, minus the same agent without models; split
  into ``rss_added_anon_mb`` (heap: sessions, windows) and ``rss_added_file_mb`` (pages of
  onnxruntime's and numpy's shared libraries, shared with other processes and reclaimable).
* ``skab_f1`` / ``skab_far`` / ``skab_mar`` — the SKAB protocol on ``../shared/datasets/skab/data``
  through ONNX (``models.evaluate_skab``).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.common import log, run_bench
from edge.inference import AnomalyScorer, ScoredDevice, ScoringEngine
from edge.metrics import EdgeMetrics
from edge.reading import Reading
from fleet.broker import Mosquitto
from fleet.configs import shipped_models, write_edge_config
from fleet.procs import ReadyProcess
from models.evaluate_skab import load_recipe, run_protocol
from models.simdata import normal_series
from models.skab import iter_experiments, skab_data_dir
from protocol.profile import builtin_profile


class _Sink:
    """Stands in for the buffer: notes when the scorer hands over its readings."""

    def __init__(self) -> None:
        self.t_done = 0.0
        self.readings: list[Reading] = []

    async def submit(self, readings: list[Reading]) -> None:
        self.t_done = time.perf_counter()
        self.readings = readings


class _Events:
    async def add_event(self, type_: str, message: str, details: dict[str, int | float | str] | None = None, *,
                        device: str | None = None, ts_ms: int | None = None) -> None:
        return None


async def bench_latency(n: int) -> dict[str, Any]:
    """Per-poll latency of the scoring path with the shipped boiler model."""
    engine = ScoringEngine(1)
    try:
        model = await engine.load_file(shipped_models()["sim-boiler"], profile="sim-boiler")
        prof = builtin_profile("sim-boiler")
        device = ScoredDevice("boiler-1", prof.name, dict(prof.units), 1.0, {})
        sink = _Sink()
        scorer = AnomalyScorer([device], sink, _Events(), EdgeMetrics(), coalesce_s=0.0)
        scorer.activate(prof.name, model)
        # Real boiler behaviour (a held-out simulated unit), so the path is the everyday one: no
        # anomaly events, just scores.
        values = normal_series("boiler", 10_001, 7.0).columns(model.card.input_metrics)
        t0_ms = int(time.time() * 1000)

        def poll(i: int) -> list[Reading]:
            ts = t0_ms + i * 1000
            row = values[i % len(values)]
            return [Reading("boiler-1", m, ts, float(row[j]), prof.units[m])
                    for j, m in enumerate(model.card.input_metrics)]

        for i in range(model.card.window - 1):  # fill the window
            scorer.observe(poll(i))
        lat: list[float] = []
        deadline = time.monotonic() + 60.0
        for i in range(model.card.window - 1, model.card.window - 1 + n):
            if time.monotonic() > deadline:
                break
            readings = poll(i)
            t0 = time.perf_counter()
            scorer.observe(readings)
            await scorer.score_pending()
            lat.append((sink.t_done - t0) * 1000.0)
        assert sink.readings and sink.readings[0].metric == "anomaly_score", "scorer produced no score reading"
        q = np.quantile(np.array(lat), [0.5, 0.99])
        return {"p50_ms": round(float(q[0]), 3), "p99_ms": round(float(q[1]), 3), "latency_samples": len(lat)}
    finally:
        engine.close()


async def bench_throughput(seconds: float, batch: int = 256) -> dict[str, Any]:
    """Windows per second, batched, through the agent's scoring thread."""
    engine = ScoringEngine(1)
    try:
        model = await engine.load_file(shipped_models()["sim-boiler"], profile="sim-boiler")
        shape = (batch, model.card.window, len(model.card.inputs))
        windows = np.random.default_rng(2).normal(60.0, 5.0, shape).astype(np.float32)
        await model.score(windows)  # warm-up
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        for _ in range(100_000):
            if time.perf_counter() > deadline:
                break
            scores = await model.score(windows)
            n += len(scores)
        elapsed = time.perf_counter() - t0
        return {"windows_per_s": round(n / elapsed), "batch": batch}
    finally:
        engine.close()


def _rss_parts(pid: int) -> tuple[float, float, float]:
    """(RSS, anonymous part, file-backed part) in MiB: shared-library pages are the file-backed part."""
    fields: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(rest.split()[0]) / 1024
    return fields["VmRSS"], fields["RssAnon"], fields["RssFile"]


def _agent_rss(broker: Mosquitto, work: Path, devices: list[dict[str, Any]], label: str,
               models: dict[str, Path] | None, seconds: float) -> list[tuple[float, float, float]]:
    # 0.1 s polls fill the 600/900-sample windows in 60/90 s, so the full run measures scoring too.
    cfg = write_edge_config(work / f"edge-{label}.toml", site="bench", gateway=f"gw-{label}", mqtt_port=broker.port,
                            devices=devices, poll_interval_s=0.1, buffer_path=work / f"edge-{label}.db",
                            log_level="ERROR", models=models)
    edge = ReadyProcess.python("twin-edge", "edge.cli", "run", "--config", str(cfg),
                               log_path=work / f"edge-{label}.log").start()
    try:
        time.sleep(2.0)
        rss: list[tuple[float, float, float]] = []
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            rss.append(_rss_parts(edge.pid))
            time.sleep(0.5)
        return rss
    finally:
        edge.stop()


def bench_rss(seconds: float) -> dict[str, Any]:
    """RSS of the real agent with both shipped models vs without."""
    with tempfile.TemporaryDirectory(prefix="twin-bench-inf-") as tmp:
        work = Path(tmp)
        with Mosquitto(workdir=work / "mosquitto") as broker:
            sim = ReadyProcess.python("twin-sim", "firmware_sim.cli", "--boilers", "2", "--meters", "2",
                                      "--base-port", "0", "--speed", "10", "--tick", "1.0", "--log-level", "WARNING",
                                      log_path=work / "sim.log").start()
            try:
                devices = sim.ready["devices"]
                without = _agent_rss(broker, work, devices, "plain", None, seconds)
                with_models = _agent_rss(broker, work, devices, "models", shipped_models(), seconds)
            finally:
                sim.stop()
            failures = sum(1 for line in (work / "edge-models.log").read_text().splitlines()
                           if "model_load_failed" in line)
    if failures:
        raise SystemExit(f"the agent could not load the shipped models ({failures} failure(s)); see its log")
    base, loaded = (tuple(statistics.median(s[i] for s in samples) for i in range(3))
                    for samples in (without, with_models))
    return {"rss_without_model_mb": round(base[0], 1), "rss_with_models_mb": round(loaded[0], 1),
            "rss_added_mb": round(loaded[0] - base[0], 1),
            "rss_added_anon_mb": round(loaded[1] - base[1], 1), "rss_added_file_mb": round(loaded[2] - base[2], 1),
            "rss_seconds": seconds}


def bench_skab() -> dict[str, Any]:
    """The SKAB protocol through ONNX."""
    data = skab_data_dir()
    if not data.is_dir():
        raise SystemExit(f"SKAB data missing at {data} (set SKAB_DATA; see ../shared/datasets/skab/SOURCE.md)")
    s = run_protocol(list(iter_experiments(data)), load_recipe(), engine="onnx").summary()
    return {"skab_f1": s["f1"], "skab_far": s["far"], "skab_mar": s["mar"], "skab_files": s["files"]}


async def main_async(quick: bool) -> dict[str, Any]:
    """All four parts."""
    result: dict[str, Any] = {"mode": "quick" if quick else "full"}
    log("latency: one poll through the scoring path (shipped boiler model)")
    result.update(await bench_latency(2_000 if quick else 20_000))
    log(f"  p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms")
    log("throughput: batches of 256 windows")
    result.update(await bench_throughput(3.0 if quick else 15.0))
    log(f"  {result['windows_per_s']} windows/s")
    secs = 15.0 if quick else 120.0
    log(f"RSS: real agent with and without models, {secs:.0f} s each")
    result.update(await asyncio.to_thread(bench_rss, secs))
    log(f"  +{result['rss_added_mb']} MB")
    log("SKAB protocol")
    result.update(await asyncio.to_thread(bench_skab))
    log(f"  F1 {result['skab_f1']}, FAR {result['skab_far']} %, MAR {result['skab_mar']} %")
    result["cpu_count"] = psutil.cpu_count()
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the JSON summary as the last line."""
    return run_bench("bench.inference", __doc__, main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
