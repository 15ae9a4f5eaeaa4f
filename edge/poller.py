"""Per-device polling loop: fixed-rate schedules per interval group, exponential back-off.

Points may have their own intervals (a profile's ``interval_s``); points sharing an interval
form a group with its own deadline, and groups that fall due together are read in one poll, so
the planner can still merge their registers into few requests.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping
from typing import Protocol

from edge.drivers.base import DeviceError, Driver
from edge.metrics import EdgeMetrics
from edge.reading import Reading
from protocol.logs import get_logger
from protocol.schema import Quality, Value

log = get_logger("edge.poller")

DUE_SLACK_S = 0.002
"""Groups due within this much of each other are read in the same poll."""


class ReadingSink(Protocol):
    """Where a poller delivers readings (the buffer)."""

    async def submit(self, readings: list[Reading]) -> None:
        """Accept readings."""
        ...


class _Group:
    __slots__ = ("deadline", "interval", "metrics")

    def __init__(self, interval: float, metrics: frozenset[str], deadline: float) -> None:
        self.interval = interval
        self.metrics = metrics
        self.deadline = deadline


class DevicePoller:
    """Polls one device and hands its readings to the buffer."""

    def __init__(self, name: str, driver: Driver, interval: float, backoff_max: float, buffer: ReadingSink,
                 metrics: EdgeMetrics, intervals: Mapping[str, float] | None = None) -> None:
        self.name = name
        self.driver = driver
        self.units = driver.units
        self.interval = interval
        by_interval: dict[float, set[str]] = {}
        for metric in self.units:
            by_interval.setdefault((intervals or {}).get(metric, interval), set()).add(metric)
        self._groups = [_Group(i, frozenset(m), 0.0) for i, m in sorted(by_interval.items())]
        self.base_interval = min(by_interval, default=interval)
        self.backoff_max = max(backoff_max, self.base_interval)
        self.buffer = buffer
        self.metrics = metrics
        self.failures = 0
        self._stopping = False
        self._io = asyncio.Lock()
        """Held around every read and write: a setpoint write goes out between two polls, never
        interleaved with one on the same connection."""

    def stop(self) -> None:
        """Ask :meth:`run` to end after the current poll (cancellation alone is not enough: on
        Python 3.11 ``asyncio.wait_for`` inside pymodbus' connect can swallow a cancel that
        lands as the connection completes)."""
        self._stopping = True

    async def poll_once(self, metrics: frozenset[str] | None = None) -> list[Reading]:
        """One poll of ``metrics`` (default all): good readings, or bad-quality readings (value
        null) for what failed."""
        wanted = frozenset(self.units) if metrics is None else metrics
        ts = time.time_ns() // 1_000_000
        t0 = time.perf_counter()
        try:
            async with self._io:
                results = await self.driver.read(None if metrics is None else wanted)
        except DeviceError as exc:
            self.metrics.poll_errors.labels(self.name, exc.kind).inc()
            self.metrics.polls.labels(self.name, "failed").inc()
            if self.failures == 0:
                log.warning("device_unreachable", device=self.name, kind=exc.kind, error=str(exc))
            self.failures += 1
            return [Reading(self.name, m, ts, None, self.units[m], Quality.BAD) for m in sorted(wanted)]
        finally:
            self.metrics.poll_duration.labels(self.name).observe(time.perf_counter() - t0)
        readings = []
        errors: Counter[str] = Counter()
        seen = set()
        for r in results:
            seen.add(r.name)
            if r.error is None:
                readings.append(Reading(self.name, r.name, ts, r.value, self.units[r.name]))
            else:
                errors[r.error] += 1
                readings.append(Reading(self.name, r.name, ts, None, self.units[r.name], Quality.BAD))
        for missing in sorted(wanted - seen):  # e.g. an OBIS code the meter did not send
            errors["missing"] += 1
            readings.append(Reading(self.name, missing, ts, None, self.units[missing], Quality.BAD))
        for kind, n in errors.items():
            self.metrics.poll_errors.labels(self.name, kind).inc(n)
        if readings and all(r.quality is Quality.BAD for r in readings):
            # It answers, but only with exceptions or bad frames: as useless as a silent device,
            # and as deserving of back-off.
            self.metrics.polls.labels(self.name, "failed").inc()
            if self.failures == 0:
                log.warning("device_failing", device=self.name, errors=dict(errors))
            self.failures += 1
            return readings
        if self.failures:
            log.info("device_recovered", device=self.name, after_failures=self.failures)
        self.failures = 0
        self.metrics.polls.labels(self.name, "partial" if errors else "ok").inc()
        return readings

    async def write(self, point: str, value: float) -> Value:
        """Write a setpoint through this device's driver once the poll in progress (if any) has
        finished; returns the value read back. Raises :class:`DeviceError` like
        :meth:`edge.drivers.base.Driver.write`."""
        async with self._io:
            return await self.driver.write(point, value)

    def _next_delay(self) -> float:
        """Back-off after ``failures`` consecutive failed polls (0 when healthy)."""
        if not self.failures:
            return 0.0
        return min(self.base_interval * 2.0 ** min(self.failures, 30), self.backoff_max)

    async def run(self) -> None:
        """Poll every group on its fixed-rate schedule until cancelled."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for g in self._groups:
            g.deadline = now
        try:
            while not self._stopping:
                now = loop.time()
                due = [g for g in self._groups if g.deadline <= now + DUE_SLACK_S]
                if not due:
                    await asyncio.sleep(min(g.deadline for g in self._groups) - now)
                    continue
                wanted = frozenset().union(*(g.metrics for g in due))
                readings = await self.poll_once(None if len(due) == len(self._groups) else wanted)
                counts = Counter(r.quality for r in readings)
                for quality, n in counts.items():
                    self.metrics.readings.labels(self.name, quality).inc(n)
                await self.buffer.submit(readings)
                backoff = self._next_delay()
                now = loop.time()
                for g in due:
                    # Deadlines advance by whole intervals from the start, so the schedule does
                    # not drift by the poll duration; a poll that overruns skips slots instead
                    # of bunching; a failing device waits out its back-off first.
                    g.deadline += g.interval
                    if backoff:
                        g.deadline = max(g.deadline, now + backoff)
                    if g.deadline < now:
                        missed = int((now - g.deadline) / g.interval) + 1
                        self.metrics.poll_overruns.labels(self.name).inc(missed)
                        g.deadline += missed * g.interval
        finally:
            await self.driver.close()
