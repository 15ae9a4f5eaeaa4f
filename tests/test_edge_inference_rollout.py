"""Model rollout on the edge over a real Mosquitto, with model files served over HTTP on 127.0.0.1.

The hub's side is played by the test: it publishes a retained ModelAssignmentV1 and serves the
files. The full-agent test polls a simulated boiler; the others build the agent's buffer, uplink
and scoring path with the agent's own wiring and feed the samples themselves, so that a model can
be shown exactly the values that make it fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from edge.buffer import ReadingBuffer
from edge.config import EdgeConfig
from edge.inference import AnomalyScorer, ModelRollout, wire_inference
from edge.metrics import EdgeMetrics
from edge.reading import Reading
from edge.uplink import Uplink
from firmware_sim import SimConfig, Simulators, run_simulators
from fleet.broker import Mosquitto
from protocol import topics
from protocol.anomaly import sha256_of
from protocol.profile import builtin_profile
from protocol.schema import ModelAssignmentItemV1, ModelAssignmentV1, StatusV1, encode
from tests.edge_onnx import card, log_model, mad_model, mad_score
from tests.edgetools import ModelServer, agent_toml, collect, running_agent

SITE = "site-1"
CENTRE_V1 = [60.0, 1.5]
CENTRE_V2 = [50.0, 1.0]


def item(data: bytes, url: str, version: int = 2, profile: str = "sim-boiler", sha256: str | None = None,
         name: str = "test-boiler") -> ModelAssignmentItemV1:
    return ModelAssignmentItemV1(profile=profile, name=name, version=version, sha256=sha256 or sha256_of(data),
                                 size=len(data), url=url)


async def assign(broker: Mosquitto, gateway: str, *items: ModelAssignmentItemV1) -> None:
    """Publish the retained assignment, as the hub does."""
    msg = ModelAssignmentV1(site=SITE, gateway=gateway, ts=time.time_ns() // 1_000_000, models=list(items))
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"t-hub-{time.monotonic_ns()}") as hub:
        await hub.publish(topics.models_topic(SITE, gateway), encode(msg), qos=1, retain=True)


def model_events(got: dict[str, list[Any]]) -> list[Any]:
    """The model_* events among those collected (anomaly events go to the same topic)."""
    return [e for e in got["events"] if e.type.startswith("model_")]


def model_state(st: StatusV1, profile: str = "sim-boiler") -> tuple[int, str] | None:
    m = st.models.get(profile)
    return None if m is None else (m.version, m.state.value)


async def until(pred: Callable[[], object], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


# -- the whole agent ---------------------------------------------------------------------------

@pytest.fixture
async def sims() -> AsyncIterator[Simulators]:
    async with run_simulators(SimConfig(boilers=1, meters=0, base_port=0, speed=0, start_hour=7)) as sim:
        sim.step(600)
        yield sim


async def test_agent_switches_to_an_assigned_model_and_keeps_it_across_a_restart(
        mosquitto: Mosquitto, tmp_path: Path, sims: Simulators) -> None:
    truth = sims.device("boiler-1").visible
    window = np.tile([truth["flow_temp"], truth["pressure"]], (4, 1))
    v1 = mad_model(card(sample_period_s=0.1), CENTRE_V1)
    v2 = mad_model(card(version=2, sample_period_s=0.1), CENTRE_V2)
    s1, s2 = mad_score(window, CENTRE_V1), mad_score(window, CENTRE_V2)
    assert abs(s1 - s2) > 1
    (tmp_path / "v1.onnx").write_bytes(v1)
    path = agent_toml(tmp_path, sims, mosquitto, extra='[[models]]\nprofile = "sim-boiler"\npath = "v1.onnx"\n',
                      devices=("boiler-1",))
    model_dir = tmp_path / "models"
    with ModelServer() as server:
        server.files["/api/v1/models/test-boiler/2/file"] = v2
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t-watch") as sub:
            await sub.subscribe("twin/v1/site-1/gw-ai/#", qos=1)
            async with running_agent(path) as agent:
                got = await collect(sub, lambda g: g.get("boiler-1.anomaly_score")
                                    and any(model_state(st) == (1, "active") for st in g["status"]))
                assert got["boiler-1.anomaly_score"][0].value == pytest.approx(s1, abs=1e-5)
                await assign(mosquitto, "gw-ai", item(v2, server.url("/api/v1/models/test-boiler/2/file")))
                got = await collect(sub, lambda g: any(model_state(st) == (2, "active") for st in g["status"])
                                    and g["events"]
                                    and any(r.value == pytest.approx(s2, abs=1e-5)
                                            for r in g.get("boiler-1.anomaly_score", [])))
                assert agent.metrics.model_activations.labels("sim-boiler")._value.get() == 1
        # Every score is v1's or v2's, none is missing or made up around the switch.
        values = [r.value for r in got.get("boiler-1.anomaly_score", [])]
        assert all(v == pytest.approx(s1, abs=1e-5) or v == pytest.approx(s2, abs=1e-5) for v in values)
        first_v2 = next(i for i, v in enumerate(values) if v == pytest.approx(s2, abs=1e-5))
        assert all(v == pytest.approx(s2, abs=1e-5) for v in values[first_v2:])
        assert [(e.type, e.details) for e in got["events"]] == [("model_activated", {
            "profile": "sim-boiler", "model": "test-boiler", "version": 2, "sha256": sha256_of(v2),
            "previous_version": 1})]
        status = next(st for st in got["status"] if model_state(st) == (2, "active"))
        assert status.models["sim-boiler"].sha256 == sha256_of(v2) and status.models["sim-boiler"].error == ""
        assert server.requests == ["/api/v1/models/test-boiler/2/file"]
    # Stored and recorded, atomically (no temp files left).
    assert (model_dir / f"{sha256_of(v2)}.onnx").read_bytes() == v2
    active = json.loads((model_dir / "active.json").read_text())
    assert active["models"] == {"sim-boiler": {"name": "test-boiler", "version": 2, "sha256": sha256_of(v2),
                                               "file": f"{sha256_of(v2)}.onnx"}}
    assert sorted(f.name for f in model_dir.iterdir()) == sorted(["active.json", f"{sha256_of(v2)}.onnx"])
    # A restart with neither hub nor broker nor HTTP server runs v2 straight away.
    mosquitto.stop()
    async with running_agent(path) as agent:
        await asyncio.wait_for(agent.rollout.started.wait(), 5)
        active_model = agent.scorer.active("sim-boiler")
        assert active_model is not None and active_model.sha256 == sha256_of(v2)
        assert agent.scorer.previous("sim-boiler") is agent.rollout.local["sim-boiler"]  # v1, for a rollback
        assert agent.rollout.status()["sim-boiler"].version == 2

        async def scores() -> list[Any]:
            return [r.value for r in await agent.buffer.fetch(0, 100_000) if r.metric == "anomaly_score"]
        deadline = time.monotonic() + 10
        while not await scores() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert (await scores())[0] == pytest.approx(s2, abs=1e-5)


# -- a gateway without pollers -------------------------------------------------------------------

class Recorder:
    """Passes readings on to the buffer and keeps the anomaly scores (the uplink empties the buffer)."""

    def __init__(self, buffer: ReadingBuffer) -> None:
        self.buffer = buffer
        self.scores: list[float] = []

    async def submit(self, readings: list[Reading]) -> None:
        await self.buffer.submit(readings)
        self.scores += [r.value for r in readings if r.metric == "anomaly_score"]  # type: ignore[misc]


@dataclass
class Gateway:
    name: str
    buffer: ReadingBuffer
    scorer: AnomalyScorer
    rollout: ModelRollout
    metrics: EdgeMetrics
    model_dir: Path
    recorder: Recorder
    ts: int = 1_000_000

    async def feed(self, *samples: tuple[float, float]) -> None:
        """Polls of boiler-1, 1 s apart, as its poller would deliver them."""
        sink = self.scorer.tap(self.buffer)
        for flow, pressure in samples:
            self.ts += 1000
            await sink.submit([Reading("boiler-1", "flow_temp", self.ts, flow, "degC"),
                               Reading("boiler-1", "pressure", self.ts, pressure, "bar")])
            await asyncio.sleep(0.02)  # one poll, one scoring round

    async def scores(self, n: int) -> list[float]:
        """The anomaly scores emitted so far, once there are ``n`` of them (fails after 5 s)."""
        await until(lambda: len(self.recorder.scores) >= n, f"{n} scores")
        await asyncio.sleep(0.05)  # and no more
        assert len(self.recorder.scores) == n, self.recorder.scores
        return list(self.recorder.scores)


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, broker: Mosquitto, local: bytes | None = None, retry_min_s: float = 30.0,
                  hub_url: str | None = None) -> AsyncIterator[Gateway]:
    """The agent minus its pollers: buffer, uplink, scorer and rollout wired as the agent wires them."""
    models = []
    if local is not None:
        (tmp_path / "local.onnx").write_bytes(local)
        models = [{"profile": "sim-boiler", "path": str(tmp_path / "local.onnx")}]
    cfg = EdgeConfig.model_validate({
        "gateway": {"site": SITE, "name": "gw-r"},
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5,
                 "batch_max_delay_ms": 10},
        "buffer": {"path": str(tmp_path / "buf.db"), "flush_interval_ms": 10},
        "devices": [{"name": "boiler-1", "profile": "sim-boiler", "host": "127.0.0.1", "poll_interval_s": 1.0}],
        "models": models,
        "inference": {"hub_url": hub_url} if hub_url else {},
    })
    profiles = {"boiler-1": builtin_profile("sim-boiler")}
    devices = {"boiler-1": ("boiler", "sim-boiler")}
    buffer = ReadingBuffer(cfg.buffer.path, flush_interval_ms=10)
    await buffer.open()
    await buffer.register_devices(devices)
    metrics = EdgeMetrics()
    uplink = Uplink(cfg, buffer, devices, metrics)
    engine, scorer, rollout = wire_inference(cfg, profiles, buffer, uplink, metrics)
    rollout.retry_min_s = retry_min_s
    recorder = scorer.sink = Recorder(buffer)
    tasks = [asyncio.create_task(c) for c in (buffer.run_writer(), uplink.run(), scorer.run(), rollout.run())]
    try:
        await asyncio.wait_for(rollout.started.wait(), 5)
        await asyncio.wait_for(uplink.connected.wait(), 5)
        yield Gateway("gw-r", buffer, scorer, rollout, metrics, cfg.model_dir, recorder)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        engine.close()
        await buffer.close()


@contextlib.asynccontextmanager
async def watching(broker: Mosquitto) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"t-watch-{time.monotonic_ns()}") as sub:
        await sub.subscribe("twin/v1/site-1/gw-r/events", qos=1)
        await sub.subscribe("twin/v1/site-1/gw-r/status", qos=1)
        yield sub


NORMAL = [(61.0, 1.5), (59.0, 1.0), (60.0, 2.0), (62.0, 1.5)]  # mad_score against CENTRE_V1: 1.25


async def test_profile_left_out_of_an_assignment_returns_to_the_local_model(mosquitto: Mosquitto,
                                                                            tmp_path: Path) -> None:
    v2 = mad_model(card(version=2), CENTRE_V2)
    meter = mad_model(card(name="meter-model", profile="sim-meter"), CENTRE_V2)
    with ModelServer() as server:
        server.files.update({"/v2": v2, "/meter": meter})
        async with gateway(tmp_path, mosquitto, local=mad_model(card(), CENTRE_V1)) as gw, watching(mosquitto) as sub:
            await assign(mosquitto, gw.name, item(v2, server.url("/v2")),
                         item(meter, server.url("/meter"), profile="sim-meter", name="meter-model"))
            got = await collect(sub, lambda g: any(model_state(st) == (2, "active") for st in g["status"]))
            assert "sim-meter" not in got["status"][-1].models  # no meter here: ignored, not fetched
            assert server.requests == ["/v2"]
            await gw.feed(*NORMAL)
            assert await gw.scores(1) == [mad_score(NORMAL, CENTRE_V2)]
            await assign(mosquitto, gw.name)  # the hub no longer assigns anything
            got = await collect(sub, lambda g: any(model_state(st) == (1, "active") for st in g["status"])
                                and len(model_events(g)) >= 2)
            await gw.feed((60.0, 1.5))
            assert (await gw.scores(2))[-1] == mad_score([*NORMAL[1:], (60.0, 1.5)], CENTRE_V1)
            previous = gw.scorer.previous("sim-boiler")
            assert previous is not None and previous.sha256 == sha256_of(v2)  # loaded until the next switch
    assert [(e.type, e.details["version"], e.details["previous_version"]) for e in model_events(got)] == [
        ("model_activated", 2, 1), ("model_activated", 1, 2)]
    assert json.loads((gw.model_dir / "active.json").read_text())["models"] == {}  # a restart runs v1
    # v2's file stays while v2 is the loaded previous model; the next switch deletes it.
    assert [f.name for f in gw.model_dir.glob("*.onnx")] == [f"{sha256_of(v2)}.onnx"]


async def test_hash_mismatch_is_rejected_and_the_running_model_kept(mosquitto: Mosquitto, tmp_path: Path) -> None:
    v2 = mad_model(card(version=2), CENTRE_V2)
    claimed = sha256_of(v2 + b"something else")
    with ModelServer() as server:
        server.files["/v2"] = v2
        async with gateway(tmp_path, mosquitto, local=mad_model(card(), CENTRE_V1)) as gw, watching(mosquitto) as sub:
            await assign(mosquitto, gw.name, item(v2, server.url("/v2"), sha256=claimed))
            got = await collect(sub, lambda g: model_events(g)
                                and any(model_state(st) == (1, "failed") for st in g["status"]))
            await gw.feed(*NORMAL)
            assert await gw.scores(1) == [1.25]  # still v1
            assert gw.metrics.model_load_failures.labels("sim-boiler", "sha256")._value.get() == 1
    ev = model_events(got)[0]
    assert ev.type == "model_rejected"
    assert ev.details == {"profile": "sim-boiler", "model": "test-boiler", "version": 2, "sha256": claimed,
                          "kind": "sha256", "running_version": 1}
    assert f"SHA-256 is {sha256_of(v2)}, expected {claimed}" in ev.message
    st = next(st for st in got["status"] if model_state(st) == (1, "failed")).models["sim-boiler"]
    assert st.sha256 == sha256_of(mad_model(card(), CENTRE_V1))  # what runs
    assert st.error.startswith("test-boiler v2 refused (sha256): ")
    assert not (gw.model_dir / f"{claimed}.onnx").exists() and not (gw.model_dir / f"{sha256_of(v2)}.onnx").exists()


async def test_corrupt_model_is_rejected_and_never_fetched_again(mosquitto: Mosquitto, tmp_path: Path) -> None:
    broken = mad_model(card(version=2), CENTRE_V2)[:150]  # the hub's own hash of a truncated file
    with ModelServer() as server:
        server.files["/v2"] = broken
        async with gateway(tmp_path, mosquitto) as gw, watching(mosquitto) as sub:
            await assign(mosquitto, gw.name, item(broken, server.url("/v2")))
            got = await collect(sub, lambda g: model_events(g)
                                and any(model_state(st) == (2, "failed") for st in g["status"]))
            applied = gw.rollout.applied
            await assign(mosquitto, gw.name, item(broken, server.url("/v2")))  # again, with a new ts
            await until(lambda: gw.rollout.applied > applied, "the second assignment")
            assert server.requests == ["/v2"]  # known bad: not downloaded twice
            assert gw.scorer.active("sim-boiler") is None
    ev = model_events(got)[0]
    assert (ev.type, ev.details["kind"], ev.details["running_version"]) == ("model_rejected", "corrupt", 0)
    assert "not a readable ONNX model (corrupt or truncated file)" in ev.message
    assert server.url("/v2") in ev.message  # names the source
    st = next(st for st in got["status"] if model_state(st) == (2, "failed")).models["sim-boiler"]
    assert st.sha256 == sha256_of(broken) and "corrupt" in st.error
    refused = json.loads((gw.model_dir / "active.json").read_text())["refused"]
    assert list(refused) == [sha256_of(broken)]


async def test_model_failing_its_self_test_is_rejected(mosquitto: Mosquitto, tmp_path: Path) -> None:
    # log(flow - 100) is NaN on the boiler's current window (flow about 60).
    nan_model = log_model(card(version=2), offset=[100.0, 0.0])
    with ModelServer() as server:
        server.files["/v2"] = nan_model
        async with gateway(tmp_path, mosquitto, local=mad_model(card(), CENTRE_V1)) as gw, watching(mosquitto) as sub:
            await gw.feed(*NORMAL)  # the self-test scores this window
            await assign(mosquitto, gw.name, item(nan_model, server.url("/v2")))
            got = await collect(sub, lambda g: model_events(g)
                                and any(model_state(st) == (1, "failed") for st in g["status"]))
            assert gw.scorer.active("sim-boiler") is gw.rollout.local["sim-boiler"]
    ev = model_events(got)[0]
    assert (ev.type, ev.details["kind"]) == ("model_rejected", "self-test")
    assert "self-test score is not finite (nan)" in ev.message
    st = next(st for st in got["status"] if model_state(st) == (1, "failed")).models["sim-boiler"]
    assert "self-test score is not finite" in st.error
    assert not (gw.model_dir / f"{sha256_of(nan_model)}.onnx").exists()


async def test_model_scoring_nan_live_is_rolled_back(mosquitto: Mosquitto, tmp_path: Path) -> None:
    # sum of mean log(x): finite while flow and pressure are positive, NaN once flow reads -5.
    v2 = log_model(card(version=2))
    with ModelServer() as server:
        server.files["/v2"] = v2
        async with gateway(tmp_path, mosquitto, local=mad_model(card(), CENTRE_V1)) as gw, watching(mosquitto) as sub:
            await gw.feed(*NORMAL)
            await assign(mosquitto, gw.name, item(v2, server.url("/v2")))
            await collect(sub, lambda g: any(model_state(st) == (2, "active") for st in g["status"]))
            await gw.feed((60.0, 1.5))
            live = [*NORMAL[1:], (60.0, 1.5)]
            assert (await gw.scores(2))[-1] == pytest.approx(float(np.log(np.asarray(live)).mean(axis=0).sum()))
            await gw.feed((-5.0, 1.5))  # v2: NaN → not emitted, rolled back to v1
            await gw.feed((60.0, 1.5))  # scored by v1 again
            got = await collect(sub, lambda g: any(e.type == "model_rolled_back" for e in model_events(g))
                                and any(model_state(st) == (1, "failed") for st in g["status"]))
            scores = await gw.scores(3)
            assert all(np.isfinite(scores))
            assert scores[-1] == mad_score([NORMAL[3], (60.0, 1.5), (-5.0, 1.5), (60.0, 1.5)], CENTRE_V1)
            assert len(scores) == 3  # NORMAL under v1, one under v2, the NaN one dropped, one under v1
            assert gw.metrics.model_rollbacks.labels("sim-boiler")._value.get() == 1
            # The retained assignment still names v2; delivered again, it is not taken back.
            applied = gw.rollout.applied
            await assign(mosquitto, gw.name, item(v2, server.url("/v2")))
            await until(lambda: gw.rollout.applied > applied, "the repeated assignment")
            assert gw.scorer.active("sim-boiler") is gw.rollout.local["sim-boiler"]
            assert server.requests == ["/v2"]
    ev = next(e for e in got["events"] if e.type == "model_rolled_back")
    assert ev.details["version"] == 2 and ev.details["restored_version"] == 1
    assert "non-finite score (nan)" in str(ev.details["reason"])
    assert "rolled back to test-boiler v1" in ev.message
    st = next(st for st in got["status"] if model_state(st) == (1, "failed")).models["sim-boiler"]
    assert st.error.startswith("test-boiler v2 rolled back:")
    active = json.loads((gw.model_dir / "active.json").read_text())
    assert active["models"] == {} and sha256_of(v2) in active["refused"]


async def test_failed_download_is_retried_until_the_file_is_there(mosquitto: Mosquitto, tmp_path: Path) -> None:
    v2 = mad_model(card(version=2), CENTRE_V2)
    with ModelServer() as server:
        async with gateway(tmp_path, mosquitto, local=mad_model(card(), CENTRE_V1), retry_min_s=0.2) as gw, \
                watching(mosquitto) as sub:
            await assign(mosquitto, gw.name, item(v2, server.url("/v2")))
            got = await collect(sub, lambda g: model_events(g)
                                and any(model_state(st) == (1, "failed") for st in g["status"]))
            await until(lambda: len(server.requests) >= 2, "a retry")
            server.files["/v2"] = v2  # the hub's file store caught up
            got2 = await collect(sub, lambda g: any(model_state(st) == (2, "active") for st in g["status"])
                                 and model_events(g))
    ev = model_events(got)[0]
    assert (ev.type, ev.details["kind"]) == ("model_rejected", "download")
    assert "HTTP 404" in ev.message
    # One event for the same reason, however many retries.
    assert [e.type for e in model_events(got2)] == ["model_activated"]
    assert 3 <= len(server.requests) <= 10


async def test_path_only_url_is_fetched_from_the_configured_hub_url(mosquitto: Mosquitto, tmp_path: Path) -> None:
    v2 = mad_model(card(version=2), CENTRE_V2)
    with ModelServer() as server:
        server.files["/hub/api/v1/models/test-boiler/2/file"] = v2
        async with gateway(tmp_path, mosquitto, hub_url=server.url("/hub/")) as gw, watching(mosquitto) as sub:
            await assign(mosquitto, gw.name, item(v2, "/api/v1/models/test-boiler/2/file"))
            await collect(sub, lambda g: any(model_state(st) == (2, "active") for st in g["status"]))
    assert server.requests == ["/hub/api/v1/models/test-boiler/2/file"]
