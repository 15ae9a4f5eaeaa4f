"""Alert notifications to real receivers on loopback: an SMTP server (aiosmtpd) and an HTTP webhook
receiver; retry after a server error, the rate limit against a flapping sensor, digests."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fleet.net import free_port
from hub.alerts.engine import AlertEngine, history
from hub.alerts.models import Alert
from hub.alerts.rules import AlertsConfig
from hub.db import Database
from hub.store import TelemetryItem
from tests.conftest import Mailbox
from tests.hubtools import T0, telemetry, wait_until

PRESSURE = {"type": "threshold", "name": "pressure", "profile": "sim-boiler", "metric": "pressure",
            "below": 0.8, "above": 2.8, "severity": "critical"}
FAST_RETRY = {"retry_attempts": 3, "retry_base_s": 0.05, "retry_max_s": 0.2, "webhook_timeout_s": 5}


@dataclass
class Receiver:
    url: str
    statuses: list[int]
    """Answers to give, in order; 200 once they are used up."""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def webhook() -> Iterator[Receiver]:
    """A real HTTP server on 127.0.0.1 that records POSTed JSON bodies."""
    receiver = Receiver(url="", statuses=[])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with receiver.lock:
                receiver.bodies.append(body)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/twin"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database(f"sqlite://{tmp_path}/hub.db").open()
    try:
        yield database
    finally:
        await database.close()


def reading(value: float, seq: int, site: str = "site1") -> TelemetryItem:
    return TelemetryItem(telemetry(site, "gw1", [("boiler1", "pressure", seq, T0 + seq * 1000, value, "bar",
                                                   "good")]), T0 + seq * 1000)


def engine_for(db: Database, contacts: list[dict[str, Any]], smtp_port: int = 25, **notify: Any) -> AlertEngine:
    cfg = AlertsConfig.model_validate({
        "builtin_rules": False, "rules": [PRESSURE], "contacts": contacts,
        "smtp": {"host": "127.0.0.1", "port": smtp_port, "sender": "hub@twin.test", "timeout_s": 5},
        "notify": {**FAST_RETRY, **notify}})
    return AlertEngine(db, cfg, clock=lambda: T0)


async def only_alert(db: Database) -> Alert:
    with db.activate():
        (alert,) = await Alert.all()
    return alert


async def test_email_goes_to_the_contacts_of_the_site(db: Database, smtp: Mailbox) -> None:
    engine = engine_for(db, [
        {"name": "site1-maint", "sites": ["site1"], "email": ["maint@site1.test", "oncall@site1.test"]},
        {"name": "site2-maint", "sites": ["site2"], "email": ["maint@site2.test"]},
        {"name": "eng", "role": "engineering", "min_severity": "critical", "email": ["eng@twin.test"]},
        {"name": "info-only", "sites": ["site1"], "min_severity": "critical", "email": ["boss@site1.test"]},
    ], smtp_port=smtp.port)
    await engine.evaluate_batch([reading(1.5, 0), reading(0.62, 1)])
    assert await engine.notifier.wait_idle(15)
    assert engine.notifier.stats.delivered == 3 and engine.notifier.stats.failed == 0
    by_rcpt = {tuple(rcpt): (sender, msg) for sender, rcpt, msg in smtp.messages}
    assert set(by_rcpt) == {("maint@site1.test", "oncall@site1.test"), ("eng@twin.test",), ("boss@site1.test",)}
    sender, msg = by_rcpt[("maint@site1.test", "oncall@site1.test")]
    alert = await only_alert(db)
    assert sender == "hub@twin.test"
    assert msg["From"] == "hub@twin.test" and msg["To"] == "maint@site1.test, oncall@site1.test"
    assert msg["Subject"] == "[twin CRITICAL] opened: site1.gw1.boiler1 pressure 0.62 bar below 0.8"
    assert msg["X-Twin-Alert"] == str(alert.id)
    body = msg.get_content()
    assert f"Alert {alert.id} (pressure, threshold) is open." in body
    for line in ("severity:   critical", "site:       site1", "device:     site1.gw1.boiler1",
                 "metric:     pressure", "last value: 0.62", "condition:  pressure:site1.gw1.boiler1",
                 f"details:    /api/v1/alerts/{alert.id}"):
        assert line in body, line
    assert alert.notifications_sent == 3
    notified = [(e["action"], e["by"]) for e in await history(db, alert.id) if e["action"] != "opened"]
    assert sorted(notified) == [("notified", "eng"), ("notified", "info-only"), ("notified", "site1-maint")]


async def test_webhook_is_retried_after_a_server_error(db: Database, webhook: Receiver) -> None:
    webhook.statuses = [500]
    engine = engine_for(db, [{"name": "chat", "webhook": webhook.url}])
    await engine.evaluate_batch([reading(3.3, 0)])
    assert await engine.notifier.wait_idle(15)
    assert len(webhook.bodies) == 2  # the 500, then the delivered retry
    assert webhook.bodies[0] == webhook.bodies[1]
    body = webhook.bodies[1]
    alert = await only_alert(db)
    assert (body["event"], body["contact"], body["role"], body["suppressed"]) == ("opened", "chat", "maintenance", 0)
    assert body["alert"] == {
        "id": alert.id, "key": "pressure:site1.gw1.boiler1", "rule": "pressure", "type": "threshold",
        "severity": "critical", "state": "open", "site": "site1", "gateway": "gw1", "device": "site1.gw1.boiler1",
        "metric": "pressure", "message": "site1.gw1.boiler1 pressure 3.3 bar above 2.8", "count": 1,
        "last_value": 3.3, "opened_at_ms": T0, "url": f"/api/v1/alerts/{alert.id}"}
    assert (engine.notifier.stats.retries, engine.notifier.stats.delivered) == (1, 1)
    assert alert.notifications_sent == 1
    events = await history(db, alert.id)
    assert [(e["action"], e["by"], e["message"]) for e in events][1:] == [
        ("notified", "chat", "webhook (opened) after 2 attempt(s)")]


async def test_failures_are_bounded_and_recorded(db: Database, webhook: Receiver) -> None:
    webhook.statuses = [404]  # a client error is final
    dead = free_port()  # nothing listens here: every SMTP attempt fails
    engine = engine_for(db, [{"name": "gone", "webhook": webhook.url},
                             {"name": "mail", "email": ["x@twin.test"]}], smtp_port=dead)
    await engine.evaluate_batch([reading(0.1, 0)])
    assert await engine.notifier.wait_idle(15)
    assert len(webhook.bodies) == 1
    assert (engine.notifier.stats.failed, engine.notifier.stats.delivered) == (2, 0)
    alert = await only_alert(db)
    failed = {e["by"]: e["message"] for e in await history(db, alert.id) if e["action"] == "notify_failed"}
    assert failed["gone"] == "webhook (opened) after 1 attempt(s): webhook answered HTTP 404"
    assert failed["mail"].startswith("email (opened) after 3 attempt(s): ")
    assert alert.notifications_sent == 0


async def test_a_flapping_sensor_cannot_flood_anyone(db: Database, webhook: Receiver, smtp: Mailbox) -> None:
    engine = engine_for(db, [{"name": "chat", "webhook": webhook.url, "email": ["maint@site1.test"]}],
                        smtp_port=smtp.port, max_per_window=3, window_s=3600)
    mono = [1000.0]
    engine.notifier.monotonic = lambda: mono[0]
    values = [0.5, 1.5] * 20  # 20 flaps: each opens a new alert (the previous one cleared itself)
    await engine.evaluate_batch([reading(v, i) for i, v in enumerate(values)])
    assert await engine.notifier.wait_idle(15)
    with db.activate():
        alerts = await Alert.all().order_by("id")
    assert len(alerts) == 20 and all(a.state == "cleared" for a in alerts)
    assert len(webhook.bodies) == 3 and len(smtp.messages) == 3
    assert [b["alert"]["id"] for b in webhook.bodies] == [a.id for a in alerts[:3]]
    assert engine.notifier.stats.suppressed == 17
    assert sum(a.notifications_suppressed for a in alerts) == 17

    await engine.sweep()  # the window is still full: no digest yet
    await asyncio.sleep(0.05)
    assert len(webhook.bodies) == 3
    mono[0] += 3601
    await engine.sweep()
    await wait_until(lambda: len(webhook.bodies) == 4 and len(smtp.messages) == 4, 10, "the digest")
    digest = webhook.bodies[3]
    assert (digest["event"], digest["suppressed"], digest["alert"]["id"]) == ("digest", 17, alerts[-1].id)
    assert smtp.messages[3][2]["Subject"].startswith("[twin CRITICAL] digest (17 held back): ")
    assert "17 further notification(s) about this condition were held back" in smtp.messages[3][2].get_content()
    await engine.sweep()
    await asyncio.sleep(0.05)
    assert len(webhook.bodies) == 4  # one digest, not one per sweep
    assert await engine.notifier.wait_idle(15)
    await engine.notifier.close()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
async def test_smtp_login_with_the_configured_credentials(db: Database) -> None:
    # A server that requires AUTH (over plain TCP on loopback, allowed for the test): the
    # configured username and password are used, and a wrong password is a recorded failure.
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    logins: list[tuple[str, str]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        login = (data.login.decode(), data.password.decode())
        logins.append(login)
        return AuthResult(success=login == ("twin-hub", "s3cret"))

    box = Mailbox(free_port())
    controller = Controller(box, hostname="127.0.0.1", port=box.port, authenticator=authenticator,
                            auth_required=True, auth_require_tls=False)
    controller.start()
    try:
        for password, ok in (("s3cret", True), ("wrong", False)):
            cfg = AlertsConfig.model_validate({
                "builtin_rules": False, "rules": [PRESSURE],
                "contacts": [{"name": "mail", "email": ["maint@site1.test"]}],
                "smtp": {"host": "127.0.0.1", "port": box.port, "sender": "hub@twin.test", "username": "twin-hub",
                         "password": password, "timeout_s": 2},
                "notify": {**FAST_RETRY, "retry_attempts": 1}})
            engine = AlertEngine(db, cfg, clock=lambda: T0)
            engine._abnormal.clear()
            with db.activate():
                await Alert.all().delete()
            await engine.evaluate_batch([reading(0.5, 0)])
            assert await engine.notifier.wait_idle(15)
            assert (engine.notifier.stats.delivered, engine.notifier.stats.failed) == ((1, 0) if ok else (0, 1))
            await engine.notifier.close()
    finally:
        controller.stop()
    assert logins == [("twin-hub", "s3cret"), ("twin-hub", "wrong")]
    assert len(box.messages) == 1 and box.messages[0][1] == ["maint@site1.test"]
