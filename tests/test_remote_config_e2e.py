"""Remote configuration end to end on real parts: twin-sim (Modbus TCP) → a real twin-edge process
→ Mosquitto → an in-process hub (SQLite) → REST API, and back: a configuration PUT at the hub
reaches the running agent, which applies it without a restart or refuses it."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from fleet.broker import Mosquitto
from fleet.configs import write_edge_config
from fleet.procs import ReadyProcess
from hub.service import running_hub
from tests import hubtools
from tests.hubtools import hub_config

GW = "site-1.gw-1"


async def _wait_for(what: str, check: Any, within_s: float = 30.0, edge: ReadyProcess | None = None) -> Any:
    """Poll the async ``check`` every 0.2 s until it returns something truthy."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        got = await check()
        if got:
            return got
        await asyncio.sleep(0.2)
    tail = edge.log_tail() if edge is not None else ""
    raise AssertionError(f"timed out after {within_s}s waiting for {what}; edge log:\n{tail}")


def _tcp(dev: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": dev["name"], "profile": dev["profile"], "host": dev["host"], "port": dev["port"], **extra}


async def test_config_changes_reach_the_running_agent(mosquitto: Mosquitto, tmp_path: Path) -> None:
    sim = ReadyProcess.python("twin-sim", "firmware_sim.cli", "--boilers", "2", "--meters", "0", "--base-port", "0",
                              "--seed", "3", "--speed", "10", "--start-hour", "7", log_path=tmp_path / "sim.log")
    edge: ReadyProcess | None = None
    sim.start()
    try:
        devices = {d["name"]: d for d in sim.ready["devices"]}
        cfg = hub_config(db_url=f"sqlite://{tmp_path / 'hub.db'}", mqtt_port=mosquitto.port)
        async with running_hub(cfg) as hub, httpx.AsyncClient(base_url=hub.api_url, timeout=10,
                                                              auth=hubtools.admin_auth()) as client:
            edge_cfg = write_edge_config(tmp_path / "edge.toml", site="site-1", gateway="gw-1",
                                         mqtt_port=mosquitto.port, devices=[devices["boiler-1"]],
                                         poll_interval_s=0.5, mqtt={"batch_max_delay_ms": 50})
            edge = ReadyProcess.python("twin-edge", "edge.cli", "run", "--config", str(edge_cfg),
                                       log_path=tmp_path / "edge.log")
            edge.start()

            async def get(path: str, **params: Any) -> Any:
                r = await client.get(path, params=params)
                assert r.status_code == 200, r.text
                return r.json()

            async def readings(device: str, since_ms: int = 0) -> list[dict[str, Any]]:
                rows = await get(f"/api/v1/devices/{GW}.{device}/readings", metric="flow_temp", limit=1000)
                return [r for r in rows if _ms(r["ts"]) >= since_ms]

            await _wait_for("the gateway at the hub", lambda: _known(client), edge=edge)
            before = await get(f"/api/v1/gateways/{GW}/config")
            assert (before["version"], before["state"], before["history"]) == (None, "none", [])

            # Faster polls for boiler-1, and boiler-2 added.
            doc = {"devices": [_tcp(devices["boiler-1"], poll_interval_s=0.2),
                               _tcp(devices["boiler-2"], poll_interval_s=0.5)]}
            r = await client.put(f"/api/v1/gateways/{GW}/config", json=doc)
            assert r.status_code == 200, r.text
            assert (r.json()["version"], r.json()["state"]) == (1, "pending")
            put_ms = time.time_ns() // 1_000_000

            async def applied() -> Any:
                c = await get(f"/api/v1/gateways/{GW}/config")
                return c if c["state"] == "applied" else None
            state = await _wait_for("config v1 applied", applied, edge=edge)
            assert (state["applied_version"], state["last_error"], state["config"]) == (1, "", doc)
            assert [(h["version"], h["changed_by"], h["devices"]) for h in state["history"]] == [(1, "admin", 2)]
            await _wait_for("readings of boiler-2", lambda: readings("boiler-2"), edge=edge)
            events = await get(f"/api/v1/gateways/{GW}/events", type="config_applied")
            assert [(e["type"], e["details"]) for e in events] == [("config_applied", {"version": 1, "devices": 2})]
            # boiler-1 now polls every 0.2 s instead of 0.5 s.
            await asyncio.sleep(2.5)
            ts = [_ms(r["ts"]) for r in await readings("boiler-1", since_ms=put_ms + 500)]
            ts.sort()
            gaps = sorted(b - a for a, b in itertools.pairwise(ts))
            assert len(gaps) >= 6 and 150 <= gaps[len(gaps) // 2] <= 260, gaps

            # An invalid one (port out of range): the hub accepts the shape, the gateway refuses it.
            bad = {"devices": [doc["devices"][0], {**doc["devices"][1], "port": 70000}]}
            r = await client.put(f"/api/v1/gateways/{GW}/config", json=bad)
            assert r.status_code == 200 and r.json()["version"] == 2, r.text
            bad_ms = time.time_ns() // 1_000_000

            async def rejected() -> Any:
                c = await get(f"/api/v1/gateways/{GW}/config")
                return c if c["state"] == "rejected" else None
            state = await _wait_for("config v2 rejected", rejected, edge=edge)
            assert (state["version"], state["applied_version"], state["rejected_version"]) == (2, 1, 2)
            assert state["last_error"].startswith("devices[1] ('boiler-2').port: Input should be less than or "
                                                  "equal to 65535"), state["last_error"]
            # ... and both devices keep reporting under configuration v1.
            for device in ("boiler-1", "boiler-2"):
                async def more(device: str = device) -> bool:
                    return len(await readings(device, since_ms=bad_ms + 200)) >= 4
                await _wait_for(f"new readings of {device}", more, within_s=10, edge=edge)
            # A shape error never reaches the gateway.
            r = await client.put(f"/api/v1/gateways/{GW}/config", json={"devices": [doc["devices"][0]] * 2})
            assert r.status_code == 422 and "repeated: ['boiler-1']" in r.json()["detail"]
            r = await client.put("/api/v1/gateways/site-1.gw-9/config", json=doc)
            assert r.status_code == 404
            assert edge.stop() == 0
    finally:
        if edge is not None and edge.proc is not None and edge.proc.poll() is None:
            edge.stop()
        sim.stop()


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


async def _known(client: httpx.AsyncClient) -> bool:
    r = await client.get(f"/api/v1/gateways/{GW}/config")
    return r.status_code == 200
