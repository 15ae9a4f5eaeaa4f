"""``[billing]`` and ``[payments]`` sections of ``hub.toml`` (``docs/hub.md``, ``docs/billing.md``)."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from hub.billing.consumption import DEFAULT_MAX_POWER_KW, REGISTER_MODULUS_KWH

Email = Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+$", max_length=254)]
Url = Annotated[str, Field(pattern=r"^https?://\S+$", max_length=1000)]


class BillingConfig(BaseModel):
    """``[billing]``: plausibility limits of meter registers; where statements are e-mailed."""

    model_config = ConfigDict(extra="forbid")

    meter_max_power_kw: Annotated[Decimal, Field(gt=0, le=1_000_000)] = DEFAULT_MAX_POWER_KW
    """Rated maximum power of a meter (kW). A reading rising faster than this since the previous one
    is implausible (manual readings are refused); a register drop counts as a rollover only when the
    wrapped-around difference stays below it."""
    register_modulus_kwh: Annotated[Decimal, Field(gt=0)] = REGISTER_MODULUS_KWH
    """Where the cumulative ``energy_import`` register wraps to 0 (2**32 × 0.01 kWh)."""
    supplier_email: Email = "alex@azzotto.com"
    """Where statements are e-mailed (through the ``[alerts.smtp]`` server)."""
    issuer: Annotated[str, Field(max_length=200)] = "Digital twin hub"
    """Name printed at the top of statements."""
    send_on_close: bool = False
    """E-mail each statement to the supplier as soon as it is closed."""
    send_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    """Tries per statement e-mail (connection errors and 4xx/5xx server answers are retried)."""
    send_retry_s: Annotated[float, Field(ge=0, le=300)] = 2.0
    """Wait before the second try, doubling before each further one."""


class PaymentsConfig(BaseModel):
    """``[payments]``: the payment provider statements are paid through (``none`` = payments off:
    the payment endpoints answer 503)."""

    model_config = ConfigDict(extra="forbid")

    provider: Literal["none", "stripe"] = "none"
    stripe_secret_key: SecretStr | None = None
    """Stripe API key (``sk_live_...`` / ``sk_test_...``) used to create Checkout Sessions."""
    stripe_webhook_secret: SecretStr | None = None
    """Signing secret of the webhook endpoint (``whsec_...``), checked on every webhook."""
    stripe_api_base: Url | None = None
    """Override of ``https://api.stripe.com`` (a mock server in tests); unset in production."""
    webhook_tolerance_s: Annotated[int, Field(ge=1, le=86_400)] = 300
    """A webhook signed longer ago than this is refused (replay protection)."""
    success_url: Url = "http://127.0.0.1:8000/api/v1/statements/{number}"
    """Where Stripe sends the payer after paying; ``{number}`` is replaced by the statement number."""
    cancel_url: Url = "http://127.0.0.1:8000/api/v1/statements/{number}"
    """Where Stripe sends the payer who cancels."""

    @model_validator(mode="after")
    def _stripe_needs_keys(self) -> PaymentsConfig:
        if self.provider == "stripe" and (self.stripe_secret_key is None or self.stripe_webhook_secret is None):
            raise ValueError("provider 'stripe' needs stripe_secret_key and stripe_webhook_secret")
        return self
