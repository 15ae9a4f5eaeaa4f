"""Anomaly scoring end to end on real parts: a model uploaded to the hub is rolled out over MQTT
to a real edge agent, which scores simulated boilers live; the scores and the anomaly of a boiler
with a stuck sensor reach the hub. A bad new version is refused by the edge and the old one keeps
scoring.

The fleet (Mosquitto, hub on SQLite, simulators, edge agent) is started once for the module; the
edge has no local model, so everything it scores comes from the hub. The simulators run 20 times
faster than real time (one 1 s tick every 50 ms) and the edge polls every 50 ms, so the model's
600-sample window (10 simulated minutes) fills in about 30 s of wall time. The poll period is
therefore 1/20 of the card's ``sample_period_s``: the edge logs ``scoring_sample_period_mismatch``
once per device, which is expected here (each sample is still one simulated second).
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest

from fleet.broker import BrokerUnavailable, Mosquitto
from fleet.configs import write_edge_config, write_hub_config
from fleet.net import free_port
from fleet.procs import ReadyProcess
from protocol.anomaly import CARD_METADATA_KEY, INPUT_NAME, OUTPUT_NAME, ModelCard, card_json
from tests.hubtools import admin_auth
from tests.parts import missing_part

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILE = ROOT / "models" / "shipped" / "sim-boiler-anomaly.onnx"
CARD_FILE = ROOT / "models" / "shipped" / "sim-boiler-anomaly.card.json"
SITE, GATEWAY = "site-1", "gw-1"
GW = f"{SITE}.{GATEWAY}"
BOILERS = ("boiler-1", "boiler-2")
PROFILE = "sim-boiler"
POLL_S = 0.05

T = TypeVar("T")


@dataclass
class Fleet:
    work: Path
    api: httpx.Client
    sim: ReadyProcess
    hub: ReadyProcess
    edge: ReadyProcess
    model: bytes
    """The shipped boiler model (v1) as read when the fleet started."""
    card: ModelCard
    """Its ``.card.json`` (with sha256)."""

    def logs(self) -> str:
        return f"edge log:\n{self.edge.log_tail(6000)}\nhub log:\n{self.hub.log_tail(3000)}"


def wait_for(fleet: Fleet, what: str, probe: Callable[[], T | None], within_s: float, every_s: float = 0.25) -> T:
    """Call ``probe`` until it returns something other than None (or False), at most ``within_s``
    seconds and ``within_s / every_s + 1`` times; fail naming ``what`` and the last value otherwise."""
    deadline = time.monotonic() + within_s
    last: T | None = None
    for _ in range(int(within_s / every_s) + 1):
        last = probe()
        if last is not None and last is not False:
            return last
        if time.monotonic() > deadline:
            break
        time.sleep(every_s)
    pytest.fail(f"gave up waiting {within_s} s for {what}; last: {last!r}\n{fleet.logs()}")


def ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, f"{resp.request.method} {resp.request.url}: {resp.status_code} {resp.text}"
    return resp.json()


def readings(fleet: Fleet, device: str, metric: str, since: str | None = None) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"metric": metric, "limit": 10000}
    if since is not None:
        params["since"] = since
    got: list[dict[str, Any]] = ok(fleet.api.get(f"/api/v1/devices/{GW}.{device}/readings", params=params))
    return got


def events(fleet: Fleet, type_: str, device: str | None = None) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"type": type_, "limit": 1000}
    if device is not None:
        params["device"] = device
    got: list[dict[str, Any]] = ok(fleet.api.get(f"/api/v1/gateways/{GW}/events", params=params))
    return got


def gateway_model(fleet: Fleet, profile: str = PROFILE) -> dict[str, Any] | None:
    doc = ok(fleet.api.get(f"/api/v1/gateways/{GW}/models"))
    return next((m for m in doc["models"] if m["profile"] == profile), None)


def edge_log(fleet: Fleet) -> list[dict[str, Any]]:
    """The edge agent's JSON log lines so far."""
    out = []
    for line in fleet.edge.log_tail(10**8).splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def upload(fleet: Fleet, data: bytes, expect: tuple[int, ...] = (201,)) -> dict[str, Any]:
    resp = fleet.api.post("/api/v1/models", content=data,
                          headers={"Content-Type": "application/octet-stream", "X-Twin-User": "e2e"})
    assert resp.status_code in expect, f"upload: {resp.status_code} {resp.text}"
    body: dict[str, Any] = resp.json()
    return body


def assign(fleet: Fleet, version: int) -> dict[str, Any]:
    body: dict[str, Any] = ok(fleet.api.put("/api/v1/model-assignments", json={
        "profile": PROFILE, "name": "sim-boiler-anomaly", "version": version}, headers={"X-Twin-User": "e2e"}))
    assert body["assignment"]["gateway"] is None  # fleet-wide
    assert body["gateways"] == [GW]
    return body


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if not MODEL_FILE.exists() or not CARD_FILE.exists():
        pytest.fail(f"{MODEL_FILE} or its card is missing: train it with `python -m models.train sim`",
                    pytrace=False)
    model = MODEL_FILE.read_bytes()
    card = ModelCard.model_validate_json(CARD_FILE.read_text())
    assert card.sha256 == hashlib.sha256(model).hexdigest(), "the shipped model and its .card.json disagree"
    assert (card.name, card.version, card.profile, card.window) == ("sim-boiler-anomaly", 1, PROFILE, 600)

    work = tmp_path_factory.mktemp("anomaly-e2e")
    try:
        broker = Mosquitto(workdir=work / "mosquitto")
        broker.start()
    except BrokerUnavailable as exc:
        missing_part(str(exc), "apt-get install mosquitto")
    procs: list[ReadyProcess] = []
    try:
        sim = ReadyProcess.python("twin-sim", "firmware_sim.cli", "--boilers", "2", "--meters", "1",
                                  "--base-port", "0", "--seed", "7", "--tick", "1.0", "--speed", "20",
                                  "--fault", "boiler-2:stuck=flow_temp", log_path=work / "sim.log")
        procs.append(sim.start())
        devices = sim.ready["devices"]
        assert [d["name"] for d in devices] == [*BOILERS, "meter-1"]

        hub_cfg = write_hub_config(work / "hub.toml", database_url=f"sqlite://{work / 'hub.db'}",
                                   mqtt_port=broker.port, http_port=free_port(), client_id="hub-anomaly-e2e")
        hub = ReadyProcess.python("twin-hub", "hub.cli", "run", "--config", str(hub_cfg), log_path=work / "hub.log")
        procs.append(hub.start(timeout=60))

        # No [[models]]: the edge scores nothing until the hub assigns a model. A poll held up
        # by more than 3 periods (150 ms) on a busy CI machine would restart the windows and
        # cost another 30 s of filling: allow 2 s.
        edge_cfg = write_edge_config(work / "edge.toml", site=SITE, gateway=GATEWAY, mqtt_port=broker.port,
                                     devices=devices, poll_interval_s=POLL_S, mqtt={"batch_max_delay_ms": 50},
                                     inference={"gap_factor": 40.0})
        edge = ReadyProcess.python("twin-edge", "edge.cli", "run", "--config", str(edge_cfg),
                                   log_path=work / "edge.log")
        procs.append(edge.start())

        with httpx.Client(auth=admin_auth(), base_url=hub.ready["api"], timeout=10) as api:
            f_ = Fleet(work, api, sim, hub, edge, model, card)
            # The hub must know the gateway before a fleet-wide assignment can name it.
            wait_for(f_, "the gateway to report online at the hub", lambda: any(
                g["id"] == GW and g["state"] == "online" for g in ok(api.get("/api/v1/gateways"))), 20)
            wait_for(f_, "readings of the three devices at the hub", lambda: sorted(
                d["id"] for d in ok(api.get("/api/v1/devices")) if d["last_seen"]) == [
                f"{GW}.{n}" for n in (*BOILERS, "meter-1")], 20)
            yield f_
    finally:
        for p in reversed(procs):
            if p.alive():
                p.signal(signal.SIGTERM)
            p.stop()
        broker.cleanup()


def roll_out_v1(fleet: Fleet) -> dict[str, Any]:
    """Upload the shipped model (201 the first time, 200 when already stored), assign it fleet-wide
    and wait until the gateway reports it running; returns the gateway's sim-boiler entry."""
    sha = fleet.card.sha256
    up = upload(fleet, fleet.model, expect=(200, 201))
    assert (up["name"], up["version"], up["profile"], up["sha256"], up["size"]) == (
        "sim-boiler-anomaly", 1, PROFILE, sha, len(fleet.model))
    assert up["card"]["threshold"] == fleet.card.threshold and up["card"]["window"] == 600
    assert up["file"] == "/api/v1/models/sim-boiler-anomaly/1/file"
    got = assign(fleet, 1)
    assert (got["assignment"]["version"], got["assignment"]["sha256"]) == (1, sha)

    def in_sync() -> dict[str, Any] | None:
        m = gateway_model(fleet)
        return m if m is not None and m["rollout"] == "in_sync" else None

    m = wait_for(fleet, "the gateway to run sim-boiler-anomaly v1", in_sync, 30)
    assert m["assigned"] == {"name": "sim-boiler-anomaly", "version": 1, "sha256": sha, "scope": "fleet"}
    assert m["running"] == {"name": "sim-boiler-anomaly", "version": 1, "sha256": sha, "state": "active",
                            "error": ""}
    return m


def test_rollout_live_scoring_and_anomaly_event(fleet: Fleet) -> None:
    threshold = fleet.card.threshold
    sha = fleet.card.sha256
    # The edge has no local model: before the rollout it reports none, and the hub assigns none.
    assert ok(fleet.api.get(f"/api/v1/gateways/{GW}/models"))["models"] == []
    assert all(readings(fleet, b, "anomaly_score") == [] for b in BOILERS)
    assigned_at = time.monotonic()

    roll_out_v1(fleet)
    activated = wait_for(fleet, "a model_activated event at the hub", lambda: events(fleet, "model_activated"), 15)
    assert len(activated) == 1, activated
    assert activated[0]["details"] == {"profile": PROFILE, "model": "sim-boiler-anomaly", "version": 1,
                                       "sha256": sha, "previous_version": 0}
    # What the edge stored: the downloaded file (the same bytes) and its choice in active.json.
    model_dir = fleet.work / "models"
    assert (model_dir / f"{sha}.onnx").read_bytes() == fleet.model
    active = json.loads((model_dir / "active.json").read_text())
    assert active["models"] == {PROFILE: {"name": "sim-boiler-anomaly", "version": 1, "sha256": sha,
                                          "file": f"{sha}.onnx"}}

    # Scores start once 600 samples (30 s at 20 polls/s) are in each window; boiler-2's flow
    # temperature has been stuck from the start.
    def boiler2_anomaly() -> dict[str, Any] | None:
        started = events(fleet, "anomaly_started", "boiler-2")
        return started[0] if started else None

    started = wait_for(fleet, "an anomaly_started event of boiler-2 at the hub", boiler2_anomaly, 75, every_s=0.5)
    fill_s = time.monotonic() - assigned_at
    assert len(events(fleet, "anomaly_started", "boiler-2")) == 1
    assert started["device"] == "boiler-2"
    d = started["details"]
    assert (d["model"], d["version"], d["threshold"]) == ("sim-boiler-anomaly", 1, threshold)
    assert d["clear_at"] == fleet.card.clear_at
    assert math.isfinite(d["score"]) and d["score"] > threshold
    assert ok(fleet.api.get(f"/api/v1/devices/{GW}.boiler-2/anomalies"))[0]["ts"] == started["ts"]
    device = ok(fleet.api.get(f"/api/v1/devices/{GW}.boiler-2"))
    assert device["anomaly"] == {"active": True, "score": d["score"], "since": started["ts"]}

    # The event's score is the anomaly_score reading of the same poll, stored like any reading.
    def scored_both() -> dict[str, list[dict[str, Any]]] | None:
        got = {b: readings(fleet, b, "anomaly_score") for b in BOILERS}
        return got if min(len(v) for v in got.values()) >= 100 else None

    scores = wait_for(fleet, "100 anomaly_score readings of each boiler at the hub", scored_both, 30)
    flags = {b: readings(fleet, b, "anomaly") for b in BOILERS}
    at_event = [r for r in scores["boiler-2"] if r["ts"] == started["ts"]]
    assert len(at_event) == 1 and at_event[0]["value"] == pytest.approx(d["score"], rel=1e-6), at_event
    flag_at_event = [r["value"] for r in flags["boiler-2"] if r["ts"] == started["ts"]]
    assert flag_at_event == [True]
    for b in BOILERS:
        assert all(r["unit"] == "" and r["quality"] == "good" for r in scores[b] + flags[b])
        assert all(type(r["value"]) is bool for r in flags[b])
        # One anomaly flag per score, at the same timestamps (up to the newest both queries saw:
        # readings keep arriving between the two).
        upto = min(scores[b][-1]["ts"], flags[b][-1]["ts"])
        score_ts = [r["ts"] for r in scores[b] if r["ts"] <= upto]
        assert [r["ts"] for r in flags[b] if r["ts"] <= upto] == score_ts and len(score_ts) >= 100
    # The stuck boiler stays anomalous: nothing cleared it, and its flag is true from the event on.
    assert events(fleet, "anomaly_cleared", "boiler-2") == []
    assert all(r["value"] is True for r in flags["boiler-2"] if r["ts"] >= started["ts"])

    # The healthy boiler: scored as often, never above the threshold, no anomaly event.
    b1 = [r["value"] for r in scores["boiler-1"]]
    assert all(math.isfinite(v) for v in b1)
    assert max(b1) < threshold, f"boiler-1 (healthy) scored up to {max(b1)}, threshold {threshold}"
    assert not any(r["value"] for r in flags["boiler-1"])
    assert events(fleet, "anomaly_started", "boiler-1") == []
    assert ok(fleet.api.get(f"/api/v1/devices/{GW}.boiler-1/anomalies")) == []
    assert ok(fleet.api.get(f"/api/v1/devices/{GW}.boiler-1"))["anomaly"] == {
        "active": False, "score": None, "since": None}
    # The meter has no model (nothing assigned for sim-meter): not scored.
    assert readings(fleet, "meter-1", "anomaly_score") == []
    assert gateway_model(fleet, "sim-meter") is None

    log = fleet.edge.log_tail(10**7)
    assert log.count("scoring_sample_period_mismatch") == 2, "expected once per boiler (polled 20x faster)"
    # The hub's assignment carries a full URL (its public_url defaults to its own listener), so the
    # edge needs no [inference] hub_url.
    downloads = [e["url"] for e in edge_log(fleet) if e.get("event") == "model_download_started"]
    # Logged without the query: the gateway's download capability is a credential.
    assert downloads == [f"{fleet.hub.ready['api']}/api/v1/models/sim-boiler-anomaly/1/file"]
    print(f"first anomaly {fill_s:.1f} s after the assignment; boiler-1 max score {max(b1):.2f}, "
          f"boiler-2 event score {d['score']:.2f}, threshold {threshold}")


def nan_on_real_data_model(card: ModelCard) -> bytes:
    """A model with ``card``'s inputs and window whose score is ``sqrt(-mean(flow_temp))``: 0 on a
    window of zeros (the hub's upload check passes), NaN on any real boiler (flow_temp > 0 °C)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    feature = card.input_metrics.index("flow_temp")
    inits = [numpy_helper.from_array(np.array([feature], np.int64), "feature")]
    nodes = [helper.make_node("Gather", [INPUT_NAME, "feature"], ["x3"], axis=2),  # [N, W, 1]
             helper.make_node("ReduceMean", ["x3"], ["mean"], axes=[1, 2], keepdims=0),  # [N] (opset 17)
             helper.make_node("Neg", ["mean"], ["neg"]),
             helper.make_node("Sqrt", ["neg"], [OUTPUT_NAME])]
    graph = helper.make_graph(
        nodes, "sqrt-neg-mean-flow-temp",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", card.window, len(card.inputs)])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N"])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", card.opset)], producer_name="tests")
    model.ir_version = 8
    helper.set_model_props(model, {CARD_METADATA_KEY: card_json(card)})
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def test_bad_version_is_refused_and_v1_keeps_scoring(fleet: Fleet) -> None:
    import onnxruntime as ort

    roll_out_v1(fleet)  # already done by the test above; on its own this test does it itself
    v1_sha = fleet.card.sha256
    card2 = fleet.card.model_copy(update={"version": 2, "sha256": None,
                                          "method": "sqrt(-mean(flow_temp)): NaN on any real boiler (test)"})
    v2 = nan_on_real_data_model(card2)
    v2_sha = hashlib.sha256(v2).hexdigest()
    session = ort.InferenceSession(v2, providers=["CPUExecutionProvider"])
    real = np.full((1, 600, len(card2.inputs)), 1.5, np.float32)
    real[..., card2.input_metrics.index("flow_temp")] = 60.0
    zeros = session.run([OUTPUT_NAME], {INPUT_NAME: np.zeros_like(real)})[0]
    assert np.isfinite(zeros).all() and np.isnan(session.run([OUTPUT_NAME], {INPUT_NAME: real})[0]).all()

    # The hub only checks that a window of zeros gives one score: it accepts v2.
    up = upload(fleet, v2)
    assert (up["name"], up["version"], up["sha256"], up["size"]) == ("sim-boiler-anomaly", 2, v2_sha, len(v2))
    got = assign(fleet, 2)
    assert (got["assignment"]["version"], got["assignment"]["sha256"]) == (2, v2_sha)

    # The edge downloads v2, its self-test on the boilers' real windows gives NaN: refused, v1 runs on.
    def failed() -> dict[str, Any] | None:
        m = gateway_model(fleet)
        return m if m is not None and m["rollout"] == "failed" else None

    m = wait_for(fleet, "the hub to show the v2 rollout failed", failed, 30)
    assert m["assigned"] == {"name": "sim-boiler-anomaly", "version": 2, "sha256": v2_sha, "scope": "fleet"}
    running = m["running"]
    assert (running["name"], running["version"], running["sha256"], running["state"]) == (
        "sim-boiler-anomaly", 1, v1_sha, "failed")
    assert "v2" in running["error"] and "self-test" in running["error"] and "nan" in running["error"], running

    rejected = wait_for(fleet, "a model_rejected event at the hub", lambda: events(fleet, "model_rejected"), 15)
    assert len(rejected) == 1, rejected
    assert rejected[0]["details"] == {"profile": PROFILE, "model": "sim-boiler-anomaly", "version": 2,
                                      "sha256": v2_sha, "kind": "self-test", "running_version": 1}
    assert [e["details"]["version"] for e in events(fleet, "model_activated")] == [1]
    assert events(fleet, "model_rolled_back") == []
    active = json.loads((fleet.work / "models" / "active.json").read_text())
    assert active["models"][PROFILE]["sha256"] == v1_sha
    assert v2_sha in active["refused"] and not (fleet.work / "models" / f"{v2_sha}.onnx").exists()

    # v1 keeps scoring both boilers after the refusal, with finite scores, boiler-1 below threshold.
    since = rejected[0]["ts"]

    def scored_after() -> dict[str, list[float]] | None:
        got = {b: [r["value"] for r in readings(fleet, b, "anomaly_score", since=since)] for b in BOILERS}
        return got if min(len(v) for v in got.values()) >= 40 else None

    # (60 s: run on its own, this test rolled out v1 just now, and windows take 30 s to fill)
    after = wait_for(fleet, "40 more anomaly_score readings of each boiler after the refusal", scored_after, 60)
    assert all(isinstance(v, float) and math.isfinite(v) for vs in after.values() for v in vs), after
    assert max(after["boiler-1"]) < fleet.card.threshold
    assert min(after["boiler-2"]) > fleet.card.clear_at  # still anomalous: scored by v1, not v2
    assert ok(fleet.api.get(f"/api/v1/devices/{GW}.boiler-2"))["anomaly"]["active"] is True
