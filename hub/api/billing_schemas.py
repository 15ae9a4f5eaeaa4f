"""Request and response models of the billing API (``docs/billing.md``).

Money, rates and kWh travel as decimal **strings** (``"12.34"``): a JSON number would be read as a
binary float. Requests may give them as strings or integers; a JSON number with a fraction is refused.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from protocol.ids import NAME_PATTERN


def _no_float(value: Any) -> Any:
    if isinstance(value, bool | float):
        raise ValueError('give decimal numbers as strings, e.g. "0.245": a JSON number with a fraction is a '
                         'binary float and not exact')
    return value


def _places(places: int) -> Any:
    def check(value: Decimal) -> Decimal:
        if not value.is_finite():
            raise ValueError("must be a finite number")
        exponent = value.as_tuple().exponent
        assert isinstance(exponent, int)
        if -exponent > places:
            raise ValueError(f"at most {places} decimal places")
        return value
    return AfterValidator(check)


Rate = Annotated[Decimal, BeforeValidator(_no_float), _places(6), Field(ge=0, lt=Decimal("1e8"))]
VatRate = Annotated[Decimal, BeforeValidator(_no_float), _places(4), Field(ge=0, lt=1)]
RegisterValue = Annotated[Decimal, BeforeValidator(_no_float), _places(3), Field(lt=Decimal("1e13"))]
HhMm = Annotated[str, Field(pattern=r"^\d\d:\d\d$", examples=["07:30"])]
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]


class BandIn(BaseModel):
    """A band of a tariff: a rate over local times of day; the default 00:00–00:00 is the whole day."""

    model_config = ConfigDict(extra="forbid")

    name: Name = Field(examples=["day"])
    rate: Rate = Field(description="Price per kWh in major units, before VAT, as a string", examples=["0.2450"])
    start: HhMm = Field(default="00:00", description="Local time the band starts (inclusive)")
    end: HhMm = Field(default="00:00", description="Local time it ends (exclusive); earlier than start wraps "
                                                    "past midnight; equal to start: all day")
    days: Literal["all", "weekday", "weekend"] = Field(
        default="all", description="weekday = Monday-Friday, weekend = Saturday and Sunday (local calendar day)")


class TariffIn(BaseModel):
    """Body of ``POST /api/v1/tariffs``. A flat rate is a single band without times."""

    model_config = ConfigDict(extra="forbid")

    name: Name = Field(examples=["economy7-2026"])
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$", examples=["GBP"])]
    timezone: Annotated[str, Field(max_length=64, examples=["Europe/London"])] = "Europe/London"
    vat_rate: VatRate = Field(description="Fraction as a string: \"0.05\" for 5 %", examples=["0.05"])
    standing_charge_per_day: Rate = Field(default=Decimal(0), description="Per local day, major units, before VAT",
                                          examples=["0.6012"])
    effective_from: datetime = Field(description="ISO 8601 (no zone = UTC); assignments cannot start earlier")
    bands: Annotated[list[BandIn], Field(min_length=1, max_length=48)]


class BandOut(BaseModel):
    """A band as stored."""

    name: str
    rate: str
    start: str
    end: str
    days: str


class TariffOut(BaseModel):
    """A stored tariff."""

    id: int
    name: str
    currency: str
    timezone: str
    vat_rate: str
    standing_charge_per_day: str
    effective_from: str | None
    bands: list[BandOut]
    created_at: str | None
    created_by: str


class AssignmentIn(BaseModel):
    """Body of ``POST /api/v1/tariff-assignments``: exactly one of ``meter`` and ``site``."""

    model_config = ConfigDict(extra="forbid")

    tariff: Name = Field(description="Tariff name")
    meter: Annotated[str, Field(max_length=200)] | None = Field(
        default=None, description="Meter uid `site.gateway.device`", examples=["plant1.gw1.meter1"])
    site: Name | None = Field(default=None, description="Site name: every meter of the site without its own "
                                                        "assignment")
    effective_from: datetime = Field(description="ISO 8601 (no zone = UTC); in force until the target's next "
                                                 "assignment")

    @model_validator(mode="after")
    def _one_target(self) -> AssignmentIn:
        if (self.meter is None) == (self.site is None):
            raise ValueError("give exactly one of 'meter' and 'site'")
        return self


class AssignmentOut(BaseModel):
    """A stored assignment."""

    id: int
    tariff: str
    meter: str | None
    site: str | None
    effective_from: str | None
    created_at: str | None
    created_by: str


class ManualReadingIn(BaseModel):
    """Body of ``POST /api/v1/meters/{id}/readings``."""

    model_config = ConfigDict(extra="forbid")

    value: RegisterValue = Field(description="Register reading in kWh (a string, or an integer), at most 3 "
                                             "decimals", examples=["12345.67"])
    ts: datetime = Field(description="When it was read, ISO 8601 (no zone = UTC)")
    replacement: bool = Field(default=False, description="First reading of a new meter (after a replacement)")
    serial: Annotated[str, Field(max_length=64)] = Field(default="", description="Serial number of the meter read")


class RegisterReadingOut(BaseModel):
    """A register reading."""

    value: str
    ts: str | None
    source: Literal["meter", "manual"]
    replacement: bool


class ManualReadingOut(BaseModel):
    """A stored manual reading with the one before it."""

    id: int
    meter: str
    value: str
    ts: str | None
    replacement: bool
    serial: str
    submitted_by: str
    created_at: str | None
    previous: RegisterReadingOut | None
    consumption_kwh: str | None = Field(description="Energy since the previous reading (null: none, or a "
                                                    "replacement)")


class EnergyLineOut(BaseModel):
    """Energy of one band of one tariff."""

    tariff: str
    band: str
    kwh: str = Field(description="kWh, 3 decimals (the amount uses the exact figure)")
    rate: str
    amount: str


class StandingLineOut(BaseModel):
    """Standing charge of one tariff."""

    tariff: str
    days: str = Field(description="Local days, 4 decimals (part-days as their fraction of that day)")
    rate_per_day: str
    amount: str


class VatLineOut(BaseModel):
    """VAT at one rate."""

    rate: str
    net: str
    amount: str


class UnmeasuredOut(BaseModel):
    """An interval whose energy is unknown (counted 0): a meter replacement or an unexplained reset."""

    start: str | None
    end: str | None
    kind: Literal["replacement", "reset"]


class CostOut(BaseModel):
    """``GET /api/v1/meters/{id}/cost``."""

    meter: str
    since: str | None
    until: str | None
    currency: str | None = Field(description="null when no tariff is in force in the range")
    consumption_kwh: str
    unpriced_kwh: str = Field(description="Consumption in parts of the range without a tariff (not charged)")
    measured_from: str | None = Field(description="Readings cover the range from here ... (null: no readings)")
    measured_until: str | None = Field(description="... to here; consumption after it is not known yet")
    readings: int = Field(description="Register readings used (telemetry thinned to the first and last of each "
                                      "minute, and manual readings; after deduplication)")
    duplicates: int
    conflicts: int = Field(description="Readings dropped because another of the same time had another value")
    energy: list[EnergyLineOut]
    standing_charge: list[StandingLineOut]
    vat: list[VatLineOut]
    net: str
    vat_total: str
    total: str
    unmeasured: list[UnmeasuredOut]
