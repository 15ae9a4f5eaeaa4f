"""The device page and the alerts page in a real browser (issue 8 items 3, 4 and 6): a real
in-process hub on 127.0.0.1 with its alert engine and a real Mosquitto; Chromium through
Playwright (tests/browser.py). Screenshots: var/test-artifacts/screenshots/."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from fleet.broker import Mosquitto
from hub.ingest import now_ms
from hub.service import running_hub
from protocol.topics import events_topic, telemetry_topic
from tests.browser import DESKTOP, TABLET, screenshot
from tests.hubtools import BearerAuth, add_user, admin_auth, event_payload, hub_config, telemetry_payload

pytestmark = pytest.mark.integration
WAIT_MS = 15_000  # bounded waits on the DOM
PASSWORDS = {"tech": "tech-password-123", "viewer": "viewer-password-123"}
UID = "plant1.gw1.boiler1"
# Notifications go nowhere reachable (closed ports on 127.0.0.1), tried once: the test needs the
# contacts only as configuration. The webhook's path stands for a secret the API must not show.
ALERTS = {"notify": {"retry_attempts": 1}, "smtp": {"host": "127.0.0.1", "port": 9},
          "contacts": [{"name": "plant1-maintenance", "sites": ["plant1"], "email": ["maint@plant1.example.com"]},
                       {"name": "engineering", "role": "engineering", "min_severity": "critical",
                        "webhook": "http://127.0.0.1:9/hooks/s3cret-token"}]}

_seq = itertools.count(1)


def reading(metric: str, ts: int, value: Any, unit: str, quality: str = "good", device: str = "boiler1") -> tuple[
        str, str, int, int, Any, str, str]:
    return (device, metric, next(_seq), ts, value, unit, quality)


async def publish(broker: Mosquitto, readings: list[Any], events: Sequence[bytes] = ()) -> None:
    async with aiomqtt.Client(broker.host, broker.port, identifier="test-publisher") as client:
        if readings:
            await client.publish(telemetry_topic("plant1", "gw1"),
                                 telemetry_payload("plant1", "gw1", readings, sent_at=now_ms()), qos=1)
        for e in events:
            await client.publish(events_topic("plant1", "gw1"), e, qos=1)


def history(now: int) -> list[Any]:
    """boiler1: flow_temp every 10 s over the last 10 minutes with a 200 s gap and one bad read;
    return_temp only 30 minutes ago (inside 1 h, outside 15 min); a low pressure (0.5 bar: the
    built-in boiler-pressure alert, critical) and a flue temperature above 110 °C (warning);
    the anomaly score rising and falling."""
    out: list[Any] = []
    for i in range(60):
        ts = now - 600_000 + i * 10_000
        out.append(reading("anomaly_score", ts, 1.0 + (3.5 if now - 300_000 <= ts < now - 100_000 else 0.0), ""))
        if now - 400_000 < ts < now - 200_000:
            continue  # the gap
        if ts == now - 500_000:
            out.append(reading("flow_temp", ts, None, "degC", "bad"))
        else:
            out.append(reading("flow_temp", ts, 60.0 + (i % 7), "degC"))
    out += [reading("return_temp", now - 1_800_000 + i * 10_000, 45.0 + i, "degC") for i in range(3)]
    out += [reading("pressure", now - 30_000 + i * 10_000, 0.5, "bar") for i in range(3)]
    out += [reading("flue_temp", now - 30_000 + i * 10_000, 115.0, "degC") for i in range(3)]
    return out


async def sign_in(page: Any, base: str, user: str, password: str, target: str) -> None:
    await page.goto(f"{base}{target}")
    await page.get_by_label("Username").fill(user)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(f"{base}{target}")


async def alerts_api(http: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await http.get("/api/v1/alerts", params=params)
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()
    return data


async def wait_for_alerts(http: httpx.AsyncClient, rules: set[str]) -> dict[str, dict[str, Any]]:
    """The newest alert of each of ``rules`` once the engine opened them all (bounded)."""
    deadline = time.monotonic() + 15
    while True:
        found = {a["rule"]: a for a in reversed(await alerts_api(http, device=UID))}
        # The anomaly's alert opened and (anomaly_cleared) cleared itself.
        if rules <= found.keys() and found["edge-anomaly"]["state"] == "cleared":
            return found
        assert time.monotonic() < deadline, f"alerts {rules - found.keys()} not opened; have {sorted(found)}"
        await asyncio.sleep(0.1)


async def test_device_and_alerts_pages(mosquitto: Mosquitto, tmp_path: Path, browser: Any) -> None:
    config = hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port, alerts=ALERTS)
    async with running_hub(config) as hub:
        for name, password in PASSWORDS.items():
            await add_user(hub.db, name, "technician" if name == "tech" else "viewer", password)
        now = now_ms()
        await publish(mosquitto, history(now), [
            event_payload("plant1", "gw1", "anomaly_started", now - 300_000, device="boiler1",
                          details={"score": 4.5}, message="boiler1: anomaly score 4.5 above threshold 3"),
            event_payload("plant1", "gw1", "anomaly_cleared", now - 100_000, device="boiler1",
                          details={"score": 1.0}, message="boiler1: anomaly cleared")])
        async with httpx.AsyncClient(base_url=hub.api_url, auth=admin_auth(), timeout=20) as admin:
            alerts = await wait_for_alerts(admin, {"boiler-pressure", "boiler-flue-temp-high", "edge-anomaly"})
            await _device_page(hub.api_url, browser, mosquitto)
            await _alerts_page(hub.api_url, browser, admin, alerts)
            await _viewer(hub.api_url, browser)


async def _device_page(base: str, browser: Any, mosquitto: Mosquitto) -> None:
    context = await browser.new_context(viewport=DESKTOP)
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    await sign_in(page, base, "tech", PASSWORDS["tech"], "/fleet")
    # From the fleet page to the device.
    await page.locator(f'tr[data-device="{UID}"] a').click()
    await page.wait_for_url(f"{base}/devices/{UID}")
    await page.locator('[data-state="live"]').wait_for()

    # Latest values with units.
    row = page.locator('#latest tr[data-metric="pressure"]')
    assert (await row.locator("td").all_inner_texts())[:3] == ["0.5", "bar", "good"]

    # The twin picture, inline: the low pressure's reason is the expansion vessel's hover text
    # (its <title>) and is also written out below the picture.
    vessel = page.locator('#twin [data-component="expansion_vessel"]')
    await vessel.wait_for()
    assert await vessel.get_attribute("data-status") == "act"
    title = await vessel.locator("> title").text_content()
    assert title is not None and "Pressure 0.5 bar" in title
    await vessel.hover()
    listed = await page.locator('#reasons li[data-component="expansion_vessel"]').inner_text()
    assert listed.startswith("Expansion vessel: Needs action (0.5 bar)") and "Pressure 0.5 bar" in listed
    # Every part of the drawing is listed in words too.
    assert await page.locator("#reasons li[data-component]").count() == await page.locator(
        "#twin [data-component]").count() == 8

    # Data quality, last hour: the 200 s gap is shaded and the bad read marked and counted.
    flow = page.locator('[data-chart="flow_temp"]')
    assert await flow.locator("[data-gap]").count() == 1
    assert "No readings for 3 min (usually every 10 s)" in (await flow.locator("[data-gap] title").text_content() or "")
    assert await flow.locator('[data-bad="bad"]').count() == 1
    assert await flow.locator('[data-count="not-good"]').inner_text() == "1 not good"
    assert await page.locator("#bad-count").inner_text() == "1 not good"
    assert await page.locator("#gap-count").inner_text() == "1 gap"
    # The anomaly score, first, with the anomaly's start and end and the alerts on the timeline.
    assert await page.locator("[data-chart]").first.get_attribute("data-chart") == "anomaly_score"
    score = page.locator('[data-chart="anomaly_score"]')
    assert await score.locator('[data-event="anomaly"]').count() == 1
    assert await score.locator('[data-event="cleared"]').count() == 1
    assert await score.locator('[data-event="alert"]').count() >= 2
    timeline = await page.locator("#timeline").inner_text()
    assert "Anomaly started (score 4.5)" in timeline and "Anomaly cleared (score 1)" in timeline
    assert "Alert opened (critical): plant1.gw1.boiler1 pressure" in timeline
    assert await page.locator('[data-chart="return_temp"]').count() == 1
    await screenshot(page, "device-page")

    # Another time range, chosen with the labelled select: return_temp (30 minutes ago) leaves.
    await page.get_by_label("Time range").select_option("15m")
    await page.locator('[data-chart="return_temp"]').wait_for(state="detached")
    assert await page.locator('[data-chart="flow_temp"] [data-gap]').count() == 1

    # Live: a new reading over MQTT shows up without a reload.
    await page.evaluate("window.__notReloaded = true")
    await publish(mosquitto, [reading("flow_temp", now_ms(), 77.25, "degC")])
    # (Locator waits: the pages' CSP forbids eval, which wait_for_function's strings need.)
    await page.locator('#latest tr[data-metric="flow_temp"] [data-value]:text-is("77.25")').wait_for()
    assert await page.evaluate("window.__notReloaded === true")
    assert "latest 77.25" in await page.locator('[data-chart="flow_temp"] figcaption').inner_text()

    await page.set_viewport_size(TABLET)
    assert await page.evaluate("document.documentElement.scrollWidth") <= TABLET["width"]
    await screenshot(page, "device-page-tablet")
    await context.close()


async def _alerts_page(base: str, browser: Any, admin: httpx.AsyncClient, alerts: dict[str, dict[str, Any]]) -> None:
    pressure, flue, anomaly = alerts["boiler-pressure"], alerts["boiler-flue-temp-high"], alerts["edge-anomaly"]
    context = await browser.new_context(viewport=DESKTOP)
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    await sign_in(page, base, "tech", PASSWORDS["tech"], "/alerts")
    # Default: alerts not cleared (the anomaly cleared itself).
    rows = page.locator("tr[data-alert-row]")
    await rows.first.wait_for()
    shown = {await r.get_attribute("data-alert-row") for r in await rows.all()}
    assert {str(pressure["id"]), str(flue["id"])} <= shown and str(anomaly["id"]) not in shown
    # Filters: severity and state.
    await page.get_by_label("Severity").select_option("critical")
    await page.locator("tr[data-alert-row] .sev-warning").first.wait_for(state="detached")
    assert {await r.inner_text() for r in await page.locator("tr[data-alert-row] .sev").all()} == {"critical"}
    await page.get_by_label("Severity").select_option("")
    await page.get_by_label("State").select_option("cleared")
    await page.locator(f'tr[data-alert-row="{anomaly["id"]}"]').wait_for()
    assert await page.locator('tr[data-alert-row][data-state="open"]').count() == 0
    await page.get_by_label("State").select_option("active")
    await page.locator(f'tr[data-alert-row="{pressure["id"]}"]').wait_for()

    # Acknowledge by keyboard with a note: the button, Enter, type, Enter.
    row = page.locator(f'tr[data-alert-row="{pressure["id"]}"]')
    await row.locator('button[data-action="ack"]').focus()
    await page.keyboard.press("Enter")
    note = row.get_by_label(f"Note (optional) for acknowledge of alert {pressure['id']}")
    assert await page.evaluate("document.activeElement.id") == f"note-ack-{pressure['id']}"
    await page.keyboard.type("topping up the pressure")
    await page.keyboard.press("Enter")
    await note.wait_for(state="detached")
    assert await page.locator("#message").inner_text() == f"Alert {pressure['id']} acknowledged by tech."
    done = (await admin.get(f"/api/v1/alerts/{pressure['id']}")).json()
    assert done["state"] == "acknowledged" and done["acknowledged_by"] == "tech"
    assert any(h["action"] == "acknowledged" and h["by"] == "tech" and "topping up" in h["message"]
               for h in done["history"])
    row = page.locator(f'tr[data-alert-row="{pressure["id"]}"]')
    assert await row.get_attribute("data-state") == "acknowledged"
    assert await row.locator('button[data-action="ack"]').count() == 0  # acknowledged: only Clear left

    # Clear another one with a note.
    row = page.locator(f'tr[data-alert-row="{flue["id"]}"]')
    await row.locator('button[data-action="clear"]').click()
    await row.get_by_label(f"Note (optional) for clear of alert {flue['id']}").fill("flue cleaned")
    await row.get_by_role("button", name=f"Clear alert {flue['id']}").click()
    await page.locator(f'tr[data-alert-row="{flue["id"]}"]').wait_for(state="detached")  # no longer "not cleared"
    done = (await admin.get(f"/api/v1/alerts/{flue['id']}")).json()
    assert done["state"] == "cleared" and done["cleared_by"] == "tech"

    # History: opened, then acknowledged by tech with the note; the page opened it after the action.
    row = page.locator(f'tr[data-alert-row="{pressure["id"]}"]')
    assert await row.locator("details").get_attribute("open") is not None
    steps = row.locator("[data-history] li")
    await steps.first.wait_for()
    actions = [await s.get_attribute("data-action") for s in await steps.all()]
    assert actions[0] == "opened" and "acknowledged" in actions
    assert "by tech — topping up the pressure" in await row.locator('[data-action="acknowledged"]').inner_text()

    # Contacts per site: the webhook by host only, never its secret path.
    contacts = page.locator("#contacts")
    await contacts.locator('li[data-site="plant1"]').wait_for()
    assert await contacts.locator('li[data-site="plant1"]').inner_text() == (
        "plant1: plant1-maintenance (warning and above), engineering (critical and above)")
    text = await contacts.inner_text()
    assert "maint@plant1.example.com" in text and "webhook to 127.0.0.1" in text and "s3cret" not in text
    await screenshot(page, "alerts-page")
    await page.set_viewport_size(TABLET)
    assert await page.evaluate("document.documentElement.scrollWidth") <= TABLET["width"]
    await screenshot(page, "alerts-page-tablet")
    await context.close()


async def _viewer(base: str, browser: Any) -> None:
    async with httpx.AsyncClient(base_url=base, auth=BearerAuth("viewer", PASSWORDS["viewer"]), timeout=20) as http:
        contacts = (await http.get("/api/v1/alerts/contacts")).json()
    assert contacts == [
        {"name": "plant1-maintenance", "role": "maintenance", "sites": ["plant1"], "min_severity": "warning",
         "email": ["maint@plant1.example.com"], "webhook_host": None},
        {"name": "engineering", "role": "engineering", "sites": [], "min_severity": "critical", "email": [],
         "webhook_host": "127.0.0.1"}]
    context = await browser.new_context(viewport=TABLET)
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    await sign_in(page, base, "viewer", PASSWORDS["viewer"], "/alerts")
    await page.locator("tr[data-alert-row]").first.wait_for()
    assert "can view alerts but not acknowledge or clear them" in await page.locator("#read-only").inner_text()
    assert await page.locator("button[data-action]").count() == 0
    # Even by hand (the page's own api.js, CSRF header included) the hub refuses.
    status = await page.evaluate("""import('/static/api.js').then(m => m.api('/api/v1/alerts/1/ack',
        {method: 'POST', body: {by: 'viewer'}})).then(r => r.status)""")
    assert status == 403
    await screenshot(page, "alerts-page-viewer-tablet")
    await context.close()
