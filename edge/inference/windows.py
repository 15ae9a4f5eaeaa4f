"""Sliding windows of samples, one per scored device.

A *sample* is one poll's values of a model's input metrics, in the card's order (booleans as
0/1). A poll with any input bad, missing or not a number adds no sample; a poll that reads none
of the inputs (another interval group of the device) is not a sample at all. A gap of more than
``gap_factor`` sample periods since the last sample (an outage, a device backing off, a clock
step) restarts the window: a model is never shown a window with a hole in it, and scoring resumes
once ``window`` new samples have arrived.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from edge.reading import Reading
from protocol.schema import Quality, Value

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


def numeric(value: Value) -> float | None:
    """A reading value as a model input: booleans 0/1, finite numbers as they are, else None."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


class SampleWindow:
    """Ring buffer of the last ``size`` samples of ``metrics`` for one device."""

    def __init__(self, metrics: tuple[str, ...], size: int, period_s: float, gap_factor: float = 3.0) -> None:
        import numpy as np  # only once a model scores: an agent without models does not load numpy

        self.metrics = metrics
        self.size = size
        self.period_s = period_s
        self.max_gap_ms = gap_factor * period_s * 1000
        self._ring = np.zeros((size, len(metrics)), np.float32)
        self._next = 0  # row the next sample goes to
        self.count = 0
        """Samples in the window (at most ``size``)."""
        self.last_ts_ms: int | None = None
        self.resets = 0
        """Times a gap restarted the window."""
        self.skipped = 0
        """Polls that added no sample because an input was bad, missing or not numeric."""

    @property
    def layout(self) -> tuple[tuple[str, ...], int]:
        """(input metrics, window length)."""
        return self.metrics, self.size

    @property
    def full(self) -> bool:
        """True once ``size`` samples without a gap have arrived."""
        return self.count >= self.size

    def reset(self) -> None:
        """Forget every sample."""
        self.count = 0
        self._next = 0
        self.last_ts_ms = None

    def add_values(self, ts_ms: int, values: list[float]) -> bool:
        """Append one sample taken at ``ts_ms``; True if it restarted the window first (gap)."""
        restarted = False
        if self.last_ts_ms is not None and (ts_ms - self.last_ts_ms > self.max_gap_ms or ts_ms <= self.last_ts_ms):
            self.reset()
            self.resets += 1
            restarted = True
        self._ring[self._next] = values
        self._next = (self._next + 1) % self.size
        self.count = min(self.count + 1, self.size)
        self.last_ts_ms = ts_ms
        return restarted

    def observe(self, readings: Iterable[Reading]) -> bool | None:
        """Take one poll's readings of the device: ``None`` if they hold none of the inputs,
        False if they do but no sample was added (an input bad, missing, not numeric), True if a
        sample was added."""
        values: dict[str, float | None] = {}
        ts_ms = 0
        for r in readings:
            if r.metric in values or r.metric not in self.metrics:
                continue
            values[r.metric] = numeric(r.value) if r.quality is Quality.GOOD else None
            ts_ms = r.ts_ms
        if not values:
            return None
        sample = [values.get(m) for m in self.metrics]
        if any(v is None for v in sample):
            self.skipped += 1
            return False
        self.add_values(ts_ms, sample)  # type: ignore[arg-type]
        return True

    def array(self) -> npt.NDArray[np.float32]:
        """The window ``[size, features]``, oldest sample first (a copy)."""
        import numpy as np

        if self.count < self.size:
            return self._ring[: self.count].copy()
        return np.concatenate((self._ring[self._next:], self._ring[: self._next]))

    def last_sample(self) -> npt.NDArray[np.float32] | None:
        """The newest sample ``[features]`` (a copy), None when empty."""
        if not self.count:
            return None
        row: npt.NDArray[np.float32] = self._ring[(self._next - 1) % self.size].copy()
        return row
