"""Hostile MQTT input against a real Mosquitto and an in-process hub (ingest) or the gateway's
downlink (edge): every bad message is rejected, counted by reason, stores nothing, and the next
good message is still taken. ``test_hub_ingest.py`` covers the plain cases (not JSON, wrong
shape, wrong version, other site); these are the ones a hostile client would try on top.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import httpx

from edge.buffer import ReadingBuffer
from edge.config import EdgeConfig
from edge.metrics import EdgeMetrics
from edge.uplink import Uplink
from fleet.broker import MAX_PACKET_BYTES, Mosquitto
from hub.models import GatewayEvent, Reading
from hub.service import running_hub
from protocol.schema import MAX_PAYLOAD_BYTES, GatewayConfigV1, ModelAssignmentV1, encode
from protocol.topics import channel_topic, events_topic, telemetry_topic
from tests.hubtools import T0, admin_auth, event_payload, hub_config, series, telemetry_payload, wait_until


async def publish(broker: Mosquitto, *messages: tuple[str, bytes]) -> None:
    """QoS 1 publishes, each acknowledged by the broker."""
    async with aiomqtt.Client(broker.host, broker.port, identifier="hostile-publisher", timeout=30) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


def metric(text: str, line: str) -> float:
    """The value of one exposition ``line`` prefix (``name{labels}``); 0 if absent."""
    for row in text.splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    return 0.0


async def test_hostile_payloads_are_rejected_counted_and_ingest_goes_on(mosquitto: Mosquitto, tmp_path: Path) -> None:
    topic = telemetry_topic("site1", "gw1")
    good = json.loads(telemetry_payload("site1", "gw1", series("b1", "temp", 1)))
    reading = good["readings"][0]

    def with_value(raw: str) -> bytes:  # a reading value spelled as Python's json accepts it
        doc = {**good, "readings": [{**reading, "seq": 99, "value": "@"}]}
        return json.dumps(doc).replace('"@"', raw).encode()

    # Padding inside a valid document: the size, not the content, is what is refused.
    oversized = json.dumps({**good, "pad": "x" * MAX_PAYLOAD_BYTES}).encode()
    assert MAX_PAYLOAD_BYTES < len(oversized) < MAX_PACKET_BYTES - 1000  # the broker passes it on
    hostile: list[tuple[str, bytes, str]] = [
        (topic, oversized, "too_large"),
        (topic, b"\xff\xfe{\"v\": 1}", "not_json"),  # invalid UTF-8
        (topic, b"[" * 100_000 + b"]" * 100_000, "not_json"),  # nested past the parser's stack
        (topic, b'{"v": 1, "a": ' * 50_000 + b"1" + b"}" * 50_000, "not_json"),
        (topic, with_value("NaN"), "invalid"),
        (topic, with_value("Infinity"), "invalid"),
        (topic, with_value("-Infinity"), "invalid"),
        (topic, with_value("1e999"), "invalid"),  # parses to inf
        (topic, json.dumps({**good, "v": "1"}).encode(), "no_version"),
        (topic, json.dumps({**good, "readings": {"a": 1}}).encode(), "invalid"),  # wrong shape
        (topic, json.dumps({**good, "gateway": "gw2"}).encode(), "site_mismatch"),
        (topic, b"", "not_json"),
        ("twin/v1/site1/gw 1/telemetry", telemetry_payload("site1", "gw 1", series("b1", "temp", 1)), "topic"),
        (events_topic("site1", "gw1"), event_payload("site1", "gw1", "buffer_full", details={"x": "@"})
         .replace(b'"@"', b"NaN"), "invalid"),
    ]
    expected: dict[str, int] = {}
    for _, _, reason in hostile:
        expected[reason] = expected.get(reason, 0) + 1
    config = hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port)
    async with running_hub(config) as hub:
        await publish(mosquitto, *[(t, p) for t, p, _ in hostile])
        # A payload over the broker's packet limit never reaches the hub: Mosquitto drops the
        # connection of the client that sent it.
        assert await _oversized_publish_is_cut_off(mosquitto, topic, 8 * 1024 * 1024)
        # An unknown channel is not subscribed: the broker never hands it to the hub.
        stray = telemetry_payload("site1", "gw1", series("b1", "x", 1))
        await publish(mosquitto, ("twin/v1/site1/gw1/firmware", stray))
        last = telemetry_payload("site1", "gw1", [("b1", "temp", 7, T0, 42.5, "degC", "good")])
        await publish(mosquitto, (topic, last))
        await wait_until(lambda: hub.stats.readings_stored == 1, within_s=20, what="the good message stored")
        await wait_until(lambda: hub.stats.acked == len(hostile) + 1, what="every message acknowledged")
        assert dict(hub.stats.malformed_by_reason) == expected
        assert hub.stats.malformed == len(hostile)
        assert hub.stats.messages == len(hostile) + 1  # neither the 8 MB one nor the unknown channel
        assert hub.ingest.connected
        with hub.db.activate():
            rows = await Reading.all().values_list("seq", "value")
            assert await GatewayEvent.all().count() == 0
        assert rows == [(7, 42.5)]
        async with httpx.AsyncClient(auth=admin_auth(), base_url=hub.api_url) as http:
            text = (await http.get("/metrics")).text
            latest = (await http.get("/api/v1/devices/site1.gw1.b1/latest")).json()
        assert latest["metrics"]["temp"]["value"] == 42.5
        for reason, n in expected.items():
            assert metric(text, f'twin_hub_malformed_messages_total{{reason="{reason}"}}') == n, reason
        assert await _still_ingesting(mosquitto, hub)
    assert "Client hostile-big disconnected due to oversize packet." in mosquitto.log_path.read_text()


def _remaining_length(n: int) -> bytes:
    """MQTT's variable-length integer."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def _oversized_publish_is_cut_off(broker: Mosquitto, topic: str, size: int) -> bool:
    """Over raw TCP: CONNECT, then a PUBLISH header announcing ``size`` bytes and the first 64 kB of
    them; True once the broker closes the connection (it does not wait for, or buffer, the rest)."""
    reader, writer = await asyncio.open_connection(broker.host, broker.port)
    try:
        client_id = b"hostile-big"
        variable = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
        writer.write(b"\x10" + _remaining_length(len(variable)) + variable)
        connack = await asyncio.wait_for(reader.readexactly(4), 10)
        assert connack == b"\x20\x02\x00\x00", connack
        name = topic.encode()
        writer.write(b"\x30" + _remaining_length(2 + len(name) + size) + len(name).to_bytes(2, "big") + name)
        writer.write(b"x" * 65536)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), 10) == b""  # EOF: disconnected
        except ConnectionResetError:
            return True  # disconnected with our unread bytes still in its socket
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _still_ingesting(broker: Mosquitto, hub: object) -> bool:
    """One more good message after all that is stored too (the session survived)."""
    await publish(broker, (telemetry_topic("site1", "gw1"),
                           telemetry_payload("site1", "gw1", [("b1", "temp", 8, T0 + 1, 43.0, "degC", "good")])))
    await wait_until(lambda: hub.stats.readings_stored == 2, what="the second good message")  # type: ignore[attr-defined]
    return True


def test_broker_packet_limit_is_written(mosquitto: Mosquitto) -> None:
    conf = (mosquitto.workdir / "mosquitto.conf").read_text()
    assert f"max_packet_size {MAX_PACKET_BYTES}\n" in conf
    production = (Path(__file__).parent.parent / "examples" / "mosquitto.production.conf").read_text()
    assert f"max_packet_size {MAX_PACKET_BYTES}\n" in production



# -- the gateway's downlink -------------------------------------------------------------------

async def test_gateway_downlink_drops_and_counts_bad_messages_and_keeps_taking_good_ones(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    site, gw = "site-1", "gw-1"
    cfg = EdgeConfig.model_validate({
        "gateway": {"site": site, "name": gw},
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
        "buffer": {"path": str(tmp_path / "buf.db")},
    })
    buf = ReadingBuffer(tmp_path / "buf.db")
    await buf.open()
    metrics = EdgeMetrics()
    up = Uplink(cfg, buf, {}, metrics)
    got: dict[str, list[bytes]] = {"config": [], "models": [], "commands": []}

    def taker(channel: str) -> Callable[[bytes], None]:
        def take(payload: bytes) -> None:
            if payload == b"boom":
                raise RuntimeError("a handler that fails")
            got[channel].append(payload)
        return take

    for channel in ("config", "models", "commands"):
        up.on_downlink(channel, taker(channel))  # type: ignore[arg-type]
    now = T0
    good_config = encode(GatewayConfigV1(site=site, gateway=gw, ts=now, version=3, config={"devices": []}))
    good_models = encode(ModelAssignmentV1(site=site, gateway=gw, ts=now))
    deep = b"[" * 100_000 + b"]" * 100_000
    hostile: list[tuple[str, bytes, str]] = []
    for channel, good in (("config", good_config), ("models", good_models)):
        doc = json.loads(good)
        hostile += [
            (channel, json.dumps({**doc, "pad": "x" * MAX_PAYLOAD_BYTES}).encode(), "too_large"),
            (channel, b"\xff\xfe not utf-8", "not_json"),
            (channel, deep, "not_json"),
            (channel, json.dumps({**doc, "ts": "NaN"}).replace('"NaN"', "NaN").encode(), "invalid"),
            (channel, json.dumps({**doc, "v": 2}).encode(), "invalid"),  # another schema version
            (channel, json.dumps([doc]).encode(), "not_json"),  # not an object
        ]
    task = asyncio.create_task(up.run())
    try:
        await asyncio.wait_for(up.connected.wait(), 10)
        topic = {c: channel_topic(c, site, gw) for c in ("config", "models", "commands")}  # type: ignore[arg-type]
        await publish(mosquitto, *[(topic[c], p) for c, p, _ in hostile],
                      (topic["commands"], b"boom"),  # the handler raises: counted, session kept
                      (topic["config"], good_config), (topic["models"], good_models),
                      (topic["commands"], b"{}"))
        await wait_until(lambda: bool(got["commands"]), what="the messages after the bad ones")
        await wait_until(lambda: bool(got["config"] and got["models"]), what="the good config and models")
        assert got == {"config": [good_config], "models": [good_models], "commands": [b"{}"]}
        for channel, _, reason in hostile:
            n = sum(1 for c, _, r in hostile if (c, r) == (channel, reason))
            assert metrics.downlink_rejected.labels(channel, reason)._value.get() == n, (channel, reason)
        assert metrics.downlink_rejected.labels("commands", "error")._value.get() == 1
        assert up.connected.is_set() and metrics.mqtt_reconnects._value.get() == 0
    finally:
        up.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await buf.close()
