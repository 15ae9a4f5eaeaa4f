"""Fixtures for real parts: a private Mosquitto broker per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.broker import BrokerUnavailable, Mosquitto
from fleet.postgres import PostgresCluster, PostgresUnavailable
from tests.parts import missing_part

# Test modules import onnxruntime directly; like the edge and hub, they keep its telemetry off.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real mosquitto on a free 127.0.0.1 port, stopped after the test."""
    try:
        broker = Mosquitto(workdir=tmp_path / "mosquitto")
        broker.start()
    except BrokerUnavailable as exc:
        missing_part(str(exc), "apt-get install mosquitto")
    try:
        yield broker
    finally:
        broker.cleanup()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A throw-away PostgreSQL cluster for the whole session (``initdb`` in a temp dir).

    Tests call ``postgres.create_database(name)`` for a database of their own.
    """
    try:
        cluster = PostgresCluster()
    except PostgresUnavailable as exc:
        missing_part(str(exc), "apt-get install postgresql")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.cleanup()
