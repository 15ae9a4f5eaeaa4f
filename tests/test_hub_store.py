"""Batch writer and read queries on a real database file (SQLite here; PostgreSQL in
``test_hub_postgres.py``, which reruns these tests with another ``db_url``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hub import queries
from hub.db import Database
from hub.models import Device, Gateway, GatewayEvent, Reading, Site
from hub.store import EventItem, StatusItem, Store, TelemetryItem, check_event, convert_value
from protocol.schema import GatewayState, SchemaError, StatusV1, decode_telemetry
from tests.hubtools import T0, event, series, telemetry, telemetry_payload

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


def _event(*args: object, received: int = RECEIVED, **kw: object) -> EventItem:
    return EventItem(event(*args, **kw), received)  # type: ignore[arg-type]


async def _event_rows(db: Database) -> list[tuple[str, int, str, int]]:
    with db.activate():
        rows = await GatewayEvent.all().order_by("id").values_list("gateway__name", "ts_ms", "type",
                                                                    "readings_dropped")
    return [(str(g), int(t), str(k), int(d)) for g, t, k, d in rows]


async def test_events_stored_once_per_gateway_ts_type(db: Database) -> None:
    store = Store(db)
    thinned = _event("s1", "gw1", "buffer_thinned", T0, readings_dropped=100, message="cap 50 MB reached",
                     details={"cap_bytes": 50_000_000, "kept_every": 2, "oldest": "2025-11-24"})
    batch = [
        thinned,
        _event("s1", "gw1", "buffer_thinned", T0, readings_dropped=100),  # the same event again
        _event("s1", "gw1", "buffer_corrupt", T0, readings_dropped=30),  # same ts, other type: new
        _event("s1", "gw1", "buffer_full", T0 + 5),
        _event("s1", "gw2", "buffer_thinned", T0, readings_dropped=7),  # same ts and type, other gateway
    ]
    first = await store.write([], [], batch)
    assert (first.events, dict(first.events_inserted), first.event_duplicates) == (
        5, {"buffer_thinned": 2, "buffer_corrupt": 1, "buffer_full": 1}, 1)
    assert await _event_rows(db) == [("gw1", T0, "buffer_thinned", 100), ("gw1", T0, "buffer_corrupt", 30),
                                     ("gw1", T0 + 5, "buffer_full", 0), ("gw2", T0, "buffer_thinned", 7)]

    # A redelivered batch (or another hub storing the same messages) adds nothing; the first wins.
    again = await store.write([], [], [*batch, _event("s1", "gw1", "buffer_full", T0 + 5, readings_dropped=9)])
    assert (again.events, sum(again.events_inserted.values()), again.event_duplicates) == (6, 0, 6)
    assert len(await _event_rows(db)) == 4

    gw1 = await queries.find_gateway(db, "s1.gw1")
    assert gw1 is not None and (gw1.site, gw1.name, gw1.uid) == ("s1", "gw1", "s1.gw1")
    rows = await queries.events(db, gw1.pk)
    assert [(e.ts_ms, e.type, e.readings_dropped, e.received_ms) for e in rows] == [
        (T0 + 5, "buffer_full", 0, RECEIVED), (T0, "buffer_corrupt", 30, RECEIVED),
        (T0, "buffer_thinned", 100, RECEIVED)]  # newest first, ties newest stored first
    assert (rows[2].message, rows[2].details) == (
        "cap 50 MB reached", {"cap_bytes": 50_000_000, "kept_every": 2, "oldest": "2025-11-24"})
    assert [e.type for e in await queries.events(db, gw1.pk, since_ms=T0 + 1)] == ["buffer_full"]
    assert [e.type for e in await queries.events(db, gw1.pk, until_ms=T0 + 5)] == ["buffer_corrupt",
                                                                                  "buffer_thinned"]
    assert [e.type for e in await queries.events(db, gw1.pk, limit=1)] == ["buffer_full"]

    # Events create the gateway on first sight; readings_dropped sums its stored events.
    by_name = {g.name: g for g in await queries.list_gateways(db)}
    assert {n: (g.readings_dropped, g.devices, g.last_seen_ms) for n, g in by_name.items()} == {
        "gw1": (130, 0, None), "gw2": (7, 0, None)}


async def test_readings_dropped_is_zero_without_events(db: Database) -> None:
    store = Store(db)
    await store.write([_item("s1", "gw1", series("b1", "t", 2), backlog=5)])
    (gw,) = await queries.list_gateways(db)
    assert (gw.backlog, gw.readings_dropped) == (5, 0)
    assert await queries.events(db, gw.pk) == []


async def test_event_commits_with_its_batch_or_not_at_all(db: Database) -> None:
    store = Store(db)
    await store.write([_item("s1", "gw1", series("b1", "t", 3))])
    with db.activate():
        await Reading.all().delete()
        await Device.all().delete()  # the cached device id is now dangling: the insert fails
    batch_tele = [_item("s1", "gw1", series("b1", "t", 3, seq0=3))]
    batch_events = [_event("s1", "gw1", "buffer_thinned", readings_dropped=11)]
    with pytest.raises(Exception):  # noqa: B017 - driver-specific IntegrityError
        await store.write(batch_tele, [], batch_events)
    assert await _event_rows(db) == []
    store.forget_cache()
    res = await store.write(batch_tele, [], batch_events)
    assert (res.inserted, dict(res.events_inserted)) == (3, {"buffer_thinned": 1})
    assert await _event_rows(db) == [("gw1", T0, "buffer_thinned", 11)]


async def test_event_text_with_nul_is_stored(db: Database) -> None:
    # JSON allows "\u0000"; PostgreSQL text and JSONB do not. It must not stall the batch.
    store = Store(db)
    res = await store.write([], [], [_event("s1", "gw1", "buffer_corrupt", message="bad\x00file",
                                            details={"path\x00": "a\x00b", "n": 3})])
    assert sum(res.events_inserted.values()) == 1
    gw = await queries.find_gateway(db, "s1.gw1")
    assert gw is not None
    (row,) = await queries.events(db, gw.pk)
    assert (row.message, row.details) == ("bad\ufffdfile", {"path\ufffd": "a\ufffdb", "n": 3})


async def test_find_gateway_rejects_non_ids(db: Database) -> None:
    await Store(db).write([], [], [_event("s1", "gw1", "buffer_full")])
    assert await queries.find_gateway(db, "s1.gw1") is not None
    for bad in ("s1", "s1.gw1.b1", "s1.nope", "s2.gw1", "", "s1.", ".gw1", "s1.gw%"):
        assert await queries.find_gateway(db, bad) is None, bad


def test_check_event_refuses_what_the_database_cannot_store() -> None:
    check_event(event("s1", "gw1", "buffer_thinned", readings_dropped=2**53 - 1, details={"x": 1.5, "y": "z"}))
    with pytest.raises(ValueError, match="readings_dropped"):
        check_event(event("s1", "gw1", "buffer_thinned", readings_dropped=2**53))
    with pytest.raises(ValueError, match=r"details\.ratio is not a finite number"):
        check_event(event("s1", "gw1", "buffer_thinned", details={"ratio": float("nan")}))
    with pytest.raises(ValueError, match=r"details\.n is outside"):
        check_event(event("s1", "gw1", "buffer_thinned", details={"n": 2**64}))
    with pytest.raises(ValueError, match="bytes exceed 16384"):
        check_event(event("s1", "gw1", "buffer_thinned", details={"blob": "x" * 20_000}))
