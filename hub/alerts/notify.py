"""Notifications to the contacts of a site: e-mail (SMTP) and webhooks (HTTP POST of JSON).

* **Who**: every ``[[alerts.contacts]]`` whose ``sites`` include the alert's site (or who has no
  ``sites``) and whose ``min_severity`` the alert reaches.
* **Rate limit** per contact and condition key: at most ``max_per_window`` messages in any
  ``window_s``; the rest are counted, and once the window allows again one *digest* says how many
  were held back and what the alert looks like now. A flapping sensor therefore costs each person
  at most ``max_per_window`` messages (plus a digest) per window.
* **Retry**: each message is tried up to ``retry_attempts`` times, waiting ``retry_base_s``
  doubling up to ``retry_max_s`` in between. A webhook answering 2xx is delivered; 408, 429 and
  5xx and connection errors are retried, other 4xx are not (the request would not get better).
  SMTP runs in a worker thread (stdlib ``smtplib``); a refused recipient is not retried.
* Deliveries run as tasks beside ingest (at most ``max_concurrent`` at once) and never raise into
  the caller; results go to ``on_result`` (the engine writes them into the alert's history).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any, Literal

import httpx

from hub.alerts.rules import AlertsConfig, Contact, Severity
from hub.mail import PermanentMailError, send_message
from protocol.logs import get_logger

log = get_logger("hub.alerts.notify")

NotifyKind = Literal["opened", "retriggered", "cleared", "digest"]


@dataclass(frozen=True, slots=True)
class AlertInfo:
    """What a notification says about an alert (a snapshot, not the ORM row)."""

    id: int
    key: str
    rule: str
    type: str
    severity: Severity
    state: str
    site: str
    gateway: str
    device: str
    metric: str
    message: str
    count: int
    last_value: float | None
    opened_ms: int

    def as_json(self) -> dict[str, Any]:
        """The alert part of a webhook body."""
        return {"id": self.id, "key": self.key, "rule": self.rule, "type": self.type,
                "severity": self.severity.value, "state": self.state, "site": self.site or None,
                "gateway": self.gateway or None, "device": self.device or None, "metric": self.metric or None,
                "message": self.message, "count": self.count, "last_value": self.last_value,
                "opened_at_ms": self.opened_ms, "url": f"/api/v1/alerts/{self.id}"}


@dataclass(frozen=True, slots=True)
class Message:
    """One notification to one contact over one channel."""

    contact: Contact
    channel: Literal["email", "webhook"]
    kind: NotifyKind
    alert: AlertInfo
    suppressed: int
    """Notifications of this condition held back for this contact since the previous message."""

    @property
    def subject(self) -> str:
        """E-mail subject, e.g. ``[twin CRITICAL] opened: plant1.gw1.boiler1 pressure 0.6 bar below 0.8``."""
        a = self.alert
        what = {"opened": "opened", "retriggered": f"again ({a.count}x)", "cleared": "cleared",
                "digest": f"digest ({self.suppressed} held back)"}[self.kind]
        return f"[twin {a.severity.value.upper()}] {what}: {a.message}"[:250]

    @property
    def text(self) -> str:
        """E-mail body."""
        a = self.alert
        lines = [
            f"Alert {a.id} ({a.rule}, {a.type}) is {a.state}.", "",
            a.message, "",
            f"severity:   {a.severity.value}",
            f"site:       {a.site or '-'}",
            f"gateway:    {a.gateway or '-'}",
            f"device:     {a.device or '-'}",
            f"metric:     {a.metric or '-'}",
            f"last value: {'-' if a.last_value is None else f'{a.last_value:g}'}",
            f"triggered:  {a.count} time(s)",
            f"condition:  {a.key}",
            f"details:    /api/v1/alerts/{a.id}",
        ]
        if self.suppressed:
            lines += ["", f"{self.suppressed} further notification(s) about this condition were held back "
                          f"by the rate limit."]
        return "\n".join(lines) + "\n"

    def json(self) -> dict[str, Any]:
        """Webhook body."""
        return {"event": self.kind, "contact": self.contact.name, "role": self.contact.role,
                "suppressed": self.suppressed, "alert": self.alert.as_json()}


@dataclass(frozen=True, slots=True)
class Result:
    """How a delivery ended."""

    message: Message
    ok: bool
    attempts: int
    error: str = ""


class _Permanent(Exception):
    """A failure that another attempt cannot fix."""


@dataclass
class _Window:
    sent: deque[float] = field(default_factory=deque)
    suppressed: int = 0
    latest: AlertInfo | None = None


@dataclass
class NotifyStats:
    """Counters (also shown in logs)."""

    delivered: int = 0
    failed: int = 0
    retries: int = 0
    suppressed: int = 0
    digests: int = 0


class Notifier:
    """Rate-limited, retried delivery of alert notifications."""

    def __init__(self, config: AlertsConfig, on_result: Callable[[Result], Awaitable[None]] | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.on_result = on_result
        self.monotonic = monotonic
        self.stats = NotifyStats()
        self._windows: dict[tuple[str, str], _Window] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(config.notify.max_concurrent)
        self._http: httpx.AsyncClient | None = None

    def contacts_for(self, alert: AlertInfo) -> list[Contact]:
        """Contacts that want to hear of ``alert``."""
        return [c for c in self.config.contacts if c.wants(alert.site, alert.severity)]

    def notify(self, alert: AlertInfo, kind: NotifyKind) -> tuple[int, int]:
        """Queue notifications about ``alert`` to its contacts; returns (queued, suppressed) counted
        per contact. Never blocks and never raises."""
        queued = suppressed = 0
        cfg = self.config.notify
        now = self.monotonic()
        for contact in self.contacts_for(alert):
            window = self._windows.setdefault((contact.name, alert.key), _Window())
            while window.sent and now - window.sent[0] >= cfg.window_s:
                window.sent.popleft()
            if len(window.sent) >= cfg.max_per_window:
                window.suppressed += 1
                window.latest = alert
                suppressed += 1
                self.stats.suppressed += 1
                continue
            window.sent.append(now)
            held, window.suppressed, window.latest = window.suppressed, 0, None
            self._send(contact, kind, alert, held)
            queued += 1
        if suppressed:
            log.info("notifications_suppressed", alert=alert.id, key=alert.key, contacts=suppressed)
        return queued, suppressed

    def flush_digests(self) -> int:
        """Send a digest for every contact and condition with held-back notifications whose window
        allows again; returns how many were queued (the engine calls this on its timer)."""
        cfg = self.config.notify
        now = self.monotonic()
        contacts = {c.name: c for c in self.config.contacts}
        sent = 0
        for (name, _key), window in list(self._windows.items()):
            while window.sent and now - window.sent[0] >= cfg.window_s:
                window.sent.popleft()
            if not window.suppressed or window.latest is None or len(window.sent) >= cfg.max_per_window:
                if not window.sent and not window.suppressed:
                    del self._windows[(name, _key)]  # nothing left to remember
                continue
            contact = contacts.get(name)
            if contact is None:
                continue
            window.sent.append(now)
            self._send(contact, "digest", window.latest, window.suppressed)
            self.stats.digests += 1
            window.suppressed, window.latest = 0, None
            sent += 1
        return sent

    def _send(self, contact: Contact, kind: NotifyKind, alert: AlertInfo, suppressed: int) -> None:
        messages = [Message(contact, "email", kind, alert, suppressed)] if contact.email else []
        if contact.webhook:
            messages.append(Message(contact, "webhook", kind, alert, suppressed))
        for message in messages:
            task = asyncio.create_task(self._deliver(message), name=f"notify-{contact.name}-{message.channel}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> int:
        """Deliveries not finished yet."""
        return len(self._tasks)

    async def _deliver(self, message: Message) -> None:
        cfg = self.config.notify
        delay = cfg.retry_base_s
        attempts = 0
        error = ""
        ok = False
        async with self._slots:
            while attempts < cfg.retry_attempts:
                attempts += 1
                try:
                    if message.channel == "email":
                        await asyncio.to_thread(self._smtp_send, message)
                    else:
                        await self._post(message)
                    ok, error = True, ""
                    break
                except _Permanent as exc:
                    error = str(exc)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # network, server: try again later
                    error = f"{type(exc).__name__}: {exc}"
                if attempts < cfg.retry_attempts:
                    self.stats.retries += 1
                    log.warning("notify_retry", contact=message.contact.name, channel=message.channel,
                                alert=message.alert.id, attempt=attempts, retry_in_s=round(delay, 2), error=error)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, cfg.retry_max_s)
        if ok:
            self.stats.delivered += 1
            log.info("notified", contact=message.contact.name, channel=message.channel, alert=message.alert.id,
                     kind=message.kind, attempts=attempts)
        else:
            self.stats.failed += 1
            log.error("notify_failed", contact=message.contact.name, channel=message.channel,
                      alert=message.alert.id, attempts=attempts, error=error)
        if self.on_result is not None:
            try:
                await self.on_result(Result(message, ok, attempts, error))
            except Exception as exc:  # recording the result must not kill the delivery task noisily
                log.warning("notify_result_not_recorded", alert=message.alert.id, error=repr(exc))

    async def _post(self, message: Message) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.config.notify.webhook_timeout_s)
        assert message.contact.webhook is not None
        response = await self._http.post(message.contact.webhook, json=message.json(),
                                         headers={"User-Agent": "twin-hub-alerts"})
        status = response.status_code
        if 200 <= status < 300:
            return
        if status in (408, 429) or status >= 500:
            raise RuntimeError(f"webhook answered HTTP {status}")
        raise _Permanent(f"webhook answered HTTP {status}")

    def _smtp_send(self, message: Message) -> None:
        smtp = self.config.smtp
        email = EmailMessage()
        email["From"] = smtp.sender
        email["To"] = ", ".join(message.contact.email)
        email["Subject"] = message.subject
        email["X-Twin-Alert"] = str(message.alert.id)
        email.set_content(message.text)
        try:
            refused = send_message(smtp, email)
        except PermanentMailError as exc:
            raise _Permanent(str(exc)) from exc
        if refused:
            log.warning("smtp_recipients_refused", refused=sorted(refused))

    async def wait_idle(self, within_s: float) -> bool:
        """Wait (at most ``within_s``) until every delivery finished; True if they did."""
        deadline = time.monotonic() + within_s
        while self._tasks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.wait(set(self._tasks), timeout=remaining)
        return True

    async def close(self, drain_s: float = 2.0) -> None:
        """Give deliveries in flight ``drain_s`` to finish, cancel the rest, close the HTTP client."""
        if not await self.wait_idle(drain_s):
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            log.warning("notifications_abandoned_at_stop")
        if self._http is not None:
            await self._http.aclose()
            self._http = None
