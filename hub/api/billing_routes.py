"""Route handlers of billing: tariffs, tariff assignments, manual meter readings and the running cost
of a meter (``docs/billing.md``). The logic is in :mod:`hub.billing.service`.

Every refusal is a 4xx with ``{"detail": "..."}`` saying what is wrong, and changes nothing. A manual
reading refused as implausible also emits a ``human_error`` signal on the hub's signal bus (the alert
engine turns it into a "possible human error" alert).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query

from hub import queries
from hub.api.access import FIELD, STAFF, ActingUser, allow
from hub.api.app import ApiContext
from hub.api.billing_schemas import (
    AssignmentIn,
    AssignmentOut,
    BandOut,
    CostOut,
    EnergyLineOut,
    ManualReadingIn,
    ManualReadingOut,
    RegisterReadingOut,
    StandingLineOut,
    TariffIn,
    TariffOut,
    UnmeasuredOut,
    VatLineOut,
)
from hub.api.routes import Ctx
from hub.api.schemas import iso_ms, to_ms
from hub.billing import money, service
from hub.billing.consumption import RegisterReading, Source
from hub.billing.money import MoneyError
from hub.billing.service import AssignmentRecord, BillingError, ImplausibleReading, TariffRecord, plain
from hub.billing.tariffs import Band, Tariff, TariffError, hhmm, parse_hhmm
from hub.signals import Signal, SignalKind

router = APIRouter(prefix="/api/v1", tags=["billing"])

User = ActingUser
MAX_FUTURE_MS = 5 * 60_000
"""A manual reading may be dated at most this far ahead of the hub's clock."""


def _error(status: int, description: str, example: str) -> dict[int | str, dict[str, Any]]:
    return {status: {"description": description, "content": {"application/json": {"example": {"detail": example}}}}}


_METER_ERRORS = {**_error(404, "Unknown meter", "unknown meter 'plant1.gw1.nope'"),
                 **_error(422, "Not a meter, or invalid input", "device 'plant1.gw1.boiler1' is not a meter "
                                                                "(kind boiler, no energy_import readings)")}


def _raise(exc: BillingError) -> HTTPException:
    return HTTPException(exc.status, exc.message)


async def _meter_or_error(ctx: ApiContext, meter_id: str) -> queries.DeviceRow:
    dev = await queries.find_device(ctx.db, meter_id)
    if dev is None:
        raise HTTPException(404, f"unknown meter {meter_id!r}")
    if not await service.is_meter(ctx.db, dev):
        raise HTTPException(422, f"device {meter_id!r} is not a meter (kind {dev.kind}, no "
                                 f"{service.ENERGY_METRIC} readings)")
    return dev


# -- tariffs ---------------------------------------------------------------------------------------

def _tariff_out(t: TariffRecord) -> TariffOut:
    x = t.tariff
    return TariffOut(
        id=t.pk, name=x.name, currency=x.currency, timezone=x.timezone, vat_rate=plain(x.vat_rate),
        standing_charge_per_day=plain(x.standing_charge_per_day), effective_from=iso_ms(x.effective_from_ms),
        bands=[BandOut(name=b.name, rate=plain(b.rate), start=hhmm(b.start_minute), end=hhmm(b.end_minute),
                       days=b.days) for b in x.bands],
        created_at=iso_ms(t.created_ms), created_by=t.created_by)


@router.post("/tariffs", dependencies=[allow(*STAFF)], response_model=TariffOut, status_code=201, responses={
    **_error(409, "The name is taken", "a tariff named 'economy7' already exists; ..."),
    **_error(422, "Invalid tariff: overlapping or missing bands, unknown currency or time zone, floats",
             "bands 'day' and 'night' overlap on weekdays at 07:00")})
async def create_tariff(ctx: Ctx, body: TariffIn, user: User = "") -> TariffOut:
    """Create a tariff: currency, VAT rate, standing charge per local day, and bands of local time of
    day (in ``timezone``, e.g. ``Europe/London``; optionally weekday or weekend only) that together
    cover every minute of the week exactly once. A flat rate is one band without times. Tariffs are
    immutable: a price change is a new tariff assigned from the date it applies."""
    try:
        tariff = Tariff(
            name=body.name, currency=body.currency, timezone=body.timezone, vat_rate=body.vat_rate,
            standing_charge_per_day=body.standing_charge_per_day,
            bands=tuple(Band(b.name, b.rate, parse_hhmm(b.start) % 1440, parse_hhmm(b.end), b.days)
                        for b in body.bands),
            effective_from_ms=to_ms(body.effective_from), key=body.name).validate()
    except (TariffError, MoneyError) as exc:
        raise HTTPException(422, str(exc)) from None
    try:
        return _tariff_out(await service.create_tariff(ctx.db, tariff, ctx.clock(), user))
    except BillingError as exc:
        raise _raise(exc) from None


@router.get("/tariffs", dependencies=[allow(*STAFF)], response_model=list[TariffOut])
async def list_tariffs(ctx: Ctx) -> list[TariffOut]:
    """Every tariff, by name."""
    return [_tariff_out(t) for t in await service.list_tariffs(ctx.db)]


# -- assignments -----------------------------------------------------------------------------------

def _assignment_out(a: AssignmentRecord) -> AssignmentOut:
    return AssignmentOut(id=a.pk, tariff=a.tariff, meter=a.target if a.scope == "meter" else None,
                         site=a.target if a.scope == "site" else None, effective_from=iso_ms(a.effective_from_ms),
                         created_at=iso_ms(a.created_ms), created_by=a.created_by)


@router.post("/tariff-assignments",
    dependencies=[allow(*STAFF)], response_model=AssignmentOut, status_code=201, responses={
    **_error(404, "Unknown tariff, meter or site", "unknown tariff 'economy8'"),
    **_error(409, "The meter (site) already has an assignment from that instant",
             "meter 'plant1.gw1.meter1' already has a tariff assignment effective from that instant; ..."),
    **_error(422, "Not a meter, both or neither of meter and site, or before the tariff's effective_from",
             "give exactly one of 'meter' and 'site'")})
async def create_assignment(ctx: Ctx, body: AssignmentIn, user: User = "") -> AssignmentOut:
    """Assign a tariff to one meter or to every meter of a site from ``effective_from`` until the next
    assignment of the same meter (site). A meter's own assignment, once in force, beats its site's.
    A second assignment of the same meter (site) from the same instant is refused (409)."""
    tariff = await service.get_tariff(ctx.db, body.tariff)
    if tariff is None:
        raise HTTPException(404, f"unknown tariff {body.tariff!r}")
    if body.meter is not None:
        dev = await _meter_or_error(ctx, body.meter)
        scope, target, pk = "meter", dev.uid, dev.pk
    else:
        assert body.site is not None
        site_pk = await service.site_pk(ctx.db, body.site)
        if site_pk is None:
            raise HTTPException(404, f"unknown site {body.site!r}")
        scope, target, pk = "site", body.site, site_pk
    try:
        record = await service.create_assignment(ctx.db, tariff, scope, target, pk,  # type: ignore[arg-type]
                                                 to_ms(body.effective_from), ctx.clock(), user)
    except BillingError as exc:
        raise _raise(exc) from None
    return _assignment_out(record)


@router.get("/tariff-assignments",
    dependencies=[allow(*STAFF)], response_model=list[AssignmentOut], responses=_METER_ERRORS)
async def list_assignments(
    ctx: Ctx,
    meter: Annotated[str | None, Query(max_length=200, description="Only those that concern this meter "
                                                                   "(its own and its site's)")] = None,
) -> list[AssignmentOut]:
    """Tariff assignments by target and effective_from."""
    dev = await _meter_or_error(ctx, meter) if meter is not None else None
    return [_assignment_out(a) for a in await service.list_assignments(ctx.db, dev)]


# -- manual readings -------------------------------------------------------------------------------

def _register_out(r: RegisterReading) -> RegisterReadingOut:
    return RegisterReadingOut(value=f"{r.value:f}", ts=iso_ms(r.ts_ms), source=r.source.value,
                              replacement=r.replacement)


def _iso(ms: int) -> str:
    return iso_ms(ms) or str(ms)


@router.post("/meters/{meter_id}/readings",
    dependencies=[allow(*FIELD)], response_model=ManualReadingOut, status_code=201, responses={
    **_METER_ERRORS,
    **_error(409, "The meter already has a manual reading at that time",
             "meter 'plant1.gw1.meter1' already has a manual reading at that time"),
    422: {"description": "Invalid, or implausible (lower than the previous reading, more than the meter's rated "
                         "power allows since it, in the future); implausible readings raise a human-error alert",
          "content": {"application/json": {"example": {"detail": (
              "reading 1200 kWh is lower than the previous reading 1234.5 kWh of 2026-01-05T10:00:00.000Z; if the "
              "meter was replaced, submit it with \"replacement\": true")}}}}})
async def submit_reading(ctx: Ctx, meter_id: str, body: ManualReadingIn, user: User = "") -> ManualReadingOut:
    """Submit a reading of the meter's cumulative register (kWh) taken at ``ts``.

    Refused (422, nothing stored, and a ``human_error`` signal raised) when it is negative, beyond
    the register's range, dated in the future, lower than the previous reading (telemetry or manual)
    unless that is a plausible 32-bit rollover, higher than the meter's rated maximum power
    (``[billing] meter_max_power_kw``) allows since the previous reading, or inconsistent with a later
    reading. A reading marked ``replacement`` starts a new meter (``serial``) and is exempt from the
    comparison with earlier readings."""
    dev = await _meter_or_error(ctx, meter_id)
    now = ctx.clock()
    new = RegisterReading(to_ms(body.ts), body.value, Source.MANUAL, body.replacement, body.serial)
    try:
        if new.ts_ms > now + MAX_FUTURE_MS:
            raise ImplausibleReading(f"reading time {_iso(new.ts_ms)} is in the future (hub clock {_iso(now)})",
                                     "future", None)
        record = await service.add_manual_reading(ctx.db, dev, new, ctx.billing, now, user, _iso)
    except ImplausibleReading as exc:
        await ctx.signals.emit(Signal(
            kind=SignalKind.HUMAN_ERROR, ts_ms=now, message=f"manual reading of meter {dev.uid} refused: {exc.message}",
            site=dev.site, gateway=dev.gateway, device=dev.uid,
            details={"source": "manual_reading", "reason": exc.reason, "value": float(new.value),
                     "value_text": f"{new.value:f}",
                     "ts": _iso(new.ts_ms), "submitted_by": user,
                     **({"previous": f"{exc.previous.value:f}", "previous_ts": _iso(exc.previous.ts_ms)}
                        if exc.previous is not None else {})}))
        raise _raise(exc) from None
    except BillingError as exc:
        raise _raise(exc) from None
    return ManualReadingOut(
        id=record.pk, meter=dev.uid, value=f"{new.value:f}", ts=iso_ms(new.ts_ms), replacement=new.replacement,
        serial=new.serial, submitted_by=user, created_at=iso_ms(record.created_ms),
        previous=_register_out(record.previous) if record.previous is not None else None,
        consumption_kwh=str(money.kwh(record.consumption_kwh)) if record.consumption_kwh is not None else None)


# -- cost ------------------------------------------------------------------------------------------

@router.get("/meters/{meter_id}/cost", dependencies=[allow(*STAFF)], response_model=CostOut, responses=_METER_ERRORS)
async def meter_cost(
    ctx: Ctx,
    meter_id: str,
    since: Annotated[datetime, Query(description="ISO 8601, inclusive (no zone = UTC)")],
    until: Annotated[datetime | None, Query(description="ISO 8601, exclusive (no zone = UTC); default and "
                                                        "at most: now")] = None,
) -> CostOut:
    """Consumption and cost of the meter over ``[since, until)`` from its stored register readings
    (telemetry ``energy_import`` and manual readings): energy per tariff and band, standing charge,
    VAT and total, as decimal strings. A running total: it grows as readings arrive. Energy between
    two readings is spread linearly over the time between them; consumption after the newest
    reading is not known yet (``measured_until``)."""
    now = ctx.clock()
    since_ms = to_ms(since)
    until_ms = min(to_ms(until), now) if until is not None else now
    if until is not None and to_ms(until) < since_ms:
        raise HTTPException(422, "'until' is before 'since'")
    if since_ms > now:
        raise HTTPException(422, "'since' is in the future")
    dev = await _meter_or_error(ctx, meter_id)
    try:
        result = await service.meter_cost(ctx.db, dev, since_ms, until_ms, ctx.billing)
    except BillingError as exc:
        raise _raise(exc) from None
    b, series = result.bill, result.series
    cur = b.currency

    def amount(d: Decimal) -> str:
        return money.fmt(d, cur) if cur is not None else f"{d:f}"

    covering = [iv for iv in series.intervals if iv.start_ms < until_ms and iv.end_ms > since_ms]
    return CostOut(
        meter=dev.uid, since=iso_ms(since_ms), until=iso_ms(until_ms), currency=cur,
        consumption_kwh=str(money.kwh(b.kwh)), unpriced_kwh=str(money.kwh(b.unpriced_kwh)),
        measured_from=iso_ms(max(covering[0].start_ms, since_ms)) if covering else None,
        measured_until=iso_ms(min(covering[-1].end_ms, until_ms)) if covering else None,
        readings=len(series.readings), duplicates=series.duplicates, conflicts=len(series.conflicts),
        energy=[EnergyLineOut(tariff=e.tariff.name, band=e.band.name, kwh=str(money.kwh(e.kwh)),
                              rate=plain(e.band.rate), amount=amount(e.amount)) for e in b.energy],
        standing_charge=[StandingLineOut(tariff=s.tariff.name, days=str(money.round_fraction(s.days, 4)),
                                         rate_per_day=plain(s.tariff.standing_charge_per_day),
                                         amount=amount(s.amount)) for s in b.standing],
        vat=[VatLineOut(rate=plain(v.rate), net=amount(v.net), amount=amount(v.amount)) for v in b.vat],
        net=amount(b.net), vat_total=amount(b.vat_total), total=amount(b.total),
        unmeasured=[UnmeasuredOut(start=iso_ms(iv.start_ms), end=iso_ms(iv.end_ms), kind=iv.kind.value)
                    for iv in b.unmeasured])

