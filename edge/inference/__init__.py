"""Anomaly scoring on the gateway: ONNX models (``runtime``), per-device windows (``windows``), the
agent's scoring path (``scorer``) and model rollout from the hub (``rollout``). See docs/edge.md,
"Anomaly scoring and model rollout"."""

from __future__ import annotations

import ssl

from edge.buffer import ReadingBuffer
from edge.config import EdgeConfig
from edge.drivers.registry import point_intervals
from edge.inference.rollout import ModelRollout
from edge.inference.runtime import AnomalyModel, ModelLoadError, ScoringEngine, ScoringError, read_model_file
from edge.inference.scorer import (
    FLAG_METRIC,
    SCORE_METRIC,
    AnomalyScorer,
    EventSink,
    ScoredDevice,
    check_model_fits,
)
from edge.inference.windows import SampleWindow
from edge.metrics import EdgeMetrics
from edge.uplink import Uplink
from protocol.profile import DeviceProfile
from protocol.tls import client_context

__all__ = [
    "FLAG_METRIC",
    "SCORE_METRIC",
    "AnomalyModel",
    "AnomalyScorer",
    "EventSink",
    "ModelLoadError",
    "ModelRollout",
    "SampleWindow",
    "ScoredDevice",
    "ScoringEngine",
    "ScoringError",
    "check_local_models",
    "check_model_fits",
    "read_model_file",
    "scored_devices",
    "wire_inference",
]


def scored_devices(cfg: EdgeConfig, profiles: dict[str, DeviceProfile]) -> list[ScoredDevice]:
    """The configured devices as the scorer sees them (polled metrics, units, intervals)."""
    out = []
    for d in cfg.devices:
        prof = profiles[d.name]
        units = {m: u for m, u in prof.units.items() if d.points is None or m in d.points}
        out.append(ScoredDevice(d.name, prof.name, units, d.poll_interval_s, point_intervals(prof)))
    return out


def wire_inference(cfg: EdgeConfig, profiles: dict[str, DeviceProfile], buffer: ReadingBuffer, uplink: Uplink,
                   metrics: EdgeMetrics) -> tuple[ScoringEngine, AnomalyScorer, ModelRollout]:
    """Build the scoring path of an agent and connect it to its buffer and uplink.

    Scores and events go into ``buffer``; ``uplink`` reports the models in the status (and
    re-publishes it when they change) and hands model assignments to the rollout. Pollers must
    deliver through ``scorer.tap(buffer)``; ``scorer.run()`` and ``rollout.run()`` are the tasks.
    """
    engine = ScoringEngine(cfg.inference.intra_op_threads)
    scorer = AnomalyScorer(scored_devices(cfg, profiles), buffer, buffer, metrics, gap_factor=cfg.inference.gap_factor)
    rollout = ModelRollout(
        scorer, engine, buffer, metrics, site=cfg.gateway.site, gateway=cfg.gateway.name, model_dir=cfg.model_dir,
        local_models={m.profile: m.path for m in cfg.models}, hub_url=cfg.inference.hub_url,
        download_timeout_s=cfg.inference.download_timeout_s, tls_context=download_tls_context(cfg))
    uplink.model_status = rollout.status
    uplink.on_downlink("models", rollout.handle_assignment)
    rollout.on_status_change = uplink.status_changed
    return engine, scorer, rollout


def download_tls_context(cfg: EdgeConfig) -> ssl.SSLContext:
    """How model downloads from an ``https`` hub are verified: against ``[inference] ca_file``, else the
    broker's ``[mqtt] ca_file`` (one private CA usually signs both), else the system's trust store."""
    ca = cfg.inference.ca_file or (cfg.mqtt.ca_file if cfg.mqtt.tls else None)
    return client_context(ca)


def check_local_models(cfg: EdgeConfig, profiles: dict[str, DeviceProfile]) -> list[str]:
    """Problems of the ``[[models]]`` files (``twin-edge check-config``); empty when all are usable.

    The agent starts anyway and runs without scoring the profiles concerned.
    """
    if not cfg.models:
        return []
    devices = scored_devices(cfg, profiles)
    engine = ScoringEngine(cfg.inference.intra_op_threads)
    problems = []
    try:
        for m in cfg.models:
            try:
                model = engine.load_bytes(read_model_file(m.path), str(m.path), profile=m.profile)
                check_model_fits(model, m.profile, devices)
            except ModelLoadError as exc:
                problems.append(f"[[models]] profile {m.profile!r}: {exc}")
    finally:
        engine.close()
    return problems
