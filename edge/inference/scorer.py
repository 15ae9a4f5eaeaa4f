"""Anomaly scoring in the agent: poll readings → windows → batched scores → readings and events.

The pollers hand every poll to the buffer first and to :meth:`AnomalyScorer.observe` after (through
:meth:`AnomalyScorer.tap`), which only appends a sample to the device's window and, once the window
is full, queues a copy of it: cheap, synchronous, and it never raises into the poller. The scoring
task takes everything queued, scores it with one call per model on the engine's worker thread, and
submits per scored window two readings with the poll's timestamp:

* ``anomaly_score`` (float, unit ``""``): the model's score;
* ``anomaly`` (bool, unit ``""``): whether the device's anomaly is active after this score. It
  becomes active when ``score > threshold`` and clears when ``score <= clear_at`` (hysteresis).

The transitions are recorded as ``anomaly_started`` / ``anomaly_cleared`` events in the buffer's
events table, which the uplink publishes like every other event. A model that raises or returns a
non-finite score emits nothing for that call; it is marked failed and handed to ``on_failure``
(the rollout restores the previous version), or without one simply stops scoring.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from edge.inference.runtime import AnomalyModel, ModelLoadError, ScoringError
from edge.inference.windows import SampleWindow, numeric
from edge.metrics import EdgeMetrics
from edge.poller import ReadingSink
from edge.reading import Reading
from protocol.anomaly import ModelCard
from protocol.logs import get_logger
from protocol.schema import EventType, Quality

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

log = get_logger("edge.inference")

SCORE_METRIC = "anomaly_score"
FLAG_METRIC = "anomaly"


class EventSink(Protocol):
    """Where events go (the buffer's events table)."""

    async def add_event(self, type_: str, message: str, details: dict[str, int | float | str] | None = None, *,
                        device: str | None = None, ts_ms: int | None = None) -> None:
        """Record an event durably for the uplink to publish."""
        ...


@dataclass(frozen=True)
class ScoredDevice:
    """What the scorer needs to know about a configured device."""

    name: str
    profile: str
    units: Mapping[str, str]
    """Metrics the device is polled for, and their units."""
    poll_interval_s: float
    intervals: Mapping[str, float] = field(default_factory=dict)
    """Per-metric intervals that differ from ``poll_interval_s`` (the profile's ``interval_s``)."""

    def period_s(self, metrics: Iterable[str]) -> float:
        """Seconds between polls that read all of ``metrics``."""
        return max((self.intervals.get(m, self.poll_interval_s) for m in metrics), default=self.poll_interval_s)


def check_model_fits(model: AnomalyModel, profile: str, devices: Iterable[ScoredDevice]) -> None:
    """Refuse (:class:`ModelLoadError`, kind ``card``) a model whose card does not fit the devices
    of ``profile``: another profile, inputs they are not polled for, other units."""
    card = model.card
    if card.profile != profile:
        raise ModelLoadError(model.source, "card", f"its card is for profile {card.profile!r}, not {profile!r}")
    mine = [d for d in devices if d.profile == profile]
    if not mine:
        raise ModelLoadError(model.source, "card", f"no device on this gateway has profile {profile!r}")
    for metric in (SCORE_METRIC, FLAG_METRIC):
        if any(metric in d.units for d in mine):
            raise ModelLoadError(model.source, "card", f"profile {profile!r} has a point named {metric!r}, "
                                                       f"which the anomaly readings would clash with")
    # Units are checked against the union of what the profile's devices are polled for; a device
    # that is not polled for every input is skipped (and logged) when it is scored.
    units: dict[str, str] = {}
    for d in mine:
        units.update(d.units)
    for inp in card.inputs:
        if inp.metric not in units:
            raise ModelLoadError(model.source, "card", f"input {inp.metric!r} is not a metric the devices of "
                                                       f"profile {profile!r} are polled for")
        if units[inp.metric] != inp.unit:
            raise ModelLoadError(model.source, "card", f"input {inp.metric!r} is in {inp.unit!r} on the card but "
                                                       f"{units[inp.metric]!r} in profile {profile!r}")


@dataclass(frozen=True, slots=True)
class _Job:
    device: str
    model: AnomalyModel
    ts_ms: int
    window: npt.NDArray[np.float32]


class _Tap:
    """A reading sink that passes every poll on, then shows it to the scorer."""

    def __init__(self, sink: ReadingSink, scorer: AnomalyScorer) -> None:
        self.sink = sink
        self.scorer = scorer

    async def submit(self, readings: list[Reading]) -> None:
        await self.sink.submit(readings)
        self.scorer.observe(readings)


class AnomalyScorer:
    """Windows, active models and anomaly state of every scored device."""

    def __init__(self, devices: Iterable[ScoredDevice], sink: ReadingSink, events: EventSink, metrics: EdgeMetrics,
                 *, gap_factor: float = 3.0, coalesce_s: float = 0.005) -> None:
        self.devices = {d.name: d for d in devices}
        self.sink = sink
        self.events = events
        self.metrics = metrics
        self.gap_factor = gap_factor
        self.coalesce_s = coalesce_s
        """After the first window of a round is queued, wait this long for the other devices'
        polls of the same cycle, so they are scored in one call."""
        self.by_profile: dict[str, list[str]] = {}
        for d in self.devices.values():
            self.by_profile.setdefault(d.profile, []).append(d.name)
        self._active: dict[str, AnomalyModel] = {}
        self._previous: dict[str, AnomalyModel] = {}
        self._windows: dict[str, SampleWindow] = {}
        self._last_values: dict[str, dict[str, float]] = {}
        self._anomalous: dict[str, bool] = {}
        self._pending: list[_Job] = []
        self._wake = asyncio.Event()
        self._warned: set[tuple[str, ...]] = set()
        self.on_failure: Callable[[str, AnomalyModel, str], Awaitable[None]] | None = None
        """Called (on the event loop) when an active model failed live; the rollout rolls it back."""

    async def replace_devices(self, devices: Iterable[ScoredDevice]) -> None:
        """Score these devices from now on (a remote configuration was applied). Devices that are
        gone or changed lose their window and sample history; an active anomaly of a removed device
        is cleared with an ``anomaly_cleared`` event, so the hub does not show it forever."""
        new = {d.name: d for d in devices}
        for name, old in self.devices.items():
            if new.get(name) == old:
                continue
            self._windows.pop(name, None)
            self._last_values.pop(name, None)
            if name not in new and self._anomalous.pop(name, False):
                self.metrics.anomaly_active.labels(name).set(0)
                await self.events.add_event(EventType.ANOMALY_CLEARED.value,
                                            f"{name}: anomaly state cleared, device removed by configuration",
                                            {"reason": "device removed"}, device=name)
        self.devices = new
        self.by_profile = {}
        for d in new.values():
            self.by_profile.setdefault(d.profile, []).append(d.name)

    # -- models ----------------------------------------------------------------------------

    def active(self, profile: str) -> AnomalyModel | None:
        """The model scoring ``profile`` now."""
        return self._active.get(profile)

    def previous(self, profile: str) -> AnomalyModel | None:
        """The model that scored ``profile`` before the last switch (kept loaded for a rollback)."""
        return self._previous.get(profile)

    def check_model(self, model: AnomalyModel, profile: str) -> None:
        """:func:`check_model_fits` against this gateway's devices."""
        check_model_fits(model, profile, self.devices.values())

    def activate(self, profile: str, model: AnomalyModel) -> AnomalyModel | None:
        """Switch ``profile`` to ``model`` (one assignment: the next window is scored by it); the
        model it replaces is kept as the previous one and returned."""
        old = self._active.get(profile)
        if old is model:
            return self._previous.get(profile)
        self._active[profile] = model
        if old is not None and old.failed is None:
            self._previous[profile] = old
        elif old is not None:
            self._previous.pop(profile, None)
        return old

    def restore_previous(self, profile: str) -> AnomalyModel | None:
        """Make the previous model active again (rollback); returns it, or None if there is none
        (then nothing scores ``profile`` any more)."""
        prev = self._previous.pop(profile, None)
        if prev is None:
            self._active.pop(profile, None)
        else:
            self._active[profile] = prev
        return prev

    def forget_previous(self, profile: str) -> None:
        """Drop the previous model (its session is freed)."""
        self._previous.pop(profile, None)

    async def deactivate(self, profile: str, reason: str) -> None:
        """Stop scoring ``profile``; active anomalies of its devices are cleared with ``reason``."""
        model = self._active.pop(profile, None)
        self._previous.pop(profile, None)
        for device in self.by_profile.get(profile, []):
            self._windows.pop(device, None)
            if self._anomalous.pop(device, False):
                self.metrics.anomaly_active.labels(device).set(0)
                details: dict[str, int | float | str] = {"reason": reason}
                if model is not None:
                    details.update(model=model.card.name, version=model.card.version,
                                   threshold=model.card.threshold)
                await self.events.add_event(EventType.ANOMALY_CLEARED.value,
                                            f"{device}: anomaly state cleared, scoring stopped ({reason})",
                                            details, device=device)

    def probe_windows(self, profile: str, card: ModelCard) -> npt.NDArray[np.float32]:
        """Windows to self-test a model for ``profile`` on: the full windows of its devices that fit
        the card, else the last sample of a device repeated, else zeros."""
        import numpy as np

        full = [w.array() for n in self.by_profile.get(profile, []) if (w := self._windows.get(n)) is not None
                and w.full and w.layout == (card.input_metrics, card.window)]
        if full:
            return np.stack(full)
        for n in self.by_profile.get(profile, []):
            last = self._last_values.get(n, {})
            if all(m in last for m in card.input_metrics):
                sample = np.array([last[m] for m in card.input_metrics], np.float32)
                return np.tile(sample, (1, card.window, 1))
        return np.zeros((1, card.window, len(card.inputs)), np.float32)

    # -- data path -------------------------------------------------------------------------

    def tap(self, sink: ReadingSink) -> ReadingSink:
        """A sink for a poller: readings go to ``sink`` first, then to :meth:`observe`."""
        return _Tap(sink, self)

    def observe(self, readings: list[Reading]) -> None:
        """Take one poll's readings (after they went to the buffer). Never raises."""
        try:
            by_device: dict[str, list[Reading]] = {}
            for r in readings:
                by_device.setdefault(r.device, []).append(r)
            for device, rs in by_device.items():
                self._observe_device(device, rs)
        except Exception as exc:  # scoring must never break data collection
            key = ("observe", type(exc).__name__)
            if key not in self._warned:
                self._warned.add(key)
                log.exception("scoring_observe_failed", error=repr(exc))

    def _observe_device(self, device: str, readings: list[Reading]) -> None:
        d = self.devices.get(device)
        if d is None:
            return
        last = self._last_values.setdefault(device, {})
        for r in readings:
            v = numeric(r.value) if r.quality is Quality.GOOD else None
            if v is not None:
                last[r.metric] = v
        model = self._active.get(d.profile)
        if model is None or model.failed is not None:
            return
        window = self._window_for(d, model)
        if window is None:
            return
        resets = window.resets
        added = window.observe(readings)
        if window.resets != resets:
            self.metrics.window_resets.labels(device).inc()
            log.info("scoring_window_restarted", device=device, reason="gap", max_gap_s=window.max_gap_ms / 1000)
        if added and window.full:
            self._pending.append(_Job(device, model, readings[0].ts_ms, window.array()))
            self._wake.set()

    def _window_for(self, d: ScoredDevice, model: AnomalyModel) -> SampleWindow | None:
        card = model.card
        w = self._windows.get(d.name)
        if w is not None and w.layout == model.layout:
            return w
        missing = [m for m in card.input_metrics if m not in d.units]
        if missing:
            key = ("unpolled", d.name, model.sha256)
            if key not in self._warned:
                self._warned.add(key)
                log.error("scoring_device_skipped", device=d.name, model=model.label,
                          reason=f"device is not polled for model inputs {missing} (its `points` leave them out)")
            return None
        period = d.period_s(card.input_metrics)
        if not card.sample_period_s / 2 <= period <= 2 * card.sample_period_s:
            key = ("period", d.name, model.sha256)
            if key not in self._warned:
                self._warned.add(key)
                log.warning("scoring_sample_period_mismatch", device=d.name, model=model.label,
                            poll_period_s=period, model_sample_period_s=card.sample_period_s,
                            note="the model was trained on samples this far apart; scores may mislead")
        w = self._windows[d.name] = SampleWindow(card.input_metrics, card.window, period, self.gap_factor)
        return w

    def window(self, device: str) -> SampleWindow | None:
        """The device's current window (None before its first sample under a model)."""
        return self._windows.get(device)

    def anomalous(self, device: str) -> bool:
        """Whether the device's anomaly is active."""
        return self._anomalous.get(device, False)

    async def run(self) -> None:
        """Score queued windows until cancelled."""
        while True:
            await self._wake.wait()
            if self.coalesce_s:
                await asyncio.sleep(self.coalesce_s)
            self._wake.clear()
            try:
                await self.score_pending()
            except Exception as exc:  # keep scoring (and never take the agent down) whatever happens
                log.exception("scoring_round_failed", error=repr(exc))

    async def score_pending(self) -> int:
        """Score everything queued, one call per model; returns the number of windows scored."""
        jobs, self._pending = self._pending, []
        by_model: dict[int, list[_Job]] = {}
        for job in jobs:
            if job.model.failed is None:
                by_model.setdefault(id(job.model), []).append(job)
        scored = 0
        for group in by_model.values():
            scored += await self._score_group(group[0].model, group)
        return scored

    async def _score_group(self, model: AnomalyModel, jobs: list[_Job]) -> int:
        import numpy as np

        profile = model.card.profile
        t0 = time.perf_counter()
        try:
            scores = await model.score(np.stack([j.window for j in jobs]))
        except ScoringError as exc:
            await self._failed(model, str(exc))
            return 0
        self.metrics.scoring_latency.labels(profile).observe(time.perf_counter() - t0)
        finite = np.isfinite(scores)
        if not finite.all():
            bad = float(scores[~finite][0])
            await self._failed(model, f"{model.label} returned a non-finite score ({bad}) for "
                                      f"{int((~finite).sum())} of {len(jobs)} window(s)")
            return 0
        readings: list[Reading] = []
        for job, s in zip(jobs, scores.tolist(), strict=True):
            readings.extend(await self._verdict(job, float(s)))
        await self.sink.submit(readings)
        return len(jobs)

    async def _verdict(self, job: _Job, score: float) -> list[Reading]:
        card = job.model.card
        device = job.device
        was = self._anomalous.get(device, False)
        now = score > card.clear_at if was else score > card.threshold
        self.metrics.windows_scored.labels(device).inc()
        if now != was:
            self._anomalous[device] = now
            self.metrics.anomaly_active.labels(device).set(1 if now else 0)
            details: dict[str, int | float | str] = {"model": card.name, "version": card.version, "score": score,
                                                     "threshold": card.threshold, "clear_at": card.clear_at}
            if now:
                event, msg = EventType.ANOMALY_STARTED, f"{device}: anomaly score {score:.6g} above threshold " \
                                                        f"{card.threshold:g} ({job.model.label})"
            else:
                event, msg = EventType.ANOMALY_CLEARED, f"{device}: anomaly score {score:.6g} back at or below " \
                                                        f"{card.clear_at:g} ({job.model.label})"
            log.warning(event.value, device=device, model=job.model.label, score=score, threshold=card.threshold,
                        clear_at=card.clear_at)
            await self.events.add_event(event.value, msg, details, device=device, ts_ms=job.ts_ms)
        return [Reading(device, SCORE_METRIC, job.ts_ms, score, ""),
                Reading(device, FLAG_METRIC, job.ts_ms, now, "")]

    async def _failed(self, model: AnomalyModel, reason: str) -> None:
        profile = model.card.profile
        if model.failed is not None:
            return
        model.failed = reason
        self.metrics.scoring_failures.labels(profile).inc()
        log.error("scoring_failed", profile=profile, model=model.label, sha256=model.sha256, reason=reason)
        if self._active.get(profile) is not model:
            if self._previous.get(profile) is model:
                self.forget_previous(profile)
            return
        if self.on_failure is not None:
            await self.on_failure(profile, model, reason)
        elif self._previous.get(profile) is not None:
            self.restore_previous(profile)
        else:
            await self.deactivate(profile, f"{model.label} failed")
