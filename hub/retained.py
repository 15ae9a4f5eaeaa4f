"""One retained message per gateway, kept current: the shared mechanism of the hub's downlinks.

Model assignments (:mod:`hub.rollout`) and desired device configurations (:mod:`hub.gateway_config`)
are both a retained QoS 1 message per gateway that the hub re-publishes when something changes.
:class:`RetainedPerGateway` does the publishing: :meth:`~RetainedPerGateway.mark` the changed
gateways and one task (:meth:`~RetainedPerGateway.run`) sends them one at a time (QoS 1 keeps their
order per connection). Marks coalesce; each message is computed from the database when it is
sent; a failure keeps the gateway marked and is retried with back-off; after every
(re)subscription the ingest calls :meth:`~RetainedPerGateway.mark_all`.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Protocol

from protocol.logs import get_logger

log = get_logger("hub.retained")

GatewayKey = tuple[str, str]
"""(site, gateway)."""


class Publisher(Protocol):
    """The MQTT side messages go out through (:class:`hub.ingest.Ingest`)."""

    subscribed: asyncio.Event

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      timeout_s: float = 10.0) -> None: ...


class RetainedPerGateway(ABC):
    """Keeps one retained message per gateway current; subclasses say what and for whom."""

    failure_event = "retained_publish_failed"
    """Log event of a failed publication (subclasses name their own)."""

    def __init__(self, publisher: Publisher | None) -> None:
        self.publisher = publisher
        self.published = 0
        """Messages acknowledged by the broker since start."""
        self._dirty: set[GatewayKey] = set()
        self._all = False
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()

    @abstractmethod
    async def all_gateways(self) -> Iterable[GatewayKey]:
        """Every gateway that has a message (what :meth:`mark_all` means)."""

    @abstractmethod
    async def publish_one(self, publisher: Publisher, site: str, gateway: str) -> object:
        """Compute and publish one gateway's message (retained, QoS 1); raises on failure."""

    async def before_publishing(self) -> None:
        """Called on every wake-up before publishing (e.g. to record the gateways' reports)."""
        return None  # a hook: nothing to do by default

    def publish_failed(self) -> None:
        """Called for every failed publication (e.g. to count it)."""
        return None  # a hook: nothing to do by default

    @property
    def pending(self) -> int:
        """Gateways marked and not yet published (``-1``: all known gateways are due)."""
        return -1 if self._all else len(self._dirty)

    def mark(self, *gateways: GatewayKey) -> None:
        """Publish these gateways' messages (soon, and again after a failure)."""
        self._dirty.update(gateways)
        self._wake.set()

    def mark_all(self) -> None:
        """Publish every gateway's message (the ingest calls it on every (re)subscription)."""
        self._all = True
        self._wake.set()

    def wake(self) -> None:
        """Run a round now (something for :meth:`before_publishing` arrived)."""
        self._wake.set()

    async def stop(self) -> None:
        """Make :meth:`run` return (what is still marked is published at the next start)."""
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        """Publish marked gateways until :meth:`stop`; failures are retried with back-off."""
        backoff = 0.2
        while not self._stop.is_set():
            await self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                break
            await self.before_publishing()
            publisher = self.publisher
            if publisher is None or not publisher.subscribed.is_set() or not (self._dirty or self._all):
                continue  # the ingest calls mark_all() once it is subscribed (again)
            if await self._publish_marked(publisher):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)
                self._wake.set()
            else:
                backoff = 0.2

    async def _publish_marked(self, publisher: Publisher) -> bool:
        """Publish what is marked; whether anything failed (and stays marked)."""
        targets, self._dirty = self._dirty, set()
        if self._all:
            self._all = False
            try:
                targets |= set(await self.all_gateways())
            except Exception as exc:  # database away: try again later
                self._all = True
                self._dirty |= targets
                log.warning(self.failure_event, gateways="all", error=str(exc))
                return True
        failed = False
        queue = sorted(targets)
        for i, key in enumerate(queue):
            if self._stop.is_set() or not publisher.subscribed.is_set():
                # Stopping, or the connection is gone (re-subscribing marks every gateway anyway).
                self._dirty.update(queue[i:])
                break
            try:
                await self.publish_one(publisher, *key)
            except Exception as exc:  # broker or database away: keep it marked, retry
                self._dirty.add(key)
                failed = True
                self.publish_failed()
                log.warning(self.failure_event, site=key[0], gateway=key[1], error=str(exc))
        return failed
