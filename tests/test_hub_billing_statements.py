"""Statements through the REST API: closing a period, numbering, immutability, HTML and PDF, e-mail
to a real SMTP server on loopback (aiosmtpd), Stripe Checkout against a fake Stripe API on
127.0.0.1 and signed Stripe webhooks (no network). SQLite here; ``test_hub_billing_postgres.py``
reruns the database tests on PostgreSQL.

The worked example: the seeded meter on the 23-hour day 2026-03-29 (Europe/London) with economy7.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import json
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest
from pypdf import PdfReader

from fleet.net import free_port
from hub import users
from hub.alerts.rules import SmtpConfig
from hub.api import ApiContext, create_app
from hub.billing import models as bm
from hub.billing.config import BillingConfig, PaymentsConfig
from hub.db import Database
from tests import test_hub_billing_api as base
from tests.conftest import Mailbox
from tests.hubtools import BearerAuth, add_user
from tests.test_hub_billing_api import BOILER, METER, NOW, post_economy7

db_url = base.db_url  # fixtures: the seeded database (SQLite here, PostgreSQL in test_hub_billing_postgres.py)
db = base.db

WHSEC = "whsec_test_secret"
DAY = {"meter": METER, "since": "2026-03-29T00:00:00Z", "until": "2026-03-29T23:00:00Z"}


@dataclass
class FakeStripe:
    """A fake Stripe API on 127.0.0.1: records requests, answers a Checkout Session."""

    url: str = ""
    requests: list[tuple[str, str, dict[str, str], dict[str, list[str]]]] = field(default_factory=list)


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    fake = FakeStripe()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
            fake.requests.append(("POST", self.path, dict(self.headers), urllib.parse.parse_qs(body)))
            answer = json.dumps({"id": "cs_test_123", "object": "checkout.session",
                                 "url": "https://checkout.stripe.com/c/pay/cs_test_123"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


TECH_PASSWORD = "tech-7-password"


@contextlib.asynccontextmanager
async def client(database: Database, **ctx: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The API as staff user ``tech-7``."""
    with database.activate():
        known = await users.get_user("tech-7") is not None
    if not known:
        await add_user(database, "tech-7", "staff", TECH_PASSWORD)
    app = create_app(ApiContext(db=database, clock=lambda: NOW, **ctx))
    async with httpx.AsyncClient(auth=BearerAuth("tech-7", TECH_PASSWORD), transport=httpx.ASGITransport(app=app),
                                 base_url="http://hub") as c:
        yield c


@pytest.fixture
async def api(db: Database) -> AsyncIterator[httpx.AsyncClient]:
    async with client(db) as c:
        yield c


async def rows(db: Database) -> dict[str, list[dict[str, Any]]]:
    with db.activate():
        return {model.__name__: await model.all().values()
                for model in (bm.Statement, bm.StatementCounter, bm.Payment, bm.ManualReading)}


async def whole_day(api: httpx.AsyncClient) -> None:
    """economy7 on the site and the technician's reading 230.00 at 23:00Z (midnight BST)."""
    await post_economy7(api)
    r = await api.post(f"/api/v1/meters/{METER}/readings", json={"value": "230.00", "ts": "2026-03-29T23:00:00Z"})
    assert r.status_code == 201, r.text


async def test_worked_example_statement(api: httpx.AsyncClient) -> None:
    await whole_day(api)
    # Register 0.00 at 00:00Z .. 230.00 at 23:00Z, 10 kWh/h, on the 23-hour day 2026-03-29:
    #   night 00:30 GMT .. 07:30 BST = 00:30Z .. 06:30Z = 6 h = 60 kWh × 0.10 = 6.00
    #   day   00:00-00:30Z + 06:30Z-23:00Z = 17 h = 170 kWh × 0.30      = 51.00
    #   standing charge: one local day (23 h) × 0.60                      =  0.60
    #   net 57.60; VAT 5 % = 2.88; total 60.48
    r = await api.post("/api/v1/statements", json=DAY)
    assert r.status_code == 201, r.text
    s = r.json()
    assert s["number"] == "ST-2026-000001"
    assert (s["meter"], s["site"], s["since"], s["until"], s["currency"], s["status"]) == (
        METER, "plant1", "2026-03-29T00:00:00.000Z", "2026-03-29T23:00:00.000Z", "GBP", "issued")
    assert [(x["kind"], x["band"], x["quantity"], x["unit"], x["rate"], x["amount"]) for x in s["lines"]] == [
        ("energy", "day", "170.000", "kWh", "0.3", "51.00"), ("energy", "night", "60.000", "kWh", "0.1", "6.00"),
        ("standing_charge", None, "1.0000", "day", "0.6", "0.60")]
    assert s["vat"] == [{"rate": "0.05", "net": "57.60", "amount": "2.88"}]
    assert (s["net"], s["vat_total"], s["total"], s["consumption_kwh"]) == ("57.60", "2.88", "60.48", "230.000")
    assert (s["issued_at"], s["issued_by"], s["sent_at"], s["paid_at"]) == ("2026-11-01T00:00:00.000Z", "tech-7",
                                                                            None, None)
    assert len(s["content_hash"]) == 64
    # The same figures as the running cost of the same period.
    cost = (await api.get(f"/api/v1/meters/{METER}/cost", params={"since": DAY["since"], "until": DAY["until"]})).json()
    assert (cost["net"], cost["vat_total"], cost["total"]) == (s["net"], s["vat_total"], s["total"])
    assert [e["amount"] for e in cost["energy"]] + [c["amount"] for c in cost["standing_charge"]] == [
        x["amount"] for x in s["lines"]]

    assert (await api.get("/api/v1/statements/ST-2026-000001")).json() == s
    assert [x["number"] for x in (await api.get("/api/v1/statements")).json()] == ["ST-2026-000001"]
    assert (await api.get("/api/v1/statements", params={"meter": METER})).json() == [s]
    assert (await api.get("/api/v1/statements", params={"site": "plant1"})).json() == []

    html = await api.get("/api/v1/statements/ST-2026-000001.html")
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    for text in ("ST-2026-000001", "60.48 GBP", "57.60", "2.88", "51.00", "170.000 kWh", s["content_hash"]):
        assert text in html.text
    pdf = await api.get("/api/v1/statements/ST-2026-000001.pdf")
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF")
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf.content)).pages)
    assert "ST-2026-000001" in text and "60.48 GBP" in text and "51.00" in text


async def test_html_escapes(db: Database) -> None:
    from hub.billing.render import render_html
    html = render_html({"number": "ST-1", "issuer": "<script>x</script>", "meter": "m", "site": "s",
                        "since": "a", "until": "b", "issued_at": "c", "consumption_kwh": "0", "lines": [],
                        "vat": [], "net": "0", "vat_total": "0", "total": "0", "currency": "GBP"}, "issued", "h")
    assert "<script>" not in html and "&lt;script&gt;" in html


async def test_same_or_overlapping_period_409_and_numbers_stay_gap_free(api: httpx.AsyncClient, db: Database
                                                                        ) -> None:
    await whole_day(api)
    assert (await api.post("/api/v1/statements", json=DAY)).status_code == 201
    before = await rows(db)
    r = await api.post("/api/v1/statements", json=DAY)
    assert r.status_code == 409 and "ST-2026-000001" in r.json()["detail"]
    r = await api.post("/api/v1/statements", json={**DAY, "since": "2026-03-29T12:00:00Z",
                                                   "until": "2026-03-30T12:00:00Z"})
    assert r.status_code == 409 and "may not overlap" in r.json()["detail"]
    # the site's statement would bill the same meter again
    r = await api.post("/api/v1/statements", json={"site": "plant1", "since": "2026-03-28T00:00:00Z",
                                                   "until": "2026-03-29T01:00:00Z"})
    assert r.status_code == 409
    assert await rows(db) == before
    # adjacent periods are fine, and take the next number
    r = await api.post("/api/v1/statements", json={**DAY, "since": "2026-03-29T23:00:00Z",
                                                   "until": "2026-03-30T23:00:00Z"})
    assert r.status_code == 201, r.text
    assert r.json()["number"] == "ST-2026-000002"
    # Nothing measured after 23:00Z: 0 kWh; standing charge 1 local day × 0.60; VAT 5 % 0.03; total 0.63
    assert (r.json()["consumption_kwh"], r.json()["net"], r.json()["total"]) == ("0.000", "0.60", "0.63")
    # a site statement of a later period lists the site's meters
    r = await api.post("/api/v1/statements", json={"site": "plant1", "since": "2026-03-30T23:00:00Z",
                                                   "until": "2026-03-31T23:00:00Z"})
    assert r.status_code == 201, r.text
    assert (r.json()["number"], r.json()["meters"], r.json()["meter"], r.json()["total"]) == (
        "ST-2026-000003", [METER], None, "0.63")


async def test_statements_cannot_be_changed(api: httpx.AsyncClient, db: Database) -> None:
    await whole_day(api)
    assert (await api.post("/api/v1/statements", json=DAY)).status_code == 201
    before = await rows(db)
    for method in ("PUT", "PATCH", "DELETE"):
        r = await api.request(method, "/api/v1/statements/ST-2026-000001", json={"total": "1.00"})
        assert r.status_code == 405
    assert await rows(db) == before


@pytest.mark.parametrize(("body", "status", "message"), [
    ({**DAY, "meter": "plant1.gw1.nope"}, 404, "unknown meter"),
    ({**DAY, "meter": BOILER}, 422, "is not a meter"),
    ({"site": "nowhere", "since": DAY["since"], "until": DAY["until"]}, 404, "unknown site"),
    ({**DAY, "site": "plant1"}, 422, "exactly one of"),
    ({"since": DAY["since"], "until": DAY["until"]}, 422, "exactly one of"),
    ({**DAY, "until": "2026-03-28T00:00:00Z"}, 422, "'until' must be after 'since'"),
    ({**DAY, "until": DAY["since"]}, 422, "'until' must be after 'since'"),
    ({**DAY, "until": "2027-01-01T00:00:00Z"}, 422, "in the future"),
    ({**DAY, "since": "yesterday"}, 422, "datetime"),
    ({**DAY, "meter": 5}, 422, "string"),
    ({**DAY, "total": "1.00"}, 422, "Extra inputs"),
    ({**DAY, "since": "2025-12-01T00:00:00Z", "until": "2025-12-02T00:00:00Z"}, 422, "no tariff"),
    ({**DAY, "since": "2025-12-31T23:00:00Z"}, 422, "has no tariff"),
])
async def test_bad_close_requests_change_nothing(api: httpx.AsyncClient, db: Database,
                                                 body: dict[str, Any], status: int, message: str) -> None:
    await whole_day(api)
    before = await rows(db)
    r = await api.post("/api/v1/statements", json=body)
    assert r.status_code == status, r.text
    assert message in r.text
    assert await rows(db) == before


async def test_unknown_statement_404(api: httpx.AsyncClient, db: Database) -> None:
    before = await rows(db)
    for method, path in [("GET", "ST-2026-000009"), ("GET", "ST-2026-000009.html"), ("GET", "ST-2026-000009.pdf"),
                         ("POST", "ST-2026-000009/send"), ("GET", "nonsense")]:
        r = await api.request(method, f"/api/v1/statements/{path}")
        assert r.status_code == 404, (path, r.text)
        assert "unknown statement" in r.json()["detail"]
    assert (await api.get("/api/v1/statements", params={"meter": "a", "site": "b"})).status_code == 422
    assert await rows(db) == before


async def test_concurrent_closes_never_share_a_number(api: httpx.AsyncClient) -> None:
    await whole_day(api)
    # 8 different days, each asked for 3 times at once: 8 statements numbered 1..8, 16 refusals.
    days = [(f"2026-04-{d:02d}T00:00:00Z", f"2026-04-{d + 1:02d}T00:00:00Z") for d in range(1, 9)]
    bodies = [{"meter": METER, "since": s, "until": u} for s, u in days for _ in range(3)]
    answers = await asyncio.gather(*(api.post("/api/v1/statements", json=b) for b in bodies))
    assert sorted(r.status_code for r in answers) == [201] * 8 + [409] * 16, [r.text for r in answers]
    numbers = sorted(r.json()["number"] for r in answers if r.status_code == 201)
    assert numbers == [f"ST-2026-{n:06d}" for n in range(1, 9)]


# -- e-mail ----------------------------------------------------------------------------------------

async def test_send_statement_to_the_supplier(db: Database, smtp: Mailbox) -> None:
    async with client(db, smtp=SmtpConfig(port=smtp.port, sender="hub@plant1.example")) as api:
        await whole_day(api)
        assert (await api.post("/api/v1/statements", json=DAY)).status_code == 201
        r = await api.post("/api/v1/statements/ST-2026-000001/send")
        assert r.status_code == 200, r.text
        assert (r.json()["sent_at"], r.json()["send_attempts"], r.json()["send_error"]) == (
            "2026-11-01T00:00:00.000Z", 1, "")
    [(sender, rcpt, msg)] = smtp.messages
    assert (sender, rcpt, msg["To"]) == ("hub@plant1.example", ["alex@azzotto.com"], "alex@azzotto.com")
    assert "ST-2026-000001" in msg["Subject"] and "60.48 GBP" in msg["Subject"]
    html = msg.get_body(("html",))
    assert html is not None
    body = html.get_content()
    for text in ("ST-2026-000001", "60.48 GBP", "57.60", "2.88", "51.00", "6.00", "0.60"):
        assert text in body
    [attachment] = list(msg.iter_attachments())
    assert (attachment.get_content_type(), attachment.get_filename()) == ("application/pdf", "ST-2026-000001.pdf")
    pdf = attachment.get_content()
    assert pdf.startswith(b"%PDF")
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    assert "ST-2026-000001" in text and "60.48 GBP" in text


async def test_send_on_close_to_a_configured_supplier(db: Database, smtp: Mailbox) -> None:
    billing = BillingConfig(supplier_email="billing@supplier.example", send_on_close=True)
    async with client(db, smtp=SmtpConfig(port=smtp.port), billing=billing) as api:
        await whole_day(api)
        r = await api.post("/api/v1/statements", json=DAY)
        assert r.status_code == 201 and r.json()["sent_at"] is not None
    assert [rcpt for _, rcpt, _ in smtp.messages] == [["billing@supplier.example"]]


async def test_send_is_retried_and_failure_recorded(db: Database) -> None:
    billing = BillingConfig(send_attempts=3, send_retry_s=0.01)
    async with client(db, smtp=SmtpConfig(port=free_port(), timeout_s=2), billing=billing) as api:  # nobody there
        await whole_day(api)
        assert (await api.post("/api/v1/statements", json=DAY)).status_code == 201
        r = await api.post("/api/v1/statements/ST-2026-000001/send")
        assert r.status_code == 502 and "failed" in r.json()["detail"]
        s = (await api.get("/api/v1/statements/ST-2026-000001")).json()
        assert (s["sent_at"], s["send_attempts"], s["status"]) == (None, 3, "issued")
        assert "Connection" in s["send_error"] or "refused" in s["send_error"]


# -- payments --------------------------------------------------------------------------------------

def stripe_config(api_base: str = "http://127.0.0.1:9") -> PaymentsConfig:
    return PaymentsConfig(provider="stripe", stripe_secret_key="sk_test_hub", stripe_webhook_secret=WHSEC,  # type: ignore[arg-type]
                          stripe_api_base=api_base, success_url="https://hub.example/paid/{number}",
                          cancel_url="https://hub.example/cancelled/{number}")


async def test_payments_off_by_default_503(api: httpx.AsyncClient, db: Database) -> None:
    await whole_day(api)
    assert (await api.post("/api/v1/statements", json=DAY)).status_code == 201
    before = await rows(db)
    r = await api.post("/api/v1/statements/ST-2026-000001/checkout")
    assert r.status_code == 503 and "not configured" in r.json()["detail"]
    r = await api.post("/api/v1/payments/stripe/webhook", content=b"{}")
    assert r.status_code == 503
    assert await rows(db) == before


async def test_checkout_session_for_a_statement(db: Database, fake_stripe: FakeStripe) -> None:
    async with client(db, payments=stripe_config(fake_stripe.url)) as api:
        await whole_day(api)
        assert (await api.post("/api/v1/statements", json=DAY)).status_code == 201
        r = await api.post("/api/v1/statements/ST-2026-000001/checkout")
        assert r.status_code == 200, r.text
        assert r.json() == {"number": "ST-2026-000001", "provider": "stripe", "id": "cs_test_123",
                            "url": "https://checkout.stripe.com/c/pay/cs_test_123"}
        assert (await api.post("/api/v1/statements/ST-2026-000009/checkout")).status_code == 404
    [(method, path, headers, form)] = fake_stripe.requests
    assert (method, path) == ("POST", "/v1/checkout/sessions")
    assert headers["Authorization"] == "Bearer sk_test_hub"
    # total 60.48 GBP = 6048 pence
    assert {k: v[0] for k, v in form.items()} == {
        "mode": "payment", "client_reference_id": "ST-2026-000001", "metadata[statement]": "ST-2026-000001",
        "success_url": "https://hub.example/paid/ST-2026-000001",
        "cancel_url": "https://hub.example/cancelled/ST-2026-000001",
        "line_items[0][quantity]": "1", "line_items[0][price_data][currency]": "gbp",
        "line_items[0][price_data][unit_amount]": "6048",
        "line_items[0][price_data][product_data][name]": "Statement ST-2026-000001",
        "line_items[0][price_data][product_data][description]": f"{METER}, 2026-03-29 to 2026-03-29"}


def stripe_event(number: str, amount: int = 6048, event_id: str = "evt_1", currency: str = "gbp",
                 kind: str = "checkout.session.completed") -> bytes:
    return json.dumps({
        "id": event_id, "object": "event", "type": kind, "api_version": "2024-06-20", "created": int(time.time()),
        "data": {"object": {"id": "cs_test_123", "object": "checkout.session", "client_reference_id": number,
                            "metadata": {"statement": number}, "amount_total": amount, "currency": currency,
                            "payment_status": "paid", "status": "complete"}}}).encode()


def sign(payload: bytes, secret: str = WHSEC, at: int | None = None) -> dict[str, str]:
    """Stripe's scheme: ``t=<unix time>,v1=<hex HMAC-SHA256 of "t.payload" with the secret>``."""
    t = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={t},v1={mac}", "Content-Type": "application/json"}


async def test_stripe_webhook_marks_paid_idempotently(db: Database) -> None:
    async with client(db, payments=stripe_config()) as api:
        await whole_day(api)
        assert (await api.post("/api/v1/statements", json=DAY)).status_code == 201
        hook = "/api/v1/payments/stripe/webhook"
        payload = stripe_event("ST-2026-000001")

        # refused, nothing changes: tampered body, wrong secret, too old, no signature, not JSON
        before = await rows(db)
        tampered = payload.replace(b"6048", b"6049")
        old = int(time.time()) - 301
        for body, headers in [(tampered, sign(payload)), (payload, sign(payload, "whsec_other")),
                              (payload, sign(payload, at=old)), (payload, {}), (b"nope", sign(b"nope"))]:
            r = await api.post(hook, content=body, headers=headers)
            assert r.status_code == 400, r.text
        assert await rows(db) == before

        r = await api.post(hook, content=payload, headers=sign(payload))
        assert r.status_code == 200, r.text
        assert r.json() == {"received": True, "event": "checkout.session.completed", "statement": "ST-2026-000001",
                            "recorded": True, "status": "paid"}
        s = (await api.get("/api/v1/statements/ST-2026-000001")).json()
        assert (s["status"], s["paid_at"]) == ("paid", "2026-11-01T00:00:00.000Z")
        # the same event again (Stripe retries): 200, still one payment
        r = await api.post(hook, content=payload, headers=sign(payload))
        assert r.status_code == 200 and r.json()["recorded"] is False
        with db.activate():
            payments = await bm.Payment.all().values("event_id", "amount", "currency", "reference")
        assert [(p["event_id"], Decimal(p["amount"]), p["currency"], p["reference"]) for p in payments] == [
            ("evt_1", Decimal("60.48"), "GBP", "cs_test_123")]
        # a paid statement offers no checkout
        assert (await api.post("/api/v1/statements/ST-2026-000001/checkout")).status_code == 409

        # an unknown statement is acknowledged (Stripe would retry for days) and changes nothing
        before = await rows(db)
        other = stripe_event("ST-2026-000777", event_id="evt_2")
        r = await api.post(hook, content=other, headers=sign(other))
        assert r.status_code == 200 and r.json()["recorded"] is False
        # other event types are acknowledged and ignored
        ignored = stripe_event("ST-2026-000001", event_id="evt_3", kind="payment_intent.created")
        r = await api.post(hook, content=ignored, headers=sign(ignored))
        assert r.status_code == 200 and r.json()["statement"] is None
        assert await rows(db) == before


async def test_payment_of_another_amount_does_not_pay(db: Database) -> None:
    async with client(db, payments=stripe_config()) as api:
        await whole_day(api)
        assert (await api.post("/api/v1/statements", json=DAY)).status_code == 201
        payload = stripe_event("ST-2026-000001", amount=100)
        r = await api.post("/api/v1/payments/stripe/webhook", content=payload, headers=sign(payload))
        assert r.status_code == 200 and (r.json()["recorded"], r.json()["status"]) == (True, "issued")
        assert (await api.get("/api/v1/statements/ST-2026-000001")).json()["status"] == "issued"


def test_payments_config() -> None:
    from hub.config import parse_config
    from protocol.tomlconfig import ConfigError
    cfg = parse_config("")
    assert (cfg.payments.provider, cfg.billing.supplier_email) == ("none", "alex@azzotto.com")
    with pytest.raises(ConfigError, match="stripe_secret_key"):
        parse_config('[payments]\nprovider = "stripe"\n')
    with pytest.raises(ConfigError, match="supplier_email"):
        parse_config('[billing]\nsupplier_email = "nobody"\n')
    cfg = parse_config('[payments]\nprovider = "stripe"\nstripe_secret_key = "sk_test_x"\n'
                       'stripe_webhook_secret = "whsec_x"\n')
    assert cfg.payments.stripe_secret_key is not None and "sk_test" not in repr(cfg.payments)


async def test_database_refuses_to_change_a_statement(api: httpx.AsyncClient, db: Database) -> None:
    await whole_day(api)
    assert (await api.post("/api/v1/statements", json=DAY)).status_code == 201
    before = await rows(db)
    with db.activate():
        for sql in ['UPDATE "statement" SET "total" = 1', 'UPDATE "statement" SET "document" = \'{}\'',
                    'UPDATE "statement" SET "status" = \'void\'', 'DELETE FROM "statement"']:
            with pytest.raises(Exception, match=r"immutable|deleted|issued to paid"):
                await db.conn.execute_script(sql)
    assert await rows(db) == before
    with db.activate():  # what may change: payment status, e-mail bookkeeping
        await bm.Statement.filter(number="ST-2026-000001").update(status="paid", paid_ms=1, send_attempts=2)
        with pytest.raises(Exception, match="issued to paid"):
            await db.conn.execute_script('UPDATE "statement" SET "status" = \'issued\'')


async def test_checkout_when_stripe_cannot_be_reached_502(db: Database) -> None:
    async with client(db, payments=stripe_config(f"http://127.0.0.1:{free_port()}")) as api:  # nobody there
        await whole_day(api)
        assert (await api.post("/api/v1/statements", json=DAY)).status_code == 201
        before = await rows(db)
        r = await api.post("/api/v1/statements/ST-2026-000001/checkout")
        assert r.status_code == 502 and "Stripe" in r.json()["detail"]
        assert await rows(db) == before
