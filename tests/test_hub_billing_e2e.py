"""Billing on a running hub: meter telemetry over a real Mosquitto into the database, the running
cost growing as readings arrive, and a refused manual reading becoming a "possible human error"
alert through the hub's signal bus and alert engine."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from fleet.broker import Mosquitto
from hub.api.schemas import iso_ms
from hub.ingest import now_ms
from hub.service import running_hub
from tests.hubtools import admin_auth, hub_config, wait_until
from tests.test_hub_ingest import publish, tele

HOUR = 3_600_000
METER = "site1.gw1.meter1"


async def _alerts(http: httpx.AsyncClient, count: int, within_s: float = 10.0, **params: Any) -> list[Any]:
    deadline = time.monotonic() + within_s
    while True:
        r = await http.get("/api/v1/alerts", params=params)
        assert r.status_code == 200, r.text
        if len(r.json()) == count:
            return list(r.json())
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} alerts, have {r.json()}")
        await asyncio.sleep(0.05)


async def test_running_cost_over_mqtt_and_a_refused_reading_raises_an_alert(tmp_path: Path,
                                                                              mosquitto: Mosquitto) -> None:
    # Only the human-error rule: the old readings would also (rightly) open stale and gap alerts.
    cfg = hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port,
                     alerts={"builtin_rules": False, "rules": [{"type": "human_error", "name": "human-error"}]})
    async with running_hub(cfg) as hub, httpx.AsyncClient(auth=admin_auth(), base_url=hub.api_url,
                                                          headers={"X-Twin-User": "tech-7"}) as http:
        t = (now_ms() // HOUR - 3) * HOUR  # a whole hour, 3 to 4 hours ago
        readings = [("meter1", "energy_import", i, t + i * HOUR, 1000.0 + 10 * i, "kWh", "good") for i in range(3)]
        await publish(mosquitto, tele("site1", "gw1", readings[:2], kinds={"meter1": "meter"}))
        await wait_until(lambda: hub.stats.readings_stored == 2, what="two readings stored")

        tariff = {"name": "flat", "currency": "GBP", "vat_rate": "0.2", "effective_from": iso_ms(t - 24 * HOUR),
                  "bands": [{"name": "flat", "rate": "0.25"}]}
        assert (await http.post("/api/v1/tariffs", json=tariff)).status_code == 201
        r = await http.post("/api/v1/tariff-assignments", json={"tariff": "flat", "meter": METER,
                                                                "effective_from": iso_ms(t)})
        assert r.status_code == 201, r.text
        period = {"since": iso_ms(t), "until": iso_ms(t + 2 * HOUR)}
        # Known so far: 1000.0 -> 1010.0 = 10 kWh × 0.25 = 2.50; VAT 20 % = 0.50; total 3.00.
        body = (await http.get(f"/api/v1/meters/{METER}/cost", params=period)).json()
        assert (body["consumption_kwh"], body["net"], body["vat_total"], body["total"]) == (
            "10.000", "2.50", "0.50", "3.00")

        await publish(mosquitto, tele("site1", "gw1", readings[2:], kinds={"meter1": "meter"}))
        await wait_until(lambda: hub.stats.readings_stored == 3, what="the third reading stored")
        # Up to 1020.0 now: 20 kWh × 0.25 = 5.00; VAT 1.00; total 6.00.
        body = (await http.get(f"/api/v1/meters/{METER}/cost", params=period)).json()
        assert (body["consumption_kwh"], body["net"], body["vat_total"], body["total"]) == (
            "20.000", "5.00", "1.00", "6.00")

        assert await _alerts(http, 0, device=METER) == []
        r = await http.post(f"/api/v1/meters/{METER}/readings", json={"value": "1015", "ts": iso_ms(t + 150 * 60_000)})
        assert r.status_code == 422
        assert r.json()["detail"].startswith("reading 1015 kWh is lower than the previous reading 1020.0 kWh")
        (alert,) = await _alerts(http, 1, device=METER)
        assert (alert["type"], alert["state"], alert["last_value"]) == ("human_error", "open", 1015.0)
        assert alert["message"].startswith(f"possible human error: manual reading of meter {METER} refused: "
                                           "reading 1015 kWh is lower than the previous reading 1020.0 kWh")
        # Nothing was stored: the cost is unchanged.
        body = (await http.get(f"/api/v1/meters/{METER}/cost", params=period)).json()
        assert (body["consumption_kwh"], body["total"]) == ("20.000", "6.00")
