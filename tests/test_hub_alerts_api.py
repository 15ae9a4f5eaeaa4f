"""``/api/v1/alerts`` on a database whose alerts the engine made (SQLite here; PostgreSQL in
``test_hub_alerts_postgres.py``, which reruns these tests with another ``db_url``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hub.alerts.engine import AlertEngine
from hub.alerts.models import Alert, AlertEvent
from hub.alerts.rules import AlertsConfig
from hub.api import ApiContext, create_app
from hub.db import Database
from hub.signals import Signal, SignalKind
from hub.store import EventItem, TelemetryItem
from tests.hubtools import ADMIN_PASSWORD, T0, add_user, admin_auth, event, telemetry

NOW = T0 + 3_600_000


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """Where the test database lives; overridden by test_hub_alerts_postgres.py."""
    return f"sqlite://{tmp_path}/hub.db"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def pressure(site: str, device: str, seq: int, value: float) -> TelemetryItem:
    return TelemetryItem(telemetry(site, "gw1", [(device, "pressure", seq, T0 + seq, value, "bar", "good")]), T0)


async def _seed(db: Database) -> dict[str, int]:
    """Alerts: plant1 boiler1 critical (cleared) and again (open), plant2 boiler1 critical (open),
    plant1 boiler2 anomaly warning (open), a human error on plant1 (open, info)."""
    clock = Clock()
    cfg = AlertsConfig.model_validate({"builtin_rules": False, "rules": [
        {"type": "threshold", "name": "pressure", "metric": "pressure", "below": 0.8, "severity": "critical"},
        {"type": "anomaly", "name": "anomaly"},
        {"type": "human_error", "name": "human", "severity": "info"}]})
    engine = AlertEngine(db, cfg, clock=clock)
    steps: list[Any] = [
        [pressure("plant1", "boiler1", 1, 0.5)], [pressure("plant1", "boiler1", 2, 1.5)],
        [pressure("plant2", "boiler1", 1, 0.4)],
        ("event", event("plant1", "gw1", "anomaly_started", T0, device="boiler2", details={"score": 5})),
        [pressure("plant1", "boiler1", 3, 0.6)],
        ("signal", Signal(SignalKind.HUMAN_ERROR, T0, "reading below the previous one", site="plant1")),
    ]
    for i, step in enumerate(steps):
        clock.now = T0 + i * 60_000
        if isinstance(step, list):
            await engine.evaluate_batch(step)
        elif step[0] == "event":
            await engine.evaluate_batch([], [], [EventItem(step[1], clock.now)])
        else:
            await engine.evaluate_signal(step[1])
    with db.activate():
        rows = await Alert.all().order_by("id").values_list("key", "id")
    ids: dict[str, int] = {}
    for key, pk in rows:
        ids[key if key not in ids else key + "#2"] = pk
    return ids


@pytest.fixture
async def seeded(db_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, Database, dict[str, int]]]:
    db = await Database(db_url).open()
    try:
        ids = await _seed(db)
        await add_user(db, "admin", "admin", ADMIN_PASSWORD)
        app = create_app(ApiContext(db=db, clock=lambda: NOW))
        async with httpx.AsyncClient(
                auth=admin_auth(), transport=httpx.ASGITransport(app=app), base_url="http://hub") as client:
            yield client, db, ids
    finally:
        await db.close()


async def _snapshot(db: Database) -> tuple[list[Any], int]:
    with db.activate():
        return (await Alert.all().order_by("id").values_list("id", "state", "acknowledged_by", "cleared_by", "count"),
                await AlertEvent.all().count())


async def test_list_newest_first_with_filters_and_paging(seeded: Any) -> None:
    api, _, ids = seeded
    r = await api.get("/api/v1/alerts")
    assert r.status_code == 200
    body = r.json()
    assert [a["key"] for a in body] == ["human:plant1", "pressure:plant1.gw1.boiler1", "anomaly:plant1.gw1.boiler2",
                                        "pressure:plant2.gw1.boiler1", "pressure:plant1.gw1.boiler1"]
    assert [a["state"] for a in body] == ["open", "open", "open", "open", "cleared"]
    newest = body[1]
    assert newest == {
        "id": ids["pressure:plant1.gw1.boiler1#2"], "key": "pressure:plant1.gw1.boiler1", "rule": "pressure",
        "type": "threshold", "severity": "critical", "state": "open", "site": "plant1", "gateway": "gw1",
        "device": "plant1.gw1.boiler1", "metric": "pressure",
        "message": "plant1.gw1.boiler1 pressure 0.6 bar below 0.8",
        "count": 1, "last_value": 0.6, "opened_at": "2025-11-25T14:04:00.000Z",
        "last_triggered_at": "2025-11-25T14:04:00.000Z", "acknowledged_at": None, "acknowledged_by": None,
        "cleared_at": None, "cleared_by": None, "notifications_sent": 0, "notifications_suppressed": 0}
    assert body[0]["device"] is None and body[0]["site"] == "plant1" and body[0]["severity"] == "info"

    async def keys(**params: Any) -> list[str]:
        r = await api.get("/api/v1/alerts", params=params)
        assert r.status_code == 200, r.text
        return [a["key"] for a in r.json()]

    assert await keys(state="cleared") == ["pressure:plant1.gw1.boiler1"]
    assert await keys(severity="warning") == ["anomaly:plant1.gw1.boiler2"]
    assert await keys(severity=["warning", "info"]) == ["human:plant1", "anomaly:plant1.gw1.boiler2"]
    assert await keys(site="plant2") == ["pressure:plant2.gw1.boiler1"]
    assert await keys(device="plant1.gw1.boiler1") == ["pressure:plant1.gw1.boiler1"] * 2
    assert await keys(device="plant1.gw1.boiler1", state="open", severity="critical") == [
        "pressure:plant1.gw1.boiler1"]
    assert await keys(limit=2) == ["human:plant1", "pressure:plant1.gw1.boiler1"]
    assert await keys(limit=2, offset=2) == ["anomaly:plant1.gw1.boiler2", "pressure:plant2.gw1.boiler1"]
    assert await keys(site="nowhere") == []


async def test_detail_has_the_history(seeded: Any) -> None:
    api, _, ids = seeded
    r = await api.get(f"/api/v1/alerts/{ids['pressure:plant1.gw1.boiler1']}")
    assert r.status_code == 200
    body = r.json()
    assert (body["state"], body["cleared_by"], body["cleared_at"]) == ("cleared", "auto", "2025-11-25T14:01:00.000Z")
    assert [(h["ts"], h["action"], h["by"], h["value"]) for h in body["history"]] == [
        ("2025-11-25T14:00:00.000Z", "opened", None, 0.5), ("2025-11-25T14:01:00.000Z", "cleared", "auto", 1.5)]


async def test_ack_then_clear(seeded: Any) -> None:
    api, _, ids = seeded
    aid = ids["pressure:plant2.gw1.boiler1"]
    r = await api.post(f"/api/v1/alerts/{aid}/ack", json={"by": "alice", "note": "valve checked"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["state"], body["acknowledged_by"], body["acknowledged_at"]) == (
        "acknowledged", "alice", "2025-11-25T15:00:00.000Z")
    assert (body["history"][-1]["action"], body["history"][-1]["by"], body["history"][-1]["message"]) == (
        "acknowledged", "alice", "valve checked")
    r = await api.post(f"/api/v1/alerts/{aid}/clear", json={"by": "bob"})
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["cleared_by"]) == ("cleared", "bob")
    assert [h["action"] for h in r.json()["history"]] == ["opened", "acknowledged", "cleared"]
    listed = (await api.get("/api/v1/alerts", params={"site": "plant2"})).json()
    assert listed[0]["state"] == "cleared"
    # An open alert can be cleared without being acknowledged.
    r = await api.post(f"/api/v1/alerts/{ids['anomaly:plant1.gw1.boiler2']}/clear", json={"by": "carol"})
    assert (r.status_code, r.json()["state"]) == (200, "cleared")


async def test_bad_requests_change_nothing(seeded: Any) -> None:
    api, db, ids = seeded
    before = await _snapshot(db)
    cleared = ids["pressure:plant1.gw1.boiler1"]
    open_id = ids["pressure:plant2.gw1.boiler1"]
    cases: list[tuple[str, str, Any, int, str | None]] = [
        ("get", "/api/v1/alerts/999999", None, 404, "unknown alert 999999"),
        ("post", "/api/v1/alerts/999999/ack", {"by": "alice"}, 404, "unknown alert 999999"),
        ("post", "/api/v1/alerts/999999/clear", {"by": "alice"}, 404, "unknown alert 999999"),
        ("post", f"/api/v1/alerts/{cleared}/ack", {"by": "alice"}, 409,
         f"alert {cleared} is cleared; a cleared alert cannot be acknowledged"),
        ("post", f"/api/v1/alerts/{cleared}/clear", {"by": "alice"}, 409, f"alert {cleared} is already cleared"),
        ("get", "/api/v1/alerts/abc", None, 422, None),
        ("get", "/api/v1/alerts/0", None, 422, None),
        ("post", "/api/v1/alerts/abc/ack", {"by": "alice"}, 422, None),
        ("post", f"/api/v1/alerts/{open_id}/ack", {}, 422, None),
        ("post", f"/api/v1/alerts/{open_id}/ack", {"by": ""}, 422, None),
        ("post", f"/api/v1/alerts/{open_id}/ack", {"by": 42}, 422, None),
        ("post", f"/api/v1/alerts/{open_id}/ack", {"by": "alice", "role": "admin"}, 422, None),
        ("post", f"/api/v1/alerts/{open_id}/ack", "alice", 422, None),
        ("post", f"/api/v1/alerts/{open_id}/clear", None, 422, None),
        ("get", "/api/v1/alerts?state=closed", None, 422, None),
        ("get", "/api/v1/alerts?severity=fatal", None, 422, None),
        ("get", "/api/v1/alerts?limit=0", None, 422, None),
        ("get", "/api/v1/alerts?limit=many", None, 422, None),
        ("get", "/api/v1/alerts?offset=-1", None, 422, None),
        ("get", "/api/v1/alerts?site=a%2Fb", None, 422, None),
    ]
    for method, path, body, status, detail in cases:
        if method == "get":
            r = await api.get(path)
        else:
            r = await api.post(path, json=body) if body is not None else await api.post(path)
        assert r.status_code == status, (path, body, r.text)
        assert r.headers["content-type"] == "application/json"
        if detail is not None:
            assert r.json() == {"detail": detail}, path
    assert await _snapshot(db) == before

    r = await api.post(f"/api/v1/alerts/{open_id}/ack", json={"by": "alice"})
    assert r.status_code == 200
    after_ack = await _snapshot(db)
    r = await api.post(f"/api/v1/alerts/{open_id}/ack", json={"by": "bob"})
    assert (r.status_code, r.json()) == (409, {"detail": f"alert {open_id} is already acknowledged by 'alice'"})
    assert await _snapshot(db) == after_ack


async def test_openapi_documents_the_alert_endpoints(seeded: Any) -> None:
    api, _, _ = seeded
    paths = (await api.get("/openapi.json")).json()["paths"]
    assert set(paths["/api/v1/alerts"]) == {"get"}
    assert set(paths["/api/v1/alerts/{alert_id}"]) == {"get"}
    for action in ("ack", "clear"):
        op = paths[f"/api/v1/alerts/{{alert_id}}/{action}"]["post"]
        assert {"200", "404", "409", "422"} <= set(op["responses"])
