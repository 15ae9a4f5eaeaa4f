"""Access to the real parts the integration tests need.

A test that needs Mosquitto, PostgreSQL or another real part fails (never skips) when the part
is missing: a skipped integration test is a green CI that proves nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NoReturn

import pytest

from fleet.broker import BrokerUnavailable, Mosquitto


def missing_part(what: str, how: str) -> NoReturn:
    """Fail the current test because a real part is not installed."""
    pytest.fail(f"required part missing: {what}. Install it with: {how} (or run `bash .ci/run`)",
                pytrace=False)


def running_broker(**options: Any) -> Iterator[Mosquitto]:
    """A started real Mosquitto (``fleet.broker.Mosquitto(**options)``), cleaned up afterwards;
    missing, the test fails. For fixtures: ``yield from running_broker(...)``."""
    try:
        broker = Mosquitto(**options)
        broker.start()
    except BrokerUnavailable as exc:
        missing_part(str(exc), "apt-get install mosquitto")
    try:
        yield broker
    finally:
        broker.cleanup()
