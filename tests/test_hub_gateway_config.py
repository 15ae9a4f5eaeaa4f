"""Remote configuration at the hub (``hub/gateway_config.py``): versions, shape checks, the gateways'
reports, and publishing over a real Mosquitto. SQLite here; ``test_hub_gateway_config_postgres``
runs the store test on PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from fleet.broker import Mosquitto
from hub import gateway_config as gc
from hub.db import Database
from hub.service import running_hub
from hub.store import EventItem
from protocol.schema import decode_gateway_config
from tests import hubtools
from tests.hubtools import event, event_payload, hub_config, series, telemetry_payload, wait_until

DEV = {"name": "boiler-1", "profile": "sim-boiler", "host": "127.0.0.1", "port": 5020}


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path / 'hub.db'}"


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    async with Database(db_url) as database:
        with database.activate():
            yield database


@pytest.mark.parametrize(("document", "error"), [
    ([DEV], "the configuration must be a JSON object"),
    ({"devices": [DEV], "mqtt": {}}, "unknown key(s) ['mqtt']"),
    ({"serial_ports": []}, "'devices' is missing"),
    ({"devices": {"boiler-1": DEV}}, "'devices' must be a list of objects, not dict"),
    ({"devices": [DEV, "boiler-2"]}, "devices[1] must be an object, not str"),
    ({"devices": [{**DEV, "name": "a.b"}]}, "devices[0].name must be a name"),
    ({"devices": [DEV, DEV]}, "devices: names must be unique; repeated: ['boiler-1']"),
    ({"devices": [DEV], "serial_ports": [{"name": "bus"}, {"name": "bus"}]},
     "serial_ports: names must be unique; repeated: ['bus']"),
    ({"devices": [{**DEV, "name": f"d{i}", "note": "x" * 1000} for i in range(70)]},
     "exceeds the limit of 65536 bytes"),
])
async def test_shape_checks_refuse_with_422(db: Database, document: Any, error: str) -> None:
    with pytest.raises(gc.ConfigRefused) as exc:
        await gc.set_config("site-1", "gw-1", document, "alice")
    assert exc.value.status == 422 and error in exc.value.message
    assert await gc.current_config("site-1", "gw-1") is None


async def test_versions_history_and_reports(db: Database) -> None:
    clock = iter(range(1000, 2000, 10)).__next__
    assert await gc.set_config("site-1", "gw-1", {"devices": [DEV]}, "alice", clock=clock) == 1
    # The same document again is no change (no new version); another one is version 2.
    assert await gc.set_config("site-1", "gw-1", {"devices": [DEV]}, "bob", clock=clock) == 1
    doc2 = {"devices": [DEV, {**DEV, "name": "boiler-2", "port": 5021}], "serial_ports": []}
    assert await gc.set_config("site-1", "gw-1", doc2, "bob", clock=clock) == 2
    assert await gc.set_config("site-1", "gw-2", {"devices": []}, "carol", clock=clock) == 1
    assert await gc.current_config("site-1", "gw-1") == (2, doc2)
    assert await gc.current_config("site-1", "gw-9") is None
    assert await gc.history("site-1", "gw-1") == [gc.VersionRow(2, "bob", 1010, 2), gc.VersionRow(1, "alice", 1000, 1)]
    assert await gc.configured_gateways() == [("site-1", "gw-1"), ("site-1", "gw-2")]

    assert await gc.reported_state("site-1", "gw-1") == gc.ReportedState()
    await gc.record_report("site-1", "gw-1", "config_applied", 1, 5000)
    await gc.record_report("site-1", "gw-1", "config_rejected", 2, 6000, "devices[1] ('boiler-2').port: bad")
    # A late report of an older version never undoes a newer one.
    await gc.record_report("site-1", "gw-1", "config_rejected", 1, 4000, "old")
    assert await gc.reported_state("site-1", "gw-1") == gc.ReportedState(
        applied_version=1, applied_at_ms=5000, rejected_version=2, rejected_at_ms=6000,
        last_error="devices[1] ('boiler-2').port: bad")


async def test_concurrent_changes_get_distinct_versions(db: Database) -> None:
    versions = await asyncio.gather(*(gc.set_config("site-1", "gw-1", {"devices": [{**DEV, "port": 6000 + i}]},
                                                    f"user{i}") for i in range(5)))
    assert sorted(versions) == [1, 2, 3, 4, 5]
    assert [h.version for h in await gc.history("site-1", "gw-1")] == [5, 4, 3, 2, 1]


async def test_hub_publishes_retained_configs_and_records_reports(mosquitto: Mosquitto, db_url: str) -> None:
    cfg = hub_config(db_url=db_url, mqtt_port=mosquitto.port)
    async with running_hub(cfg) as hub:
        with hub.db.activate():
            v = await gc.set_config("site-1", "gw-1", {"devices": [DEV]}, "alice", publisher=hub.configs)
        assert v == 1
        await wait_until(lambda: hub.configs.published >= 1, what="config published")
        # Retained: a gateway connecting later gets it.
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t-gw") as gw:
            await gw.subscribe("twin/v1/site-1/gw-1/config", qos=1)
            msg = await asyncio.wait_for(anext(gw.messages), 5)
            assert msg.retain
            got = decode_gateway_config(msg.payload)
            assert (got.site, got.gateway, got.version, got.config) == ("site-1", "gw-1", 1, {"devices": [DEV]})
            # The gateway's answer arrives as an ordinary event and is recorded.
            now = time.time_ns() // 1_000_000
            await gw.publish("twin/v1/site-1/gw-1/events", event_payload(
                "site-1", "gw-1", "config_rejected", now, message="devices[0] ('boiler-1').port: bad",
                details={"version": 1, "error": "devices[0] ('boiler-1').port: bad"}), qos=1)
            await wait_until(lambda: hub.configs.reports >= 1, what="report recorded")
        with hub.db.activate():
            state = await gc.reported_state("site-1", "gw-1")
        assert (state.rejected_version, state.last_error, state.applied_version) == (
            1, "devices[0] ('boiler-1').port: bad", None)
        # Re-subscription (e.g. the broker restarted without persistence) publishes every config again.
        before = hub.configs.published
        hub.configs.mark_all()
        await wait_until(lambda: hub.configs.published > before, what="config published again")


def test_on_batch_takes_only_config_events() -> None:
    configs = gc.GatewayConfigs(Database("sqlite://:memory:"), None)
    configs.on_batch([], [], [EventItem(event("site-1", "gw-1", "buffer_thinned"), 0),
                              EventItem(event("site-1", "gw-1", "config_applied", details={"version": 3}), 0)])
    assert configs._reports.qsize() == 1 and configs._wake.is_set()


async def test_config_api_roles_audit_and_errors(mosquitto: Mosquitto, db_url: str) -> None:
    cfg = hub_config(db_url=db_url, mqtt_port=mosquitto.port)
    async with running_hub(cfg) as hub:
        # The gateway becomes known to the hub through its first telemetry.
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t-gw") as gw:
            await gw.publish("twin/v1/site-1/gw-1/telemetry", telemetry_payload(
                "site-1", "gw-1", series("boiler-1", "flow_temp", 1)), qos=1)
        await wait_until(lambda: hub.stats.readings_stored >= 1, what="telemetry stored")
        tech = await hubtools.add_user(hub.db, "tina", "technician")
        viewer = await hubtools.add_user(hub.db, "vic", "viewer")
        url = "/api/v1/gateways/site-1.gw-1/config"
        async with httpx.AsyncClient(base_url=hub.api_url, timeout=10) as anon:
            assert (await anon.get(url)).status_code == 401
            assert (await anon.put(url, json={"devices": [DEV]})).status_code == 401
        async with httpx.AsyncClient(base_url=hub.api_url, timeout=10,
                                     auth=hubtools.BearerAuth("vic", viewer)) as client:
            assert (await client.get(url)).status_code == 403
            assert (await client.put(url, json={"devices": [DEV]})).status_code == 403
        async with httpx.AsyncClient(base_url=hub.api_url, timeout=10,
                                     auth=hubtools.BearerAuth("tina", tech)) as client:
            r = await client.put(url, json={"devices": [DEV]})
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["gateway"], body["version"], body["state"], body["config"]) == (
                "site-1.gw-1", 1, "pending", {"devices": [DEV]})
            assert [(h["version"], h["changed_by"], h["devices"]) for h in body["history"]] == [(1, "tina", 1)]
            r = await client.put(url, json={"devices": [DEV], "log_level": "DEBUG"})
            assert r.status_code == 422 and "unknown key(s) ['log_level']" in r.json()["detail"]
            assert (await client.get("/api/v1/gateways/site-1.gw-9/config")).status_code == 404
            assert (await client.put("/api/v1/gateways/site-1.gw-9/config", json={"devices": []})).status_code == 404
        await wait_until(lambda: hub.configs.published >= 1, what="config published")
        async with httpx.AsyncClient(base_url=hub.api_url, timeout=10, auth=hubtools.admin_auth()) as client:
            r = await client.get(url)
            assert r.status_code == 200 and r.json()["version"] == 1 and r.json()["applied_version"] is None
