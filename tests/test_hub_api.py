"""REST API on a database seeded through the store (SQLite here; PostgreSQL in
``test_hub_postgres.py``, which reruns these tests with another ``db_url``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from hub.api import ApiContext, create_app
from hub.config import StatusConfig
from hub.db import Database
from hub.metrics import HubMetrics
from hub.store import EventItem, StatusItem, Store, TelemetryItem
from protocol.schema import GatewayState, StatusV1
from tests.hubtools import ADMIN_PASSWORD, T0, add_user, admin_auth, event, series, telemetry

NOW = T0 + 1_000_000  # the API's clock in these tests
RULES = StatusConfig(stale_after_s=120, offline_after_s=600)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """Where the test database lives; overridden by test_hub_postgres.py."""
    return f"sqlite://{tmp_path}/hub.db"


async def _seed(db: Database) -> None:
    store = Store(db)
    fresh = NOW - 10_000  # 10 s old -> online
    await store.write([
        TelemetryItem(telemetry("plant1", "gw1", [
            *series("boiler1", "flow_temp", 5, ts0=fresh - 4000, value0=60.0),
            ("boiler1", "pressure", 5, fresh, 1.5, "bar", "good"),
            ("boiler1", "burner_on", 6, fresh, True, "", "good"),
            ("boiler1", "fault", 7, fresh, None, "", "bad"),
        ], backlog=17), NOW - 9000),
        # 300 s old -> stale
        TelemetryItem(telemetry("plant1", "gw1", series("meter1", "energy", 3, ts0=NOW - 302_000, unit="kWh"),
                                kinds={"meter1": "meter"}), NOW - 290_000),
        # 1000 s old -> offline
        TelemetryItem(telemetry("plant2", "gw1", series("meter1", "energy", 2, ts0=NOW - 1_001_000, unit="kWh"),
                                kinds={"meter1": "meter"}), NOW - 999_000),
    ], [StatusItem(StatusV1(site="plant1", gateway="gw1", state=GatewayState.ONLINE, ts=NOW - 60_000,
                            agent_version="0.1.0"), NOW - 60_000),
        StatusItem(StatusV1(site="plant2", gateway="gw1", state=GatewayState.OFFLINE, ts=NOW - 500_000),
                   NOW - 500_000)])
    thinned = event("plant1", "gw1", "buffer_thinned", NOW - 200_000, readings_dropped=120,
                    message="disk cap reached", details={"cap_mb": 50, "ratio": 0.5, "policy": "every-2nd"})
    await store.write([], [], [
        EventItem(thinned, NOW - 199_000),
        EventItem(event("plant1", "gw1", "buffer_corrupt", NOW - 100_000, readings_dropped=30,
                        message="buffer.db moved aside"), NOW - 99_000),
        EventItem(event("plant1", "gw1", "buffer_full", NOW - 50_000, message="SQLITE_FULL"), NOW - 49_000),
    ])
    await store.write([], [], [EventItem(thinned, NOW - 1000)])  # redelivered: not counted twice


@pytest.fixture
async def api(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    db = await Database(db_url).open()
    try:
        await _seed(db)
        metrics = HubMetrics()
        metrics.batch(0.01, 10, 7)
        metrics.events(4, {"buffer_thinned": 1, "buffer_corrupt": 2})
        await add_user(db, "admin", "admin", ADMIN_PASSWORD)
        app = create_app(ApiContext(db=db, status=RULES, metrics=metrics, clock=lambda: NOW))
        async with httpx.AsyncClient(
                auth=admin_auth(), transport=httpx.ASGITransport(app=app), base_url="http://hub") as client:
            yield client
    finally:
        await db.close()


async def test_health(api: httpx.AsyncClient) -> None:
    r = await api.get("/api/v1/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["database"]["connected"] is True
    assert body["database"]["backend"] in ("sqlite", "postgres")
    assert body["broker"] == {"connected": False, "state": "disabled", "host": None, "port": None, "error": None}
    assert body["ingest"]["readings_stored"] == 7
    assert body["ingest"]["duplicates"] == 3
    assert (body["ingest"]["events"], body["ingest"]["event_duplicates"]) == (3, 1)
    assert body["ingest"]["events_by_type"] == {"buffer_thinned": 1, "buffer_corrupt": 2}


async def test_devices_list(api: httpx.AsyncClient) -> None:
    r = await api.get("/api/v1/devices")
    assert r.status_code == 200
    devices = r.json()
    assert [d["id"] for d in devices] == ["plant1.gw1.boiler1", "plant1.gw1.meter1", "plant2.gw1.meter1"]
    b, m, old = devices
    assert {k: b[k] for k in ("id", "kind", "site", "gateway", "name", "profile", "status", "last_seen")} == {
        "id": "plant1.gw1.boiler1", "kind": "boiler", "site": "plant1", "gateway": "gw1", "name": "boiler1",
        "profile": "sim-boiler", "status": "online", "last_seen": "2025-11-25T14:16:30.000Z"}
    assert (m["kind"], m["status"], m["last_seen"]) == ("meter", "stale", "2025-11-25T14:11:40.000Z")
    assert (old["site"], old["status"]) == ("plant2", "offline")
    r = await api.get("/api/v1/devices", params={"site": "plant2"})
    assert [d["id"] for d in r.json()] == ["plant2.gw1.meter1"]


async def test_device_detail(api: httpx.AsyncClient) -> None:
    r = await api.get("/api/v1/devices/plant1.gw1.meter1")
    assert r.status_code == 200
    assert (r.json()["id"], r.json()["kind"]) == ("plant1.gw1.meter1", "meter")


async def test_latest(api: httpx.AsyncClient) -> None:
    r = await api.get("/api/v1/devices/plant1.gw1.boiler1/latest")
    assert r.status_code == 200
    body = r.json()
    assert body["id"] == "plant1.gw1.boiler1"
    assert body["metrics"] == {
        "flow_temp": {"value": 64.0, "unit": "degC", "ts": "2025-11-25T14:16:30.000Z", "quality": "good", "seq": 4},
        "pressure": {"value": 1.5, "unit": "bar", "ts": "2025-11-25T14:16:30.000Z", "quality": "good", "seq": 5},
        "burner_on": {"value": True, "unit": "", "ts": "2025-11-25T14:16:30.000Z", "quality": "good", "seq": 6},
        "fault": {"value": None, "unit": "", "ts": "2025-11-25T14:16:30.000Z", "quality": "bad", "seq": 7},
    }


async def test_readings_filters(api: httpx.AsyncClient) -> None:
    base = "/api/v1/devices/plant1.gw1.boiler1/readings"
    r = await api.get(base, params={"metric": "flow_temp"})
    assert r.status_code == 200
    rows = r.json()
    assert [(x["ts"], x["metric"], x["value"], x["unit"], x["quality"], x["seq"]) for x in rows] == [
        (f"2025-11-25T14:16:{26 + i}.000Z", "flow_temp", 60.0 + i, "degC", "good", i) for i in range(5)]

    r = await api.get(base, params={"metric": "flow_temp", "since": "2025-11-25T14:16:28Z"})
    assert [x["seq"] for x in r.json()] == [2, 3, 4]
    r = await api.get(base, params={"metric": "flow_temp", "since": "2025-11-25T15:16:28+01:00", "limit": 2})
    assert [x["seq"] for x in r.json()] == [2, 3]
    r = await api.get(base, params={"since": "2025-11-25T14:16:27", "until": "2025-11-25T14:16:29.000Z"})
    assert [x["seq"] for x in r.json()] == [1, 2]  # naive = UTC, until exclusive
    r = await api.get(base)
    assert len(r.json()) == 8
    assert [x["ts"] for x in r.json()] == sorted(x["ts"] for x in r.json())
    r = await api.get(base, params={"metric": "nothing"})
    assert (r.status_code, r.json()) == (200, [])


async def test_unknown_device_404_json(api: httpx.AsyncClient) -> None:
    for path in ("/api/v1/devices/plant1.gw1.nope", "/api/v1/devices/plant1.gw1.nope/latest",
                 "/api/v1/devices/plant1.gw1.nope/readings", "/api/v1/devices/not-a-uid/latest"):
        r = await api.get(path)
        assert r.status_code == 404, path
        assert r.headers["content-type"] == "application/json"
        assert "unknown device" in r.json()["detail"]


@pytest.mark.parametrize("params", [
    {"since": "yesterday"},
    {"until": "2025-13-45T00:00:00Z"},
    {"limit": "0"},
    {"limit": "10001"},
    {"limit": "many"},
    {"metric": "bad metric"},
    {"since": "2025-11-25T15:00:00Z", "until": "2025-11-25T14:00:00Z"},
])
async def test_bad_query_parameters_422(api: httpx.AsyncClient, params: dict[str, str]) -> None:
    r = await api.get("/api/v1/devices/plant1.gw1.boiler1/readings", params=params)
    assert r.status_code == 422
    assert "detail" in r.json()


async def test_limit_bounds_accepted(api: httpx.AsyncClient) -> None:
    for limit in ("1", "10000"):
        r = await api.get("/api/v1/devices/plant1.gw1.boiler1/readings", params={"limit": limit})
        assert r.status_code == 200
        assert len(r.json()) == min(int(limit), 8)


async def test_gateways(api: httpx.AsyncClient) -> None:
    r = await api.get("/api/v1/gateways")
    assert r.status_code == 200
    g1, g2 = r.json()
    assert g1 == {"id": "plant1.gw1", "site": "plant1", "gateway": "gw1", "state": "online", "status": "online",
                  "last_seen": "2025-11-25T14:16:31.000Z", "state_since": "2025-11-25T14:15:40.000Z",
                  "backlog": 0, "readings_dropped": 150, "devices": 2, "agent_version": "0.1.0"}
    # The status message came after the telemetry in the batch, so its backlog (0) is the latest.
    assert (g2["id"], g2["state"], g2["status"], g2["devices"], g2["readings_dropped"]) == (
        "plant2.gw1", "offline", "offline", 1, 0)


async def test_gateway_events(api: httpx.AsyncClient) -> None:
    base = "/api/v1/gateways/plant1.gw1/events"
    r = await api.get(base)
    assert r.status_code == 200
    assert r.json() == [
        {"ts": "2025-11-25T14:15:50.000Z", "type": "buffer_full", "device": None, "message": "SQLITE_FULL",
         "readings_dropped": 0, "details": {}, "received": "2025-11-25T14:15:51.000Z"},
        {"ts": "2025-11-25T14:15:00.000Z", "type": "buffer_corrupt", "device": None, "message": "buffer.db moved aside",
         "readings_dropped": 30, "details": {}, "received": "2025-11-25T14:15:01.000Z"},
        {"ts": "2025-11-25T14:13:20.000Z", "type": "buffer_thinned", "device": None, "message": "disk cap reached",
         "readings_dropped": 120, "details": {"cap_mb": 50, "ratio": 0.5, "policy": "every-2nd"},
         "received": "2025-11-25T14:13:21.000Z"},
    ]
    r = await api.get(base, params={"since": "2025-11-25T14:15:00Z"})
    assert [e["type"] for e in r.json()] == ["buffer_full", "buffer_corrupt"]  # since is inclusive
    r = await api.get(base, params={"since": "2025-11-25T15:15:00.001+01:00"})
    assert [e["type"] for e in r.json()] == ["buffer_full"]
    r = await api.get(base, params={"limit": 2})
    assert [e["type"] for e in r.json()] == ["buffer_full", "buffer_corrupt"]
    r = await api.get(base, params={"until": "2025-11-25T14:15:50", "limit": 1})  # naive = UTC, exclusive
    assert [e["type"] for e in r.json()] == ["buffer_corrupt"]
    r = await api.get(base, params={"limit": 10000})
    assert len(r.json()) == 3
    r = await api.get("/api/v1/gateways/plant2.gw1/events")
    assert (r.status_code, r.json()) == (200, [])


async def test_unknown_gateway_404_json(api: httpx.AsyncClient) -> None:
    for gid in ("plant1.nope", "plant3.gw1", "plant1", "plant1.gw1.boiler1", "plant1.gw%25"):
        r = await api.get(f"/api/v1/gateways/{gid}/events")
        assert r.status_code == 404, gid
        assert r.headers["content-type"] == "application/json"
        assert r.json()["detail"].startswith("unknown gateway"), gid


@pytest.mark.parametrize("params", [
    {"since": "yesterday"},
    {"until": "2025-13-45T00:00:00Z"},
    {"limit": "0"},
    {"limit": "10001"},
    {"limit": "few"},
    {"since": "2025-11-25T15:00:00Z", "until": "2025-11-25T14:00:00Z"},
])
async def test_bad_event_parameters_422(api: httpx.AsyncClient, params: dict[str, str]) -> None:
    r = await api.get("/api/v1/gateways/plant1.gw1/events", params=params)
    assert r.status_code == 422
    assert "detail" in r.json()


async def test_metrics_and_docs(api: httpx.AsyncClient) -> None:
    r = await api.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "twin_hub_readings_stored_total 7.0" in r.text
    assert "twin_hub_readings_duplicate_total 3.0" in r.text
    assert "twin_hub_batch_seconds_bucket" in r.text
    assert 'twin_hub_gateway_events_total{type="buffer_thinned"} 1.0' in r.text
    assert 'twin_hub_gateway_events_total{type="buffer_corrupt"} 2.0' in r.text
    assert 'twin_hub_gateway_events_total{type="buffer_full"} 0.0' in r.text  # exported before the first
    assert "twin_hub_gateway_events_duplicate_total 1.0" in r.text
    r = await api.get("/docs")
    assert r.status_code == 200 and "swagger" in r.text.lower()
    spec = (await api.get("/openapi.json")).json()
    assert {"/api/v1/health", "/api/v1/devices", "/api/v1/devices/{device_id}/latest",
            "/api/v1/devices/{device_id}/readings", "/api/v1/gateways",
            "/api/v1/gateways/{gateway_id}/events"} <= set(spec["paths"])
