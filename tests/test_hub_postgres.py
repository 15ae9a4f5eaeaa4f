"""The store and API tests again, against a throw-away PostgreSQL cluster, plus ingest into it.

The test functions are imported from ``test_hub_store`` and ``test_hub_api``; pytest collects
them here too and the ``db_url`` fixture below (one fresh database per test) replaces their
SQLite one. PostgreSQL must be installed: without it these tests fail, they do not skip.
"""

from __future__ import annotations

import itertools

import httpx
import pytest

from fleet.broker import Mosquitto
from fleet.postgres import PostgresCluster
from hub.service import running_hub
from protocol.topics import events_topic, telemetry_topic
from tests.hubtools import T0, admin_auth, event_payload, hub_config, series, telemetry_payload, wait_until
from tests.test_hub_api import (  # noqa: F401 - collected here with the PostgreSQL db_url
    api,
    test_bad_event_parameters_422,
    test_bad_query_parameters_422,
    test_device_detail,
    test_devices_list,
    test_gateway_events,
    test_gateways,
    test_health,
    test_latest,
    test_limit_bounds_accepted,
    test_metrics_and_docs,
    test_readings_filters,
    test_unknown_device_404_json,
    test_unknown_gateway_404_json,
)
from tests.test_hub_ingest import count_rows, publish
from tests.test_hub_store import (  # noqa: F401 - collected here with the PostgreSQL db_url
    db,
    test_batch_stored_then_redelivery_ignored,
    test_device_kind_change_is_recorded,
    test_duplicate_keeps_first_value,
    test_entities_created_once_and_ids_cached,
    test_event_commits_with_its_batch_or_not_at_all,
    test_event_text_with_nul_is_stored,
    test_events_stored_once_per_gateway_ts_type,
    test_failed_batch_leaves_nothing_behind,
    test_find_device_rejects_non_uids,
    test_find_gateway_rejects_non_ids,
    test_last_seen_and_gateway_status,
    test_latest_and_readings_queries,
    test_latest_of_device_without_readings_is_empty,
    test_readings_dropped_is_zero_without_events,
    test_same_device_name_on_two_gateways_are_two_devices,
)

_numbers = itertools.count()


@pytest.fixture
def db_url(postgres: PostgresCluster) -> str:
    """A new, empty database in the session's cluster."""
    return postgres.create_database(f"hub_test_{next(_numbers)}")


def test_db_url_is_postgres(db_url: str) -> None:
    assert db_url.startswith("postgres://")


async def test_ingest_into_postgres(mosquitto: Mosquitto, db_url: str) -> None:
    config = hub_config(db_url=db_url, mqtt_port=mosquitto.port)
    message = (telemetry_topic("site1", "gw1"), telemetry_payload("site1", "gw1", series("b1", "temp", 500)))
    thinned = (events_topic("site1", "gw1"), event_payload("site1", "gw1", "buffer_thinned", T0,
                                                           readings_dropped=64, details={"ratio": 0.5}))
    async with running_hub(config) as hub:
        assert hub.db.dialect == "postgres"
        await publish(mosquitto, message, thinned, message, thinned)
        await wait_until(lambda: hub.stats.readings_received == 1000, what="both copies processed")
        await wait_until(lambda: hub.stats.acked == 4, what="every message acknowledged")
        assert (hub.stats.readings_stored, hub.stats.duplicates) == (500, 500)
        assert (hub.stats.events, hub.stats.event_duplicates) == (1, 1)
        assert await count_rows(hub) == 500
        async with httpx.AsyncClient(auth=admin_auth(), base_url=hub.api_url) as http:
            (gw,) = (await http.get("/api/v1/gateways")).json()
            events = (await http.get("/api/v1/gateways/site1.gw1/events")).json()
        assert (gw["id"], gw["readings_dropped"]) == ("site1.gw1", 64)
        assert [(e["type"], e["readings_dropped"], e["details"]) for e in events] == [
            ("buffer_thinned", 64, {"ratio": 0.5})]
