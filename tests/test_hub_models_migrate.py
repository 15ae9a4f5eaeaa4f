"""A database of the schema before the model registry (no ``gateway.reported_models``, no
``gateway_event.device``, events unique on (gateway, ts, type)) is upgraded in place when the hub
opens it: rows kept, the new columns and key in place, the result the same as a fresh database.
SQLite here and PostgreSQL (``test_hub_models_postgres.py`` reruns these tests with its ``db_url``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hub import migrate, queries
from hub.db import Database
from hub.models import GatewayEvent
from hub.store import EventItem, StatusItem, Store
from protocol.schema import ActiveModelV1, GatewayState, StatusV1
from tests.hubtools import T0, event

# The tables as the hub created them before this change (Tortoise's DDL of that schema).
_OLD_SQLITE = [
    'CREATE TABLE "site" ("id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, "name" VARCHAR(64) NOT NULL UNIQUE, '
    '"first_seen_ms" BIGINT NOT NULL)',
    'CREATE TABLE "gateway" ("id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, "name" VARCHAR(64) NOT NULL, '
    '"state" VARCHAR(16) NOT NULL, "state_ts_ms" BIGINT, "agent_version" VARCHAR(32) NOT NULL, '
    '"backlog" BIGINT NOT NULL, "first_seen_ms" BIGINT NOT NULL, "last_seen_ms" BIGINT, '
    '"site_id" INT NOT NULL REFERENCES "site" ("id") ON DELETE CASCADE, '
    'CONSTRAINT "uid_gateway_site_id_ba4c4d" UNIQUE ("site_id", "name"))',
    'CREATE TABLE "gateway_event" ("id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, "ts_ms" BIGINT NOT NULL, '
    '"type" VARCHAR(32) NOT NULL, "message" TEXT NOT NULL, "readings_dropped" BIGINT NOT NULL, '
    '"details" JSON NOT NULL, "received_ms" BIGINT NOT NULL, '
    '"gateway_id" INT NOT NULL REFERENCES "gateway" ("id") ON DELETE CASCADE, '
    'CONSTRAINT "uid_gateway_eve_gateway_825d96" UNIQUE ("gateway_id", "ts_ms", "type"))',
]
_OLD_POSTGRES = [
    'CREATE TABLE "site" ("id" SERIAL NOT NULL PRIMARY KEY, "name" VARCHAR(64) NOT NULL UNIQUE, '
    '"first_seen_ms" BIGINT NOT NULL)',
    'CREATE TABLE "gateway" ("id" SERIAL NOT NULL PRIMARY KEY, "name" VARCHAR(64) NOT NULL, '
    '"state" VARCHAR(16) NOT NULL, "state_ts_ms" BIGINT, "agent_version" VARCHAR(32) NOT NULL, '
    '"backlog" BIGINT NOT NULL, "first_seen_ms" BIGINT NOT NULL, "last_seen_ms" BIGINT, '
    '"site_id" INT NOT NULL REFERENCES "site" ("id") ON DELETE CASCADE, '
    'CONSTRAINT "uid_gateway_site_id_ba4c4d" UNIQUE ("site_id", "name"))',
    'CREATE TABLE "gateway_event" ("id" BIGSERIAL NOT NULL PRIMARY KEY, "ts_ms" BIGINT NOT NULL, '
    '"type" VARCHAR(32) NOT NULL, "message" TEXT NOT NULL, "readings_dropped" BIGINT NOT NULL, '
    '"details" JSONB NOT NULL, "received_ms" BIGINT NOT NULL, '
    '"gateway_id" INT NOT NULL REFERENCES "gateway" ("id") ON DELETE CASCADE, '
    'CONSTRAINT "uid_gateway_eve_gateway_825d96" UNIQUE ("gateway_id", "ts_ms", "type"))',
]
_OLD_ROWS = [
    "INSERT INTO site (id, name, first_seen_ms) VALUES (1, 'plant1', 1000)",
    "INSERT INTO gateway (id, name, state, state_ts_ms, agent_version, backlog, first_seen_ms, last_seen_ms, "
    "site_id) VALUES (1, 'gw1', 'online', 2000, '0.1.0', 5, 1000, 3000, 1)",
    "INSERT INTO gateway_event (ts_ms, type, message, readings_dropped, details, received_ms, gateway_id) "
    "VALUES (5000, 'buffer_thinned', 'cap reached', 250, '{\"ratio\": 0.5}', 5100, 1)",
]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """Where the test database lives; overridden by test_hub_models_postgres.py."""
    return f"sqlite://{tmp_path}/hub.db"


@pytest.fixture
async def old_db(db_url: str) -> AsyncIterator[str]:
    """``db_url`` holding the old schema and a gateway with one event."""
    db = await Database(db_url).open(generate_schemas=False)
    try:
        with db.activate():
            for statement in (_OLD_POSTGRES if db.dialect == "postgres" else _OLD_SQLITE) + _OLD_ROWS:
                await db.conn.execute_script(statement)
    finally:
        await db.close()
    yield db_url


async def _schema(db: Database, table: str) -> dict[str, Any]:
    """Columns (name -> type, not-null) and unique keys / indexes (sorted column lists) of ``table``."""
    with db.activate():
        if db.dialect == "sqlite":
            cols = await db.conn.execute_query_dict("SELECT name, type, \"notnull\" FROM pragma_table_info(?)", [table])
            columns = {c["name"]: (c["type"].upper(), bool(c["notnull"])) for c in cols}
            indexes = []
            for ix in await db.conn.execute_query_dict("SELECT name, \"unique\" FROM pragma_index_list(?)", [table]):
                names = await db.conn.execute_query_dict("SELECT name FROM pragma_index_info(?)", [ix["name"]])
                indexes.append((bool(ix["unique"]), tuple(n["name"] for n in names)))
            return {"columns": columns, "indexes": sorted(indexes)}
        cols = await db.conn.execute_query_dict(
            "SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = $1", [table])
        columns = {c["column_name"]: (c["data_type"], c["is_nullable"] == "NO", c["column_default"]) for c in cols}
        ixs = await db.conn.execute_query_dict(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() AND tablename = $1",
            [table])
        return {"columns": columns, "indexes": sorted((i["indexname"], i["indexdef"]) for i in ixs)}


async def test_old_schema_is_upgraded_and_keeps_its_rows(old_db: str, tmp_path: Path) -> None:
    async with Database(old_db) as db:
        gw = await queries.find_gateway(db, "plant1.gw1")
        assert gw is not None
        rows = await queries.events(db, gw.pk)
        assert [(e.ts_ms, e.type, e.device, e.message, e.readings_dropped, e.details, e.received_ms) for e in rows] == [
            (5000, "buffer_thinned", "", "cap reached", 250, {"ratio": 0.5}, 5100)]
        assert (await queries.gateway_models(db, gw)).reported == {}
        (listed,) = await queries.list_gateways(db)
        assert (listed.name, listed.backlog, listed.readings_dropped) == ("gw1", 5, 250)

        # The new key: two devices in the same millisecond are two events; a redelivery is not.
        store = Store(db)
        started = [event("plant1", "gw1", "anomaly_started", T0, device=d, details={"score": 3.0})
                   for d in ("boiler1", "boiler2")]
        result = await store.write([], [], [EventItem(e, T0) for e in [*started, started[0]]])
        assert (dict(result.events_inserted), result.event_duplicates) == ({"anomaly_started": 2}, 1)
        result = await store.write([], [StatusItem(StatusV1(
            site="plant1", gateway="gw1", state=GatewayState.ONLINE, ts=T0,
            models={"sim-boiler": ActiveModelV1(name="m", version=2, sha256="b" * 64)}), T0)])
        assert (await queries.gateway_models(db, gw)).reported == {
            "sim-boiler": {"name": "m", "version": 2, "sha256": "b" * 64, "state": "active", "error": ""}}
        # The copied event keeps its id; new ones continue after it.
        with db.activate():
            ids = await GatewayEvent.all().order_by("id").values_list("id", "type")
        assert ids == [(1, "buffer_thinned"), (2, "anomaly_started"), (3, "anomaly_started")]
        upgraded = {t: await _schema(db, t) for t in ("gateway", "gateway_event")}

    # Opening again changes nothing.
    async with Database(old_db) as db:
        assert await migrate.before_generate(db) == []
        assert await migrate.after_generate(db) == []
        assert {t: await _schema(db, t) for t in ("gateway", "gateway_event")} == upgraded

    # ... and the upgraded tables are those of a fresh database (columns, types, keys, index names).
    fresh_url = old_db.replace("hub.db", "fresh.db") if old_db.startswith("sqlite") else None
    if fresh_url is None:
        return  # PostgreSQL: compared in test_hub_models_postgres.py with a database of its own
    async with Database(fresh_url) as fresh:
        expected = {t: await _schema(fresh, t) for t in ("gateway", "gateway_event")}
    assert upgraded["gateway_event"] == expected["gateway_event"]
    # SQLite cannot add a NOT NULL column without a default, nor drop the default afterwards.
    assert upgraded["gateway"]["indexes"] == expected["gateway"]["indexes"]
    assert upgraded["gateway"]["columns"].keys() == expected["gateway"]["columns"].keys()


async def test_fresh_database_needs_no_upgrade(db_url: str) -> None:
    async with Database(db_url) as db:
        assert await migrate.before_generate(db) == []
        assert await migrate.after_generate(db) == []


async def test_interrupted_sqlite_copy_is_finished_at_next_start(tmp_path: Path) -> None:
    # A hub stopped between the rename and the copy: the next start creates the table and copies.
    url = f"sqlite://{tmp_path}/hub.db"
    db = await Database(url).open(generate_schemas=False)
    try:
        with db.activate():
            for statement in _OLD_SQLITE + _OLD_ROWS:
                await db.conn.execute_script(statement)
            assert await migrate.before_generate(db) == ["gateway.reported_models added",
                                                         "gateway_event renamed to gateway_event_v1"]
    finally:
        await db.close()
    async with Database(url) as db:
        gw = await queries.find_gateway(db, "plant1.gw1")
        assert gw is not None
        assert [(e.type, e.readings_dropped) for e in await queries.events(db, gw.pk)] == [("buffer_thinned", 250)]
        with db.activate():
            left = await db.conn.execute_query_dict(
                "SELECT name FROM sqlite_master WHERE name = 'gateway_event_v1'")
        assert left == []
