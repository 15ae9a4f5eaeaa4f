"""Exact money arithmetic: :class:`~decimal.Decimal` amounts, rounded to the currency's minor unit
with ROUND_HALF_UP at fixed points only (``docs/billing.md``, "Rounding").

Energy quantities that come out of apportioning (linear interpolation between readings, splitting at
band boundaries) are exact :class:`~fractions.Fraction` values, so the parts of a consumption always
add up to the whole; they meet money only in :func:`line_amount`, which rounds once. Floats never
touch money: :func:`parse_decimal` refuses them.
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from fractions import Fraction

# ISO 4217 minor-unit exponents; anything else is refused (extend when a currency is needed).
MINOR_UNITS: dict[str, int] = {
    "GBP": 2, "EUR": 2, "USD": 2, "CHF": 2, "SEK": 2, "NOK": 2, "DKK": 2, "PLN": 2, "CZK": 2, "HUF": 2,
    "CAD": 2, "AUD": 2, "NZD": 2, "JPY": 0, "KRW": 0, "ISK": 0, "BHD": 3, "KWD": 3,
}

KWH_PLACES = 3
"""Decimal places of kWh figures in answers (display only; costs use the exact quantity)."""

Quantity = Fraction | Decimal | int


class MoneyError(ValueError):
    """A value that cannot be used as money (float, NaN, unknown currency)."""


def minor_exponent(currency: str) -> int:
    """Decimal places of ``currency``'s minor unit (GBP: 2, JPY: 0)."""
    try:
        return MINOR_UNITS[currency]
    except KeyError:
        raise MoneyError(f"unsupported currency {currency!r} (one of {', '.join(sorted(MINOR_UNITS))})") from None


def parse_decimal(value: object, what: str = "value") -> Decimal:
    """``value`` (a ``str``, ``int`` or ``Decimal``) as a finite Decimal; floats are refused because
    ``0.1`` as a float is not 0.1."""
    if isinstance(value, (bool, float)):
        raise MoneyError(f"{what} must be a decimal string such as \"0.245\", not a binary float")
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, str):
        try:
            d = Decimal(value.strip())
        except InvalidOperation:
            raise MoneyError(f"{what} {value!r} is not a decimal number") from None
    else:
        raise MoneyError(f"{what} must be a decimal string, not {type(value).__name__}")
    if not d.is_finite():
        raise MoneyError(f"{what} must be a finite number")
    return d


def round_fraction(value: Quantity, places: int) -> Decimal:
    """``value`` rounded to ``places`` decimal places, ties away from zero (ROUND_HALF_UP), exactly."""
    f = Fraction(value)
    scaled = f * (10 ** places)
    magnitude = math.floor(abs(scaled) + Fraction(1, 2))
    n = magnitude if scaled >= 0 else -magnitude
    return Decimal(n).scaleb(-places) if places else Decimal(n)


def quantize(value: Quantity, currency: str) -> Decimal:
    """``value`` rounded to the minor unit of ``currency`` (ROUND_HALF_UP): ``Decimal("12.34")``."""
    places = minor_exponent(currency)
    if isinstance(value, Decimal):
        return value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    return round_fraction(value, places)


def line_amount(quantity: Quantity, unit_price: Decimal, currency: str) -> Decimal:
    """One line item: ``quantity × unit_price`` computed exactly, then rounded once to the minor unit."""
    return quantize(Fraction(quantity) * Fraction(unit_price), currency)


def vat_amount(net: Decimal, rate: Decimal, currency: str) -> Decimal:
    """VAT on ``net`` (a sum of already rounded lines) at ``rate`` (``0.2`` for 20 %), rounded once."""
    return quantize(Fraction(net) * Fraction(rate), currency)


def kwh(value: Quantity) -> Decimal:
    """An energy quantity for display: :data:`KWH_PLACES` decimals, ROUND_HALF_UP."""
    return round_fraction(value, KWH_PLACES)


def fmt(amount: Decimal, currency: str) -> str:
    """An amount as the API shows it: ``"12.34"`` (always the minor unit's number of decimals)."""
    return str(quantize(amount, currency))
