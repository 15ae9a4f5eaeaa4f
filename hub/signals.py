"""In-process signals between hub parts that must not import each other.

Billing rejects a manual reading; the alert engine wants to raise a "possible human error" alert.
Ingest stores an anomaly event; the alert engine wants to open an alert. Each producer emits a
:class:`Signal` on the hub's one :class:`SignalBus`; consumers subscribe. Delivery is in-process and
best-effort: a failing subscriber is logged and never breaks the producer (a stored reading or a
refused request must not fail because an e-mail could not be queued).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum

import structlog

log = structlog.get_logger("hub.signals")


class SignalKind(StrEnum):
    """What happened."""

    HUMAN_ERROR = "human_error"  # a person submitted something implausible (manual reading, setpoint)
    ANOMALY_STARTED = "anomaly_started"  # an edge model flagged a device
    ANOMALY_CLEARED = "anomaly_cleared"


@dataclass(frozen=True)
class Signal:
    """One thing a hub part reports to whoever listens."""

    kind: SignalKind
    ts_ms: int
    message: str
    site: str | None = None
    gateway: str | None = None
    device: str | None = None
    """Device uid ``site.gateway.device`` when the signal is about one device."""
    details: dict[str, int | float | str] = field(default_factory=dict)


Subscriber = Callable[[Signal], Awaitable[None]]


class SignalBus:
    """Fan-out of signals to subscribers, in subscription order."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, callback: Subscriber) -> None:
        """Call ``callback`` for every signal emitted from now on."""
        self._subscribers.append(callback)

    async def emit(self, signal: Signal) -> None:
        """Deliver ``signal`` to every subscriber; a subscriber's failure is logged, not raised."""
        for callback in list(self._subscribers):
            try:
                await callback(signal)
            except Exception as exc:  # a consumer must never break the producer
                log.exception("signal_subscriber_failed", kind=signal.kind.value, error=repr(exc))
