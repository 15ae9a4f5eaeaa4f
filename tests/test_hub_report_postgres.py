"""The board report's data and PDF again on a throw-away PostgreSQL cluster (the daily aggregate is
raw SQL). Test functions imported from ``test_hub_report.py``; the ``db_url`` fixture below replaces
its SQLite one. PostgreSQL must be installed: without it these tests fail, they do not skip."""

from __future__ import annotations

import itertools

import pytest

from fleet.postgres import PostgresCluster
from tests.test_hub_report import (  # noqa: F401 - collected here with the PostgreSQL db_url
    api,
    test_pdf_has_site_headline_alerts_and_the_cost_of_the_cost_route,
    test_report_data_trends_and_most_at_risk,
)

_numbers = itertools.count()


@pytest.fixture
def db_url(postgres: PostgresCluster) -> str:
    """A new, empty database in the session's cluster."""
    return postgres.create_database(f"hub_report_{next(_numbers)}")
