"""The units a reading may carry. One spelling per unit so the hub never has to guess whether
``°C``, ``C`` and ``degC`` are the same thing."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

UNITS: dict[str, str] = {
    "": "dimensionless (states, codes, counters)",
    "degC": "degree Celsius",
    "K": "kelvin (temperature differences)",
    "bar": "bar (gauge pressure)",
    "%": "percent",
    "m3/h": "cubic metres per hour",
    "l/min": "litres per minute",
    "h": "hours",
    "s": "seconds",
    "kWh": "kilowatt-hours (energy)",
    "Wh": "watt-hours (energy)",
    "kW": "kilowatts (power)",
    "W": "watts (power)",
    "kvar": "kilovolt-ampere reactive",
    "kVA": "kilovolt-ampere",
    "V": "volts",
    "A": "amperes",
    "Hz": "hertz",
    "mm/s": "millimetres per second (vibration velocity)",
}


def is_known_unit(unit: str) -> bool:
    """True for a unit spelled as listed in :data:`UNITS`."""
    return unit in UNITS


def _check_unit(unit: str) -> str:
    if not is_known_unit(unit):
        raise ValueError(f"unknown unit {unit!r}; use one of {sorted(UNITS)}")
    return unit


Unit = Annotated[str, AfterValidator(_check_unit)]
"""A unit spelled as listed in :data:`UNITS` (validated)."""
