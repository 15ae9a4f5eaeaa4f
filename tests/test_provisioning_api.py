"""The provisioning routes over HTTP: who may create gateways, issue codes and revoke; the public
claim route's answers, its rate limit, and two claims at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from fleet.broker import Mosquitto
from hub.broker_access import verify_password
from hub.identity import GatewayCredential
from hub.service import running_hub
from tests import hubtools


async def test_provisioning_routes(tmp_path: Path, mosquitto: Mosquitto) -> None:
    cfg = hubtools.hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port,
                              provisioning={"claim_attempts_per_minute": 6, "mqtt_host": "broker.example.net"})
    async with running_hub(cfg) as hub:
        tech = hubtools.BearerAuth("tech", await hubtools.add_user(hub.db, "tech", "technician"))
        viewer = hubtools.BearerAuth("viewer", await hubtools.add_user(hub.db, "viewer", "viewer"))
        staff = hubtools.BearerAuth("staff", await hubtools.add_user(hub.db, "staff", "staff"))
        body = {"site": "site-1", "name": "gw-1",
                "devices": [{"name": "boiler-1", "profile": "sim-boiler", "host": "10.0.0.5", "port": 502}]}
        async with httpx.AsyncClient(base_url=hub.api_url, timeout=10) as http:
            assert (await http.post("/api/v1/gateways", json=body)).status_code == 401
            assert (await http.post("/api/v1/gateways", json=body, auth=viewer)).status_code == 403
            created = await http.post("/api/v1/gateways", json=body, auth=tech)
            assert created.status_code == 201, created.text
            assert created.headers["cache-control"] == "no-store"
            doc = created.json()
            assert (doc["gateway"], doc["site"], doc["name"]) == ("site-1.gw-1", "site-1", "gw-1")
            code = doc["claim_code"]
            assert len(code) == 24 and doc["expires_at"].endswith("Z")
            assert (await http.post("/api/v1/gateways", json=body, auth=tech)).status_code == 409
            bad = await http.post("/api/v1/gateways", json={**body, "name": "gw-2", "devices": [{"x": 1}]}, auth=tech)
            assert bad.status_code == 422
            # The new gateway is listed (no data yet).
            listed = (await http.get("/api/v1/gateways", auth=viewer)).json()
            assert [g["id"] for g in listed] == ["site-1.gw-1"]

            # Public: no sign-in, the code is the credential.
            got = await http.post("/api/v1/provision", json={"code": code.lower()})
            assert got.status_code == 200, got.text
            assert got.headers["cache-control"] == "no-store"
            answer = got.json()
            assert answer["gateway"] == {"site": "site-1", "name": "gw-1", "client_id": "twin-edge-site-1-gw-1"}
            mqtt = answer["mqtt"]
            assert (mqtt["host"], mqtt["port"], mqtt["tls"], mqtt["ca_pem"], mqtt["username"]) == (
                "broker.example.net", mosquitto.port, False, None, "site-1.gw-1")
            assert answer["config"] == {"version": 1, "devices": body["devices"], "serial_ports": []}
            with hub.db.activate():
                cred = await GatewayCredential.get(username="site-1.gw-1")
            assert verify_password(mqtt["password"], cred.password_hash) and cred.issued_by == "tech"

            used = await http.post("/api/v1/provision", json={"code": code})
            assert used.status_code == 410 and "used" in used.json()["detail"]
            unknown = await http.post("/api/v1/provision", json={"code": "AAAA-BBBB-CCCC-DDDD-EEEE"})
            assert unknown.status_code == 403 and "unknown claim code" in unknown.json()["detail"]
            assert (await http.post("/api/v1/provision", json={"code": ""})).status_code == 422

            # A fresh code (field roles), revoked (staff only).
            assert (await http.post("/api/v1/gateways/site-1.gw-9/claim-code", auth=tech)).status_code == 404
            fresh = await http.post("/api/v1/gateways/site-1.gw-1/claim-code", auth=tech)
            assert fresh.status_code == 201
            assert (await http.post("/api/v1/gateways/site-1.gw-1/revoke", auth=tech)).status_code == 403
            revoked = await http.post("/api/v1/gateways/site-1.gw-1/revoke", auth=staff)
            assert revoked.status_code == 200
            assert revoked.json() == {"gateway": "site-1.gw-1", "credentials_revoked": True,
                                      "claim_codes_invalidated": 1}
            gone = await http.post("/api/v1/provision", json={"code": fresh.json()["claim_code"]})
            assert gone.status_code == 410

            # 4 attempts so far from 127.0.0.1; the limit is 6 a minute, then 429 with Retry-After.
            statuses = [(await http.post("/api/v1/provision", json={"code": "AAAA"})).status_code for _ in range(4)]
            assert statuses == [403, 403, 429, 429]
            limited = await http.post("/api/v1/provision", json={"code": "AAAA"})
            assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 61


async def test_two_claims_at_once_over_http(tmp_path: Path, mosquitto: Mosquitto) -> None:
    cfg = hubtools.hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port)
    async with running_hub(cfg) as hub:
        async with httpx.AsyncClient(base_url=hub.api_url, timeout=10) as http:
            created = await http.post("/api/v1/gateways", json={"site": "site-1", "name": "gw-1"},
                                      auth=hubtools.admin_auth())
            code = created.json()["claim_code"]
            answers = await asyncio.gather(*(http.post("/api/v1/provision", json={"code": code}) for _ in range(4)))
        assert sorted(a.status_code for a in answers) == [200, 410, 410, 410]
        winner = next(a for a in answers if a.status_code == 200).json()
        with hub.db.activate():
            cred = await GatewayCredential.get(username="site-1.gw-1")
        assert verify_password(winner["mqtt"]["password"], cred.password_hash)
        assert winner["config"] is None
