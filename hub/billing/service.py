"""Billing on the database: tariffs, assignments and manual readings stored and checked, and the
cost of a meter computed from its stored readings. The API (``hub/api/billing_routes.py``) is a thin
layer over this module; the arithmetic is in the pure modules.

Errors are :class:`BillingError` with an HTTP status and a message for the person who made them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from hub.billing import models as m
from hub.billing.config import BillingConfig
from hub.billing.consumption import Kind, RegisterReading, Series, Source, delta, intervals, plausible_max_kwh
from hub.billing.cost import Bill, CostError, bill
from hub.billing.tariffs import Assignment, Band, Scope, Tariff, timeline
from hub.db import Database
from hub.errors import RequestRefused
from hub.models import Reading, Site
from hub.queries import DeviceRow

ENERGY_METRIC = "energy_import"
"""The cumulative register metric of a meter (kWh)."""
MAX_COST_RANGE_MS = 367 * 86_400_000
"""Longest range one cost request may cover."""


class BillingError(RequestRefused):
    """A request billing refuses (``status``, ``message``: see :class:`RequestRefused`)."""


class ImplausibleReading(BillingError):
    """A manual reading refused as a probable human error (the caller raises an alert)."""

    def __init__(self, message: str, reason: str, previous: RegisterReading | None) -> None:
        super().__init__(422, message)
        self.reason = reason
        self.previous = previous


def plain(d: Decimal) -> str:
    """A decimal without exponent or trailing zeros: ``0.300000`` -> ``0.3``, ``10`` -> ``10``."""
    return format(d.normalize(), "f")


# -- tariffs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TariffRecord:
    """A stored tariff."""

    pk: int
    tariff: Tariff
    created_ms: int
    created_by: str


def _tariff(row: m.Tariff, bands: Sequence[m.TariffBand]) -> Tariff:
    return Tariff(
        name=row.name, currency=row.currency, timezone=row.timezone, vat_rate=Decimal(row.vat_rate),
        standing_charge_per_day=Decimal(row.standing_charge_per_day),
        bands=tuple(Band(b.name, Decimal(b.rate), b.start_minute, b.end_minute, b.days)  # type: ignore[arg-type]
                    for b in sorted(bands, key=lambda b: b.position)),
        effective_from_ms=row.effective_from_ms, key=row.name)


async def create_tariff(db: Database, tariff: Tariff, now_ms: int, user: str) -> TariffRecord:
    """Store a validated tariff; 409 when the name is taken."""
    with db.activate():
        if await m.Tariff.filter(name=tariff.name).exists():
            raise BillingError(409, f"a tariff named {tariff.name!r} already exists; tariffs are never changed, "
                                    "create one under a new name and assign it")
        try:
            async with in_transaction(db.connection_name):
                row = await m.Tariff.create(
                    name=tariff.name, currency=tariff.currency, timezone=tariff.timezone, vat_rate=tariff.vat_rate,
                    standing_charge_per_day=tariff.standing_charge_per_day,
                    effective_from_ms=tariff.effective_from_ms, created_ms=now_ms, created_by=user)
                for i, b in enumerate(tariff.bands):
                    await m.TariffBand.create(tariff_id=row.id, position=i, name=b.name, rate=b.rate,
                                              start_minute=b.start_minute, end_minute=b.end_minute, days=b.days)
        except IntegrityError:  # another request created the name a moment ago
            raise BillingError(409, f"a tariff named {tariff.name!r} already exists") from None
    stored = await get_tariff(db, tariff.name)
    assert stored is not None
    return stored


async def get_tariff(db: Database, name: str) -> TariffRecord | None:
    """The tariff called ``name``."""
    with db.activate():
        row = await m.Tariff.get_or_none(name=name)
        if row is None:
            return None
        bands = await m.TariffBand.filter(tariff_id=row.id)
    return TariffRecord(row.id, _tariff(row, bands), row.created_ms, row.created_by)


async def list_tariffs(db: Database) -> list[TariffRecord]:
    """Every tariff, by name."""
    with db.activate():
        rows = await m.Tariff.all().order_by("name")
        bands = await m.TariffBand.all()
    per: dict[int, list[m.TariffBand]] = {}
    for b in bands:
        per.setdefault(b.tariff_id, []).append(b)
    return [TariffRecord(r.id, _tariff(r, per.get(r.id, [])), r.created_ms, r.created_by) for r in rows]


# -- meters and assignments ------------------------------------------------------------------------

async def is_meter(db: Database, device: DeviceRow) -> bool:
    """A meter is a device of kind ``meter`` or one that reports ``energy_import``."""
    if device.kind == "meter":
        return True
    with db.activate():
        return await Reading.filter(device_id=device.pk, metric=ENERGY_METRIC).exists()


@dataclass(frozen=True)
class AssignmentRecord:
    """A stored assignment."""

    pk: int
    tariff: str
    scope: Scope
    target: str
    """Meter uid or site name."""
    effective_from_ms: int
    created_ms: int
    created_by: str


def _target(scope: Scope, name: str) -> str:
    return f"{scope}:{name}"


async def create_assignment(db: Database, tariff: TariffRecord, scope: Scope, target: str, target_pk: int,
                            effective_from_ms: int, now_ms: int, user: str) -> AssignmentRecord:
    """Assign ``tariff`` to a meter (device pk) or site (site pk) from ``effective_from_ms``."""
    if effective_from_ms < tariff.tariff.effective_from_ms:
        raise BillingError(422, f"tariff {tariff.tariff.name!r} is effective only from its effective_from; "
                                "the assignment cannot start earlier")
    key = _target(scope, target)
    with db.activate():
        if await m.TariffAssignment.filter(target=key, effective_from_ms=effective_from_ms).exists():
            raise BillingError(409, f"{scope} {target!r} already has a tariff assignment effective from that "
                                    "instant; assignments are never changed, choose another effective_from")
        try:
            row = await m.TariffAssignment.create(
                target=key, tariff_id=tariff.pk, device_id=target_pk if scope == "meter" else None,
                site_id=target_pk if scope == "site" else None, effective_from_ms=effective_from_ms,
                created_ms=now_ms, created_by=user)
        except IntegrityError:
            raise BillingError(409, f"{scope} {target!r} already has a tariff assignment effective from that "
                                    "instant") from None
    return AssignmentRecord(row.id, tariff.tariff.name, scope, target, effective_from_ms, now_ms, user)


async def list_assignments(db: Database, meter: DeviceRow | None = None) -> list[AssignmentRecord]:
    """All assignments (or those that concern one meter: its own and its site's), by target and time."""
    with db.activate():
        q = m.TariffAssignment.all()
        if meter is not None:
            q = q.filter(target__in=[_target("meter", meter.uid), _target("site", meter.site)])
        rows = await q.order_by("target", "effective_from_ms").values(
            "id", "target", "tariff__name", "effective_from_ms", "created_ms", "created_by")
    out = []
    for r in rows:
        scope, name = r["target"].split(":", 1)
        out.append(AssignmentRecord(r["id"], r["tariff__name"], scope, name, r["effective_from_ms"],
                                    r["created_ms"], r["created_by"]))
    return out


async def site_pk(db: Database, name: str) -> int | None:
    """The primary key of site ``name``."""
    with db.activate():
        row = await Site.get_or_none(name=name)
    return row.id if row else None


async def meter_assignments(db: Database, meter: DeviceRow) -> list[Assignment]:
    """The assignments that concern ``meter`` as domain objects."""
    records = await list_assignments(db, meter)
    tariffs = {t.tariff.name: t.tariff for t in await list_tariffs(db)}
    return [Assignment(tariffs[r.tariff], r.effective_from_ms, r.scope) for r in records]


# -- register readings -----------------------------------------------------------------------------

def _from_float(value: float) -> Decimal:
    # The shortest repr of a float gives back the decimal the meter sent (e.g. 1234.56).
    return Decimal(repr(value))


# The first and the last good register reading of each minute: the consumption between the kept
# readings is the same (register differences add up), rollovers and resets still show, bands have
# minute resolution, and a month of 1 s telemetry is 86,400 readings to compute with, not 2.6 million.
_THINNED_SQL = """
SELECT ts_ms, value FROM (
    SELECT ts_ms, value,
           ROW_NUMBER() OVER (PARTITION BY ts_ms / ? ORDER BY ts_ms, id) AS first_rn,
           ROW_NUMBER() OVER (PARTITION BY ts_ms / ? ORDER BY ts_ms DESC, id DESC) AS last_rn
    FROM reading
    WHERE device_id = ? AND metric = ? AND quality = 'good' AND value IS NOT NULL AND ts_ms >= ? AND ts_ms < ?
) per_bucket WHERE first_rn = 1 OR last_rn = 1 ORDER BY ts_ms
"""
THIN_MS = 60_000
"""Telemetry register readings are thinned to the first and last one of each such bucket (ms)."""


async def _telemetry(db: Database, device_pk: int, since_ms: int, until_ms: int) -> list[RegisterReading]:
    base = Reading.filter(device_id=device_pk, metric=ENERGY_METRIC, quality="good", value__isnull=False)
    found = await db.conn.execute_query_dict(db.sql(_THINNED_SQL), [THIN_MS, THIN_MS, device_pk, ENERGY_METRIC,
                                                                    since_ms, until_ms])
    rows = [(r["ts_ms"], r["value"]) for r in found]
    before = await base.filter(ts_ms__lt=since_ms).order_by("-ts_ms").limit(1).values_list("ts_ms", "value")
    after = await base.filter(ts_ms__gte=until_ms).order_by("ts_ms").limit(1).values_list("ts_ms", "value")
    return [RegisterReading(int(ts), _from_float(v)) for ts, v in [*before, *rows, *after]]


def _manual(row: m.ManualReading) -> RegisterReading:
    return RegisterReading(row.ts_ms, Decimal(row.value), Source.MANUAL, row.replacement, row.serial)


async def _manuals(db: Database, device_pk: int, since_ms: int, until_ms: int) -> list[RegisterReading]:
    base = m.ManualReading.filter(device_id=device_pk)
    rows = [*await base.filter(ts_ms__lt=since_ms).order_by("-ts_ms").limit(1),
            *await base.filter(ts_ms__gte=since_ms, ts_ms__lt=until_ms).order_by("ts_ms"),
            *await base.filter(ts_ms__gte=until_ms).order_by("ts_ms").limit(1)]
    return [_manual(r) for r in rows]


async def register_readings(db: Database, device_pk: int, since_ms: int, until_ms: int) -> list[RegisterReading]:
    """Readings of the meter's register (telemetry and manual) in ``[since, until)`` plus the last one
    before and the first one at or after, from each source (so the edges can be interpolated)."""
    with db.activate():
        return [*await _telemetry(db, device_pk, since_ms, until_ms), *await _manuals(db, device_pk, since_ms,
                                                                                      until_ms)]


# -- manual readings -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ManualRecord:
    """A stored manual reading with its predecessor."""

    pk: int
    reading: RegisterReading
    submitted_by: str
    created_ms: int
    previous: RegisterReading | None
    consumption_kwh: Decimal | None
    """Energy since ``previous`` (``None`` for the first reading or a replacement)."""


def _kwh_text(d: Decimal | int) -> str:
    return f"{Decimal(d):f} kWh"


def check_reading(new: RegisterReading, previous: RegisterReading | None, following: RegisterReading | None,
                  config: BillingConfig, fmt: Callable[[int], str] = str) -> Decimal | None:
    """Refuse a manual reading that cannot be right (:class:`ImplausibleReading`); returns the energy
    since ``previous`` (``None`` without one, or for a replacement)."""
    if new.value < 0:
        raise ImplausibleReading(f"reading {_kwh_text(new.value)} is negative; a register reading is never below 0",
                                 "negative", previous)
    if new.value >= config.register_modulus_kwh:
        raise ImplausibleReading(f"reading {_kwh_text(new.value)} is beyond the register, which wraps to 0 at "
                                 f"{_kwh_text(config.register_modulus_kwh)}", "beyond_register", previous)
    if new.replacement:
        return None
    used: Decimal | None = None
    max_power = config.meter_max_power_kw
    if previous is not None:
        kwh, kind = delta(previous, new, config.register_modulus_kwh, max_power)
        limit = plausible_max_kwh(previous.ts_ms, new.ts_ms, max_power)
        if kind is Kind.RESET:
            raise ImplausibleReading(
                f"reading {_kwh_text(new.value)} is lower than the previous reading {_kwh_text(previous.value)} of "
                f"{fmt(previous.ts_ms)}; if the meter was replaced, submit it with \"replacement\": true",
                "lower_than_previous", previous)
        if kwh > limit:
            hours = Decimal(new.ts_ms - previous.ts_ms) / 3_600_000
            raise ImplausibleReading(
                f"reading {_kwh_text(new.value)} is implausibly high: {_kwh_text(previous.value)} at "
                f"{fmt(previous.ts_ms)} plus {_kwh_text(Decimal(kwh.numerator) / kwh.denominator)} in "
                f"{hours:.2f} h is more than a meter of {plain(max_power)} kW can measure "
                f"({_kwh_text(Decimal(limit.numerator) / limit.denominator)})", "implausibly_high", previous)
        used = Decimal(kwh.numerator) / Decimal(kwh.denominator)
    if following is not None and not following.replacement:
        kwh, kind = delta(new, following, config.register_modulus_kwh, max_power)
        if kind is Kind.RESET or kwh > plausible_max_kwh(new.ts_ms, following.ts_ms, max_power):
            raise ImplausibleReading(
                f"reading {_kwh_text(new.value)} does not fit the later reading {_kwh_text(following.value)} of "
                f"{fmt(following.ts_ms)}", "inconsistent_with_later", previous)
    return used


async def neighbours(db: Database, device_pk: int, ts_ms: int) -> tuple[RegisterReading | None,
                                                                        RegisterReading | None]:
    """The register readings (either source) just before (or at) and just after ``ts_ms``."""
    readings = await register_readings(db, device_pk, ts_ms, ts_ms + 1)
    before = [r for r in readings if r.ts_ms <= ts_ms]
    after = [r for r in readings if r.ts_ms > ts_ms]
    previous = max(before, key=lambda r: (r.ts_ms, -r.rank()), default=None)
    following = min(after, key=lambda r: (r.ts_ms, r.rank()), default=None)
    return previous, following


async def add_manual_reading(db: Database, device: DeviceRow, new: RegisterReading, config: BillingConfig,
                             now_ms: int, user: str, fmt: Callable[[int], str] = str) -> ManualRecord:
    """Check and store a manual reading; :class:`ImplausibleReading` (422) or 409 (one exists at that time)."""
    with db.activate():
        if await m.ManualReading.filter(device_id=device.pk, ts_ms=new.ts_ms).exists():
            raise BillingError(409, f"meter {device.uid!r} already has a manual reading at that time")
    previous, following = await neighbours(db, device.pk, new.ts_ms)
    used = check_reading(new, previous, following, config, fmt)
    with db.activate():
        try:
            row = await m.ManualReading.create(device_id=device.pk, ts_ms=new.ts_ms, value=new.value,
                                               replacement=new.replacement, serial=new.serial,
                                               submitted_by=user, created_ms=now_ms)
        except IntegrityError:
            raise BillingError(409, f"meter {device.uid!r} already has a manual reading at that time") from None
    return ManualRecord(row.id, new, user, now_ms, previous, used)


# -- cost ------------------------------------------------------------------------------------------

@dataclass
class MeterCost:
    """The cost of a meter over a range, with what it was computed from."""

    bill: Bill
    series: Series


async def meter_cost(db: Database, device: DeviceRow, since_ms: int, until_ms: int,
                     config: BillingConfig) -> MeterCost:
    """Consumption and cost of ``device`` over ``[since, until)`` from its stored readings."""
    if until_ms < since_ms:
        raise BillingError(422, "'until' is before 'since'")
    if until_ms - since_ms > MAX_COST_RANGE_MS:
        raise BillingError(422, "the range may cover at most 367 days; ask for each part separately")
    readings = await register_readings(db, device.pk, since_ms, until_ms)
    periods = timeline(await meter_assignments(db, device), since_ms, until_ms)

    def compute() -> MeterCost:
        series = intervals(readings, config.register_modulus_kwh, config.meter_max_power_kw)
        return MeterCost(bill(series.intervals, periods, since_ms, until_ms), series)

    try:
        # Exact arithmetic over up to a year of readings takes seconds: not on the event loop.
        return await asyncio.to_thread(compute)
    except CostError as exc:
        raise BillingError(422, str(exc)) from None

