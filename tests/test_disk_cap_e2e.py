"""The disk cap end to end: an outage backlog bigger than the cap is thinned at the edge, and
the hub learns exactly how many readings were removed on purpose, next to what it stored."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from edge.buffer import ReadingBuffer
from edge.config import EdgeConfig
from edge.metrics import EdgeMetrics
from edge.reading import Reading
from edge.uplink import Uplink
from fleet.broker import Mosquitto
from hub.service import running_hub
from tests.hubtools import admin_auth, hub_config, wait_until

DEVICES = {"boiler-1": ("boiler", "sim-boiler"), "meter-1": ("meter", "sim-meter")}


async def test_thinned_backlog_is_reported_and_the_rest_stored_exactly_once(mosquitto: Mosquitto,
                                                                             tmp_path: Path) -> None:
    buf = ReadingBuffer(tmp_path / "buf.db", max_bytes=2 * 2**20)
    await buf.open()
    await buf.register_devices(DEVICES)
    t0 = time.time_ns() // 1_000_000 - 3_600_000
    for k in range(30):  # an outage: ~3 times the cap arrives while nothing can be sent
        await buf.submit([Reading(dev, metric, t0 + k * 1000 + i, float(i), unit)
                          for i in range(2000)
                          for dev, metric, unit in (("boiler-1", "flow_temp", "degC"), ("meter-1", "power", "kW"))])
        await buf.flush()
    dropped, kept = buf.dropped_total, buf.backlog
    assert dropped > 0 and kept + dropped == 120_000
    n_events = len(await buf.events())
    cfg = hub_config(db_url=f"sqlite://{tmp_path / 'hub.db'}", mqtt_port=mosquitto.port, client_id="hub-cap")
    async with running_hub(cfg) as hub:
        edge_cfg = EdgeConfig.model_validate({"gateway": {"site": "site-c", "name": "gw-c"},
                                              "mqtt": {"port": mosquitto.port, "batch_max_readings": 2000}})
        up = Uplink(edge_cfg, buf, DEVICES, EdgeMetrics())
        task = asyncio.create_task(up.run())
        await wait_until(lambda: hub.stats.readings_stored >= kept and hub.stats.events >= n_events, 60,
                         "the kept backlog and the thinning events at the hub")
        await wait_until(lambda: buf.backlog == 0, 10, "PUBACKs for the last batches")
        async with httpx.AsyncClient(auth=admin_auth(), base_url=hub.api_url) as api:
            gateways = {g["id"]: g for g in (await api.get("/api/v1/gateways")).json()}
            events = (await api.get("/api/v1/gateways/site-c.gw-c/events")).json()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert hub.stats.readings_stored == kept and hub.stats.duplicates == 0
    assert gateways["site-c.gw-c"]["readings_dropped"] == dropped
    assert len(events) == n_events >= 1 and {e["type"] for e in events} == {"buffer_thinned"}
    assert sum(e["readings_dropped"] for e in events) == dropped
    assert buf.backlog == 0 and not await buf.events()
    await buf.close()
