"""Statements: a billing period of a meter or a site closed into an immutable, numbered document
(``docs/billing.md``, "Statements").

* The figures are those of :func:`hub.billing.service.meter_cost` (the ``/cost`` endpoint) for the
  same period; a site statement lists the lines of each of its meters, with VAT computed once per
  rate on the sum of all lines at that rate.
* Numbers are ``ST-<year>-<6 digits>``, gap-free per hub and year: the counter row is incremented in
  the same transaction that stores the statement (the row lock serialises concurrent closes, and a
  failed close gives its number back by rolling back).
* The document is canonical JSON stored with its SHA-256 (``content_hash``); only the status
  (``issued`` → ``paid``) and the e-mail bookkeeping change afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

from tortoise.exceptions import IntegrityError
from tortoise.expressions import F
from tortoise.transactions import in_transaction

from hub.billing import models as m
from hub.billing import money
from hub.billing.config import BillingConfig
from hub.billing.cost import Bill
from hub.billing.service import BillingError, is_meter, meter_assignments, meter_cost, plain
from hub.billing.tariffs import timeline
from hub.db import Database
from hub.models import Device, Site
from hub.queries import DeviceRow, find_device

NUMBER_PREFIX = "ST"


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def statement_number(year: int, n: int) -> str:
    """``ST-2026-000001``."""
    return f"{NUMBER_PREFIX}-{year}-{n:06d}"


def canonical(document: dict[str, Any]) -> str:
    """The JSON text the content hash is taken of (sorted keys, no spaces)."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(document: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``document``."""
    return hashlib.sha256(canonical(document).encode()).hexdigest()


@dataclass
class StatementRecord:
    """A stored statement: the immutable document plus its mutable bookkeeping."""

    number: str
    document: dict[str, Any]
    content_hash: str
    status: str
    paid_ms: int | None
    sent_ms: int | None
    send_attempts: int
    send_error: str

    @property
    def total(self) -> Decimal:
        return Decimal(self.document["total"])

    @property
    def currency(self) -> str:
        return str(self.document["currency"])


def _record(row: m.Statement) -> StatementRecord:
    return StatementRecord(row.number, json.loads(row.document), row.content_hash, row.status, row.paid_ms,
                           row.sent_ms, row.send_attempts, row.send_error)


def _lines(meter: str, b: Bill, currency: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for e in b.energy:
        out.append({"kind": "energy", "meter": meter, "tariff": e.tariff.name, "band": e.band.name,
                    "quantity": str(money.kwh(e.kwh)), "unit": "kWh", "rate": plain(e.band.rate),
                    "vat_rate": plain(e.tariff.vat_rate), "amount": money.fmt(e.amount, currency)})
    for s in b.standing:
        out.append({"kind": "standing_charge", "meter": meter, "tariff": s.tariff.name, "band": None,
                    "quantity": str(money.round_fraction(s.days, 4)), "unit": "day",
                    "rate": plain(s.tariff.standing_charge_per_day), "vat_rate": plain(s.tariff.vat_rate),
                    "amount": money.fmt(s.amount, currency)})
    return out


def build_document(number: str, scope: str, target: str, site: str, since_ms: int, until_ms: int,
                   bills: list[tuple[str, Bill]], issued_ms: int, issuer: str, user: str) -> dict[str, Any]:
    """The statement document from the bills of its meters (pure; raises :class:`BillingError`)."""
    currencies = sorted({b.currency for _, b in bills if b.currency is not None})
    if not currencies:
        raise BillingError(422, "no tariff is in force in this period: there is nothing to bill")
    if len(currencies) > 1:
        raise BillingError(422, f"the tariffs in force use different currencies ({', '.join(currencies)})")
    currency = currencies[0]
    unpriced = [meter for meter, b in bills if b.unpriced_kwh > 0]
    if unpriced:
        raise BillingError(422, f"part of the period has no tariff for meter(s) {', '.join(unpriced)}; assign one "
                                "or close a shorter period")
    lines = [line for meter, b in bills for line in _lines(meter, b, currency)]
    if len(bills) == 1:  # exactly the figures of GET /meters/{id}/cost
        b = bills[0][1]
        vat = [(v.rate, v.net, v.amount) for v in b.vat]
        net, vat_total, total = b.net, b.vat_total, b.total
    else:
        nets: dict[Decimal, Decimal] = {}
        for line in lines:
            rate = Decimal(line["vat_rate"])
            nets[rate] = nets.get(rate, Decimal(0)) + Decimal(line["amount"])
        vat = [(r, nets[r], money.vat_amount(nets[r], r, currency)) for r in sorted(nets)]
        net = sum(nets.values(), Decimal(0))
        vat_total = sum((v[2] for v in vat), Decimal(0))
        total = net + vat_total
    kwh = sum((b.kwh for _, b in bills), Fraction(0))
    return {
        "number": number, "issuer": issuer, scope: target, "site": site, "meters": [meter for meter, _ in bills],
        "since": _iso(since_ms), "until": _iso(until_ms), "currency": currency,
        "consumption_kwh": str(money.kwh(kwh)), "lines": lines,
        "vat": [{"rate": plain(r), "net": money.fmt(n, currency), "amount": money.fmt(a, currency)}
                for r, n, a in vat],
        "net": money.fmt(net, currency), "vat_total": money.fmt(vat_total, currency),
        "total": money.fmt(total, currency), "issued_at": _iso(issued_ms), "issued_by": user,
    }


async def _site_meters(db: Database, site: str) -> list[DeviceRow]:
    with db.activate():
        rows = await Device.filter(gateway__site__name=site).order_by("gateway__name", "name").values(
            "name", "gateway__name")
    out = []
    for r in rows:
        dev = await find_device(db, f"{site}.{r['gateway__name']}.{r['name']}")
        if dev is not None and await is_meter(db, dev):
            out.append(dev)
    return out


async def close_period(db: Database, config: BillingConfig, scope: str, target: str, since_ms: int,
                       until_ms: int, now_ms: int, user: str) -> StatementRecord:
    """Close ``[since, until)`` of a meter (uid) or site (name) into a statement.

    404 unknown meter/site, 422 not a meter / bad period / nothing to bill, 409 the same or an
    overlapping period is already closed."""
    if until_ms <= since_ms:
        raise BillingError(422, "'until' must be after 'since'")
    if until_ms > now_ms:
        raise BillingError(422, "'until' is in the future: only a period that has ended can be closed")
    if scope == "meter":
        dev = await find_device(db, target)
        if dev is None:
            raise BillingError(404, f"unknown meter {target!r}")
        if not await is_meter(db, dev):
            raise BillingError(422, f"device {target!r} is not a meter")
        meters, site = [dev], dev.site
    else:
        meters, site = await _site_meters(db, target), target
        if not meters:
            with db.activate():
                known = await Site.filter(name=target).exists()
            raise BillingError(404 if not known else 422,
                               f"unknown site {target!r}" if not known else f"site {target!r} has no meters")
    key = f"{scope}:{target}"
    with db.activate():
        same = await m.Statement.get_or_none(target=key, since_ms=since_ms, until_ms=until_ms)
        if same is not None:
            raise BillingError(409, f"{scope} {target!r} already has statement {same.number} for this period")
    bills = []
    for dev in meters:
        covered = since_ms
        for period in timeline(await meter_assignments(db, dev), since_ms, until_ms):
            if period.start_ms > covered:
                break
            covered = max(covered, period.end_ms)
        if covered < until_ms:
            raise BillingError(422, f"meter {dev.uid} has no tariff from {_iso(covered)} in this period; "
                                    "assign one or close a shorter period")
        bills.append((dev.uid, (await meter_cost(db, dev, since_ms, until_ms, config)).bill))
    build_document("", scope, target, site, since_ms, until_ms, bills, now_ms, config.issuer, user)  # refusals first
    year = datetime.fromtimestamp(now_ms / 1000, UTC).year
    with db.activate():
        if not await m.StatementCounter.filter(year=year).exists():
            with contextlib.suppress(IntegrityError):  # another close created it a moment ago
                await m.StatementCounter.create(year=year, last_number=0)
        try:
            async with in_transaction(db.connection_name):
                # Takes the row lock until commit: closes are serialised from here on.
                await m.StatementCounter.filter(year=year).update(last_number=F("last_number") + 1)
                counter = await m.StatementCounter.get(year=year)
                overlap = m.Statement.filter(since_ms__lt=until_ms, until_ms__gt=since_ms)
                if scope == "meter":
                    overlap = overlap.filter(target__in=[key, f"site:{site}"])
                else:
                    overlap = overlap.filter(site=site)
                clash = await overlap.order_by("since_ms").first()
                if clash is not None:
                    what = "the same period" if (clash.target, clash.since_ms, clash.until_ms) == (
                        key, since_ms, until_ms) else f"{_iso(clash.since_ms)} .. {_iso(clash.until_ms)}"
                    raise BillingError(409, f"statement {clash.number} ({clash.target}) already covers {what}; "
                                            "a meter's periods may not overlap")
                number = statement_number(year, counter.last_number)
                document = build_document(number, scope, target, site, since_ms, until_ms, bills, now_ms,
                                          config.issuer, user)
                row = await m.Statement.create(
                    number=number, target=key, site=site, since_ms=since_ms, until_ms=until_ms,
                    currency=document["currency"], total=Decimal(document["total"]), document=canonical(document),
                    content_hash=content_hash(document), issued_ms=now_ms, issued_by=user)
        except IntegrityError:
            raise BillingError(409, f"{scope} {target!r} already has a statement for this period") from None
    return _record(row)


async def get_statement(db: Database, number: str) -> StatementRecord | None:
    """The statement ``number``."""
    with db.activate():
        row = await m.Statement.get_or_none(number=number)
    return _record(row) if row is not None else None


async def list_statements(db: Database, target: str | None = None) -> list[StatementRecord]:
    """Every statement (or those of one ``meter:<uid>``/``site:<name>``), by number."""
    with db.activate():
        q = m.Statement.all()
        if target is not None:
            q = q.filter(target=target)
        rows = await q.order_by("issued_ms", "number")
    return [_record(r) for r in rows]


async def record_send(db: Database, number: str, ok: bool, attempts: int, error: str, now_ms: int) -> None:
    """Write down how sending the statement went."""
    with db.activate():
        row = await m.Statement.get(number=number)
        await m.Statement.filter(id=row.id).update(
            send_attempts=row.send_attempts + attempts, send_error=error[:500],
            **({"sent_ms": now_ms} if ok else {}))


@dataclass(frozen=True)
class PaymentResult:
    """What a payment event did."""

    statement: str
    recorded: bool
    """False: the event was seen before (nothing changed)."""
    status: str


async def record_payment(db: Database, number: str, provider: str, event_id: str, reference: str,
                         amount: Decimal, currency: str, now_ms: int) -> PaymentResult | None:
    """Record a payment of statement ``number`` and mark it paid, once per ``(provider, event_id)``.
    ``None`` when the statement is unknown. A payment of another amount or currency is recorded but
    does not mark the statement paid."""
    with db.activate():
        row = await m.Statement.get_or_none(number=number)
        if row is None:
            return None
        if await m.Payment.filter(provider=provider, event_id=event_id).exists():
            return PaymentResult(number, False, row.status)
        matches = currency.upper() == row.currency and amount == Decimal(row.total)
        try:
            async with in_transaction(db.connection_name):
                await m.Payment.create(statement_id=row.id, provider=provider, event_id=event_id,
                                       reference=reference, amount=amount, currency=currency.upper(),
                                       created_ms=now_ms)
                if matches and row.status != "paid":
                    await m.Statement.filter(id=row.id).update(status="paid", paid_ms=now_ms)
        except IntegrityError:  # the same event delivered twice at once
            return PaymentResult(number, False, row.status)
        status = "paid" if matches else row.status
    return PaymentResult(number, True, status)
