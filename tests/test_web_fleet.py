"""The fleet page in a real browser: keyboard sign-in, counts, live updates over SSE, search and
filter, tablet layout (issue 8). A real in-process hub on 127.0.0.1 with a real Mosquitto;
Chromium through Playwright (tests/browser.py). Screenshots: var/test-artifacts/screenshots/."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from fleet.broker import Mosquitto
from hub.ingest import now_ms
from hub.service import Hub, running_hub
from hub.web import api as web_api
from protocol.topics import telemetry_topic
from tests.browser import DESKTOP, TABLET, audit, screenshot
from tests.hubtools import ADMIN_PASSWORD, add_user, hub_config, series, telemetry_payload, wait_until

pytestmark = pytest.mark.integration
VIEWER_PASSWORD = "viewer-password-123"
WAIT_MS = 15_000  # bounded waits on the DOM


async def publish(broker: Mosquitto, site: str, gateway: str, readings: list[Any], kinds: dict[str, str],
                  backlog: int = 0) -> None:
    async with aiomqtt.Client(broker.host, broker.port, identifier="test-publisher") as client:
        await client.publish(telemetry_topic(site, gateway),
                             telemetry_payload(site, gateway, readings, kinds=kinds, backlog=backlog,
                                               sent_at=now_ms()), qos=1)


async def count(page: Any, key: str) -> str:
    text: str = await page.locator(f'[data-count="{key}"]').inner_text()
    return text


async def test_fleet_page_signs_in_by_keyboard_and_updates_live(mosquitto: Mosquitto, tmp_path: Path,
                                                                browser: Any) -> None:
    config = hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port)
    async with running_hub(config) as hub:
        await add_user(hub.db, "viewer", "viewer", VIEWER_PASSWORD)
        now = now_ms()
        await publish(mosquitto, "plant1", "gw1",
                      series("boiler1", "flow_temp", 2, ts0=now - 1000) + series("meter1", "power", 1, ts0=now),
                      {"boiler1": "boiler", "meter1": "meter"}, backlog=12)
        # Five minutes old: stale (default [status] stale_after_s = 120, offline_after_s = 600).
        await publish(mosquitto, "plant1", "gw2", series("tank1", "level", 1, ts0=now - 300_000), {"tank1": "tank"})
        await wait_until(lambda: hub.stats.readings_stored >= 4, what="seed readings stored")

        context = await browser.new_context(viewport=DESKTOP)
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        await page.goto(f"{hub.api_url}/fleet")
        assert page.url.endswith("/login?next=/fleet")  # not signed in: to the form, not a JSON 401
        await screenshot(page, "login")
        # A wrong password: the form again, with the reason announced (role=alert) and no cookie.
        await page.get_by_label("Username").fill("viewer")
        await page.get_by_label("Password").fill("not-the-password")
        await page.get_by_role("button", name="Sign in").click()
        assert await page.get_by_role("alert").inner_text() == "Wrong username or password."
        assert await context.cookies() == []
        await screenshot(page, "login-refused")
        # Keyboard only: the username field has the focus, Tab to the password, Enter submits.
        assert await page.evaluate("document.activeElement.id") == "username"
        await page.keyboard.press("Control+A")
        await page.keyboard.type("viewer")
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.id") == "password"
        # The keyboard focus is visible (an outline, not only a colour change).
        assert await page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
        await page.keyboard.type(VIEWER_PASSWORD)
        await page.keyboard.press("Enter")
        await page.wait_for_url(f"{hub.api_url}/fleet")
        cookie = next(c for c in await context.cookies() if c["name"] == "twin_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert await page.evaluate("document.cookie") == ""  # HttpOnly: no script can read it

        await page.locator('[data-state="live"]').wait_for()
        assert [await count(page, k) for k in ("devices-online", "devices-stale", "devices-offline", "backlog")] \
            == ["2", "1", "0", "12"]
        gw1 = page.locator('[data-gateway="plant1.gw1"]')
        assert "Backlog: 12 readings." in await gw1.inner_text()
        assert await page.locator('tr[data-device="plant1.gw2.tank1"] [data-status]').inner_text() == "◐ stale"
        assert await page.locator("th[scope=col]").count() == 10  # two device tables, five column headers each
        await screenshot(page, "fleet")

        # Live: a new device's telemetry arrives over MQTT and shows up without a reload.
        await page.evaluate("window.__notReloaded = true")
        await publish(mosquitto, "plant1", "gw1", series("boiler7", "flow_temp", 1, ts0=now_ms()),
                      {"boiler7": "boiler"}, backlog=3)
        await page.locator('tr[data-device="plant1.gw1.boiler7"]').wait_for()
        await page.wait_for_function(
            "document.querySelector('[data-count=\"devices-online\"]').textContent === '3'", timeout=WAIT_MS)
        assert await count(page, "backlog") == "3"
        assert await page.evaluate("window.__notReloaded === true")
        await screenshot(page, "fleet-live-update")

        # From the page's scripts: a change without the CSRF header is refused; /static/api.js adds it,
        # and then the role decides (a viewer may not acknowledge alerts).
        raw = await page.evaluate("""fetch('/api/v1/alerts/1/ack', {method: 'POST',
            headers: {'content-type': 'application/json'}, body: '{"by": "x"}'})
            .then(async r => [r.status, await r.text()])""")
        assert raw[0] == 403 and "X-Twin-CSRF" in raw[1]
        via_api = await page.evaluate("""import('/static/api.js').then(m => m.api('/api/v1/alerts/1/ack',
            {method: 'POST', body: {by: 'x'}})).then(async r => [r.status, await r.text()])""")
        assert via_api[0] == 403 and "may not" in via_api[1]

        # Search and status filter (client-side).
        await page.get_by_label("Search").fill("meter")
        assert await page.locator("tr[data-device]").all_inner_texts() == [
            t for t in await page.locator("tr[data-device]").all_inner_texts() if "meter1" in t]
        assert await page.locator("tr[data-device]").count() == 1
        assert await page.locator("#shown").inner_text() == "Showing 1 of 4 devices."
        await page.get_by_label("Search").fill("")
        await page.get_by_label("Status").select_option("stale")
        assert [await r.get_attribute("data-device") for r in await page.locator("tr[data-device]").all()] == [
            "plant1.gw2.tank1"]
        await page.get_by_label("Status").select_option("")
        assert await page.locator("tr[data-device]").count() == 4

        # A technician's tablet: nothing wider than the screen, the table still readable.
        await page.set_viewport_size(TABLET)
        assert await page.evaluate("document.documentElement.scrollWidth") <= TABLET["width"]
        await screenshot(page, "fleet-tablet")

        # Each device links to its page.
        await page.locator('tr[data-device="plant1.gw1.boiler1"] a').click()
        await page.wait_for_url(f"{hub.api_url}/devices/plant1.gw1.boiler1")
        assert "flow_temp" in await page.locator("table").inner_text()
        await screenshot(page, "device")

        # Signing out ends the session: the fleet page sends the browser back to the form.
        await page.get_by_role("button", name="Sign out").click()
        await page.wait_for_url(f"{hub.api_url}/login")
        await page.goto(f"{hub.api_url}/fleet")
        assert page.url.endswith("/login?next=/fleet")
        await context.close()


async def _next_event(lines: Any) -> dict[str, Any]:
    """The data of the next ``fleet`` event of an SSE line iterator."""
    event = ""
    async for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event == "fleet":
            data: dict[str, Any] = json.loads(line[6:])
            return data
    raise AssertionError("the stream ended")


async def test_stream_sends_changes_heartbeats_and_ends_when_the_hub_stops(
        mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web_api, "HEARTBEAT_S", 0.3)
    config = hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port)
    hub = Hub(config)
    await hub.start()
    stopped = False
    try:
        async with httpx.AsyncClient(base_url=hub.api_url, timeout=20) as http:
            # Signed in by hand: BearerAuth reads whole response bodies, and a stream has no end.
            token = (await http.post("/api/v1/auth/token", data={"username": "admin",
                                                                 "password": ADMIN_PASSWORD})).json()["access_token"]
            headers = {"Authorization": f"Bearer {token}"}
            await _follow_stream(hub, http, headers, mosquitto)
            stopped = True
    finally:
        if not stopped:
            await hub.stop()


async def _follow_stream(hub: Hub, http: httpx.AsyncClient, headers: dict[str, str], mosquitto: Mosquitto) -> None:
    """Read the stream: first summary, a change, a heartbeat; stop the hub and see the stream end."""
    async with http.stream("GET", "/api/v1/stream/fleet", headers=headers) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.aiter_lines()
        first = await asyncio.wait_for(_next_event(lines), 10)
        assert first == {"sites": [], "totals": {"alerts": {"critical": 0, "info": 0, "warning": 0}, "backlog": 0,
                         "devices": {"offline": 0, "online": 0, "stale": 0},
                         "gateways": {"offline": 0, "online": 0, "stale": 0}}}
        # Ten batches in quick succession: summaries, not one event per batch.
        for i in range(10):
            await publish(mosquitto, "plant1", "gw1", series("boiler1", "flow_temp", 1, seq0=i, ts0=now_ms()),
                          {"boiler1": "boiler"})
        seen = await asyncio.wait_for(_next_event(lines), 10)
        assert seen["totals"]["devices"]["online"] == 1
        assert seen["sites"][0]["gateway_list"][0]["device_list"][0]["id"] == "plant1.gw1.boiler1"
        # Nothing changes: comment lines keep the connection alive.
        async for line in lines:
            if line.startswith(": keep-alive"):
                break
        stopping = asyncio.create_task(hub.stop())
        # The stream ends: the hub closes it when it stops (well within uvicorn's 3 s grace).
        rest = await asyncio.wait_for(_rest(lines), 10)
        await stopping
        assert not any(line.startswith("data: ") and '"online":1' not in line for line in rest)


async def _rest(lines: Any) -> list[str]:
    return [line async for line in lines]


async def test_the_accessibility_audit_finds_what_it_checks(browser: Any) -> None:
    """The audit every screenshot runs (tests/browser.py) can fail: a page breaking each rule."""
    context = await browser.new_context(viewport=TABLET)
    page = await context.new_page()
    await page.set_content(
        "<html><head><title>t</title></head><body><h1>a</h1><h1>b</h1>"
        "<input id='x'><label for='y'>ok</label><input id='y'><button id='y'></button>"
        "<svg role='img' width='10' height='10'></svg><div style='width:2000px'>wide</div></body></html>")
    problems = await audit(page)
    await context.close()
    assert any(p.startswith("no accessible name: input#x") for p in problems), problems
    assert any(p.startswith("no accessible name: button#y") for p in problems), problems
    assert any(p.startswith("shorter than 44 px: input#y") for p in problems), problems
    assert "no lang on <html>" in problems and "2 visible h1 elements" in problems, problems
    assert "svg image without a label" in problems and "id y used 2 times" in problems, problems
    assert any(p.startswith("page ") and p.endswith(" px wide in a 768 px window") for p in problems), problems
    assert not any("input#y" in p and "name" in p for p in problems), problems  # labelled
