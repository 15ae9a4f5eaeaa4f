"""Payment providers: a small interface and a Stripe adapter (official ``stripe`` package).

* :meth:`PaymentProvider.create_checkout` opens a hosted checkout for a statement's total.
* :meth:`PaymentProvider.parse_webhook` verifies a provider's webhook and says what it reports;
  a bad or stale signature raises :class:`WebhookError` (the endpoint answers 400).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

import stripe

from hub.billing.config import PaymentsConfig
from hub.billing.money import minor_exponent


class PaymentError(Exception):
    """The provider could not do what was asked (network, refused request)."""


class WebhookError(ValueError):
    """A webhook that is not authentic, too old, or not readable."""


@dataclass(frozen=True)
class StatementToPay:
    """What a checkout needs of a statement."""

    number: str
    total: Decimal
    currency: str
    description: str


@dataclass(frozen=True)
class CheckoutSession:
    """A hosted checkout page."""

    url: str
    id: str


@dataclass(frozen=True)
class PaymentEvent:
    """A verified webhook event. ``paid`` is True for a completed, paid checkout of ``statement``."""

    id: str
    type: str
    paid: bool
    statement: str | None
    reference: str
    amount: Decimal | None
    currency: str | None


class PaymentProvider(Protocol):
    """A payment provider."""

    name: str

    def create_checkout(self, statement: StatementToPay) -> CheckoutSession: ...

    def parse_webhook(self, payload: bytes, headers: dict[str, str]) -> PaymentEvent: ...


def to_minor(amount: Decimal, currency: str) -> int:
    """``12.34`` GBP -> 1234 (pence); the amount must already be in whole minor units."""
    scaled = amount.scaleb(minor_exponent(currency))
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{amount} is not a whole number of {currency} minor units")
    return int(scaled)


def from_minor(amount: int, currency: str) -> Decimal:
    """1234 pence -> ``12.34``."""
    return Decimal(amount).scaleb(-minor_exponent(currency))


class StripeProvider:
    """Stripe Checkout: one Checkout Session per statement; ``checkout.session.completed`` with
    ``payment_status`` = ``paid`` pays the statement named by ``client_reference_id``."""

    name = "stripe"

    def __init__(self, config: PaymentsConfig) -> None:
        assert config.stripe_secret_key is not None and config.stripe_webhook_secret is not None
        self.config = config
        self._secret = config.stripe_webhook_secret.get_secret_value()
        base = {"api": config.stripe_api_base} if config.stripe_api_base else None
        self.client = stripe.StripeClient(config.stripe_secret_key.get_secret_value(),
                                          base_addresses=base,  # type: ignore[arg-type]
                                          max_network_retries=2)

    def create_checkout(self, statement: StatementToPay) -> CheckoutSession:
        """Create a Checkout Session (blocking: call it in a worker thread)."""
        params: dict[str, Any] = {
            "mode": "payment",
            "client_reference_id": statement.number,
            "metadata": {"statement": statement.number},
            "success_url": self.config.success_url.replace("{number}", statement.number),
            "cancel_url": self.config.cancel_url.replace("{number}", statement.number),
            "line_items": [{"quantity": 1, "price_data": {
                "currency": statement.currency.lower(),
                "unit_amount": to_minor(statement.total, statement.currency),
                "product_data": {"name": f"Statement {statement.number}", "description": statement.description},
            }}],
        }
        try:
            session = self.client.v1.checkout.sessions.create(params=params)  # type: ignore[arg-type]
        except stripe.StripeError as exc:
            raise PaymentError(f"Stripe refused the checkout: {exc.user_message or exc}") from exc
        return CheckoutSession(url=str(session.url), id=str(session.id))

    def parse_webhook(self, payload: bytes, headers: dict[str, str]) -> PaymentEvent:
        """Verify the ``Stripe-Signature`` header and read the event."""
        signature = {k.lower(): v for k, v in headers.items()}.get("stripe-signature")
        if not signature:
            raise WebhookError("missing Stripe-Signature header")
        try:
            event = stripe.Webhook.construct_event(payload, signature, self._secret,
                                                   tolerance=self.config.webhook_tolerance_s)
        except stripe.SignatureVerificationError as exc:
            raise WebhookError(f"signature verification failed: {exc.user_message or exc}") from None
        except ValueError as exc:
            raise WebhookError(f"not a Stripe event: {exc}") from None
        obj: dict[str, Any] = event.data.object.to_dict()
        if event.type != "checkout.session.completed":
            return PaymentEvent(event.id, event.type, False, None, "", None, None)
        number = obj.get("client_reference_id") or (obj.get("metadata") or {}).get("statement")
        currency = str(obj.get("currency") or "").upper() or None
        amount_minor = obj.get("amount_total")
        amount = (from_minor(int(amount_minor), currency)
                  if currency is not None and amount_minor is not None else None)
        return PaymentEvent(event.id, event.type, obj.get("payment_status") == "paid", number,
                            str(obj.get("id") or ""), amount, currency)


def provider_for(config: PaymentsConfig) -> PaymentProvider | None:
    """The configured provider, or ``None`` when payments are off."""
    if config.provider == "stripe":
        return StripeProvider(config)
    return None
