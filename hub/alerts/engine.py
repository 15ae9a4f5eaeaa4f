"""The alert engine: evaluates the rules of :mod:`hub.alerts.rules` and keeps the ``alert`` table.

Where it runs:

* **On ingest, after commit.** :class:`~hub.ingest.Ingest` calls :meth:`AlertEngine.on_batch` with
  every committed batch (telemetry, status, events) just before acknowledging it. The hook only
  puts the batch on a bounded queue (``queue_max_batches``; when full the batch is skipped and
  counted), so evaluation never delays a commit or an acknowledgement, and an error in it never
  reaches ingest. One task works through the queue: thresholds, rates of change and gaps on
  readings; anomaly events; a gateway status wakes the timer.
* **On signals.** :meth:`AlertEngine.on_signal` (subscribed to the hub's
  :class:`~hub.signals.SignalBus`) queues human-error and anomaly signals the same way.
* **On a timer** every ``evaluate_every_s``: stale devices, offline gateways, notification digests.

Condition state. A condition (``<rule>:<device uid>``) is *abnormal* from the reading that breaches
the rule until one that is normal again; only the transition normal → abnormal triggers. While an
alert of the condition is not cleared, a trigger counts on it (``count``) instead of opening
another (``alert.active_key`` is unique). Back to normal clears it when the rule has
``auto_clear``. The set of abnormal conditions lives in memory and starts, at every hub start,
from the alerts that are not cleared, so a restart neither re-counts nor forgets them. Rates and
gaps need the previous readings of a device, also kept in memory: after a restart they start
afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from tortoise.exceptions import IntegrityError
from tortoise.expressions import F
from tortoise.transactions import in_transaction

from hub import queries
from hub.alerts.models import Alert, AlertEvent, AlertState
from hub.alerts.notify import AlertInfo, Notifier, NotifyKind, Result
from hub.alerts.rules import (
    AlertsConfig,
    AnomalyRule,
    GapRule,
    GatewayOfflineRule,
    HumanErrorRule,
    RateRule,
    ReadingRule,
    Rule,
    Severity,
    StaleRule,
    ThresholdRule,
)
from hub.db import Database
from hub.signals import Signal, SignalKind
from hub.store import EventItem, StatusItem, TelemetryItem
from protocol.ids import split_device_uid
from protocol.logs import get_logger
from protocol.schema import DeviceInfoV1, EventType, Quality

log = get_logger("hub.alerts")

LAST_VALUE_EVERY_S = 5.0
"""While a condition stays abnormal, its alert's ``last_value`` is written at most this often."""


def now_ms() -> int:
    """Hub wall clock in ms since the epoch."""
    return time.time_ns() // 1_000_000


class AlertNotFound(LookupError):
    """No alert with that id."""


class AlertConflict(ValueError):
    """The alert is not in a state that allows the request (e.g. acknowledging a cleared alert)."""


@dataclass
class EngineStats:
    """What the engine did since start."""

    batches: int = 0
    batches_skipped: int = 0
    """Batches not evaluated because the queue was full."""
    signals: int = 0
    opened: int = 0
    retriggered: int = 0
    cleared: int = 0
    errors: int = 0
    sweeps: int = 0


@dataclass(frozen=True, slots=True)
class _Where:
    site: str = ""
    gateway: str = ""
    device: str = ""
    """Device uid, "" when the condition is not about a device."""
    metric: str = ""


_Work = tuple[Sequence[TelemetryItem], Sequence[StatusItem], Sequence[EventItem]] | Signal


def _number(raw: object) -> float | None:
    """A finite number from a signal's detail (billing sends decimals as strings), else None."""
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _info(a: Alert) -> AlertInfo:
    return AlertInfo(id=a.id, key=a.key, rule=a.rule, type=a.type, severity=Severity(a.severity), state=a.state,
                     site=a.site, gateway=a.gateway, device=a.device, metric=a.metric, message=a.message,
                     count=a.count, last_value=a.last_value, opened_ms=a.opened_ms)


class AlertMetrics:
    """Prometheus counters of the engine, on the hub's registry (``/metrics``)."""

    def __init__(self, registry: CollectorRegistry | None, queued: Callable[[], int]) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.alerts = Counter("twin_hub_alerts", "Alert changes made by the engine (opened, retriggered, "
                              "cleared automatically)", ["event"], registry=r)
        self.notifications = Counter("twin_hub_alert_notifications", "Notification deliveries by channel and "
                                     "result (delivered, failed after retries)", ["channel", "result"], registry=r)
        self.suppressed = Counter("twin_hub_alert_notifications_suppressed",
                                  "Notifications held back by the rate limit", registry=r)
        self.skipped = Counter("twin_hub_alert_batches_skipped",
                               "Committed batches not evaluated because the alert queue was full", registry=r)
        self.errors = Counter("twin_hub_alert_evaluation_errors", "Evaluations that failed (logged)", registry=r)
        self.queue = Gauge("twin_hub_alert_queue", "Batches and signals waiting for evaluation", registry=r)
        self.queue.set_function(lambda: float(queued()))


class AlertEngine:
    """Rules → alerts → notifications for one hub database."""

    def __init__(self, db: Database, config: AlertsConfig, clock: Callable[[], int] = now_ms,
                 notifier: Notifier | None = None, registry: CollectorRegistry | None = None) -> None:
        self.db = db
        self.config = config
        self.clock = clock
        self.notifier = notifier if notifier is not None else Notifier(config, on_result=self._record_result)
        if self.notifier.on_result is None:
            self.notifier.on_result = self._record_result
        self.stats = EngineStats()
        rules: list[Rule] = config.active_rules() if config.enabled else []
        self.rules = rules
        self._by_metric: dict[str, list[ReadingRule]] = {}
        for r in rules:
            if isinstance(r, ThresholdRule | RateRule | GapRule):
                self._by_metric.setdefault(r.metric, []).append(r)
        self._stale = [r for r in rules if isinstance(r, StaleRule)]
        self._gateways = [r for r in rules if isinstance(r, GatewayOfflineRule)]
        self._anomaly = [r for r in rules if isinstance(r, AnomalyRule)]
        self._human = [r for r in rules if isinstance(r, HumanErrorRule)]
        self._abnormal: set[str] = set()
        self._rates: dict[str, deque[tuple[int, float]]] = {}
        self._newest: dict[str, int] = {}
        self._event_ts: dict[str, int] = {}
        self._target_cache: dict[tuple[str, ...], list[tuple[ReadingRule, str, _Where]]] = {}
        self._last_value: dict[str, tuple[float, float]] = {}  # key -> (value, monotonic of write)
        self._queue: asyncio.Queue[_Work] = asyncio.Queue(maxsize=config.queue_max_batches)
        self._busy = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics = AlertMetrics(registry, lambda: self._busy)
        self._on_change: list[Callable[[], None]] = []

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (non-blocking) whenever the engine opens or clears an alert: the
        dashboard's live fleet summary shows open alerts and should not wait for its re-check."""
        self._on_change.append(callback)

    def _changed(self) -> None:
        for callback in self._on_change:
            try:
                callback()
            except Exception as exc:  # a listener must never break alerting
                log.exception("alert_listener_failed", error=repr(exc))

    # -- wiring -------------------------------------------------------------------------------

    def on_batch(self, telemetry: Sequence[TelemetryItem], statuses: Sequence[StatusItem],
                 events: Sequence[EventItem]) -> None:
        """Ingest's post-commit hook: queue the batch for evaluation; never blocks or raises."""
        if not self.rules:
            return
        try:
            self._queue.put_nowait((telemetry, statuses, events))
            self._busy += 1
        except asyncio.QueueFull:
            self.stats.batches_skipped += 1
            self.metrics.skipped.inc()
            if self.stats.batches_skipped in (1, 10, 100) or self.stats.batches_skipped % 1000 == 0:
                log.warning("alert_batches_skipped", skipped=self.stats.batches_skipped,
                            queue_max=self.config.queue_max_batches)
        if statuses:
            self._wake.set()  # a gateway said offline (or online): check gateways now

    async def on_signal(self, signal: Signal) -> None:
        """Subscriber of the hub's :class:`~hub.signals.SignalBus`: queue the signal."""
        if not self.rules:
            return
        try:
            self._queue.put_nowait(signal)
            self._busy += 1
        except asyncio.QueueFull:
            self.stats.batches_skipped += 1
            self.metrics.skipped.inc()
            log.warning("alert_signal_skipped", kind=signal.kind.value)

    async def start(self) -> None:
        """Load the conditions of the alerts that are not cleared and start the worker and timer."""
        with self.db.activate():
            keys = await Alert.filter(active_key__isnull=False).values_list("active_key", flat=True)
        self._abnormal = {str(k) for k in keys}
        self._tasks = [asyncio.create_task(self._work(), name="hub-alerts"),
                       asyncio.create_task(self._timer(), name="hub-alerts-timer")]
        log.info("alerts_started", rules=len(self.rules), open=len(self._abnormal),
                 contacts=len(self.config.contacts))

    async def stop(self, drain_s: float = 2.0) -> None:
        """Evaluate what is queued (at most ``drain_s``), stop, and let notifications finish."""
        with contextlib.suppress(TimeoutError):
            await self.drain(drain_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.notifier.close(drain_s)

    async def drain(self, within_s: float = 10.0) -> None:
        """Return once everything queued so far was evaluated (``TimeoutError`` after ``within_s``)."""
        deadline = time.monotonic() + within_s
        while self._busy:
            if time.monotonic() > deadline:
                raise TimeoutError(f"alert engine still busy after {within_s}s")
            await asyncio.sleep(0.01)

    async def _work(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                if isinstance(item, Signal):
                    self.stats.signals += 1
                    await self.evaluate_signal(item)
                else:
                    self.stats.batches += 1
                    await self.evaluate_batch(*item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a database hiccup must not end alerting
                self.stats.errors += 1
                self.metrics.errors.inc()
                log.exception("alert_evaluation_failed", error=repr(exc))
            finally:
                self._busy -= 1

    async def _timer(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.evaluate_every_s)
            self._wake.clear()
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.errors += 1
                self.metrics.errors.inc()
                log.exception("alert_sweep_failed", error=repr(exc))

    # -- evaluation ---------------------------------------------------------------------------

    async def evaluate_batch(self, telemetry: Sequence[TelemetryItem], statuses: Sequence[StatusItem] = (),
                             events: Sequence[EventItem] = ()) -> None:
        """Apply the reading and event rules to one committed batch."""
        stay: dict[str, float] = {}
        abnormal = self._abnormal
        for item in telemetry:
            t = item.telemetry
            devices = t.devices
            for r in t.readings:
                if r.metric not in self._by_metric or r.quality is not Quality.GOOD:
                    continue
                v = r.value
                if v is None or isinstance(v, bool | str):
                    continue
                value = float(v)
                for rule, key, where in self._targets(t.site, t.gateway, r.device, r.metric, devices):
                    if isinstance(rule, ThresholdRule):
                        if rule.breached(value):
                            if key in abnormal:
                                stay[key] = value  # the common case: no change, no message to build
                                continue
                            msg = f"{where.device} {rule.describe(value, r.unit)}"
                            await self._transition(rule, key, True, where, value, r.ts, msg, stay)
                        elif key in abnormal and rule.normal(value):
                            msg = f"{where.device} {r.metric} {value:g} {r.unit}".rstrip()
                            await self._transition(rule, key, False, where, value, r.ts, msg, stay)
                    elif isinstance(rule, RateRule):
                        per_min = self._rate(rule, key, r.ts, value)
                        if per_min is None:
                            continue
                        breached = rule.breached(per_min)
                        if breached == (key in abnormal):
                            if breached:
                                stay[key] = per_min
                            continue
                        sign = "rising" if rule.max_rise_per_min > 0 else "falling"
                        msg = (f"{where.device} {r.metric} {sign} {abs(per_min):.3g} {r.unit}/min over "
                               f"{rule.window_s:g} s (limit {abs(rule.max_rise_per_min):g})")
                        await self._transition(rule, key, breached, where, per_min, r.ts, msg, stay)
                    else:
                        prev = self._newest.get(key)
                        if prev is None or r.ts > prev:
                            self._newest[key] = r.ts
                            gap_s = (r.ts - prev) / 1000 if prev is not None else 0.0
                            if gap_s > rule.max_gap_s:
                                await self._trigger(rule, key, where, gap_s, r.ts,
                                                    f"{where.device} {r.metric}: no data for {gap_s:.0f} s "
                                                    f"(limit {rule.max_gap_s:g} s)")
        for e_item in events:
            e = e_item.event
            if e.type not in (EventType.ANOMALY_STARTED, EventType.ANOMALY_CLEARED) or not e.device:
                continue
            score = e.details.get("score")
            score_value = float(score) if isinstance(score, int | float) and not isinstance(score, bool) else None
            await self._anomaly_event(e.site, e.gateway, e.device, e.type is EventType.ANOMALY_STARTED, e.ts,
                                      score_value, e.message)
        await self._write_last_values(stay)

    def _targets(self, site: str, gateway: str, device: str, metric: str,
                 devices: Mapping[str, DeviceInfoV1]) -> list[tuple[ReadingRule, str, _Where]]:
        """(rule, condition key, where) of every reading rule for this device's metric; cached per
        device, kind and profile so the per-reading cost is one dictionary lookup."""
        info = devices.get(device)
        kind, profile = (info.kind.value, info.profile) if info is not None else ("", "")
        cache_key = (site, gateway, device, kind, profile, metric)
        targets = self._target_cache.get(cache_key)
        if targets is None:
            uid = f"{site}.{gateway}.{device}"
            where = _Where(site, gateway, uid, metric)
            targets = [(rule, f"{rule.name}:{uid}", where) for rule in self._by_metric.get(metric, ())
                       if rule.matches(site, gateway, device, kind, profile)]
            if len(self._target_cache) >= 100_000:  # a fleet that keeps renaming things
                self._target_cache.clear()
            self._target_cache[cache_key] = targets
        return targets

    def _rate(self, rule: RateRule, key: str, ts: int, value: float) -> float | None:
        hist = self._rates.setdefault(key, deque())
        if hist and ts <= hist[-1][0]:
            return None  # out of order or a redelivery
        hist.append((ts, value))
        horizon = ts - rule.window_s * 1000
        while len(hist) > 1 and hist[0][0] < horizon:
            hist.popleft()
        t0, v0 = hist[0]
        span_ms = ts - t0
        if span_ms < rule.window_s * 500:  # less than half a window of data: no verdict
            return None
        return (value - v0) / (span_ms / 60_000)

    async def _anomaly_event(self, site: str, gateway: str, device: str, started: bool, ts: int,
                             value: float | None, message: str) -> None:
        uid = f"{site}.{gateway}.{device}"
        for rule in self._anomaly:
            if not rule.matches(site, gateway, device):
                continue
            key = f"{rule.name}:{uid}"
            last = self._event_ts.get(key)
            if last is not None and ts < last:
                continue  # older than what was applied: arrived late
            self._event_ts[key] = ts
            text = message or ("anomaly" if started else "anomaly cleared")
            msg = f"{uid} edge anomaly: {text}" + (f" (score {value:g})" if value is not None else "")
            await self._transition(rule, key, started, _Where(site, gateway, uid), value, ts, msg, None)

    async def evaluate_signal(self, signal: Signal) -> None:
        """Apply a signal of the hub's bus (human error, anomaly)."""
        site, gateway, device = signal.site or "", signal.gateway or "", ""
        uid = signal.device or ""
        if uid:
            with contextlib.suppress(ValueError):
                site, gateway, device = split_device_uid(uid)
        value = _number(signal.details.get("value"))
        if signal.kind in (SignalKind.ANOMALY_STARTED, SignalKind.ANOMALY_CLEARED):
            if device:
                await self._anomaly_event(site, gateway, device, signal.kind is SignalKind.ANOMALY_STARTED,
                                          signal.ts_ms, value, signal.message)
            return
        if signal.kind is not SignalKind.HUMAN_ERROR:
            return
        for rule in self._human:
            if not rule.matches(site, gateway, device):
                continue
            key = f"{rule.name}:{uid or site or 'hub'}"
            await self._trigger(rule, key, _Where(site, gateway, uid), value, signal.ts_ms,
                                f"possible human error: {signal.message}")

    async def sweep(self, now: int | None = None) -> None:
        """Stale devices, offline gateways, notification digests (the timer calls this)."""
        now = self.clock() if now is None else now
        self.stats.sweeps += 1
        if self._stale:
            for d in await queries.list_devices(self.db):
                if d.last_seen_ms is None:
                    continue
                age_s = (now - d.last_seen_ms) / 1000
                for rule in self._stale:
                    if rule.matches(d.site, d.gateway, d.name, d.kind, d.profile):
                        await self._transition(
                            rule, f"{rule.name}:{d.uid}", age_s > rule.after_s, _Where(d.site, d.gateway, d.uid),
                            age_s, now, f"{d.uid}: no reading for {age_s:.0f} s (limit {rule.after_s:g} s)", None)
        if self._gateways:
            for g in await queries.list_gateways(self.db):
                seen = g.last_seen_ms if g.last_seen_ms is not None else g.first_seen_ms
                age_s = (now - seen) / 1000
                gid = f"{g.site}.{g.name}"
                for grule in self._gateways:
                    if not grule.matches(g.site, g.name):
                        continue
                    said_offline = g.state == "offline"
                    offline = said_offline or age_s > grule.after_s
                    why = "its status says offline" if said_offline else f"no telemetry for {age_s:.0f} s"
                    await self._transition(grule, f"{grule.name}:{gid}", offline, _Where(g.site, g.name), age_s, now,
                                           f"gateway {gid} offline: {why}", None)
        self.notifier.flush_digests()

    # -- state changes ------------------------------------------------------------------------

    async def _transition(self, rule: Rule, key: str, abnormal: bool | None, where: _Where, value: float | None,
                          ts: int, message: str, stay: dict[str, float] | None) -> None:
        if abnormal is None:
            return
        # The newest abnormal value of this episode goes to its alert before the state changes
        # (it must not land on the next alert of the condition).
        pending = stay.pop(key, None) if stay is not None else None
        if abnormal:
            if key not in self._abnormal:
                self._abnormal.add(key)
                await self._trigger(rule, key, where, value, ts, message)
            elif stay is not None and value is not None:
                stay[key] = value
            return
        if key in self._abnormal:
            self._abnormal.discard(key)
            self._last_value.pop(key, None)
            if pending is not None:
                with self.db.activate():
                    await Alert.filter(active_key=key).update(last_value=pending)
            if rule.auto_clear:
                await self._auto_clear(key, value, message)

    async def _trigger(self, rule: Rule, key: str, where: _Where, value: float | None, ts: int,
                       message: str) -> None:
        now = self.clock()
        kind: NotifyKind
        with self.db.activate():
            for _ in range(3):  # another hub may open or clear the same condition in between
                async with in_transaction(self.db.connection_name) as conn:
                    alert = await Alert.filter(active_key=key).using_db(conn).first()
                    if alert is not None:
                        await Alert.filter(id=alert.id).using_db(conn).update(
                            count=F("count") + 1, last_triggered_ms=now, last_value=value, message=message)
                        await AlertEvent.create(alert_id=alert.id, ts_ms=now, action="retriggered", value=value,
                                                message=message, using_db=conn)
                        kind = "retriggered"
                        break
                try:
                    async with in_transaction(self.db.connection_name) as conn:
                        alert = await Alert.create(
                            key=key, active_key=key, rule=rule.name, type=rule.type, severity=rule.severity.value,
                            state=AlertState.OPEN.value, site=where.site, gateway=where.gateway, device=where.device,
                            metric=where.metric, message=message, opened_ms=now, last_triggered_ms=now,
                            last_value=value, using_db=conn)
                        await AlertEvent.create(alert_id=alert.id, ts_ms=now, action="opened", value=value,
                                                message=message, using_db=conn)
                    kind = "opened"
                    break
                except IntegrityError:
                    continue
            else:
                raise RuntimeError(f"could not open or retrigger {key}")
            fresh = await Alert.get(id=alert.id)
        self.metrics.alerts.labels(kind).inc()
        if kind == "opened":
            self.stats.opened += 1
            self._changed()
            log.warning("alert_opened", id=fresh.id, key=key, severity=fresh.severity, message=message)
        else:
            self.stats.retriggered += 1
            log.info("alert_retriggered", id=fresh.id, key=key, count=fresh.count)
        notify = self.config.notify
        if (kind == "opened" and notify.on_open) or (kind == "retriggered" and notify.on_retrigger):
            await self._notify(fresh, kind)

    async def _auto_clear(self, key: str, value: float | None, message: str) -> None:
        now = self.clock()
        with self.db.activate():
            async with in_transaction(self.db.connection_name) as conn:
                alert = await Alert.filter(active_key=key).using_db(conn).first()
                if alert is None:
                    return  # cleared by hand already
                n = await Alert.filter(id=alert.id, active_key=key).using_db(conn).update(
                    state=AlertState.CLEARED.value, cleared_ms=now, cleared_by="auto", active_key=None)
                if not n:
                    return
                await AlertEvent.create(alert_id=alert.id, ts_ms=now, action="cleared", by="auto", value=value,
                                        message=f"back to normal: {message}", using_db=conn)
            fresh = await Alert.get(id=alert.id)
        self.stats.cleared += 1
        self.metrics.alerts.labels("cleared").inc()
        self._changed()
        log.info("alert_cleared", id=alert.id, key=key, by="auto")
        if self.config.notify.on_clear:
            await self._notify(fresh, "cleared")

    async def _write_last_values(self, stay: dict[str, float]) -> None:
        if not stay:
            return
        mono = time.monotonic()
        with self.db.activate():
            for key, value in stay.items():
                prev = self._last_value.get(key)
                if prev is not None and (prev[0] == value or mono - prev[1] < LAST_VALUE_EVERY_S):
                    continue
                self._last_value[key] = (value, mono)
                await Alert.filter(active_key=key).update(last_value=value)

    async def _notify(self, alert: Alert, kind: NotifyKind) -> None:
        _, suppressed = self.notifier.notify(_info(alert), kind)
        if suppressed:
            self.metrics.suppressed.inc(suppressed)
            with self.db.activate():
                await Alert.filter(id=alert.id).update(
                    notifications_suppressed=F("notifications_suppressed") + suppressed)

    async def _record_result(self, result: Result) -> None:
        m = result.message
        self.metrics.notifications.labels(m.channel, "delivered" if result.ok else "failed").inc()
        text = f"{m.channel} ({m.kind}) after {result.attempts} attempt(s)"
        if result.error:
            text += f": {result.error}"
        with self.db.activate():
            if not self.db.is_open:
                return
            await AlertEvent.create(alert_id=m.alert.id, ts_ms=self.clock(),
                                    action="notified" if result.ok else "notify_failed", by=m.contact.name,
                                    message=text)
            if result.ok:
                await Alert.filter(id=m.alert.id).update(notifications_sent=F("notifications_sent") + 1)


# -- acknowledge and clear (the API) -------------------------------------------------------------


async def acknowledge(db: Database, alert_id: int, by: str, now: int, note: str = "") -> Alert:
    """Acknowledge an open alert. :class:`AlertNotFound` / :class:`AlertConflict` (already
    acknowledged, or cleared) change nothing."""
    with db.activate():
        async with in_transaction(db.connection_name) as conn:
            alert = await Alert.filter(id=alert_id).using_db(conn).first()
            if alert is None:
                raise AlertNotFound(f"unknown alert {alert_id}")
            n = await Alert.filter(id=alert_id, state=AlertState.OPEN.value).using_db(conn).update(
                state=AlertState.ACKNOWLEDGED.value, acknowledged_ms=now, acknowledged_by=by)
            if not n:
                current = await Alert.filter(id=alert_id).using_db(conn).get()
                if current.state == AlertState.CLEARED.value:
                    raise AlertConflict(f"alert {alert_id} is cleared; a cleared alert cannot be acknowledged")
                raise AlertConflict(f"alert {alert_id} is already acknowledged by {current.acknowledged_by!r}")
            await AlertEvent.create(alert_id=alert_id, ts_ms=now, action="acknowledged", by=by, message=note,
                                    using_db=conn)
        return await Alert.get(id=alert_id)


async def clear(db: Database, alert_id: int, by: str, now: int, note: str = "") -> Alert:
    """Clear an open or acknowledged alert by hand. :class:`AlertNotFound` / :class:`AlertConflict`
    (already cleared) change nothing. The next breach of the condition opens a new alert."""
    with db.activate():
        async with in_transaction(db.connection_name) as conn:
            alert = await Alert.filter(id=alert_id).using_db(conn).first()
            if alert is None:
                raise AlertNotFound(f"unknown alert {alert_id}")
            n = await Alert.filter(id=alert_id, active_key__isnull=False).using_db(conn).update(
                state=AlertState.CLEARED.value, cleared_ms=now, cleared_by=by, active_key=None)
            if not n:
                raise AlertConflict(f"alert {alert_id} is already cleared")
            await AlertEvent.create(alert_id=alert_id, ts_ms=now, action="cleared", by=by, message=note,
                                    using_db=conn)
        return await Alert.get(id=alert_id)


async def history(db: Database, alert_id: int) -> list[dict[str, Any]]:
    """The alert's history, oldest first."""
    with db.activate():
        rows: list[dict[str, Any]] = await AlertEvent.filter(alert_id=alert_id).order_by("ts_ms", "id").values(
            "ts_ms", "action", "by", "value", "message")
    return rows
