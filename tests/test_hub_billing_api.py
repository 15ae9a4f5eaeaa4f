"""Billing through the REST API on a database seeded through the store (SQLite here;
``test_hub_billing_postgres.py`` reruns these tests on PostgreSQL with another ``db_url``).

Refused requests get a clear 4xx and change nothing: each such test compares the billing tables
before and after. Expected money figures are worked out by hand in the comments.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from hub.api import ApiContext, create_app
from hub.billing import models as bm
from hub.db import Database
from hub.signals import Signal, SignalKind
from hub.store import Store, TelemetryItem
from tests.hubtools import BearerAuth, add_user, telemetry

METER = "plant1.gw1.meter1"
BOILER = "plant1.gw1.boiler1"


def ms(text: str) -> int:
    """``2026-03-29T00:00`` (UTC) as epoch ms."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * 1000


NOW = ms("2026-11-01T00:00")  # the API's clock

ECONOMY7: dict[str, Any] = {
    "name": "economy7", "currency": "GBP", "timezone": "Europe/London", "vat_rate": "0.05",
    "standing_charge_per_day": "0.60", "effective_from": "2026-01-01T00:00:00Z",
    "bands": [{"name": "night", "rate": "0.10", "start": "00:30", "end": "07:30"},
              {"name": "day", "rate": "0.30", "start": "07:30", "end": "00:30"}],
}


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """Where the test database lives; overridden by test_hub_billing_postgres.py."""
    return f"sqlite://{tmp_path}/hub.db"


async def _seed(db: Database) -> None:
    # The meter's register on the 23-hour day 2026-03-29 (Europe/London goes from GMT to BST at
    # 01:00Z), rising 10 kWh per hour: 0.00 at 00:00Z, 65.00 at 06:30Z, 120.00 at 12:00Z; the 12:00Z
    # reading arrives twice (another seq, same time and value). The boiler reports no energy.
    kinds = {"meter1": "meter", "boiler1": "boiler"}
    readings = [("meter1", "energy_import", 1, ms("2026-03-29T00:00"), 0.0, "kWh", "good"),
                ("meter1", "energy_import", 2, ms("2026-03-29T06:30"), 65.0, "kWh", "good"),
                ("meter1", "energy_import", 3, ms("2026-03-29T12:00"), 120.0, "kWh", "good"),
                ("meter1", "energy_import", 4, ms("2026-03-29T12:00"), 120.0, "kWh", "good"),
                ("meter1", "power", 5, ms("2026-03-29T12:00"), 10.0, "kW", "good"),
                ("meter1", "energy_import", 6, ms("2026-03-29T13:00"), None, "kWh", "bad"),
                ("boiler1", "flow_temp", 1, ms("2026-03-29T12:00"), 60.0, "degC", "good")]
    await Store(db).write([TelemetryItem(telemetry("plant1", "gw1", readings, kinds=kinds), NOW - 1000)])


class Signals:
    """Collects the signals the API emits."""

    def __init__(self) -> None:
        self.got: list[Signal] = []

    async def __call__(self, signal: Signal) -> None:
        self.got.append(signal)


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await Database(db_url).open()
    try:
        await _seed(database)
        yield database
    finally:
        await database.close()


@pytest.fixture
def signals() -> Signals:
    return Signals()


@pytest.fixture
async def api(db: Database, signals: Signals) -> AsyncIterator[httpx.AsyncClient]:
    ctx = ApiContext(db=db, clock=lambda: NOW)
    ctx.signals.subscribe(signals)
    await add_user(db, "tech-7", "staff", "tech-7-password")
    app = create_app(ctx)
    async with httpx.AsyncClient(auth=BearerAuth("tech-7", "tech-7-password"),
                                 transport=httpx.ASGITransport(app=app), base_url="http://hub") as client:
        yield client


async def billing_rows(db: Database) -> dict[str, list[dict[str, Any]]]:
    """Every row of the billing tables (to show that a refused request changed nothing)."""
    with db.activate():
        return {model.__name__: await model.all().order_by("id").values()
                for model in (bm.Tariff, bm.TariffBand, bm.TariffAssignment, bm.ManualReading)}


async def post_economy7(api: httpx.AsyncClient, site: bool = True) -> None:
    r = await api.post("/api/v1/tariffs", json=ECONOMY7)
    assert r.status_code == 201, r.text
    body = {"tariff": "economy7", "effective_from": "2026-01-01T00:00:00Z",
            **({"site": "plant1"} if site else {"meter": METER})}
    r = await api.post("/api/v1/tariff-assignments", json=body)
    assert r.status_code == 201, r.text


# -- tariffs ---------------------------------------------------------------------------------------

async def test_create_and_list_tariffs(api: httpx.AsyncClient) -> None:
    r = await api.post("/api/v1/tariffs", json=ECONOMY7)
    assert r.status_code == 201
    expected = {
        "id": r.json()["id"], "name": "economy7", "currency": "GBP", "timezone": "Europe/London", "vat_rate": "0.05",
        "standing_charge_per_day": "0.6", "effective_from": "2026-01-01T00:00:00.000Z",
        "bands": [{"name": "night", "rate": "0.1", "start": "00:30", "end": "07:30", "days": "all"},
                  {"name": "day", "rate": "0.3", "start": "07:30", "end": "00:30", "days": "all"}],
        "created_at": "2026-11-01T00:00:00.000Z", "created_by": "tech-7"}
    assert r.json() == expected
    flat = {"name": "flat", "currency": "EUR", "vat_rate": "0.2", "effective_from": "2026-01-01",
            "bands": [{"name": "flat", "rate": 1}]}
    r = await api.post("/api/v1/tariffs", json=flat)
    assert r.status_code == 201, r.text
    assert r.json()["bands"] == [{"name": "flat", "rate": "1", "start": "00:00", "end": "00:00", "days": "all"}]
    r = await api.get("/api/v1/tariffs")
    assert [t["name"] for t in r.json()] == ["economy7", "flat"]
    assert r.json()[0] == expected


@pytest.mark.parametrize(("change", "status", "message"), [
    ({"bands": [{"name": "day", "rate": "0.3", "start": "07:00", "end": "00:00"},
                {"name": "night", "rate": "0.1", "start": "00:00", "end": "07:30"}]},
     422, "bands 'day' and 'night' overlap on weekdays at 07:00"),
    ({"bands": [{"name": "week", "rate": "0.3", "days": "weekday"}]}, 422, "no band covers weekends at 00:00"),
    ({"vat_rate": 0.05}, 422, "give decimal numbers as strings"),
    ({"vat_rate": "20"}, 422, "less than 1"),
    ({"standing_charge_per_day": "-1"}, 422, "greater than or equal to 0"),
    ({"currency": "XYZ"}, 422, "unsupported currency 'XYZ'"),
    ({"currency": "gbp"}, 422, "pattern"),
    ({"timezone": "Europe/Atlantis"}, 422, "unknown time zone 'Europe/Atlantis'"),
    ({"bands": [{"name": "flat", "rate": "0.1", "start": "25:00", "end": "07:00"}]}, 422, "outside 00:00..24:00"),
    ({"bands": [{"name": "flat", "rate": "0.1234567"}]}, 422, "at most 6 decimal places"),
    ({"bands": []}, 422, "at least 1"),
    ({"effective_from": "soon"}, 422, "datetime"),
    ({"surprise": 1}, 422, "Extra inputs"),
])
async def test_bad_tariffs_are_refused_and_change_nothing(api: httpx.AsyncClient, db: Database,
                                                          change: dict[str, Any], status: int, message: str) -> None:
    before = await billing_rows(db)
    r = await api.post("/api/v1/tariffs", json={**ECONOMY7, **change})
    assert r.status_code == status, r.text
    assert message in r.text
    assert await billing_rows(db) == before


async def test_duplicate_tariff_name_409(api: httpx.AsyncClient, db: Database) -> None:
    assert (await api.post("/api/v1/tariffs", json=ECONOMY7)).status_code == 201
    before = await billing_rows(db)
    r = await api.post("/api/v1/tariffs", json={**ECONOMY7, "vat_rate": "0.2"})
    assert r.status_code == 409
    assert "a tariff named 'economy7' already exists" in r.json()["detail"]
    assert await billing_rows(db) == before


# -- assignments -----------------------------------------------------------------------------------

async def test_assignments(api: httpx.AsyncClient, db: Database) -> None:
    await post_economy7(api)
    r = await api.post("/api/v1/tariff-assignments", json={"tariff": "economy7", "meter": METER,
                                                           "effective_from": "2026-06-01T00:00:00+01:00"})
    assert r.status_code == 201
    assert r.json() == {"id": r.json()["id"], "tariff": "economy7", "meter": METER, "site": None,
                        "effective_from": "2026-05-31T23:00:00.000Z", "created_at": "2026-11-01T00:00:00.000Z",
                        "created_by": "tech-7"}
    r = await api.get("/api/v1/tariff-assignments", params={"meter": METER})
    assert [(a["meter"], a["site"], a["effective_from"]) for a in r.json()] == [
        (METER, None, "2026-05-31T23:00:00.000Z"), (None, "plant1", "2026-01-01T00:00:00.000Z")]
    before = await billing_rows(db)
    # The same meter from the same instant again: a conflict, whatever the tariff.
    r = await api.post("/api/v1/tariff-assignments", json={"tariff": "economy7", "meter": METER,
                                                           "effective_from": "2026-05-31T23:00:00Z"})
    assert r.status_code == 409
    assert r.json()["detail"].startswith(f"meter '{METER}' already has a tariff assignment effective from")
    assert await billing_rows(db) == before


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"tariff": "economy8", "meter": METER}, 404, "unknown tariff 'economy8'"),
    ({"tariff": "economy7", "meter": "plant1.gw1.nope"}, 404, "unknown meter 'plant1.gw1.nope'"),
    ({"tariff": "economy7", "meter": "not-a-uid"}, 404, "unknown meter"),
    ({"tariff": "economy7", "site": "plant9"}, 404, "unknown site 'plant9'"),
    ({"tariff": "economy7", "meter": BOILER}, 422, f"device '{BOILER}' is not a meter"),
    ({"tariff": "economy7", "meter": METER, "site": "plant1"}, 422, "give exactly one of 'meter' and 'site'"),
    ({"tariff": "economy7"}, 422, "give exactly one of 'meter' and 'site'"),
    ({"tariff": "economy7", "meter": METER, "effective_from": "2025-12-31T23:59:59Z"}, 422,
     "effective only from its effective_from"),
    ({"tariff": "economy7", "site": "plant1", "effective_from": "2026-01-01T00:00:00Z"}, 409,
     "site 'plant1' already has a tariff assignment"),
    ({"tariff": "economy7", "meter": METER, "effective_from": 12.5}, 422, "effective_from"),
])
async def test_bad_assignments_are_refused_and_change_nothing(api: httpx.AsyncClient, db: Database,
                                                              body: dict[str, Any], status: int, message: str) -> None:
    await post_economy7(api)
    before = await billing_rows(db)
    r = await api.post("/api/v1/tariff-assignments", json={"effective_from": "2026-02-01T00:00:00Z", **body})
    assert r.status_code == status, r.text
    assert message in r.text
    assert await billing_rows(db) == before


# -- manual readings -------------------------------------------------------------------------------

async def test_manual_reading_accepted(api: httpx.AsyncClient, signals: Signals) -> None:
    # 120.00 at 12:00Z (telemetry), 230.00 at 23:00Z: 110 kWh in 11 h.
    r = await api.post(f"/api/v1/meters/{METER}/readings", json={"value": "230.00", "ts": "2026-03-29T23:00:00Z"})
    assert r.status_code == 201, r.text
    assert r.json() == {
        "id": r.json()["id"], "meter": METER, "value": "230.00", "ts": "2026-03-29T23:00:00.000Z",
        "replacement": False, "serial": "", "submitted_by": "tech-7", "created_at": "2026-11-01T00:00:00.000Z",
        "previous": {"value": "120.0", "ts": "2026-03-29T12:00:00.000Z", "source": "meter", "replacement": False},
        "consumption_kwh": "110.000"}
    assert signals.got == []


@pytest.mark.parametrize(("body", "reason", "message"), [
    # Lower than the 120.00 read at 12:00Z, and no plausible rollover.
    ({"value": "100", "ts": "2026-03-29T14:00:00Z"}, "lower_than_previous",
     "reading 100 kWh is lower than the previous reading 120.0 kWh of 2026-03-29T12:00:00.000Z; if the meter was "
     "replaced, submit it with \"replacement\": true"),
    # 120.00 + 2000 kWh in 1 h: more than 1 MW × 1 h = 1000 kWh.
    ({"value": "2120", "ts": "2026-03-29T13:00:00Z"}, "implausibly_high",
     "reading 2120 kWh is implausibly high: 120.0 kWh at 2026-03-29T12:00:00.000Z plus 2000 kWh in 1.00 h is more "
     "than a meter of 1000 kW can measure (1000 kWh)"),
    ({"value": "-5", "ts": "2026-03-29T14:00:00Z"}, "negative", "reading -5 kWh is negative"),
    ({"value": "42949672.96", "ts": "2026-03-29T14:00:00Z", "replacement": True}, "beyond_register",
     "is beyond the register"),
    # Between 65.00 (06:30Z) and 120.00 (12:00Z) a reading of 130 cannot be.
    ({"value": "130", "ts": "2026-03-29T09:00:00Z"}, "inconsistent_with_later",
     "reading 130 kWh does not fit the later reading 120.0 kWh of 2026-03-29T12:00:00.000Z"),
    ({"value": "500", "ts": "2026-11-02T00:00:00Z"}, "future", "is in the future"),
])
async def test_implausible_readings_are_refused_and_raise_a_human_error(
        api: httpx.AsyncClient, db: Database, signals: Signals, body: dict[str, Any], reason: str,
        message: str) -> None:
    before = await billing_rows(db)
    r = await api.post(f"/api/v1/meters/{METER}/readings", json=body)
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert await billing_rows(db) == before
    (signal,) = signals.got
    assert (signal.kind, signal.device, signal.site, signal.gateway, signal.ts_ms) == (
        SignalKind.HUMAN_ERROR, METER, "plant1", "gw1", NOW)
    assert message in signal.message
    assert signal.details["reason"] == reason
    assert signal.details["submitted_by"] == "tech-7"


async def test_replacement_may_be_lower(api: httpx.AsyncClient, signals: Signals) -> None:
    r = await api.post(f"/api/v1/meters/{METER}/readings",
                       json={"value": "0.5", "ts": "2026-03-29T14:00:00Z", "replacement": True, "serial": "NEW-2"})
    assert r.status_code == 201, r.text
    assert (r.json()["replacement"], r.json()["serial"], r.json()["consumption_kwh"]) == (True, "NEW-2", None)
    # The next reading of the new meter is compared with the replacement reading.
    r = await api.post(f"/api/v1/meters/{METER}/readings", json={"value": "10.5", "ts": "2026-03-29T15:00:00Z"})
    assert r.status_code == 201, r.text
    assert (r.json()["previous"]["value"], r.json()["consumption_kwh"]) == ("0.500", "10.000")
    assert signals.got == []


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    (f"/api/v1/meters/{METER}/readings", {"value": "abc", "ts": "2026-03-29T14:00:00Z"}, 422, "decimal"),
    (f"/api/v1/meters/{METER}/readings", {"value": 130.5, "ts": "2026-03-29T14:00:00Z"}, 422,
     "give decimal numbers as strings"),
    (f"/api/v1/meters/{METER}/readings", {"value": "130.1234", "ts": "2026-03-29T14:00:00Z"}, 422,
     "at most 3 decimal places"),
    (f"/api/v1/meters/{METER}/readings", {"value": "130", "ts": "yesterday"}, 422, "datetime"),
    (f"/api/v1/meters/{METER}/readings", {"value": "130"}, 422, "Field required"),
    (f"/api/v1/meters/{METER}/readings", {"value": "130", "ts": "2026-03-29T14:00:00Z", "replacement": "perhaps"},
     422, "bool"),
    ("/api/v1/meters/plant1.gw1.nope/readings", {"value": "130", "ts": "2026-03-29T14:00:00Z"}, 404,
     "unknown meter 'plant1.gw1.nope'"),
    (f"/api/v1/meters/{BOILER}/readings", {"value": "130", "ts": "2026-03-29T14:00:00Z"}, 422,
     f"device '{BOILER}' is not a meter (kind boiler, no energy_import readings)"),
])
async def test_bad_reading_requests_change_nothing(api: httpx.AsyncClient, db: Database, signals: Signals, path: str,
                                                   body: dict[str, Any], status: int, message: str) -> None:
    before = await billing_rows(db)
    r = await api.post(path, json=body)
    assert r.status_code == status, r.text
    assert message in r.text
    assert await billing_rows(db) == before
    assert signals.got == []  # malformed requests are not "human error" readings


async def test_second_manual_reading_at_the_same_time_409(api: httpx.AsyncClient, db: Database) -> None:
    body = {"value": "140", "ts": "2026-03-29T14:00:00Z"}
    assert (await api.post(f"/api/v1/meters/{METER}/readings", json=body)).status_code == 201
    before = await billing_rows(db)
    r = await api.post(f"/api/v1/meters/{METER}/readings", json=body)
    assert r.status_code == 409
    assert r.json()["detail"] == f"meter '{METER}' already has a manual reading at that time"
    assert await billing_rows(db) == before


# -- cost ------------------------------------------------------------------------------------------

async def test_running_cost_over_the_23_hour_day(api: httpx.AsyncClient) -> None:
    await post_economy7(api)
    day = {"since": "2026-03-29T00:00:00Z", "until": "2026-03-29T23:00:00Z"}
    # Before the evening reading the register is known up to 12:00Z: 120 kWh at 10 kWh/h.
    #   night 00:30Z .. 06:30Z (07:30 BST) = 6 h = 60 kWh × 0.10 = 6.00
    #   day   00:00-00:30Z + 06:30Z-12:00Z = 6 h = 60 kWh × 0.30 = 18.00
    #   standing: the whole local day is in the range: 1 × 0.60 = 0.60
    #   net 24.60, VAT 5 % = 1.23, total 25.83
    r = await api.get(f"/api/v1/meters/{METER}/cost", params=day)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["consumption_kwh"], body["measured_until"], body["readings"], body["duplicates"]) == (
        "120.000", "2026-03-29T12:00:00.000Z", 3, 1)
    assert [(e["band"], e["kwh"], e["amount"]) for e in body["energy"]] == [
        ("day", "60.000", "18.00"), ("night", "60.000", "6.00")]
    assert (body["net"], body["vat_total"], body["total"]) == ("24.60", "1.23", "25.83")

    # The technician's reading at midnight BST (23:00Z): 230.00. The whole day is now measured:
    #   night 6 h = 60 kWh × 0.10 = 6.00; day 0.5 + 16.5 = 17 h = 170 kWh × 0.30 = 51.00
    #   standing 1 day (of 23 h) × 0.60 = 0.60; net 57.60; VAT 5 % = 2.88; total 60.48
    r = await api.post(f"/api/v1/meters/{METER}/readings", json={"value": "230.00", "ts": "2026-03-29T23:00:00Z"})
    assert r.status_code == 201
    r = await api.get(f"/api/v1/meters/{METER}/cost", params=day)
    assert r.json() == {
        "meter": METER, "since": "2026-03-29T00:00:00.000Z", "until": "2026-03-29T23:00:00.000Z", "currency": "GBP",
        "consumption_kwh": "230.000", "unpriced_kwh": "0.000", "measured_from": "2026-03-29T00:00:00.000Z",
        "measured_until": "2026-03-29T23:00:00.000Z", "readings": 4, "duplicates": 1, "conflicts": 0,
        "energy": [{"tariff": "economy7", "band": "day", "kwh": "170.000", "rate": "0.3", "amount": "51.00"},
                   {"tariff": "economy7", "band": "night", "kwh": "60.000", "rate": "0.1", "amount": "6.00"}],
        "standing_charge": [{"tariff": "economy7", "days": "1.0000", "rate_per_day": "0.6", "amount": "0.60"}],
        "vat": [{"rate": "0.05", "net": "57.60", "amount": "2.88"}],
        "net": "57.60", "vat_total": "2.88", "total": "60.48", "unmeasured": [],
    }


async def test_meter_tariff_from_mid_day_beats_the_site_tariff(api: httpx.AsyncClient) -> None:
    await post_economy7(api)  # the site's tariff since 2026-01-01
    flat = {"name": "flat", "currency": "GBP", "vat_rate": "0.05", "standing_charge_per_day": "0.40",
            "effective_from": "2026-01-01T00:00:00Z", "bands": [{"name": "flat", "rate": "0.25"}]}
    assert (await api.post("/api/v1/tariffs", json=flat)).status_code == 201
    r = await api.post("/api/v1/tariff-assignments", json={"tariff": "flat", "meter": METER,
                                                           "effective_from": "2026-03-29T06:30:00Z"})
    assert r.status_code == 201
    # 00:00Z-12:00Z, 10 kWh/h. economy7 until 06:30Z: day 00:00-00:30Z = 5 kWh × 0.30 = 1.50,
    # night 00:30-06:30Z = 60 kWh × 0.10 = 6.00; flat from 06:30Z: 55 kWh × 0.25 = 13.75.
    # Standing: economy7 6.5 h of the 23 h day = 6.5/23 × 0.60 = 0.16956.. -> 0.17;
    #           flat 5.5/23 × 0.40 = 0.09565.. -> 0.10.
    # Net 1.50 + 6.00 + 13.75 + 0.17 + 0.10 = 21.52; VAT 5 % = 1.076 -> 1.08; total 22.60.
    r = await api.get(f"/api/v1/meters/{METER}/cost", params={"since": "2026-03-29T00:00:00Z",
                                                               "until": "2026-03-29T12:00:00Z"})
    body = r.json()
    assert [(e["tariff"], e["band"], e["kwh"], e["amount"]) for e in body["energy"]] == [
        ("economy7", "day", "5.000", "1.50"), ("economy7", "night", "60.000", "6.00"),
        ("flat", "flat", "55.000", "13.75")]
    assert [(s["tariff"], s["days"], s["amount"]) for s in body["standing_charge"]] == [
        ("economy7", "0.2826", "0.17"), ("flat", "0.2391", "0.10")]
    assert (body["net"], body["vat_total"], body["total"]) == ("21.52", "1.08", "22.60")


async def test_second_by_second_telemetry_across_a_rollover(api: httpx.AsyncClient, db: Database) -> None:
    # meter2 reports every second from 10:00:00Z for 3 minutes, +0.01 kWh per second (36 kW), from
    # 42,949,672.00: the register wraps (modulus 42,949,672.96) at 10:01:36Z and reads 0.83 at
    # 10:02:59Z. The hub computes with the first and last reading of each minute:
    #   10:00:00 42949672.00 -> 10:00:59 42949672.59 -> 10:01:00 42949672.60        0.60 kWh
    #   -> 10:01:59 0.23 (0.23 + 42,949,672.96 - 42,949,672.60 = 0.59, a rollover)  0.59 kWh
    #   -> 10:02:00 0.24 -> 10:02:59 0.83                                           0.60 kWh
    # 1.79 kWh in all (= 179 steps of 0.01) at a flat 1.00/kWh = 1.79; no standing charge, no VAT.
    modulus = Decimal("42949672.96")
    values = [(Decimal("42949672.00") + Decimal("0.01") * i) % modulus for i in range(180)]
    t0 = ms("2026-02-02T10:00")
    readings = [("meter2", "energy_import", 100 + i, t0 + 1000 * i, float(v), "kWh", "good")
                for i, v in enumerate(values)]
    await Store(db).write([TelemetryItem(telemetry("plant1", "gw1", readings, kinds={"meter2": "meter"}), NOW)])
    flat = {"name": "unit", "currency": "GBP", "vat_rate": "0", "effective_from": "2026-01-01T00:00:00Z",
            "bands": [{"name": "flat", "rate": "1.00"}]}
    assert (await api.post("/api/v1/tariffs", json=flat)).status_code == 201
    assert (await api.post("/api/v1/tariff-assignments", json={
        "tariff": "unit", "meter": "plant1.gw1.meter2", "effective_from": "2026-01-01T00:00:00Z"})).status_code == 201
    # The technician reads the same 0.83 at 10:02:59Z: accepted (nothing used since), counted once.
    r = await api.post("/api/v1/meters/plant1.gw1.meter2/readings", json={"value": "0.83",
                                                                          "ts": "2026-02-02T10:02:59Z"})
    assert (r.status_code, r.json()["consumption_kwh"]) == (201, "0.000")
    r = await api.get("/api/v1/meters/plant1.gw1.meter2/cost", params={"since": "2026-02-02T10:00:00Z",
                                                                        "until": "2026-02-02T10:03:00Z"})
    body = r.json()
    assert (body["consumption_kwh"], body["readings"], body["duplicates"], body["measured_until"]) == (
        "1.790", 6, 1, "2026-02-02T10:02:59.000Z")
    assert [(e["kwh"], e["amount"]) for e in body["energy"]] == [("1.790", "1.79")]
    assert (body["net"], body["vat_total"], body["total"], body["unmeasured"]) == ("1.79", "0.00", "1.79", [])


async def test_cost_without_tariff_or_readings(api: httpx.AsyncClient) -> None:
    r = await api.get(f"/api/v1/meters/{METER}/cost", params={"since": "2026-03-29T00:00:00Z",
                                                               "until": "2026-03-29T12:00:00Z"})
    body = r.json()
    assert (body["currency"], body["consumption_kwh"], body["unpriced_kwh"], body["total"]) == (
        None, "120.000", "120.000", "0")
    r = await api.get(f"/api/v1/meters/{METER}/cost", params={"since": "2026-01-01T00:00:00Z",
                                                               "until": "2026-01-02T00:00:00Z"})
    body = r.json()
    assert (body["consumption_kwh"], body["measured_from"], body["readings"]) == ("0.000", None, 1)


@pytest.mark.parametrize(("path", "params", "status", "message"), [
    (f"/api/v1/meters/{METER}/cost", {"since": "2026-03-29T12:00:00Z", "until": "2026-03-29T00:00:00Z"}, 422,
     "'until' is before 'since'"),
    (f"/api/v1/meters/{METER}/cost", {"since": "noon"}, 422, "datetime"),
    (f"/api/v1/meters/{METER}/cost", {}, 422, "Field required"),
    (f"/api/v1/meters/{METER}/cost", {"since": "2027-01-01T00:00:00Z"}, 422, "'since' is in the future"),
    (f"/api/v1/meters/{METER}/cost", {"since": "2024-01-01T00:00:00Z"}, 422, "at most 367 days"),
    ("/api/v1/meters/plant1.gw1.nope/cost", {"since": "2026-03-29T00:00:00Z"}, 404, "unknown meter"),
    (f"/api/v1/meters/{BOILER}/cost", {"since": "2026-03-29T00:00:00Z"}, 422, "is not a meter"),
])
async def test_bad_cost_requests(api: httpx.AsyncClient, path: str, params: dict[str, str], status: int,
                                 message: str) -> None:
    r = await api.get(path, params=params)
    assert r.status_code == status, r.text
    assert message in r.text


async def test_openapi_documents_billing(api: httpx.AsyncClient) -> None:
    spec = (await api.get("/openapi.json")).json()
    assert {"/api/v1/tariffs", "/api/v1/tariff-assignments", "/api/v1/meters/{meter_id}/readings",
            "/api/v1/meters/{meter_id}/cost"} <= set(spec["paths"])
    assert "human_error" in spec["paths"]["/api/v1/meters/{meter_id}/readings"]["post"]["description"]
