"""MQTT ingest: subscribe, validate, batch, commit, then acknowledge.

Delivery semantics (``docs/hub.md``, "Delivery"): the hub keeps a persistent MQTT session (fixed
client id, ``clean_session=False``) and acknowledges a QoS 1 message only after the batch
containing it is committed. A hub that crashes or loses the database therefore never loses a
message: the broker redelivers whatever was not acknowledged, and the ``(device, seq)`` unique
key (``(gateway, ts, type)`` for gateway events) turns the redelivery into counted duplicates
instead of double rows.

Two tasks share one queue: the *receiver* decodes messages as they arrive (so decoding overlaps
with the database work of the previous batch) and the *writer* groups them into batches of at
most ``batch_max_readings`` readings or ``batch_max_delay_ms`` of waiting, commits, and sends the
PUBACKs in arrival order, as MQTT requires.

The hub also *publishes* on this connection (the retained model assignments of
:mod:`hub.rollout`) through :meth:`Ingest.publish`: outgoing messages have their own message ids
and acknowledgements, so they do not touch the manual PUBACKs of incoming ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import aiomqtt

from hub.config import IngestConfig, MqttConfig
from hub.metrics import HubMetrics
from hub.store import EventItem, StatusItem, Store, TelemetryItem, check_event
from protocol.logs import get_logger
from protocol.schema import (
    EventV1,
    SchemaError,
    StatusV1,
    TelemetryV1,
    decode_event,
    decode_status,
    decode_telemetry,
)
from protocol.topics import parse_topic, subscription

log = get_logger("hub.ingest")

Kind = Literal["telemetry", "status", "event", "rejected"]
CommittedHook = Callable[[Sequence[TelemetryItem], Sequence[StatusItem], Sequence[EventItem]], None]
"""Called with each committed batch (see :meth:`Ingest.on_committed`)."""


@dataclass(slots=True)
class _Pending:
    """A received message waiting for its batch to commit before it is acknowledged."""

    generation: int  # which MQTT connection delivered it: a mid is only valid on that connection
    mid: int
    qos: int
    kind: Kind
    readings: int
    item: TelemetryItem | StatusItem | EventItem | None


def classify_schema_error(message: str) -> str:
    """A short, fixed label for a :class:`SchemaError` message (a Prometheus label value)."""
    if message.startswith("payload of"):
        return "too_large"
    if message.startswith("payload is not"):
        return "not_json"
    if "no integer 'v'" in message:
        return "no_version"
    if "does not match topic version" in message:
        return "version_mismatch"
    if message.startswith("unsupported schema version"):
        return "unsupported_version"
    return "invalid"


def now_ms() -> int:
    """Hub wall clock in ms since the epoch."""
    return time.time_ns() // 1_000_000


class PublishError(RuntimeError):
    """A message could not be published (not connected, or the broker did not acknowledge it)."""


class Ingest:
    """The MQTT side of the hub. ``await run()`` until :meth:`stop`."""

    def __init__(self, mqtt: MqttConfig, ingest: IngestConfig, store: Store, metrics: HubMetrics,
                 clock: Callable[[], int] = now_ms) -> None:
        self.mqtt = mqtt
        # Built once (it reads the CA and key files); rotating them means restarting the hub.
        self._tls = mqtt.tls_context()
        self.cfg = ingest
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.connected = False
        self.subscribed = asyncio.Event()
        """Set while connected and subscribed (cleared on connection loss)."""
        self.last_error: str | None = None
        # None is a wake-up call: stop() uses it to end the batch wait at once.
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._unfinished = 0  # received, not yet acknowledged or given up
        self._decoded_readings = 0  # readings of those, held decoded ([ingest] max_decoded_readings)
        self._room = asyncio.Event()  # set while below max_decoded_readings
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._generation = 0
        self._writer_task: asyncio.Task[None] | None = None
        self._drain_timeout = 5.0
        self._subscribed_hooks: list[Callable[[], None]] = []
        self._committed_hooks: list[CommittedHook] = []

    def on_subscribed(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (synchronously; it must not block) each time a connection is subscribed:
        at start and after every reconnection."""
        self._subscribed_hooks.append(hook)

    def on_committed(self, hook: CommittedHook) -> None:
        """Call ``hook(telemetry, statuses, events)`` with every batch once it is committed, before
        its messages are acknowledged (the alert engine). It runs on the ingest path: it must only
        hand the batch on (e.g. put it on a queue); whatever it raises is logged and ignored."""
        self._committed_hooks.append(hook)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      timeout_s: float = 10.0) -> None:
        """Publish on the hub's connection and wait (at most ``timeout_s``) for the broker's
        acknowledgement (QoS 1). Raises :class:`PublishError` when not connected or not acknowledged;
        the caller retries (after a reconnection the hooks of :meth:`on_subscribed` run)."""
        client = self._client
        if client is None or not self.subscribed.is_set():
            raise PublishError("not connected to the broker")
        try:
            # paho queues the packet and the socket is written by aiomqtt's loop callbacks: the
            # event loop is never blocked, only this coroutine waits for the PUBACK.
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=timeout_s)
        except aiomqtt.MqttError as exc:
            raise PublishError(f"publish to {topic} failed: {exc}") from exc

    @property
    def topics(self) -> list[str]:
        """Subscription filters: telemetry and events (shared when a group is set), and status.

        Status stays a plain subscription: every hub of a group needs every gateway's state,
        and brokers do not send retained messages to shared subscriptions. Events are not
        retained and only go to the database the group shares, so, like telemetry, each is
        handed to one hub of the group (the ``(gateway, ts, type)`` key absorbs redeliveries).
        """
        group = self.mqtt.share_group
        return [subscription("telemetry", share_group=group), subscription("status"),
                subscription("events", share_group=group)]

    @property
    def pending(self) -> int:
        """Messages received and not yet committed and acknowledged."""
        return self._unfinished

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, reconnect with back-off, and ingest until :meth:`stop` is called."""
        self._writer_task = asyncio.create_task(self._writer(), name="hub-ingest-writer")
        backoff = 0.2
        try:
            while not self._stop.is_set():
                try:
                    await self._session()
                    backoff = 0.2
                except aiomqtt.MqttError as exc:
                    self.last_error = str(exc)
                    if self.connected:
                        self.metrics.reconnect()
                    log.warning("mqtt_disconnected", error=str(exc), retry_in_s=round(backoff, 2),
                                host=self.mqtt.host, port=self.mqtt.port)
                finally:
                    self._client = None
                    self.connected = False
                    self.subscribed.clear()
                    self.metrics.mqtt_connected.set(0)
                if self._stop.is_set():
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                backoff = min(backoff * 2, self.mqtt.reconnect_max_s)
        finally:
            # Whatever is still queued was not acknowledged, so the broker keeps it for us.
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task

    async def stop(self, drain_s: float = 5.0) -> None:
        """Ask :meth:`run` to finish: stop taking messages, commit and acknowledge what was
        received (for at most ``drain_s`` seconds), then disconnect cleanly."""
        self._drain_timeout = drain_s
        self._stop.set()
        self._queue.put_nowait(None)  # a batch waiting for batch_max_delay_ms is committed now

    async def _session(self) -> None:
        client = aiomqtt.Client(
            self.mqtt.host, self.mqtt.port,
            identifier=self.mqtt.client_id,
            # Persistent session: the broker keeps our subscriptions and queues QoS 1 messages
            # while the hub is down or restarting.
            clean_session=False,
            protocol=aiomqtt.ProtocolVersion.V311,
            keepalive=self.mqtt.keepalive,
            username=self.mqtt.username,
            password=self.mqtt.password.get_secret_value() if self.mqtt.password else None,
            timeout=10, tls_context=self._tls,
        )
        # aiomqtt lets paho acknowledge every message as soon as it is received, which would lose
        # the messages of a batch that is not yet committed if the hub died. paho's manual-ack
        # mode (set before connecting) leaves the PUBACK to us; aiomqtt keeps the paho client in
        # `_client` and has no public switch for this.
        client._client.manual_ack_set(True)
        async with client:
            self._generation += 1
            generation = self._generation
            self._client = client
            self.connected = True
            granted = await client.subscribe([(t, 1) for t in self.topics])
            refused = [t for t, code in zip(self.topics, granted, strict=False) if _refused(code)]
            if refused:
                # e.g. a broker ACL; retried with back-off and visible in /api/v1/health.
                raise aiomqtt.MqttError(f"broker refused subscription to {', '.join(refused)}")
            self.subscribed.set()
            self.last_error = None
            self.metrics.mqtt_connected.set(1)
            log.info("mqtt_subscribed", host=self.mqtt.host, port=self.mqtt.port,
                     client_id=self.mqtt.client_id, topics=self.topics)
            for hook in self._subscribed_hooks:
                hook()
            receiver = asyncio.create_task(self._receive(client, generation), name="hub-ingest-receiver")
            stopping = asyncio.create_task(self._stop.wait())
            try:
                await asyncio.wait({receiver, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                if not receiver.done():
                    receiver.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await receiver
            if self._stop.is_set():
                # Graceful shutdown: let the writer commit and acknowledge what we already
                # received while the connection is still up, then disconnect.
                await self._drain(self._drain_timeout)
            else:
                receiver.result()  # re-raise the MqttError that ended the connection

    async def _drain(self, limit_s: float) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), limit_s)
        except TimeoutError:
            log.warning("ingest_drain_timeout", unacknowledged=self._unfinished,
                        note="not acknowledged: the broker redelivers them after restart")

    # -- receiving ---------------------------------------------------------------------------

    async def _receive(self, client: aiomqtt.Client, generation: int) -> None:
        limit = self.cfg.max_decoded_readings
        messages = client.messages
        gate = _ReadGate(client)
        try:
            while True:
                # Never wait for a message with the socket paused (nothing could arrive).
                if gate.paused and self._decoded_readings < limit and len(messages) <= RAW_LOW:
                    gate.resume()
                message = await anext(messages)
                self._accept(message, generation)
                if self._decoded_readings >= limit:
                    # Back-pressure: stop reading from the broker and decoding until the writer has
                    # committed (and acknowledged) a batch. The broker keeps the rest.
                    gate.pause()
                    self._room.clear()
                    self.metrics.ingest_paused()
                    await self._room.wait()
                elif len(messages) >= RAW_HIGH:
                    gate.pause()  # arriving faster than decoded: let the broker hold them
        finally:
            gate.resume()

    def _accept(self, message: aiomqtt.Message, generation: int) -> None:
        received = self.clock()
        topic_str = message.topic.value
        payload = message.payload
        kind: Kind = "rejected"
        item: TelemetryItem | StatusItem | EventItem | None = None
        readings = 0
        channel = "unknown"
        try:
            topic = parse_topic(topic_str)
            channel = topic.channel
            if not isinstance(payload, bytes | bytearray):
                raise SchemaError("payload is not bytes")
            decoded: TelemetryV1 | StatusV1 | EventV1
            if topic.channel == "telemetry":
                decoded = decode_telemetry(bytes(payload), expect_version=topic.version)
            elif topic.channel == "status":
                decoded = decode_status(bytes(payload), expect_version=topic.version)
            else:
                decoded = decode_event(bytes(payload), expect_version=topic.version)
            if decoded.site != topic.site or decoded.gateway != topic.gateway:
                raise _Rejected("site_mismatch",
                                f"payload names {decoded.site}/{decoded.gateway}, topic {topic.site}/"
                                f"{topic.gateway}")
            if isinstance(decoded, TelemetryV1):
                kind, item, readings = "telemetry", TelemetryItem(decoded, received), len(decoded.readings)
            elif isinstance(decoded, StatusV1):
                kind, item = "status", StatusItem(decoded, received)
            else:
                try:
                    check_event(decoded)
                except ValueError as exc:
                    raise _Rejected("invalid", f"event: {exc}") from None
                kind, item = "event", EventItem(decoded, received)
        except _Rejected as exc:
            self._reject(topic_str, exc.reason, exc.detail)
        except SchemaError as exc:
            self._reject(topic_str, classify_schema_error(str(exc)), str(exc))
        except ValueError as exc:  # parse_topic
            self._reject(topic_str, "topic", str(exc))
        self.metrics.message(channel)
        # Rejected messages are queued too: they are acknowledged (never redelivered) but only
        # after the messages received before them, because PUBACKs must go out in order.
        self._unfinished += 1
        self._decoded_readings += readings
        self._idle.clear()
        self.metrics.queue_depth.set(self._unfinished)
        self.metrics.queue_readings.set(self._decoded_readings)
        self._queue.put_nowait(_Pending(generation, message.mid, message.qos, kind, readings, item))

    def _reject(self, topic: str, reason: str, detail: str) -> None:
        self.metrics.malformed(reason)
        # Topic and reason only: a payload can be megabytes and may hold anything.
        log.warning("message_rejected", topic=topic[:200], reason=reason, detail=detail[:300])

    # -- writing -------------------------------------------------------------------------------

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        max_readings = self.cfg.batch_max_readings
        delay = self.cfg.batch_max_delay_ms / 1000
        while True:
            first = await self._queue.get()
            if first is None:
                continue
            batch = [first]
            readings = first.readings
            deadline = loop.time() + delay
            while readings < max_readings:
                try:
                    nxt = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or self._stop.is_set():
                        break
                    try:
                        nxt = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                if nxt is None:
                    break
                batch.append(nxt)
                readings += nxt.readings
            await self._commit(batch)

    async def _commit(self, batch: list[_Pending]) -> None:
        telemetry = [p.item for p in batch if isinstance(p.item, TelemetryItem)]
        statuses = [p.item for p in batch if isinstance(p.item, StatusItem)]
        events = [p.item for p in batch if isinstance(p.item, EventItem)]
        if telemetry or statuses or events:
            backoff = 0.1
            while True:
                started = time.perf_counter()
                try:
                    result = await self.store.write(telemetry, statuses, events)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the database is down or refused the batch: retry
                    self.metrics.db_error()
                    self.last_error = f"database: {exc}"
                    log.error("batch_failed", error=str(exc), error_type=type(exc).__name__,
                              messages=len(batch), retry_in_s=backoff)
                    # Cached ids may be what is wrong (rows deleted behind our back).
                    self.store.forget_cache()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                self.metrics.batch(time.perf_counter() - started, result.readings, result.inserted)
                if result.events:
                    self.metrics.events(result.events, result.events_inserted)
                break
            for hook in self._committed_hooks:
                try:
                    hook(telemetry, statuses, events)
                except Exception as exc:  # a consumer must never stop or delay ingest
                    log.exception("committed_hook_failed", error=repr(exc))
        self._ack(batch)

    def _ack(self, batch: list[_Pending]) -> None:
        client = self._client
        acked = 0
        for p in batch:
            # A message id from an earlier connection must not be acknowledged on this one (it may
            # name a different message); the broker redelivers those and dedup absorbs them.
            if client is not None and p.generation == self._generation and p.qos > 0:
                client._client.ack(p.mid, p.qos)
                acked += 1
        self.metrics.acked(acked)
        self._unfinished -= len(batch)
        self._decoded_readings -= sum(p.readings for p in batch)
        self.metrics.queue_depth.set(self._unfinished)
        self.metrics.queue_readings.set(self._decoded_readings)
        if self._decoded_readings < self.cfg.max_decoded_readings:
            self._room.set()
        if self._unfinished == 0:
            self._idle.set()


RAW_HIGH, RAW_LOW = 100, 25
"""Received messages waiting to be decoded (in aiomqtt's queue) at which the hub stops reading
its broker connection, and at which it reads again."""


class _ReadGate:
    """Stops and restarts reading the broker connection: TCP back-pressure, so a backlog stays in
    the broker (which is made to hold it: ``max_queued_messages``) instead of the hub's memory.

    Mosquitto 2.0 does not keep a subscriber to its in-flight window once acknowledgements flow:
    with ``log_type all`` each PUBACK of the oldest message is followed by up to a window's worth
    of new PUBLISHes (2,000 of 2,000 sent with 100 acknowledged, window 100), so after an outage
    of days the backlog would arrive as fast as TCP carries it. aiomqtt reads the socket through
    the event loop's ``add_reader`` and has no pause, so this takes its reader out of the loop and
    puts the same one back. Paused, no PINGRESP is read either: a pause longer than the keep-alive
    (the database down for minutes) ends the connection, and the broker redelivers what was not
    acknowledged after the reconnection, as after any connection loss.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self._client = client
        self._saved: tuple[int, Callable[..., object], tuple[object, ...]] | None = None

    @property
    def paused(self) -> bool:
        """Whether reading is paused."""
        return self._saved is not None

    def pause(self) -> None:
        """Stop reading (a no-op if paused, not connected, or on a loop without a selector)."""
        if self._saved is not None:
            return
        sock = self._client._client.socket()
        selector = getattr(asyncio.get_running_loop(), "_selector", None)
        if sock is None or selector is None:
            return
        fd = sock.fileno()
        try:
            reader = selector.get_key(fd).data[0]
        except (KeyError, ValueError):
            return
        if reader is None or reader.cancelled():
            return
        self._saved = (fd, reader._callback, reader._args)
        asyncio.get_running_loop().remove_reader(fd)

    def resume(self) -> None:
        """Read again, and once at once: a TLS socket may hold decrypted bytes the selector does not
        see."""
        if self._saved is None:
            return
        fd, callback, args = self._saved
        self._saved = None
        sock = self._client._client.socket()
        if sock is None or sock.fileno() != fd:
            return  # the connection is gone; its successor has a reader of its own
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, callback, *args)
        loop.call_soon(callback, *args)


def _refused(code: object) -> bool:
    # paho reports SUBACK results as ReasonCode objects (or plain ints from older versions);
    # 0x80 and above mean failure.
    if isinstance(code, int):
        return code >= 0x80
    return bool(getattr(code, "is_failure", False))


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
