"""Labelled simulator data (models.simdata) and the per-fault evaluation harness (models.evaluate_sim)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from firmware_sim.boiler import BoilerModel
from firmware_sim.server import _encode_saturated
from models.evaluate_sim import (
    Plan,
    Tally,
    alarm_states,
    card_kind,
    evaluate_model,
    evaluate_scores,
    open_session,
    plan_scenarios,
    rising_edges,
    score_series,
)
from models.simdata import (
    EVAL_SEED_BASE,
    FAULTS,
    MODEL_INPUTS,
    STREAMS,
    TRAIN_SEEDS,
    FaultSpec,
    Kind,
    Series,
    UnitParams,
    draw_fault,
    fault_series,
    metric_units,
    normal_series,
    profile_of,
    quantise,
    sliding_windows,
)
from protocol import codec
from tests.onnx_models import make_card, make_model

ROOT = Path(__file__).resolve().parents[1]


def col(series: Series, metric: str) -> np.ndarray:
    return series.values[:, series.metrics.index(metric)]


# --- generation ---


@pytest.mark.parametrize("kind", ["boiler", "meter"])
def test_same_seed_same_arrays(kind: Kind) -> None:
    a = normal_series(kind, 3, 0.5)
    b = normal_series(kind, 3, 0.5)
    c = normal_series(kind, 4, 0.5)
    assert a.values.dtype == np.float32 and a.values.shape == (1800, len(a.metrics))
    assert np.array_equal(a.values, b.values) and np.array_equal(a.t_s, b.t_s)
    assert not np.array_equal(a.values, c.values)
    assert a.params == b.params != c.params
    assert not a.label.any() and a.fault is None and a.onset_s is None
    assert set(MODEL_INPUTS[kind]) <= set(a.metrics)
    f1 = fault_series(kind, FAULTS[kind][0], 3, 0.5, 0.1)
    f2 = fault_series(kind, FAULTS[kind][0], 3, 0.5, 0.1)
    assert np.array_equal(f1.values, f2.values) and np.array_equal(f1.label, f2.label)


def test_units_vary_with_the_seed() -> None:
    params = [normal_series("boiler", s, 0.01).params for s in range(40)]
    outdoor = [float(p["outdoor_mean"]) for p in params]
    setpoints = [float(p["flow_setpoint"]) for p in params]
    assert min(outdoor) >= -5 and max(outdoor) <= 12 and max(outdoor) - min(outdoor) > 8
    assert min(setpoints) >= 60 and max(setpoints) <= 75 and len(set(setpoints)) > 10
    assert len({p["building_ua"] for p in params}) == 40
    assert len({p["start_hour"] for p in params}) > 30


def test_leak_lowers_pressure_by_rate_times_hours_and_nothing_else() -> None:
    normal = normal_series("boiler", 11, 2.0)
    leak = fault_series("boiler", "leak", 11, 2.0, onset_h=0.5, severity=0.1)
    onset = int(np.argmax(leak.label))
    assert leak.onset_s == 1800.0 and onset == 1800 and leak.label[onset:].all() and not leak.label[:onset].any()
    assert np.array_equal(normal.values[:onset], leak.values[:onset])  # identical before the onset
    drop = col(normal, "pressure") - col(leak, "pressure")
    assert drop[-1] == pytest.approx(0.1 * 1.5, abs=0.005)
    assert drop[onset + 1800] == pytest.approx(0.1 * 0.5, abs=0.005)
    assert np.all(np.diff(drop[onset:]) >= -0.0025)  # grows (up to rounding and sensor noise)
    for m in ("flow_temp", "return_temp", "flue_temp", "modulation", "burner_on", "outdoor_temp"):
        assert np.array_equal(col(normal, m), col(leak, m)), m  # pressure above 0.5 bar: no lockout


@pytest.mark.parametrize(("kind", "metric"), [("boiler", "flow_temp"), ("boiler", "pressure"), ("meter", "power"),
                                              ("meter", "voltage")])
def test_stuck_sensor_freezes_only_while_stuck(kind: Kind, metric: str) -> None:
    normal = normal_series(kind, 5, 1.0)
    stuck = fault_series(kind, f"stuck_{metric}", 5, 1.0, onset_h=0.25, duration_h=0.25)
    assert (stuck.onset_s, stuck.end_s) == (900.0, 1800.0)
    assert np.array_equal(np.flatnonzero(stuck.label), np.arange(900, 1800))
    v, n = col(stuck, metric), col(normal, metric)
    assert np.all(v[899:1800] == v[899]) and v[899] == n[899]  # frozen at the last live reading
    assert len(np.unique(n[900:1800])) > 2
    assert np.array_equal(v[:899], n[:899]) and np.array_equal(v[1800:], n[1800:])  # physics untouched
    others = [i for i, m in enumerate(stuck.metrics) if m != metric]
    assert np.array_equal(stuck.values[:, others], normal.values[:, others])


def test_tamper_slows_the_counter_but_not_the_power() -> None:
    normal = normal_series("meter", 8, 2.0)
    tamper = fault_series("meter", "tamper", 8, 2.0, onset_h=1.0, severity=0.4)
    onset = int(np.argmax(tamper.label))
    assert onset == 3600
    assert np.array_equal(col(normal, "power"), col(tamper, "power"))
    assert np.array_equal(normal.values[:onset], tamper.values[:onset])
    e_n, e_t = col(normal, "energy_import").astype(np.float64), col(tamper, "energy_import").astype(np.float64)
    used = e_n[-1] - e_n[onset]
    assert used > 1.0
    assert e_t[-1] - e_t[onset] == pytest.approx(0.6 * used, abs=0.03)


def test_scale_raises_flue_temperature_and_ramps() -> None:
    normal = normal_series("boiler", 2, 6.0)
    step = fault_series("boiler", "scale_step", 2, 6.0, onset_h=1.0, severity=0.5)
    ramp = fault_series("boiler", "scale_ramp", 2, 6.0, onset_h=1.0, severity=0.6, ramp_h=4.0)
    onset = 3600
    for s in (step, ramp):
        assert np.array_equal(s.values[:onset], normal.values[:onset]) and s.label[onset:].all()
    flue_n, flue_s, flue_r = col(normal, "flue_temp"), col(step, "flue_temp"), col(ramp, "flue_temp")
    on = col(step, "burner_on")[onset + 600 :] == 1
    assert (flue_s[onset + 600 :] - flue_n[onset + 600 :])[on].mean() > 10  # + 50 K x scale when burning
    early = slice(onset, onset + 1800)  # scale < 0.075 in the first half hour of the ramp
    late = slice(onset + 4 * 3600, None)  # ramp done: scale 0.6
    assert abs(np.mean(flue_r[early]) - np.mean(flue_n[early])) < 5
    assert np.mean(flue_r[late]) - np.mean(flue_n[late]) > 10


def test_drawn_faults_are_within_the_documented_ranges() -> None:
    for seed in range(EVAL_SEED_BASE, EVAL_SEED_BASE + 30):
        ramp = draw_fault("boiler", "scale_ramp", seed, 24.0)
        assert 2.4 <= ramp.onset_h <= 7.2 and 0.4 <= ramp.severity <= 0.7 and 6 <= ramp.ramp_h <= 12
        assert 0.3 <= draw_fault("boiler", "scale_step", seed, 24.0).severity <= 0.6
        assert 0.02 <= draw_fault("boiler", "leak", seed, 24.0).severity <= 0.2
        assert 0.2 <= draw_fault("meter", "tamper", seed, 24.0).severity <= 0.6
        stuck = draw_fault("meter", "stuck_power", seed, 24.0)
        assert stuck.duration_h is not None and 2 <= stuck.duration_h <= 8
    assert draw_fault("boiler", "leak", 1, 1.0, min_onset_h=0.5).onset_h == 0.5
    with pytest.raises(ValueError, match="unknown"):
        draw_fault("meter", "leak", 1, 1.0)
    with pytest.raises(ValueError, match="severity"):
        FaultSpec("tamper", 1.0, severity=1.5)
    assert EVAL_SEED_BASE not in TRAIN_SEEDS


# --- register encoding ---


@pytest.mark.parametrize("kind", ["boiler", "meter"])
def test_quantise_is_the_simulator_encoding_decoded(kind: Kind) -> None:
    rng = np.random.default_rng(0)
    for p in profile_of(kind).points:
        values = np.concatenate([rng.uniform(-50, 500, 300), rng.normal(0, 1, 300), [0.05, 0.15, 0.25, 1e9, -1e9]])
        if p.type == "bool":
            values = (values > 0).astype(float)
        got = quantise(p, values)
        want = [float(codec.decode(p, _encode_saturated(p, float(v)))) for v in values]
        assert np.array_equal(got.astype(np.float32), np.array(want, dtype=np.float32)), p.name


def test_series_values_are_what_the_edge_decodes() -> None:
    unit = UnitParams(start_hour=7.0, outdoor_mean=0.0, flow_setpoint=65.0)
    series = normal_series("boiler", 6, 0.1, unit=unit, warmup_h=0.0)
    model = BoilerModel(6, stream=STREAMS["boiler"], start_hour=7.0, flow_setpoint=65.0, outdoor_mean=0.0)
    points = profile_of("boiler").points
    for i in range(len(series)):
        if i:
            model.step(1.0)
        want = [float(codec.decode(p, codec.encode(p, model.reading[p.name]))) for p in points]
        assert np.array_equal(series.values[i], np.array(want, dtype=np.float32))
    assert np.allclose(col(series, "flow_temp") * 10, np.round(col(series, "flow_temp") * 10), atol=1e-3)
    assert np.allclose(col(series, "pressure") * 1000, np.round(col(series, "pressure") * 1000), atol=1e-2)


def test_a_longer_period_samples_the_same_physics() -> None:
    fine = fault_series("boiler", "leak", 9, 1.0, onset_h=0.5, severity=0.2)
    coarse = fault_series("boiler", "leak", 9, 1.0, onset_h=0.5, severity=0.2, period_s=5.0)
    assert coarse.period_s == 5.0 and len(coarse) == 720
    assert np.array_equal(coarse.values, fine.values[::5])
    assert np.array_equal(coarse.label, fine.label[::5])


def test_sliding_windows_layout() -> None:
    values = np.arange(20, dtype=np.float32).reshape(10, 2)
    w = sliding_windows(values, 4)
    assert w.shape == (7, 4, 2)
    assert np.array_equal(w[0], values[0:4]) and np.array_equal(w[-1], values[6:10])


# --- evaluation figures on hand-built scores ---


def hand_series(n: int, fault: str | None = None, onset: int | None = None, end: int | None = None,
                period: float = 60.0) -> Series:
    t = np.arange(n) * period
    label = np.zeros(n, dtype=bool)
    if onset is not None:
        label[onset : end if end is not None else n] = True
    return Series(kind="boiler", seed=0, metrics=(), values=np.zeros((n, 0), np.float32), t_s=t, label=label,
                  fault=fault, onset_s=None if onset is None else onset * period,
                  end_s=None if end is None else end * period, period_s=period)


def test_alarm_hysteresis() -> None:
    scores = np.array([np.nan, 0, 5, 2, 2, 0.5, 5, np.nan, 2, 0, 4])
    assert alarm_states(scores, 3.0, 1.0).tolist() == [False, False, True, True, True, False, True, True, True,
                                                       False, True]
    assert alarm_states(scores, 3.0).tolist() == [False, False, True, False, False, False, True, True, False,
                                                  False, True]
    assert rising_edges(alarm_states(scores, 3.0, 1.0)) == 3
    # clear_at above the threshold: active clears at <= clear_at, inactive rises at > threshold (edge rule).
    odd = np.array([4.0, 4.0, 6.0, 5.0, np.nan, 4.0])
    assert alarm_states(odd, 3.0, 5.0).tolist() == [True, False, True, False, False, True]
    assert rising_edges(np.array([True, True, False, True])) == 2


def test_figures_known_detection_delay_and_false_alarms() -> None:
    day = 1440  # one day at one sample per minute
    normal = np.zeros(day)
    normal[:9] = np.nan  # a 10-sample window: the first 9 samples are not scored
    normal[100:105] = 5  # episode 1
    normal[200] = 5  # episode 2 ...
    normal[201:210] = 2  # ... held by the hysteresis (clear at 1)
    normal[300] = 5  # episode 3
    runs: list[tuple[Series, np.ndarray]] = [(hand_series(day), normal)]
    for delay in (10, 20, 30, 40):
        s = np.zeros(day)
        s[500 + delay :] = 5
        s[50] = 5  # a false alarm before the onset is no detection
        runs.append((hand_series(day, "leak", 500), s))
    missed = np.zeros(day)
    missed[50] = 5
    runs.append((hand_series(day, "leak", 500), missed))
    after = np.zeros(day)
    after[800] = 5  # alarm only after the stuck sensor read live again: missed
    runs.append((hand_series(day, "stuck_pressure", 500, 700), after))
    during = np.zeros(day)
    during[699] = 5
    runs.append((hand_series(day, "stuck_pressure", 500, 700), during))

    result = evaluate_scores(runs, threshold=3.0, clear_at=1.0)
    assert result["normal_scenarios"] == 1 and result["false_alarms"] == 3
    scored_days = (day - 9) / 1440
    assert result["device_days_normal"] == pytest.approx(scored_days, abs=1e-4)
    assert result["false_alarms_per_device_day"] == pytest.approx(3 / scored_days, abs=1e-3)
    assert result["normal_fraction_flagged"] == pytest.approx((5 + 10 + 1) / (day - 9), abs=1e-6)
    leak = result["faults"]["leak"]
    assert (leak["scenarios"], leak["detected"], leak["detection_rate"]) == (5, 4, 0.8)
    assert leak["delay_min_p50"] == 25.0 and leak["delay_min_p90"] == 37.0
    stuck = result["faults"]["stuck_pressure"]
    assert (stuck["scenarios"], stuck["detected"], stuck["delay_min_p50"]) == (2, 1, 199.0)
    assert result["detection_rate_mean"] == pytest.approx((0.8 + 0.5) / 2)

    tally = Tally(3.0, 1.0)
    assert tally.add(*runs[1]) == {"seed": 0, "fault": "leak", "alarm_episodes": 2, "detected": True,
                                   "delay_min": 10.0}


# --- scoring a real ONNX model ---


def test_score_series_batches_windows_in_order() -> None:
    card = make_card("sim-boiler", window=7)
    session = open_session(make_model(card, "last", metric="pressure"))
    series = normal_series("boiler", 1, 0.2)
    for batch_elements in (1, 7 * 8 * 13, 1 << 22):  # one window per run, 13 per run, all at once
        scores = score_series(session, card, series, batch_elements)
        assert np.isnan(scores[:6]).all()
        assert np.array_equal(scores[6:], col(series, "pressure")[6:].astype(np.float64))


def test_card_must_match_the_profile() -> None:
    assert card_kind(make_card("sim-meter")) == "meter"
    units = metric_units("boiler")
    with pytest.raises(ValueError, match="reads it in"):
        card_kind(make_card("sim-boiler", [("flow_temp", "K" if units["flow_temp"] != "K" else "degC")]))
    with pytest.raises(ValueError, match="not a metric"):
        card_kind(make_card("sim-boiler", [("voltage", "V")]))
    with pytest.raises(ValueError, match="simulator profile"):
        card_kind(make_card("iec-meter", [("voltage", "V")]))


def test_plan_uses_held_out_seeds_only() -> None:
    specs = plan_scenarios("meter", Plan(days=2, hours=12, faults_per_kind=3))
    seeds = [s.seed for s in specs]
    assert len(specs) == 4 + 3 * 3 and len(set(seeds)) == len(seeds) and min(seeds) >= EVAL_SEED_BASE
    assert [s.fault.name if s.fault else None for s in specs[:5]] == [None] * 4 + ["tamper"]
    with pytest.raises(ValueError, match="training"):
        plan_scenarios("meter", Plan(), seed=5)


def test_evaluate_model_detects_a_stuck_power_reading() -> None:
    # Score = -(max - min) of power over the window: a frozen reading scores 0 > -0.001.
    card = make_card("sim-meter", window=30, threshold=-0.001)
    model = make_model(card, "range", metric="power", scale=-1.0)
    runs: list[dict[str, object]] = []
    result = evaluate_model(model, Plan(days=0.25, hours=1.0, faults_per_kind=2), faults=["stuck_power", "tamper"],
                            workers=1, runs=runs)
    assert result["false_alarms"] == 0 and result["normal_fraction_flagged"] == 0.0
    assert result["faults"]["stuck_power"] == {"scenarios": 2, "detected": 2, "detection_rate": 1.0,
                                               "delay_min_p50": round(28 / 60, 3), "delay_min_p90": round(28 / 60, 3)}
    assert result["faults"]["tamper"]["detected"] == 0
    assert len(runs) == 6 + 4


def test_cli_end_to_end(tmp_path: Path) -> None:
    # A model that always alarms: one episode per normal run, every fault detected at once.
    card = make_card("sim-boiler", window=20, threshold=0.5)
    path = tmp_path / "always.onnx"
    path.write_bytes(make_model(card, "constant", value=1.0))
    proc = subprocess.run(
        [sys.executable, "-m", "models.evaluate_sim", "--model", str(path), "--quick", "--days", "0.25",
         "--hours", "1", "--faults-per-kind", "1", "--workers", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "stuck_flue_temp" in proc.stdout and "false alarms/device-day" in lines[1]
    result = json.loads(lines[-1])
    assert {"model", "device_days_normal", "false_alarms_per_device_day", "faults"} <= set(result)
    assert result["model"] == str(path) and result["profile"] == "sim-boiler" and result["seed"] == EVAL_SEED_BASE
    n_normal = 6  # 0.25 days of 1 h runs
    assert result["normal_scenarios"] == n_normal and result["false_alarms"] == n_normal
    assert result["device_days_normal"] == pytest.approx(n_normal * (3600 - 19) / 86_400, abs=1e-4)
    assert result["false_alarms_per_device_day"] == pytest.approx(n_normal / result["device_days_normal"], rel=1e-3)
    assert result["normal_fraction_flagged"] == 1.0
    assert set(result["faults"]) == set(FAULTS["boiler"])
    for figures in result["faults"].values():
        assert figures == {"scenarios": 1, "detected": 1, "detection_rate": 1.0, "delay_min_p50": 0.0,
                           "delay_min_p90": 0.0}


def test_cli_refuses_a_model_without_card(tmp_path: Path) -> None:
    path = tmp_path / "nocard.onnx"
    path.write_bytes(make_model(make_card(), "constant", embed_card=False))
    proc = subprocess.run([sys.executable, "-m", "models.evaluate_sim", "--model", str(path), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "no model card" in proc.stderr
