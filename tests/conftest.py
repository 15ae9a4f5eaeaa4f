"""Fixtures for real parts: a private Mosquitto broker per test."""

from __future__ import annotations

import email
import email.message
import email.policy
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fleet.broker import BrokerTls, Mosquitto
from fleet.net import free_port
from fleet.postgres import PostgresCluster, PostgresUnavailable
from tests import browser as browsers
from tests.hubtools import ADMIN_PASSWORD
from tests.parts import missing_part, running_broker
from tests.tlstools import Pki, make_pki

# Test modules import onnxruntime directly; like the edge and hub, they keep its telemetry off.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
# Every hub the tests start (in-process or as a process) creates `admin` with this password.
os.environ["TWIN_ADMIN_PASSWORD"] = ADMIN_PASSWORD


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real mosquitto on a free 127.0.0.1 port, stopped after the test."""
    yield from running_broker(workdir=tmp_path / "mosquitto")


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Headless Debian Chromium driven by Playwright's async API (tests/browser.py)."""
    async with browsers.launch() as b:
        yield b


@pytest.fixture(scope="session")
def tls_ca(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throw-away CA with a server certificate for 127.0.0.1 and a client certificate (plus a rogue CA)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def mosquitto_tls(tmp_path: Path, tls_ca: Pki) -> Iterator[Mosquitto]:
    """A real mosquitto with only a TLS listener (TLS 1.2+, certificate from ``tls_ca``) on ``.port``."""
    yield from running_broker(workdir=tmp_path / "mosquitto-tls", plain=False,
                              tls=BrokerTls(tls_ca.ca, tls_ca.server_cert, tls_ca.server_key))


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


@dataclass
class Mailbox:
    """What the test SMTP server received: (envelope sender, recipients, parsed message)."""

    port: int
    messages: list[tuple[str, list[str], email.message.EmailMessage]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), msg))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[Mailbox]:
    """A real SMTP server (aiosmtpd) on a free 127.0.0.1 port, in its own thread."""
    try:
        from aiosmtpd.controller import Controller
    except ImportError:
        missing_part("aiosmtpd (an SMTP server for the tests)", ".venv/bin/pip install -e '.[dev]'")
    box = Mailbox(free_port())
    controller = Controller(box, hostname="127.0.0.1", port=box.port)
    controller.start()
    try:
        yield box
    finally:
        controller.stop()
