"""The billing API and upgrade tests again, on a throw-away PostgreSQL cluster (DECIMAL columns are
NUMERIC there). The test functions are imported from the SQLite modules; pytest collects them here too
and the ``db_url`` fixture below (one fresh database per test) replaces their SQLite one. PostgreSQL
must be installed: without it these tests fail, they do not skip."""

from __future__ import annotations

import itertools

import pytest

from fleet.postgres import PostgresCluster
from tests.test_hub_billing_api import (  # noqa: F401 - collected here with the PostgreSQL db_url
    api,
    db,
    signals,
    test_assignments,
    test_bad_assignments_are_refused_and_change_nothing,
    test_bad_cost_requests,
    test_bad_reading_requests_change_nothing,
    test_bad_tariffs_are_refused_and_change_nothing,
    test_cost_without_tariff_or_readings,
    test_create_and_list_tariffs,
    test_duplicate_tariff_name_409,
    test_implausible_readings_are_refused_and_raise_a_human_error,
    test_manual_reading_accepted,
    test_meter_tariff_from_mid_day_beats_the_site_tariff,
    test_replacement_may_be_lower,
    test_running_cost_over_the_23_hour_day,
    test_second_by_second_telemetry_across_a_rollover,
    test_second_manual_reading_at_the_same_time_409,
)
from tests.test_hub_billing_migrate import test_existing_database_gets_the_billing_tables  # noqa: F401
from tests.test_hub_billing_statements import (  # noqa: F401 - statements on PostgreSQL too
    fake_stripe,
    test_checkout_session_for_a_statement,
    test_concurrent_closes_never_share_a_number,
    test_database_refuses_to_change_a_statement,
    test_payment_of_another_amount_does_not_pay,
    test_same_or_overlapping_period_409_and_numbers_stay_gap_free,
    test_send_statement_to_the_supplier,
    test_statements_cannot_be_changed,
    test_stripe_webhook_marks_paid_idempotently,
    test_unknown_statement_404,
    test_worked_example_statement,
)

_numbers = itertools.count()


@pytest.fixture
def db_url(postgres: PostgresCluster) -> str:
    """A new, empty database in the session's cluster."""
    return postgres.create_database(f"hub_billing_{next(_numbers)}")


def test_db_url_is_postgres(db_url: str) -> None:
    assert db_url.startswith("postgres://")
