"""Alerts through the real ingest path: a hub in-process, a real Mosquitto, gateways' messages
published over MQTT; anomaly events, thresholds, human-error signals, stale devices, offline
gateways, and a webhook notification."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx

from fleet.broker import Mosquitto
from hub.ingest import now_ms
from hub.service import running_hub
from hub.signals import Signal, SignalKind
from protocol.topics import status_topic
from tests.hubtools import T0, admin_auth, hub_config, wait_until
from tests.test_hub_alerts_notify import Receiver, webhook  # noqa: F401 - fixture
from tests.test_hub_ingest import evt, publish, tele


def config(tmp_path: Path, broker: Mosquitto, **alerts: Any) -> Any:
    return hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=broker.port, alerts=alerts)


async def get_alerts(http: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    r = await http.get("/api/v1/alerts", params=params)
    assert r.status_code == 200, r.text
    body: list[dict[str, Any]] = r.json()
    return body


async def wait_for_alerts(http: httpx.AsyncClient, count: int, within_s: float = 10.0,
                          **params: Any) -> list[dict[str, Any]]:
    """Poll ``GET /api/v1/alerts`` until it lists ``count`` alerts (bounded by ``within_s``)."""
    deadline = time.monotonic() + within_s
    while True:
        got = await get_alerts(http, **params)
        if len(got) == count:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} alerts for {params}, have {got}")
        await asyncio.sleep(0.05)


async def test_anomaly_events_over_mqtt_open_and_clear_an_alert(tmp_path: Path, mosquitto: Mosquitto) -> None:
    async with running_hub(config(tmp_path, mosquitto)) as hub, httpx.AsyncClient(
            auth=admin_auth(), base_url=hub.api_url) as http:
        await publish(mosquitto, evt("site1", "gw1", "anomaly_started", T0, device="boiler1",
                                     details={"score": 3.75, "threshold": 2.5}, message="score above threshold"))
        (alert,) = await wait_for_alerts(http, 1, state="open")
        assert (alert["rule"], alert["type"], alert["device"], alert["severity"], alert["last_value"]) == (
            "edge-anomaly", "anomaly", "site1.gw1.boiler1", "warning", 3.75)
        assert alert["message"] == "site1.gw1.boiler1 edge anomaly: score above threshold (score 3.75)"
        # The same event again (a gateway resending) does not count as a new trigger.
        await publish(mosquitto, evt("site1", "gw1", "anomaly_started", T0, device="boiler1",
                                     details={"score": 3.75}))
        await wait_until(lambda: hub.stats.event_duplicates == 1, what="the duplicate processed")
        await hub.alerts.drain(5)
        await publish(mosquitto, evt("site1", "gw1", "anomaly_cleared", T0 + 30_000, device="boiler1",
                                     details={"score": 1.0}))
        (cleared,) = await wait_for_alerts(http, 1, state="cleared")
        assert (cleared["id"], cleared["count"], cleared["cleared_by"]) == (alert["id"], 1, "auto")
        detail = (await http.get(f"/api/v1/alerts/{alert['id']}")).json()
        assert [h["action"] for h in detail["history"]] == ["opened", "cleared"]
        assert await get_alerts(http, state="open") == []


async def test_threshold_on_telemetry_and_human_error_signal(tmp_path: Path, mosquitto: Mosquitto) -> None:
    async with running_hub(config(tmp_path, mosquitto)) as hub, httpx.AsyncClient(
            auth=admin_auth(), base_url=hub.api_url) as http:
        now = now_ms()
        readings = [("boiler1", "pressure", i, now - 5000 + i * 1000, v, "bar", "good")
                    for i, v in enumerate([1.5, 0.6, 0.55, 1.5, 0.5])]  # two crossings below 0.8 bar
        await publish(mosquitto, tele("site1", "gw1", readings[:3]), tele("site1", "gw1", readings[3:]))
        await wait_until(lambda: hub.stats.readings_stored == 5, what="readings stored")
        await hub.alerts.drain(5)
        # The built-in rule clears by itself in between: two alerts, newest first.
        second, first = await wait_for_alerts(http, 2, device="site1.gw1.boiler1")
        assert [(a["rule"], a["state"], a["count"], a["severity"], a["last_value"]) for a in (first, second)] == [
            ("boiler-pressure", "cleared", 1, "critical", 0.55), ("boiler-pressure", "open", 1, "critical", 0.5)]
        assert first["message"] == "site1.gw1.boiler1 pressure 0.6 bar below 0.8"

        # Billing rejects a manual reading and says so on the hub's signal bus.
        await hub.signals.emit(Signal(kind=SignalKind.HUMAN_ERROR, ts_ms=now, site="site1",
                                      device="site1.gw1.meter1", message="reading 90 kWh is below the previous 100 kWh",
                                      details={"value": 90.0}))
        (human,) = await wait_for_alerts(http, 1, device="site1.gw1.meter1")
        assert (human["type"], human["rule"], human["state"], human["last_value"]) == (
            "human_error", "human-error", "open", 90.0)
        assert human["message"] == "possible human error: reading 90 kWh is below the previous 100 kWh"


async def test_stale_device_and_offline_gateway(tmp_path: Path, mosquitto: Mosquitto) -> None:
    cfg = config(tmp_path, mosquitto, builtin_rules=False, evaluate_every_s=0.2, rules=[
        {"type": "stale", "name": "stale", "after_s": 3.0},
        {"type": "gateway_offline", "name": "gw-offline", "after_s": 60, "severity": "critical"}])
    async with running_hub(cfg) as hub, httpx.AsyncClient(auth=admin_auth(), base_url=hub.api_url) as http:
        await publish(mosquitto, tele("site1", "gw1", [("boiler1", "flow_temp", 1, now_ms(), 60.0, "degC", "good")]))
        await wait_until(lambda: hub.stats.readings_stored == 1, what="reading stored")
        assert await get_alerts(http) == []  # fresh
        (stale,) = await wait_for_alerts(http, 1, within_s=10, state="open")
        assert (stale["key"], stale["type"]) == ("stale:site1.gw1.boiler1", "stale")
        await publish(mosquitto, tele("site1", "gw1", [("boiler1", "flow_temp", 2, now_ms(), 61.0, "degC", "good")]))
        (back,) = await wait_for_alerts(http, 1, within_s=10, state="cleared")
        assert back["id"] == stale["id"]

        offline = json.dumps({"v": 1, "site": "site1", "gateway": "gw1", "state": "offline", "ts": now_ms()}).encode()
        await publish(mosquitto, (status_topic("site1", "gw1"), offline))
        (gw,) = await wait_for_alerts(http, 1, within_s=10, state="open", severity="critical")
        assert (gw["key"], gw["gateway"], gw["message"]) == (
            "gw-offline:site1.gw1", "gw1", "gateway site1.gw1 offline: its status says offline")


async def test_notification_from_a_running_hub(tmp_path: Path, mosquitto: Mosquitto,
                                               webhook: Receiver) -> None:  # noqa: F811
    cfg = config(tmp_path, mosquitto, contacts=[{"name": "chat", "sites": ["site1"], "webhook": webhook.url}],
                 notify={"retry_base_s": 0.05})
    async with running_hub(cfg) as hub:
        await publish(mosquitto, evt("site1", "gw1", "anomaly_started", T0, device="boiler2"))
        await wait_until(lambda: len(webhook.bodies) == 1, within_s=10, what="the webhook call")
        assert webhook.bodies[0]["alert"]["device"] == "site1.gw1.boiler2"
        assert webhook.bodies[0]["event"] == "opened"
        assert hub.alerts.stats.opened == 1
        await wait_until(lambda: hub.alerts.notifier.pending == 0, within_s=10, what="the delivery recorded")
        async with httpx.AsyncClient(auth=admin_auth(), base_url=hub.api_url) as http:
            text = (await http.get("/metrics")).text
        assert 'twin_hub_alerts_total{event="opened"} 1.0' in text
        assert 'twin_hub_alert_notifications_total{channel="webhook",result="delivered"} 1.0' in text
        assert "twin_hub_alert_batches_skipped_total 0.0" in text
        assert "twin_hub_alert_queue 0.0" in text


async def test_refused_manual_reading_raises_a_human_error_alert(tmp_path: Path, mosquitto: Mosquitto) -> None:
    # Billing refuses an implausible manual reading and emits a human-error signal on the hub's bus;
    # the engine of the same hub turns it into an alert.
    async with running_hub(config(tmp_path, mosquitto)) as hub, httpx.AsyncClient(
            auth=admin_auth(), base_url=hub.api_url) as http:
        now = now_ms()
        await publish(mosquitto, tele("site1", "gw1", [("meter1", "energy_import", 1, now - 60_000, 1000.0, "kWh",
                                                        "good")], kinds={"meter1": "meter"}))
        await wait_until(lambda: hub.stats.readings_stored == 1, what="the meter reading stored")
        r = await http.post("/api/v1/meters/site1.gw1.meter1/readings",
                            json={"value": "-5", "ts": "2025-11-25T14:00:00Z"}, headers={"X-Twin-User": "tech-7"})
        assert r.status_code == 422, r.text
        (alert,) = await wait_for_alerts(http, 1, device="site1.gw1.meter1")
        assert (alert["type"], alert["rule"], alert["state"], alert["severity"], alert["last_value"]) == (
            "human_error", "human-error", "open", "warning", -5.0)
        assert alert["message"].startswith("possible human error: manual reading of meter site1.gw1.meter1 refused")
        assert (alert["site"], alert["gateway"]) == ("site1", "gw1")


async def test_a_slow_or_failing_alert_engine_never_holds_up_ingest(tmp_path: Path, mosquitto: Mosquitto,
                                                                    monkeypatch: Any) -> None:
    async with running_hub(config(tmp_path, mosquitto)) as hub:
        release = asyncio.Event()

        async def stuck(*_: object, **__: object) -> None:
            await release.wait()

        def broken(*_: object) -> None:
            raise RuntimeError("a hook on fire")

        monkeypatch.setattr(hub.alerts, "evaluate_batch", stuck)  # the engine hangs on its first batch
        hub.ingest.on_committed(broken)  # and another consumer raises
        for i in range(5):
            await publish(mosquitto, tele("site1", "gw1", [("boiler1", "pressure", i, now_ms(), 0.1, "bar", "good")]))
        await wait_until(lambda: hub.stats.readings_stored == 5 and hub.stats.acked == 5, within_s=10,
                         what="every message stored and acknowledged while the engine is stuck")
        assert hub.ingest.pending == 0
        release.set()
        await hub.alerts.drain(5)
