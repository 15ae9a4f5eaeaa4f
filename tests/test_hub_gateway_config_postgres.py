"""The remote-configuration store tests again on a throw-away PostgreSQL cluster (JSON documents,
the unique version key under concurrent changes, reports). PostgreSQL must be installed: without it
these tests fail, they do not skip."""

from __future__ import annotations

import itertools

import pytest

from fleet.postgres import PostgresCluster
from tests.test_hub_gateway_config import (  # noqa: F401 - collected here with the PostgreSQL db_url
    db,
    test_concurrent_changes_get_distinct_versions,
    test_config_api_roles_audit_and_errors,
    test_hub_publishes_retained_configs_and_records_reports,
    test_versions_history_and_reports,
)

_numbers = itertools.count()


@pytest.fixture
def db_url(postgres: PostgresCluster) -> str:
    """A new, empty database in the session's cluster."""
    return postgres.create_database(f"hub_gwconfig_{next(_numbers)}")
