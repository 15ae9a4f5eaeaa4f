"""Alert rules: configuration (validation with file:line: key, built-ins, the documented example) and
their evaluation by the engine on a real database (SQLite; the API tests also run on PostgreSQL)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hub.alerts.engine import AlertEngine, acknowledge, clear, history
from hub.alerts.models import Alert
from hub.alerts.rules import BUILTIN_RULES, AlertsConfig, ThresholdRule
from hub.config import apply_env, parse_config
from hub.db import Database
from hub.signals import Signal, SignalBus, SignalKind
from hub.store import EventItem, StatusItem, Store, TelemetryItem
from protocol.schema import GatewayState, StatusV1
from protocol.tomlconfig import ConfigError
from tests.hubtools import T0, event, telemetry

ROOT = Path(__file__).resolve().parent.parent


def alerts_config(*rules: dict[str, Any], **extra: Any) -> AlertsConfig:
    return AlertsConfig.model_validate({"builtin_rules": False, "rules": list(rules), **extra})


PRESSURE = {"type": "threshold", "name": "pressure", "profile": "sim-boiler", "metric": "pressure",
            "below": 0.8, "above": 2.8, "clear_margin": 0.05, "severity": "critical"}


# -- configuration ------------------------------------------------------------------------------


def test_builtin_rules_replaced_and_disabled_by_name() -> None:
    default = AlertsConfig()
    assert [r.name for r in default.active_rules()] == [r.name for r in BUILTIN_RULES]
    pressure = next(r for r in default.active_rules() if r.name == "boiler-pressure")
    assert isinstance(pressure, ThresholdRule)
    assert (pressure.below, pressure.above, pressure.severity.value) == (0.8, 2.8, "critical")
    cfg = AlertsConfig.model_validate({"disabled": ["device-stale"], "rules": [{**PRESSURE, "name": "boiler-pressure",
                                                                                 "above": 2.5}]})
    names = [r.name for r in cfg.active_rules()]
    assert "device-stale" not in names and names.count("boiler-pressure") == 1
    replaced = next(r for r in cfg.active_rules() if r.name == "boiler-pressure")
    assert isinstance(replaced, ThresholdRule) and replaced.above == 2.5
    assert AlertsConfig(builtin_rules=False).active_rules() == []


def test_bad_rules_are_reported_with_line_and_key() -> None:
    text = "\n".join([
        "[alerts]",
        "evaluate_every_s = 5",
        "[[alerts.rules]]",
        'type = "threshold"',
        'name = "p"',
        'metric = "pressure"',
        "below = 3",
        "above = 1",
        "[[alerts.rules]]",
        'type = "rate"',
        'name = "r"',
        'metric = "flue_temp"',
        'max_rise_per_min = "fast"',
        "[[alerts.rules]]",
        'type = "sparkle"',
        'name = "s"',
        "[[alerts.contacts]]",
        'name = "c"',
        'email = ["not an address"]',
        "[alerts.notify]",
        "max_per_window = 0",
    ]) + "\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="hub.toml")
    problems = info.value.problems
    assert any(p.startswith("hub.toml:3: alerts.rules[0]: ") and "'below' must be less than 'above'" in p
               for p in problems), problems
    assert any(p.startswith("hub.toml:13: alerts.rules[1].max_rise_per_min: ") for p in problems), problems
    assert any(p.startswith("hub.toml:14: alerts.rules[2]: ") and "sparkle" in p for p in problems), problems
    assert any(p.startswith("hub.toml:19: alerts.contacts[0].email") for p in problems), problems
    assert any(p.startswith("hub.toml:21: alerts.notify.max_per_window: ") for p in problems), problems


def test_contact_needs_a_channel_and_names_are_unique() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[[alerts.contacts]]\nname = "c"\nsites = ["site1"]\n', source="hub.toml")
    assert info.value.problems == ["hub.toml:1: alerts.contacts[0]: a contact needs 'email', 'webhook' or both"]
    with pytest.raises(ConfigError) as info:
        parse_config('[[alerts.rules]]\ntype = "anomaly"\nname = "a"\n[[alerts.rules]]\ntype = "stale"\nname = "a"\n',
                     source="hub.toml")
    assert info.value.problems == ["hub.toml: alerts.rules: duplicate rule name(s): a"]
    with pytest.raises(ConfigError) as info:
        parse_config('[[alerts.rules]]\ntype = "anomaly"\nname = "a"\nprofile = "sim-boiler"\n', source="hub.toml")
    assert info.value.problems == [
        "hub.toml:1: alerts.rules[0]: rules of type 'anomaly' can filter by site, gateway, device only, not by profile"]


def test_documented_example_validates_and_env_overrides_keep_it() -> None:
    doc = (ROOT / "docs" / "alerts.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", doc, flags=re.S)
    assert blocks, "docs/alerts.md has no toml example"
    for block in blocks:
        cfg = parse_config(block, source="docs/alerts.md")
        assert cfg.alerts.rules or cfg.alerts.contacts
    full = parse_config(blocks[0], source="docs/alerts.md")
    again = apply_env(full, {"HUB_PORT": "8123"})  # re-validates the whole config, alerts included
    assert again.alerts == full.alerts and again.http.port == 8123


# -- evaluation ----------------------------------------------------------------------------------


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database(f"sqlite://{tmp_path}/hub.db").open()
    try:
        yield database
    finally:
        await database.close()


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def boiler(value: float, seq: int, ts: int, metric: str = "pressure", unit: str = "bar") -> TelemetryItem:
    return TelemetryItem(telemetry("site1", "gw1", [("boiler1", metric, seq, ts, value, unit, "good")]), ts)


async def alerts(db: Database) -> list[Alert]:
    with db.activate():
        return await Alert.all().order_by("id")


async def test_threshold_opens_once_counts_retriggers_and_clears_itself(db: Database) -> None:
    clock = Clock()
    engine = AlertEngine(db, alerts_config(PRESSURE), clock=clock)
    changes: list[int] = []  # the dashboard's fleet stream listens: opened and cleared, not retriggered
    engine.on_change(lambda: changes.append(clock.now))
    values = [1.5, 0.6, 0.5, 0.79,  # breach at 0.6; still low: no new trigger
              0.82,  # inside the limits but not by clear_margin: keeps the state
              1.0,  # normal again -> cleared automatically
              3.1, 3.2, 1.4, 0.7]  # two more episodes -> two more alerts
    for i, v in enumerate(values):
        clock.now = T0 + i * 1000
        await engine.evaluate_batch([boiler(v, i, T0 + i * 1000)])
    rows = await alerts(db)
    assert [(a.state, a.count, a.cleared_by, a.key) for a in rows] == [
        ("cleared", 1, "auto", "pressure:site1.gw1.boiler1"),
        ("cleared", 1, "auto", "pressure:site1.gw1.boiler1"),
        ("open", 1, None, "pressure:site1.gw1.boiler1")]
    first = rows[0]
    assert (first.severity, first.type, first.site, first.device, first.metric) == (
        "critical", "threshold", "site1", "site1.gw1.boiler1", "pressure")
    assert first.message == "site1.gw1.boiler1 pressure 0.6 bar below 0.8"
    assert (first.opened_ms, first.cleared_ms) == (T0 + 1000, T0 + 5000)
    assert rows[1].message == "site1.gw1.boiler1 pressure 3.1 bar above 2.8"
    assert rows[2].active_key == "pressure:site1.gw1.boiler1" and rows[0].active_key is None
    assert [(e["action"], e["by"]) for e in await history(db, first.id)] == [("opened", ""), ("cleared", "auto")]
    assert (engine.stats.opened, engine.stats.cleared) == (3, 2)
    assert changes == [T0 + 1000, T0 + 5000, T0 + 6000, T0 + 8000, T0 + 9000]


async def test_repeated_crossings_retrigger_the_open_alert_when_not_auto_cleared(db: Database) -> None:
    clock = Clock()
    engine = AlertEngine(db, alerts_config({**PRESSURE, "auto_clear": False}), clock=clock)
    for i, v in enumerate([0.5, 1.5, 0.4, 1.5, 3.0, 3.0, 1.5]):  # three crossings
        clock.now = T0 + i * 1000
        await engine.evaluate_batch([boiler(v, i, T0 + i * 1000)])
    (alert,) = await alerts(db)
    assert (alert.state, alert.count, alert.last_value, alert.opened_ms, alert.last_triggered_ms) == (
        "open", 3, 3.0, T0, T0 + 4000)
    assert [e["action"] for e in await history(db, alert.id)] == ["opened", "retriggered", "retriggered"]

    acked = await acknowledge(db, alert.id, "alice", T0 + 10_000, note="on my way")
    assert (acked.state, acked.acknowledged_by, acked.acknowledged_ms) == ("acknowledged", "alice", T0 + 10_000)
    clock.now = T0 + 11_000
    await engine.evaluate_batch([boiler(0.3, 20, T0 + 11_000)])  # breach again while acknowledged
    (alert,) = await alerts(db)
    assert (alert.state, alert.count) == ("acknowledged", 4)
    cleared = await clear(db, alert.id, "bob", T0 + 12_000)
    assert (cleared.state, cleared.cleared_by, cleared.active_key) == ("cleared", "bob", None)
    await engine.evaluate_batch([boiler(1.5, 21, T0 + 13_000), boiler(0.2, 22, T0 + 14_000)])
    rows = await alerts(db)
    assert [(a.state, a.count) for a in rows] == [("cleared", 4), ("open", 1)]


async def test_restart_keeps_open_conditions(db: Database) -> None:
    engine = AlertEngine(db, alerts_config(PRESSURE), clock=Clock())
    await engine.evaluate_batch([boiler(0.5, 1, T0)])
    again = AlertEngine(db, alerts_config(PRESSURE), clock=Clock(T0 + 5000))
    await again.start()
    try:
        await again.evaluate_batch([boiler(0.4, 2, T0 + 1000)])  # still low: not a new trigger
        (alert,) = await alerts(db)
        assert (alert.state, alert.count) == ("open", 1)
        await again.evaluate_batch([boiler(1.5, 3, T0 + 2000)])
        (alert,) = await alerts(db)
        assert alert.state == "cleared"
    finally:
        await again.stop()


async def test_rate_of_change_over_a_window(db: Database) -> None:
    rule = {"type": "rate", "name": "flue-rising", "metric": "flue_temp", "max_rise_per_min": 5.0, "window_s": 120}
    clock = Clock()
    engine = AlertEngine(db, alerts_config(rule), clock=clock)
    # 2 K/min for 3 minutes: fine. Then 12 K/min: the 2-minute slope passes 5 K/min.
    temps = [60 + 2 * i / 6 for i in range(19)]  # every 10 s
    temps += [temps[-1] + 2 * (i + 1) for i in range(18)]
    for i, t in enumerate(temps):
        clock.now = T0 + i * 10_000
        await engine.evaluate_batch([boiler(t, i, T0 + i * 10_000, "flue_temp", "degC")])
        if i == 18:
            assert await alerts(db) == []
    (alert,) = await alerts(db)
    assert (alert.type, alert.state, alert.count) == ("rate", "open", 1)
    assert alert.message.startswith("site1.gw1.boiler1 flue_temp rising ")
    assert "degC/min over 120 s (limit 5)" in alert.message
    assert alert.last_value is not None and alert.last_value > 5.0


async def test_data_gap_is_one_alert_per_gap_counted(db: Database) -> None:
    rule = {"type": "gap", "name": "energy-gap", "kind": "meter", "metric": "energy_import", "max_gap_s": 60}
    engine = AlertEngine(db, alerts_config(rule), clock=Clock())

    def meter(seq: int, ts: int) -> TelemetryItem:
        return TelemetryItem(telemetry("site1", "gw1", [("m1", "energy_import", seq, ts, 100.0 + seq, "kWh", "good")],
                                       kinds={"m1": "meter"}), ts)

    await engine.evaluate_batch([meter(0, T0), meter(1, T0 + 30_000)])
    assert await alerts(db) == []
    await engine.evaluate_batch([meter(2, T0 + 230_000)])  # 200 s hole
    await engine.evaluate_batch([meter(2, T0 + 230_000)])  # the same batch redelivered: nothing new
    await engine.evaluate_batch([meter(3, T0 + 240_000), meter(4, T0 + 400_000)])  # another hole
    (alert,) = await alerts(db)
    assert (alert.type, alert.state, alert.count, alert.last_value, alert.severity) == ("gap", "open", 2, 160.0,
                                                                                          "warning")
    assert alert.message == "site1.gw1.m1 energy_import: no data for 160 s (limit 60 s)"


async def test_anomaly_events_open_and_clear(db: Database) -> None:
    engine = AlertEngine(db, alerts_config({"type": "anomaly", "name": "edge-anomaly", "severity": "critical"}),
                         clock=Clock())
    started = event("site1", "gw1", "anomaly_started", T0, device="boiler1", details={"score": 4.5},
                    message="score 4.5 above 2.5")
    await engine.evaluate_batch([], [], [EventItem(started, T0)])
    await engine.evaluate_batch([], [], [EventItem(started, T0)])  # redelivered
    (alert,) = await alerts(db)
    assert (alert.state, alert.count, alert.last_value, alert.device) == ("open", 1, 4.5, "site1.gw1.boiler1")
    assert alert.message == "site1.gw1.boiler1 edge anomaly: score 4.5 above 2.5 (score 4.5)"
    cleared = event("site1", "gw1", "anomaly_cleared", T0 + 60_000, device="boiler1", details={"score": 0.5})
    await engine.evaluate_batch([], [], [EventItem(cleared, T0 + 60_000)])
    late = event("site1", "gw1", "anomaly_started", T0 - 5000, device="boiler1")  # older than the clear
    await engine.evaluate_batch([], [], [EventItem(late, T0 + 61_000)])
    (alert,) = await alerts(db)
    assert (alert.state, alert.cleared_by) == ("cleared", "auto")


async def test_human_error_signal_raises_an_alert(db: Database) -> None:
    bus = SignalBus()
    engine = AlertEngine(db, alerts_config({"type": "human_error", "name": "human-error"}), clock=Clock())
    await engine.start()
    bus.subscribe(engine.on_signal)
    try:
        for i in range(2):
            await bus.emit(Signal(kind=SignalKind.HUMAN_ERROR, ts_ms=T0 + i, site="site1",
                                  device="site1.gw1.meter1", message="reading 120 kWh is below the previous 150 kWh",
                                  details={"value": "120.000" if i else 120.0, "previous": "150.000"}))
        await engine.drain(5)
    finally:
        await engine.stop()
    (alert,) = await alerts(db)
    assert (alert.type, alert.state, alert.count, alert.last_value, alert.key) == (
        "human_error", "open", 2, 120.0, "human-error:site1.gw1.meter1")
    assert alert.message == "possible human error: reading 120 kWh is below the previous 150 kWh"
    assert (alert.site, alert.gateway, alert.device) == ("site1", "gw1", "site1.gw1.meter1")


async def test_stale_devices_and_offline_gateways_on_the_timer(db: Database) -> None:
    store = Store(db)
    await store.write([boiler(1.5, 1, T0)], [
        StatusItem(StatusV1(site="site1", gateway="gw1", state=GatewayState.ONLINE, ts=T0), T0)])
    await store.write([TelemetryItem(telemetry("site2", "gw9", [("b9", "pressure", 1, T0, 1.5, "bar", "good")]), T0)])
    clock = Clock(T0 + 10_000)
    engine = AlertEngine(db, alerts_config({"type": "stale", "name": "stale", "after_s": 30},
                                           {"type": "gateway_offline", "name": "gw-offline", "site": "site1",
                                            "after_s": 60}), clock=clock)
    await engine.sweep()
    assert await alerts(db) == []
    clock.now = T0 + 45_000
    await engine.sweep()
    assert sorted((a.key, a.state) for a in await alerts(db)) == [
        ("stale:site1.gw1.boiler1", "open"), ("stale:site2.gw9.b9", "open")]
    await engine.sweep()  # still stale: no re-trigger
    await store.write([boiler(1.5, 2, T0 + 46_000)], [
        StatusItem(StatusV1(site="site1", gateway="gw1", state=GatewayState.OFFLINE, ts=T0 + 46_000), T0 + 46_000)])
    clock.now = T0 + 47_000
    await engine.sweep()
    got = {a.key: (a.state, a.count, a.type) for a in await alerts(db)}
    assert got == {"stale:site1.gw1.boiler1": ("cleared", 1, "stale"), "stale:site2.gw9.b9": ("open", 1, "stale"),
                   "gw-offline:site1.gw1": ("open", 1, "gateway_offline")}
    gw = next(a for a in await alerts(db) if a.type == "gateway_offline")
    assert (gw.message, gw.severity, gw.device, gw.gateway) == (
        "gateway site1.gw1 offline: its status says offline", "warning", "", "gw1")


async def test_engine_errors_never_reach_ingest(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = AlertEngine(db, alerts_config(PRESSURE, queue_max_batches=2), clock=Clock())
    await engine.start()

    async def broken(*_: object, **__: object) -> None:
        raise RuntimeError("database on fire")

    monkeypatch.setattr(engine, "evaluate_batch", broken)
    try:
        for i in range(5):  # the hook never raises, also when the queue is full
            engine.on_batch([boiler(0.5, i, T0 + i)], [], [])
        await engine.drain(5)
        assert engine.stats.errors >= 1 and engine.stats.batches_skipped >= 1
        assert engine.stats.errors + engine.stats.batches_skipped == 5
    finally:
        await engine.stop()


async def test_a_database_without_alert_tables_gets_them_at_start(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/old.db"
    async with Database(url) as old:  # a database of the schema before alerts: no alert tables
        await Store(old).write([boiler(1.5, 1, T0)])
        with old.activate():
            await old.conn.execute_script('DROP TABLE "alert_event"; DROP TABLE "alert"')
    async with Database(url) as db:
        engine = AlertEngine(db, alerts_config(PRESSURE), clock=Clock())
        await engine.evaluate_batch([boiler(0.5, 2, T0 + 1000)])
        assert [(a.key, a.state) for a in await alerts(db)] == [("pressure:site1.gw1.boiler1", "open")]
        with db.activate():
            rows = await db.conn.execute_query_dict("SELECT COUNT(*) AS n FROM reading")
        assert rows[0]["n"] == 1
