"""Consumption × tariffs = cost (pure functions; ``docs/billing.md``, "Cost" and "Rounding").

:func:`bill` takes a meter's consumption intervals (:mod:`hub.billing.consumption`) and the tariffs in
force (:func:`hub.billing.tariffs.timeline`) and returns the line items of ``[start, end)``:

* **energy** per tariff and band: the intervals are cut at tariff changes and at band boundaries in
  the tariff's local time (DST-correct) and each piece's energy attributed linearly; the kWh of a
  line are exact, its amount is ``kWh × rate`` rounded once (ROUND_HALF_UP to the minor unit);
* **standing charge** per tariff: local days in force × charge per day, a part-day counted as its
  fraction of that day's real length (23, 24 or 25 h), rounded once per line;
* **VAT** per VAT rate on the sum of the (rounded) lines at that rate, rounded once;
* **total** = lines + VAT, exact sums of rounded amounts.

Energy in parts of the range without any tariff is reported as ``unpriced_kwh`` and not charged.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

from hub.billing.consumption import Interval, Kind, consumption
from hub.billing.money import line_amount, quantize, vat_amount
from hub.billing.tariffs import Band, Tariff, TariffPeriod, band_segments, local_days


class CostError(ValueError):
    """The cost cannot be computed (e.g. tariffs of different currencies in one range)."""


@dataclass(frozen=True)
class EnergyLine:
    """Energy of one band of one tariff."""

    tariff: Tariff
    band: Band
    kwh: Fraction
    amount: Decimal


@dataclass(frozen=True)
class StandingLine:
    """Standing charge of one tariff."""

    tariff: Tariff
    days: Fraction
    amount: Decimal


@dataclass(frozen=True)
class VatLine:
    """VAT at one rate."""

    rate: Decimal
    net: Decimal
    amount: Decimal


@dataclass
class Bill:
    """Cost of ``[start_ms, end_ms)``."""

    start_ms: int
    end_ms: int
    currency: str | None
    """``None`` when no tariff is in force anywhere in the range."""
    kwh: Fraction
    unpriced_kwh: Fraction
    energy: list[EnergyLine] = field(default_factory=list)
    standing: list[StandingLine] = field(default_factory=list)
    vat: list[VatLine] = field(default_factory=list)
    unmeasured: list[Interval] = field(default_factory=list)
    """Replacement / reset intervals overlapping the range (their energy is unknown, counted 0)."""
    net: Decimal = Decimal(0)
    vat_total: Decimal = Decimal(0)
    total: Decimal = Decimal(0)


def _energy_by_band(ivs: Sequence[Interval], ends: Sequence[int], period: TariffPeriod,
                    acc: dict[tuple[str, str], list[object]]) -> None:
    i = bisect_right(ends, period.start_ms)  # first interval ending after the period starts
    n = len(ivs)
    for s, e, band in band_segments(period.tariff, period.start_ms, period.end_ms):
        entry = acc.setdefault((period.tariff.key, band.name), [period.tariff, band, Fraction(0)])
        while i < n and ivs[i].end_ms <= s:
            i += 1
        j = i
        total = Fraction(0)
        while j < n and ivs[j].start_ms < e:
            total += ivs[j].part(s, e)
            j += 1
        entry[2] = entry[2] + total  # type: ignore[operator]


def bill(ivs: Sequence[Interval], periods: Sequence[TariffPeriod], start_ms: int, end_ms: int) -> Bill:
    """The cost of ``[start, end)``; ``ivs`` sorted by time, ``periods`` inside the range."""
    if end_ms < start_ms:
        raise CostError("the range ends before it starts")
    currencies = sorted({p.tariff.currency for p in periods})
    if len(currencies) > 1:
        raise CostError(f"the tariffs in force use different currencies ({', '.join(currencies)}); "
                        "ask for the cost of each part separately")
    currency = currencies[0] if currencies else None
    result = Bill(start_ms, end_ms, currency, consumption(ivs, start_ms, end_ms), Fraction(0))
    result.unmeasured = [iv for iv in ivs if iv.kind in (Kind.REPLACEMENT, Kind.RESET)
                         and iv.start_ms < end_ms and iv.end_ms > start_ms]
    ends = [iv.end_ms for iv in ivs]
    energy: dict[tuple[str, str], list[object]] = {}
    days: dict[str, tuple[Tariff, Fraction]] = {}
    for p in periods:
        s, e = max(p.start_ms, start_ms), min(p.end_ms, end_ms)
        if s >= e:
            continue
        clipped = TariffPeriod(s, e, p.tariff, p.assignment)
        _energy_by_band(ivs, ends, clipped, energy)
        n_days = sum((f for _, f in local_days(p.tariff.zone, s, e)), Fraction(0))
        prev = days.get(p.tariff.key)
        days[p.tariff.key] = (p.tariff, n_days + (prev[1] if prev else 0))
    priced = Fraction(0)
    for tariff, band, kwh in energy.values():
        assert isinstance(tariff, Tariff) and isinstance(band, Band) and isinstance(kwh, Fraction)
        priced += kwh
        result.energy.append(EnergyLine(tariff, band, kwh, line_amount(kwh, band.rate, tariff.currency)))
    result.unpriced_kwh = result.kwh - priced
    for tariff, n_days in days.values():
        result.standing.append(StandingLine(tariff, n_days,
                                            line_amount(n_days, tariff.standing_charge_per_day, tariff.currency)))
    if currency is None:
        return result
    nets: dict[Decimal, Decimal] = {}
    lines: list[EnergyLine | StandingLine] = [*result.energy, *result.standing]
    for line in lines:
        nets[line.tariff.vat_rate] = nets.get(line.tariff.vat_rate, Decimal(0)) + line.amount
    for rate in sorted(nets):
        result.vat.append(VatLine(rate, nets[rate], vat_amount(nets[rate], rate, currency)))
    result.net = quantize(sum(nets.values(), Decimal(0)), currency)
    result.vat_total = quantize(sum((v.amount for v in result.vat), Decimal(0)), currency)
    result.total = result.net + result.vat_total
    return result
