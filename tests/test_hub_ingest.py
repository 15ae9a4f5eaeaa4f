"""Ingest against a real Mosquitto: exact storage, dedup, malformed input, gateway events,
persistent session, acknowledgement only after commit, database outage, shared subscription, and
the CLI process."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from prometheus_client import generate_latest
from pydantic import ValidationError

from fleet.broker import Mosquitto
from fleet.configs import write_hub_config
from fleet.procs import ReadyProcess
from hub.config import HubConfig
from hub.ingest import RAW_HIGH
from hub.models import GatewayEvent, Reading
from hub.service import Hub, running_hub
from hub.store import EventItem, StatusItem, TelemetryItem, WriteResult
from protocol.topics import events_topic, status_topic, telemetry_topic
from tests.hubtools import T0, admin_auth, event_payload, hub_config, series, telemetry_payload, wait_until


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path}/hub.db"


@pytest.fixture
def config(mosquitto: Mosquitto, db_url: str) -> HubConfig:
    return hub_config(db_url=db_url, mqtt_port=mosquitto.port)


async def publish(broker: Mosquitto, *messages: tuple[str, bytes], retain: bool = False) -> None:
    """Publish with QoS 1; returns once the broker acknowledged every message."""
    async with aiomqtt.Client(broker.host, broker.port, identifier="test-publisher") as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1, retain=retain)


def tele(site: str, gateway: str, readings: list[Any], **kw: Any) -> tuple[str, bytes]:
    return telemetry_topic(site, gateway), telemetry_payload(site, gateway, readings, **kw)


def evt(site: str, gateway: str, type: str, ts: int = T0, **kw: Any) -> tuple[str, bytes]:
    return events_topic(site, gateway), event_payload(site, gateway, type, ts, **kw)


async def count_rows(hub: Hub) -> int:
    with hub.db.activate():
        return await Reading.all().count()


async def test_valid_telemetry_is_stored_with_exact_values(mosquitto: Mosquitto, config: HubConfig) -> None:
    readings = [("boiler1", "flow_temp", 10, T0, 65.25, "degC", "good"),
                ("boiler1", "pressure", 11, T0, None, "bar", "bad"),
                ("boiler1", "burner_on", 12, T0 + 1, True, "", "good"),
                ("meter1", "energy", 1, T0 + 2, 1234.5, "kWh", "good")]
    async with running_hub(config) as hub:
        await publish(mosquitto, tele("site1", "gw1", readings, kinds={"meter1": "meter"}, backlog=3))
        await wait_until(lambda: hub.stats.readings_stored == 4, what="4 readings stored")
        async with httpx.AsyncClient(auth=admin_auth(), base_url=hub.api_url) as http:
            rows = (await http.get("/api/v1/devices/site1.gw1.boiler1/readings")).json()
            devices = (await http.get("/api/v1/devices")).json()
            health = (await http.get("/api/v1/health")).json()
            gateways = (await http.get("/api/v1/gateways")).json()
        assert [(r["ts"], r["metric"], r["value"], r["unit"], r["quality"], r["seq"]) for r in rows] == [
            ("2025-11-25T14:00:00.000Z", "flow_temp", 65.25, "degC", "good", 10),
            ("2025-11-25T14:00:00.000Z", "pressure", None, "bar", "bad", 11),
            ("2025-11-25T14:00:00.001Z", "burner_on", True, "", "good", 12)]
        assert [(d["id"], d["kind"]) for d in devices] == [("site1.gw1.boiler1", "boiler"),
                                                             ("site1.gw1.meter1", "meter")]
        assert health["status"] == "ok"
        assert health["broker"]["connected"] is True and health["database"]["connected"] is True
        assert (gateways[0]["id"], gateways[0]["backlog"], gateways[0]["devices"]) == ("site1.gw1", 3, 2)
        assert hub.stats.acked == 1 and hub.stats.malformed == 0 and hub.stats.duplicates == 0


async def test_same_payload_twice_is_stored_once(mosquitto: Mosquitto, config: HubConfig) -> None:
    message = tele("site1", "gw1", series("b1", "temp", 25))
    async with running_hub(config) as hub:
        await publish(mosquitto, message, message)
        await wait_until(lambda: hub.stats.readings_received == 50, what="both copies processed")
        assert (hub.stats.readings_stored, hub.stats.duplicates) == (25, 25)
        assert await count_rows(hub) == 25
        assert hub.stats.telemetry_messages == 2


async def test_malformed_messages_are_counted_and_ingest_continues(mosquitto: Mosquitto,
                                                                   config: HubConfig) -> None:
    good = telemetry_payload("site1", "gw1", series("b1", "temp", 3))
    doc = json.loads(good)
    no_readings = json.dumps({k: v for k, v in doc.items() if k != "readings"}).encode()
    v2_on_v1 = json.dumps({**doc, "v": 2}).encode()
    other_site = telemetry_payload("site2", "gw1", series("b1", "temp", 3))
    bad_value = json.dumps({**doc, "readings": [{**doc["readings"][0], "value": None}]}).encode()
    async with running_hub(config) as hub:
        await publish(
            mosquitto,
            ("twin/v1/site1/gw1/telemetry", b"{not json"),
            ("twin/v1/site1/gw1/telemetry", no_readings),
            ("twin/v1/site1/gw1/telemetry", v2_on_v1),
            ("twin/v2/site1/gw1/telemetry", v2_on_v1),
            ("twin/v1/site1/gw1/telemetry", other_site),
            ("twin/v1/site1/gw1/telemetry", bad_value),
            ("twin/vX/site1/gw1/telemetry", good),
            ("twin/v1/site1/gw1/status", b"[1, 2]"),
            ("twin/v1/site1/gw1/telemetry", good),  # a valid message after all that
        )
        await wait_until(lambda: hub.stats.readings_stored == 3, what="the valid message stored")
        await wait_until(lambda: hub.stats.acked == 9, what="every message acknowledged")
        assert dict(hub.stats.malformed_by_reason) == {
            "not_json": 2, "invalid": 2, "version_mismatch": 1, "unsupported_version": 1,
            "site_mismatch": 1, "topic": 1}
        assert hub.stats.malformed == 8
        assert hub.stats.messages == 9
        assert await count_rows(hub) == 3
        async with httpx.AsyncClient(auth=admin_auth(), base_url=hub.api_url) as http:
            text = (await http.get("/metrics")).text
        assert 'twin_hub_malformed_messages_total{reason="site_mismatch"} 1.0' in text
        assert 'twin_hub_malformed_messages_total{reason="not_json"} 2.0' in text


async def test_gateway_events_stored_once_and_shown(mosquitto: Mosquitto, config: HubConfig) -> None:
    thinned = evt("site1", "gw1", "buffer_thinned", T0, readings_dropped=250, message="cap reached",
                  details={"cap_mb": 50, "kept_every": 2})
    corrupt = evt("site1", "gw1", "buffer_corrupt", T0 + 60_000, readings_dropped=40)
    status = json.dumps({"v": 1, "site": "site1", "gateway": "gw1", "state": "online", "ts": T0}).encode()
    no_type = json.dumps({k: v for k, v in json.loads(thinned[1]).items() if k != "type"}).encode()
    async with running_hub(config) as hub:
        assert hub.ingest.topics == ["twin/+/+/+/telemetry", "twin/+/+/+/status", "twin/+/+/+/events"]
        await publish(
            mosquitto,
            thinned,
            thinned,  # the same event twice (a QoS 1 redelivery or a gateway resending)
            (events_topic("site1", "gw1"), no_type),  # malformed
            (events_topic("site1", "gw1"), b"\xff not json"),
            (events_topic("site1", "gw1"), event_payload("site2", "gw1", "buffer_full")),  # other gateway
            (events_topic("site1", "gw1"), event_payload("site1", "gw1", "buffer_full",
                                                         readings_dropped=2**63)),  # out of range
            (events_topic("site1", "gw1"), status),  # a status on the events topic
            (status_topic("site1", "gw1"), corrupt[1]),  # an event on the status topic
            (telemetry_topic("site1", "gw1"), corrupt[1]),  # an event on the telemetry topic
            corrupt,
            tele("site1", "gw1", series("b1", "temp", 3), backlog=12),
        )
        await wait_until(lambda: hub.stats.acked == 11, what="every message acknowledged")
        assert (hub.stats.events, hub.stats.event_duplicates) == (2, 1)
        assert dict(hub.stats.events_by_type) == {"buffer_thinned": 1, "buffer_corrupt": 1}
        assert dict(hub.stats.malformed_by_reason) == {"invalid": 5, "not_json": 1, "site_mismatch": 1}
        assert (hub.stats.event_messages, hub.stats.status_messages, hub.stats.telemetry_messages) == (8, 1, 2)
        assert hub.stats.readings_stored == 3
        async with httpx.AsyncClient(auth=admin_auth(), base_url=hub.api_url) as http:
            (gw,) = (await http.get("/api/v1/gateways")).json()
            events = (await http.get("/api/v1/gateways/site1.gw1/events")).json()
            health = (await http.get("/api/v1/health")).json()
            text = (await http.get("/metrics")).text
            missing = await http.get("/api/v1/gateways/site2.gw1/events")
        assert (gw["id"], gw["backlog"], gw["readings_dropped"], gw["state"]) == ("site1.gw1", 12, 290, "unknown")
        assert [(e["ts"], e["type"], e["message"], e["readings_dropped"], e["details"]) for e in events] == [
            ("2025-11-25T14:01:00.000Z", "buffer_corrupt", "", 40, {}),
            ("2025-11-25T14:00:00.000Z", "buffer_thinned", "cap reached", 250, {"cap_mb": 50, "kept_every": 2})]
        assert (health["ingest"]["events"], health["ingest"]["event_duplicates"]) == (2, 1)
        assert 'twin_hub_gateway_events_total{type="buffer_thinned"} 1.0' in text
        assert 'twin_hub_gateway_events_total{type="buffer_full"} 0.0' in text
        assert 'twin_hub_mqtt_messages_total{channel="events"} 8.0' in text
        assert missing.status_code == 404  # the rejected site2 event created nothing
        with hub.db.activate():
            assert await GatewayEvent.all().count() == 2


async def test_messages_published_while_hub_is_down_are_stored(mosquitto: Mosquitto, config: HubConfig) -> None:
    async with running_hub(config):
        pass  # the first start creates the persistent session and its subscriptions
    await publish(mosquitto, *[tele("site1", f"gw{i % 2}", series("b1", "temp", 10, seq0=i * 10))
                               for i in range(6)])
    async with running_hub(config) as hub:
        await wait_until(lambda: hub.stats.readings_stored == 60, what="queued messages stored")
        assert hub.stats.telemetry_messages == 6 and hub.stats.duplicates == 0
        assert await count_rows(hub) == 60


async def test_message_is_not_acknowledged_before_commit(mosquitto: Mosquitto, config: HubConfig,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The first hub receives the messages but its database never commits; it goes away without
    # acknowledging them, so the broker must deliver them again to the next hub with the same id.
    hub = Hub(config)
    await hub.start()
    never = asyncio.Event()

    async def stuck_write(*_: object) -> WriteResult:
        await never.wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(hub.store, "write", stuck_write)
    try:
        await publish(mosquitto, *[tele("site1", "gw1", series("b1", "temp", 5, seq0=i * 5)) for i in range(4)])
        await wait_until(lambda: hub.stats.telemetry_messages == 4, what="messages received by the first hub")
        assert hub.stats.acked == 0
    finally:
        await hub.stop(drain_s=0.2)
    assert hub.stats.readings_stored == 0

    async with running_hub(config) as hub2:
        await wait_until(lambda: hub2.stats.readings_stored == 20, what="redelivered messages stored")
        assert await count_rows(hub2) == 20


async def test_decoding_waits_for_the_database_beyond_max_decoded_readings(mosquitto: Mosquitto, db_url: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # A backlog arrives faster than the database commits (here: not at all until released). The
    # hub holds at most max_decoded_readings decoded; the rest waits undecoded and unacknowledged.
    config = hub_config(db_url=db_url, mqtt_port=mosquitto.port,
                        ingest={"batch_max_readings": 10, "max_decoded_readings": 50})
    async with running_hub(config) as hub:
        real_write = hub.store.write
        release = asyncio.Event()

        async def held_write(telemetry: list[TelemetryItem], statuses: list[StatusItem],
                             events: list[EventItem]) -> WriteResult:
            await release.wait()
            return await real_write(telemetry, statuses, events)

        monkeypatch.setattr(hub.store, "write", held_write)
        await publish(mosquitto, *[tele("site1", "gw1", series("b1", "temp", 5, seq0=i * 5)) for i in range(40)])
        await wait_until(lambda: hub.stats.telemetry_messages == 10, what="decoded up to the limit")
        await asyncio.sleep(0.5)  # the other 30 are at the hub's door: none of them is decoded
        assert hub.stats.telemetry_messages == 10 and hub.stats.readings_stored == 0
        exported = generate_latest(hub.metrics.registry).decode()
        assert "twin_hub_ingest_queue_readings 50.0" in exported and "twin_hub_ingest_paused_total 1.0" in exported
        release.set()
        await wait_until(lambda: hub.stats.readings_stored == 200, what="the whole backlog stored")
        assert hub.stats.telemetry_messages == 40 and hub.stats.acked == 40
        assert await count_rows(hub) == 200


async def test_a_backlog_waits_in_the_broker_not_in_the_hub(mosquitto: Mosquitto, db_url: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # A slow database with acknowledgements flowing: Mosquitto 2.0 then sends far beyond its
    # in-flight window (578 of 600 waiting in the client without the read gate), so only the
    # hub's read gate keeps the burst in the broker.
    config = hub_config(db_url=db_url, mqtt_port=mosquitto.port,
                        ingest={"batch_max_readings": 10, "max_decoded_readings": 50})
    async with running_hub(config) as hub:
        real_write = hub.store.write

        async def slow_write(telemetry: list[TelemetryItem], statuses: list[StatusItem],
                             events: list[EventItem]) -> WriteResult:
            await asyncio.sleep(0.02)
            return await real_write(telemetry, statuses, events)

        monkeypatch.setattr(hub.store, "write", slow_write)
        client = hub.ingest._client
        assert client is not None
        waiting: list[int] = []
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                waiting.append(len(client.messages))
                await asyncio.sleep(0.005)

        sampler = asyncio.create_task(sample())
        await publish(mosquitto, *[tele("site1", "gw1", series("b1", "temp", 5, seq0=i * 5)) for i in range(600)])
        await wait_until(lambda: hub.stats.readings_stored == 3000, within_s=60, what="the burst stored")
        done.set()
        await sampler
        assert max(waiting) <= RAW_HIGH + 5, max(waiting)
        assert hub.stats.acked == 600 and await count_rows(hub) == 3000


def test_max_decoded_readings_must_hold_a_batch() -> None:
    with pytest.raises(ValidationError, match="max_decoded_readings must be >= batch_max_readings"):
        hub_config(db_url="sqlite://:memory:", mqtt_port=1883,
                   ingest={"batch_max_readings": 5000, "max_decoded_readings": 1000})


async def test_database_failure_is_retried_without_loss(mosquitto: Mosquitto, config: HubConfig,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_hub(config) as hub:
        real_write = hub.store.write
        failures = {"left": 2}

        async def flaky_write(telemetry: list[TelemetryItem], statuses: list[StatusItem],
                              events: list[EventItem]) -> WriteResult:
            if failures["left"]:
                failures["left"] -= 1
                raise ConnectionError("database unreachable")
            return await real_write(telemetry, statuses, events)

        monkeypatch.setattr(hub.store, "write", flaky_write)
        await publish(mosquitto, tele("site1", "gw1", series("b1", "temp", 7)),
                      evt("site1", "gw1", "buffer_full", message="disk full"))
        await wait_until(lambda: hub.stats.readings_stored == 7, what="stored after retries")
        await wait_until(lambda: hub.stats.acked == 2, what="both messages acknowledged")
        assert hub.stats.db_errors == 2
        assert (hub.stats.events, hub.stats.event_duplicates) == (1, 0)
        assert await count_rows(hub) == 7


async def test_gateway_state_follows_status_topic(mosquitto: Mosquitto, config: HubConfig) -> None:
    online = json.dumps({"v": 1, "site": "site1", "gateway": "gw1", "state": "online", "ts": T0 + 10,
                         "agent_version": "9.9"}).encode()
    will = json.dumps({"v": 1, "site": "site1", "gateway": "gw1", "state": "offline", "ts": T0}).encode()
    # Retained before the hub exists: delivered on subscription.
    await publish(mosquitto, (status_topic("site1", "gw1"), online), retain=True)
    async with running_hub(config) as hub:
        await wait_until(lambda: hub.stats.status_messages == 1, what="retained status")
        await publish(mosquitto, tele("site1", "gw1", [("b1", "t", 1, T0, 1.0, "", "good")]))
        await wait_until(lambda: hub.stats.readings_stored == 1)
        async with httpx.AsyncClient(auth=admin_auth(), base_url=hub.api_url) as http:
            (gw,) = (await http.get("/api/v1/gateways")).json()
            assert (gw["state"], gw["status"], gw["agent_version"]) == ("online", "online", "9.9")
            # The Last Will carries an older ts (set at connect time) but arrives later: it wins.
            await publish(mosquitto, (status_topic("site1", "gw1"), will), retain=True)
            await wait_until(lambda: hub.stats.status_messages == 2)
            await wait_until(lambda: hub.stats.acked == 3)
            (gw,) = (await http.get("/api/v1/gateways")).json()
            assert (gw["state"], gw["status"]) == ("offline", "offline")


async def test_shared_subscription_splits_without_loss_or_duplicates(mosquitto: Mosquitto, db_url: str) -> None:
    configs = [hub_config(db_url=db_url, mqtt_port=mosquitto.port, client_id=f"hub-{n}", share_group="hubs")
               for n in ("a", "b")]
    async with running_hub(configs[0]) as hub_a, running_hub(configs[1]) as hub_b:
        assert hub_a.ingest.topics == ["$share/hubs/twin/+/+/+/telemetry", "twin/+/+/+/status",
                                       "$share/hubs/twin/+/+/+/events"]
        messages = [tele("site1", f"gw{i % 4}", series(f"d{i % 3}", "temp", 20, seq0=i * 20)) for i in range(40)]
        events = [evt("site1", f"gw{i % 4}", "buffer_thinned", T0 + i, readings_dropped=i) for i in range(8)]
        await publish(mosquitto, *messages, *events)
        await wait_until(lambda: hub_a.stats.readings_received + hub_b.stats.readings_received == 800,
                         what="all readings processed by the group")
        await wait_until(lambda: hub_a.stats.acked + hub_b.stats.acked == 48, what="every message acknowledged")
        a, b = hub_a.stats, hub_b.stats
        # Events are split like telemetry: each handed to one hub of the group, stored once.
        assert a.event_messages + b.event_messages == 8
        assert (a.events + b.events, a.event_duplicates + b.event_duplicates) == (8, 0)
        async with httpx.AsyncClient(auth=admin_auth(), base_url=hub_b.api_url) as http:
            gateways = (await http.get("/api/v1/gateways")).json()
        assert {g["id"]: g["readings_dropped"] for g in gateways} == {
            "site1.gw0": 0 + 4, "site1.gw1": 1 + 5, "site1.gw2": 2 + 6, "site1.gw3": 3 + 7}
        assert a.telemetry_messages + b.telemetry_messages == 40
        assert a.telemetry_messages > 0 and b.telemetry_messages > 0, (a.telemetry_messages, b.telemetry_messages)
        assert a.duplicates + b.duplicates == 0
        assert a.readings_stored + b.readings_stored == 800
        assert await count_rows(hub_a) == 800


def test_cli_process_ready_line_and_clean_sigterm(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg = write_hub_config(tmp_path / "hub.toml", database_url=f"sqlite://{tmp_path}/data/hub.db",
                           mqtt_port=1, http_port=0)  # MQTT port comes from the environment
    proc = ReadyProcess(
        "twin-hub", [sys.executable, "-m", "hub.cli", "run", "--config", str(cfg)],
        log_path=tmp_path / "hub.log", env={"MQTT_PORT": str(mosquitto.port), "HUB_PORT": "0",
             "HUB_DATABASE_URL": f"sqlite://{tmp_path}/data/hub.db"})
    proc.start(timeout=30)
    try:
        api = proc.ready["api"]
        assert api.startswith("http://127.0.0.1:")
        asyncio.run(publish(mosquitto, tele("site1", "gw1", series("b1", "temp", 4))))
        with httpx.Client(auth=admin_auth(), base_url=api) as http:
            for _ in range(500):
                body = http.get("/api/v1/health").json()
                if body["ingest"]["readings_stored"] == 4:
                    break
                asyncio.run(asyncio.sleep(0.01))
            assert body["ingest"]["readings_stored"] == 4
            assert body["broker"]["connected"] is True
        proc.signal(signal.SIGTERM)
        assert proc.wait(8) == 0
    finally:
        proc.stop()
    log = (tmp_path / "hub.log").read_text()
    assert '"event": "hub_ready"' in log
    assert '"event": "hub_stopped"' in log
    assert (tmp_path / "data" / "hub.db").exists()



async def test_stop_commits_and_acknowledges_the_pending_batch(mosquitto: Mosquitto, db_url: str) -> None:
    # A long batch delay keeps the batch open; stopping must commit it and acknowledge its
    # messages before disconnecting, so the next start gets nothing redelivered.
    config = hub_config(db_url=db_url, mqtt_port=mosquitto.port, ingest={"batch_max_delay_ms": 30_000})
    hub = Hub(config)
    await hub.start()
    try:
        await publish(mosquitto, *[tele("site1", "gw1", series("b1", "temp", 5, seq0=i * 5)) for i in range(3)])
        await wait_until(lambda: hub.stats.telemetry_messages == 3, what="messages received")
        assert hub.stats.readings_stored == 0  # still waiting for the batch delay
    finally:
        await asyncio.wait_for(hub.stop(), 5)
    assert (hub.stats.readings_stored, hub.stats.acked) == (15, 3)
    async with running_hub(config) as hub2:
        await asyncio.sleep(0.5)
        assert hub2.stats.messages == 0
        assert await count_rows(hub2) == 15


async def test_reconnects_after_broker_restart(mosquitto: Mosquitto, config: HubConfig) -> None:
    async with running_hub(config) as hub:
        await publish(mosquitto, tele("site1", "gw1", series("b1", "temp", 2)))
        await wait_until(lambda: hub.stats.readings_stored == 2)
        mosquitto.restart()
        await wait_until(lambda: hub.stats.reconnects == 1, what="connection loss noticed")
        await asyncio.wait_for(hub.ingest.subscribed.wait(), 10)
        await publish(mosquitto, tele("site1", "gw1", series("b1", "temp", 2, seq0=2)))
        await wait_until(lambda: hub.stats.readings_stored == 4, what="stored after reconnect")
        assert hub.ingest.connected
