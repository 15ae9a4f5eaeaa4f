"""Setpoint commands end to end on real parts: a technician writes a boiler's flow setpoint through
an in-process hub, a real Mosquitto and a real edge agent process into a simulated boiler's
holding register over Modbus TCP; unsafe values are refused by the hub, and by the edge when a
command bypasses the hub; an expired command is refused; a device that does not answer fails the
command. Every case ends in the hub's audit, refusals in a "possible human error" alert."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from firmware_sim import SimConfig, Simulators, run_simulators
from fleet.broker import Mosquitto
from fleet.procs import ReadyProcess
from hub.ingest import now_ms
from hub.service import Hub, running_hub
from protocol.schema import CommandV1, encode
from protocol.topics import commands_topic
from tests.edgetools import holding0
from tests.hubtools import BearerAuth, add_user, hub_config

pytestmark = pytest.mark.integration

SITE, GW = "site-1", "gw-cmd"
BOILER, SILENT = f"{SITE}.{GW}.boiler-1", f"{SITE}.{GW}.boiler-9"


@dataclass
class Fleet:
    hub: Hub
    sim: Simulators
    edge: ReadyProcess
    broker: Mosquitto
    tech: httpx.AsyncClient
    """Signed in as a technician."""
    viewer: httpx.AsyncClient


async def login(hub: Hub, username: str, role: str) -> BearerAuth:
    """Create ``username`` with ``role`` at the hub; an httpx auth that signs in as them."""
    return BearerAuth(username, await add_user(hub.db, username, role))


def edge_toml(work: Path, sim: Simulators, broker: Mosquitto, silent_port: int) -> Path:
    path = work / "edge.toml"
    path.write_text(f"""
[gateway]
site = "{SITE}"
name = "{GW}"

[mqtt]
port = {broker.port}
batch_max_delay_ms = 20
reconnect_min_s = 0.1
reconnect_max_s = 0.5

[buffer]
path = "{work / 'buf.db'}"
flush_interval_ms = 20

[metrics]
port = 0

[[devices]]
name = "boiler-1"
profile = "sim-boiler"
host = "127.0.0.1"
port = {sim.device("boiler-1").port}
poll_interval_s = 0.2

[[devices]]
name = "boiler-9"
profile = "sim-boiler"
host = "127.0.0.1"
port = {silent_port}
poll_interval_s = 0.2
timeout_s = 0.3
""")
    return path


@pytest.fixture
async def fleet(tmp_path: Path, mosquitto: Mosquitto) -> AsyncIterator[Fleet]:
    silent = socket.socket()  # a "boiler" that accepts the connection and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    edge: ReadyProcess | None = None
    try:
        async with run_simulators(SimConfig(boilers=1, meters=0, base_port=0, speed=1)) as sim, \
                running_hub(hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port,
                                       client_id="hub-commands-e2e")) as hub:
            cfg = edge_toml(tmp_path, sim, mosquitto, silent.getsockname()[1])
            edge = ReadyProcess.python("twin-edge", "edge.cli", "run", "--config", str(cfg),
                                       log_path=tmp_path / "edge.log")
            await asyncio.to_thread(edge.start)
            tech_auth = await login(hub, "tech1", "technician")
            viewer_auth = await login(hub, "view1", "viewer")
            async with httpx.AsyncClient(base_url=hub.api_url, auth=tech_auth, timeout=10) as tech, \
                    httpx.AsyncClient(base_url=hub.api_url, auth=viewer_auth, timeout=10) as viewer:
                f = Fleet(hub, sim, edge, mosquitto, tech, viewer)
                await until(f, "the hub to know the gateway's devices", lambda: _devices(f), 20)
                yield f
    finally:
        if edge is not None:
            if edge.alive():
                edge.signal(signal.SIGTERM)
            await asyncio.to_thread(edge.stop)
        silent.close()


async def _devices(f: Fleet) -> bool:
    r = await f.tech.get("/api/v1/devices")
    return r.status_code == 200 and {BOILER, SILENT} <= {d["id"] for d in r.json()}


async def until(f: Fleet, what: str, probe: Any, within_s: float = 15.0, every_s: float = 0.1) -> Any:
    """Await ``probe()`` until it returns something truthy; bounded in time and count."""
    deadline = time.monotonic() + within_s
    last = None
    for _ in range(int(within_s / every_s) + 1):
        last = await probe()
        if last:
            return last
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(every_s)
    pytest.fail(f"gave up waiting {within_s} s for {what}; last {last!r}\nedge log:\n{f.edge.log_tail(4000)}")


async def command(f: Fleet, command_id: str, *statuses: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        r = await f.tech.get(f"/api/v1/commands/{command_id}")
        if r.status_code != 200:
            return None
        doc: dict[str, Any] = r.json()
        return doc if doc["status"] in statuses else None
    result: dict[str, Any] = await until(f, f"command {command_id} to become {statuses}", probe)
    return result


async def boiler_setpoint_word(sim: Simulators) -> int:
    """boiler-1's holding register 0 (the flow setpoint, 0.1 degC)."""
    return await holding0(sim.device("boiler-1").port)


async def human_error_alerts(f: Fleet, device: str) -> list[dict[str, Any]]:
    r = await f.viewer.get("/api/v1/alerts", params={"device": device, "state": "open"})
    assert r.status_code == 200, r.text
    return [a for a in r.json() if a["type"] == "human_error"]


async def publish_direct(f: Fleet, cmd: CommandV1) -> None:
    """A command published on the gateway's topic past the hub (as a rogue client would)."""
    async with aiomqtt.Client(f.broker.host, f.broker.port, identifier="rogue") as client:
        await client.publish(commands_topic(SITE, GW), encode(cmd), qos=1)


async def test_setpoint_commands_end_to_end(fleet: Fleet) -> None:
    f = fleet
    # 1. A technician sets the flow setpoint to 65.0 degC: applied, read back, in the register.
    r = await f.tech.post(f"/api/v1/devices/{BOILER}/commands", json={"point": "flow_setpoint", "value": 65.0})
    assert r.status_code == 202, r.text
    sent = r.json()
    assert (sent["status"], sent["issued_by"], sent["unit"], sent["value"]) == ("sent", "tech1", "degC", 65.0)
    done = await command(f, sent["id"], "applied", "failed", "refused_by_gateway")
    assert (done["status"], done["read_back"], done["reason"], done["via_hub"]) == ("applied", 65.0, "", True)
    assert await boiler_setpoint_word(f.sim) == 650
    assert f.sim.device("boiler-1").model.flow_setpoint == 65.0  # type: ignore[attr-defined]

    # 2. 95.0 degC at the hub: 422 naming the range, audited, a human-error alert.
    r = await f.tech.post(f"/api/v1/devices/{BOILER}/commands", json={"point": "flow_setpoint", "value": 95.0})
    assert r.status_code == 422, r.text
    assert "outside the safe range 30..80 degC" in r.json()["detail"]
    audit = (await f.tech.get("/api/v1/commands", params={"device": BOILER})).json()
    assert [(c["status"], c["value"], c["issued_by"]) for c in audit] == [
        ("refused_by_hub", 95.0, "tech1"), ("applied", 65.0, "tech1")]
    alerts = await until(f, "a human-error alert", lambda: human_error_alerts(f, BOILER))
    assert len(alerts) == 1 and alerts[0]["last_value"] == 95.0
    assert await boiler_setpoint_word(f.sim) == 650  # untouched

    # 3. A command published past the hub with an unsafe value: the edge refuses, the hub shows it.
    now = now_ms()
    await publish_direct(f, CommandV1(site=SITE, gateway=GW, ts=now, id="rogue-1", expires=now + 60_000,
                                      device="boiler-1", point="flow_setpoint", value=120.0, issued_by="mallory"))
    rogue = await command(f, "rogue-1", "refused_by_gateway", "applied", "failed")
    assert (rogue["status"], rogue["reason"], rogue["via_hub"], rogue["issued_by"], rogue["value"]) == (
        "refused_by_gateway", "out_of_range", False, "mallory", 120.0)
    alert = await until(f, "the alert to count the gateway's refusal",
                        lambda: _alert_count(f, BOILER, 2))
    assert "not issued through this hub" in alert["message"] or alert["count"] == 2
    assert await boiler_setpoint_word(f.sim) == 650

    # 4. An expired command (safe value) is refused by the gateway's clock.
    await publish_direct(f, CommandV1(site=SITE, gateway=GW, ts=now - 120_000, id="late-1", expires=now - 60_000,
                                      device="boiler-1", point="flow_setpoint", value=50.0, issued_by="tech1"))
    late = await command(f, "late-1", "refused_by_gateway", "applied", "failed")
    assert late["reason"] == "expired"
    assert await boiler_setpoint_word(f.sim) == 650

    # 5. A device that does not answer: the command fails with the reason.
    r = await f.tech.post(f"/api/v1/devices/{SILENT}/commands", json={"point": "flow_setpoint", "value": 60.0})
    assert r.status_code == 202, r.text
    failed = await command(f, r.json()["id"], "failed", "applied", "refused_by_gateway")
    assert (failed["status"], failed["reason"]) == ("failed", "timeout")

    # A redelivered command (same id) is neither executed nor answered twice.
    cmd = CommandV1(site=SITE, gateway=GW, ts=now_ms(), id="dup-1", expires=now_ms() + 60_000, device="boiler-1",
                    point="flow_setpoint", value=55.0, issued_by="tech1")
    await publish_direct(f, cmd)
    await command(f, "dup-1", "applied")
    await publish_direct(f, cmd)
    log = await until(f, "the edge to log the duplicate", lambda: _edge_logged(f, "command_duplicate"))
    assert log["id"] == "dup-1"
    assert await boiler_setpoint_word(f.sim) == 550
    answers = [e for e in (await f.tech.get(f"/api/v1/gateways/{SITE}.{GW}/events",
                                            params={"type": "command_applied", "limit": 100})).json()
               if e.get("details", {}).get("command_id") == "dup-1"]
    assert len(answers) == 1

    # Viewers see alerts but may not write setpoints or read the command audit.
    r = await f.viewer.post(f"/api/v1/devices/{BOILER}/commands", json={"point": "flow_setpoint", "value": 50.0})
    assert r.status_code == 403
    assert (await f.viewer.get("/api/v1/commands")).status_code == 403


async def _alert_count(f: Fleet, device: str, count: int) -> dict[str, Any] | None:
    alerts = await human_error_alerts(f, device)
    return alerts[0] if alerts and alerts[0]["count"] >= count else None


async def _edge_logged(f: Fleet, event: str) -> dict[str, Any] | None:
    for line in reversed(f.edge.log_tail(10**6).splitlines()):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("event") == event:
            return doc
    return None
