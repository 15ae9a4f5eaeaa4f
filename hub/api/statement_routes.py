"""Route handlers of statements and payments (``docs/billing.md``, "Statements", "Payments").

Statements are closed, listed, rendered (JSON, HTML, PDF), e-mailed to the supplier and paid
through the configured payment provider; they are never changed (there is no update endpoint).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hub.api.access import STAFF, ActingUser, allow, public
from hub.api.app import ApiContext
from hub.api.routes import Ctx
from hub.api.schemas import iso_ms, to_ms
from hub.billing import mail, statements
from hub.billing.payments import PaymentError, PaymentProvider, StatementToPay, WebhookError, provider_for
from hub.billing.render import render_html, render_pdf
from hub.billing.service import BillingError
from hub.billing.statements import StatementRecord
from protocol.logs import get_logger

log = get_logger("hub.api.statements")

router = APIRouter(prefix="/api/v1", tags=["statements"])

MAX_NUMBER_LENGTH = 32
"""``statement.number`` is a 32-character column."""

User = ActingUser
Number = Annotated[str, Field(pattern=r"^ST-\d{4}-\d{6}$")]


class StatementIn(BaseModel):
    """Body of ``POST /api/v1/statements``: exactly one of ``meter`` and ``site``, a past period."""

    model_config = ConfigDict(extra="forbid")

    meter: Annotated[str, Field(max_length=200)] | None = Field(default=None, examples=["plant1.gw1.meter1"])
    site: Annotated[str, Field(max_length=64)] | None = None
    since: datetime = Field(description="ISO 8601, inclusive (no zone = UTC)")
    until: datetime = Field(description="ISO 8601, exclusive (no zone = UTC); not after now")
    send: bool | None = Field(default=None, description="E-mail it to the supplier now (default: "
                                                        "[billing] send_on_close)")

    @model_validator(mode="after")
    def _one_target(self) -> StatementIn:
        if (self.meter is None) == (self.site is None):
            raise ValueError("give exactly one of 'meter' and 'site'")
        return self


class LineOut(BaseModel):
    """A line item: energy of a band (kWh × rate) or a standing charge (days × rate), before VAT."""

    kind: str
    meter: str
    tariff: str
    band: str | None
    quantity: str
    unit: str
    rate: str
    vat_rate: str
    amount: str


class StatementVatOut(BaseModel):
    """VAT at one rate on the sum of the lines at that rate."""

    rate: str
    net: str
    amount: str


class StatementOut(BaseModel):
    """A statement: the issued document (immutable) and its status."""

    number: str
    issuer: str
    meter: str | None = None
    site: str
    meters: list[str]
    since: str
    until: str
    currency: str
    consumption_kwh: str
    lines: list[LineOut]
    vat: list[StatementVatOut]
    net: str
    vat_total: str
    total: str
    issued_at: str
    issued_by: str
    content_hash: str
    status: str
    paid_at: str | None
    sent_at: str | None
    send_attempts: int
    send_error: str


class CheckoutOut(BaseModel):
    """A hosted checkout page for a statement."""

    number: str
    provider: str
    id: str
    url: str


class WebhookOut(BaseModel):
    """What a webhook did."""

    received: bool = True
    event: str
    statement: str | None = None
    recorded: bool = False
    status: str | None = None


def _error(status: int, description: str, example: str) -> dict[int | str, dict[str, Any]]:
    return {status: {"description": description, "content": {"application/json": {"example": {"detail": example}}}}}


_NOT_FOUND = _error(404, "Unknown statement", "unknown statement 'ST-2026-000099'")


def _out(s: StatementRecord) -> StatementOut:
    d = s.document
    return StatementOut(**{k: v for k, v in d.items() if k in StatementOut.model_fields}, content_hash=s.content_hash,
                        status=s.status, paid_at=iso_ms(s.paid_ms), sent_at=iso_ms(s.sent_ms),
                        send_attempts=s.send_attempts, send_error=s.send_error)


async def _statement(ctx: ApiContext, number: str) -> StatementRecord:
    # Longer than the column cannot exist (and Tortoise refuses such a filter value with an error).
    s = await statements.get_statement(ctx.db, number) if len(number) <= MAX_NUMBER_LENGTH else None
    if s is None:
        raise HTTPException(404, f"unknown statement {number!r}")
    return s


async def _send(ctx: ApiContext, s: StatementRecord) -> StatementRecord:
    html = render_html(s.document, s.status, s.content_hash)
    pdf = await asyncio.to_thread(render_pdf, s.document, s.status, s.content_hash)
    msg = mail.build_message(s.document, html, pdf, ctx.smtp.sender, ctx.billing.supplier_email)
    result = await mail.send(ctx.smtp, msg, ctx.billing.send_attempts, ctx.billing.send_retry_s)
    await statements.record_send(ctx.db, s.number, result.ok, result.attempts, result.error, ctx.clock())
    return await _statement(ctx, s.number)


@router.post("/statements", dependencies=[allow(*STAFF)], response_model=StatementOut, status_code=201, responses={
    **_error(404, "Unknown meter or site", "unknown meter 'plant1.gw1.nope'"),
    **_error(409, "The period (or an overlapping one) is already closed",
             "statement ST-2026-000001 (meter:plant1.gw1.meter1) already covers the same period; ..."),
    **_error(422, "Not a meter, bad period, no tariff in force", "no tariff is in force in this period: ...")})
async def close_statement(ctx: Ctx, body: StatementIn, user: User = "") -> StatementOut:
    """Close a billing period of a meter or a site into an immutable statement numbered
    ``ST-<year>-<000001>`` (gap-free per hub and year). The figures equal ``GET /meters/{id}/cost``
    for the same period. Closing the same period again, or one overlapping a closed period of the
    same meter, is refused (409)."""
    scope, target = ("meter", body.meter) if body.meter is not None else ("site", body.site)
    assert target is not None
    try:
        s = await statements.close_period(ctx.db, ctx.billing, scope, target, to_ms(body.since), to_ms(body.until),
                                          ctx.clock(), user)
    except BillingError as exc:
        raise HTTPException(exc.status, exc.message) from None
    log.info("statement_issued", statement=s.number, target=f"{scope}:{target}", total=s.document["total"],
             currency=s.currency)
    if body.send if body.send is not None else ctx.billing.send_on_close:
        s = await _send(ctx, s)
    return _out(s)


@router.get("/statements", dependencies=[allow(*STAFF)], response_model=list[StatementOut])
async def list_statements(
    ctx: Ctx,
    meter: Annotated[str | None, Query(max_length=200)] = None,
    site: Annotated[str | None, Query(max_length=64)] = None,
) -> list[StatementOut]:
    """Statements in the order they were issued (optionally of one meter or one site)."""
    if meter is not None and site is not None:
        raise HTTPException(422, "give at most one of 'meter' and 'site'")
    target = f"meter:{meter}" if meter is not None else f"site:{site}" if site is not None else None
    return [_out(s) for s in await statements.list_statements(ctx.db, target)]


@router.get("/statements/{number}.html", dependencies=[allow(*STAFF)], response_class=Response, responses={
    200: {"content": {"text/html": {}}, "description": "The statement as an HTML page"}, **_NOT_FOUND})
async def statement_html(ctx: Ctx, number: str) -> Response:
    """The statement as an HTML page."""
    s = await _statement(ctx, number)
    return Response(render_html(s.document, s.status, s.content_hash), media_type="text/html; charset=utf-8")


@router.get("/statements/{number}.pdf", dependencies=[allow(*STAFF)], response_class=Response, responses={
    200: {"content": {"application/pdf": {}}, "description": "The statement as a PDF"}, **_NOT_FOUND})
async def statement_pdf(ctx: Ctx, number: str) -> Response:
    """The statement as a PDF document."""
    s = await _statement(ctx, number)
    pdf = await asyncio.to_thread(render_pdf, s.document, s.status, s.content_hash)
    return Response(pdf, media_type="application/pdf",
                    headers={"Content-Disposition": f'inline; filename="{s.number}.pdf"'})


@router.get("/statements/{number}", dependencies=[allow(*STAFF)], response_model=StatementOut, responses=_NOT_FOUND)
async def get_statement(ctx: Ctx, number: str) -> StatementOut:
    """One statement as JSON."""
    return _out(await _statement(ctx, number))


@router.post("/statements/{number}/send", dependencies=[allow(*STAFF)], response_model=StatementOut, responses={
    **_NOT_FOUND, **_error(502, "The SMTP server did not take the message after every try",
                           "sending statement ST-2026-000001 failed after 3 attempt(s): ...")})
async def send_statement(ctx: Ctx, number: str) -> StatementOut:
    """E-mail the statement to the supplier (``[billing] supplier_email``) through ``[alerts.smtp]``:
    HTML body, PDF attached, retried; ``sent_at`` and ``send_attempts`` record it. May be repeated."""
    s = await _send(ctx, await _statement(ctx, number))
    if s.sent_ms is None or s.send_error:
        raise HTTPException(502, f"sending statement {number} failed: {s.send_error}")
    return _out(s)


def _provider(ctx: ApiContext) -> PaymentProvider:
    provider = provider_for(ctx.payments)
    if provider is None:
        raise HTTPException(503, "payments are not configured on this hub ([payments] provider = \"none\")")
    return provider


@router.post("/statements/{number}/checkout", dependencies=[allow(*STAFF)], response_model=CheckoutOut, responses={
    **_NOT_FOUND, **_error(409, "Already paid", "statement ST-2026-000001 is already paid"),
    **_error(502, "The payment provider refused or could not be reached", "Stripe refused the checkout: ..."),
    **_error(503, "Payments are not configured", "payments are not configured on this hub ...")})
async def checkout(ctx: Ctx, number: str) -> CheckoutOut:
    """Open a hosted checkout (Stripe Checkout) for the statement's total; pay at ``url``."""
    provider = _provider(ctx)
    s = await _statement(ctx, number)
    if s.status == "paid":
        raise HTTPException(409, f"statement {number} is already paid")
    d = s.document
    target = d.get("meter") or f"site {d['site']}"
    try:
        session = await asyncio.to_thread(provider.create_checkout, StatementToPay(
            s.number, s.total, s.currency, f"{target}, {d['since'][:10]} to {d['until'][:10]}"))
    except PaymentError as exc:
        raise HTTPException(502, str(exc)) from None
    return CheckoutOut(number=s.number, provider=provider.name, id=session.id, url=session.url)


@router.post("/payments/stripe/webhook",
    dependencies=[public("authenticated by the provider's webhook signature")],
    response_model=WebhookOut, tags=["payments"], responses={
    **_error(400, "Bad or stale signature, not an event", "signature verification failed: ..."),
    **_error(503, "Stripe is not configured", "payments are not configured on this hub ...")})
async def stripe_webhook(ctx: Ctx, request: Request) -> WebhookOut:
    """Stripe webhook: verifies ``Stripe-Signature`` with the endpoint secret and, on
    ``checkout.session.completed`` with ``payment_status`` ``paid``, records the payment and marks the
    statement (``client_reference_id``) paid. Idempotent: an event delivered again answers 200 and
    changes nothing. An unknown statement is logged and answered 200 (retrying would not help).
    Other event types are acknowledged and ignored."""
    provider = _provider(ctx)
    if provider.name != "stripe":
        raise HTTPException(503, "the configured payment provider is not Stripe")
    payload = await request.body()
    try:
        event = provider.parse_webhook(payload, dict(request.headers))
    except WebhookError as exc:
        log.warning("webhook_refused", provider="stripe", error=str(exc))
        raise HTTPException(400, str(exc)) from None
    if not event.paid or event.statement is None or event.amount is None or event.currency is None:
        return WebhookOut(event=event.type, statement=event.statement)
    result = await statements.record_payment(ctx.db, event.statement, "stripe", event.id, event.reference,
                                             event.amount, event.currency, ctx.clock())
    if result is None:
        log.warning("payment_for_unknown_statement", provider="stripe", event_id=event.id, statement=event.statement)
        return WebhookOut(event=event.type, statement=event.statement)
    if result.recorded and result.status != "paid":
        log.warning("payment_does_not_match", statement=event.statement, amount=str(event.amount),
                    currency=event.currency)
    log.info("payment_received", provider="stripe", event_id=event.id, statement=event.statement,
             recorded=result.recorded, status=result.status)
    return WebhookOut(event=event.type, statement=result.statement, recorded=result.recorded, status=result.status)
