"""Live fleet summaries for the dashboard's server-sent events (``GET /api/v1/stream/fleet``).

One :class:`FleetEvents` per hub. Ingest calls :meth:`FleetEvents.on_batch` after every committed
batch; that only sets a flag, so it never delays ingest. A single background task turns the flag
into at most one summary per ``min_interval_s`` (one database query however many browsers are
watching) and hands the encoded summary to each subscriber's bounded queue. A subscriber whose
queue is full is not keeping up (a stalled network peer): it is dropped, its stream ends, and the
browser's ``EventSource`` reconnects and starts from a fresh summary. Status is a function of time
as well as of data (online → stale → offline without any message), so the task also rebuilds the
summary every ``recheck_s`` and publishes it when it differs from the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from protocol.logs import get_logger

log = get_logger("hub.live")

Summary = dict[str, Any]


class Subscription:
    """One client's queue of encoded summaries; ``None`` in it means "the stream is over"."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(size)
        self.dropped = False

    def offer(self, data: str | None) -> None:
        """Queue ``data`` without waiting; a full queue drops the subscriber (ends its stream)."""
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.dropped = True
            # Room for the end marker: the client gets nothing more anyway.
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)


class FleetEvents:
    """Coalesced fleet summaries for any number of stream subscribers."""

    def __init__(self, build: Callable[[], Awaitable[Summary]], *, min_interval_s: float = 1.0,
                 recheck_s: float = 5.0, queue_size: int = 4, max_subscribers: int = 200) -> None:
        self.build = build
        self.min_interval_s = min_interval_s
        self.recheck_s = recheck_s
        self.queue_size = queue_size
        self.max_subscribers = max_subscribers
        self._subs: set[Subscription] = set()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._last: str | None = None

    @property
    def closed(self) -> bool:
        """True once the hub is stopping: streams end, no new ones start."""
        return self._closed

    def on_batch(self, telemetry: Sequence[object], statuses: Sequence[object], events: Sequence[object]) -> None:
        """Ingest's committed-batch hook: mark the summary out of date (never blocks)."""
        self.changed()

    def changed(self) -> None:
        """Something the summary shows may have changed (a batch, an alert, a status)."""
        self._changed.set()

    def subscribe(self) -> Subscription | None:
        """A new subscription; ``None`` when closed or at ``max_subscribers``."""
        if self._closed or len(self._subs) >= self.max_subscribers:
            return None
        sub = Subscription(self.queue_size)
        self._subs.add(sub)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="hub-fleet-events")
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget ``sub`` (its stream ended)."""
        self._subs.discard(sub)

    @staticmethod
    def encode(summary: Summary) -> str:
        """The JSON text of a summary as sent in an event's ``data``."""
        return json.dumps(summary, separators=(",", ":"), sort_keys=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.recheck_s)
            if self._closed:
                break
            self._changed.clear()
            started = loop.time()
            if self._subs:
                try:
                    data = self.encode(await self.build())
                except Exception as exc:  # the database is away: try again on the next change or recheck
                    log.warning("fleet_summary_failed", error=str(exc))
                else:
                    if data != self._last:
                        self._last = data
                        for sub in list(self._subs):
                            sub.offer(data)
                            if sub.dropped:
                                log.info("fleet_stream_dropped", reason="client not keeping up")
                                self._subs.discard(sub)
            # Coalescing: whatever happens in the next second is sent as one summary after it.
            await asyncio.sleep(max(0.0, self.min_interval_s - (loop.time() - started)))

    async def close(self) -> None:
        """End every stream (the hub is stopping) and the background task."""
        self._closed = True
        for sub in list(self._subs):
            sub.offer(None)
        self._subs.clear()
        self._changed.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
