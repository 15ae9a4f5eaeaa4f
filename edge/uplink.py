"""MQTT uplink: drains the buffer to the broker in QoS 1 batches.

A batch is deleted from the buffer only after the broker's PUBACK; if the connection drops
first, the batch stays and is sent again after reconnecting (the hub deduplicates on
(gateway, device, seq)). Several batches may be in flight at once so one round trip per batch
does not cap throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable

import aiomqtt

from edge import __version__
from edge.buffer import ReadingBuffer
from edge.config import EdgeConfig
from edge.metrics import EdgeMetrics
from edge.reading import StoredReading
from protocol import topics
from protocol.logs import get_logger
from protocol.schema import (
    ActiveModelV1,
    DeviceInfoV1,
    DeviceKind,
    EventType,
    EventV1,
    GatewayState,
    SchemaError,
    StatusV1,
    decode_gateway_config,
    decode_model_assignment,
    encode,
    encode_telemetry_v1,
)

log = get_logger("edge.uplink")

# Hub-to-gateway payloads of these channels are validated here before their handler sees them, so a
# hostile or broken one (oversized, not JSON, nested past the parser, wrong shape) is dropped and
# counted in one place. Commands are not: their handler counts its malformed ones itself.
_DOWNLINK_CHECKS: dict[str, Callable[[bytes], object]] = {
    "models": lambda p: decode_model_assignment(p, expect_version=1),
    "config": lambda p: decode_gateway_config(p, expect_version=1),
}


def _rejection(message: str) -> str:
    """A short, fixed label for a :class:`SchemaError` message (a Prometheus label value)."""
    if message.startswith("payload of"):
        return "too_large"
    if message.startswith("payload is not"):
        return "not_json"
    return "invalid"


def now_ms() -> int:
    """Wall-clock time in ms since the epoch."""
    return time.time_ns() // 1_000_000


class Uplink:
    """Keeps a connection to the broker and forwards the buffer through it."""

    def __init__(self, cfg: EdgeConfig, buffer: ReadingBuffer, devices: dict[str, tuple[str, str]],
                 metrics: EdgeMetrics) -> None:
        self._stopped = False
        self.cfg = cfg
        self.buffer = buffer
        self.devices = devices
        self.metrics = metrics
        self.site = cfg.gateway.site
        self.gateway = cfg.gateway.name
        self.telemetry_topic = topics.telemetry_topic(self.site, self.gateway)
        self.status_topic = topics.status_topic(self.site, self.gateway)
        self.events_topic = topics.events_topic(self.site, self.gateway)
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self.model_status: Callable[[], dict[str, ActiveModelV1]] | None = None
        """Reports the anomaly model per profile for the status message (set by the agent)."""
        self._downlink: dict[str, Callable[[bytes], None]] = {}
        """Hub-to-gateway topics the session subscribes to, each with the handler of its messages."""
        self._downlink_channel: dict[str, str] = {}
        self._status_dirty = asyncio.Event()
        # Built once: it reads the CA and key files (rotating them means restarting the agent).
        self._tls = cfg.mqtt.tls_context()

    def on_downlink(self, channel: topics.Channel, handler: Callable[[bytes], None]) -> None:
        """Subscribe to this gateway's ``channel`` (``models``, ``config``, ``commands``) on every
        session and hand each payload to ``handler`` on the event loop (it must not block)."""
        if channel not in topics.DOWNLINK_CHANNELS:
            raise ValueError(f"{channel!r} is not a hub-to-gateway channel")
        topic = topics.channel_topic(channel, self.site, self.gateway)
        self._downlink[topic] = handler
        self._downlink_channel[topic] = channel

    def status_changed(self) -> None:
        """Publish the retained status again (the models changed)."""
        self._status_dirty.set()

    def _status(self, state: GatewayState) -> bytes:
        return encode(StatusV1(
            site=self.site, gateway=self.gateway, state=state, ts=now_ms(), agent_version=__version__,
            devices={n: DeviceInfoV1(kind=DeviceKind(k), profile=p) for n, (k, p) in self.devices.items()},
            backlog=self.buffer.backlog, models=self.model_status() if self.model_status else {}))

    def _client_for_session(self) -> aiomqtt.Client:
        m = self.cfg.mqtt
        return aiomqtt.Client(
            m.host, m.port, identifier=self.cfg.client_id, username=m.username, password=m.password,
            keepalive=m.keepalive_s, clean_session=True, max_inflight_messages=m.max_inflight,
            timeout=m.publish_timeout_s, tls_context=self._tls,
            # The broker publishes this for us if we vanish without a clean disconnect
            # (power cut, network loss); retained so late subscribers see it too.
            will=aiomqtt.Will(self.status_topic, self._status(GatewayState.OFFLINE), qos=1, retain=True),
        )

    def stop(self) -> None:
        """Make :meth:`run` return at its next step even if a cancel was lost.

        Python 3.11's ``asyncio.wait_for`` can swallow a cancel that lands as a connection completes
        (aiomqtt connects through it), and the uplink then went on forwarding; shutdown waited forever.
        """
        self._stopped = True

    async def run(self) -> None:
        """Connect, forward, reconnect with exponential back-off and jitter; runs until cancelled
        (or :meth:`stop`)."""
        delay = self.cfg.mqtt.reconnect_min_s
        while not self._stopped:
            try:
                async with self._client_for_session() as client:
                    if self._stopped:
                        return
                    # aiomqtt warns above 10 pending publishes; max_inflight may be more by design.
                    client.pending_calls_threshold = self.cfg.mqtt.max_inflight + 2
                    self._client = client
                    self._status_dirty.clear()
                    await client.publish(self.status_topic, self._status(GatewayState.ONLINE), qos=1, retain=True)
                    for topic in self._downlink:
                        # models/config are retained: the current ones arrive on every (re)connect.
                        await client.subscribe(topic, qos=1)
                    self.connected.set()
                    self.metrics.mqtt_connected.set(1)
                    log.info("mqtt_connected", host=self.cfg.mqtt.host, port=self.cfg.mqtt.port,
                             backlog=self.buffer.backlog)
                    delay = self.cfg.mqtt.reconnect_min_s
                    if self._stopped:
                        return
                    await self._session(client)
            except aiomqtt.MqttError as exc:
                self.metrics.mqtt_reconnects.inc()
                log.warning("mqtt_disconnected", error=str(exc), retry_in_s=round(delay, 2),
                            backlog=self.buffer.backlog)
            finally:
                self._client = None
                self.connected.clear()
                self.metrics.mqtt_connected.set(0)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.cfg.mqtt.reconnect_max_s)

    async def _session(self, client: aiomqtt.Client) -> None:
        """Forward the buffer, take model assignments and re-publish the status on change, until
        one of them fails (the connection is gone); then stop the others and raise."""
        tasks = [asyncio.create_task(self._forward(client), name="uplink-forward"),
                 asyncio.create_task(self._status_updates(client), name="uplink-status")]
        if self._downlink:
            tasks.append(asyncio.create_task(self._receive(client), name="uplink-receive"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
            raise aiomqtt.MqttError("the session's message stream ended")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _status_updates(self, client: aiomqtt.Client) -> None:
        while True:
            await self._status_dirty.wait()
            self._status_dirty.clear()
            await client.publish(self.status_topic, self._status(GatewayState.ONLINE), qos=1, retain=True)
            models = self.model_status() if self.model_status else {}
            log.info("status_published", models={p: f"{m.name} v{m.version} {m.state}" for p, m in models.items()})

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            handler = self._downlink.get(msg.topic.value)
            if handler is None:
                continue
            channel = self._downlink_channel[msg.topic.value]
            payload = msg.payload
            data = bytes(payload) if isinstance(payload, bytes | bytearray) else str(payload).encode()
            check = _DOWNLINK_CHECKS.get(channel)
            if check is not None and data:  # empty: a retained message cleared, the handler's news
                try:
                    check(data)
                except SchemaError as exc:
                    reason = _rejection(str(exc))
                    self.metrics.downlink_rejected.labels(channel, reason).inc()
                    # Reason and size only: the payload may be megabytes and hold anything.
                    log.error("downlink_message_rejected", channel=channel, reason=reason, size=len(data),
                              error=str(exc)[:300])
                    continue
            try:
                handler(data)
            except Exception as exc:  # a bad message must not cost the connection
                self.metrics.downlink_rejected.labels(channel, "error").inc()
                log.exception("downlink_message_not_taken", topic=msg.topic.value, error=repr(exc)[:300])

    async def _forward(self, client: aiomqtt.Client) -> None:
        """Hand readings to the broker: live ones first, the backlog in between.

        Rows committed after this connection was made are *live*; older rows are the *backlog*
        of an outage. The newest backlog batch goes first (the hub learns the latest state at
        once), then live rows whenever there are any, and backlog batches oldest-first in the
        gaps. At most ``max_inflight`` batches await their PUBACK at any time, so a day of
        backlog drains in large batches without ever being held in memory.
        """
        m = self.cfg.mqtt
        slots = asyncio.Semaphore(m.max_inflight)
        inflight: set[asyncio.Task[None]] = set()
        failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

        def done(task: asyncio.Task[None]) -> None:
            inflight.discard(task)
            slots.release()
            if not task.cancelled() and task.exception() and not failed.done():
                failed.set_result(task.exception())  # type: ignore[arg-type]

        async def publish(rows: list[StoredReading]) -> bool:
            await self._wait_any(slots.acquire(), failed)
            if failed.done():
                return False  # the semaphore dies with this connection; no need to give a slot back
            task = asyncio.create_task(self._publish(client, rows))
            inflight.add(task)
            task.add_done_callback(done)
            return True

        live_cursor = await self.buffer.max_id()
        backlog_end = live_cursor + 1  # backlog rows: backlog_cursor < id < backlog_end
        backlog_cursor: int | None = 0
        try:
            if live_cursor:
                newest = await self.buffer.fetch_newest(m.batch_max_readings, before_id=backlog_end)
                if newest:
                    log.info("backlog_drain_started", backlog=self.buffer.backlog)
                    backlog_end = newest[0].row_id
                    await publish(newest)
            while not failed.done():
                if self.buffer.events_waiting:
                    await self._publish_events(client)
                self.buffer.new_data.clear()
                live = await self.buffer.fetch(live_cursor, m.batch_max_readings)
                wait_ms = m.batch_max_delay_ms - (now_ms() - live[0].ts_ms) if live else 0
                if live and (len(live) >= m.batch_max_readings or wait_ms <= 0):
                    live_cursor = live[-1].row_id
                    await publish(live)
                    continue
                if backlog_cursor is not None:
                    old = await self.buffer.fetch(backlog_cursor, m.batch_max_readings, before_id=backlog_end)
                    if old:
                        backlog_cursor = old[-1].row_id
                        await publish(old)
                        continue
                    backlog_cursor = None
                    log.info("backlog_handed_over", backlog=self.buffer.backlog)
                if live:
                    # Let a part-filled batch grow for up to batch_max_delay_ms after its oldest
                    # reading was taken: fewer, larger messages are what make QoS 1 fast.
                    await self._wait_any(asyncio.sleep(wait_ms / 1000), failed)
                else:
                    await self._wait_any(self.buffer.new_data.wait(), failed)
            raise failed.result()
        finally:
            for t in list(inflight):
                t.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)

    async def _publish_events(self, client: aiomqtt.Client) -> None:
        self.buffer.events_waiting = False
        for ev in await self.buffer.events():
            payload = encode(EventV1(site=self.site, gateway=self.gateway, ts=ev.ts_ms, type=EventType(ev.type),
                                     message=ev.message[:1000], readings_dropped=ev.dropped, device=ev.device,
                                     details=ev.details))
            await client.publish(self.events_topic, payload, qos=1)
            await self.buffer.ack_event(ev.row_id)
            log.info("event_published", type=ev.type, device=ev.device, readings_dropped=ev.dropped)

    @staticmethod
    async def _wait_any(aw: Awaitable[object], failed: asyncio.Future[BaseException]) -> None:
        """Wait for ``aw`` unless a publish of this connection fails first."""
        task: asyncio.Future[object] = asyncio.ensure_future(aw)
        watched: set[asyncio.Future[object]] = {task, failed}  # type: ignore[arg-type]
        try:
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _publish(self, client: aiomqtt.Client, batch: list[StoredReading]) -> None:
        payload = encode_telemetry_v1(
            self.site, self.gateway, now_ms(),
            {d: self.buffer.device_info(d) for d in {r.device for r in batch}},
            [(r.device, r.metric, r.seq, r.ts_ms, r.value, r.unit, r.quality) for r in batch],
            backlog=max(0, self.buffer.backlog - len(batch)),
        )
        t0 = time.perf_counter()
        await client.publish(self.telemetry_topic, payload, qos=1)
        # PUBACK received: the broker owns these readings now. Counted before they leave the
        # buffer, so that an empty backlog always means every reading has been counted.
        self.metrics.published_readings.inc(len(batch))
        self.metrics.published_batches.inc()
        self.metrics.publish_latency.observe(time.perf_counter() - t0)
        await self.buffer.ack(batch[0].row_id, batch[-1].row_id)

    async def announce_offline(self) -> None:
        """Publish the retained offline status before a clean shutdown (the Will only covers crashes)."""
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                await asyncio.wait_for(self._client.publish(
                    self.status_topic, self._status(GatewayState.OFFLINE), qos=1, retain=True), 2)
