"""Billing core as pure functions: money rounding, tariffs, consumption from the register, cost.

The worked examples compute their expected figures by hand in the comments; the assertions compare
exact Decimal strings. Times are UTC unless a comment says "local" (Europe/London: GMT in winter,
BST = UTC+1 from the last Sunday of March 01:00 UTC to the last Sunday of October 01:00 UTC).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from fractions import Fraction

import pytest

from hub.billing import money
from hub.billing.consumption import Kind, RegisterReading, Source, consumption, intervals
from hub.billing.cost import Bill, CostError, bill
from hub.billing.tariffs import (
    Assignment,
    Band,
    Tariff,
    TariffError,
    band_segments,
    hhmm,
    local_days,
    parse_hhmm,
    timeline,
    zone,
)

D = Decimal
LONDON = "Europe/London"


def ms(text: str) -> int:
    """``2026-03-29T00:00`` (UTC) as epoch ms."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * 1000


def reading(ts: str, value: str, **kw: object) -> RegisterReading:
    return RegisterReading(ms(ts), D(value), **kw)  # type: ignore[arg-type]


def economy7(vat: str = "0.05", standing: str = "0.60") -> Tariff:
    """Night 00:30-07:30 local at 0.10/kWh, day 07:30-00:30 local at 0.30/kWh."""
    return Tariff("economy7", "GBP", LONDON, D(vat), D(standing), (
        Band("night", D("0.10"), parse_hhmm("00:30"), parse_hhmm("07:30")),
        Band("day", D("0.30"), parse_hhmm("07:30"), parse_hhmm("00:30")),
    ), key="economy7").validate()


def cost(readings: list[RegisterReading], assignments: list[Assignment], since: str, until: str) -> Bill:
    series = intervals(readings)
    return bill(series.intervals, timeline(assignments, ms(since), ms(until)), ms(since), ms(until))


def summary(b: Bill) -> dict[str, object]:
    """The bill as strings, as the API shows it."""
    return {
        "kwh": str(money.kwh(b.kwh)),
        "energy": [(e.tariff.key, e.band.name, str(money.kwh(e.kwh)), str(e.amount)) for e in b.energy],
        "standing": [(s.tariff.key, str(s.days), str(s.amount)) for s in b.standing],
        "vat": [(str(v.rate), str(v.net), str(v.amount)) for v in b.vat],
        "total": (str(b.net), str(b.vat_total), str(b.total)),
    }


# -- money -----------------------------------------------------------------------------------------

def test_rounding_is_half_up_at_the_minor_unit() -> None:
    assert money.quantize(D("0.125"), "GBP") == D("0.13")
    assert money.quantize(D("-0.125"), "GBP") == D("-0.13")  # ties away from zero
    assert money.quantize(D("2.675"), "GBP") == D("2.68")  # the float 2.675 would round to 2.67
    assert money.quantize(Fraction(1, 3), "GBP") == D("0.33")
    assert money.quantize(Fraction(9, 40), "GBP") == D("0.23")  # 0.225
    assert money.quantize(D("1234.5"), "JPY") == D("1235")
    assert money.line_amount(Fraction(1, 3), D("0.30"), "GBP") == D("0.10")
    assert money.vat_amount(D("33.28"), D("0.2"), "GBP") == D("6.66")  # 6.656
    assert money.kwh(Fraction(2, 3)) == D("0.667")
    assert money.fmt(D("5"), "GBP") == "5.00"


def test_floats_and_unknown_currencies_are_refused() -> None:
    with pytest.raises(money.MoneyError, match="binary float"):
        money.parse_decimal(0.1)
    with pytest.raises(money.MoneyError, match="not a decimal"):
        money.parse_decimal("ten")
    with pytest.raises(money.MoneyError, match="finite"):
        money.parse_decimal("NaN")
    assert money.parse_decimal(" 0.245 ") == D("0.245")
    with pytest.raises(money.MoneyError, match="unsupported currency"):
        money.minor_exponent("XYZ")


# -- tariffs ---------------------------------------------------------------------------------------

def test_band_validation_finds_overlaps_and_holes() -> None:
    def tariff(*bands: Band) -> Tariff:
        return Tariff("t", "GBP", LONDON, D("0.2"), D("0.5"), bands)

    with pytest.raises(TariffError, match="'day' and 'night' overlap on weekdays at 07:00"):
        tariff(Band("day", D("0.3"), parse_hhmm("07:00"), 0),
               Band("night", D("0.1"), 0, parse_hhmm("07:30"))).validate()
    with pytest.raises(TariffError, match="no band covers weekends at 00:00"):
        tariff(Band("weekday", D("0.3"), days="weekday")).validate()
    with pytest.raises(TariffError, match="unknown time zone"):
        Tariff("t", "GBP", "Mars/Olympus", D(0), D(0), (Band("flat", D(1)),)).validate()
    with pytest.raises(TariffError, match="below 1"):
        Tariff("t", "GBP", LONDON, D(20), D(0), (Band("flat", D(1)),)).validate()
    # Weekday day/night plus an all-day weekend rate covers the week exactly once.
    tariff(Band("day", D("0.3"), parse_hhmm("07:00"), parse_hhmm("23:00"), "weekday"),
           Band("night", D("0.1"), parse_hhmm("23:00"), parse_hhmm("07:00"), "weekday"),
           Band("weekend", D("0.2"), days="weekend")).validate()
    assert (parse_hhmm("24:00"), hhmm(450)) == (1440, "07:30")
    for bad in ("7:30", "24:01", "12:60", "noon"):
        with pytest.raises(TariffError):
            parse_hhmm(bad)


def test_local_days_of_the_dst_changes() -> None:
    tz = zone(LONDON)
    # Local 2026-03-29 runs 00:00 GMT (00:00Z) .. 00:00 BST (23:00Z): 23 hours, one day.
    assert local_days(tz, ms("2026-03-29T00:00"), ms("2026-03-29T23:00")) == [(date(2026, 3, 29), 1)]
    # Local 2026-10-25 runs 00:00 BST (2026-10-24T23:00Z) .. 00:00 GMT (2026-10-26T00:00Z): 25 hours.
    assert local_days(tz, ms("2026-10-24T23:00"), ms("2026-10-26T00:00")) == [(date(2026, 10, 25), 1)]
    # 12 of the 25 hours: 12/25 of the day.
    assert local_days(tz, ms("2026-10-24T23:00"), ms("2026-10-25T11:00")) == [(date(2026, 10, 25),
                                                                               Fraction(12, 25))]


def test_band_segments_follow_local_time_across_dst() -> None:
    segs = band_segments(economy7(), ms("2026-03-29T00:00"), ms("2026-03-29T23:00"))
    # 00:00-00:30 GMT day, 00:30 GMT-07:30 BST (06:30Z) night, then day until midnight BST (23:00Z).
    assert [(s, e, b.name) for s, e, b in segs] == [
        (ms("2026-03-29T00:00"), ms("2026-03-29T00:30"), "day"),
        (ms("2026-03-29T00:30"), ms("2026-03-29T06:30"), "night"),
        (ms("2026-03-29T06:30"), ms("2026-03-29T23:00"), "day"),
    ]


def test_timeline_meter_assignment_beats_site() -> None:
    a, b, c = (Tariff.flat(n, D("0.1")) for n in "abc")
    assignments = [Assignment(a, ms("2026-01-01T00:00"), "site"), Assignment(b, ms("2026-01-10T00:00"), "meter"),
                   Assignment(c, ms("2026-01-20T00:00"), "site")]
    periods = timeline(assignments, ms("2025-12-31T00:00"), ms("2026-01-31T00:00"))
    # Nothing before Jan 1; the site's tariff a until the meter's own b; the site's change to c does
    # not affect a meter that has its own tariff.
    assert [(p.start_ms, p.end_ms, p.tariff.name) for p in periods] == [
        (ms("2026-01-01T00:00"), ms("2026-01-10T00:00"), "a"),
        (ms("2026-01-10T00:00"), ms("2026-01-31T00:00"), "b"),
    ]


# -- consumption -----------------------------------------------------------------------------------

def test_rollover_of_the_32_bit_register() -> None:
    # The register wraps at 2**32 × 0.01 = 42,949,672.96 kWh.
    # 42,949,600.00 at 00:00, 27.04 at 01:00: 27.04 + 42,949,672.96 - 42,949,600.00 = 100.00 kWh,
    # plausible for one hour (≤ 1000 kWh at the default 1 MW), so a rollover.
    readings = [reading("2026-01-05T00:00", "42949600.00"), reading("2026-01-05T01:00", "27.04"),
                reading("2026-01-05T02:00", "127.04")]
    series = intervals(readings)
    assert [(iv.kwh, iv.kind) for iv in series.intervals] == [(100, Kind.ROLLOVER), (100, Kind.MEASURED)]
    # Flat 0.25 GBP/kWh, standing 0.50/day, VAT 5 %, over 00:00-01:00 (winter: local = UTC):
    #   energy   100.00 kWh × 0.25 = 25.00
    #   standing 1/24 day × 0.50 = 0.0208.. -> 0.02
    #   net 25.02, VAT 5 % = 1.251 -> 1.25, total 26.27
    flat = Tariff.flat("flat", D("0.25"), vat_rate=D("0.05"), standing_charge_per_day=D("0.50"))
    b = cost(readings, [Assignment(flat, 0)], "2026-01-05T00:00", "2026-01-05T01:00")
    assert summary(b) == {
        "kwh": "100.000",
        "energy": [("flat", "flat", "100.000", "25.00")],
        "standing": [("flat", "1/24", "0.02")],
        "vat": [("0.05", "25.02", "1.25")],
        "total": ("25.02", "1.25", "26.27"),
    }


def test_a_drop_that_is_no_plausible_rollover_is_a_reset() -> None:
    # 5000 -> 10 within an hour: a rollover would be 42,944,682.96 kWh, far above 1 MW × 1 h.
    series = intervals([reading("2026-01-05T00:00", "5000"), reading("2026-01-05T01:00", "10"),
                        reading("2026-01-05T02:00", "15")])
    assert [(iv.kwh, iv.kind) for iv in series.intervals] == [(0, Kind.RESET), (5, Kind.MEASURED)]
    # With a lower rated power the same rollover as above is implausible.
    series = intervals([reading("2026-01-05T00:00", "42949600.00"), reading("2026-01-05T01:00", "27.04")],
                       max_power_kw=D(50))
    assert series.intervals[0].kind is Kind.RESET


def test_meter_replacement() -> None:
    # Old meter: 5000.00 at 01:00 and (telemetry and the technician's final manual reading, a
    # duplicate) 5010.00 at 02:00. New meter (serial NEW-2) installed at 02:30 reading 0.00, then
    # 2.50 at 03:00 and 12.50 at 04:00.
    readings = [
        reading("2026-01-05T01:00", "5000.00"),
        reading("2026-01-05T02:00", "5010.00"),
        reading("2026-01-05T02:00", "5010.00", source=Source.MANUAL),
        reading("2026-01-05T02:30", "0.00", source=Source.MANUAL, replacement=True, serial="NEW-2"),
        reading("2026-01-05T03:00", "2.50"),
        reading("2026-01-05T04:00", "12.50"),
    ]
    series = intervals(readings)
    assert series.duplicates == 1
    # 01-02: 10.00 measured; 02:00-02:30: swap, unmeasured; 02:30-03:00: 2.50; 03-04: 10.00.
    assert [(iv.kwh, iv.kind) for iv in series.intervals] == [
        (10, Kind.MEASURED), (0, Kind.REPLACEMENT), (Fraction(5, 2), Kind.MEASURED), (10, Kind.MEASURED)]
    # 10.00 + 2.50 + 10.00 = 22.50 kWh at a flat 0.20 = 4.50; no standing charge, no VAT.
    flat = Tariff.flat("flat", D("0.20"))
    b = cost(readings, [Assignment(flat, 0)], "2026-01-05T01:00", "2026-01-05T04:00")
    assert summary(b)["kwh"] == "22.500"
    assert summary(b)["total"] == ("4.50", "0.00", "4.50")
    assert [(iv.start_ms, iv.kind) for iv in b.unmeasured] == [(ms("2026-01-05T02:00"), Kind.REPLACEMENT)]


def test_duplicates_and_out_of_order_arrival() -> None:
    readings = [reading("2026-01-05T03:00", "30"), reading("2026-01-05T01:00", "10"),
                reading("2026-01-05T02:00", "20"), reading("2026-01-05T01:00", "10"),
                reading("2026-01-05T02:00", "20"), reading("2026-01-05T02:00", "25")]
    series = intervals(readings)
    assert [(r.ts_ms, r.value) for r in series.readings] == [
        (ms("2026-01-05T01:00"), 10), (ms("2026-01-05T02:00"), 25), (ms("2026-01-05T03:00"), 30)]
    # Same time, other value: the larger one is kept (a manual or replacement reading would win).
    assert series.duplicates == 2 and [r.value for r in series.conflicts] == [20]
    assert consumption(series.intervals, ms("2026-01-05T00:00"), ms("2026-01-05T04:00")) == 20
    # In any order the same: 10 -> 25 -> 30 is 20 kWh.
    assert intervals(list(reversed(readings))).intervals == series.intervals


def test_gap_is_attributed_linearly() -> None:
    # 100 kWh between 00:00 and 10:00 with no reading in between: 10 kWh per hour is assumed, so
    # 02:00-05:00 gets 30 kWh; 00:00-00:20 gets 100 × 20/600 = 10/3 kWh.
    series = intervals([reading("2026-01-05T00:00", "0"), reading("2026-01-05T10:00", "100")])
    assert consumption(series.intervals, ms("2026-01-05T02:00"), ms("2026-01-05T05:00")) == 30
    assert consumption(series.intervals, ms("2026-01-05T00:00"), ms("2026-01-05T00:20")) == Fraction(10, 3)


# -- cost ------------------------------------------------------------------------------------------

def test_tariff_change_mid_period() -> None:
    # Readings 1000.00 at 06:00 and 1120.00 at 18:00: 120 kWh in 12 h = 10 kWh/h (linear).
    # Tariff A (0.20/kWh, standing 0.40/day) until 09:00, tariff B (0.30/kWh, 0.60/day) from 09:00;
    # both VAT 20 %. Period 06:00-18:00 (winter: local = UTC, days of 24 h):
    #   A energy   3 h = 30 kWh × 0.20 = 6.00
    #   B energy   9 h = 90 kWh × 0.30 = 27.00
    #   A standing 3/24 day × 0.40 = 0.05
    #   B standing 9/24 day × 0.60 = 0.225 -> 0.23 (ROUND_HALF_UP)
    #   net 6.00 + 27.00 + 0.05 + 0.23 = 33.28; VAT 20 % = 6.656 -> 6.66; total 39.94
    a = Tariff.flat("A", D("0.20"), vat_rate=D("0.2"), standing_charge_per_day=D("0.40"))
    b_ = Tariff.flat("B", D("0.30"), vat_rate=D("0.2"), standing_charge_per_day=D("0.60"))
    readings = [reading("2026-01-05T06:00", "1000.00"), reading("2026-01-05T18:00", "1120.00")]
    b = cost(readings, [Assignment(a, ms("2026-01-01T00:00")), Assignment(b_, ms("2026-01-05T09:00"))],
             "2026-01-05T06:00", "2026-01-05T18:00")
    assert summary(b) == {
        "kwh": "120.000",
        "energy": [("A", "flat", "30.000", "6.00"), ("B", "flat", "90.000", "27.00")],
        "standing": [("A", "1/8", "0.05"), ("B", "3/8", "0.23")],
        "vat": [("0.2", "33.28", "6.66")],
        "total": ("33.28", "6.66", "39.94"),
    }


def test_day_night_split_on_the_23_hour_day() -> None:
    # Sunday 2026-03-29, Europe/London: clocks go from 01:00 GMT to 02:00 BST. The local day runs
    # 00:00Z .. 23:00Z: 23 hours. Readings 0.00 at 00:00Z and 230.00 at 23:00Z: 10 kWh/h.
    #   night 00:30 GMT (00:30Z) .. 07:30 BST (06:30Z) = 6 h  =  60 kWh × 0.10 = 6.00
    #   day   00:00-00:30Z + 06:30Z-23:00Z = 0.5 + 16.5 = 17 h = 170 kWh × 0.30 = 51.00
    #   standing: one local day (of 23 h) × 0.60 = 0.60
    #   net 57.60, VAT 5 % = 2.88, total 60.48
    readings = [reading("2026-03-29T00:00", "0.00"), reading("2026-03-29T23:00", "230.00")]
    b = cost(readings, [Assignment(economy7(), 0)], "2026-03-29T00:00", "2026-03-29T23:00")
    assert summary(b) == {
        "kwh": "230.000",
        "energy": [("economy7", "day", "170.000", "51.00"), ("economy7", "night", "60.000", "6.00")],
        "standing": [("economy7", "1", "0.60")],
        "vat": [("0.05", "57.60", "2.88")],
        "total": ("57.60", "2.88", "60.48"),
    }


def test_day_night_split_on_the_25_hour_day() -> None:
    # Sunday 2026-10-25, Europe/London: clocks go from 02:00 BST back to 01:00 GMT. The local day
    # runs 2026-10-24T23:00Z .. 2026-10-26T00:00Z: 25 hours. Readings 1000.00 and 1250.00 at those
    # instants: 250 kWh, 10 kWh/h.
    #   night 00:30 BST (10-24T23:30Z) .. 07:30 GMT (07:30Z) = 8 h = 80 kWh × 0.10 = 8.00
    #   day   23:00-23:30Z + 07:30Z-24:00Z = 0.5 + 16.5 = 17 h = 170 kWh × 0.30 = 51.00
    #   standing: one local day (of 25 h) × 0.60 = 0.60
    #   net 59.60, VAT 5 % = 2.98, total 62.58
    readings = [reading("2026-10-24T23:00", "1000.00"), reading("2026-10-26T00:00", "1250.00")]
    b = cost(readings, [Assignment(economy7(), 0)], "2026-10-24T23:00", "2026-10-26T00:00")
    assert summary(b) == {
        "kwh": "250.000",
        "energy": [("economy7", "day", "170.000", "51.00"), ("economy7", "night", "80.000", "8.00")],
        "standing": [("economy7", "1", "0.60")],
        "vat": [("0.05", "59.60", "2.98")],
        "total": ("59.60", "2.98", "62.58"),
    }


def test_no_tariff_means_unpriced_and_mixed_currencies_are_refused() -> None:
    readings = [reading("2026-01-05T00:00", "0"), reading("2026-01-05T10:00", "100")]
    # The tariff starts at 05:00: the first 50 kWh have no price.
    flat = Tariff.flat("flat", D("0.20"))
    b = cost(readings, [Assignment(flat, ms("2026-01-05T05:00"))], "2026-01-05T00:00", "2026-01-05T10:00")
    assert (b.kwh, b.unpriced_kwh, str(b.total)) == (100, 50, "10.00")
    eur = Tariff.flat("eur", D("0.20"), currency="EUR")
    with pytest.raises(CostError, match="different currencies"):
        cost(readings, [Assignment(flat, 0), Assignment(eur, ms("2026-01-05T05:00"))],
             "2026-01-05T00:00", "2026-01-05T10:00")
