"""Batch writer and read queries on a real database file (SQLite here; PostgreSQL in
``test_hub_postgres.py``, which reruns these tests with another ``db_url``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hub import queries
from hub.db import Database
from hub.models import Device, Gateway, Reading, Site
from hub.store import StatusItem, Store, TelemetryItem, convert_value
from protocol.schema import GatewayState, SchemaError, StatusV1, decode_telemetry
from tests.hubtools import T0, series, telemetry, telemetry_payload

RECEIVED = T0 + 60_000  # when the hub "received" the test batches (after every reading ts)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """Where the test database lives; overridden by test_hub_postgres.py."""
    return f"sqlite://{tmp_path}/db/hub.db"


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await Database(db_url).open()
    try:
        yield database
    finally:
        await database.close()


async def _count(db: Database, **filters: object) -> int:
    with db.activate():
        return await Reading.filter(**filters).count()


def _item(*args: object, received: int = RECEIVED, **kw: object) -> TelemetryItem:
    return TelemetryItem(telemetry(*args, **kw), received)  # type: ignore[arg-type]


async def test_batch_stored_then_redelivery_ignored(db: Database) -> None:
    store = Store(db)
    batch = [_item("s1", "gw1", series("b1", "temp", 50) + series("b1", "pressure", 30, seq0=50)),
             _item("s1", "gw1", series("b2", "temp", 20))]
    first = await store.write(batch)
    assert (first.readings, first.inserted, first.duplicates) == (100, 100, 0)
    assert await _count(db) == 100

    again = await store.write(batch)
    assert (again.readings, again.inserted, again.duplicates) == (100, 0, 100)
    assert await _count(db) == 100

    # Overlap: seq 15..24 of b2, of which 15..19 exist already.
    overlap = await store.write([_item("s1", "gw1", series("b2", "temp", 10, seq0=15, value0=15))])
    assert (overlap.inserted, overlap.duplicates) == (5, 5)
    assert await _count(db) == 105


async def test_duplicate_keeps_first_value(db: Database) -> None:
    # (device, seq) identifies a reading: a resent seq with another value is still a duplicate.
    store = Store(db)
    await store.write([_item("s1", "gw1", [("b1", "temp", 7, T0, 1.5, "degC", "good")])])
    res = await store.write([_item("s1", "gw1", [("b1", "temp", 7, T0, 99.0, "degC", "good")])])
    assert res.duplicates == 1
    dev = await queries.find_device(db, "s1.gw1.b1")
    assert dev is not None
    rows = await queries.readings(db, dev.pk)
    assert [(r.seq, r.value) for r in rows] == [(7, 1.5)]


async def test_same_device_name_on_two_gateways_are_two_devices(db: Database) -> None:
    store = Store(db)
    res = await store.write([
        _item("s1", "gw1", series("boiler", "temp", 10, value0=100)),
        _item("s1", "gw2", series("boiler", "temp", 10, value0=200)),  # same seqs, other gateway
        _item("s2", "gw1", series("boiler", "temp", 10, value0=300)),  # same gateway name, other site
    ])
    assert res.inserted == 30
    devices = await queries.list_devices(db)
    assert [d.uid for d in devices] == ["s1.gw1.boiler", "s1.gw2.boiler", "s2.gw1.boiler"]
    assert len({d.pk for d in devices}) == 3
    for d, base in zip(devices, (100, 200, 300), strict=True):
        rows = await queries.readings(db, d.pk)
        assert [r.value for r in rows] == [base + i for i in range(10)]
    with db.activate():
        assert await Site.all().count() == 2
        assert await Gateway.all().count() == 3
    assert [d.uid for d in await queries.list_devices(db, site="s1")] == ["s1.gw1.boiler", "s1.gw2.boiler"]
    assert [d.uid for d in await queries.list_devices(db, gateway="gw1")] == ["s1.gw1.boiler", "s2.gw1.boiler"]


async def test_entities_created_once_and_ids_cached(db: Database) -> None:
    store = Store(db)
    for i in range(3):
        await store.write([_item("s1", "gw1", series("m1", "energy", 5, seq0=i * 5), kinds={"m1": "meter"})])
    with db.activate():
        assert await Device.all().count() == 1
        dev = await Device.get(name="m1")
    assert (dev.kind, dev.profile) == ("meter", "sim-meter")
    # A new store (hub restart) finds the existing rows instead of creating new ones.
    await Store(db).write([_item("s1", "gw1", series("m1", "energy", 5, seq0=15), kinds={"m1": "meter"})])
    with db.activate():
        assert await Device.all().count() == 1
    assert await _count(db) == 20


async def test_device_kind_change_is_recorded(db: Database) -> None:
    store = Store(db)
    await store.write([_item("s1", "gw1", series("d1", "x", 1), kinds={"d1": "boiler"})])
    await store.write([_item("s1", "gw1", series("d1", "x", 1, seq0=1), kinds={"d1": "tank"})])
    dev = await queries.find_device(db, "s1.gw1.d1")
    assert dev is not None and dev.kind == "tank"


async def test_latest_and_readings_queries(db: Database) -> None:
    store = Store(db)
    rows = [
        ("b1", "temp", 1, T0 + 1000, 20.5, "degC", "good"),
        ("b1", "temp", 2, T0 + 2000, 21.25, "degC", "good"),
        ("b1", "pressure", 3, T0 + 2000, None, "bar", "bad"),
        ("b1", "burner_on", 4, T0 + 2000, True, "", "good"),
        ("b1", "mode", 5, T0 + 2000, "eco", "", "stale"),
        ("b1", "starts", 6, T0 + 2000, 12, "", "good"),
        ("b1", "off", 7, T0 + 2000, False, "", "good"),
    ]
    await store.write([_item("s1", "gw1", rows)])
    # A late, older temperature (backlog after an outage) must not become "latest".
    await store.write([_item("s1", "gw1", [("b1", "temp", 8, T0 + 500, 5.0, "degC", "good")])])
    dev = await queries.find_device(db, "s1.gw1.b1")
    assert dev is not None

    latest = {r.metric: (r.typed_value, r.unit, r.ts_ms, r.quality, r.seq) for r in await queries.latest(db, dev.pk)}
    assert latest == {
        "temp": (21.25, "degC", T0 + 2000, "good", 2),
        "pressure": (None, "bar", T0 + 2000, "bad", 3),
        "burner_on": (True, "", T0 + 2000, "good", 4),
        "mode": ("eco", "", T0 + 2000, "stale", 5),
        "starts": (12.0, "", T0 + 2000, "good", 6),
        "off": (False, "", T0 + 2000, "good", 7),
    }

    temps = await queries.readings(db, dev.pk, metric="temp")
    assert [(r.ts_ms, r.value, r.seq) for r in temps] == [(T0 + 500, 5.0, 8), (T0 + 1000, 20.5, 1),
                                                           (T0 + 2000, 21.25, 2)]
    since = await queries.readings(db, dev.pk, metric="temp", since_ms=T0 + 1000)
    assert [r.seq for r in since] == [1, 2]
    window = await queries.readings(db, dev.pk, since_ms=T0 + 1000, until_ms=T0 + 2000)
    assert [r.seq for r in window] == [1]  # until is exclusive
    limited = await queries.readings(db, dev.pk, limit=3)
    assert [r.seq for r in limited] == [8, 1, 2]  # oldest first, ties by seq
    everything = await queries.readings(db, dev.pk)
    assert [r.seq for r in everything] == [8, 1, 2, 3, 4, 5, 6, 7]
    assert await queries.readings(db, dev.pk, metric="nope") == []


async def test_latest_of_device_without_readings_is_empty(db: Database) -> None:
    store = Store(db)
    status = StatusV1(site="s1", gateway="gw1", state=GatewayState.ONLINE, ts=T0,
                      devices={"quiet": {"kind": "meter"}})  # type: ignore[dict-item]
    await store.write([], [StatusItem(status, RECEIVED)])
    dev = await queries.find_device(db, "s1.gw1.quiet")
    assert dev is not None and dev.kind == "meter" and dev.last_seen_ms is None
    assert await queries.latest(db, dev.pk) == []


async def test_last_seen_and_gateway_status(db: Database) -> None:
    store = Store(db)
    # Device last_seen is its newest reading ts; a gateway clock ahead of the hub is capped.
    await store.write([_item("s1", "gw1", [("b1", "t", 1, T0, 1.0, "", "good"),
                                           ("b2", "t", 1, RECEIVED + 3_600_000, 1.0, "", "good")],
                             backlog=42)])
    by_uid = {d.uid: d for d in await queries.list_devices(db)}
    assert by_uid["s1.gw1.b1"].last_seen_ms == T0
    assert by_uid["s1.gw1.b2"].last_seen_ms == RECEIVED

    online = StatusV1(site="s1", gateway="gw1", state=GatewayState.ONLINE, ts=T0 + 5, agent_version="1.2.3")
    # The Last Will is composed at connect time, so it has an older ts; arrival order wins.
    will = StatusV1(site="s1", gateway="gw1", state=GatewayState.OFFLINE, ts=T0 + 1)
    await store.write([], [StatusItem(online, RECEIVED)])
    (gw,) = await queries.list_gateways(db)
    assert (gw.site, gw.name, gw.state, gw.state_ts_ms, gw.agent_version, gw.devices, gw.last_seen_ms) == (
        "s1", "gw1", "online", T0 + 5, "1.2.3", 2, RECEIVED)
    await store.write([], [StatusItem(will, RECEIVED + 1)])
    (gw,) = await queries.list_gateways(db)
    assert (gw.state, gw.state_ts_ms, gw.backlog) == ("offline", T0 + 1, 0)


async def test_failed_batch_leaves_nothing_behind(db: Database) -> None:
    store = Store(db)
    await store.write([_item("s1", "gw1", series("b1", "t", 3))])
    # Make the insert fail inside the transaction (the device row vanished behind the cache).
    with db.activate():
        await Reading.all().delete()
        await Device.all().delete()
    with pytest.raises(Exception):  # noqa: B017 - driver-specific IntegrityError
        await store.write([_item("s1", "gw1", series("b1", "t", 3, seq0=3))])
    assert await _count(db) == 0
    store.forget_cache()  # what ingest does before retrying
    res = await store.write([_item("s1", "gw1", series("b1", "t", 3, seq0=3))])
    assert res.inserted == 3


def test_convert_value() -> None:
    assert convert_value(1) == (1.0, None)
    assert convert_value(2.5) == (2.5, None)
    assert convert_value(True) == (1.0, "true")
    assert convert_value(False) == (0.0, "false")
    assert convert_value("on") == (None, "on")
    assert convert_value(None) == (None, None)


def test_non_finite_values_are_refused_by_the_schema() -> None:
    for bad in ("NaN", "Infinity", "-Infinity"):
        good = telemetry_payload("s1", "gw1", [("b1", "t", 1, T0, 1.0, "", "good")])
        raw = good.replace(b":1.0,", f":{bad},".encode())
        with pytest.raises(SchemaError, match=r"readings\.0\.value"):
            decode_telemetry(raw)


async def test_find_device_rejects_non_uids(db: Database) -> None:
    await Store(db).write([_item("s1", "gw1", series("b1", "t", 1))])
    assert await queries.find_device(db, "s1.gw1.b1") is not None
    for bad in ("s1.gw1", "s1.gw1.b1.x", "s1.gw1.nope", "", "s1..b1", "s1.gw1.b%"):
        assert await queries.find_device(db, bad) is None
