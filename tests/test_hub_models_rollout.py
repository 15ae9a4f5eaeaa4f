"""Model rollout end to end on a real Mosquitto: a running hub, models uploaded over HTTP, and a
subscriber in the place of the gateways on ``twin/v1/+/+/models`` that receives the retained
assignment lists and downloads the files from the URLs in them.

Also: gateways' model reports (status) and anomaly events arriving over MQTT, the republish when
the hub starts and when the broker lost its retained messages."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from fleet.broker import Mosquitto
from hub.config import HubConfig
from hub.service import running_hub
from protocol.schema import ModelAssignmentV1, decode_model_assignment
from protocol.topics import events_topic, models_topic, status_topic
from tests.hubtools import (
    T0,
    admin_auth,
    event_payload,
    hub_config,
    model_card,
    onnx_model,
    series,
    telemetry_payload,
    wait_until,
)
from tests.test_hub_ingest import publish

V1 = onnx_model(model_card(version=1))
V2 = onnx_model(model_card(version=2), scale=2.0)
SHA1, SHA2 = hashlib.sha256(V1).hexdigest(), hashlib.sha256(V2).hexdigest()
MODEL = "sim-boiler-anomaly"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """Overridden by test_hub_models_postgres.py."""
    return f"sqlite://{tmp_path}/hub.db"


@pytest.fixture
def config(mosquitto: Mosquitto, db_url: str) -> HubConfig:
    return hub_config(db_url=db_url, mqtt_port=mosquitto.port)


class GatewaySide:
    """What the gateways see: every message on ``twin/v1/+/+/models`` (decoded), by gateway."""

    def __init__(self, broker: Mosquitto, name: str = "test-gateways") -> None:
        self.broker = broker
        self.name = name
        self.received: dict[tuple[str, str], list[ModelAssignmentV1 | None]] = {}
        self.retained: dict[tuple[str, str], bool] = {}

    @contextlib.asynccontextmanager
    async def listening(self) -> AsyncIterator[GatewaySide]:
        async with aiomqtt.Client(self.broker.host, self.broker.port, identifier=self.name) as client:
            await client.subscribe("twin/v1/+/+/models", qos=1)
            reader = asyncio.create_task(self._read(client))
            try:
                yield self
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            _, _, site, gateway, _ = message.topic.value.split("/")
            payload = message.payload
            assert isinstance(payload, bytes)
            # An empty payload clears a retained message; every real one must decode.
            decoded = decode_model_assignment(payload, expect_version=1) if payload else None
            if decoded is not None:
                assert (decoded.site, decoded.gateway) == (site, gateway)
            self.received.setdefault((site, gateway), []).append(decoded)
            self.retained[(site, gateway)] = bool(message.retain)

    def latest(self, site: str, gateway: str) -> ModelAssignmentV1 | None:
        got = self.received.get((site, gateway))
        return got[-1] if got else None

    async def wait_for(self, site: str, gateway: str, models: list[tuple[str, int]],
                       within_s: float = 10.0) -> ModelAssignmentV1:
        """The newest message for the gateway once it assigns exactly ``models`` [(profile, version)]."""
        def matches() -> bool:
            msg = self.latest(site, gateway)
            return msg is not None and [(m.profile, m.version) for m in msg.models] == models
        await wait_until(matches, within_s,
                         what=f"{site}/{gateway} assigned {models} (got {self.latest(site, gateway)})")
        msg = self.latest(site, gateway)
        assert msg is not None
        return msg


def online_status(site: str, gateway: str, ts: int = T0, **models: dict[str, Any]) -> tuple[str, bytes]:
    doc = {"v": 1, "site": site, "gateway": gateway, "state": "online", "ts": ts, "agent_version": "0.2.0",
           "devices": {"boiler1": {"kind": "boiler", "profile": "sim-boiler"}}, "models": models}
    return status_topic(site, gateway), json.dumps(doc).encode()


async def upload(http: httpx.AsyncClient, data: bytes) -> dict[str, Any]:
    r = await http.post("/api/v1/models", content=data, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def put(http: httpx.AsyncClient, version: int, gateway: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"profile": "sim-boiler", "name": MODEL, "version": version}
    if gateway:
        body["gateway"] = gateway
    r = await http.put("/api/v1/model-assignments", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def test_assignments_reach_the_gateways(mosquitto: Mosquitto, config: HubConfig) -> None:
    gateways = GatewaySide(mosquitto)
    async with running_hub(config) as hub, gateways.listening(), httpx.AsyncClient(
            auth=admin_auth(), base_url=hub.api_url) as http:
        # Two gateways appear (their retained "online" status): each is told "nothing assigned".
        await publish(mosquitto, online_status("site1", "gw1"), online_status("site1", "gw2"), retain=True)
        for gw in ("gw1", "gw2"):
            first = await gateways.wait_for("site1", gw, [])
            assert first.models == []
        await upload(http, V1)
        await upload(http, V2)

        # Fleet-wide v1: both gateways get it, with a URL on this hub that serves exactly that file.
        change = await put(http, 1)
        assert change["gateways"] == ["site1.gw1", "site1.gw2"]
        for gw in ("gw1", "gw2"):
            msg = await gateways.wait_for("site1", gw, [("sim-boiler", 1)])
            (item,) = msg.models
            assert (item.name, item.sha256, item.size) == (MODEL, SHA1, len(V1))
            # The URL carries this gateway's download capability: no user account needed.
            assert item.url.startswith(f"{hub.api_url}/api/v1/models/{MODEL}/1/file?access=")
            assert gateways.retained[("site1", gw)] is False  # live delivery to a subscriber
        async with httpx.AsyncClient() as anonymous:
            download = await anonymous.get(item.url)
            # The capability opens that file only: not another version, and nothing without it.
            other = item.url.replace(f"/{MODEL}/1/file", f"/{MODEL}/2/file")
            assert (await anonymous.get(other)).status_code == 401
            assert (await anonymous.get(item.url.split("?")[0])).status_code == 401
            assert (await anonymous.get(item.url[:-3] + "xyz")).status_code == 401
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == item.sha256
        assert download.content == V1
        assert download.headers["etag"] == f'"{SHA1}"'
        assert int(download.headers["content-length"]) == item.size

        # gw2's own assignment (v2) beats the fleet-wide one; gw1 is not affected.
        published = hub.rollout.published
        change = await put(http, 2, gateway="site1.gw2")
        assert change["gateways"] == ["site1.gw2"]
        (item2,) = (await gateways.wait_for("site1", "gw2", [("sim-boiler", 2)])).models
        assert (item2.sha256, item2.url.split("?")[0]) == (SHA2, f"{hub.api_url}/api/v1/models/{MODEL}/2/file")
        assert hashlib.sha256((await http.get(item2.url)).content).hexdigest() == SHA2
        await wait_until(lambda: hub.rollout.published == published + 1, what="the broker's PUBACK")
        await asyncio.sleep(0.2)
        assert hub.rollout.published == published + 1  # one message: gw2's, none for gw1
        assert [(m.version, m.sha256) for m in gateways.latest("site1", "gw1").models] == [(1, SHA1)]  # type: ignore[union-attr]

        # A gateway seen for the first time (telemetry only) gets the fleet-wide assignment.
        await publish(mosquitto, ("twin/v1/site1/gw3/telemetry",
                                  telemetry_payload("site1", "gw3", series("boiler1", "flow_temp", 2))))
        await gateways.wait_for("site1", "gw3", [("sim-boiler", 1)])

        # Unassigning gw2's own: back to the fleet-wide v1. Unassigning that: empty lists for all.
        r = await http.delete("/api/v1/model-assignments", params={"profile": "sim-boiler", "gateway": "site1.gw2"})
        assert (r.status_code, r.json()["gateways"]) == (200, ["site1.gw2"])
        await gateways.wait_for("site1", "gw2", [("sim-boiler", 1)])
        r = await http.delete("/api/v1/model-assignments", params={"profile": "sim-boiler"})
        assert (r.status_code, r.json()["gateways"]) == (200, ["site1.gw1", "site1.gw2", "site1.gw3"])
        for gw in ("gw1", "gw2", "gw3"):
            await gateways.wait_for("site1", gw, [])

        # The list is retained: a gateway (re)connecting later gets the current one at once.
        await put(http, 2)
        for gw in ("gw1", "gw2", "gw3"):
            await gateways.wait_for("site1", gw, [("sim-boiler", 2)])
        late = GatewaySide(mosquitto, "late-gateway")
        async with late.listening():
            for gw in ("gw1", "gw2", "gw3"):
                msg = await late.wait_for("site1", gw, [("sim-boiler", 2)])
                assert late.retained[("site1", gw)] is True
                assert msg.models[0].sha256 == SHA2

        text = (await http.get("/metrics")).text
        assert f"twin_hub_model_assignments_published_total {float(hub.rollout.published)}" in text


async def test_republished_on_hub_start_and_after_the_broker_lost_them(mosquitto: Mosquitto,
                                                                        config: HubConfig) -> None:
    gateways = GatewaySide(mosquitto)
    async with running_hub(config) as hub, gateways.listening(), httpx.AsyncClient(
            auth=admin_auth(), base_url=hub.api_url) as http:
        await publish(mosquitto, online_status("site1", "gw1"), retain=True)
        await gateways.wait_for("site1", "gw1", [])
        await upload(http, V1)
        await put(http, 1)
        await gateways.wait_for("site1", "gw1", [("sim-boiler", 1)])

    # While the hub is down the retained message is removed: the next hub start publishes it again.
    await publish(mosquitto, (models_topic("site1", "gw1"), b""), retain=True)
    async with running_hub(config) as hub:
        again = GatewaySide(mosquitto, "gateways-after-restart")
        async with again.listening():
            msg = await again.wait_for("site1", "gw1", [("sim-boiler", 1)])
            assert msg.models[0].url.split("?")[0] == f"{hub.api_url}/api/v1/models/{MODEL}/1/file"  # this hub's port

        # A broker that comes back without its stored state (no persistence, disk lost) has no
        # retained messages: the hub publishes them again once it is subscribed again.
        published = hub.rollout.published
        mosquitto.stop()
        shutil.rmtree(mosquitto.workdir / "data")
        mosquitto.start()
        await wait_until(lambda: hub.rollout.published > published, 15, what="republish after reconnect")
        after = GatewaySide(mosquitto, "gateways-after-broker-loss")
        async with after.listening():
            await after.wait_for("site1", "gw1", [("sim-boiler", 1)])
            assert after.retained[("site1", "gw1")] is True


async def test_public_url_is_used_in_assignments(mosquitto: Mosquitto, db_url: str) -> None:
    config = hub_config(db_url=db_url, mqtt_port=mosquitto.port, http={"public_url": "https://hub.example.com/twin/"})
    gateways = GatewaySide(mosquitto)
    async with running_hub(config) as hub, gateways.listening(), httpx.AsyncClient(
            auth=admin_auth(), base_url=hub.api_url) as http:
        await publish(mosquitto, online_status("site1", "gw1"), retain=True)
        await upload(http, V1)
        await put(http, 1)
        (item,) = (await gateways.wait_for("site1", "gw1", [("sim-boiler", 1)])).models
        assert item.url.split("?")[0] == f"https://hub.example.com/twin/api/v1/models/{MODEL}/1/file"


async def test_model_reports_and_anomaly_events_over_mqtt(mosquitto: Mosquitto, config: HubConfig) -> None:
    async with running_hub(config) as hub, httpx.AsyncClient(auth=admin_auth(), base_url=hub.api_url) as http:
        await publish(mosquitto, online_status("site1", "gw1"), retain=True)
        await wait_until(lambda: hub.stats.status_messages == 1, what="status stored")
        await upload(http, V1)
        await upload(http, V2)
        await put(http, 2)
        failed = {"name": MODEL, "version": 1, "sha256": SHA1, "state": "failed",
                  "error": "v2: sha256 mismatch after download"}
        started = event_payload("site1", "gw1", "anomaly_started", T0 + 5000, device="boiler1",
                                message="score 4.5 > threshold 2.5", details={"score": 4.5, "version": 1})
        await publish(mosquitto, online_status("site1", "gw1", T0 + 1000, **{"sim-boiler": failed}), retain=True)
        await publish(
            mosquitto,
            ("twin/v1/site1/gw1/telemetry", telemetry_payload("site1", "gw1", series("boiler1", "flow_temp", 3))),
            (events_topic("site1", "gw1"), event_payload("site1", "gw1", "model_rejected", T0 + 1000,
                                                         message="v2: sha256 mismatch after download",
                                                         details={"profile": "sim-boiler", "version": 2})),
            (events_topic("site1", "gw1"), started),
            (events_topic("site1", "gw1"), started),  # redelivered
        )
        await wait_until(lambda: hub.stats.acked == 6, what="every message committed and acknowledged")
        assert (hub.stats.events, hub.stats.event_duplicates) == (2, 1)
        assert dict(hub.stats.events_by_type) == {"model_rejected": 1, "anomaly_started": 1}

        view = (await http.get("/api/v1/gateways/site1.gw1/models")).json()
        assert view["models"] == [{
            "profile": "sim-boiler", "rollout": "failed",
            "assigned": {"name": MODEL, "version": 2, "sha256": SHA2, "scope": "fleet"},
            "running": failed}]
        (device,) = (await http.get("/api/v1/devices")).json()
        assert (device["id"], device["anomaly"]) == (
            "site1.gw1.boiler1", {"active": True, "score": 4.5, "since": "2025-11-25T14:00:05.000Z"})
        anomalies = (await http.get("/api/v1/devices/site1.gw1.boiler1/anomalies")).json()
        assert [(a["type"], a["device"], a["message"]) for a in anomalies] == [
            ("anomaly_started", "boiler1", "score 4.5 > threshold 2.5")]
        rejected = (await http.get("/api/v1/gateways/site1.gw1/events", params={"type": "model_rejected"})).json()
        assert [(e["device"], e["details"]) for e in rejected] == [(None, {"profile": "sim-boiler", "version": 2})]
        text = (await http.get("/metrics")).text
        assert 'twin_hub_gateway_events_total{type="anomaly_started"} 1.0' in text
        assert 'twin_hub_gateway_events_total{type="model_rejected"} 1.0' in text

