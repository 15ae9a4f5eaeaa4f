"""``[billing]`` section of ``hub.toml`` (``docs/hub.md``, ``docs/billing.md``)."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from hub.billing.consumption import DEFAULT_MAX_POWER_KW, REGISTER_MODULUS_KWH


class BillingConfig(BaseModel):
    """``[billing]``: plausibility limits of meter registers."""

    model_config = ConfigDict(extra="forbid")

    meter_max_power_kw: Annotated[Decimal, Field(gt=0, le=1_000_000)] = DEFAULT_MAX_POWER_KW
    """Rated maximum power of a meter (kW). A reading rising faster than this since the previous one
    is implausible (manual readings are refused); a register drop counts as a rollover only when the
    wrapped-around difference stays below it."""
    register_modulus_kwh: Annotated[Decimal, Field(gt=0)] = REGISTER_MODULUS_KWH
    """Where the cumulative ``energy_import`` register wraps to 0 (2**32 × 0.01 kWh)."""
