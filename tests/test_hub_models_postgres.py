"""The model-registry, migration and rollout tests again on a throw-away PostgreSQL cluster.

The test functions are imported from the SQLite modules; pytest collects them here too and the
``db_url`` fixture below (one fresh database per test) replaces their SQLite one. PostgreSQL must
be installed: without it these tests fail, they do not skip.
"""

from __future__ import annotations

import itertools

import pytest

from fleet.postgres import PostgresCluster
from hub.db import Database
from tests.test_hub_models_api import (  # noqa: F401 - collected here with the PostgreSQL db_url
    api,
    db,
    test_anomaly_events_per_device_and_device_flag,
    test_assign_fleet_wide_and_per_gateway,
    test_assignment_errors,
    test_gateway_models_assigned_versus_running,
    test_list_models_newest_first_with_filters,
    test_same_file_again_is_idempotent_other_bytes_conflict,
    test_unknown_model_404_and_bad_path_422,
    test_upload_rejections,
    test_upload_stores_the_version_and_serves_the_file,
)
from tests.test_hub_models_migrate import (  # noqa: F401 - collected here with the PostgreSQL db_url
    _schema,
    old_db,
    test_fresh_database_needs_no_upgrade,
    test_old_schema_is_upgraded_and_keeps_its_rows,
)
from tests.test_hub_models_rollout import (  # noqa: F401 - collected here with the PostgreSQL db_url
    config,
    test_assignments_reach_the_gateways,
    test_model_reports_and_anomaly_events_over_mqtt,
)

_numbers = itertools.count()


@pytest.fixture
def db_url(postgres: PostgresCluster) -> str:
    """A new, empty database in the session's cluster."""
    return postgres.create_database(f"hub_models_{next(_numbers)}")


async def test_upgraded_postgres_tables_equal_fresh_ones(old_db: str, postgres: PostgresCluster) -> None:  # noqa: F811
    async with Database(old_db) as upgraded:
        assert upgraded.dialect == "postgres"
        got = {t: await _schema(upgraded, t) for t in ("gateway", "gateway_event")}
    async with Database(postgres.create_database(f"hub_models_{next(_numbers)}")) as fresh:
        expected = {t: await _schema(fresh, t) for t in ("gateway", "gateway_event")}
    # Same columns (type, NOT NULL, no default left behind) and the same indexes by name and
    # definition: the widened unique key has the name generate_schemas gives it.
    assert got == expected
    assert any("uid_gateway_eve_gateway_336af0" in name and "(gateway_id, ts_ms, type, device)" in ddl
               for name, ddl in got["gateway_event"]["indexes"])
