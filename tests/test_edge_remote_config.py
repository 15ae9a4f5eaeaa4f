"""Remote configuration on the edge (``edge/remote_config.py``) over a real Mosquitto, with the
agent polling simulated devices over Modbus TCP. The hub's side is played by the test: it publishes
the retained GatewayConfigV1 as the hub does."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edge.agent import EdgeAgent
from edge.config import load_config
from edge.drivers.modbus import ModbusDriver
from edge.remote_config import REMOTE_CONFIG_FILE, RemoteConfigError, validate_document
from firmware_sim import SimConfig, Simulators, run_simulators
from fleet.broker import Mosquitto
from protocol import topics
from protocol.schema import GatewayConfigV1, encode
from tests.edgetools import agent_toml, collect, running_agent

SITE = "site-1"
GW = "gw-ai"


@pytest.fixture
async def sims() -> AsyncIterator[Simulators]:
    async with run_simulators(SimConfig(boilers=2, meters=1, base_port=0, speed=0, start_hour=7)) as sim:
        sim.step(600)
        yield sim


def dev(sim: Simulators, name: str, **extra: Any) -> dict[str, Any]:
    """A device table as in edge.toml (what the hub sends)."""
    profile = "sim-boiler" if name.startswith("boiler") else "sim-meter"
    return {"name": name, "profile": profile, "host": "127.0.0.1", "port": sim.device(name).port,
            "poll_interval_s": 0.1, **extra}


async def send_config(broker: Mosquitto, version: int, config: dict[str, Any]) -> None:
    """Publish the retained configuration message, as the hub does."""
    msg = GatewayConfigV1(site=SITE, gateway=GW, ts=time.time_ns() // 1_000_000, version=version, config=config)
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"t-hub-{time.monotonic_ns()}") as hub:
        await hub.publish(topics.config_topic(SITE, GW), encode(msg), qos=1, retain=True)


def config_events(got: dict[str, list[Any]]) -> list[Any]:
    return [e for e in got["events"] if e.type.startswith("config_")]


# -- validation (no network) ---------------------------------------------------------------------

@pytest.fixture
def base(tmp_path: Path) -> Any:
    (tmp_path / "edge.toml").write_text('[gateway]\nsite = "site-1"\nname = "gw-ai"\n[buffer]\npath = "buf.db"\n'
                                        '[[devices]]\nname = "boiler-1"\nprofile = "sim-boiler"\nhost = "127.0.0.1"\n')
    return load_config(tmp_path / "edge.toml")[0]


GOOD = {"name": "boiler-1", "profile": "sim-boiler", "host": "127.0.0.1", "port": 5020}


@pytest.mark.parametrize(("devices", "expected"), [
    ([{**GOOD, "profile": "no-such-profile"}],
     "devices[0] ('boiler-1').profile: no built-in profile 'no-such-profile'"),
    ([GOOD, {**GOOD, "port": 5021}], "device names must be unique; repeated: ['boiler-1']"),
    ([GOOD, {**GOOD, "name": "boiler-2", "port": 70000}],
     "devices[1] ('boiler-2').port: Input should be less than or equal to 65535"),
    ([{**GOOD, "poll_interval_s": "fast"}], "devices[0] ('boiler-1').poll_interval_s: Input should be a valid number"),
    ([{**GOOD, "pol_interval_s": 1.0}], "devices[0] ('boiler-1').pol_interval_s: Extra inputs are not permitted"),
    ([{"name": "boiler-1", "profile": "sim-boiler", "transport": "rtu", "serial_port": "bus-1"}],
     "device 'boiler-1': no [[serial_ports]] entry named 'bus-1'"),
    ([{**GOOD, "points": ["flow_temp", "nope"]}],
     "devices[0] ('boiler-1').points: not in profile 'sim-boiler': ['nope']"),
    ([{**GOOD, "profile": "../../etc/passwd.toml"}],
     "devices[0] ('boiler-1').profile: profile file '../../etc/passwd.toml' must be a relative path inside"),
])
def test_invalid_configs_are_refused_naming_device_and_key(base: Any, devices: list[Any], expected: str) -> None:
    with pytest.raises(RemoteConfigError) as err:
        validate_document(base, {"devices": devices})
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems


def test_only_devices_and_serial_ports_can_be_set(base: Any) -> None:
    with pytest.raises(RemoteConfigError) as err:
        validate_document(base, {"devices": [GOOD], "mqtt": {"host": "evil"}})
    assert err.value.problems == ["config.mqtt: not settable remotely (only devices, serial_ports)"]
    with pytest.raises(RemoteConfigError) as err:
        validate_document(base, [GOOD])
    assert err.value.problems[0].startswith("config: must be a JSON object")
    cfg, profiles = validate_document(base, {"devices": [GOOD, {**GOOD, "name": "meter-1", "profile": "sim-meter"}]})
    assert [d.name for d in cfg.devices] == ["boiler-1", "meter-1"]
    assert cfg.gateway == base.gateway and cfg.buffer == base.buffer
    assert profiles["meter-1"].name == "sim-meter"


# -- the agent ---------------------------------------------------------------------------------

async def test_agent_applies_a_config_without_restart_and_keeps_unchanged_pollers(
        mosquitto: Mosquitto, tmp_path: Path, sims: Simulators) -> None:
    path = agent_toml(tmp_path, sims, mosquitto, devices=("boiler-1", "meter-1"))
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t-watch") as sub:
        await sub.subscribe(f"twin/v1/{SITE}/{GW}/#", qos=1)
        async with running_agent(path) as agent:
            await collect(sub, lambda g: g.get("meter-1.power") and g.get("boiler-1.flow_temp"))
            boiler_poller, boiler_driver = agent.pollers["boiler-1"], agent.drivers["boiler-1"]
            boiler_task = agent._poll_tasks["boiler-1"]
            meter_poller = agent.pollers["meter-1"]
            # meter-1 slower, boiler-2 added, boiler-1 exactly as before.
            await send_config(mosquitto, 1, {"devices": [
                dev(sims, "boiler-1"), dev(sims, "meter-1", poll_interval_s=0.3), dev(sims, "boiler-2")]})
            got = await collect(sub, lambda g: config_events(g) and g.get("boiler-2.flow_temp")
                                and any(len(st.devices) == 3 for st in g["status"]))
            assert [(e.type, e.details) for e in config_events(got)] == [
                ("config_applied", {"version": 1, "devices": 3})]
            assert agent.pollers["boiler-1"] is boiler_poller and agent.drivers["boiler-1"] is boiler_driver
            assert agent._poll_tasks["boiler-1"] is boiler_task and not boiler_task.done()
            assert agent.pollers["meter-1"] is not meter_poller and agent.pollers["meter-1"].interval == 0.3
            assert sorted(agent.devices) == ["boiler-1", "boiler-2", "meter-1"]
            assert sorted(agent.scorer.devices) == ["boiler-1", "boiler-2", "meter-1"]
            assert agent.scorer.devices["meter-1"].poll_interval_s == 0.3
            assert agent.remote.applied_version == 1
            status = next(st for st in reversed(got["status"]) if len(st.devices) == 3)
            assert {n: d.profile for n, d in status.devices.items()} == {
                "boiler-1": "sim-boiler", "boiler-2": "sim-boiler", "meter-1": "sim-meter"}
            # The meter now polls about every 0.3 s: count its power readings over 1.5 s.
            t0 = time.monotonic()
            got = await collect(sub, lambda g: time.monotonic() - t0 > 1.5)
            assert 3 <= len(got.get("meter-1.power", [])) <= 7, len(got.get("meter-1.power", []))
            assert len(got.get("boiler-1.flow_temp", [])) >= 10

            # An invalid one (unknown profile on the new device) is refused; everything keeps polling.
            await send_config(mosquitto, 2, {"devices": [dev(sims, "boiler-1"),
                                                         dev(sims, "boiler-2", profile="sim-boiler-xl")]})
            got = await collect(sub, lambda g: config_events(g) and g.get("boiler-2.flow_temp")
                                and g.get("meter-1.power"))
            [rejected] = config_events(got)
            assert rejected.type == "config_rejected" and rejected.details["version"] == 2
            assert rejected.details["running_version"] == 1
            assert str(rejected.details["error"]).startswith(
                "devices[1] ('boiler-2').profile: no built-in profile 'sim-boiler-xl'")
            assert sorted(agent.pollers) == ["boiler-1", "boiler-2", "meter-1"]
            assert agent.remote.applied_version == 1 and agent.remote.rejected_version == 2
    persisted = json.loads((tmp_path / REMOTE_CONFIG_FILE).read_text())
    assert persisted["version"] == 1
    assert [d["name"] for d in persisted["config"]["devices"]] == ["boiler-1", "meter-1", "boiler-2"]
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]


async def test_persisted_config_is_used_after_a_restart_and_the_same_version_is_ignored(
        mosquitto: Mosquitto, tmp_path: Path, sims: Simulators) -> None:
    path = agent_toml(tmp_path, sims, mosquitto, devices=("boiler-1",))
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t-watch") as sub:
        await sub.subscribe(f"twin/v1/{SITE}/{GW}/#", qos=1)
        async with running_agent(path):
            await send_config(mosquitto, 3, {"devices": [dev(sims, "meter-1")]})
            got = await collect(sub, lambda g: config_events(g) and g.get("meter-1.power"))
            assert [e.type for e in config_events(got)] == ["config_applied"]
        # Restart: edge.toml still says boiler-1, the persisted remote configuration wins; the
        # retained v3 arrives again on connect and changes nothing.
        async with running_agent(path) as agent:
            assert sorted(agent.pollers) == ["meter-1"] and agent.remote.applied_version == 3
            await asyncio.wait_for(agent.uplink.connected.wait(), 10)
            t0 = time.monotonic()
            got = await collect(sub, lambda g: time.monotonic() - t0 > 1.0 and g.get("meter-1.power"))
            assert config_events(got) == [] and agent.remote.processed == 0
            assert not any(k.startswith("boiler-1.") for k in got)
    # A persisted file that no longer validates is logged and edge.toml's devices are used.
    (tmp_path / REMOTE_CONFIG_FILE).write_text(json.dumps({"v": 1, "version": 4, "config": {"devices": [
        {"name": "x", "profile": "nope", "host": "127.0.0.1"}]}}))
    mosquitto.stop()
    async with running_agent(path) as agent:
        assert sorted(agent.pollers) == ["boiler-1"] and agent.remote.applied_version == 0


async def test_rs485_bus_link_is_shared_with_kept_devices_and_renewed_when_the_port_changes(tmp_path: Path) -> None:
    """No serial traffic: drivers are built but never connected (the agent is not running)."""
    (tmp_path / "edge.toml").write_text(
        '[gateway]\nsite = "site-1"\nname = "gw-ai"\n[buffer]\npath = "buf.db"\n[metrics]\nport = 0\n'
        '[[serial_ports]]\nname = "bus-1"\ndevice = "/dev/null"\n'
        '[[devices]]\nname = "a"\nprofile = "sim-boiler"\ntransport = "rtu"\nserial_port = "bus-1"\nunit_id = 1\n'
        '[[devices]]\nname = "b"\nprofile = "sim-boiler"\ntransport = "rtu"\nserial_port = "bus-1"\nunit_id = 2\n')
    cfg, profiles = load_config(tmp_path / "edge.toml")
    agent = EdgeAgent(cfg, profiles)
    await agent.buffer.open()
    a = agent.drivers["a"]
    assert isinstance(a, ModbusDriver) and agent.drivers["b"].link is a.link  # type: ignore[attr-defined]

    def rtu(name: str, unit: int) -> dict[str, Any]:
        return {"name": name, "profile": "sim-boiler", "transport": "rtu", "serial_port": "bus-1", "unit_id": unit}

    port = {"name": "bus-1", "device": "/dev/null"}
    new_cfg, new_profiles = validate_document(cfg, {"devices": [rtu("a", 1), rtu("c", 3)], "serial_ports": [port]})
    assert await agent.apply_devices(new_cfg, new_profiles) == {"removed": ["b"], "changed": [], "added": ["c"]}
    assert agent.drivers["a"] is a and agent.drivers["c"].link is a.link  # type: ignore[attr-defined]
    assert sorted(agent.pollers) == ["a", "c"] and agent.pollers["a"].driver is a
    # Another baud rate: every device on the bus is changed and gets the new link.
    new_cfg, new_profiles = validate_document(cfg, {"devices": [rtu("a", 1), rtu("c", 3)],
                                                    "serial_ports": [{**port, "baudrate": 9600}]})
    assert await agent.apply_devices(new_cfg, new_profiles) == {"removed": [], "changed": ["a", "c"], "added": []}
    a2 = agent.drivers["a"]
    assert isinstance(a2, ModbusDriver) and a2.link is not a.link and agent.drivers["c"].link is a2.link  # type: ignore[attr-defined]
    assert a2.link.client.comm_params.baudrate == 9600
    assert sorted(agent.devices) == ["a", "c"] and sorted(agent.scorer.devices) == ["a", "c"]
    await agent.buffer.close()
