"""The hub's side of setpoint commands, on a running hub with a real Mosquitto: the safe-range check
against the device's profile, the command published to the gateway's topic, the audit row following
the gateway's answer, human-error alerts for unsafe values (refused here or at the gateway), the
expiry sweep, and a broker that is not there. SQLite here; one test again on PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from fleet.broker import Mosquitto
from fleet.postgres import PostgresCluster
from hub.alerts.models import Alert
from hub.commands import CommandRefused, CommandRow, CommandStatus
from hub.ingest import now_ms
from hub.queries import find_device
from hub.service import Hub, running_hub
from protocol.schema import DeviceInfoV1, DeviceKind, GatewayState, StatusV1, decode_command, encode
from protocol.topics import commands_topic, status_topic
from tests.hubtools import BearerAuth, add_user, hub_config, wait_until
from tests.test_hub_ingest import evt, publish

SITE, GW = "site1", "gw1"
UID = f"{SITE}.{GW}.boiler1"


def status_message(site: str = SITE, gateway: str = GW) -> tuple[str, bytes]:
    return status_topic(site, gateway), encode(StatusV1(
        site=site, gateway=gateway, state=GatewayState.ONLINE, ts=now_ms(), agent_version="test",
        devices={"boiler1": DeviceInfoV1(kind=DeviceKind.BOILER, profile="sim-boiler"),
                 "meter1": DeviceInfoV1(kind=DeviceKind.METER, profile="sim-meter"),
                 "odd1": DeviceInfoV1(kind=DeviceKind.BOILER, profile="acme-unknown")}))


async def known_devices(hub: Hub, mosquitto: Mosquitto) -> None:
    """Tell the hub about the gateway's devices (its retained status) and wait until it knows them."""
    await publish(mosquitto, status_message(), retain=True)
    for _ in range(400):  # bounded: the device rows appear once the status is committed
        if all([await find_device(hub.db, f"{SITE}.{GW}.{d}") is not None for d in ("boiler1", "meter1", "odd1")]):
            return
        await asyncio.sleep(0.025)
    raise AssertionError("the hub never learnt the gateway's devices")


async def open_alerts(hub: Hub, device: str = UID) -> list[dict[str, Any]]:
    with hub.db.activate():
        rows: list[dict[str, Any]] = await Alert.filter(device=device, state="open").values(
            "type", "rule", "message", "count", "last_value", "site", "gateway")
    return rows


async def wait_for_alert(hub: Hub, device: str = UID, within_s: float = 10.0) -> dict[str, Any]:
    for _ in range(int(within_s / 0.05)):
        await hub.alerts.drain(1)
        rows = await open_alerts(hub, device)
        if rows:
            assert len(rows) == 1, rows
            return rows[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no open alert for {device}")


async def wait_for_status(hub: Hub, command_id: str, status: CommandStatus, within_s: float = 10.0) -> CommandRow:
    row = None
    for _ in range(int(within_s / 0.05)):
        row = await hub.commands.get(command_id)
        if row is not None and row.status == status.value:
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"command {command_id} never became {status.value}; last {row}")


def answer(type_: str, command_id: str, *, ts: int | None = None, gateway: str = GW,
           **details: Any) -> tuple[str, bytes]:
    return evt(SITE, gateway, type_, ts or now_ms(), device="boiler1",
               details={"command_id": command_id, "point": "flow_setpoint", **details},
               message=f"{type_} for {command_id}")


@pytest.fixture
async def sub(mosquitto: Mosquitto) -> AsyncIterator[aiomqtt.Client]:
    """A gateway's view of its commands topic."""
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="test-gateway") as client:
        await client.subscribe(commands_topic(SITE, GW), qos=1)
        yield client


async def next_command(client: aiomqtt.Client, within_s: float = 5.0) -> tuple[bytes, bool]:
    async def first() -> tuple[bytes, bool]:
        async for msg in client.messages:
            return bytes(msg.payload), bool(msg.retain)  # type: ignore[arg-type]
        raise AssertionError("subscription ended")
    return await asyncio.wait_for(first(), within_s)


async def test_a_safe_setpoint_is_sent_and_follows_the_gateways_answer(
        tmp_path: Path, mosquitto: Mosquitto, sub: aiomqtt.Client) -> None:
    async with running_hub(hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port)) as hub:
        await known_devices(hub, mosquitto)
        before = now_ms()
        row = await hub.commands.issue(UID, "flow_setpoint", 65.0, "tech1")
        assert (row.status, row.device_uid, row.point, row.value, row.unit, row.issued_by, row.via_hub) == (
            "sent", UID, "flow_setpoint", 65.0, "degC", "tech1", True)
        assert before <= row.issued_at_ms <= now_ms()
        assert row.expires_ms == row.issued_at_ms + 60_000  # [commands] expiry_s default
        payload, retained = await next_command(sub)
        assert not retained
        cmd = decode_command(payload)
        assert (cmd.id, cmd.site, cmd.gateway, cmd.device, cmd.point, cmd.value, cmd.expires, cmd.issued_by) == (
            row.id, SITE, GW, "boiler1", "flow_setpoint", 65.0, row.expires_ms, "tech1")
        await publish(mosquitto, answer("command_applied", row.id, value=65.0, read_back=65.0))
        done = await wait_for_status(hub, row.id, CommandStatus.APPLIED)
        assert (done.read_back, done.reason) == (65.0, "")
        assert done.result_at_ms is not None and done.result_at_ms >= row.issued_at_ms
        # a redelivered answer changes nothing
        await publish(mosquitto, answer("command_failed", row.id, reason="timeout"))
        await asyncio.sleep(0.3)
        assert (await hub.commands.get(row.id)) == done
        assert [r.id for r in await hub.commands.list(device_uid=UID)] == [row.id]
        assert await open_alerts(hub) == []


async def test_an_unsafe_setpoint_is_refused_audited_and_raises_a_human_error_alert(
        tmp_path: Path, mosquitto: Mosquitto, sub: aiomqtt.Client) -> None:
    async with running_hub(hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port)) as hub:
        await known_devices(hub, mosquitto)
        with pytest.raises(CommandRefused) as err:
            await hub.commands.issue(UID, "flow_setpoint", 95.0, "tech1")
        assert err.value.status == 422
        assert err.value.message == ("flow_setpoint = 95 degC is outside the safe range 30..80 degC of profile "
                                     "'sim-boiler'")
        rec = err.value.record
        assert rec is not None
        stored = await hub.commands.get(rec.id)
        assert stored is not None
        assert (stored.status, stored.reason, stored.value, stored.issued_by, stored.result_at_ms is not None) == (
            "refused_by_hub", "out_of_range", 95.0, "tech1", True)
        alert = await wait_for_alert(hub)
        assert (alert["type"], alert["rule"], alert["last_value"], alert["site"], alert["gateway"]) == (
            "human_error", "human-error", 95.0, SITE, GW)
        assert "unsafe setpoint refused by the hub" in alert["message"] and "tech1" in alert["message"]
        # nothing was sent to the gateway
        with pytest.raises(TimeoutError):
            await next_command(sub, within_s=0.5)


@pytest.mark.parametrize(("uid", "point", "status", "reason"), [
    (UID, "flow_temp", 422, "not_writable"),
    (UID, "nope", 422, "unknown_point"),
    (f"{SITE}.{GW}.odd1", "flow_setpoint", 422, "unknown_profile"),
    (f"{SITE}.{GW}.meter1", "flow_setpoint", 422, "unknown_point"),
    (f"{SITE}.{GW}.nobody", "flow_setpoint", 404, None),
])
async def test_points_that_cannot_be_written_are_refused(tmp_path: Path, mosquitto: Mosquitto, uid: str,
                                                         point: str, status: int, reason: str | None) -> None:
    async with running_hub(hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port)) as hub:
        await known_devices(hub, mosquitto)
        with pytest.raises(CommandRefused) as err:
            await hub.commands.issue(uid, point, 50.0, "tech1")
        assert err.value.status == status
        if reason is None:
            assert err.value.record is None and await hub.commands.list() == []
        else:
            assert err.value.record is not None and err.value.record.reason == reason
            [row] = await hub.commands.list()
            assert (row.status, row.reason) == ("refused_by_hub", reason)
        await hub.alerts.drain(2)
        assert await open_alerts(hub, uid) == []  # only unsafe values are a possible human error


async def test_a_refusal_by_the_gateway_is_audited_and_alerted_even_for_commands_the_hub_never_sent(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    async with running_hub(hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port)) as hub:
        await known_devices(hub, mosquitto)
        await publish(mosquitto, answer("command_refused", "rogue-1", value=120.0, reason="out_of_range",
                                        issued_by="mallory"))
        row = await wait_for_status(hub, "rogue-1", CommandStatus.REFUSED_BY_GATEWAY)
        assert (row.via_hub, row.device_uid, row.point, row.value, row.reason, row.issued_by) == (
            False, UID, "flow_setpoint", 120.0, "out_of_range", "mallory")
        alert = await wait_for_alert(hub)
        assert alert["type"] == "human_error" and alert["last_value"] == 120.0
        assert "refused by gateway site1.gw1" in alert["message"] and "not issued through this hub" in alert["message"]
        # another gateway cannot answer for this command
        await publish(mosquitto, answer("command_applied", "rogue-1", gateway="gw2", read_back=1.0))
        await asyncio.sleep(0.3)
        assert (await hub.commands.get("rogue-1")) == row


async def test_an_unanswered_command_expires_and_a_late_answer_still_counts(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    cfg = hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port,
                     commands={"expiry_s": 1, "answer_grace_s": 0.5, "sweep_interval_s": 0.1})
    async with running_hub(cfg) as hub:
        await known_devices(hub, mosquitto)
        row = await hub.commands.issue(UID, "flow_setpoint", 45.0, "tech2")
        assert row.expires_ms == row.issued_at_ms + 1000
        expired = await wait_for_status(hub, row.id, CommandStatus.EXPIRED_NO_ANSWER, within_s=5)
        assert expired.reason == "no_answer"
        assert expired.result_at_ms is not None and expired.result_at_ms >= row.expires_ms + 500
        await publish(mosquitto, answer("command_refused", row.id, value=45.0, reason="expired"))
        late = await wait_for_status(hub, row.id, CommandStatus.REFUSED_BY_GATEWAY)
        assert late.reason == "expired"


async def test_without_the_broker_nothing_is_sent_and_the_audit_says_so(tmp_path: Path, mosquitto: Mosquitto) -> None:
    async with running_hub(hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port)) as hub:
        await known_devices(hub, mosquitto)
        mosquitto.stop()
        await wait_until(lambda: not hub.ingest.subscribed.is_set(), what="the hub to notice the broker is gone")
        with pytest.raises(CommandRefused) as err:
            await hub.commands.issue(UID, "flow_setpoint", 50.0, "tech1")
        assert err.value.status == 503
        [row] = await hub.commands.list()
        assert (row.status, row.reason) == ("failed", "broker_unavailable")
        assert row.message.startswith("not sent: broker not connected")


async def test_the_sweep_is_bounded_and_only_touches_sent_commands(tmp_path: Path, mosquitto: Mosquitto) -> None:
    from hub.commands import SWEEP_BATCH, CommandRecord
    async with running_hub(hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port,
                                      commands={"sweep_interval_s": 600})) as hub:
        old = now_ms() - 3_600_000
        with hub.db.activate():
            await CommandRecord.bulk_create([CommandRecord(
                id=f"old-{i}", site=SITE, gateway=GW, device="boiler1", device_uid=UID, point="flow_setpoint",
                value=50.0, issued_at_ms=old, expires_ms=old + 60_000,
                status="sent" if i % 2 == 0 else "applied") for i in range(2 * SWEEP_BATCH + 10)])
        assert await hub.commands.sweep() == SWEEP_BATCH
        assert await hub.commands.sweep() == 5
        assert await hub.commands.sweep() == 0
        with hub.db.activate():
            assert await CommandRecord.filter(status="applied").count() == SWEEP_BATCH + 5
            assert await CommandRecord.filter(status="expired_no_answer").count() == SWEEP_BATCH + 5


_numbers = itertools.count()


async def test_commands_on_postgresql(postgres: PostgresCluster, mosquitto: Mosquitto, sub: aiomqtt.Client) -> None:
    url = postgres.create_database(f"hub_commands_{next(_numbers)}")
    async with running_hub(hub_config(db_url=url, mqtt_port=mosquitto.port)) as hub:
        assert hub.db.dialect == "postgres"
        await known_devices(hub, mosquitto)
        row = await hub.commands.issue(UID, "flow_setpoint", 62.5, "tech1")
        cmd = decode_command((await next_command(sub))[0])
        assert (cmd.id, cmd.value) == (row.id, 62.5)
        await publish(mosquitto, answer("command_applied", row.id, value=62.5, read_back=62.5))
        done = await wait_for_status(hub, row.id, CommandStatus.APPLIED)
        assert done.read_back == 62.5
        with pytest.raises(CommandRefused):
            await hub.commands.issue(UID, "flow_setpoint", -10.0, "tech1")
        await publish(mosquitto, answer("command_refused", "pg-rogue", value=99.0, reason="out_of_range"))
        await wait_for_status(hub, "pg-rogue", CommandStatus.REFUSED_BY_GATEWAY)
        alert = await wait_for_alert(hub)
        assert alert["count"] >= 1 and alert["type"] == "human_error"
        rows = await hub.commands.list(site=SITE, gateway=GW)
        assert [r.status for r in rows if r.via_hub] == ["refused_by_hub", "applied"]
        assert {r.id for r in rows} == {row.id, "pg-rogue"} | {r.id for r in rows if r.status == "refused_by_hub"}



async def test_the_command_routes(tmp_path: Path, mosquitto: Mosquitto) -> None:
    async with running_hub(hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port)) as hub:
        await known_devices(hub, mosquitto)
        auth = BearerAuth("tech9", await add_user(hub.db, "tech9", "technician"))
        async with httpx.AsyncClient(base_url=hub.api_url, auth=auth) as http:
            async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="test-gateway") as sub:
                await sub.subscribe(commands_topic(SITE, GW), qos=1)
                r = await http.post(f"/api/v1/devices/{UID}/commands", json={"point": "flow_setpoint", "value": 70})
                assert r.status_code == 202, r.text
                sent = r.json()
                assert (sent["status"], sent["device"], sent["issued_by"], sent["read_back"], sent["via_hub"]) == (
                    "sent", UID, "tech9", None, True)
                assert decode_command((await next_command(sub))[0]).id == sent["id"]
            assert (await http.get(f"/api/v1/commands/{sent['id']}")).json() == sent
            r = await http.post(f"/api/v1/devices/{UID}/commands", json={"point": "flow_setpoint", "value": 29})
            assert r.status_code == 422 and "30..80 degC" in r.json()["detail"]
            for body in ({"point": "flow_setpoint"}, {"point": "flow_setpoint", "value": "hot"},
                         {"point": "bad name", "value": 50}, {"point": "flow_setpoint", "value": 50, "x": 1}):
                r = await http.post(f"/api/v1/devices/{UID}/commands", json=body)
                assert r.status_code == 422, (body, r.text)
            r = await http.post(f"/api/v1/devices/{SITE}.{GW}.nobody/commands",
                                json={"point": "flow_setpoint", "value": 50})
            assert r.status_code == 404
            assert (await http.get("/api/v1/commands/nope")).status_code == 404
            listed = (await http.get("/api/v1/commands")).json()
            assert [(c["status"], c["value"]) for c in listed] == [("refused_by_hub", 29.0), ("sent", 70.0)]
            assert len((await http.get("/api/v1/commands", params={"limit": 1})).json()) == 1
            assert len((await http.get("/api/v1/commands", params={"gateway": f"{SITE}.{GW}"})).json()) == 2
            assert (await http.get("/api/v1/commands", params={"gateway": f"{SITE}.other"})).json() == []
            assert (await http.get("/api/v1/commands", params={"device": f"{SITE}.{GW}.meter1"})).json() == []
            assert (await http.get("/api/v1/commands", params={"gateway": "no-dot"})).status_code == 422
            mosquitto.stop()
            await wait_until(lambda: not hub.ingest.subscribed.is_set(), what="the hub to lose the broker")
            r = await http.post(f"/api/v1/devices/{UID}/commands", json={"point": "flow_setpoint", "value": 50})
            assert r.status_code == 503, r.text
            newest = (await http.get("/api/v1/commands", params={"limit": 1})).json()[0]
            assert (newest["status"], newest["reason"], newest["value"]) == ("failed", "broker_unavailable", 50.0)
        async with httpx.AsyncClient(base_url=hub.api_url) as anonymous:
            r = await anonymous.post(f"/api/v1/devices/{UID}/commands", json={"point": "flow_setpoint", "value": 50})
            assert r.status_code == 401
