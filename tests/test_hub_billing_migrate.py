"""A database of the schema before billing (no tariff / manual-reading tables) gets the billing tables
when the hub opens it, and keeps its rows. SQLite here; ``test_hub_billing_postgres.py`` reruns it
on PostgreSQL with its ``db_url``."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub import queries
from hub.db import Database
from hub.store import Store, TelemetryItem
from tests.hubtools import T0, series, telemetry

BILLING_TABLES = ("payment", "statement", "statement_counter", "tariff_band", "tariff_assignment", "tariff",
                  "manual_reading")  # drop order


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path}/hub.db"


async def _tables(db: Database) -> set[str]:
    with db.activate():
        if db.dialect == "postgres":
            rows = await db.conn.execute_query_dict(
                "SELECT table_name AS name FROM information_schema.tables WHERE table_schema = current_schema()")
        else:
            rows = await db.conn.execute_query_dict("SELECT name FROM sqlite_master WHERE type = 'table'")
    return {r["name"] for r in rows}


async def test_existing_database_gets_the_billing_tables(db_url: str) -> None:
    async with Database(db_url) as db:
        await Store(db).write([TelemetryItem(telemetry("plant1", "gw1", series("meter1", "energy_import", 3,
                                                                               unit="kWh"),
                                                       kinds={"meter1": "meter"}), T0)])
        with db.activate():
            for table in BILLING_TABLES:
                await db.conn.execute_script(f'DROP TABLE "{table}"')
        assert not set(BILLING_TABLES) & await _tables(db)  # the schema before billing
    async with Database(db_url) as db:
        assert set(BILLING_TABLES) <= await _tables(db)
        dev = await queries.find_device(db, "plant1.gw1.meter1")
        assert dev is not None
        assert len(await queries.readings(db, dev.pk)) == 3
