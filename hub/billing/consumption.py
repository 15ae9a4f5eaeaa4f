"""From a meter's cumulative register readings to consumption intervals (pure functions).

The energy a meter measured between two readings is the difference of its register, never a sum of
power readings. :func:`intervals` makes that difference right when

* the register **rolls over** (a 32-bit counter of 0.01 kWh wraps at 42,949,672.96 kWh; the modulus
  is a parameter): a drop is a rollover when ``later + modulus - earlier`` is plausible, i.e. at most
  ``max_power_kw`` × the hours between the readings;
* the **meter is replaced**: a manual reading marked ``replacement`` starts a new register (new
  serial, usually at 0); the interval before it is unmeasured (0 kWh) unless a final reading of the
  old meter was submitted just before it. A drop that is no plausible rollover (a replaced or reset
  meter nobody recorded) is treated the same way: an unmeasured interval, never a negative or a
  wrapped-around consumption;
* readings **arrive out of order** (they are sorted by time) or **twice** (the same time and value:
  kept once; the same time with different values: the first by replacement, manual, meter order,
  then the larger value, is kept and the others reported in :attr:`Series.conflicts`);
* there are **gaps**: the consumption between two readings, however far apart, is exact; how it is
  spread over the time between them is unknown, so it is attributed **linearly** (constant power)
  when an interval has to be cut (at the edges of a billing period, at band boundaries, at tariff
  changes): the part of an interval inside a range is ``kWh × overlap / duration``.

Quantities are exact: register values are :class:`~decimal.Decimal`, apportioned energy is a
:class:`~fractions.Fraction`, so the parts always add up to the whole.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction

REGISTER_MODULUS_KWH = Decimal("42949672.96")
"""2**32 × 0.01 kWh: where the simulated meter's uint32 register (scale 0.01) wraps to 0."""
DEFAULT_MAX_POWER_KW = Decimal(1000)
"""Generous default for a meter's rated maximum power (1 MW)."""
MS_PER_HOUR = 3_600_000


class Source(StrEnum):
    """Where a register reading came from."""

    METER = "meter"  # telemetry (energy_import)
    MANUAL = "manual"  # submitted through the API


class Kind(StrEnum):
    """How the energy of an interval was established."""

    MEASURED = "measured"  # later - earlier
    ROLLOVER = "rollover"  # later + modulus - earlier
    REPLACEMENT = "replacement"  # a new meter starts: unmeasured, 0 kWh
    RESET = "reset"  # the register dropped without a plausible rollover: unmeasured, 0 kWh


@dataclass(frozen=True)
class RegisterReading:
    """One reading of the cumulative register (kWh) at ``ts_ms``."""

    ts_ms: int
    value: Decimal
    source: Source = Source.METER
    replacement: bool = False
    """The first reading of a new meter (manual readings only)."""
    serial: str = ""

    def rank(self) -> int:
        """Precedence among readings of the same time (lower wins)."""
        if self.replacement:
            return 0
        return 1 if self.source is Source.MANUAL else 2


@dataclass(frozen=True)
class Interval:
    """Energy measured over ``[start_ms, end_ms)``."""

    start_ms: int
    end_ms: int
    kwh: Fraction
    kind: Kind = Kind.MEASURED

    @property
    def duration_ms(self) -> int:
        """Length in milliseconds (> 0)."""
        return self.end_ms - self.start_ms

    def part(self, start_ms: int, end_ms: int) -> Fraction:
        """Energy attributed to ``[start, end)`` ∩ this interval by linear interpolation."""
        overlap = min(end_ms, self.end_ms) - max(start_ms, self.start_ms)
        if overlap <= 0:
            return Fraction(0)
        if overlap == self.duration_ms:
            return self.kwh
        return self.kwh * overlap / self.duration_ms


@dataclass
class Series:
    """A meter's readings after sorting and deduplication, and its intervals."""

    readings: list[RegisterReading]
    intervals: list[Interval]
    duplicates: int = 0
    """Readings dropped as exact duplicates (same time and value)."""
    conflicts: list[RegisterReading] = field(default_factory=list)
    """Readings dropped because another reading of the same time had another value."""


def plausible_max_kwh(start_ms: int, end_ms: int, max_power_kw: Decimal) -> Fraction:
    """The most a meter of ``max_power_kw`` can measure in ``[start, end)``."""
    return Fraction(max_power_kw) * Fraction(end_ms - start_ms, MS_PER_HOUR)


def delta(earlier: RegisterReading, later: RegisterReading, modulus: Decimal,
          max_power_kw: Decimal) -> tuple[Fraction, Kind]:
    """Energy between two consecutive readings of a register and how it was established."""
    if later.replacement:
        return Fraction(0), Kind.REPLACEMENT
    d = later.value - earlier.value
    if d >= 0:
        return Fraction(d), Kind.MEASURED
    wrapped = d + modulus
    if 0 <= wrapped <= plausible_max_kwh(earlier.ts_ms, later.ts_ms, max_power_kw):
        return Fraction(wrapped), Kind.ROLLOVER
    return Fraction(0), Kind.RESET


def dedupe(readings: Iterable[RegisterReading]) -> tuple[list[RegisterReading], int, list[RegisterReading]]:
    """Sorted by time, one reading per time: ``(kept, exact duplicates dropped, conflicting dropped)``."""
    ordered = sorted(readings, key=lambda r: (r.ts_ms, r.rank(), -r.value))
    kept: list[RegisterReading] = []
    duplicates = 0
    conflicts: list[RegisterReading] = []
    seen: set[tuple[int, Decimal]] = set()
    for r in ordered:
        if (r.ts_ms, r.value) in seen:
            duplicates += 1
            continue
        seen.add((r.ts_ms, r.value))
        if kept and kept[-1].ts_ms == r.ts_ms:
            conflicts.append(r)
            continue
        kept.append(r)
    return kept, duplicates, conflicts


def intervals(readings: Iterable[RegisterReading], modulus: Decimal = REGISTER_MODULUS_KWH,
              max_power_kw: Decimal = DEFAULT_MAX_POWER_KW) -> Series:
    """Consumption intervals between consecutive readings (any order, duplicates allowed)."""
    kept, duplicates, conflicts = dedupe(readings)
    out = []
    for earlier, later in itertools.pairwise(kept):
        kwh, kind = delta(earlier, later, modulus, max_power_kw)
        out.append(Interval(earlier.ts_ms, later.ts_ms, kwh, kind))
    return Series(kept, out, duplicates, conflicts)


def consumption(ivs: Sequence[Interval], start_ms: int, end_ms: int) -> Fraction:
    """Energy attributed to ``[start, end)`` (linear interpolation inside intervals)."""
    return sum((iv.part(start_ms, end_ms) for iv in ivs), Fraction(0))
