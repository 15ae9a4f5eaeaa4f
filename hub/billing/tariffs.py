"""Tariffs as data, and how they divide time (``docs/billing.md``, "Tariffs").

A :class:`Tariff` has a currency, a VAT rate, a standing charge per local day and one or more
:class:`Band` s (a flat rate is a single all-day band). Bands are ranges of *local* time of day in
the tariff's time zone (e.g. ``Europe/London``), optionally only on weekdays or weekends; together
they must cover every minute of every day exactly once. Which tariff applies to a meter when is an
:class:`Assignment` (per meter or per site, from an effective-from instant); :func:`timeline` turns a
meter's assignments into periods, :func:`band_segments` splits a time range at band boundaries
(DST-correct: boundaries are computed per local day through ``zoneinfo``) and :func:`local_days`
counts the local days a range covers for the standing charge.

Times are epoch milliseconds (UTC) like everywhere in the hub.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from functools import cached_property
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from hub.billing.money import minor_exponent

DayType = Literal["all", "weekday", "weekend"]
MINUTES_PER_DAY = 1440
DAY_TYPES: tuple[DayType, ...] = ("all", "weekday", "weekend")


class TariffError(ValueError):
    """A tariff or assignment that cannot be used (overlapping or missing bands, bad zone, ...)."""


def hhmm(minute: int) -> str:
    """Minute of the day as ``HH:MM`` (1440 is ``24:00``)."""
    return f"{minute // 60:02d}:{minute % 60:02d}"


def parse_hhmm(text: str) -> int:
    """``HH:MM`` (``00:00``..``24:00``) as a minute of the day; raises :class:`TariffError`."""
    try:
        hours, minutes = text.split(":")
        if len(hours) != 2 or len(minutes) != 2:
            raise ValueError
        h, m = int(hours), int(minutes)
    except ValueError:
        raise TariffError(f"time of day {text!r} is not HH:MM") from None
    if not (0 <= h <= 24 and 0 <= m < 60) or (h == 24 and m):
        raise TariffError(f"time of day {text!r} is outside 00:00..24:00")
    return h * 60 + m


@dataclass(frozen=True)
class Band:
    """A rate for part of the day.

    Covers local minutes ``[start_minute, end_minute)`` of each local calendar day of type ``days``
    (weekday: Monday–Friday, weekend: Saturday and Sunday; the day of the instant itself, so the
    00:00–07:00 part of a 23:00–07:00 night on a Saturday is a weekend minute). ``end <= start``
    wraps past midnight; ``start == end`` (the default 00:00–00:00) is the whole day.
    """

    name: str
    rate: Decimal
    """Price per kWh in major units of the tariff's currency (``Decimal("0.2450")``), before VAT."""
    start_minute: int = 0
    end_minute: int = 0
    days: DayType = "all"

    def covers(self, weekend: bool, minute: int) -> bool:
        """True when this band applies at ``minute`` of a (weekend) day."""
        if (self.days == "weekday" and weekend) or (self.days == "weekend" and not weekend):
            return False
        s, e = self.start_minute, self.end_minute % MINUTES_PER_DAY
        if s == e:
            return True
        if s < e:
            return s <= minute < e
        return minute >= s or minute < e


@dataclass(frozen=True)
class Tariff:
    """A tariff; ``key`` identifies it in answers (the database id as a string, or a name)."""

    name: str
    currency: str
    timezone: str
    vat_rate: Decimal
    """``Decimal("0.05")`` for 5 %."""
    standing_charge_per_day: Decimal
    """Major units per local day, before VAT."""
    bands: tuple[Band, ...]
    effective_from_ms: int = 0
    """The tariff cannot be assigned from an earlier instant."""
    key: str = ""

    @staticmethod
    def flat(name: str, rate: Decimal, *, currency: str = "GBP", timezone: str = "Europe/London",
             vat_rate: Decimal = Decimal(0), standing_charge_per_day: Decimal = Decimal(0), key: str = "",
             effective_from_ms: int = 0) -> Tariff:
        """A single-rate tariff (one all-day band called ``flat``)."""
        return Tariff(name, currency, timezone, vat_rate, standing_charge_per_day, (Band("flat", rate),),
                      effective_from_ms, key or name)

    @cached_property
    def zone(self) -> ZoneInfo:
        """The tariff's time zone."""
        return zone(self.timezone)

    @cached_property
    def _table(self) -> tuple[tuple[Band, ...], tuple[Band, ...]]:
        # (weekday minutes, weekend minutes) -> band; checked by validate().
        out: list[tuple[Band, ...]] = []
        for weekend in (False, True):
            row = []
            for m in range(MINUTES_PER_DAY):
                row.append(next(b for b in self.bands if b.covers(weekend, m)))
            out.append(tuple(row))
        return out[0], out[1]

    @cached_property
    def boundary_minutes(self) -> tuple[int, ...]:
        """Local minutes of the day at which the band may change (always including 00:00)."""
        return tuple(sorted({0} | {b.start_minute % MINUTES_PER_DAY for b in self.bands}
                            | {b.end_minute % MINUTES_PER_DAY for b in self.bands}))

    def validate(self) -> Tariff:
        """Raise :class:`TariffError` unless the tariff is usable; returns itself."""
        minor_exponent(self.currency)  # MoneyError (a ValueError) for an unknown currency
        self.zone  # noqa: B018 - raises for an unknown zone
        for what, value in (("vat_rate", self.vat_rate), ("standing_charge_per_day", self.standing_charge_per_day)):
            if value < 0:
                raise TariffError(f"{what} must not be negative")
        if self.vat_rate >= 1:
            raise TariffError("vat_rate is a fraction (0.2 for 20 %), must be below 1")
        if not self.bands:
            raise TariffError("a tariff needs at least one band")
        names = [b.name for b in self.bands]
        if len(set(names)) != len(names):
            raise TariffError("band names must be unique within a tariff")
        for b in self.bands:
            if b.rate < 0:
                raise TariffError(f"band {b.name!r}: rate must not be negative")
            if not (0 <= b.start_minute < MINUTES_PER_DAY and 0 <= b.end_minute <= MINUTES_PER_DAY):
                raise TariffError(f"band {b.name!r}: times must be within 00:00..24:00")
        for weekend, label in ((False, "weekdays"), (True, "weekends")):
            holes: list[int] = []
            for m in range(MINUTES_PER_DAY):
                covering = [b.name for b in self.bands if b.covers(weekend, m)]
                if len(covering) > 1:
                    raise TariffError(f"bands {' and '.join(repr(n) for n in covering)} overlap on {label} "
                                      f"at {hhmm(m)}")
                if not covering:
                    holes.append(m)
            if holes:
                raise TariffError(f"no band covers {label} at {hhmm(holes[0])} "
                                  f"({len(holes)} minutes of the day uncovered)")
        return self

    def band_at_local(self, local: datetime) -> Band:
        """The band in force at a local (zone-aware) time."""
        weekend = local.weekday() >= 5
        return self._table[1 if weekend else 0][local.hour * 60 + local.minute]


def zone(name: str) -> ZoneInfo:
    """``ZoneInfo(name)``; :class:`TariffError` for an unknown zone."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise TariffError(f"unknown time zone {name!r} (an IANA name such as Europe/London)") from None


# -- time ---------------------------------------------------------------------------------------

def to_local(ms: int, tz: ZoneInfo) -> datetime:
    """Epoch ms as local time (sub-second part dropped; bands have minute resolution)."""
    return datetime.fromtimestamp(ms // 1000, tz)


def local_ms(day: date, minute: int, tz: ZoneInfo, fold: int = 0) -> int:
    """Epoch ms of local ``day`` at ``minute`` (1440 = next midnight). A time skipped by a DST change
    maps through the offset before it; a repeated one to its first (``fold=0``) or second occurrence."""
    if minute >= MINUTES_PER_DAY:
        day, minute = day + timedelta(days=1), minute - MINUTES_PER_DAY
    dt = datetime(day.year, day.month, day.day, minute // 60, minute % 60, tzinfo=tz, fold=fold)
    return round(dt.timestamp()) * 1000


def day_start_ms(day: date, tz: ZoneInfo) -> int:
    """Epoch ms of local midnight starting ``day``."""
    return local_ms(day, 0, tz)


def _offset(ms: int, tz: ZoneInfo) -> timedelta | None:
    return datetime.fromtimestamp(ms // 1000, UTC).astimezone(tz).utcoffset()


def offset_changes(day: date, tz: ZoneInfo) -> list[int]:
    """Instants (epoch ms) during local ``day`` at which the zone's UTC offset changes (DST)."""
    lo, hi = day_start_ms(day, tz), day_start_ms(day + timedelta(days=1), tz)
    if _offset(lo, tz) == _offset(hi, tz):
        return []
    lo_s, hi_s = lo // 1000, hi // 1000
    first = _offset(lo, tz)
    while hi_s - lo_s > 1:  # zoneinfo transitions are at whole seconds
        mid = (lo_s + hi_s) // 2
        if _offset(mid * 1000, tz) == first:
            lo_s = mid
        else:
            hi_s = mid
    return [hi_s * 1000]


def _next_change(tariff: Tariff, t: int, day: date) -> int:
    tz = tariff.zone
    candidates: list[int] = []
    for d in (day, day + timedelta(days=1)):
        for m in tariff.boundary_minutes:
            for fold in (0, 1):
                candidates.append(local_ms(d, m, tz, fold))
        candidates.extend(offset_changes(d, tz))
    return min(c for c in candidates if c > t)


def band_segments(tariff: Tariff, start_ms: int, end_ms: int) -> list[tuple[int, int, Band]]:
    """``[start, end)`` split where the band changes: ``(seg_start, seg_end, band)`` in time order,
    adjacent segments of the same band merged. Boundaries are local wall-clock times of each local day,
    so a day of 23 or 25 hours gets its bands at the right UTC instants."""
    out: list[tuple[int, int, Band]] = []
    t = start_ms
    tz = tariff.zone
    while t < end_ms:
        local = to_local(t, tz)
        band = tariff.band_at_local(local)
        e = min(_next_change(tariff, t, local.date()), end_ms)
        if out and out[-1][2] is band and out[-1][1] == t:
            out[-1] = (out[-1][0], e, band)
        else:
            out.append((t, e, band))
        t = e
    return out


def local_days(tz: ZoneInfo, start_ms: int, end_ms: int) -> list[tuple[date, Fraction]]:
    """Local days overlapping ``[start, end)`` with the fraction of each that lies inside (a whole
    day is 1 whatever its length: 23, 24 or 25 hours)."""
    out: list[tuple[date, Fraction]] = []
    if end_ms <= start_ms:
        return out
    d = to_local(start_ms, tz).date()
    while (s := day_start_ms(d, tz)) < end_ms:
        e = day_start_ms(d + timedelta(days=1), tz)
        overlap = min(e, end_ms) - max(s, start_ms)
        if overlap > 0:
            out.append((d, Fraction(overlap, e - s)))
        d += timedelta(days=1)
    return out


# -- assignments --------------------------------------------------------------------------------

Scope = Literal["meter", "site"]


@dataclass(frozen=True)
class Assignment:
    """``tariff`` applies to a meter (or to every meter of a site) from ``effective_from_ms`` until the
    next assignment of the same meter (site). A meter's own assignment, once in force, beats its site's."""

    tariff: Tariff
    effective_from_ms: int
    scope: Scope = "meter"


@dataclass(frozen=True)
class TariffPeriod:
    """A tariff in force over ``[start_ms, end_ms)``."""

    start_ms: int
    end_ms: int
    tariff: Tariff
    assignment: Assignment = field(compare=False)


def assignment_at(assignments: Sequence[Assignment], t: int) -> Assignment | None:
    """The assignment in force at instant ``t``."""
    for scope in ("meter", "site"):
        current = [a for a in assignments if a.scope == scope and a.effective_from_ms <= t]
        if current:
            return max(current, key=lambda a: a.effective_from_ms)
    return None


def timeline(assignments: Sequence[Assignment], start_ms: int, end_ms: int) -> list[TariffPeriod]:
    """The tariffs in force over ``[start, end)``, in time order; times without any are left out."""
    points = sorted({start_ms, end_ms} | {a.effective_from_ms for a in assignments
                                         if start_ms < a.effective_from_ms < end_ms})
    out: list[TariffPeriod] = []
    for s, e in itertools.pairwise(points):
        a = assignment_at(assignments, s)
        if a is None:
            continue
        if out and out[-1].assignment is a and out[-1].end_ms == s:
            out[-1] = TariffPeriod(out[-1].start_ms, e, a.tariff, a)
        else:
            out.append(TariffPeriod(s, e, a.tariff, a))
    return out
