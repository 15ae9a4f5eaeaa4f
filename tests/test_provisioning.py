"""Provisioning with one-time claim codes: the code's lifecycle at the hub (used, expired, unknown,
replaced, two claims at once) and ``twin-edge provision`` as a real process against a real hub."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edge.config import load_config as load_edge_config
from fleet.broker import Mosquitto
from fleet.postgres import PostgresCluster
from hub import gateway_config
from hub.broker_access import verify_password
from hub.db import Database
from hub.errors import RequestRefused
from hub.identity import ClaimCode, GatewayCredential
from hub.models import Gateway
from hub.provisioning import BrokerEndpoint, Provisioning, code_hash, new_claim_code, normalise_code
from hub.provisioning_config import ProvisioningConfig
from hub.service import running_hub
from tests import hubtools

REPO = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self) -> None:
        self.now = hubtools.T0

    def __call__(self) -> int:
        return self.now


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite://{tmp_path}/hub.db"
    else:
        cluster: PostgresCluster = request.getfixturevalue("postgres")
        url = cluster.create_database(f"prov_{os.getpid()}_{abs(hash(str(tmp_path))) % 10**8}")
    database = await Database(url).open()
    try:
        with database.activate():
            yield database
    finally:
        await database.close()


def provisioning(db: Database, clock: Clock, ttl_s: int = 3600) -> Provisioning:
    return Provisioning(db, ProvisioningConfig(claim_code_ttl_s=ttl_s),
                        BrokerEndpoint("broker.test", 1883, False, None), clock=clock)


async def refused(coro: Any) -> RequestRefused:
    with pytest.raises(RequestRefused) as info:
        await coro
    return info.value


def test_toml_values() -> None:
    import tomllib

    from edge.provision import toml_value

    value = {"a b": 'quote " back \\ tab \t ü', "n": [1, 2.5, True], "t": {"x": -3}}
    assert tomllib.loads(f"v = {toml_value(value)}")["v"] == value
    with pytest.raises(ValueError):
        toml_value(float("nan"))


def test_codes_are_random_grouped_and_forgiving() -> None:
    codes = {new_claim_code() for _ in range(200)}
    assert len(codes) == 200
    code = codes.pop()
    assert len(code) == 24 and code.count("-") == 4
    assert code_hash(code) == code_hash(code.lower().replace("-", " "))
    assert normalise_code("abcd-0o1i-lxyz") == "ABCD00111XYZ"
    assert len(code_hash(code)) == 64 and code not in code_hash(code)


async def test_claim_code_lifecycle(db: Database) -> None:
    clock = Clock()
    prov = provisioning(db, clock)
    devices = [{"name": "boiler-1", "profile": "sim-boiler", "host": "127.0.0.1", "port": 5020}]
    issued = await prov.create_gateway("site-1", "gw-1", "tech-1", devices=devices)
    assert issued.expires_ms == hubtools.T0 + 3600 * 1000
    # Only the hash is stored.
    row = await ClaimCode.get(gateway__name="gw-1")
    assert row.code_hash == code_hash(issued.code) and row.created_by == "tech-1" and row.used_ms is None
    assert issued.code not in str(await ClaimCode.all().values())
    # A gateway that exists already cannot be created again.
    assert (await refused(prov.create_gateway("site-1", "gw-1", "tech-1"))).status == 409
    # Unknown code: 403, nothing issued.
    assert (await refused(prov.claim(new_claim_code()))).status == 403
    assert await GatewayCredential.all().count() == 0

    clock.now += 1000
    got = await prov.claim(issued.code.lower(), "10.0.0.7")
    assert (got.site, got.gateway, got.username, got.client_id) == ("site-1", "gw-1", "site-1.gw-1",
                                                                   "twin-edge-site-1-gw-1")
    assert got.config_version == 1 and got.config == {"devices": devices}
    assert (got.broker.host, got.broker.port) == ("broker.test", 1883)
    cred = await GatewayCredential.get(username="site-1.gw-1")
    assert verify_password(got.password, cred.password_hash) and got.password not in cred.password_hash
    assert cred.issued_by == "tech-1"
    row = await ClaimCode.get(id=row.id)
    assert (row.used_ms, row.used_from) == (hubtools.T0 + 1000, "10.0.0.7")

    # Used: 410, and the credentials stay what they were.
    again = await refused(prov.claim(issued.code))
    assert again.status == 410 and "used" in again.message
    assert (await GatewayCredential.get(username="site-1.gw-1")).password_hash == cred.password_hash

    # Expired: 410 at the expiry instant and after.
    second = await prov.issue_code("site-1", "gw-1", "tech-2")
    clock.now = second.expires_ms
    expired = await refused(prov.claim(second.code))
    assert expired.status == 410 and "expired" in expired.message
    assert await GatewayCredential.filter(gateway__name="gw-1").count() == 1

    # A newer code replaces an unused older one.
    third = await prov.issue_code("site-1", "gw-1", "tech-2")
    fourth = await prov.issue_code("site-1", "gw-1", "tech-2")
    replaced = await refused(prov.claim(third.code))
    assert replaced.status == 410 and "replaced" in replaced.message
    newer = await prov.claim(fourth.code)
    assert newer.password != got.password
    assert not verify_password(got.password, (await GatewayCredential.get(username="site-1.gw-1")).password_hash)

    # Revoking invalidates unused codes too; unknown gateways are 404.
    fifth = await prov.issue_code("site-1", "gw-1", "tech-2")
    done = await prov.revoke("site-1", "gw-1", "staff-1")
    assert (done.credentials_revoked, done.claim_codes_invalidated) == (True, 1)
    assert (await refused(prov.claim(fifth.code))).status == 410
    assert (await refused(prov.revoke("site-1", "gw-9", "staff-1"))).status == 404
    assert (await refused(prov.issue_code("site-9", "gw-1", "tech"))).status == 404


async def test_invalid_device_configuration_creates_nothing(db: Database) -> None:
    prov = provisioning(db, Clock())
    err = await refused(prov.create_gateway("site-1", "gw-1", "tech", devices=[{"profile": "sim-boiler"}]))
    assert err.status == 422 and "name" in err.message
    assert await Gateway.all().count() == 0 and await ClaimCode.all().count() == 0
    # Without devices: the gateway has no configuration until staff set one.
    issued = await prov.create_gateway("site-1", "gw-1", "tech")
    got = await prov.claim(issued.code)
    assert got.config is None and got.config_version is None
    assert await gateway_config.current_config("site-1", "gw-1") is None


async def test_concurrent_claims_exactly_one_wins(db: Database) -> None:
    prov = provisioning(db, Clock())
    issued = await prov.create_gateway("site-1", "gw-1", "tech")
    # Two Provisioning objects (two hub processes would not share a lock either).
    other = provisioning(db, Clock())
    results = await asyncio.gather(*(p.claim(issued.code, f"10.0.0.{i}") for i, p in
                                     enumerate([prov, other, prov, other, other, prov])),
                                   return_exceptions=True)
    wins = [r for r in results if not isinstance(r, BaseException)]
    losses = [r for r in results if isinstance(r, RequestRefused)]
    assert len(wins) == 1 and len(losses) == 5, results
    assert {r.status for r in losses} == {410}
    cred = await GatewayCredential.get(username="site-1.gw-1")
    assert verify_password(wins[0].password, cred.password_hash)
    assert await GatewayCredential.all().count() == 1


# -- twin-edge provision, a real process against a running hub ------------------------------------


async def run_cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge.cli", "provision", *args, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_provision_cli_writes_private_config(tmp_path: Path, mosquitto: Mosquitto) -> None:
    cfg = hubtools.hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port,
                              provisioning={"mqtt_host": "broker.example.net", "mqtt_port": 1884})
    devices = [{"name": "boiler-1", "profile": "sim-boiler", "host": "127.0.0.1", "port": 5020,
                "poll_interval_s": 2.5, "points": ["flow_temp", "return_temp"]},
               {"name": "meter-1", "profile": "sim-meter", "host": "127.0.0.1"}]
    async with running_hub(cfg) as hub:
        with hub.db.activate():
            bad = await hub.provisioning.create_gateway(
                "site-1", "gw-bad", "tech", devices=[{"name": "boiler-1", "profile": "no-such-profile", "host": "h"}])
            issued = await hub.provisioning.create_gateway("site-1", "gw-1", "tech", devices=devices)
        gw_dir = tmp_path / "gateway"
        out = gw_dir / "etc" / "edge.toml"
        rc, stdout, stderr = await run_cli("--hub", hub.api_url, "--code", issued.code, "--out", str(out), cwd=tmp_path)
        assert rc == 0, stderr
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        assert "provisioned gateway site-1.gw-1" in stdout and "2 device(s), configuration version 1" in stdout
        with hub.db.activate():
            cred = await GatewayCredential.get(username="site-1.gw-1")
        edge_cfg, profiles = load_edge_config(out)
        assert (edge_cfg.gateway.site, edge_cfg.gateway.name) == ("site-1", "gw-1")
        assert (edge_cfg.mqtt.host, edge_cfg.mqtt.port, edge_cfg.mqtt.username) == ("broker.example.net", 1884,
                                                                                    "site-1.gw-1")
        assert edge_cfg.client_id == "twin-edge-site-1-gw-1"
        assert edge_cfg.mqtt.password is not None and verify_password(edge_cfg.mqtt.password, cred.password_hash)
        assert edge_cfg.mqtt.password not in stdout + stderr  # never printed
        assert [d.name for d in edge_cfg.devices] == ["boiler-1", "meter-1"]
        assert edge_cfg.devices[0].poll_interval_s == 2.5 and edge_cfg.devices[0].points == ["flow_temp", "return_temp"]
        assert set(profiles) == {"boiler-1", "meter-1"}
        assert [p.name for p in out.parent.iterdir()] == ["edge.toml"]  # no temp or probe file left
        before = out.read_bytes()

        # An existing identity is not replaced without --force (and the code is not even used)...
        with hub.db.activate():
            fresh = await hub.provisioning.issue_code("site-1", "gw-1", "tech")
        rc, _, stderr = await run_cli("--hub", hub.api_url, "--code", fresh.code, "--out", str(out), cwd=tmp_path)
        assert rc == 1 and "exists already" in stderr and "--force" in stderr
        assert out.read_bytes() == before
        # ...a used code is refused with a clear message...
        rc, _, stderr = await run_cli("--hub", hub.api_url, "--code", issued.code, "--out", str(tmp_path / "x.toml"),
                                      cwd=tmp_path)
        assert rc == 1 and "used already" in stderr and not (tmp_path / "x.toml").exists()
        # ...and --force replaces it (new password, still 0600).
        rc, _, stderr = await run_cli("--hub", hub.api_url, "--code", fresh.code, "--out", str(out), "--force",
                                      cwd=tmp_path)
        assert rc == 0, stderr
        assert stat.S_IMODE(out.stat().st_mode) == 0o600 and out.read_bytes() != before

        # A device configuration this gateway cannot load (a profile it does not have):
        # the identity is written anyway, without the devices, with a warning.
        bad_out = tmp_path / "bad" / "edge.toml"
        rc, stdout, stderr = await run_cli("--hub", hub.api_url, "--code", bad.code, "--out", str(bad_out),
                                           cwd=tmp_path)
        assert rc == 0, stderr
        assert "warning" in stderr and "no devices" in stderr
        bad_cfg, _ = load_edge_config(bad_out)
        assert bad_cfg.gateway.name == "gw-bad" and bad_cfg.devices == [] and bad_cfg.mqtt.username == "site-1.gw-bad"

    # The hub is gone: a clear error, nothing written.
    rc, _, stderr = await run_cli("--hub", hub.api_url, "--code", fresh.code, "--out", str(tmp_path / "y.toml"),
                                  "--timeout", "5", cwd=tmp_path)
    assert rc == 1 and "cannot reach the hub" in stderr and not (tmp_path / "y.toml").exists()


async def test_provision_cli_with_tls_broker(tmp_path: Path, mosquitto: Mosquitto) -> None:
    from fleet.tlsca import main as tlsca_main

    pki = tmp_path / "pki"
    assert tlsca_main([str(pki), "--host", "broker.example.net", "--name", "broker"]) == 0
    cfg = hubtools.hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port,
                              provisioning={"mqtt_host": "broker.example.net", "mqtt_port": 8883, "mqtt_tls": True,
                                            "mqtt_ca_file": str(pki / "ca.pem")})
    async with running_hub(cfg) as hub:
        with hub.db.activate():
            issued = await hub.provisioning.create_gateway("site-1", "gw-tls", "tech")
        out = tmp_path / "gw" / "edge.toml"
        rc, stdout, stderr = await run_cli("--hub", hub.api_url, "--code", issued.code, "--out", str(out),
                                           cwd=tmp_path)
    assert rc == 0, stderr
    assert "no device configuration yet" in stdout
    edge_cfg, _ = load_edge_config(out)
    assert (edge_cfg.mqtt.tls, edge_cfg.mqtt.port) == (True, 8883)
    assert edge_cfg.mqtt.ca_file == out.parent / "mqtt-ca.pem"
    assert (out.parent / "mqtt-ca.pem").read_text() == (pki / "ca.pem").read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
