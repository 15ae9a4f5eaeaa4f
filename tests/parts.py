"""Access to the real parts the integration tests need.

A test that needs Mosquitto, PostgreSQL or another real part fails (never skips) when the part
is missing: a skipped integration test is a green CI that proves nothing.
"""

from __future__ import annotations

from typing import NoReturn

import pytest


def missing_part(what: str, how: str) -> NoReturn:
    """Fail the current test because a real part is not installed."""
    pytest.fail(f"required part missing: {what}. Install it with: {how} (or run `bash .ci/run`)",
                pytrace=False)
