"""Physics and fault switches of the simulated devices (no network)."""

from __future__ import annotations

import statistics

import pytest

from firmware_sim.boiler import (
    FAULT_FLUE_OVERTEMP,
    FAULT_LOW_PRESSURE,
    FAULT_NONE,
    FAULT_OVERHEAT,
    FLOW_SETPOINT_MAX,
    FLOW_SETPOINT_MIN,
    BoilerModel,
)
from firmware_sim.meter import ENERGY_ROLLOVER_KWH, MeterModel
from firmware_sim.model import DeviceModel, FaultError
from protocol import codec
from protocol.profile import builtin_profile


def run(model: DeviceModel, steps: int, dt: float) -> list[dict[str, float | int | bool]]:
    out = []
    for _ in range(steps):
        model.step(dt)
        out.append(dict(model.reading))
    return out


def quantized(model: DeviceModel) -> dict[str, float | int | bool | str]:
    profile = builtin_profile(model.profile_name)
    return {p.name: codec.decode(p, codec.encode(p, model.reading[p.name])) for p in profile.points}


@pytest.mark.parametrize("cls", [BoilerModel, MeterModel])
def test_models_cover_their_profiles(cls: type[BoilerModel] | type[MeterModel]) -> None:
    model = cls(1)
    profile = builtin_profile(model.profile_name)
    assert profile.profile.kind == model.kind
    assert {p.name for p in profile.points if p.table == "input"} == set(model.metrics)
    assert {p.name for p in profile.points if p.writable} == set(model.settings)
    assert set(model.reading) == {p.name for p in profile.points}
    for _ in range(2000):  # every value must stay encodable (ranges, signs)
        model.step(30.0)
        quantized(model)


def test_setpoint_limits_match_profile() -> None:
    point = builtin_profile("sim-boiler").point("flow_setpoint")
    assert (point.min, point.max) == (FLOW_SETPOINT_MIN, FLOW_SETPOINT_MAX)
    boiler = BoilerModel(1)
    assert boiler.reading["flow_setpoint"] == 70.0
    with pytest.raises(ValueError):
        boiler.write_setting("flow_setpoint", 95.0)
    with pytest.raises(ValueError):
        boiler.write_setting("modulation", 50.0)


@pytest.mark.parametrize("cls", [BoilerModel, MeterModel])
def test_same_seed_same_trajectory(cls: type[BoilerModel] | type[MeterModel]) -> None:
    a = run(cls(7), 500, 10.0)
    b = run(cls(7), 500, 10.0)
    assert a == b
    c = run(cls(8), 500, 10.0)
    assert c != a
    d = run(cls(7, stream=1), 500, 10.0)
    assert d != a
    # Values actually move (a constant trajectory would make the comparisons meaningless).
    assert len({r["power" if cls is MeterModel else "flow_temp"] for r in a}) > 100


def test_meter_energy_is_integral_of_power() -> None:
    meter = MeterModel(3, start_kwh=1234.5)
    dt = 10.0
    integral = 0.0
    for _ in range(8640):  # one simulated day
        integral += meter.power * dt / 3600.0
        meter.step(dt)
    assert meter.sim_time == pytest.approx(86_400.0)
    assert meter.energy_import - 1234.5 == pytest.approx(integral, rel=1e-12, abs=1e-9)
    assert meter.reading["energy_import"] == meter.energy_import
    assert 30.0 < integral < 400.0  # a small building: tens to hundreds of kWh per day


def test_meter_electrics_are_plausible() -> None:
    meter = MeterModel(5)
    rows = run(meter, 2880, 30.0)
    for r in rows:
        assert 0.85 <= r["power_factor"] <= 0.99
        assert 49.95 <= r["frequency"] <= 50.05
        assert 220.0 < r["voltage"] < 240.0
        assert r["current"] == pytest.approx(r["power"] * 1000 / (3 * r["voltage"] * r["power_factor"]))
    noon = statistics.mean(r["power"] for r in rows[22 * 60 : 26 * 60])  # 11:00-13:00
    night = statistics.mean(r["power"] for r in rows[4 * 60 : 8 * 60])  # 02:00-04:00
    assert noon > night + 3.0


def test_meter_register_rolls_over() -> None:
    point = builtin_profile("sim-meter").point("energy_import")
    meter = MeterModel(2, start_kwh=42_949_672.90)
    assert codec.decode(point, codec.encode(point, meter.reading["energy_import"])) == 42_949_672.90
    served = []
    while meter.energy_import < ENERGY_ROLLOVER_KWH + 0.02:
        meter.step(1.0)
        served.append(codec.decode(point, codec.encode(point, meter.reading["energy_import"])))
    assert max(served) >= 42_949_672.94
    assert served[-1] < 1.0
    assert quantized(meter)["energy_import"] < 1.0


def test_tamper_stops_or_reduces_counting() -> None:
    clean, stopped, partial = MeterModel(4), MeterModel(4, faults={"tamper": "on"}), MeterModel(4)
    partial.set_fault("tamper", 0.7)
    for _ in range(2000):
        for m in (clean, stopped, partial):
            m.step(15.0)
        assert stopped.reading["power"] == clean.reading["power"]
    assert clean.energy_import > 5.0
    assert stopped.energy_import == 0.0
    assert stopped.true_kwh == pytest.approx(clean.energy_import)
    assert partial.energy_import == pytest.approx(0.3 * clean.energy_import)
    stopped.set_fault("tamper", 0)
    before = stopped.energy_import
    stopped.step(60.0)
    assert stopped.energy_import > before


def test_scale_raises_flue_temperature() -> None:
    clean, scaled = BoilerModel(11, start_hour=6.0), BoilerModel(11, start_hour=6.0, faults={"scale": 0.5})
    a = run(clean, 2160, 10.0)[360:]  # skip the first hour
    b = run(scaled, 2160, 10.0)[360:]
    flue_clean = statistics.mean(r["flue_temp"] for r in a if r["burner_on"])
    flue_scaled = statistics.mean(r["flue_temp"] for r in b if r["burner_on"])
    assert flue_scaled > flue_clean + 15.0
    # Less heat reaches the water, so the burner works harder for the same building.
    assert statistics.mean(r["modulation"] for r in b) > statistics.mean(r["modulation"] for r in a)


def test_leak_lowers_pressure_then_locks_out() -> None:
    clean, leaky = BoilerModel(12), BoilerModel(12, faults={"leak": 0.3})
    for _ in range(720):  # 2 h
        clean.step(10.0)
        leaky.step(10.0)
    assert clean.state.pressure - leaky.state.pressure == pytest.approx(0.6, abs=1e-6)
    assert 1.7 < clean.reading["pressure"] < 2.1  # 1.5 bar cold plus thermal expansion
    assert leaky.reading["fault_code"] == FAULT_NONE
    hours = 2.0
    while leaky.reading["fault_code"] == FAULT_NONE:
        leaky.step(10.0)
        hours += 10.0 / 3600.0
        assert hours < 8.0, "leak never tripped the low-pressure protection"
    assert leaky.reading["fault_code"] == FAULT_LOW_PRESSURE
    assert leaky.reading["pressure"] < 0.55
    assert 4.0 < hours < 5.5  # from ~1.9 bar warm to 0.5 bar at 0.3 bar/h: ~4.7 h
    run(leaky, 60, 10.0)
    assert leaky.reading["burner_on"] is False
    assert leaky.reading["modulation"] == 0.0
    assert leaky.reading["water_flow"] == 0.0  # pump stopped too
    leaky.set_fault("leak", 0)
    leaky.refill()
    run(leaky, 60, 10.0)
    assert leaky.reading["fault_code"] == FAULT_NONE


def test_overheat_trips_fault_2() -> None:
    boiler = BoilerModel(1)
    run(boiler, 10, 10.0)
    boiler.state.flow_temp = 97.0
    boiler.step(1.0)
    assert boiler.reading["fault_code"] == FAULT_OVERHEAT
    assert boiler.reading["burner_on"] is False


def test_heavy_scale_trips_flue_protection() -> None:
    boiler = BoilerModel(19, flow_setpoint=80.0, faults={"scale": 1.0})
    clean = BoilerModel(19, flow_setpoint=80.0)
    codes = {r["fault_code"] for r in run(boiler, 2160, 10.0)}
    assert FAULT_FLUE_OVERTEMP in codes
    assert {r["fault_code"] for r in run(clean, 2160, 10.0)} == {FAULT_NONE}


def test_stuck_freezes_a_metric() -> None:
    boiler = BoilerModel(13, start_hour=6.0)
    run(boiler, 30, 10.0)
    frozen = boiler.reading["flow_temp"]
    boiler.set_fault("stuck", "flow_temp")
    reported, actual = set(), set()
    for _ in range(300):
        boiler.step(10.0)
        reported.add(boiler.reading["flow_temp"])
        actual.add(round(boiler.state.flow_temp, 2))
    assert reported == {frozen}
    assert len(actual) > 10  # the physics carries on underneath
    assert boiler.active_faults() == {"stuck": "flow_temp"}
    boiler.set_fault("stuck", "none")
    rows = run(boiler, 50, 10.0)
    assert len({r["flow_temp"] for r in rows}) > 10


def test_drift_offsets_a_metric_linearly() -> None:
    clean, drifting = BoilerModel(14), BoilerModel(14, faults={"drift": 1.5, "drift_metric": "return_temp"})
    run(clean, 720, 10.0)
    run(drifting, 720, 10.0)
    assert drifting.reading["return_temp"] - clean.reading["return_temp"] == pytest.approx(3.0)
    assert drifting.reading["flow_temp"] == clean.reading["flow_temp"]
    assert drifting.active_faults() == {"drift": 1.5, "drift_metric": "return_temp"}


def test_flow_setpoint_changes_steady_state() -> None:
    low, high = BoilerModel(15, start_hour=6.0), BoilerModel(15, start_hour=6.0)
    low.write_setting("flow_setpoint", 50.0)
    a = run(low, 1080, 10.0)[720:]  # 06:00-09:00, keep the last hour
    b = run(high, 1080, 10.0)[720:]
    assert statistics.mean(r["flow_temp"] for r in a) == pytest.approx(50.0, abs=2.0)
    assert statistics.mean(r["flow_temp"] for r in b) == pytest.approx(70.0, abs=2.0)
    assert all(r["flow_setpoint"] == 50.0 for r in a)
    # Cooler water: more condensing, so cooler flue gas.
    assert statistics.mean(r["flue_temp"] for r in a) < statistics.mean(r["flue_temp"] for r in b) - 10


def test_demand_higher_in_the_morning_than_at_night() -> None:
    boiler = BoilerModel(16)
    demand: dict[int, list[float]] = {}
    burner: dict[int, list[float]] = {}
    for _ in range(8640):
        boiler.step(10.0)
        hour = int(boiler.hour_of_day)
        demand.setdefault(hour, []).append(boiler.heat_demand_kw)
        burner.setdefault(hour, []).append(float(boiler.reading["modulation"]))
    night = statistics.mean(demand[2] + demand[3])
    morning = statistics.mean(demand[7] + demand[8])
    evening = statistics.mean(demand[19] + demand[20])
    assert morning > 2.5 * night
    assert evening > 1.5 * night
    assert statistics.mean(burner[7] + burner[8]) > statistics.mean(burner[2] + burner[3]) + 10
    # Low night demand is below the burner's minimum output: it cycles on and off.
    assert boiler.reading["burner_starts"] > 3
    assert 5.0 < boiler.reading["operating_hours"] < 24.0


def test_weather_compensation() -> None:
    mild, cold = BoilerModel(17, outdoor_mean=12.0), BoilerModel(17, outdoor_mean=-5.0)
    run(mild, 1000, 30.0)
    run(cold, 1000, 30.0)
    assert cold.heat_demand_kw > mild.heat_demand_kw


def test_fault_switch_errors() -> None:
    boiler = BoilerModel(1)
    with pytest.raises(FaultError, match="unknown fault 'tamper'"):
        boiler.set_fault("tamper", 1)
    with pytest.raises(FaultError, match="scale"):
        boiler.set_fault("scale", "lots")
    with pytest.raises(FaultError):
        boiler.set_fault("scale", 2.0)
    with pytest.raises(FaultError, match="flow_setpoint"):
        boiler.set_fault("stuck", "flow_setpoint")
    with pytest.raises(FaultError):
        MeterModel(1, faults={"leak": 0.1})
    assert boiler.active_faults() == {}


def test_steps_are_independent_of_faults_noise() -> None:
    # Faults must not change the random draws: otherwise the comparisons above would be noise.
    a, b = BoilerModel(18), BoilerModel(18, faults={"scale": 1.0, "stuck": "pressure"})
    run(a, 100, 10.0)
    run(b, 100, 10.0)
    assert a.reading["outdoor_temp"] == b.reading["outdoor_temp"]
    assert a.heat_demand_kw == b.heat_demand_kw
