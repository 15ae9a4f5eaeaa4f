"""The what-if simulator (``POST /api/v1/whatif``, :mod:`hub.whatif`): the boiler's physics, the
hub's alert rules and the shipped anomaly model uploaded and assigned through the registry API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from hub.alerts.rules import AlertsConfig, ThresholdRule
from hub.api import ApiContext, create_app
from hub.api.whatif_routes import SLOTS
from hub.db import Database
from hub.store import Store, TelemetryItem
from hub.whatif import batch_windows, hysteresis, quantise
from hub.whatif import profile as boiler_profile
from tests.hubtools import ADMIN_PASSWORD, T0, BearerAuth, add_user, admin_auth, model_card, onnx_model, telemetry

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "shipped" / "sim-boiler-anomaly.onnx"
THRESHOLD = 5.6733  # models/shipped/sim-boiler-anomaly.card.json


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database(f"sqlite://{tmp_path}/hub.db").open()
    try:
        await add_user(database, "admin", "admin", ADMIN_PASSWORD)
        await add_user(database, "tech", "technician", "tech-password-123")
        await add_user(database, "view", "viewer", "view-password-123")
        yield database
    finally:
        await database.close()


@pytest.fixture
async def api(db: Database) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(ApiContext(db=db))
    async with httpx.AsyncClient(auth=BearerAuth("tech", "tech-password-123"), transport=httpx.ASGITransport(app=app),
                                 base_url="http://hub", timeout=30) as client:
        yield client


async def _assign_shipped(api: httpx.AsyncClient) -> None:
    """Upload the shipped model and assign it fleet-wide, as staff would (a technician may not)."""
    admin = admin_auth()
    r = await api.post("/api/v1/models", content=SHIPPED.read_bytes(), auth=admin,
                       headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    r = await api.put("/api/v1/model-assignments", auth=admin,
                      json={"profile": "sim-boiler", "name": "sim-boiler-anomaly", "version": 1})
    assert r.status_code == 200, r.text


async def _run(api: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await api.post("/api/v1/whatif", json=body)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


async def test_healthy_run_fires_nothing(api: httpx.AsyncClient) -> None:
    await _assign_shipped(api)
    res = await _run(api, horizon_h=6, seed=7, start_hour=6)
    assert res["alarms"] == []
    an = res["anomaly"]
    assert an["status"] == "scored"
    assert an["model"]["name"] == "sim-boiler-anomaly" and an["model"]["version"] == 1
    assert an["model"]["source"] == "assigned"
    assert an["threshold"] == THRESHOLD and an["first_alarm_s"] is None
    assert 0 < an["max_score"] < THRESHOLD
    # The hub's built-in boiler rules were evaluated (and none fired).
    assert {r["name"]: r["fired"] for r in res["rules"]} == {
        "boiler-pressure": False, "boiler-flue-temp-high": False, "boiler-flue-temp-rising": False}
    # Series for the page: one time axis, at most 500 points, every charted metric with its unit.
    series = res["series"]
    n = len(series["t_s"])
    assert n == 500 and series["t_s"][0] < 60 and 6 * 3600 - 60 < series["t_s"][-1] <= 6 * 3600
    metrics = series["metrics"]
    assert metrics["pressure"]["unit"] == "bar" and metrics["flow_temp"]["unit"] == "degC"
    assert all(len(m["values"]) == n for m in metrics.values())
    flow = np.array(metrics["flow_temp"]["values"])
    assert 55 < flow.mean() < 80  # holds the 70 degC setpoint within the burner's hysteresis band
    assert max(metrics["fault_code"]["values"]) == 0
    assert 0 < len(an["series"]["score"]) <= 500 and len(an["series"]["t_s"]) == len(an["series"]["score"])
    assert res["samples"] == 6 * 3600 + 1


async def test_leak_fires_low_pressure_when_the_physics_says(api: httpx.AsyncClient) -> None:
    leak = 0.5  # bar/h
    res = await _run(api, horizon_h=4, seed=3, leak_bar_per_h=leak, use_model=False)
    assert res["anomaly"]["status"] == "not_requested"
    by_name = {a["name"]: a for a in res["alarms"]}
    fired = by_name["boiler-pressure"]
    assert fired["source"] == "rule" and fired["severity"] == "critical" and fired["value"] < 0.8
    # firmware_sim.boiler: pressure = fill + 0.008 bar/K * (mean water temp - 20) - leak * t, with
    # sensor noise (sd 0.003 bar) and 1 mbar register steps. The rule (below 0.8 bar) therefore fires
    # when leak * t = fill - 0.8 + 0.008 * (Tm - 20) + noise, where the mean water temperature Tm
    # lies between the return and the flow temperature seen so far (bucket means: +-3 K margin for
    # what the averaging hides); noise within 5 sd plus one register step.
    t_fire = fired["t_s"]
    t = np.array(res["series"]["t_s"])
    until = t <= t_fire
    flow = np.array(res["series"]["metrics"]["flow_temp"]["values"])[until]
    ret = np.array(res["series"]["metrics"]["return_temp"]["values"])[until]
    fill = res["unit"]["fill_pressure_bar"]
    eps = 5 * 0.003 + 0.001
    earliest_h = (fill - 0.8 + 0.008 * (ret.min() - 3 - 20) - eps) / leak
    latest_h = (fill - 0.8 + 0.008 * (flow.max() + 3 - 20) + eps) / leak
    assert earliest_h * 3600 <= t_fire <= latest_h * 3600, (earliest_h, t_fire / 3600, latest_h)
    # Later, the boiler's own protection locks out below 0.5 bar.
    lockout = by_name["fault-code-1"]
    assert lockout["source"] == "device" and lockout["t_s"] > t_fire
    assert res["summary"]["min_pressure_bar"] < 0.5


async def test_scale_raises_the_anomaly_score_above_threshold(api: httpx.AsyncClient) -> None:
    await _assign_shipped(api)
    res = await _run(api, horizon_h=3, seed=5, start_hour=8, scale=0.6, fault_onset_h=1)
    an = res["anomaly"]
    assert an["status"] == "scored"
    # Nothing before the scale appears at 1 h; the model alarms after it.
    assert an["first_alarm_s"] is not None and 3600 < an["first_alarm_s"] < 3 * 3600
    t = np.array(an["series"]["t_s"])
    score = np.array(an["series"]["score"])
    assert score[t < 3500].max() < THRESHOLD
    assert score[t > 3600].max() > THRESHOLD
    model_alarm = [a for a in res["alarms"] if a["source"] == "model"]
    assert len(model_alarm) == 1 and model_alarm[0]["value"] > THRESHOLD
    assert model_alarm[0]["t_s"] == an["first_alarm_s"]
    # Scale insulates the heat exchanger: the flue gas runs hotter than before the onset.
    flue = np.array(res["series"]["metrics"]["flue_temp"]["values"])
    ts = np.array(res["series"]["t_s"])
    assert flue[ts > 7200].mean() > flue[ts < 3500].mean() + 15


async def test_no_model_assigned_still_runs_physics_and_rules(api: httpx.AsyncClient) -> None:
    res = await _run(api, horizon_h=1, leak_bar_per_h=3)
    assert res["anomaly"]["status"] == "no_model" and res["anomaly"]["model"] is None
    assert "no anomaly model" in res["anomaly"]["detail"]
    assert [a["name"] for a in res["alarms"] if a["source"] == "rule"] == ["boiler-pressure"]


async def test_chosen_model_unknown_is_404(api: httpx.AsyncClient) -> None:
    r = await api.post("/api/v1/whatif", json={"horizon_h": 1, "model": {"name": "sim-boiler-anomaly", "version": 9}})
    assert r.status_code == 404 and "v9" in r.json()["detail"]


@pytest.mark.parametrize("body", [
    {"flow_setpoint_c": 85},  # outside the profile's safe range 30..80
    {"flow_setpoint_c": 29.9},
    {"horizon_h": 49},
    {"horizon_h": 0},
    {"scale": 1.5},
    {"leak_bar_per_h": -1},
    {"horizon_h": 2, "fault_onset_h": 3},
    {"profile": "sim-meter"},
    {"heat_demand_kw": "lots"},
    {"unknown": 1},
])
async def test_invalid_inputs_are_422(api: httpx.AsyncClient, body: dict[str, Any]) -> None:
    r = await api.post("/api/v1/whatif", json=body)
    assert r.status_code == 422, r.text


async def test_technician_may_run_viewer_may_not(api: httpx.AsyncClient) -> None:
    r = await api.post("/api/v1/whatif", json={"horizon_h": 0.5})
    assert r.status_code == 200
    r = await api.post("/api/v1/whatif", json={"horizon_h": 0.5}, auth=BearerAuth("view", "view-password-123"))
    assert r.status_code == 403


async def test_same_seed_same_result(api: httpx.AsyncClient) -> None:
    await _assign_shipped(api)
    body = {"horizon_h": 2, "seed": 42, "scale": 0.3, "scale_ramp_h": 1, "heat_demand_kw": 8, "outdoor_temp_c": -2}
    a, b = await _run(api, **body), await _run(api, **body)
    assert a == b
    c = await _run(api, **{**body, "seed": 43})
    assert c["series"]["metrics"]["flow_temp"] != a["series"]["metrics"]["flow_temp"]
    # A constant demand is what the building takes (the boiler can deliver 8 kW at 70 degC).
    assert a["summary"]["mean_heat_demand_kw"] == pytest.approx(8.0, abs=0.3)


async def test_busy_is_429(api: httpx.AsyncClient) -> None:
    taken = 0
    while SLOTS.try_acquire():
        taken += 1
    try:
        r = await api.post("/api/v1/whatif", json={"horizon_h": 0.5})
        assert r.status_code == 429 and r.headers["Retry-After"] == "2"
    finally:
        for _ in range(taken):
            SLOTS.release()
    assert (await api.post("/api/v1/whatif", json={"horizon_h": 0.5})).status_code == 200


def test_windows_follow_the_model_contract() -> None:
    # protocol.anomaly: window [N, W, F], the last W samples oldest first, features in card order.
    values = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
    w = batch_windows(values, 4, [3, 10, 19])
    assert w.shape == (3, 4, 3) and w.dtype == np.float32 and w.flags["C_CONTIGUOUS"]
    assert (w[0] == values[0:4]).all() and (w[1] == values[7:11]).all() and (w[2] == values[16:20]).all()


def test_hysteresis_and_quantise() -> None:
    rise = np.array([0, 1, 0, 0, 0, 1, 0], dtype=bool)
    fall = np.array([1, 0, 0, 1, 0, 0, 0], dtype=bool)
    assert hysteresis(rise, fall).tolist() == [False, True, True, False, False, True, True]
    p = boiler_profile()
    assert quantise(p.point("pressure"), np.array([1.23456, -0.2])).tolist() == [1.235, 0.0]
    assert quantise(p.point("flow_temp"), np.array([70.04, -5.06])).tolist() == [70.0, -5.1]
    assert quantise(p.point("burner_on"), np.array([0.0, 1.0])).tolist() == [0.0, 1.0]


# -- a boiler of the fleet -----------------------------------------------------------------------

KINDS = {"boiler1": "boiler", "boiler2": "boiler", "boiler3": "boiler", "meter1": "meter"}
GATEWAY_MODEL = onnx_model(model_card(version=2, threshold=1000.0))  # sim-boiler-anomaly v2: a test model


async def _seed_fleet(db: Database) -> None:
    """plant1.gw1.boiler1 (setpoint 62.5, outdoor 3.5 degC; an older setpoint before), boiler3
    (outdoor -35 degC: colder than the simulator takes), plant1.gw2.boiler2 (setpoint 55, no
    outdoor sensor) and plant1.gw1.meter1 (profile sim-meter)."""
    gw1 = [("boiler1", "flow_setpoint", 1, T0, 70.0, "degC", "good"),
           ("boiler1", "flow_setpoint", 2, T0 + 60_000, 62.5, "degC", "good"),
           ("boiler1", "outdoor_temp", 3, T0 + 60_000, 3.5, "degC", "good"),
           ("boiler3", "flow_setpoint", 4, T0, 65.0, "degC", "good"),
           ("boiler3", "outdoor_temp", 5, T0, -35.0, "degC", "good"),
           ("meter1", "energy_import", 6, T0, 1000.0, "kWh", "good")]
    gw2 = [("boiler2", "flow_setpoint", 1, T0, 55.0, "degC", "good")]
    await Store(db).write([TelemetryItem(telemetry("plant1", "gw1", gw1, kinds=KINDS), T0 + 61_000),
                           TelemetryItem(telemetry("plant1", "gw2", gw2, kinds=KINDS), T0 + 61_000)])


async def _upload(api: httpx.AsyncClient, data: bytes) -> None:
    r = await api.post("/api/v1/models", content=data, auth=admin_auth(),
                       headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text


async def test_device_latest_readings_are_the_defaults_and_explicit_fields_win(
        api: httpx.AsyncClient, db: Database) -> None:
    await _seed_fleet(db)
    res = await _run(api, device="plant1.gw1.boiler1", horizon_h=0.5, use_model=False)
    assert res["device"] == "plant1.gw1.boiler1"
    assert res["from_device"] == {"flow_setpoint_c": 62.5, "outdoor_temp_c": 3.5}
    assert res["not_from_device"] == {}
    assert res["scenario"]["flow_setpoint_c"] == 62.5 and res["scenario"]["outdoor_temp_c"] == 3.5
    # The physics ran with them: the same trajectory as those values given by hand.
    by_hand = await _run(api, horizon_h=0.5, use_model=False, flow_setpoint_c=62.5, outdoor_temp_c=3.5)
    assert res["series"] == by_hand["series"] and res["alarms"] == by_hand["alarms"]
    assert by_hand["device"] is None and by_hand["from_device"] == {}

    # An explicit field wins; the other still comes from the device.
    res = await _run(api, device="plant1.gw1.boiler1", horizon_h=0.5, use_model=False, flow_setpoint_c=70)
    assert res["scenario"]["flow_setpoint_c"] == 70 and res["scenario"]["outdoor_temp_c"] == 3.5
    assert res["from_device"] == {"outdoor_temp_c": 3.5}
    res = await _run(api, device="plant1.gw1.boiler1", horizon_h=0.5, use_model=False, flow_setpoint_c=70,
                     outdoor_temp_c=-2)
    assert res["from_device"] == {} and res["scenario"]["outdoor_temp_c"] == -2

    # No outdoor sensor: the generic default, and the answer says why.
    res = await _run(api, device="plant1.gw2.boiler2", horizon_h=0.5, use_model=False)
    assert res["from_device"] == {"flow_setpoint_c": 55.0}
    assert res["not_from_device"] == {"outdoor_temp_c": "no outdoor_temp reading"}
    assert res["scenario"]["flow_setpoint_c"] == 55.0 and res["scenario"]["outdoor_temp_c"] == 5.0


async def test_device_reading_outside_what_the_simulator_takes_is_422(api: httpx.AsyncClient, db: Database) -> None:
    await _seed_fleet(db)
    r = await api.post("/api/v1/whatif", json={"device": "plant1.gw1.boiler3", "horizon_h": 0.5})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "plant1.gw1.boiler3" in detail and "outdoor_temp_c -35" in detail and "give the field" in detail
    res = await _run(api, device="plant1.gw1.boiler3", horizon_h=0.5, use_model=False, outdoor_temp_c=-30)
    assert res["from_device"] == {"flow_setpoint_c": 65.0} and res["scenario"]["outdoor_temp_c"] == -30


async def test_device_is_scored_with_its_gateways_model(api: httpx.AsyncClient, db: Database) -> None:
    await _seed_fleet(db)
    # Nothing assigned anywhere: no model, and the answer says where it looked.
    res = await _run(api, device="plant1.gw2.boiler2", horizon_h=0.5)
    assert res["anomaly"]["status"] == "no_model" and res["anomaly"]["model"] is None
    assert "gateway plant1.gw2" in res["anomaly"]["detail"] and "fleet-wide" in res["anomaly"]["detail"]

    # v1 (the shipped model) fleet-wide, v2 on gateway plant1.gw2 only.
    await _assign_shipped(api)
    await _upload(api, GATEWAY_MODEL)
    r = await api.put("/api/v1/model-assignments", auth=admin_auth(),
                      json={"profile": "sim-boiler", "name": "sim-boiler-anomaly", "version": 2,
                            "gateway": "plant1.gw2"})
    assert r.status_code == 200, r.text

    def model(res: dict[str, Any]) -> tuple[Any, ...]:
        m = res["anomaly"]["model"]
        return m["name"], m["version"], m["source"], m["gateway"], m["scope"]

    res = await _run(api, device="plant1.gw2.boiler2", horizon_h=0.5)
    assert model(res) == ("sim-boiler-anomaly", 2, "gateway", "plant1.gw2", "gateway")
    assert res["anomaly"]["status"] == "scored" and res["anomaly"]["threshold"] == 1000.0
    # A boiler of a gateway without its own assignment: the fleet-wide version that gateway runs.
    res = await _run(api, device="plant1.gw1.boiler1", horizon_h=0.5)
    assert model(res) == ("sim-boiler-anomaly", 1, "gateway", "plant1.gw1", "fleet")
    assert res["anomaly"]["threshold"] == THRESHOLD
    # No device: the fleet-wide version; an explicit model beats the device's gateway's.
    res = await _run(api, horizon_h=0.5)
    assert model(res) == ("sim-boiler-anomaly", 1, "assigned", None, "fleet")
    res = await _run(api, device="plant1.gw2.boiler2", horizon_h=0.5,
                     model={"name": "sim-boiler-anomaly", "version": 1})
    assert model(res) == ("sim-boiler-anomaly", 1, "chosen", None, None)
    assert res["from_device"] == {"flow_setpoint_c": 55.0}  # the device's defaults still apply


@pytest.mark.parametrize("uid", ["plant1.gw1.nope", "plant9.gw1.boiler1", "boiler1", "a.b.c.d"])
async def test_unknown_device_is_404(api: httpx.AsyncClient, db: Database, uid: str) -> None:
    await _seed_fleet(db)
    r = await api.post("/api/v1/whatif", json={"device": uid, "horizon_h": 0.5})
    assert r.status_code == 404, r.text
    assert r.json()["detail"] == f"unknown device {uid!r}"


async def test_device_not_a_simulated_boiler_is_422(api: httpx.AsyncClient, db: Database) -> None:
    await _seed_fleet(db)
    r = await api.post("/api/v1/whatif", json={"device": "plant1.gw1.meter1", "horizon_h": 0.5})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == ("device 'plant1.gw1.meter1' is a meter of profile 'sim-meter'; "
                                  "the what-if simulates only 'sim-boiler' boilers")


async def test_viewer_may_not_run_a_fleet_boiler(api: httpx.AsyncClient, db: Database) -> None:
    await _seed_fleet(db)
    r = await api.post("/api/v1/whatif", json={"device": "plant1.gw1.boiler1", "horizon_h": 0.5},
                       auth=BearerAuth("view", "view-password-123"))
    assert r.status_code == 403
    # Refused before the device is looked up: an unknown one is 403 as well, not 404.
    r = await api.post("/api/v1/whatif", json={"device": "plant1.gw1.nope", "horizon_h": 0.5},
                       auth=BearerAuth("view", "view-password-123"))
    assert r.status_code == 403


async def test_rules_narrowed_to_the_devices_gateway_apply_to_it(db: Database) -> None:
    await _seed_fleet(db)
    # A hotter-than-usual flow alarm only on gateway plant1.gw2 (the boilers there run 55 degC).
    rule = ThresholdRule(type="threshold", name="gw2-flow-high", site="plant1", gateway="gw2", metric="flow_temp",
                         above=50.0)
    app = create_app(ApiContext(db=db, alerts=AlertsConfig(rules=[rule])))
    async with httpx.AsyncClient(auth=BearerAuth("tech", "tech-password-123"), transport=httpx.ASGITransport(app=app),
                                 base_url="http://hub", timeout=30) as api:
        on_gw2 = await _run(api, device="plant1.gw2.boiler2", horizon_h=0.5, use_model=False, flow_setpoint_c=70)
        fired = [a for a in on_gw2["alarms"] if a["name"] == "gw2-flow-high"]
        assert len(fired) == 1 and fired[0]["source"] == "rule" and fired[0]["value"] > 50
        assert {r["name"] for r in on_gw2["rules"]} >= {"gw2-flow-high", "boiler-pressure"}
        # Same physics on gw1, or on the generic boiler: the rule does not apply there.
        for body in ({"device": "plant1.gw1.boiler1"}, {}):
            res = await _run(api, **body, horizon_h=0.5, use_model=False, flow_setpoint_c=70, outdoor_temp_c=5)
            assert "gw2-flow-high" not in {r["name"] for r in res["rules"]}
            assert res["series"] == on_gw2["series"]
