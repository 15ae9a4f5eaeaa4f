"""The twin picture (issue 8 item 4): per-part health from readings, anomalies and alerts, drawn as
SVG and PNG, served by ``/api/v1/devices/{id}/health``, ``twin.svg`` and ``twin.png``.

The pictures of the seeded cases are kept under ``var/test-artifacts/twin/`` for a look by eye.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from hub.alerts.models import Alert
from hub.api import ApiContext, create_app
from hub.config import StatusConfig
from hub.db import Database
from hub.queries import AnomalyState
from hub.store import EventItem, Store, TelemetryItem
from hub.twin.drawing import COLOURS, HEIGHT, WIDTH, layout, render_png, render_svg
from hub.twin.health import THRESHOLDS, AlertInfo, Reading, Status, assess, component_ids
from tests.hubtools import ADMIN_PASSWORD, T0, add_user, admin_auth, event, telemetry

NOW = T0 + 3_600_000
ARTIFACTS = Path(__file__).resolve().parent.parent / "var" / "test-artifacts" / "twin"
SVG = "{http://www.w3.org/2000/svg}"

HEALTHY: dict[str, Any] = {"flow_temp": 68.0, "return_temp": 52.0, "pressure": 1.6, "flue_temp": 62.0,
                           "modulation": 45.0, "water_flow": 1.1, "burner_on": True, "fault_code": 0,
                           "outdoor_temp": 4.0}
UNITS = {"flow_temp": "degC", "return_temp": "degC", "pressure": "bar", "flue_temp": "degC", "modulation": "%",
         "water_flow": "m3/h", "burner_on": "", "fault_code": "", "outdoor_temp": "degC"}
BOILER_PARTS = ("burner", "heat_exchanger", "flue", "pump", "expansion_vessel", "relief_valve", "flow_pipe",
                "return_pipe")


def boiler(name: str, ts: int, **changes: Any) -> TelemetryItem:
    values = {**HEALTHY, **changes}
    return TelemetryItem(telemetry("plant1", "gw1", [
        (name, m, i, ts, v, UNITS[m], "good") for i, (m, v) in enumerate(values.items())]), ts)


async def _seed(db: Database) -> None:
    """healthy, lowpressure (0.62 bar), anomalous (edge anomaly active), alerted (open flue alert,
    values normal), stale (last readings 20 minutes old)."""
    store = Store(db)
    fresh = NOW - 5_000
    await store.write([
        boiler("healthy", fresh), boiler("lowpressure", fresh, pressure=0.62),
        boiler("anomalous", fresh), boiler("alerted", fresh, flue_temp=84.0),
        boiler("stale", NOW - 20 * 60_000),
    ])
    await store.write([], [], [
        EventItem(event("plant1", "gw1", "anomaly_started", NOW - 600_000, device="anomalous",
                        details={"score": 4.2}), NOW - 600_000),
        # healthy had an anomaly that has cleared since: no trace in its health
        EventItem(event("plant1", "gw1", "anomaly_started", NOW - 900_000, device="healthy",
                        details={"score": 3.0}), NOW - 900_000),
        EventItem(event("plant1", "gw1", "anomaly_cleared", NOW - 800_000, device="healthy"), NOW - 800_000),
    ])
    with db.activate():
        await Alert.create(key="boiler-flue-temp-rising:plant1.gw1.alerted",
                           active_key="boiler-flue-temp-rising:plant1.gw1.alerted", rule="boiler-flue-temp-rising",
                           type="rate", severity="warning", state="acknowledged", site="plant1", gateway="gw1",
                           device="plant1.gw1.alerted", metric="flue_temp",
                           message="plant1.gw1.alerted flue_temp rising 12.0 degC/min", opened_ms=NOW - 120_000,
                           last_triggered_ms=NOW - 60_000, last_value=84.0)
        # cleared alerts do not count
        await Alert.create(key="boiler-pressure:plant1.gw1.healthy", active_key=None, rule="boiler-pressure",
                           type="threshold", severity="critical", state="cleared", site="plant1", gateway="gw1",
                           device="plant1.gw1.healthy", metric="pressure", message="old",
                           opened_ms=NOW - 500_000, last_triggered_ms=NOW - 500_000, last_value=0.7,
                           cleared_ms=NOW - 400_000, cleared_by="auto")


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    db = await Database(f"sqlite://{tmp_path}/hub.db").open()
    try:
        await _seed(db)
        await add_user(db, "admin", "admin", ADMIN_PASSWORD)
        app = create_app(ApiContext(db=db, status=StatusConfig(stale_after_s=120, offline_after_s=600),
                                    clock=lambda: NOW))
        async with httpx.AsyncClient(auth=admin_auth(), transport=httpx.ASGITransport(app=app),
                                     base_url="http://hub") as client:
            yield client
    finally:
        await db.close()


async def _health(api: httpx.AsyncClient, name: str) -> dict[str, Any]:
    r = await api.get(f"/api/v1/devices/plant1.gw1.{name}/health")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert [c["id"] for c in body["components"]] == list(BOILER_PARTS)
    return body


def _parts(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in body["components"]}


async def test_healthy_boiler_is_all_ok(api: httpx.AsyncClient) -> None:
    body = await _health(api, "healthy")
    assert (body["id"], body["kind"], body["layout"], body["status"]) == ("plant1.gw1.healthy", "boiler", "boiler",
                                                                          "ok")
    assert body["summary"] == "All parts working normally."
    assert body["notes"] == [] and body["as_of"] == "2025-11-25T15:00:00.000Z"
    parts = _parts(body)
    assert {p["status"] for p in parts.values()} == {"ok"}
    assert parts["expansion_vessel"]["reason"] == (
        "Pressure 1.6 bar, within the normal 1.0-2.5 bar: the vessel absorbs the expansion.")
    assert parts["expansion_vessel"]["reading"] == "1.6 bar"
    assert parts["burner"]["reason"] == "Burning at 45 % of full power, no faults."
    assert parts["pump"]["reason"] == "Moving 1.1 m³ of water an hour round the radiators."
    assert parts["flue"]["reason"] == "Flue gas 62 °C: the heat goes into the water, not up the chimney."
    assert parts["return_pipe"]["reason"] == "Water comes back from the radiators at 52 °C, 16 °C cooler than it left."
    assert parts["relief_valve"]["reason"] == (
        "Pressure 1.6 bar, well below the 3.0 bar at which this safety valve opens.")


async def test_low_pressure_is_the_expansion_vessel(api: httpx.AsyncClient) -> None:
    body = await _health(api, "lowpressure")
    parts = _parts(body)
    assert body["status"] == "act" and body["summary"] == "Needs action: Expansion vessel."
    assert parts["expansion_vessel"]["status"] == "act"
    assert parts["expansion_vessel"]["reason"] == (
        "Pressure 0.6 bar, far below the 1.0 bar it needs: the expansion vessel or a leak is losing water; "
        "the boiler will soon shut down.")
    # low pressure is not the relief valve's business
    assert parts["relief_valve"]["status"] == "ok"
    assert {k for k, p in parts.items() if p["status"] != "ok"} == {"expansion_vessel"}


async def test_active_anomaly_puts_the_parts_on_watch(api: httpx.AsyncClient) -> None:
    body = await _health(api, "anomalous")
    why = ("The anomaly detector finds this boiler's readings unusual together (score 4.2) since "
           "25 Nov 14:50 UTC; an engineer should look.")
    assert body["status"] == "watch" and body["notes"] == [why]
    for part in body["components"]:
        assert part["status"] == "watch"
        assert part["reason"].endswith(" " + why)
    assert _parts(body)["flue"]["reason"].startswith("Flue gas 62 °C: the heat goes into the water")


async def test_open_alert_lands_on_its_part(api: httpx.AsyncClient) -> None:
    body = await _health(api, "alerted")
    parts = _parts(body)
    assert body["status"] == "watch" and body["notes"] == []
    assert parts["flue"]["status"] == "watch"
    assert parts["flue"]["reason"] == ("Flue gas 84 °C: the heat goes into the water, not up the chimney. "
                                       "Open alert (warning): plant1.gw1.alerted flue_temp rising 12.0 degC/min.")
    assert {k for k, p in parts.items() if p["status"] != "ok"} == {"flue"}


async def test_stale_readings_are_unknown(api: httpx.AsyncClient) -> None:
    body = await _health(api, "stale")
    assert body["status"] == "unknown"
    for part in body["components"]:
        assert (part["status"], part["reason"]) == ("unknown", "No reading for 20 minutes.")


async def test_unknown_device_is_404(api: httpx.AsyncClient) -> None:
    for suffix in ("health", "twin.svg", "twin.png"):
        r = await api.get(f"/api/v1/devices/plant1.gw1.nope/{suffix}")
        assert (r.status_code, r.json()) == (404, {"detail": "unknown device 'plant1.gw1.nope'"})


def _svg_parts(svg: str) -> dict[str, ET.Element]:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg" and root.get("role") == "img"
    assert root.get("viewBox") == f"0 0 {WIDTH} {HEIGHT}"
    return {g.get("data-component", ""): g for g in root.iter(f"{SVG}g") if g.get("data-component")}


@pytest.mark.parametrize("name", ["healthy", "lowpressure", "anomalous", "alerted", "stale"])
async def test_svg_has_each_part_with_status_and_reason(api: httpx.AsyncClient, name: str) -> None:
    health = _parts(await _health(api, name))
    r = await api.get(f"/api/v1/devices/plant1.gw1.{name}/twin.svg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/svg+xml"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{name}.svg").write_text(r.text, encoding="utf-8")
    root = ET.fromstring(r.text)
    assert root.get("aria-label", "").startswith(f"Boiler plant1.gw1.{name}: ")
    groups = _svg_parts(r.text)
    assert sorted(groups) == sorted(BOILER_PARTS)
    for cid, g in groups.items():
        status = health[cid]["status"]
        assert g.get("id") == f"twin-{cid}"
        assert f"twin-status-{status}" in (g.get("class") or "").split()
        title = g.find(f"{SVG}title")
        assert title is not None and health[cid]["reason"] in (title.text or "")
        # the status colour fills (or strokes, for pipes) the part's shapes
        shapes = [e for e in g.iter() if "twin-shape" in (e.get("class") or "")]
        assert shapes and all(COLOURS[Status(status)] in (e.get("fill"), e.get("stroke")) for e in shapes)
        # not by colour alone: a pattern over every part that is not ok, and the status in words
        texts = " ".join(t.text or "" for t in g.iter(f"{SVG}text"))
        words = {"ok": "OK", "watch": "Keep an eye on", "act": "Needs action", "unknown": "No data"}[status]
        assert words in texts
        patterned = any("twin-pat-" in (e.get("fill", "") + e.get("stroke", "")) for e in g.iter())
        assert patterned == (status != "ok")


def _near(pixel: tuple[int, ...], colour: str, tol: int = 40) -> bool:
    rgb = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return all(abs(int(a) - b) <= tol for a, b in zip(pixel[:3], rgb, strict=True))


def _share(img: Image.Image, box: tuple[int, int, int, int], colour: str) -> float:
    """Share of the pixels of a grid over ``box`` (x0, y0, x1, y1) that have ``colour``."""
    pts = [(x, y) for x in range(box[0], box[2], 3) for y in range(box[1], box[3], 3)]
    rgb = img.convert("RGB")
    return sum(_near(rgb.getpixel(p), colour) for p in pts) / len(pts)  # type: ignore[arg-type]


async def test_png_is_the_same_picture(api: httpx.AsyncClient) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    images = {}
    for name in ("healthy", "lowpressure", "anomalous", "alerted", "stale"):
        r = await api.get(f"/api/v1/devices/plant1.gw1.{name}/twin.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
        (ARTIFACTS / f"{name}.png").write_bytes(r.content)
        images[name] = Image.open(io.BytesIO(r.content))
        assert images[name].size == (WIDTH, HEIGHT)
    vessel = layout("boiler").part("expansion_vessel").shapes[1]
    box = (int(vessel.x) + 8, int(vessel.y) + 12, int(vessel.x + vessel.w) - 8, int(vessel.y) + 45)  # type: ignore[union-attr]
    assert _share(images["lowpressure"], box, COLOURS[Status.ACT]) > 0.5
    assert _share(images["healthy"], box, COLOURS[Status.OK]) > 0.9
    assert _share(images["stale"], box, COLOURS[Status.UNKNOWN]) > 0.5
    assert _share(images["anomalous"], box, COLOURS[Status.WATCH]) > 0.5
    # the flue is watched on the alerted boiler, the vessel is not
    flue = layout("boiler").part("flue").shapes[0]
    fbox = (int(flue.x) + 6, int(flue.y) + 10, int(flue.x + flue.w) - 6, int(flue.y + flue.h) - 10)  # type: ignore[union-attr]
    assert _share(images["alerted"], fbox, COLOURS[Status.WATCH]) > 0.5
    assert _share(images["alerted"], box, COLOURS[Status.OK]) > 0.9
    r = await api.get("/api/v1/devices/plant1.gw1.healthy/twin.png", params={"scale": 2})
    assert Image.open(io.BytesIO(r.content)).size == (2 * WIDTH, 2 * HEIGHT)


# --- rules without a database -----------------------------------------------------------------

def _boiler(**changes: Any) -> dict[str, Reading]:
    return {m: Reading(v, NOW - 1000) for m, v in {**HEALTHY, **changes}.items()}


def _status(h: Any) -> dict[str, str]:
    return {c.id: c.status.value for c in h.components if c.status != Status.OK}


def test_boiler_rules_each_part() -> None:
    def run(**changes: Any) -> Any:
        return assess("s.g.b", "boiler", _boiler(**changes), now_ms=NOW)

    h = run(pressure=2.9)
    assert _status(h) == {"expansion_vessel": "watch", "relief_valve": "act"}
    assert h.component("relief_valve").reason == (
        "Pressure 2.9 bar, close to the 3.0 bar at which this valve opens and dumps water.")
    assert _status(run(pressure=0.9)) == {"expansion_vessel": "watch"}
    h = run(fault_code=1, water_flow=0.0, burner_on=False, modulation=0.0, pressure=0.45)
    assert _status(h) == {"burner": "act", "pump": "act", "expansion_vessel": "act"}
    assert h.component("burner").reason == ("Burner locked out (fault 1): it shut itself down because the water "
                                            "pressure is too low.")
    assert h.component("pump").reason == "Stopped by the low-pressure safety cut-out: no heat reaches the radiators."
    assert _status(run(water_flow=0.1)) == {"pump": "act"}
    assert run(water_flow=0.0, burner_on=False, modulation=0.0).component("pump").reason == (
        "Resting: no heat is needed right now.")
    assert _status(run(flue_temp=95.0)) == {"flue": "watch", "heat_exchanger": "watch"}
    assert _status(run(flue_temp=112.0)) == {"flue": "act", "heat_exchanger": "act"}
    assert _status(run(flow_temp=93.0, return_temp=80.0, flue_temp=100.0)) == {
        "heat_exchanger": "act", "flow_pipe": "act", "return_pipe": "watch", "flue": "watch"}
    h = run(return_temp=58.0, flue_temp=98.0)  # 40 K above the return: scale
    assert h.component("heat_exchanger").status == Status.WATCH
    assert "scale may be building up" in h.component("heat_exchanger").reason
    # missing metrics are unknown, a bad reading says so
    readings = _boiler()
    del readings["water_flow"]
    readings["pressure"] = Reading(None, NOW - 1000, "bar", "bad")
    h = assess("s.g.b", "boiler", readings, now_ms=NOW)
    assert h.component("pump").reason == "This device does not report its water flow."
    assert h.component("expansion_vessel").reason == "The pressure sensor gives no valid reading (bad)."
    assert _status(h) == {"pump": "unknown", "expansion_vessel": "unknown", "relief_valve": "unknown"}
    h = assess("s.g.b", "boiler", {}, now_ms=NOW)
    assert {c.reason for c in h.components} == {"No reading has ever arrived from this device."}


def test_alerts_map_to_parts_and_beat_unknown() -> None:
    high = AlertInfo("critical", "pressure", "pressure 2.9 above 2.8", value=2.9)
    h = assess("s.g.b", "boiler", _boiler(pressure=2.6), now_ms=NOW, alerts=[high])
    assert _status(h) == {"relief_valve": "act", "expansion_vessel": "watch"}
    stale = AlertInfo("warning", "", "plant1.gw1.b silent for 600 s", type="stale")
    old = {m: Reading(v, NOW - 3 * 3600_000) for m, v in HEALTHY.items()}
    h = assess("s.g.b", "boiler", old, now_ms=NOW, alerts=[stale])
    assert set(_status(h).values()) == {"watch"} and len(_status(h)) == len(BOILER_PARTS)
    assert h.component("pump").reason == "No reading for 3 hours. Open alert (warning): plant1.gw1.b silent for 600 s."
    assert h.notes == ("Open alert (warning): plant1.gw1.b silent for 600 s.",)
    # an inactive anomaly says nothing
    assert assess("s.g.b", "boiler", _boiler(), now_ms=NOW, anomaly=AnomalyState(False, 1.0, NOW)).status == Status.OK


def test_meter_tank_and_generic() -> None:
    good = {"energy_import": 12345.6, "power": 3.2, "voltage": 231.0, "frequency": 50.01}
    h = assess("s.g.m", "meter", {m: Reading(v, NOW) for m, v in good.items()}, now_ms=NOW)
    assert h.layout == "meter" and h.status == Status.OK and component_ids("meter") == ("meter", "supply", "tamper")
    assert h.component("meter").reason == "Counting: 12,346 kWh used so far, now drawing 3.2 kW."
    assert h.component("supply").reason == "Mains supply steady at 231 V."
    assert h.component("tamper").reason == "No sign of interference."
    bad = {**good, "voltage": 200.0, "tamper": True}
    h = assess("s.g.m", "meter", {m: Reading(v, NOW) for m, v in bad.items()}, now_ms=NOW)
    assert _status(h) == {"supply": "act", "tamper": "act"}
    h = assess("s.g.t", "tank", {"pressure": Reading(0.3, NOW)}, now_ms=NOW)
    assert h.layout == "tank" and _status(h) == {"vessel": "act"}
    assert h.component("vessel").reason == "Pressure 0.3 bar: nearly empty, whatever it feeds will run dry."
    assert _status(assess("s.g.t", "pipeline", {"pressure": Reading(9.7, NOW)}, now_ms=NOW)) == {
        "vessel": "watch", "tank_relief": "act"}
    h = assess("s.g.x", "pump-station", {"rpm": Reading(1450.0, NOW - 600_000)}, now_ms=NOW)
    assert h.layout == "generic" and h.component("device").reason == "No reading for 10 minutes."
    assert THRESHOLDS["boiler.pressure_act_low"].value == 0.8  # the built-in alert level


@pytest.mark.parametrize("kind, readings", [
    ("meter", {"energy_import": 100.0, "voltage": 250.0}),
    ("tank", {"pressure": 0.8}),
    ("generic", {"x": 1.0}),
])
def test_other_layouts_render(kind: str, readings: dict[str, float]) -> None:
    h = assess(f"plant1.gw1.{kind}", kind, {m: Reading(v, NOW) for m, v in readings.items()}, now_ms=NOW)
    svg = render_svg(h)
    assert sorted(_svg_parts(svg)) == sorted(component_ids(h.layout))
    png = render_png(h)
    assert Image.open(io.BytesIO(png)).size == (WIDTH, HEIGHT)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{kind}.svg").write_text(svg, encoding="utf-8")
    (ARTIFACTS / f"{kind}.png").write_bytes(png)
