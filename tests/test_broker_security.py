"""Broker security with a real Mosquitto: the hub writes the password and ACL files, gateways get
their own logins by provisioning, and the broker enforces who may publish and read what."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from fleet.broker import BrokerAuth, Mosquitto
from fleet.procs import ReadyProcess
from hub.broker_access import GatewayLogin, acl_file_text, gateway_acl, hash_password, verify_password
from hub.errors import RequestRefused
from hub.identity import GatewayCredential
from hub.models import Device, Gateway, GatewayEvent, Reading
from hub.provisioning import Provisioned
from hub.service import Hub, running_hub
from protocol import topics
from tests import hubtools
from tests.parts import missing_part, running_broker

HUB_USER, HUB_PASSWORD = "twin-hub", "hub-secret-pw"


# -- the password-file format against the real mosquitto_passwd ----------------------------------


def test_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        missing_part("mosquitto_passwd", "apt-get install mosquitto")
    pw_file = tmp_path / "pw"
    pw_file.touch()
    subprocess.run([tool, "-b", str(pw_file), "gw", "s3cret pass"], check=True, timeout=10)
    user, hashed = pw_file.read_text().strip().split(":", 1)
    assert user == "gw"
    assert verify_password("s3cret pass", hashed)
    assert not verify_password("s3cret pasS", hashed)
    # The same salt gives byte for byte the line mosquitto_passwd wrote.
    salt = base64.b64decode(hashed.split("$")[3])
    assert len(salt) == 12
    assert hash_password("s3cret pass", salt) == hashed
    ours = hash_password("another")
    assert ours.startswith("$7$101$") and verify_password("another", ours) and ours != hash_password("another")


def test_acl_lists_only_own_topics() -> None:
    lines = gateway_acl("site-1", "gw-a")
    assert lines == ["topic write twin/v1/site-1/gw-a/telemetry", "topic write twin/v1/site-1/gw-a/status",
                     "topic write twin/v1/site-1/gw-a/events", "topic read twin/v1/site-1/gw-a/models",
                     "topic read twin/v1/site-1/gw-a/config", "topic read twin/v1/site-1/gw-a/commands"]
    text = acl_file_text("hub", [GatewayLogin("site-1", "gw-a", "site-1.gw-a", "$7$x")])
    blocks = text.split("\n\n")
    assert blocks[1].splitlines() == ["user hub", "topic read twin/+/+/+/telemetry", "topic read twin/+/+/+/status",
                                      "topic read twin/+/+/+/events", "topic write twin/+/+/+/models",
                                      "topic write twin/+/+/+/config", "topic write twin/+/+/+/commands"]
    assert blocks[2].splitlines() == ["user site-1.gw-a", *lines]
    assert "pattern" not in text and "#" not in text.split("\n", 1)[1]
    with pytest.raises(ValueError):
        acl_file_text("hub", [GatewayLogin("s", "g", "bad user\nuser hub", "$7$x")])


# -- a secured broker and a hub that owns its files -------------------------------------------------


@pytest.fixture
def secured_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto with allow_anonymous false and the hub's password and ACL files."""
    auth = BrokerAuth(tmp_path / "broker" / "passwd", tmp_path / "broker" / "acl")
    yield from running_broker(workdir=tmp_path / "mosquitto", auth=auth)


def secured_hub_config(tmp_path: Path, broker: Mosquitto) -> Any:
    assert broker.auth is not None
    return hubtools.hub_config(
        db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=broker.port,
        mqtt={"username": HUB_USER, "password": HUB_PASSWORD},
        broker_auth={"enabled": True, "password_file": str(broker.auth.password_file),
                     "acl_file": str(broker.auth.acl_file), "reload_pid_file": str(broker.pid_path)})


@contextlib.asynccontextmanager
async def secured_hub(tmp_path: Path, broker: Mosquitto, share_group: str | None = None) -> AsyncIterator[Hub]:
    config = secured_hub_config(tmp_path, broker)
    config.mqtt.share_group = share_group
    async with running_hub(config) as hub:
        yield hub


async def provision(hub: Hub, site: str, name: str) -> Provisioned:
    with hub.db.activate():
        issued = await hub.provisioning.create_gateway(site, name, "tech")
        return await hub.provisioning.claim(issued.code, "127.0.0.1")


def client(broker: Mosquitto, who: Provisioned | None = None, ident: str = "", password: str | None = None,
           **kw: Any) -> aiomqtt.Client:
    return aiomqtt.Client(broker.host, broker.port, identifier=ident or (who.client_id if who else "anon"),
                          username=who.username if who else None,
                          password=password if password is not None else (who.password if who else None), **kw)


def refused(exc: BaseException) -> bool:
    text = str(exc)
    return "Not authorized" in text or "code:5" in text or "code:135" in text or "code:134" in text


async def test_logins_enforced(tmp_path: Path, secured_broker: Mosquitto) -> None:
    async with secured_hub(tmp_path, secured_broker) as hub:
        assert hub.ingest.subscribed.is_set()  # the hub's own login works (and its subscriptions were granted)
        gw = await provision(hub, "site-1", "gw-a")
        async with client(secured_broker, gw) as ok:
            await ok.publish(topics.status_topic("site-1", "gw-a"), b"{}", qos=1)
        with pytest.raises(aiomqtt.MqttError) as wrong:
            async with client(secured_broker, gw, password=gw.password + "x"):
                pass
        assert refused(wrong.value), wrong.value
        with pytest.raises(aiomqtt.MqttError) as anonymous:
            async with client(secured_broker, ident="nobody"):
                pass
        assert refused(anonymous.value), anonymous.value
        # The hub's login with another password, and a made-up user, are refused too.
        with pytest.raises(aiomqtt.MqttError) as fake_hub:
            async with aiomqtt.Client(secured_broker.host, secured_broker.port, identifier="x",
                                      username=HUB_USER, password="guess"):
                pass
        assert refused(fake_hub.value)
    # Files: only the hub and the provisioned gateway, readable by owner and group only.
    assert secured_broker.auth is not None
    pw_lines = secured_broker.auth.password_file.read_text().splitlines()
    assert [line.split(":")[0] for line in pw_lines] == [HUB_USER, "site-1.gw-a"]
    assert gw.password not in secured_broker.auth.password_file.read_text()
    assert secured_broker.auth.password_file.stat().st_mode & 0o777 == 0o640
    assert secured_broker.auth.acl_file.stat().st_mode & 0o777 == 0o640


async def _stored(hub: Hub, site: str, gateway: str) -> int:
    with hub.db.activate():
        return await Reading.filter(device__gateway__name=gateway, device__gateway__site__name=site).count()


@pytest.mark.parametrize("share_group", [None, "hubs"])
async def test_gateway_cannot_publish_as_another(tmp_path: Path, secured_broker: Mosquitto,
                                                 share_group: str | None) -> None:
    # With a share group the hub subscribes $share/hubs/twin/+/+/+/telemetry: the ACL allows that too.
    async with secured_hub(tmp_path, secured_broker, share_group) as hub:
        a = await provision(hub, "site-1", "gw-a")
        await provision(hub, "site-1", "gw-b")
        forged = hubtools.telemetry_payload("site-1", "gw-b", hubtools.series("boiler-1", "flow_temp", 5))
        forged_in_own_topic = forged  # names gw-b in the payload, sent on gw-a's own topic
        legit = hubtools.telemetry_payload("site-1", "gw-a", hubtools.series("boiler-1", "flow_temp", 3))
        async with client(secured_broker, a) as pub:
            # On B's topic: the broker drops it (the ACL has no write for A there).
            await pub.publish(topics.telemetry_topic("site-1", "gw-b"), forged, qos=1)
            await pub.publish(topics.channel_topic("events", "site-1", "gw-b"),
                              hubtools.event_payload("site-1", "gw-b", "buffer_thinned"), qos=1)
            # On its own topic but naming B: the broker passes it, the hub refuses it (site_mismatch).
            await pub.publish(topics.telemetry_topic("site-1", "gw-a"), forged_in_own_topic, qos=1)
            # Then A's own data, in order behind the forgeries on the same connection.
            await pub.publish(topics.telemetry_topic("site-1", "gw-a"), legit, qos=1)
            await hubtools.wait_until(lambda: hub.stats.readings_stored >= 3, 10, "gw-a's own readings")
        await asyncio.sleep(0.3)  # anything else in flight would have arrived by now
        assert await _stored(hub, "site-1", "gw-a") == 3
        assert await _stored(hub, "site-1", "gw-b") == 0
        with hub.db.activate():
            assert await Device.filter(gateway__name="gw-b").count() == 0
            gw_b = await Gateway.get(name="gw-b")
            assert await GatewayEvent.filter(gateway_id=gw_b.id).count() == 0
        assert hub.stats.readings_stored == 3


async def test_gateway_reads_only_its_own_downlink(tmp_path: Path, secured_broker: Mosquitto) -> None:
    async with secured_hub(tmp_path, secured_broker) as hub:
        a = await provision(hub, "site-1", "gw-a")
        b = await provision(hub, "site-1", "gw-b")
        hub_login = aiomqtt.Client(secured_broker.host, secured_broker.port, identifier="test-hub-2",
                                   username=HUB_USER, password=HUB_PASSWORD)
        async with client(secured_broker, a) as sub_a, client(secured_broker, b) as sub_b, hub_login as h:
            # A asks for B's commands and config, and for everybody's: the broker delivers only A's own.
            for t in (topics.commands_topic("site-1", "gw-b"), topics.config_topic("site-1", "gw-b"),
                      "twin/+/+/+/commands", "twin/#", topics.commands_topic("site-1", "gw-a")):
                await sub_a.subscribe(t, qos=1)
            await sub_b.subscribe(topics.commands_topic("site-1", "gw-b"), qos=1)
            await h.publish(topics.commands_topic("site-1", "gw-b"), b"for-b", qos=1)
            await h.publish(topics.config_topic("site-1", "gw-b"), b"cfg-b", qos=1)
            await h.publish(topics.commands_topic("site-1", "gw-a"), b"for-a", qos=1)
            got_b = await asyncio.wait_for(anext(aiter(sub_b.messages)), 5)
            assert got_b.payload == b"for-b"
            got_a: list[tuple[str, Any]] = []

            async def read_a() -> None:
                async for m in sub_a.messages:
                    got_a.append((m.topic.value, m.payload))

            task = asyncio.create_task(read_a())
            await hubtools.wait_until(lambda: len(got_a) >= 1, 5, "A's own command")
            await asyncio.sleep(0.5)  # B's messages would have arrived by now
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # A's own command (once per matching subscription); never anything of B.
            assert (topics.commands_topic("site-1", "gw-a"), b"for-a") in got_a
            assert all(t.startswith("twin/v1/site-1/gw-a/") for t, _ in got_a), got_a
            assert not [p for _, p in got_a if p in (b"for-b", b"cfg-b")]
            # A may not write downlink topics either (it cannot send itself or B commands).
            await sub_a.publish(topics.commands_topic("site-1", "gw-b"), b"from-a", qos=1)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(aiter(sub_b.messages)), 0.7)


async def test_revoked_gateway_is_cut_off(tmp_path: Path, secured_broker: Mosquitto) -> None:
    async with secured_hub(tmp_path, secured_broker) as hub:
        a = await provision(hub, "site-1", "gw-a")
        b = await provision(hub, "site-1", "gw-b")
        async with client(secured_broker, a) as conn_a, client(secured_broker, b) as conn_b:
            await conn_a.subscribe(topics.commands_topic("site-1", "gw-a"), qos=1)
            ended = asyncio.Event()

            async def read_a() -> None:
                try:
                    async for _ in conn_a.messages:
                        pass
                except aiomqtt.MqttError:
                    ended.set()

            task = asyncio.create_task(read_a())
            reloads = hub.provisioning.access.reloads if hub.provisioning.access else 0
            with hub.db.activate():
                done = await hub.provisioning.revoke("site-1", "gw-a", "staff-1")
                assert done.credentials_revoked
                assert await hub.provisioning.credential_state("site-1", "gw-a") == "revoked"
                row = await GatewayCredential.get(username="site-1.gw-a")
                assert row.revoked_by == "staff-1"
            assert hub.provisioning.access is not None and hub.provisioning.access.reloads == reloads + 1
            # The live connection is dropped on the reload...
            await asyncio.wait_for(ended.wait(), 5)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # ...B and the hub stay connected...
            await conn_b.publish(topics.telemetry_topic("site-1", "gw-b"),
                                 hubtools.telemetry_payload("site-1", "gw-b", hubtools.series("m", "x", 2)), qos=1)
            await hubtools.wait_until(lambda: hub.stats.readings_stored == 2, 10, "gw-b's readings after the revoke")
            assert hub.ingest.subscribed.is_set()
        # ...and A cannot come back with its old password.
        with pytest.raises(aiomqtt.MqttError) as again:
            async with client(secured_broker, a):
                pass
        assert refused(again.value), again.value
        assert "site-1.gw-a" not in secured_broker.auth.acl_file.read_text()  # type: ignore[union-attr]
        # A new claim code brings it back, with a new password.
        with hub.db.activate():
            issued = await hub.provisioning.issue_code("site-1", "gw-a", "tech")
            back = await hub.provisioning.claim(issued.code)
        assert back.password != a.password
        async with client(secured_broker, back):
            pass


async def test_hub_restart_rewrites_files_from_database(tmp_path: Path, secured_broker: Mosquitto) -> None:
    async with secured_hub(tmp_path, secured_broker) as hub:
        a = await provision(hub, "site-1", "gw-a")
    assert secured_broker.auth is not None
    # A lost or hand-edited file is put right at the next start.
    secured_broker.auth.password_file.write_text("")
    secured_broker.auth.acl_file.write_text("")
    secured_broker.reload()
    async with secured_hub(tmp_path, secured_broker), client(secured_broker, a):
        pass
    assert "site-1.gw-a" in secured_broker.auth.acl_file.read_text()


async def test_provisioned_agent_runs_and_is_cut_off_when_revoked(tmp_path: Path, secured_broker: Mosquitto) -> None:
    """Field workflow end to end: create the gateway at the hub, `twin-edge provision` (a real process)
    writes edge.toml, `twin-edge run` (a real process) polls a simulated boiler over Modbus TCP and
    its readings reach the hub through the secured broker; revoking it stops them."""
    procs: list[ReadyProcess] = []
    try:
        sim = ReadyProcess.python("twin-sim", "firmware_sim.cli", "--boilers", "1", "--meters", "0",
                                  "--base-port", "0", "--seed", "3", log_path=tmp_path / "sim.log")
        procs.append(sim.start())
        boiler = sim.ready["devices"][0]
        async with secured_hub(tmp_path, secured_broker) as hub:
            with hub.db.activate():
                issued = await hub.provisioning.create_gateway(
                    "site-1", "gw-1", "tech", devices=[{"name": "boiler-1", "profile": "sim-boiler",
                                                       "host": "127.0.0.1", "port": boiler["port"],
                                                       "poll_interval_s": 0.2}])
            out = tmp_path / "gw" / "edge.toml"
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edge.cli", "provision", "--hub", hub.api_url, "--code", issued.code,
                "--out", str(out), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            with out.open("a") as fh:  # a free metrics port instead of the default 9108 (parallel tests)
                fh.write("\n[metrics]\nport = 0\n")
            edge = ReadyProcess.python("twin-edge", "edge.cli", "run", "--config", str(out),
                                       log_path=tmp_path / "edge.log")
            procs.append(await asyncio.to_thread(edge.start))
            await hubtools.wait_until(lambda: hub.stats.readings_stored >= 20, 30, "the agent's readings at the hub")
            assert await _stored(hub, "site-1", "gw-1") >= 20

            with hub.db.activate():
                await hub.provisioning.revoke("site-1", "gw-1", "staff")
            await asyncio.sleep(1.0)  # what was in flight when the broker dropped the connection
            stopped_at = hub.stats.readings_stored
            await asyncio.sleep(2.0)  # the agent keeps polling and retrying, but nothing gets through
            assert hub.stats.readings_stored == stopped_at
        assert edge.proc is not None and edge.proc.poll() is None  # still running, buffering
        log = secured_broker.log_path.read_text()
        assert "twin-edge-site-1-gw-1" in log and "not authorised" in log
    finally:
        for p in reversed(procs):
            await asyncio.to_thread(p.stop)


async def test_hub_starts_when_the_broker_cannot_be_reloaded(tmp_path: Path, secured_broker: Mosquitto) -> None:
    """The files are written even when the reload fails (a broker that is down reads them when it
    starts); the hub starts and connects once the broker has them."""
    config = secured_hub_config(tmp_path, secured_broker)
    config.broker_auth.reload_pid_file = tmp_path / "no-such.pid"
    hub = Hub(config)
    await hub.start(wait_subscribed=False)
    try:
        assert secured_broker.auth is not None
        assert secured_broker.auth.password_file.read_text().startswith(f"{HUB_USER}:$7$101$")
        await asyncio.sleep(0.5)
        assert not hub.ingest.subscribed.is_set()  # the broker still has the empty files of its start
        secured_broker.reload()
        await hubtools.wait_until(hub.ingest.subscribed.is_set, 10, "the hub's subscription after the reload")
        # A claim, though, needs the broker to take the new login now: refused, nothing issued.
        with hub.db.activate():
            issued = await hub.provisioning.create_gateway("site-1", "gw-a", "tech")
            with pytest.raises(RequestRefused) as info:
                await hub.provisioning.claim(issued.code)
            assert info.value.status == 503
            assert await GatewayCredential.all().count() == 0
            assert await hub.provisioning.credential_state("site-1", "gw-a") == "none"
        # The code is still good once the broker can be told again.
        config.broker_auth.reload_pid_file = secured_broker.pid_path
        with hub.db.activate():
            got = await hub.provisioning.claim(issued.code)
        async with client(secured_broker, got):
            pass
    finally:
        await hub.stop()
