"""The alert API and engine tests again on a throw-away PostgreSQL cluster (the session ``postgres``
fixture). PostgreSQL must be installed: without it these tests fail, they do not skip."""

from __future__ import annotations

import itertools

import pytest

from fleet.postgres import PostgresCluster
from hub.alerts.engine import AlertEngine
from hub.alerts.models import Alert
from hub.alerts.rules import AlertsConfig
from hub.db import Database
from tests.hubtools import T0
from tests.test_hub_alerts_api import (  # noqa: F401 - collected here with the PostgreSQL db_url
    pressure,
    seeded,
    test_ack_then_clear,
    test_bad_requests_change_nothing,
    test_detail_has_the_history,
    test_list_newest_first_with_filters_and_paging,
)

_numbers = itertools.count()


@pytest.fixture
def db_url(postgres: PostgresCluster) -> str:
    """A new, empty database in the session's cluster."""
    return postgres.create_database(f"hub_alerts_{next(_numbers)}")


async def test_one_open_alert_per_condition_across_engines(db_url: str) -> None:
    # Two hubs sharing the database (two engines, each with its own memory): the unique
    # active_key keeps one open alert per condition, the second trigger counts on it.
    cfg = AlertsConfig.model_validate({"builtin_rules": False, "rules": [
        {"type": "threshold", "name": "p", "metric": "pressure", "below": 0.8}]})
    async with Database(db_url) as db:
        assert db.dialect == "postgres"
        first, second = AlertEngine(db, cfg, clock=lambda: T0), AlertEngine(db, cfg, clock=lambda: T0 + 1)
        await first.evaluate_batch([pressure("plant1", "boiler1", 1, 0.5)])
        await second.evaluate_batch([pressure("plant1", "boiler1", 2, 0.4)])
        with db.activate():
            rows = await Alert.all().values_list("state", "count", "active_key")
        assert rows == [("open", 2, "p:plant1.gw1.boiler1")]
