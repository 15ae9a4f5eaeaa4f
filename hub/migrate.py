"""Schema upgrades that ``generate_schemas(safe=True)`` cannot make.

The hub creates its schema with Tortoise's ``generate_schemas(safe=True)`` at every start:
``CREATE TABLE / INDEX IF NOT EXISTS``, so new *tables* (the model registry) simply appear. A new
column or a changed unique key of an *existing* table does not; this module brings a database of
an earlier schema to the current one, before (and, for SQLite, after) ``generate_schemas``. Each
step looks at the database first, so running it again is a no-op and a fresh database is left to
``generate_schemas`` alone.

Upgrades, oldest first:

1. ``gateway.reported_models`` (JSON, ``{}``) — the models a gateway reports running.
2. ``gateway_event.device`` (varchar 64, ``""``) and the unique key ``(gateway_id, ts_ms, type)``
   widened to ``(gateway_id, ts_ms, type, device)``. PostgreSQL alters the table in place, in one
   transaction under an advisory lock (several hubs may start at once). SQLite cannot drop a
   table constraint, so the old table is renamed to ``gateway_event_v1``, ``generate_schemas``
   creates the new one and its rows are copied over (ids kept), then the old table is dropped; a
   hub stopped in between finishes the copy at its next start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tortoise.transactions import in_transaction

from protocol.logs import get_logger

if TYPE_CHECKING:
    from hub.db import Database

log = get_logger("hub.migrate")

# Tortoise names a unique_together constraint "uid_<table[:11]>_<first field[:7]>_<hash>"; these
# are the names generate_schemas gives the gateway_event keys (tests compare a migrated schema
# with a fresh one, so a Tortoise upgrade that renames them is noticed).
EVENT_KEY_V1 = "uid_gateway_eve_gateway_825d96"
EVENT_KEY_V2 = "uid_gateway_eve_gateway_336af0"
_SQLITE_EVENT_V1 = "gateway_event_v1"
_PG_LOCK_ID = 0x7477_696E_6875_62  # "twinhub": one hub migrates at a time
_EVENT_COLUMNS = "id, ts_ms, type, device, message, readings_dropped, details, received_ms, gateway_id"


async def _sqlite_columns(db: Database, table: str) -> set[str] | None:
    rows = await db.conn.execute_query_dict("SELECT name FROM pragma_table_info(?)", [table])
    if rows:
        return {r["name"] for r in rows}
    return None  # pragma_table_info gives no rows for a missing table


async def _pg_columns(conn: object, table: str) -> set[str] | None:
    rows = await conn.execute_query_dict(  # type: ignore[attr-defined]
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = $1", [table])
    return {r["column_name"] for r in rows} or None


async def before_generate(db: Database) -> list[str]:
    """Upgrades that must happen before ``generate_schemas``; returns what was done."""
    with db.activate():
        if db.dialect == "postgres":
            return await _postgres(db)
        return await _sqlite_before(db)


async def after_generate(db: Database) -> list[str]:
    """Upgrades that need the tables ``generate_schemas`` creates; returns what was done."""
    from hub.billing import guard
    await guard.install(db)  # statements are immutable at the database level too
    if db.dialect == "postgres":
        return []
    with db.activate():
        return await _sqlite_after(db)


async def _sqlite_before(db: Database) -> list[str]:
    done: list[str] = []
    gateway = await _sqlite_columns(db, "gateway")
    if gateway is not None and "reported_models" not in gateway:
        await db.conn.execute_script(
            "ALTER TABLE \"gateway\" ADD COLUMN \"reported_models\" JSON NOT NULL DEFAULT '{}'")
        done.append("gateway.reported_models added")
    events = await _sqlite_columns(db, "gateway_event")
    if events is not None and "device" not in events:
        if await _sqlite_columns(db, _SQLITE_EVENT_V1) is not None:
            # Cannot happen through this module (the copy drops the old table); refuse rather
            # than guess which rows are the right ones.
            raise RuntimeError(f"both gateway_event (old schema) and {_SQLITE_EVENT_V1} exist; "
                               "merge them by hand")
        await db.conn.execute_script(f'ALTER TABLE "gateway_event" RENAME TO "{_SQLITE_EVENT_V1}"')
        done.append(f"gateway_event renamed to {_SQLITE_EVENT_V1}")
    for step in done:
        log.info("db_migrated", step=step)
    return done


async def _sqlite_after(db: Database) -> list[str]:
    if await _sqlite_columns(db, _SQLITE_EVENT_V1) is None:
        return []
    async with in_transaction(db.connection_name) as conn:
        n, _ = await conn.execute_query(
            f"INSERT OR IGNORE INTO gateway_event ({_EVENT_COLUMNS}) "
            "SELECT id, ts_ms, type, '', message, readings_dropped, details, received_ms, gateway_id "
            f'FROM "{_SQLITE_EVENT_V1}"')
        await conn.execute_query(f'DROP TABLE "{_SQLITE_EVENT_V1}"')
    step = f"gateway_event: {n} rows copied from {_SQLITE_EVENT_V1}, key (gateway_id, ts_ms, type, device)"
    log.info("db_migrated", step=step)
    return [step]


async def _postgres(db: Database) -> list[str]:
    done: list[str] = []
    async with in_transaction(db.connection_name) as conn:
        # Transaction-scoped: released at commit. A second hub waits here, then finds nothing to do.
        await conn.execute_query(f"SELECT pg_advisory_xact_lock({_PG_LOCK_ID})")
        gateway = await _pg_columns(conn, "gateway")
        if gateway is not None and "reported_models" not in gateway:
            await conn.execute_script(
                "ALTER TABLE \"gateway\" ADD COLUMN \"reported_models\" JSONB NOT NULL DEFAULT '{}'::jsonb; "
                'ALTER TABLE "gateway" ALTER COLUMN "reported_models" DROP DEFAULT')
            done.append("gateway.reported_models added")
        events = await _pg_columns(conn, "gateway_event")
        if events is not None and "device" not in events:
            await conn.execute_script(
                "ALTER TABLE \"gateway_event\" ADD COLUMN \"device\" VARCHAR(64) NOT NULL DEFAULT ''; "
                'ALTER TABLE "gateway_event" ALTER COLUMN "device" DROP DEFAULT; '
                f'ALTER TABLE "gateway_event" DROP CONSTRAINT IF EXISTS "{EVENT_KEY_V1}"; '
                f'ALTER TABLE "gateway_event" ADD CONSTRAINT "{EVENT_KEY_V2}" '
                'UNIQUE ("gateway_id", "ts_ms", "type", "device")')
            done.append("gateway_event.device added, key (gateway_id, ts_ms, type, device)")
    for step in done:
        log.info("db_migrated", step=step)
    return done
