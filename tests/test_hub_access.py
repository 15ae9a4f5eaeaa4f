"""Users, sign-in and the access rule of every route (issue 7, item 1).

The policy below is written out by hand: a new route that is not in it fails
``test_every_route_is_in_the_policy``, and a route whose guard does not match it fails the
route × role walk, which calls every route of the OpenAPI document as every role and as nobody.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from hub import tokens, users
from hub.api.access import RateLimiter
from hub.db import Database
from tests.hubtools import ROLE_PASSWORDS, T0, BearerAuth, api_app, database_with_role_users

NOW = T0
ROLES = {"A": "admin", "S": "staff", "T": "technician", "V": "viewer"}
PASSWORDS = ROLE_PASSWORDS

# (method, path) -> roles allowed: A admin, S staff, T technician, V viewer; "-" public.
POLICY: dict[tuple[str, str], str] = {
    ("POST", "/api/v1/auth/token"): "-",
    ("GET", "/api/v1/auth/me"): "ASTV",
    ("GET", "/api/v1/users"): "A",
    ("POST", "/api/v1/users"): "A",
    ("PATCH", "/api/v1/users/{username}"): "A",
    ("GET", "/api/v1/health"): "-",
    ("GET", "/api/v1/devices"): "ASTV",
    ("GET", "/api/v1/devices/{device_id}"): "ASTV",
    ("GET", "/api/v1/devices/{device_id}/latest"): "ASTV",
    ("GET", "/api/v1/devices/{device_id}/readings"): "ASTV",
    ("GET", "/api/v1/gateways"): "ASTV",
    ("POST", "/api/v1/gateways"): "AST",
    ("GET", "/api/v1/gateways/{gateway_id}/events"): "ASTV",
    ("GET", "/api/v1/devices/{device_id}/anomalies"): "ASTV",
    ("GET", "/api/v1/devices/{device_id}/health"): "ASTV",
    ("GET", "/api/v1/devices/{device_id}/twin.svg"): "ASTV",
    ("GET", "/api/v1/devices/{device_id}/twin.png"): "ASTV",
    ("POST", "/api/v1/models"): "AS",
    ("GET", "/api/v1/models"): "ASTV",
    ("GET", "/api/v1/models/{name}/{version}"): "ASTV",
    ("GET", "/api/v1/models/{name}/{version}/file"): "AS",
    ("PUT", "/api/v1/model-assignments"): "AS",
    ("DELETE", "/api/v1/model-assignments"): "AS",
    ("GET", "/api/v1/model-assignments"): "ASTV",
    ("GET", "/api/v1/gateways/{gateway_id}/models"): "ASTV",
    ("GET", "/api/v1/alerts"): "ASTV",
    ("GET", "/api/v1/alerts/contacts"): "ASTV",
    ("GET", "/api/v1/alerts/{alert_id}"): "ASTV",
    ("POST", "/api/v1/alerts/{alert_id}/ack"): "AST",
    ("POST", "/api/v1/alerts/{alert_id}/clear"): "AST",
    ("GET", "/api/v1/tariffs"): "AS",
    ("POST", "/api/v1/tariffs"): "AS",
    ("POST", "/api/v1/tariff-assignments"): "AS",
    ("GET", "/api/v1/tariff-assignments"): "AS",
    ("POST", "/api/v1/meters/{meter_id}/readings"): "AST",
    ("GET", "/api/v1/meters/{meter_id}/cost"): "AS",
    ("POST", "/api/v1/statements"): "AS",
    ("GET", "/api/v1/statements"): "AS",
    ("GET", "/api/v1/statements/{number}.html"): "AS",
    ("GET", "/api/v1/statements/{number}.pdf"): "AS",
    ("GET", "/api/v1/statements/{number}"): "AS",
    ("POST", "/api/v1/statements/{number}/send"): "AS",
    ("POST", "/api/v1/statements/{number}/checkout"): "AS",
    ("POST", "/api/v1/payments/stripe/webhook"): "-",
    ("GET", "/api/v1/gateways/{gateway_id}/config"): "AST",
    ("PUT", "/api/v1/gateways/{gateway_id}/config"): "AST",
    ("POST", "/api/v1/devices/{device_id}/commands"): "AST",
    ("GET", "/api/v1/commands"): "AST",
    ("GET", "/api/v1/commands/{command_id}"): "AST",
    ("POST", "/api/v1/gateways/{gateway_id}/claim-code"): "AST",
    ("POST", "/api/v1/provision"): "-",
    ("POST", "/api/v1/gateways/{gateway_id}/revoke"): "AS",
    ("GET", "/api/v1/sites/{site}/report.pdf"): "ASTV",
    ("GET", "/api/v1/sites/{site}/report.png"): "ASTV",
    ("GET", "/api/v1/fleet/summary"): "ASTV",
    ("GET", "/api/v1/stream/fleet"): "ASTV",
    ("POST", "/api/v1/whatif"): "AST",
}

# Values for path parameters: plausible enough to pass validation where possible; the walk is
# about who gets in, so 404 / 422 count as "let in".
PATH_VALUES = {"device_id": "plant1.gw1.boiler1", "gateway_id": "plant1.gw1", "name": "sim-boiler-anomaly",
               "version": "1", "alert_id": "1", "meter_id": "plant1.gw1.meter1", "number": "ST-2026-000001",
               "command_id": "c-1", "username": "nobody", "site": "plant1"}


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    async with database_with_role_users(tmp_path / "hub.db") as database:
        yield database


make_app = api_app


def client(app: FastAPI, auth: httpx.Auth | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub", auth=auth)


async def sign_in(http: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    return await http.post("/api/v1/auth/token", data={"username": username, "password": password})


def test_every_route_is_in_the_policy(tmp_path: Path) -> None:
    app = make_app(Database(f"sqlite://{tmp_path / 'x.db'}"))
    schema = app.openapi()
    found = {(m.upper(), p): "".join(k for k, v in ROLES.items() if v in op["x-roles"]) or "-"
             for p, ops in schema["paths"].items() for m, op in ops.items()}
    assert set(found) == set(POLICY), f"not in POLICY: {set(found) - set(POLICY)}; gone: {set(POLICY) - set(found)}"
    wrong = {k: (found[k], POLICY[k]) for k in POLICY if found[k] != POLICY[k]}
    assert wrong == {}, "declared (x-roles) vs policy"
    # Public routes say why; guarded ones document 401 and 403.
    for p, ops in schema["paths"].items():
        for op in ops.values():
            if op["x-roles"]:
                assert {"401", "403"} <= set(op["responses"]), p
            else:
                assert len(op["x-public"]) > 10, p


def test_a_route_without_a_guard_is_refused(tmp_path: Path) -> None:
    from fastapi import APIRouter

    from hub.api.access import check_routes

    router = APIRouter()

    @router.get("/api/v1/forgotten")
    async def forgotten() -> dict[str, str]:
        return {}

    with pytest.raises(RuntimeError, match="forgotten: 0 guards"):
        check_routes(router.routes)


async def test_route_by_role_walk(db: Database) -> None:
    app = make_app(db)
    schema = app.openapi()
    async with client(app) as http:
        headers: dict[str, dict[str, str]] = {"": {}}
        for role, password in PASSWORDS.items():
            answer = await sign_in(http, role, password)
            assert answer.status_code == 200, answer.text
            assert answer.json()["role"] == role and answer.json()["token_type"] == "bearer"
            headers[role] = {"Authorization": f"Bearer {answer.json()['access_token']}"}
        calls = 0
        for path, ops in schema["paths"].items():
            url = re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path)
            for method in ops:
                allowed = {ROLES[c] for c in POLICY[(method.upper(), path)] if c != "-"}
                for who, hdrs in headers.items():
                    kwargs: dict[str, object] = {"headers": hdrs}
                    if method in ("post", "put", "patch"):
                        kwargs["json"] = {}
                    if path == "/api/v1/auth/token":
                        continue  # signing in is tested on its own below
                    r = await http.request(method.upper(), url, **kwargs)  # type: ignore[arg-type]
                    calls += 1
                    label = f"{method.upper()} {path} as {who or 'nobody'}: {r.status_code} {r.text[:200]}"
                    assert r.status_code < 500 or r.status_code in (502, 503), label
                    if not allowed:  # public
                        assert r.status_code != 401, label
                    elif who == "":
                        assert r.status_code == 401, label
                        assert r.headers["www-authenticate"] == "Bearer", label
                    elif who in allowed:
                        assert r.status_code not in (401, 403), label
                    else:
                        assert r.status_code == 403, label
                        assert "may not" in r.json()["detail"], label
        assert calls == (len(POLICY) - 1) * 5
        # Prometheus metrics: public by declaration, outside the OpenAPI document.
        assert (await http.get("/metrics")).status_code == 200


async def test_sign_in_refusals_and_token_checks(db: Database) -> None:
    app = make_app(db)
    async with client(app) as http:
        assert (await sign_in(http, "viewer", "wrong-password")).status_code == 401
        assert (await sign_in(http, "nobody", "whatever-password")).status_code == 401
        token = (await sign_in(http, "viewer", PASSWORDS["viewer"])).json()["access_token"]
        me = await http.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200 and me.json()["username"] == "viewer" and "password" not in me.text
        # A forged signature, a token of another hub, garbage: all 401.
        forged = tokens.issue_access("another-hubs-secret-" * 3, "admin", "admin", NOW // 1000, 900)
        for bad in (forged, token[:-4] + "AAAA", "garbage"):
            r = await http.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {bad}"})
            assert r.status_code == 401, bad
    # Stored hashes are argon2id, never the password.
    with db.activate():
        stored = await users.get_user("viewer")
    assert stored is not None and stored.password_hash.startswith("$argon2id$")
    assert PASSWORDS["viewer"] not in stored.password_hash


async def test_tokens_expire(db: Database) -> None:
    clock = {"now": 1_800_000_000}
    app = make_app(db, token_ttl_s=60, now_s=lambda: clock["now"])
    async with client(app) as http:
        answer = (await sign_in(http, "staff", PASSWORDS["staff"])).json()
        assert answer["expires_in"] == 60
        auth = {"Authorization": f"Bearer {answer['access_token']}"}
        clock["now"] += 59
        assert (await http.get("/api/v1/auth/me", headers=auth)).status_code == 200
        clock["now"] += 1
        r = await http.get("/api/v1/auth/me", headers=auth)
        assert r.status_code == 401 and "expired" in r.json()["detail"]


async def test_disabling_or_demoting_a_user_takes_effect_at_once(db: Database) -> None:
    app = make_app(db)
    async with client(app, BearerAuth("admin", PASSWORDS["admin"])) as admin, client(app) as http:
        staff_token = (await sign_in(http, "staff", PASSWORDS["staff"])).json()["access_token"]
        staff = {"Authorization": f"Bearer {staff_token}"}
        assert (await http.get("/api/v1/tariffs", headers=staff)).status_code == 200
        r = await admin.patch("/api/v1/users/staff", json={"role": "viewer"})
        assert r.status_code == 200 and r.json()["role"] == "viewer"
        assert (await http.get("/api/v1/tariffs", headers=staff)).status_code == 403  # same token
        assert (await admin.patch("/api/v1/users/staff", json={"disabled": True})).status_code == 200
        assert (await http.get("/api/v1/devices", headers=staff)).status_code == 401
        assert (await sign_in(http, "staff", PASSWORDS["staff"])).status_code == 401
        # The last enabled admin can be neither demoted nor disabled.
        r = await admin.patch("/api/v1/users/admin", json={"role": "staff"})
        assert r.status_code == 409 and "no enabled admin" in r.json()["detail"]
        # New users: password rules, duplicate names, and they can sign in.
        r = await admin.post("/api/v1/users", json={"username": "tech-2", "password": "short", "role": "technician"})
        assert r.status_code == 422
        new = {"username": "tech-2", "password": "a-long-enough-one", "role": "technician"}
        r = await admin.post("/api/v1/users", json=new)
        assert r.status_code == 201 and r.json()["created_by"] == "admin" and "password" not in r.json()
        assert (await admin.post("/api/v1/users", json=new)).status_code == 409
        assert (await sign_in(http, "tech-2", "a-long-enough-one")).status_code == 200
        listed = (await admin.get("/api/v1/users")).json()
        assert [u["username"] for u in listed] == ["admin", "staff", "tech-2", "technician", "viewer"]
        assert "hash" not in str(listed)


async def test_sign_in_is_rate_limited(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(db, login_failures=RateLimiter(3, 60.0), login_attempts=RateLimiter(5, 60.0))
    caplog.set_level(logging.INFO)
    async with client(app) as http:
        codes = [(await sign_in(http, "admin", f"guess-number-{i}")).status_code for i in range(5)]
        assert codes == [401, 401, 401, 429, 429]
        # Limited per username: the right password is refused too until the window passes...
        r = await sign_in(http, "admin", PASSWORDS["admin"])
        assert r.status_code == 429 and 0 < int(r.headers["retry-after"]) <= 60
        # ... while another user may still sign in, until the client's overall budget (5, refused
        # attempts not counted) is spent.
        assert (await sign_in(http, "viewer", PASSWORDS["viewer"])).status_code == 200
        assert (await sign_in(http, "staff", PASSWORDS["staff"])).status_code == 200
        assert (await sign_in(http, "technician", PASSWORDS["technician"])).status_code == 429
    metrics = app.state.hub.metrics.render().decode()
    assert 'twin_hub_logins_refused_total{reason="rate_limited"} 4.0' in metrics
    assert 'twin_hub_logins_refused_total{reason="bad_credentials"} 3.0' in metrics
    # Secrets stay out of the logs.
    text = caplog.text
    assert "guess-number" not in text and PASSWORDS["admin"] not in text and PASSWORDS["viewer"] not in text


def test_rate_limiter_window_and_bound() -> None:
    limiter = RateLimiter(2, 10.0, max_keys=3)
    limiter.hit("a", 0.0)
    limiter.hit("a", 1.0)
    assert limiter.retry_after("a", 2.0) == pytest.approx(8.0)
    assert limiter.retry_after("a", 10.5) == 0.0  # the first hit left the window
    for key in ("b", "c", "d"):
        limiter.hit(key, 11.0)
    assert len(limiter._hits) == 3  # bounded: "a" (least recently used) was forgotten


async def test_first_admin_from_the_environment_or_generated(tmp_path: Path) -> None:
    for name, given in (("env", "from-the-environment"), ("random", None)):
        db = await Database(f"sqlite://{tmp_path / name}.db").open()
        try:
            with db.activate():
                shown = await users.ensure_admin(given, NOW)
                again = await users.ensure_admin("some-other-password", NOW)  # users exist: untouched
                admin = await users.get_user("admin")
            assert again is None and admin is not None and admin.role == "admin"
            password = given if given is not None else shown
            assert password is not None and (given is None) == (shown is not None)
            assert users.check_password(admin.password_hash, password)
            assert not users.check_password(admin.password_hash, "some-other-password")
        finally:
            await db.close()
