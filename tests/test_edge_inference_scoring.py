"""Anomaly scoring in the agent: score and flag readings, hysteresis events, failures that never
stop data collection. The scorer writes into a real SQLite buffer; the agent tests run the whole
edge agent against simulated Modbus devices and a real Mosquitto."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import numpy as np
import pytest
import structlog

from edge.buffer import ReadingBuffer
from edge.inference import AnomalyScorer, ScoredDevice, ScoringEngine
from edge.metrics import EdgeMetrics
from edge.reading import Reading, StoredReading
from firmware_sim import SimConfig, Simulators, run_simulators
from fleet.broker import Mosquitto
from protocol.profile import builtin_profile
from tests.edge_onnx import card, log_model, mad_model, mad_score
from tests.edgetools import agent_toml, collect, running_agent

BOILER_UNITS = builtin_profile("sim-boiler").units
DEVICES = {"boiler-1": ("boiler", "sim-boiler"), "boiler-2": ("boiler", "sim-boiler")}
CENTRE = [60.0, 1.5]


def sample(device: str, ts: int, flow: float, pressure: float = 1.5) -> list[Reading]:
    """One poll of a boiler (the two model inputs and two other points)."""
    return [Reading(device, "flow_temp", ts, flow, "degC"), Reading(device, "pressure", ts, pressure, "bar"),
            Reading(device, "burner_on", ts, True, ""), Reading(device, "fault_code", ts, 0, "")]


class Rig:
    def __init__(self, buffer: ReadingBuffer, scorer: AnomalyScorer, engine: ScoringEngine,
                 metrics: EdgeMetrics) -> None:
        self.buffer = buffer
        self.scorer = scorer
        self.engine = engine
        self.metrics = metrics
        self.sink = scorer.tap(buffer)

    async def poll(self, readings: list[Reading]) -> int:
        """What a poller does, then one scoring round; returns windows scored."""
        await self.sink.submit(readings)
        return await self.scorer.score_pending()

    async def rows(self, metrics: tuple[str, ...] = ("anomaly_score", "anomaly")) -> list[StoredReading]:
        await self.buffer.flush()
        return [r for r in await self.buffer.fetch(0, 100_000) if r.metric in metrics]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    buffer = ReadingBuffer(tmp_path / "buf.db")
    await buffer.open()
    await buffer.register_devices(DEVICES)
    engine = ScoringEngine()
    metrics = EdgeMetrics()
    devices = [ScoredDevice(n, "sim-boiler", BOILER_UNITS, 1.0) for n in DEVICES]
    scorer = AnomalyScorer(devices, buffer, buffer, metrics)
    try:
        yield Rig(buffer, scorer, engine, metrics)
    finally:
        engine.close()
        await buffer.close()


async def test_scores_and_flags_are_readings_with_the_poll_timestamp(rig: Rig) -> None:
    model = await rig.engine.load(mad_model(card(), CENTRE), "m.onnx")
    rig.scorer.check_model(model, "sim-boiler")
    rig.scorer.activate("sim-boiler", model)
    flows = [61.0, 59.0, 60.0, 62.0, 64.0, 66.0]
    pressures = [1.5, 1.0, 2.0, 1.5, 1.5, 1.5]
    scored = []
    for i, (f, p) in enumerate(zip(flows, pressures, strict=True)):
        scored.append(await rig.poll(sample("boiler-1", 1_000_000 + 1000 * i, f, p)))
    assert scored == [0, 0, 0, 1, 1, 1]  # nothing until the window (4 samples) is full
    rows = await rig.rows()
    expected = []
    for end in (4, 5, 6):
        window = np.column_stack([flows[end - 4:end], pressures[end - 4:end]])
        score = mad_score(window, CENTRE)
        expected += [("anomaly_score", 1_000_000 + 1000 * (end - 1), score, "", "good"),
                     ("anomaly", 1_000_000 + 1000 * (end - 1), score > 1.0, "", "good")]
    assert [(r.metric, r.ts_ms, r.value, r.unit, r.quality) for r in rows] == expected
    assert [r.value for r in rows] == [1.25, True, 2.0, True, 3.125, True]
    assert all(r.device == "boiler-1" for r in rows)
    # They carry the device's own sequence numbers, after the poll's readings.
    polled = await rig.rows(("flow_temp",))
    assert rows[0].seq > polled[3].seq
    assert rig.metrics.windows_scored.labels("boiler-1")._value.get() == 3


async def test_devices_of_one_cycle_are_scored_in_one_call(rig: Rig) -> None:
    model = await rig.engine.load(mad_model(card(window=1), CENTRE), "m.onnx")
    rig.scorer.activate("sim-boiler", model)
    await rig.sink.submit(sample("boiler-1", 5000, 61.0))
    await rig.sink.submit(sample("boiler-2", 5003, 63.0))
    assert await rig.scorer.score_pending() == 2
    assert rig.metrics.scoring_latency.labels("sim-boiler")._sum.get() > 0
    count = next(s.value for m in rig.metrics.scoring_latency.collect() for s in m.samples
                 if s.name.endswith("_count"))
    assert count == 1  # both windows, one call
    assert {(r.device, r.ts_ms, r.value) for r in await rig.rows(("anomaly_score",))} == {
        ("boiler-1", 5000, 1.0), ("boiler-2", 5003, 3.0)}


async def test_anomaly_events_follow_the_hysteresis(rig: Rig) -> None:
    # Window of one sample: the score is |flow - 60| (pressure at the centre). Threshold 1.0, clear at 0.5.
    model = await rig.engine.load(mad_model(card(window=1, threshold=1.0, clear_threshold=0.5), CENTRE), "m.onnx")
    rig.scorer.activate("sim-boiler", model)
    flows = [60.25, 61.0, 61.5, 60.75, 60.5, 60.75, 62.0]
    for i, f in enumerate(flows):
        await rig.poll(sample("boiler-1", 10_000 + 1000 * i, f))
    flags = [r.value for r in await rig.rows(("anomaly",))]
    #        0.25   1.0 (not > 1)  1.5 start  0.75 holds  0.5 clears  0.75 (< 1)  2.0 starts
    assert flags == [False, False, True, True, False, False, True]
    events = await rig.buffer.events()
    assert [(e.type, e.device, e.ts_ms) for e in events] == [
        ("anomaly_started", "boiler-1", 12_000), ("anomaly_cleared", "boiler-1", 14_000),
        ("anomaly_started", "boiler-1", 16_000)]
    assert events[0].details == {"model": "test-boiler", "version": 1, "score": 1.5, "threshold": 1.0,
                                 "clear_at": 0.5}
    assert events[1].details["score"] == 0.5
    assert events[0].message == "boiler-1: anomaly score 1.5 above threshold 1 (test-boiler v1)"
    assert rig.scorer.anomalous("boiler-1")
    assert rig.metrics.anomaly_active.labels("boiler-1")._value.get() == 1


async def test_events_of_one_type_never_share_a_timestamp(rig: Rig) -> None:
    # The hub keeps one event per (gateway, ts, type): two devices starting in the same ms must both arrive.
    model = await rig.engine.load(mad_model(card(window=1), CENTRE), "m.onnx")
    rig.scorer.activate("sim-boiler", model)
    await rig.sink.submit(sample("boiler-1", 7000, 70.0))
    await rig.sink.submit(sample("boiler-2", 7000, 70.0))
    await rig.scorer.score_pending()
    events = await rig.buffer.events()
    assert [(e.type, e.device, e.ts_ms) for e in events] == [("anomaly_started", "boiler-1", 7000),
                                                              ("anomaly_started", "boiler-2", 7001)]


async def test_bad_polls_and_gaps_delay_scores_instead_of_faking_them(rig: Rig) -> None:
    model = await rig.engine.load(mad_model(card(window=2), CENTRE), "m.onnx")
    rig.scorer.activate("sim-boiler", model)
    await rig.poll(sample("boiler-1", 1000, 61.0))
    bad = [Reading("boiler-1", "flow_temp", 2000, None, "degC", quality="bad"),  # type: ignore[arg-type]
           Reading("boiler-1", "pressure", 2000, 1.5, "bar")]
    assert await rig.poll(bad) == 0
    assert await rig.poll(sample("boiler-1", 3000, 62.0)) == 1  # 2 s later: still one window
    assert await rig.poll(sample("boiler-1", 9000, 63.0)) == 0  # 6 s gap: window restarted
    assert rig.metrics.window_resets.labels("boiler-1")._value.get() == 1
    assert await rig.poll(sample("boiler-1", 10_000, 64.0)) == 1
    assert [(r.ts_ms, r.value) for r in await rig.rows(("anomaly_score",))] == [(3000, 1.5), (10_000, 3.5)]


async def test_non_finite_scores_are_not_emitted_and_stop_the_model(rig: Rig) -> None:
    model = await rig.engine.load(log_model(card(window=1)), "log.onnx")
    rig.scorer.activate("sim-boiler", model)
    assert await rig.poll(sample("boiler-1", 1000, np.e, 1.0)) == 1  # log(e) + log(1) = 1
    assert await rig.poll(sample("boiler-1", 2000, -5.0, 1.0)) == 0  # log(-5): NaN
    assert await rig.poll(sample("boiler-1", 3000, np.e, 1.0)) == 0  # the model is out of service
    assert [(r.ts_ms, r.value) for r in await rig.rows(("anomaly_score",))] == [(1000, pytest.approx(1.0))]
    assert model.failed is not None and "returned a non-finite score (nan)" in model.failed
    assert rig.scorer.active("sim-boiler") is None  # no previous model to go back to
    assert rig.metrics.scoring_failures.labels("sim-boiler")._value.get() == 1
    # The poll's readings themselves were all stored.
    assert len(await rig.rows(("flow_temp", "pressure"))) == 6


async def test_observe_never_raises_into_the_poller(rig: Rig) -> None:
    model = await rig.engine.load(mad_model(card(window=1), CENTRE), "m.onnx")
    rig.scorer.activate("sim-boiler", model)
    rig.scorer._windows["boiler-1"] = None  # type: ignore[assignment]  # a bug in the scoring path
    await rig.sink.submit(sample("boiler-1", 1000, 61.0))  # does not raise
    assert len(await rig.rows(("flow_temp",))) == 1


# -- the whole agent -------------------------------------------------------------------------

@pytest.fixture
async def sims() -> AsyncIterator[Simulators]:
    # speed=0: the simulated clock stands still, so every poll reads the same values.
    async with run_simulators(SimConfig(boilers=1, meters=1, base_port=0, speed=0, start_hour=7)) as sim:
        sim.step(600)
        yield sim


async def test_agent_scores_a_simulated_boiler_and_forwards_the_scores(mosquitto: Mosquitto, tmp_path: Path,
                                                                       sims: Simulators) -> None:
    truth = sims.device("boiler-1").visible
    centre = [float(truth["flow_temp"]) - 2.0, float(truth["pressure"]) + 0.25]  # type: ignore[arg-type]
    (tmp_path / "m.onnx").write_bytes(mad_model(card(threshold=2.0, clear_threshold=1.0, sample_period_s=0.1),
                                                centre))
    path = agent_toml(tmp_path, sims, mosquitto, extra='[[models]]\nprofile = "sim-boiler"\npath = "m.onnx"\n')
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t-ai") as sub:
        await sub.subscribe("twin/v1/site-1/gw-ai/#", qos=1)
        async with running_agent(path) as agent:
            got = await collect(sub, lambda g: len(g.get("boiler-1.anomaly", [])) >= 3 and g["events"]
                                and any(st.models for st in g["status"]))
            assert agent.metrics.windows_scored.labels("boiler-1")._value.get() >= 3
    window = np.tile([truth["flow_temp"], truth["pressure"]], (4, 1))
    expected = mad_score(window, centre)  # 2 + 0.25 in float32
    assert expected == pytest.approx(2.25, abs=1e-4)
    scores = got["boiler-1.anomaly_score"]
    assert all(r.value == pytest.approx(expected, abs=1e-5) and r.unit == "" and r.quality == "good" for r in scores)
    assert all(r.value is True for r in got["boiler-1.anomaly"])
    # Same timestamp as the poll that completed the window.
    polled_ts = {r.ts for r in got["boiler-1.flow_temp"]}
    assert {r.ts for r in scores} <= polled_ts
    assert "meter-1.anomaly_score" not in got  # no model for meters
    events = got["events"]
    assert [(e.type, e.device) for e in events] == [("anomaly_started", "boiler-1")]  # once: it stays active
    assert events[0].details == {"model": "test-boiler", "version": 1, "score": pytest.approx(expected),
                                 "threshold": 2.0, "clear_at": 1.0}
    assert events[0].ts == scores[0].ts
    status = next(st for st in got["status"] if st.models)
    assert status.state == "online" and status.models["sim-boiler"].version == 1
    assert status.models["sim-boiler"].state == "active" and status.models["sim-boiler"].error == ""
    assert "sim-meter" not in status.models


@pytest.mark.parametrize("problem", ["missing", "corrupt", "wrong-profile"])
async def test_agent_without_a_usable_model_still_collects_and_forwards(mosquitto: Mosquitto, tmp_path: Path,
                                                                        sims: Simulators, problem: str) -> None:
    if problem == "corrupt":
        (tmp_path / "m.onnx").write_bytes(mad_model(card(), CENTRE)[:100])
    elif problem == "wrong-profile":
        (tmp_path / "m.onnx").write_bytes(mad_model(card(profile="sim-meter"), CENTRE))
    kind = {"missing": "missing", "corrupt": "corrupt", "wrong-profile": "card"}[problem]
    path = agent_toml(tmp_path, sims, mosquitto, extra='[[models]]\nprofile = "sim-boiler"\npath = "m.onnx"\n')
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t-nomodel") as sub:
        await sub.subscribe("twin/v1/site-1/gw-ai/#", qos=1)
        with structlog.testing.capture_logs() as logs:
            async with running_agent(path) as agent:
                got = await collect(sub, lambda g: len(g.get("boiler-1.flow_temp", [])) >= 10
                                    and len(g.get("meter-1.power", [])) >= 10 and g["events"])
                await asyncio.wait_for(agent.rollout.started.wait(), 5)
                assert agent.metrics.model_load_failures.labels("sim-boiler", kind)._value.get() == 1
                assert agent.scorer.active("sim-boiler") is None
    assert all(r.quality == "good" for r in got["boiler-1.flow_temp"])
    assert not any(k.endswith(".anomaly_score") for k in got)
    # The hub hears of it too.
    assert [(e.type, e.details["kind"], e.details["source"]) for e in got["events"]] == [
        ("model_rejected", kind, "local")]
    # The log says which file and why, in one structured entry.
    failures = [e for e in logs if e["event"] == "model_load_failed"]
    assert len(failures) == 1 and failures[0]["log_level"] == "error"
    assert failures[0]["file"] == str(tmp_path / "m.onnx") and failures[0]["kind"] == kind
    assert failures[0]["profile"] == "sim-boiler"
    expected = {"missing": "model file not found", "corrupt": "not a readable ONNX model",
                "wrong-profile": "its card is for profile 'sim-meter', not 'sim-boiler'"}[problem]
    assert expected in failures[0]["reason"]
