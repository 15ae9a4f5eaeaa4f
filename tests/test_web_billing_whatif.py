"""Meter and billing pages, the what-if page and the fleet page's board-report link in a real
browser (issue 8): Chromium through Playwright (tests/browser.py) against a real in-process hub on
127.0.0.1 with a real Mosquitto. A meter is seeded with register telemetry and an economy-7 tariff
as in tests/test_hub_billing_api.py. Screenshots: var/test-artifacts/screenshots/."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet.broker import Mosquitto
from hub.ingest import now_ms
from hub.service import running_hub
from hub.store import TelemetryItem
from tests.browser import DESKTOP, TABLET, screenshot
from tests.hubtools import add_user, admin_auth, hub_config, model_card, onnx_model, telemetry

pytestmark = pytest.mark.integration
METER = "plant1.gw1.meter1"
PASSWORDS = {"carol": "carol-password-123", "tech": "tech-password-123", "viewer": "viewer-password-123"}
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "shipped" / "sim-boiler-anomaly.onnx"
WAIT_MS = 20_000  # bounded waits on the DOM
ECONOMY7: dict[str, Any] = {
    "name": "economy7", "currency": "GBP", "timezone": "Europe/London", "vat_rate": "0.05",
    "standing_charge_per_day": "0.60", "effective_from": "2020-01-01T00:00:00Z",
    "bands": [{"name": "night", "rate": "0.10", "start": "00:30", "end": "07:30"},
              {"name": "day", "rate": "0.30", "start": "07:30", "end": "00:30"}],
}


def month_start(ms: int) -> str:
    now = datetime.fromtimestamp(ms / 1000, UTC)
    return datetime(now.year, now.month, 1, tzinfo=UTC).isoformat().replace("+00:00", "Z")


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms // 1000, UTC).isoformat().replace("+00:00", "Z")


async def sign_in(page: Any, base: str, username: str) -> None:
    await page.goto(f"{base}/login")
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password").fill(PASSWORDS[username])
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(f"{base}/fleet")


async def seed(hub: Any) -> dict[str, Any]:
    """Register readings of a meter over the last three hours, the tariff (on the site), a closed
    statement for the first hour, the shipped anomaly model assigned fleet-wide."""
    for name, role in (("carol", "staff"), ("tech", "technician"), ("viewer", "viewer")):
        await add_user(hub.db, name, role, PASSWORDS[name])
    now = now_ms() // 1000 * 1000
    t = [now - 3 * 3_600_000, now - 2 * 3_600_000, now - 3_600_000]
    readings = [("meter1", "energy_import", i, ts, v, "kWh", "good")
                for i, (ts, v) in enumerate(zip(t, (1000.25, 1010.5, 1020.75), strict=True))]
    await hub.store.write([TelemetryItem(telemetry("plant1", "gw1", readings, kinds={"meter1": "meter"}), now)])
    async with httpx.AsyncClient(base_url=hub.api_url, auth=admin_auth(), timeout=30) as http:
        assert (await http.post("/api/v1/tariffs", json=ECONOMY7)).status_code == 201
        r = await http.post("/api/v1/tariff-assignments",
                            json={"tariff": "economy7", "site": "plant1", "effective_from": "2020-01-01T00:00:00Z"})
        assert r.status_code == 201, r.text
        r = await http.post("/api/v1/statements", json={"meter": METER, "since": iso(t[0]), "until": iso(t[1])})
        assert r.status_code == 201, r.text
        statement = r.json()
        r = await http.post("/api/v1/models", content=SHIPPED.read_bytes(),
                            headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        r = await http.put("/api/v1/model-assignments",
                           json={"profile": "sim-boiler", "name": "sim-boiler-anomaly", "version": 1})
        assert r.status_code == 200, r.text
    return {"statement": statement, "now": now}


async def seed_boilers(hub: Any, now: int) -> None:
    """Two boilers: plant1.gw1.boiler1 (setpoint 62.5, outdoor 3.5 degC) on a gateway with the
    fleet-wide model, plant1.gw2.boiler2 (setpoint 55, no outdoor sensor) on a gateway assigned a
    test model v2 of its own."""
    gw1 = [("boiler1", "flow_setpoint", 1, now - 60_000, 62.5, "degC", "good"),
           ("boiler1", "outdoor_temp", 2, now - 60_000, 3.5, "degC", "good")]
    gw2 = [("boiler2", "flow_setpoint", 1, now - 60_000, 55.0, "degC", "good")]
    await hub.store.write([TelemetryItem(telemetry("plant1", "gw1", gw1), now),
                           TelemetryItem(telemetry("plant1", "gw2", gw2), now)])
    async with httpx.AsyncClient(base_url=hub.api_url, auth=admin_auth(), timeout=30) as http:
        r = await http.post("/api/v1/models", content=onnx_model(model_card(version=2, threshold=1000.0)),
                            headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        r = await http.put("/api/v1/model-assignments", json={"profile": "sim-boiler", "name": "sim-boiler-anomaly",
                                                              "version": 2, "gateway": "plant1.gw2"})
        assert r.status_code == 200, r.text


async def api_cost(hub: Any, since: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=hub.api_url, auth=admin_auth(), timeout=30) as http:
        r = await http.get(f"/api/v1/meters/{METER}/cost", params={"since": since})
        assert r.status_code == 200, r.text
        cost: dict[str, Any] = r.json()
        return cost


def estimate(used: str, rate: str) -> str:
    amount = (Decimal(used) * Decimal(rate)).quantize(Decimal("0.01"), ROUND_HALF_UP)
    return f"{amount} GBP ({Decimal(used).quantize(Decimal('0.001'))} kWh × {rate} GBP/kWh)"


async def test_meter_page_cost_statements_and_reading_dialog(mosquitto: Mosquitto, tmp_path: Path,
                                                             browser: Any) -> None:
    config = hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port)
    async with running_hub(config) as hub:
        seeded = await seed(hub)
        since = month_start(seeded["now"])
        context = await browser.new_context(viewport=DESKTOP)
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        await sign_in(page, hub.api_url, "carol")

        # The list: the meter with its cost this month (the cost API's figures, to the penny).
        await page.get_by_role("link", name="Meters").click()
        await page.wait_for_url(f"{hub.api_url}/meters")
        # The standing charge grows with the clock (a cent every ~24 min at 0.60/day): the page's
        # figures equal the API's asked just before or just after the page did.
        cost = await api_cost(hub, since)
        row = page.locator(f'tr[data-meter="{METER}"]')
        assert "1020.75" in await row.inner_text()
        listed = await row.locator("[data-total]").inner_text()
        later = await api_cost(hub, since)
        assert listed in (f"{cost['total']} GBP", f"{later['total']} GBP")
        await screenshot(page, "meters")

        # The meter page: cost by band, standing charge and VAT as the API answers them.
        await row.get_by_role("link").click()
        await page.wait_for_url(f"{hub.api_url}/meters/{METER}")
        await page.locator('#cost [data-figure="total"]').wait_for()
        costs = [cost, await api_cost(hub, since)]
        shown = await page.locator('[data-figure="total"]').inner_text()
        cost = next(c for c in costs if f"{c['total']} GBP" == shown)
        assert await page.locator('[data-figure="kwh"]').inner_text() == f"{cost['consumption_kwh']} kWh"
        assert cost["energy"], cost
        for line in cost["energy"]:
            text = await page.locator(f'#cost tr[data-band="{line["band"]}"]').inner_text()
            assert f"{line['kwh']} kWh" in text and f"{line['amount']} GBP" in text and line["rate"] in text
        standing = await page.locator('#cost tr[data-line="standing"]').inner_text()
        assert f"{cost['standing_charge'][0]['amount']} GBP" in standing
        vat = await page.locator('#cost tr[data-line="vat"]').inner_text()
        assert "VAT 5 %" in vat and f"{cost['vat'][0]['amount']} GBP" in vat
        # The closed statement with its payment status.
        number = seeded["statement"]["number"]
        st = await page.locator(f'tr[data-statement="{number}"]').inner_text()
        assert f"{seeded['statement']['total']} GBP" in st and "not paid" in st
        await screenshot(page, "meter")

        # The reading dialog: a real <dialog>; meter, previous reading, tariff and price read-only.
        await page.get_by_role("button", name="Enter a reading").click()
        dialog = page.get_by_role("dialog", name="Enter a meter reading")
        await dialog.wait_for()
        assert await page.evaluate("document.getElementById('reading-dialog').open")
        expected = {"Meter": METER, "Previous reading (kWh)": "1020.75"}
        for label in ("Meter", "Previous reading (kWh)", "Tariff", "Unit price (GBP per kWh, before VAT)"):
            field = dialog.get_by_label(label)
            before = await field.input_value()
            assert await field.get_attribute("readonly") is not None, label
            assert not await field.is_editable(), label
            await field.click()
            await page.keyboard.type("999")
            await page.keyboard.press("Backspace")
            assert await field.input_value() == before, label
            if label in expected:
                assert before == expected[label]
        rate = await dialog.get_by_label("Unit price (GBP per kWh, before VAT)").input_value()
        assert rate in ("0.1", "0.3")  # night or day, by the London clock now
        tariff = await dialog.get_by_label("Tariff").input_value()
        assert tariff == f"economy7, band {'night' if rate == '0.1' else 'day'} now"
        # The estimate follows each keystroke.
        value = dialog.get_by_label("New reading (kWh)")
        assert await value.is_editable()
        await value.click()
        await page.keyboard.type("1030")
        assert await page.locator("#r-estimate").inner_text() == estimate("9.25", rate)
        await page.keyboard.type(".75")
        assert await page.locator("#r-estimate").inner_text() == estimate("10", rate)
        await screenshot(page, "meter-dialog")

        # Too low: refused by the hub, its explanation in the live region, nothing stored.
        await value.fill("1000")
        await dialog.get_by_role("button", name="Submit reading").click()
        alert = dialog.get_by_role("alert")
        await page.locator("#reading-result", has_text="Not accepted").wait_for()
        refused = await alert.inner_text()
        assert refused.startswith("Not accepted: reading 1000 kWh is lower than the previous reading 1020.75 kWh")
        assert await value.get_attribute("aria-invalid") == "true"
        await screenshot(page, "meter-dialog-refused")
        # Implausibly high: more than 1000 kW over the hour since the previous reading.
        await value.fill("99999")
        await dialog.get_by_role("button", name="Submit reading").click()
        await page.locator("#reading-result", has_text="99999").wait_for()
        assert "Not accepted:" in await alert.inner_text()

        # A good reading: accepted, the dialog closes, the page says so and the cost is refetched.
        await value.fill("1030.75")
        await dialog.get_by_role("button", name="Submit reading").click()
        await page.locator('#page-status[data-state="accepted"]').wait_for()
        assert await page.locator("#page-status").inner_text() == (
            "Reading 1030.75 kWh accepted, 10.000 kWh since the previous reading.")
        assert not await page.evaluate("document.getElementById('reading-dialog').open")
        assert "Latest reading: 1030.75 kWh" in await page.locator("#latest").inner_text()
        after = await api_cost(hub, since)
        assert after["consumption_kwh"] != cost["consumption_kwh"]
        # (Locators, not wait_for_function: the pages' CSP forbids evaluating strings.)
        await page.locator('[data-figure="kwh"]', has_text=f"{after['consumption_kwh']} kWh").wait_for()

        # Tablet portrait: nothing wider than the screen.
        await page.set_viewport_size(TABLET)
        assert await page.evaluate("document.documentElement.scrollWidth") <= TABLET["width"]
        await screenshot(page, "meter-tablet")
        await page.get_by_role("button", name="Enter a reading").click()
        await screenshot(page, "meter-dialog-tablet")
        await context.close()

        # A technician may enter readings but sees no cost or statements (the API's roles).
        context = await browser.new_context(viewport=DESKTOP)
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        await sign_in(page, hub.api_url, "tech")
        answer = await page.goto(f"{hub.api_url}/meters/{METER}")
        assert answer is not None and answer.status == 200
        assert await page.locator("#cost-section").count() == 0
        assert "shown to billing staff only" in await page.locator("main").inner_text()
        await page.get_by_role("button", name="Enter a reading").click()
        assert await page.get_by_label("New reading (kWh)").is_editable()
        await context.close()

        # A viewer gets neither the billing pages nor the links to them.
        context = await browser.new_context(viewport=DESKTOP)
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        await sign_in(page, hub.api_url, "viewer")
        assert await page.get_by_role("link", name="Meters").count() == 0
        for path in (f"/meters/{METER}", "/meters", "/whatif"):
            answer = await page.goto(f"{hub.api_url}{path}")
            assert answer is not None and answer.status == 403, path
            assert await page.get_by_role("heading", level=1).inner_text() == "Not allowed"
            assert "1020.75" not in await page.content()
        await screenshot(page, "meter-viewer-refused")
        await context.close()


async def test_whatif_leak_and_board_report(mosquitto: Mosquitto, tmp_path: Path, browser: Any) -> None:
    config = hub_config(db_url=f"sqlite://{tmp_path}/hub.db", mqtt_port=mosquitto.port)
    async with running_hub(config) as hub:
        seeded = await seed(hub)
        await seed_boilers(hub, seeded["now"])
        context = await browser.new_context(viewport=DESKTOP, accept_downloads=True)
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        await sign_in(page, hub.api_url, "tech")

        # Board report from the fleet page: a real download, a PDF by its first bytes.
        link = page.get_by_role("link", name="Board report (PDF) for plant1")
        await link.wait_for()
        await screenshot(page, "fleet-report-link")
        async with page.expect_download(timeout=60_000) as info:
            await link.click()
        download = await info.value
        assert download.suggested_filename.startswith("board-report-plant1-")
        assert download.suggested_filename.endswith(".pdf")
        path = await download.path()
        assert Path(path).read_bytes()[:5] == b"%PDF-"
        assert await page.get_by_role("link", name="Board report (PNG)").get_attribute("href") == \
            "/api/v1/sites/plant1/report.png"

        # What-if: a leak of 0.5 bar/h; the low-pressure rule fires (the API's own test shows when).
        await page.get_by_role("link", name="What-if").click()
        await page.wait_for_url(f"{hub.api_url}/whatif")
        assert await page.get_by_label("Flow setpoint (°C)").get_attribute("min") == "30.0"
        await page.get_by_label("Leak rate (bar per hour)").fill("0.5")
        await page.get_by_label("Horizon (hours)").fill("4")
        await page.get_by_label("Outdoor temperature, daily mean (°C)").fill("5")
        await page.get_by_role("button", name="Run simulation").click()
        await page.locator('#whatif-status[data-state="done"]').wait_for()
        pressure = page.locator('#alarms li[data-alarm="boiler-pressure"]')
        text = await pressure.inner_text()
        assert "critical" in text and "pressure" in text and "below 0.8" in text and "alert rule" in text
        assert await page.locator('#alarms li[data-alarm="fault-code-1"]').count() == 1
        # Hand-drawn SVG charts, the score with its threshold line.
        for chart in ("temperatures", "pressure", "heat", "modulation", "score"):
            svg = page.locator(f'svg[data-chart="{chart}"]')
            assert await svg.get_attribute("role") == "img"
            assert await svg.locator("polyline").count() >= 1
        assert await page.locator('svg[data-chart="score"] line[data-ref="alarm threshold"]').count() == 1
        summary = page.locator("#anomaly-summary")
        assert "Anomaly model sim-boiler-anomaly v1 (the version assigned fleet-wide)" in await summary.inner_text()
        assert await summary.get_attribute("data-model-source") == "assigned"
        await screenshot(page, "whatif")

        # A boiler of the fleet: the generic one first, then each boiler by site › gateway › name.
        boiler = page.get_by_label("Boiler", exact=True)
        assert await boiler.locator("option").all_inner_texts() == [
            "Generic simulated boiler (24 kW)", "plant1 › gw1 › boiler1", "plant1 › gw2 › boiler2"]
        setpoint = page.get_by_label("Flow setpoint (°C)")
        outdoor = page.get_by_label("Outdoor temperature, daily mean (°C)")
        await boiler.select_option(label="plant1 › gw1 › boiler1")
        assert (await setpoint.input_value(), await outdoor.input_value()) == ("62.5", "3.5")
        help_text = await page.locator("#boiler-help").inner_text()
        assert "setpoint 62.5 °C" in help_text and "gateway plant1.gw1" in help_text
        # Its gateway has an own model version: the run is scored with it, and the result says so.
        await boiler.select_option(label="plant1 › gw2 › boiler2")
        assert (await setpoint.input_value(), await outdoor.input_value()) == ("55", "5")  # no outdoor sensor
        assert "No reading, generic value: outdoor temperature 5 °C" in await page.locator("#boiler-help").inner_text()
        await page.get_by_role("button", name="Run simulation").click()
        await summary.and_(page.locator('[data-model-source="gateway"]')).wait_for()
        await page.locator('#whatif-status[data-state="done"]').wait_for()
        text = await summary.inner_text()
        assert text.startswith("Boiler plant1.gw2.boiler2. Anomaly model sim-boiler-anomaly v2 "
                               "(the version gateway plant1.gw2 runs, assigned to that gateway)"), text
        assert await page.locator('#alarms li[data-alarm="boiler-pressure"]').count() == 1  # the leak is still on
        await screenshot(page, "whatif-boiler")
        # The technician changes the filled-in setpoint: the run takes it (the fleet-wide model on gw1).
        await boiler.select_option(label="plant1 › gw1 › boiler1")
        await setpoint.fill("60")
        async with page.expect_request("**/api/v1/whatif") as sent:
            await page.get_by_role("button", name="Run simulation").click()
        body = (await sent.value).post_data_json
        assert (body["device"], body["flow_setpoint_c"], body["outdoor_temp_c"]) == ("plant1.gw1.boiler1", 60, 3.5)
        await summary.filter(has_text="gateway plant1.gw1 runs, the fleet-wide assignment").wait_for()
        assert (await summary.inner_text()).startswith("Boiler plant1.gw1.boiler1. Anomaly model sim-boiler-anomaly v1")
        await page.set_viewport_size(TABLET)
        assert await page.evaluate("document.documentElement.scrollWidth") <= TABLET["width"]
        await screenshot(page, "whatif-tablet")
        # Back to the generic boiler: the generic defaults again.
        await boiler.select_option(label="Generic simulated boiler (24 kW)")
        assert (await setpoint.input_value(), await outdoor.input_value()) == ("70", "5")

        # Out of range and busy: the hub's reason / a retry message, announced.
        await page.get_by_label("Flow setpoint (°C)").fill("95")
        await page.get_by_role("button", name="Run simulation").click()
        await page.locator("#whatif-error", has_text="safe range").wait_for()
        assert (await page.get_by_role("alert").inner_text()).startswith("The simulation was refused: ")
        assert await page.locator("#whatif-status").get_attribute("data-state") == "error"
        await page.get_by_label("Flow setpoint (°C)").fill("70")

        async def busy(route: Any) -> None:
            await route.fulfill(status=429, headers={"Retry-After": "2"}, json={"detail": "busy"})

        await page.route("**/api/v1/whatif", busy)
        await page.get_by_role("button", name="Run simulation").click()
        await page.locator("#whatif-error", has_text="busy").wait_for()
        assert await page.get_by_role("alert").inner_text() == \
            "The simulator is busy with other runs. Try again in 2 seconds."
        await context.close()
