"""Model registry, assignments, gateway model reports and anomaly events through the REST API, on a
database seeded through the store (SQLite here; ``test_hub_models_postgres.py`` reruns these tests
on PostgreSQL with another ``db_url``).

The ONNX files are real models built with ``onnx.helper`` (``tests.hubtools.onnx_model``) and
checked by the hub with onnxruntime."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from hub.api import ApiContext, create_app
from hub.config import StatusConfig
from hub.db import Database
from hub.store import EventItem, StatusItem, Store, TelemetryItem
from protocol.anomaly import MAX_MODEL_BYTES, card_json
from protocol.schema import ActiveModelV1, GatewayState, ModelState, StatusV1
from tests.hubtools import ADMIN_PASSWORD, T0, add_user, admin_auth, event, model_card, onnx_model, series, telemetry

NOW = T0 + 1_000_000
RULES = StatusConfig(stale_after_s=120, offline_after_s=600)
BOILER = model_card()  # sim-boiler-anomaly v1, profile sim-boiler, 3 inputs, window 8
BOILER_FILE = onnx_model(BOILER)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """Where the test database lives; overridden by test_hub_models_postgres.py."""
    return f"sqlite://{tmp_path}/hub.db"


class Clock:
    """The API's clock: advances 1 s per call, so every upload / assignment has its own time."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> int:
        self.now += 1000
        return self.now


async def _seed(db: Database) -> None:
    store = Store(db)
    kinds = {"boiler1": "boiler", "boiler2": "boiler", "meter1": "meter"}
    await store.write([
        TelemetryItem(telemetry("plant1", "gw1", series("boiler1", "flow_temp", 2, ts0=NOW - 5000)
                                + series("boiler2", "flow_temp", 2, seq0=10, ts0=NOW - 5000), kinds=kinds),
                      NOW - 4000),
        TelemetryItem(telemetry("plant1", "gw2", series("meter1", "energy", 2, ts0=NOW - 5000, unit="kWh"),
                                kinds=kinds), NOW - 4000),
    ], [StatusItem(StatusV1(site="plant2", gateway="gw1", state=GatewayState.ONLINE, ts=NOW - 60_000), NOW)])


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await Database(db_url).open()
    try:
        await _seed(database)
        yield database
    finally:
        await database.close()


@pytest.fixture
async def api(db: Database) -> AsyncIterator[httpx.AsyncClient]:
    await add_user(db, "admin", "admin", ADMIN_PASSWORD)
    app = create_app(ApiContext(db=db, status=RULES, clock=Clock()))
    async with httpx.AsyncClient(
            auth=admin_auth(), transport=httpx.ASGITransport(app=app), base_url="http://hub") as client:
        yield client


async def upload(api: httpx.AsyncClient, data: bytes, user: str | None = None, **params: Any) -> httpx.Response:
    headers = {"Content-Type": "application/octet-stream"}
    if user is not None:
        headers["X-Twin-User"] = user
    return await api.post("/api/v1/models", content=data, headers=headers, params=params)


def _card_with_sha(data: bytes, card: Any = BOILER) -> dict[str, Any]:
    return {**json.loads(card_json(card)), "sha256": hashlib.sha256(data).hexdigest()}


# -- upload and download -------------------------------------------------------------------------


async def test_upload_stores_the_version_and_serves_the_file(api: httpx.AsyncClient) -> None:
    r = await upload(api, BOILER_FILE, user="alice")
    assert r.status_code == 201, r.text
    sha = hashlib.sha256(BOILER_FILE).hexdigest()
    stored = r.json()
    assert stored == {
        "name": "sim-boiler-anomaly", "version": 1, "profile": "sim-boiler", "sha256": sha,
        "size": len(BOILER_FILE), "card": _card_with_sha(BOILER_FILE), "uploaded_at": "2025-11-25T14:16:41.000Z",
        "uploaded_by": "admin", "file": "/api/v1/models/sim-boiler-anomaly/1/file"}
    assert stored["card"]["inputs"] == [{"metric": "flow_temp", "unit": "degC"},
                                        {"metric": "return_temp", "unit": "degC"},
                                        {"metric": "pressure", "unit": "bar"}]

    r = await api.get("/api/v1/models/sim-boiler-anomaly/1")
    assert (r.status_code, r.json()) == (200, stored)

    r = await api.get("/api/v1/models/sim-boiler-anomaly/1/file")
    assert r.status_code == 200
    assert r.content == BOILER_FILE
    assert hashlib.sha256(r.content).hexdigest() == sha
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-length"] == str(len(BOILER_FILE))
    assert r.headers["etag"] == f'"{sha}"'
    assert r.headers["content-disposition"] == 'attachment; filename="sim-boiler-anomaly-v1.onnx"'

    r = await api.get("/api/v1/models/sim-boiler-anomaly/1/file", headers={"If-None-Match": f'"{sha}"'})
    assert (r.status_code, r.content, r.headers["etag"]) == (304, b"", f'"{sha}"')
    r = await api.get("/api/v1/models/sim-boiler-anomaly/1/file", headers={"If-None-Match": '"other"'})
    assert (r.status_code, r.content) == (200, BOILER_FILE)


async def test_same_file_again_is_idempotent_other_bytes_conflict(api: httpx.AsyncClient) -> None:
    first = await upload(api, BOILER_FILE, user="alice")
    assert first.status_code == 201
    again = await upload(api, BOILER_FILE, user="bob")
    assert again.status_code == 200
    assert again.json() == first.json()  # the stored version, uploaded_by and time unchanged

    other = onnx_model(BOILER, scale=2.0)  # same card (name, version), other graph
    r = await upload(api, other)
    assert r.status_code == 409
    assert r.json()["detail"] == (
        f"model sim-boiler-anomaly v1 already exists with different content (stored sha256 "
        f"{hashlib.sha256(BOILER_FILE).hexdigest()}, uploaded {hashlib.sha256(other).hexdigest()}); "
        "give the new file a new version")
    r = await api.get("/api/v1/models/sim-boiler-anomaly/1/file")
    assert r.content == BOILER_FILE

    r = await upload(api, onnx_model(model_card(version=2), scale=2.0))
    assert (r.status_code, r.json()["version"]) == (201, 2)


def _too_big() -> bytes:
    return os.urandom(MAX_MODEL_BYTES + 1)


def _bad_card() -> bytes:
    doc = json.loads(card_json(BOILER))
    del doc["threshold"]
    doc["window"] = 0
    return onnx_model(BOILER, metadata={"twin.card": json.dumps(doc)})


REJECTIONS: list[tuple[str, Callable[[], bytes], dict[str, Any], int, str]] = [
    ("too big", _too_big, {}, 413, f"model file of {MAX_MODEL_BYTES + 1} bytes exceeds the limit of "
                                   f"{MAX_MODEL_BYTES} bytes"),
    ("empty", lambda: b"", {}, 400, "empty body: send the .onnx file as the request body"),
    ("not onnx", lambda: b"PK\x03\x04 this is a zip, not a model", {}, 400, "not a loadable ONNX model: "),
    ("no card", lambda: onnx_model(None), {}, 422,
     "no model card: the ONNX metadata has no property 'twin.card'"),
    ("card not json", lambda: onnx_model(BOILER, metadata={"twin.card": "{not json"}), {}, 422,
     "invalid model card in 'twin.card': card: Invalid JSON"),
    ("invalid card", _bad_card, {}, 422,
     "invalid model card in 'twin.card': window: Input should be greater than or equal to 1; "
     "threshold: Field required"),
    ("card with sha256", lambda: onnx_model(BOILER, metadata={"twin.card": card_json(
        BOILER.model_copy(update={"sha256": "0" * 64}))}), {}, 422,
     "the embedded model card must not carry sha256"),
    ("fewer features", lambda: onnx_model(BOILER, features=2), {}, 422,
     "input 'window' has 2 features in its last dimension, the card lists 3 inputs "
     "['flow_temp', 'return_temp', 'pressure']"),
    ("other window", lambda: onnx_model(BOILER, window=16), {}, 422,
     "input 'window' takes windows of 16 samples, the card says window = 8"),
    ("input name", lambda: onnx_model(BOILER, input_name="x"), {}, 422,
     "the model must have exactly one input 'window', it has ['x']"),
    ("no score", lambda: onnx_model(BOILER, output_name="anomaly"), {}, 422,
     "the model has no output 'score' (outputs: ['anomaly'])"),
    ("score rank", lambda: onnx_model(BOILER, output_rank=2), {}, 422,
     "output 'score' has shape ['N', 1], expected [batch]"),
    ("name differs", lambda: BOILER_FILE, {"name": "other-model"}, 422,
     "the model card says name 'sim-boiler-anomaly', the request says 'other-model'"),
    ("version differs", lambda: BOILER_FILE, {"version": 2}, 422,
     "the model card says version 1, the request says 2"),
    ("profile differs", lambda: BOILER_FILE, {"profile": "sim-meter"}, 422,
     "the model card says profile 'sim-boiler', the request says 'sim-meter'"),
]


@pytest.mark.parametrize(("data", "params", "status", "message"), [r[1:] for r in REJECTIONS],
                         ids=[r[0] for r in REJECTIONS])
async def test_upload_rejections(api: httpx.AsyncClient, data: Callable[[], bytes], params: dict[str, Any],
                                 status: int, message: str) -> None:
    r = await upload(api, data(), **params)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["detail"].startswith(message), r.json()["detail"]
    assert (await api.get("/api/v1/models")).json() == []  # nothing stored


async def test_upload_as_form_is_refused(api: httpx.AsyncClient) -> None:
    r = await api.post("/api/v1/models", files={"file": ("m.onnx", BOILER_FILE)})
    assert r.status_code == 415
    assert r.json()["detail"] == ("send the .onnx file as the raw request body (Content-Type: "
                                  "application/octet-stream), not as a form upload")


async def test_upload_with_matching_query_and_any_content_type(api: httpx.AsyncClient) -> None:
    # curl --data-binary sends application/x-www-form-urlencoded unless told otherwise: accepted.
    r = await api.post("/api/v1/models", content=BOILER_FILE, params={"name": "sim-boiler-anomaly", "version": 1},
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert (r.status_code, r.json()["sha256"]) == (201, hashlib.sha256(BOILER_FILE).hexdigest())


async def test_list_models_newest_first_with_filters(api: httpx.AsyncClient) -> None:
    meter = model_card("sim-meter-anomaly", 1, "sim-meter", inputs=[("power", "kW"), ("voltage", "V")], window=4)
    for data in (BOILER_FILE, onnx_model(meter), onnx_model(model_card(version=2), scale=3.0)):
        assert (await upload(api, data)).status_code == 201
    r = await api.get("/api/v1/models")
    assert [(m["name"], m["version"]) for m in r.json()] == [
        ("sim-boiler-anomaly", 2), ("sim-meter-anomaly", 1), ("sim-boiler-anomaly", 1)]
    assert r.json()[1]["card"]["window"] == 4
    r = await api.get("/api/v1/models", params={"name": "sim-boiler-anomaly"})
    assert [m["version"] for m in r.json()] == [2, 1]
    r = await api.get("/api/v1/models", params={"profile": "sim-meter"})
    assert [(m["name"], m["profile"]) for m in r.json()] == [("sim-meter-anomaly", "sim-meter")]
    r = await api.get("/api/v1/models", params={"limit": 1})
    assert [(m["name"], m["version"]) for m in r.json()] == [("sim-boiler-anomaly", 2)]
    r = await api.get("/api/v1/models", params={"profile": "nothing"})
    assert (r.status_code, r.json()) == (200, [])


async def test_unknown_model_404_and_bad_path_422(api: httpx.AsyncClient) -> None:
    await upload(api, BOILER_FILE)
    for path in ("/api/v1/models/sim-boiler-anomaly/2", "/api/v1/models/sim-boiler-anomaly/2/file",
                 "/api/v1/models/nope/1", "/api/v1/models/nope/1/file"):
        r = await api.get(path)
        assert r.status_code == 404, path
        assert r.json()["detail"].startswith("unknown model "), path
    assert (await api.get("/api/v1/models/sim-boiler-anomaly/2")).json()["detail"] == (
        "unknown model 'sim-boiler-anomaly' v2")
    for path in ("/api/v1/models/sim-boiler-anomaly/0", "/api/v1/models/sim-boiler-anomaly/x/file",
                 "/api/v1/models/bad%20name/1"):
        assert (await api.get(path)).status_code == 422, path


# -- assignments -------------------------------------------------------------------------------------


async def _upload_boilers(api: httpx.AsyncClient) -> tuple[bytes, bytes]:
    v2 = onnx_model(model_card(version=2), scale=2.0)
    assert (await upload(api, BOILER_FILE)).status_code == 201
    assert (await upload(api, v2)).status_code == 201
    return BOILER_FILE, v2


async def test_assign_fleet_wide_and_per_gateway(api: httpx.AsyncClient) -> None:
    v1, v2 = await _upload_boilers(api)
    r = await api.put("/api/v1/model-assignments", json={"profile": "sim-boiler", "name": "sim-boiler-anomaly",
                                                          "version": 1}, headers={"X-Twin-User": "alice"})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "assignment": {"profile": "sim-boiler", "gateway": None, "name": "sim-boiler-anomaly", "version": 1,
                       "sha256": hashlib.sha256(v1).hexdigest(), "size": len(v1),
                       "assigned_at": "2025-11-25T14:16:43.000Z", "assigned_by": "admin"},
        "gateways": ["plant1.gw1", "plant1.gw2", "plant2.gw1"]}  # every known gateway

    r = await api.put("/api/v1/model-assignments", json={"profile": "sim-boiler", "name": "sim-boiler-anomaly",
                                                          "version": 2, "gateway": "plant1.gw2"})
    assert r.status_code == 200, r.text
    assert (r.json()["assignment"]["gateway"], r.json()["assignment"]["sha256"], r.json()["gateways"]) == (
        "plant1.gw2", hashlib.sha256(v2).hexdigest(), ["plant1.gw2"])

    r = await api.get("/api/v1/model-assignments")
    assert [(a["profile"], a["gateway"], a["version"]) for a in r.json()] == [
        ("sim-boiler", None, 1), ("sim-boiler", "plant1.gw2", 2)]
    r = await api.get("/api/v1/model-assignments", params={"gateway": "plant1.gw2"})
    assert [(a["gateway"], a["version"]) for a in r.json()] == [("plant1.gw2", 2)]

    # Effective per gateway: its own beats the fleet-wide one.
    gw1 = (await api.get("/api/v1/gateways/plant1.gw1/models")).json()
    gw2 = (await api.get("/api/v1/gateways/plant1.gw2/models")).json()
    assert [(m["profile"], m["assigned"]) for m in gw1["models"]] == [
        ("sim-boiler", {"name": "sim-boiler-anomaly", "version": 1, "sha256": hashlib.sha256(v1).hexdigest(),
                        "scope": "fleet"})]
    assert [(m["assigned"]["version"], m["assigned"]["scope"]) for m in gw2["models"]] == [(2, "gateway")]

    # Re-assigning replaces (one assignment per profile and scope).
    r = await api.put("/api/v1/model-assignments", json={"profile": "sim-boiler", "name": "sim-boiler-anomaly",
                                                          "version": 2})
    assert r.status_code == 200
    assert [(a["gateway"], a["version"]) for a in (await api.get("/api/v1/model-assignments")).json()] == [
        (None, 2), ("plant1.gw2", 2)]

    # Unassigning the gateway's own: it falls back to the fleet-wide one.
    r = await api.delete("/api/v1/model-assignments", params={"profile": "sim-boiler", "gateway": "plant1.gw2"})
    assert r.status_code == 200
    assert (r.json()["assignment"]["gateway"], r.json()["gateways"]) == ("plant1.gw2", ["plant1.gw2"])
    gw2 = (await api.get("/api/v1/gateways/plant1.gw2/models")).json()
    assert [(m["assigned"]["version"], m["assigned"]["scope"]) for m in gw2["models"]] == [(2, "fleet")]

    r = await api.delete("/api/v1/model-assignments", params={"profile": "sim-boiler"})
    assert (r.status_code, r.json()["gateways"]) == (200, ["plant1.gw1", "plant1.gw2", "plant2.gw1"])
    assert (await api.get("/api/v1/model-assignments")).json() == []
    gw2 = (await api.get("/api/v1/gateways/plant1.gw2/models")).json()
    assert gw2["models"] == []


async def test_assignment_errors(api: httpx.AsyncClient) -> None:
    await _upload_boilers(api)
    meter = model_card("sim-meter-anomaly", 1, "sim-meter", inputs=[("power", "kW")], window=4)
    assert (await upload(api, onnx_model(meter))).status_code == 201
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"profile": "sim-boiler", "name": "sim-meter-anomaly", "version": 1}, 422,
         "model sim-meter-anomaly v1 is made for profile 'sim-meter', not 'sim-boiler'"),
        ({"profile": "sim-boiler", "name": "sim-boiler-anomaly", "version": 3}, 404,
         "unknown model 'sim-boiler-anomaly' v3"),
        ({"profile": "sim-boiler", "name": "sim-boiler-anomaly", "version": 1, "gateway": "plant1.gw9"}, 404,
         "unknown gateway 'plant1.gw9'"),
        ({"profile": "sim-boiler", "name": "sim-boiler-anomaly", "version": 1, "gateway": "plant1/gw1"}, 404,
         "unknown gateway 'plant1/gw1'"),
    ]
    for body, status, detail in cases:
        r = await api.put("/api/v1/model-assignments", json=body)
        assert (r.status_code, r.json()["detail"]) == (status, detail), body
    for body in ({"profile": "sim-boiler", "name": "sim-boiler-anomaly"},  # no version
                 {"profile": "sim boiler", "name": "sim-boiler-anomaly", "version": 1},
                 {"profile": "sim-boiler", "name": "sim-boiler-anomaly", "version": 0},
                 {"profile": "sim-boiler", "name": "sim-boiler-anomaly", "version": 1, "site": "plant1"}):
        r = await api.put("/api/v1/model-assignments", json=body)
        assert r.status_code == 422, body
        assert isinstance(r.json()["detail"], list)
    assert (await api.get("/api/v1/model-assignments")).json() == []

    r = await api.delete("/api/v1/model-assignments", params={"profile": "sim-boiler"})
    assert (r.status_code, r.json()["detail"]) == (404, "no fleet-wide assignment for profile 'sim-boiler'")
    r = await api.delete("/api/v1/model-assignments", params={"profile": "sim-boiler", "gateway": "plant1.gw1"})
    assert (r.status_code, r.json()["detail"]) == (
        404, "no assignment for profile 'sim-boiler' on gateway 'plant1.gw1'")
    r = await api.delete("/api/v1/model-assignments", params={"profile": "sim-boiler", "gateway": "plant1.nope"})
    assert (r.status_code, r.json()["detail"]) == (404, "unknown gateway 'plant1.nope'")
    r = await api.get("/api/v1/gateways/plant1.nope/models")
    assert (r.status_code, r.json()["detail"]) == (404, "unknown gateway 'plant1.nope'")


# -- what gateways report ---------------------------------------------------------------------------


def _status(gateway: str, state: GatewayState, ts: int, **models: ActiveModelV1) -> StatusItem:
    return StatusItem(StatusV1(site="plant1", gateway=gateway, state=state, ts=ts, models=models), ts)


async def test_gateway_models_assigned_versus_running(api: httpx.AsyncClient, db: Database) -> None:
    v1, v2 = await _upload_boilers(api)
    sha1, sha2 = hashlib.sha256(v1).hexdigest(), hashlib.sha256(v2).hexdigest()
    await api.put("/api/v1/model-assignments", json={"profile": "sim-boiler", "name": "sim-boiler-anomaly",
                                                      "version": 1})
    await api.put("/api/v1/model-assignments", json={"profile": "sim-boiler", "name": "sim-boiler-anomaly",
                                                      "version": 2, "gateway": "plant1.gw2"})
    store = Store(db)
    running_v1 = ActiveModelV1(name="sim-boiler-anomaly", version=1, sha256=sha1)
    await store.write([], [
        # gw1 runs what it is assigned, plus a meter model of its own configuration
        _status("gw1", GatewayState.ONLINE, NOW, **{
            "sim-boiler": running_v1,
            "sim-meter": ActiveModelV1(name="local-meter", version=7, sha256="a" * 64)}),
        # gw2 was assigned v2 but could not use it: it still runs v1
        _status("gw2", GatewayState.ONLINE, NOW, **{"sim-boiler": running_v1.model_copy(update={
            "state": ModelState.FAILED, "error": "sha256 mismatch after download"})}),
    ])
    gw1 = (await api.get("/api/v1/gateways/plant1.gw1/models")).json()
    assert gw1 == {"id": "plant1.gw1", "state": "online", "state_since": "2025-11-25T14:16:40.000Z", "models": [
        {"profile": "sim-boiler", "rollout": "in_sync",
         "assigned": {"name": "sim-boiler-anomaly", "version": 1, "sha256": sha1, "scope": "fleet"},
         "running": {"name": "sim-boiler-anomaly", "version": 1, "sha256": sha1, "state": "active", "error": ""}},
        {"profile": "sim-meter", "rollout": "unassigned", "assigned": None,
         "running": {"name": "local-meter", "version": 7, "sha256": "a" * 64, "state": "active", "error": ""}},
    ]}
    gw2 = (await api.get("/api/v1/gateways/plant1.gw2/models")).json()
    assert gw2["models"] == [
        {"profile": "sim-boiler", "rollout": "failed",
         "assigned": {"name": "sim-boiler-anomaly", "version": 2, "sha256": sha2, "scope": "gateway"},
         "running": {"name": "sim-boiler-anomaly", "version": 1, "sha256": sha1, "state": "failed",
                     "error": "sha256 mismatch after download"}}]
    # plant2.gw1 reported nothing yet: assigned the fleet-wide v1, pending.
    other = (await api.get("/api/v1/gateways/plant2.gw1/models")).json()
    assert [(m["profile"], m["rollout"], m["running"]) for m in other["models"]] == [("sim-boiler", "pending", None)]

    # An "offline" status (a Last Will, composed at connect time) keeps the last report; the next
    # "online" one replaces it.
    await store.write([], [_status("gw1", GatewayState.OFFLINE, NOW + 1000)])
    gw1 = (await api.get("/api/v1/gateways/plant1.gw1/models")).json()
    assert (gw1["state"], [m["rollout"] for m in gw1["models"]]) == ("offline", ["in_sync", "unassigned"])
    await store.write([], [_status("gw1", GatewayState.ONLINE, NOW + 2000, **{"sim-boiler": ActiveModelV1(
        name="sim-boiler-anomaly", version=2, sha256=sha2)})])
    gw1 = (await api.get("/api/v1/gateways/plant1.gw1/models")).json()
    assert [(m["profile"], m["rollout"], m["running"]["version"]) for m in gw1["models"]] == [
        ("sim-boiler", "pending", 2)]  # runs v2 although v1 is assigned to it: not in sync


# -- anomaly and model events ---------------------------------------------------------------------


async def test_anomaly_events_per_device_and_device_flag(api: httpx.AsyncClient, db: Database) -> None:
    store = Store(db)

    def anomaly(type: str, device: str, ts: int, score: float | None = None) -> EventItem:
        details: dict[str, Any] = {"model": "sim-boiler-anomaly", "version": 1}
        if score is not None:
            details["score"] = score
        return EventItem(event("plant1", "gw1", type, ts, device=device, message=f"{type} on {device}",
                               details=details), NOW)

    started = [anomaly("anomaly_started", "boiler1", NOW - 30_000, 4.25),
               anomaly("anomaly_started", "boiler2", NOW - 30_000, 3.5)]  # same ts, other device
    result = await store.write([], [], [
        *started,
        anomaly("anomaly_cleared", "boiler2", NOW - 10_000, 1.0),
        EventItem(event("plant1", "gw1", "model_activated", NOW - 60_000, message="sim-boiler-anomaly v1 active",
                        details={"profile": "sim-boiler", "version": 1}), NOW),
    ])
    assert (result.events, dict(result.events_inserted)) == (
        4, {"anomaly_started": 2, "anomaly_cleared": 1, "model_activated": 1})
    # A redelivery of both starts, and a late (older) clear of boiler1 arriving after a newer start:
    result = await store.write([], [], [*started, anomaly("anomaly_cleared", "boiler1", NOW - 40_000, 0.5)])
    assert (result.event_duplicates, dict(result.events_inserted)) == (2, {"anomaly_cleared": 1})

    devices = {d["id"]: d["anomaly"] for d in (await api.get("/api/v1/devices")).json()}
    assert devices == {
        "plant1.gw1.boiler1": {"active": True, "score": 4.25, "since": "2025-11-25T14:16:10.000Z"},
        "plant1.gw1.boiler2": {"active": False, "score": 1.0, "since": "2025-11-25T14:16:30.000Z"},
        "plant1.gw2.meter1": {"active": False, "score": None, "since": None},
    }
    one = (await api.get("/api/v1/devices/plant1.gw1.boiler1")).json()
    assert one["anomaly"] == devices["plant1.gw1.boiler1"]

    r = await api.get("/api/v1/devices/plant1.gw1.boiler1/anomalies")
    assert r.status_code == 200
    assert r.json() == [
        {"ts": "2025-11-25T14:16:10.000Z", "type": "anomaly_started", "device": "boiler1",
         "message": "anomaly_started on boiler1", "readings_dropped": 0,
         "details": {"model": "sim-boiler-anomaly", "version": 1, "score": 4.25},
         "received": "2025-11-25T14:16:40.000Z"},
        {"ts": "2025-11-25T14:16:00.000Z", "type": "anomaly_cleared", "device": "boiler1",
         "message": "anomaly_cleared on boiler1", "readings_dropped": 0,
         "details": {"model": "sim-boiler-anomaly", "version": 1, "score": 0.5},
         "received": "2025-11-25T14:16:40.000Z"},
    ]
    r = await api.get("/api/v1/devices/plant1.gw1.boiler2/anomalies", params={"limit": 1})
    assert [(e["type"], e["details"]["score"]) for e in r.json()] == [("anomaly_cleared", 1.0)]
    assert (await api.get("/api/v1/devices/plant1.gw2.meter1/anomalies")).json() == []
    assert (await api.get("/api/v1/devices/plant1.gw1.nope/anomalies")).status_code == 404

    base = "/api/v1/gateways/plant1.gw1/events"
    r = await api.get(base)
    assert [(e["type"], e["device"]) for e in r.json()] == [
        ("anomaly_cleared", "boiler2"), ("anomaly_started", "boiler2"), ("anomaly_started", "boiler1"),
        ("anomaly_cleared", "boiler1"), ("model_activated", None)]
    r = await api.get(base, params={"type": "model_activated"})
    assert [(e["type"], e["device"], e["details"]) for e in r.json()] == [
        ("model_activated", None, {"profile": "sim-boiler", "version": 1})]
    r = await api.get(base, params={"type": ["anomaly_started", "model_activated"], "device": "boiler2"})
    assert [(e["type"], e["device"]) for e in r.json()] == [("anomaly_started", "boiler2")]
    r = await api.get(base, params={"device": "boiler1"})
    assert [e["type"] for e in r.json()] == ["anomaly_started", "anomaly_cleared"]
    for params in ({"type": "no_such_type"}, {"device": "bad name"}):
        assert (await api.get(base, params=params)).status_code == 422, params


async def test_openapi_documents_the_model_endpoints(api: httpx.AsyncClient) -> None:
    spec = (await api.get("/openapi.json")).json()
    paths = spec["paths"]
    assert {"/api/v1/models", "/api/v1/models/{name}/{version}", "/api/v1/models/{name}/{version}/file",
            "/api/v1/model-assignments", "/api/v1/gateways/{gateway_id}/models",
            "/api/v1/devices/{device_id}/anomalies"} <= set(paths)
    assert set(paths["/api/v1/model-assignments"]) == {"get", "put", "delete"}
    upload_body = paths["/api/v1/models"]["post"]["requestBody"]
    assert upload_body["content"] == {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    assert {"201", "200", "400", "409", "413", "415", "422"} <= set(paths["/api/v1/models"]["post"]["responses"])
