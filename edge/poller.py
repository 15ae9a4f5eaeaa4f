"""Per-device polling loop: fixed-rate schedule, exponential back-off on failure."""

from __future__ import annotations

import asyncio
import time

from edge.buffer import ReadingBuffer
from edge.drivers.base import DeviceError, Driver
from edge.metrics import EdgeMetrics
from edge.reading import Reading
from protocol.logs import get_logger
from protocol.profile import DeviceProfile
from protocol.schema import Quality

log = get_logger("edge.poller")


class DevicePoller:
    """Polls one device every ``interval`` seconds and hands its readings to the buffer."""

    def __init__(self, name: str, driver: Driver, profile: DeviceProfile, interval: float,
                 backoff_max: float, buffer: ReadingBuffer, metrics: EdgeMetrics) -> None:
        self.name = name
        self.driver = driver
        self.units = {p.name: p.unit for p in profile.points}
        self.interval = interval
        self.backoff_max = max(backoff_max, interval)
        self.buffer = buffer
        self.metrics = metrics
        self.failures = 0

    async def poll_once(self) -> list[Reading]:
        """One poll: good readings, or bad-quality readings (value null) for what failed."""
        ts = time.time_ns() // 1_000_000
        t0 = time.perf_counter()
        try:
            results = await self.driver.read()
        except DeviceError as exc:
            self.metrics.poll_errors.labels(self.name, exc.kind).inc()
            self.metrics.polls.labels(self.name, "failed").inc()
            if self.failures == 0:
                log.warning("device_unreachable", device=self.name, kind=exc.kind, error=str(exc))
            self.failures += 1
            return [Reading(self.name, m, ts, None, u, Quality.BAD) for m, u in self.units.items()
                    if m in self._polled]
        finally:
            self.metrics.poll_duration.labels(self.name).observe(time.perf_counter() - t0)
        if self.failures:
            log.info("device_recovered", device=self.name, after_failures=self.failures)
        self.failures = 0
        readings = []
        errors = 0
        for r in results:
            if r.error is None:
                readings.append(Reading(self.name, r.name, ts, r.value, self.units[r.name]))
            else:
                errors += 1
                self.metrics.poll_errors.labels(self.name, r.error).inc()
                readings.append(Reading(self.name, r.name, ts, None, self.units[r.name], Quality.BAD))
        self.metrics.polls.labels(self.name, "partial" if errors else "ok").inc()
        return readings

    @property
    def _polled(self) -> set[str]:
        requests = getattr(self.driver, "requests", None)
        if requests is None:
            return set(self.units)
        return {p.name for req in requests for p in req.points}

    def _next_delay(self) -> float:
        if not self.failures:
            return self.interval
        return min(self.interval * 2.0 ** min(self.failures, 30), self.backoff_max)

    async def run(self) -> None:
        """Poll on a fixed-rate schedule until cancelled."""
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        try:
            while True:
                readings = await self.poll_once()
                for r in readings:
                    self.metrics.readings.labels(self.name, r.quality).inc()
                await self.buffer.submit(readings)
                # Deadlines advance by whole intervals from the start, so the schedule does not
                # drift by the poll duration; a poll that overruns skips slots instead of bunching.
                deadline += self._next_delay()
                now = loop.time()
                if deadline < now:
                    missed = int((now - deadline) / self.interval) + 1
                    self.metrics.poll_overruns.labels(self.name).inc(missed)
                    deadline += missed * self.interval
                await asyncio.sleep(deadline - now)
        finally:
            await self.driver.close()
