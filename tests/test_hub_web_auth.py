"""The dashboard's browser sign-in: session cookie, CSRF header, redirects, roles (issue 8).

In process (ASGI), no broker: the cookie and its checks are the API's, so they are tested here
without a browser; tests/test_web_fleet.py drives the same through Chromium.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from hub.alerts.models import Alert
from hub.api.access import SESSION_COOKIE, RateLimiter
from hub.db import Database
from hub.live import FleetEvents, Subscription
from hub.store import Store, TelemetryItem
from hub.web.summary import fleet_summary
from tests.hubtools import ROLE_PASSWORDS, T0, api_app, database_with_role_users, series, telemetry

PASSWORDS = ROLE_PASSWORDS


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    async with database_with_role_users(tmp_path / "hub.db") as database:
        yield database


make_app = api_app


def client(app: FastAPI, base_url: str = "http://hub") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)


async def login(http: httpx.AsyncClient, user: str, password: str | None = None, **form: str) -> httpx.Response:
    return await http.post("/web/login", data={"username": user, "password": password or PASSWORDS[user], **form})


async def session(http: httpx.AsyncClient, user: str) -> dict[str, str]:
    """The Cookie header of ``user``'s browser after signing in."""
    r = await login(http, user)
    assert r.status_code == 303, r.text
    return {"Cookie": f"{SESSION_COOKIE}={r.cookies[SESSION_COOKIE]}"}


async def test_login_sets_a_strict_httponly_cookie_and_logout_clears_it(db: Database) -> None:
    app = make_app(db)
    async with client(app) as http:
        form = await http.get("/login")
        assert form.status_code == 200
        assert '<label for="username">Username</label>' in form.text and 'for="password"' in form.text
        assert "default-src 'self'" in form.headers["content-security-policy"]
        r = await login(http, "viewer")
        assert (r.status_code, r.headers["location"]) == (303, "/fleet")
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{SESSION_COOKIE}=")
        flags = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/", "max-age=900"} <= flags
        assert "secure" not in flags  # plain http: a Secure cookie would never come back
        out = await http.post("/web/logout")
        assert (out.status_code, out.headers["location"]) == (303, "/login")
        assert 'max-age=0' in out.headers["set-cookie"].lower() and SESSION_COOKIE in out.headers["set-cookie"]
    async with client(app, "https://hub") as https:
        r = await login(https, "viewer")
        assert "secure" in {p.strip().lower() for p in r.headers["set-cookie"].split(";")}


async def test_a_used_session_is_renewed_until_its_maximum_and_an_unused_one_expires(db: Database) -> None:
    clock = {"now": 1_800_000_000}
    app = make_app(db, token_ttl_s=600, session_max_s=1_500, now_s=lambda: clock["now"])
    async with client(app) as http:
        cookie = await session(http, "technician")
        signed_in = clock["now"]

        async def visit(path: str) -> httpx.Response:
            r = await http.get(path, headers=cookie)
            fresh = r.cookies.get(SESSION_COOKIE)
            if fresh:
                cookie["Cookie"] = f"{SESSION_COOKIE}={fresh}"
            return r

        # First half of the token's life: nothing renewed.
        clock["now"] += 200
        r = await visit("/api/v1/auth/me")
        assert r.status_code == 200 and "set-cookie" not in r.headers
        # Second half: any request renews it, a page (HTMLResponse) and the API (JSON) alike.
        clock["now"] += 150
        r = await visit("/fleet")
        assert r.status_code == 200
        assert "max-age=600" in r.headers["set-cookie"].lower() and "httponly" in r.headers["set-cookie"].lower()
        clock["now"] += 500  # past the first token's expiry (signed_in + 600), within the renewed one
        r = await visit("/api/v1/fleet/summary")
        assert r.status_code == 200, r.text
        assert "max-age=600" in r.headers["set-cookie"].lower()
        # The fleet page's event stream reconnects in the token's second half and renews it too,
        # here near the session's maximum: cut to what is left of the session (1500 - 1250 s) ...
        clock["now"] += 400
        r = await visit("/api/v1/stream/fleet")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert "max-age=250" in r.headers["set-cookie"].lower()
        clock["now"] = signed_in + 1_300
        r = await visit("/api/v1/auth/me")
        assert r.status_code == 200 and "set-cookie" not in r.headers  # nothing left to renew
        # ... and at the maximum the password is asked again.
        clock["now"] = signed_in + 1_500
        assert (await http.get("/api/v1/auth/me", headers=cookie)).status_code == 401
        page = await http.get("/fleet", headers=cookie)
        assert (page.status_code, page.headers["location"]) == (303, "/login?next=/fleet")
        # A bearer token (API clients) is never renewed: the cookie is the browser's session only.
        token = (await http.post("/api/v1/auth/token", data={"username": "staff",
                                                            "password": PASSWORDS["staff"]})).json()
        clock["now"] += 500
        r = await http.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token['access_token']}"})
        assert r.status_code == 200 and "set-cookie" not in r.headers
        # An unused session expires with its token.
        cookie = await session(http, "viewer")
        clock["now"] += 600
        assert (await http.get("/api/v1/auth/me", headers=cookie)).status_code == 401


async def test_login_refusals_share_the_api_rate_limits(db: Database) -> None:
    app = make_app(db, login_failures=RateLimiter(2, 60.0))
    async with client(app) as http:
        bad = await login(http, "staff", "not-the-password")
        assert bad.status_code == 401 and "Wrong username or password." in bad.text
        assert SESSION_COOKIE not in bad.headers.get("set-cookie", "")
        assert 'value="staff"' in bad.text and "not-the-password" not in bad.text
        # The API's token route counts against the same limiter: one limit, however one signs in.
        api = await http.post("/api/v1/auth/token", data={"username": "staff", "password": "nope-nope-nope"})
        assert api.status_code == 401
        limited = await login(http, "staff")
        assert limited.status_code == 429 and "Too many sign-in attempts" in limited.text
        assert int(limited.headers["retry-after"]) > 0
        # Another site's form cannot sign a browser in; a local "next" only.
        evil = await http.post("/web/login", data={"username": "viewer", "password": PASSWORDS["viewer"]},
                               headers={"Origin": "https://evil.example"})
        assert evil.status_code == 403 and SESSION_COOKIE not in evil.headers.get("set-cookie", "")
        for target in ("//evil.example/x", "https://evil.example/", "/fleet?x=1", "javascript:alert(1)"):
            r = await login(http, "viewer", next=target)
            assert r.headers["location"] == "/fleet", target
        r = await login(http, "viewer", next="/devices/plant1.gw1.boiler1")
        assert r.headers["location"] == "/devices/plant1.gw1.boiler1"


async def test_pages_redirect_to_login_and_the_api_answers_401(db: Database) -> None:
    app = make_app(db)
    async with client(app) as http:
        assert (await http.get("/")).headers["location"] == "/fleet"
        r = await http.get("/fleet")
        assert (r.status_code, r.headers["location"]) == (303, "/login?next=/fleet")
        r = await http.get("/devices/plant1.gw1.boiler1", headers={"Cookie": f"{SESSION_COOKIE}=garbage"})
        assert (r.status_code, r.headers["location"]) == (303, "/login?next=/devices/plant1.gw1.boiler1")
        assert "max-age=0" in r.headers["set-cookie"].lower()  # the useless cookie is dropped
        r = await http.get("/api/v1/devices", headers={"Cookie": f"{SESSION_COOKIE}=garbage"})
        assert r.status_code == 401 and r.headers["content-type"] == "application/json"
        assert (await http.get("/api/v1/fleet/summary")).status_code == 401
        # Signed in: the page, with the user's name and the sign-out form.
        viewer = await session(http, "viewer")
        page = await http.get("/fleet", headers=viewer)
        assert page.status_code == 200 and "viewer" in page.text and 'action="/web/logout"' in page.text
        assert (await http.get("/static/fleet.js")).status_code == 200


async def test_cookie_roles_and_the_csrf_header(db: Database) -> None:
    app = make_app(db)
    async with client(app) as http:
        viewer, staff, tech = [await session(http, u) for u in ("viewer", "staff", "technician")]
        assert (await http.get("/api/v1/tariffs", headers=viewer)).status_code == 403
        assert (await http.get("/api/v1/tariffs", headers=staff)).status_code == 200
        assert (await http.get("/api/v1/auth/me", headers=viewer)).json()["username"] == "viewer"
        ack = "/api/v1/alerts/1/ack"
        body = {"by": "someone"}
        # A cross-site form would come with the cookie and without the header: refused.
        r = await http.post(ack, json=body, headers=tech)
        assert r.status_code == 403 and "X-Twin-CSRF" in r.json()["detail"]
        r = await http.post(ack, json=body, headers={**tech, "X-Twin-CSRF": "1"})
        assert r.status_code == 404  # let in; there is no alert 1
        r = await http.post(ack, json=body, headers={**viewer, "X-Twin-CSRF": "1"})
        assert r.status_code == 403 and "may not" in r.json()["detail"]
        # A bearer token needs no such header (no browser attaches it by itself), and wins over a cookie.
        token = (await http.post("/api/v1/auth/token", data={"username": "technician",
                                                               "password": PASSWORDS["technician"]})).json()
        r = await http.post(ack, json=body, headers={"Authorization": f"Bearer {token['access_token']}", **viewer})
        assert r.status_code == 404


async def _seed(db: Database) -> None:
    kinds = {"boiler1": "boiler", "meter1": "meter"}
    fresh = series("boiler1", "flow_temp", 3) + series("meter1", "power", 2, unit="kW")
    await Store(db).write([TelemetryItem(telemetry("plant1", "gw1", fresh, kinds=kinds, backlog=7), T0),
                           # 5 min old at T0: stale; 20 min: offline (defaults 120 s / 600 s)
                           TelemetryItem(telemetry("plant1", "gw2", series("tank1", "level", 1, ts0=T0 - 300_000),
                                                   kinds={"tank1": "tank"}), T0 - 300_000),
                           TelemetryItem(telemetry("plant2", "gw1", series("boiler9", "flow_temp", 1,
                                                                             ts0=T0 - 1_200_000)), T0 - 1_200_000)],
                          [], [])
    with db.activate():
        for n, (severity, state) in enumerate((("critical", "open"), ("warning", "acknowledged"),
                                               ("critical", "cleared"))):
            await Alert.create(key=f"r{n}:plant1.gw1.boiler1", rule=f"r{n}", type="threshold", severity=severity,
                               state=state, site="plant1", gateway="gw1", device="plant1.gw1.boiler1",
                               message="m", opened_ms=T0, last_triggered_ms=T0)


async def test_fleet_summary_counts_and_one_shot_stream(db: Database) -> None:
    await _seed(db)
    app = make_app(db)
    async with client(app) as http:
        viewer = await session(http, "viewer")
        s = (await http.get("/api/v1/fleet/summary", headers=viewer)).json()
        assert s == await fleet_summary(db, app.state.hub.status, T0)
        assert s["totals"]["devices"] == {"online": 2, "stale": 1, "offline": 1}
        assert s["totals"]["alerts"] == {"critical": 1, "warning": 1, "info": 0}  # cleared ones not counted
        assert s["totals"]["backlog"] == 7
        assert [site["name"] for site in s["sites"]] == ["plant1", "plant2"]
        plant1 = s["sites"][0]
        assert plant1["devices"] == {"online": 2, "stale": 1, "offline": 0}
        gw1 = plant1["gateway_list"][0]
        assert (gw1["id"], gw1["status"], gw1["backlog"]) == ("plant1.gw1", "online", 7)
        assert [(d["id"], d["status"], d["alerts"]["critical"]) for d in gw1["device_list"]] == [
            ("plant1.gw1.boiler1", "online", 1), ("plant1.gw1.meter1", "online", 0)]
        assert plant1["gateway_list"][1]["status"] == "stale"
        assert s["sites"][1]["gateway_list"][0]["device_list"][0]["status"] == "offline"
        # Without live events (no ingest) the stream sends the summary once and ends.
        r = await http.get("/api/v1/stream/fleet", headers=viewer)
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [block for block in r.text.split("\n\n") if "data: " in block]
        assert len(events) == 1 and "event: fleet" in events[0]
        assert json.loads(events[0].split("data: ", 1)[1]) == s
        page = await http.get("/fleet", headers=viewer)
        assert 'id="fleet-data"' in page.text and "plant1.gw1.boiler1" in page.text
        device = await http.get("/devices/plant1.gw1.boiler1", headers=viewer)
        assert device.status_code == 200 and "flow_temp" in device.text and '<th scope="col">Metric</th>' in device.text


async def _next(sub: Subscription) -> object:
    data = await asyncio.wait_for(sub.queue.get(), 5)
    assert data is not None
    return json.loads(data)


async def test_live_events_coalesce_drop_slow_clients_and_end_on_close() -> None:
    builds = 0

    async def build() -> dict[str, int]:
        nonlocal builds
        builds += 1
        return {"n": builds}

    events = FleetEvents(build, min_interval_s=0.2, recheck_s=60, queue_size=2)
    fast, slow = events.subscribe(), events.subscribe()
    assert fast is not None and slow is not None
    for _ in range(50):  # a burst of committed batches ...
        events.on_batch([], [], [])
    assert await _next(fast) == {"n": 1}  # ... is one summary
    await asyncio.sleep(0.3)
    assert builds == 1 and fast.queue.empty()
    for n in (2, 3, 4):  # the slow one never reads: at the third summary its queue (2) is full
        events.changed()
        assert await _next(fast) == {"n": n}
    assert slow.dropped and slow.queue.get_nowait() is None
    await events.close()
    assert fast.queue.get_nowait() is None and events.subscribe() is None


def _luminance(hex_colour: str) -> float:
    channels = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def _contrast(a: str, b: str) -> float:
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_text_colours_have_at_least_4_5_to_1_contrast() -> None:
    """WCAG AA for normal text: every text colour of the stylesheet on the backgrounds it is used on."""
    css = (Path(__file__).resolve().parents[1] / "hub/web/static/app.css").read_text()
    var = dict(re.findall(r"--([a-z-]+):\s*(#[0-9a-fA-F]{6})", css))
    header = re.search(r"\.top \{[^}]*background: (#[0-9a-fA-F]{6})", css)
    assert header is not None
    pairs = [(var[text], var[bg]) for text in ("fg", "muted", "accent", "online", "stale", "offline", "critical",
                                               "warning", "info") for bg in ("bg", "panel")]
    pairs += [("#ffffff", header.group(1)), ("#d7dde6", header.group(1)), ("#ffffff", var["accent"])]
    low = {pair: round(_contrast(*pair), 2) for pair in pairs if _contrast(*pair) < 4.5}
    assert low == {}
