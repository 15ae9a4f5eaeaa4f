"""Board report (issue 8, item 8): the PDF and PNG of a seeded site, through the API.

Site plant1: boiler1 healthy all week, boiler2 whose pressure fell to 0.5 bar (an open critical alert)
and whose gateway reported an anomaly (an open warning alert), meter1 rising 10 kWh per hour on a flat
tariff. Site plant2 has an alert of its own, which plant1's report must not show. The PDF's text is
checked for the site, the headline, the alert and the same cost total as ``GET /api/v1/meters/{id}/cost``;
the files are kept under ``var/test-artifacts/report/`` to look at. SQLite here; the report data and
PDF tests run again on PostgreSQL in ``test_hub_report_postgres.py``.
"""

from __future__ import annotations

import asyncio
import io
import struct
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pypdf import PdfReader

from hub import queries, report
from hub.alerts.engine import AlertEngine
from hub.alerts.rules import AlertsConfig
from hub.api import ApiContext, create_app, report_routes
from hub.db import Database
from hub.store import EventItem, Store, TelemetryItem, check_event
from tests.hubtools import ADMIN_PASSWORD, BearerAuth, ReadingTuple, add_user, event, telemetry

ARTIFACTS = Path(__file__).resolve().parents[1] / "var" / "test-artifacts" / "report"


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * 1000


NOW = ms("2026-11-05T12:00")
WEEK0 = ms("2026-10-30T00:00")  # first day of the trend charts
STEP = 6 * 3_600_000
FLAT = {"name": "flat", "currency": "GBP", "timezone": "Europe/London", "vat_rate": "0.05",
        "standing_charge_per_day": "0.50", "effective_from": "2026-01-01T00:00:00Z",
        "bands": [{"name": "all-day", "rate": "0.25"}]}


def _plant1_readings() -> list[ReadingTuple]:
    out: list[ReadingTuple] = []
    seq = 0
    ts = WEEK0
    i = 0
    while ts < NOW - 60_000:
        day = (ts - WEEK0) // 86_400_000
        out += [("boiler1", "flow_temp", seq + 1, ts, 60.0 + day, "degC", "good"),
                ("boiler1", "pressure", seq + 2, ts, 1.5, "bar", "good"),
                ("boiler2", "flow_temp", seq + 3, ts, 70.0, "degC", "good"),
                ("boiler2", "pressure", seq + 4, ts, 1.5 - 0.05 * day, "bar", "good"),
                ("meter1", "energy_import", seq + 5, ts, 1000.0 + 60.0 * i, "kWh", "good")]
        seq += 5
        ts += STEP
        i += 1
    last = NOW - 30_000
    out += [("boiler1", "flow_temp", seq + 1, last, 66.0, "degC", "good"),
            ("boiler1", "pressure", seq + 2, last, 1.5, "bar", "good"),
            ("boiler2", "pressure", seq + 3, last, 0.5, "bar", "good"),
            ("meter1", "energy_import", seq + 4, last, 1000.0 + 10.0 * (last - WEEK0) / 3_600_000, "kWh", "good")]
    return out


async def _seed(db: Database) -> None:
    kinds = {"boiler1": "boiler", "boiler2": "boiler", "meter1": "meter"}
    plant1 = TelemetryItem(telemetry("plant1", "gw1", _plant1_readings(), kinds=kinds), NOW)
    plant2 = TelemetryItem(telemetry("plant2", "gw1", [("boiler9", "pressure", 1, NOW - 10_000, 0.4, "bar", "good")]),
                           NOW)
    anomaly = event("plant1", "gw1", "anomaly_started", NOW - 600_000, device="boiler2",
                    message="boiler2: anomaly score 4.25 above threshold 2.5", details={"score": 4.25})
    check_event(anomaly)
    events = [EventItem(anomaly, NOW)]
    await Store(db).write([plant1, plant2], [], events)
    cfg = AlertsConfig.model_validate({"builtin_rules": False, "rules": [
        {"type": "threshold", "name": "pressure", "metric": "pressure", "below": 0.8, "severity": "critical"},
        {"type": "anomaly", "name": "anomaly"}]})
    engine = AlertEngine(db, cfg, clock=lambda: NOW)
    await engine.evaluate_batch([plant1, plant2], [], events)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """Where the test database lives; overridden by test_hub_report_postgres.py."""
    return f"sqlite://{tmp_path}/hub.db"


@pytest.fixture
async def api(db_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    db = await Database(db_url).open()
    try:
        await _seed(db)
        await add_user(db, "admin", "admin", ADMIN_PASSWORD)
        await add_user(db, "board", "viewer", "board-password-1")
        app = create_app(ApiContext(db=db, clock=lambda: NOW))
        async with httpx.AsyncClient(auth=BearerAuth("admin", ADMIN_PASSWORD),
                                     transport=httpx.ASGITransport(app=app), base_url="http://hub") as admin:
            r = await admin.post("/api/v1/tariffs", json=FLAT)
            assert r.status_code == 201, r.text
            r = await admin.post("/api/v1/tariff-assignments", json={
                "tariff": "flat", "site": "plant1", "effective_from": "2026-01-01T00:00:00Z"})
            assert r.status_code == 201, r.text
            yield admin, app
    finally:
        await db.close()


def viewer(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(auth=BearerAuth("board", "board-password-1"), transport=httpx.ASGITransport(app=app),
                             base_url="http://hub")


def _save(name: str, body: bytes) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / name).write_bytes(body)


def _words(text: str) -> str:
    return " ".join(text.split())


async def test_pdf_has_site_headline_alerts_and_the_cost_of_the_cost_route(api: Any) -> None:
    admin, app = api
    cost = await admin.get("/api/v1/meters/plant1.gw1.meter1/cost", params={"since": "2026-11-01T00:00:00Z"})
    assert cost.status_code == 200, cost.text
    total = cost.json()["total"]
    # 4 days 12 h of 10 kWh/h = 1080 kWh × 0.25 = 270.00, standing 4.5 days × 0.50 = 2.25, VAT 5 % of
    # 272.25 = 13.6125 -> 13.61: 285.86 (the last reading is 30 s before now: 1079.917 kWh, 269.98 + 2.25
    # + 13.61 = 285.84).
    assert total == "285.84", cost.json()
    async with viewer(app) as board:
        r = await board.get("/api/v1/sites/plant1/report.pdf")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/pdf"
    assert r.headers["content-disposition"] == 'attachment; filename="board-report-plant1-2026-11-05.pdf"'
    _save("board-report-plant1.pdf", r.content)
    pdf = PdfReader(io.BytesIO(r.content))
    assert len(pdf.pages) == 2
    assert pdf.metadata is not None and pdf.metadata.title == "Board report plant1 2026-11-05"
    page1 = _words(pdf.pages[0].extract_text())
    assert "Board report — site plant1" in page1
    assert "2026-11-05" in page1
    assert "1 of 2 boilers healthy; 1 needs attention: low pressure, unusual behaviour" in page1
    assert "CRITICAL" in page1 and "gw1.boiler2: low pressure" in page1
    assert "pressure 0.5 bar below 0.8" in page1
    assert "WARNING" in page1 and "gw1.boiler2: unusual behaviour" in page1
    assert f"gw1.meter1: GBP {total}" in page1 and f"Site total: GBP {total}" in page1
    assert "Most at risk: gw1.boiler2" in page1
    # The twin picture of boiler2 (hub/twin), embedded as an image: not the placeholder.
    assert "twin picture unavailable" not in page1 and len(pdf.pages[0].images) == 1
    assert "Flow temperature (daily mean)" in page1 and "Energy per day" in page1
    assert "boiler9" not in page1 and "plant2" not in page1
    page2 = _words(pdf.pages[1].extract_text())
    assert "gw1.boiler1 (boiler, online): healthy" in page2
    assert "[critical] gw1.boiler2: low pressure — plant1.gw1.boiler2 pressure 0.5 bar below 0.8" in page2
    assert f"total GBP {total}" in page2 and "1079.917 kWh" in page2


async def test_png_is_page_one_at_150_dpi(api: Any) -> None:
    _, app = api
    async with viewer(app) as board:
        r = await board.get("/api/v1/sites/plant1/report.png")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["content-disposition"] == 'attachment; filename="board-report-plant1-2026-11-05.png"'
    body = r.content
    assert body[:8] == b"\x89PNG\r\n\x1a\n" and body[12:16] == b"IHDR"
    width, height = struct.unpack(">II", body[16:24])
    assert (width, height) == report.PNG_SIZE == (1753, 1240)
    _save("board-report-plant1.png", body)


async def test_report_data_trends_and_most_at_risk(api: Any) -> None:
    _, app = api
    ctx = app.state.hub
    data = await report.gather(ctx.db, "plant1", NOW, ctx.status, ctx.billing)
    assert data.most_at_risk is not None and data.most_at_risk.device.uid == "plant1.gw1.boiler2"
    assert data.twin_png is not None and data.twin_png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data.twin_png[16:24]) == (1800, 1200)  # 900 x 600 at TWIN_SCALE 2
    assert [(r.severity, r.device, r.reason) for r in data.risks] == [
        ("critical", "plant1.gw1.boiler2", "low pressure"), ("warning", "plant1.gw1.boiler2", "unusual behaviour")]
    flow = data.trends["flow_temp"]["plant1.gw1.boiler1"]
    # Four readings a day at 60 + day; the last day also has 66.0 at 11:59:30.
    assert [d for d, _ in flow] == [WEEK0 + i * 86_400_000 for i in range(7)]
    assert [round(v, 3) for _, v in flow] == [60.0, 61.0, 62.0, 63.0, 64.0, 65.0, round((66.0 * 2 + 66.0) / 3, 3)]
    energy = dict(data.energy["plant1.gw1.meter1"])
    assert energy[WEEK0] == pytest.approx(240.0) and energy[ms("2026-11-05T00:00")] == pytest.approx(119.9167, abs=1e-3)
    # The same aggregate straight from the query (the database does the grouping).
    stats = await queries.daily_stats(ctx.db, [data.most_at_risk.device.pk], ["pressure"], WEEK0, NOW + 1)
    assert [(s.count, round(s.low, 3)) for s in stats] == [(4, 1.5), (4, 1.45), (4, 1.4), (4, 1.35), (4, 1.3),
                                                          (4, 1.25), (3, 0.5)]


async def test_access_unknown_site_and_busy(api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, app = api
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub") as nobody:
        r = await nobody.get("/api/v1/sites/plant1/report.pdf")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    async with viewer(app) as board:
        r = await board.get("/api/v1/sites/nowhere/report.pdf")
        assert r.status_code == 404 and r.json() == {"detail": "unknown site 'nowhere'"}
        r = await board.get("/api/v1/sites/bad name/report.png")
        assert r.status_code == 422
        # Every slot taken: the request waits WAIT_S, then 503 with Retry-After.
        monkeypatch.setattr(report_routes, "WAIT_S", 0.05)
        app.state.report_slots = asyncio.Semaphore(0)
        r = await board.get("/api/v1/sites/plant1/report.png")
        assert r.status_code == 503 and r.headers["retry-after"] == "10"
