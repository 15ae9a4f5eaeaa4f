"""Health of a device's parts, in words a board member understands (docs/twin.md).

Each component of the twin picture (burner, heat exchanger, flue, pump, ... of a boiler; meter,
supply, tamper of a meter; vessel, relief valve, pipes of a pressure tank or pipeline) gets a status
``ok`` / ``watch`` / ``act`` / ``unknown`` and one plain sentence saying why, from three sources:

* the device's newest reading of each metric (:func:`hub.queries.latest`), against the limits in
  :data:`THRESHOLDS` — the one table of numbers, documented line by line in docs/twin.md;
* its anomaly state (:func:`hub.queries.anomaly_states`): an active anomaly turns every part that
  looks fine on its own into ``watch`` (the edge models score all metrics together, they cannot
  say which part is odd);
* its alerts that are not cleared (:class:`hub.alerts.models.Alert`): critical → ``act``,
  warning / info → ``watch``, on the parts whose metric the alert is about (every part when it
  names no metric we can place).

A reading older than ``stale_after_s`` (``[status]`` of hub.toml), missing or of bad quality makes
its part ``unknown`` ("no reading for 14 minutes"): known problems (alerts) still show over it.

:func:`assess` is pure (tests, the report); :func:`device_health` loads what it needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum

from hub import queries
from hub.alerts.models import Alert, AlertState
from hub.db import Database


class Status(StrEnum):
    """Health of one component, best to worst as the picture ranks them."""

    OK = "ok"
    UNKNOWN = "unknown"
    WATCH = "watch"
    ACT = "act"


# Worse wins when several rules speak about one part; a known problem outranks not knowing.
_RANK = {Status.OK: 0, Status.UNKNOWN: 1, Status.WATCH: 2, Status.ACT: 3}

STATUS_WORDS: dict[Status, str] = {
    Status.OK: "OK", Status.WATCH: "Keep an eye on", Status.ACT: "Needs action", Status.UNKNOWN: "No data"}
"""How the picture and the report name each status."""


def worst(statuses: Sequence[Status]) -> Status:
    """The worst status of ``statuses`` (``ok`` when empty)."""
    return max(statuses, key=_RANK.__getitem__, default=Status.OK)


@dataclass(frozen=True, slots=True)
class Limit:
    """One number of a health rule."""

    value: float
    unit: str
    meaning: str


# THE table of health thresholds (docs/twin.md explains each). Boiler numbers follow the simulated
# SB-24 boiler (firmware_sim/boiler.py) and the built-in alert rules (hub/alerts/rules.py): filled to
# ~1.5 bar, alert below 0.8 / above 2.8 bar, lock-out below 0.5 bar, relief valve at 3 bar, overheat
# lock-out at 95 degC flow, flue alert at 110 and lock-out at 120 degC.
THRESHOLDS: dict[str, Limit] = {
    "boiler.pressure_act_low": Limit(0.8, "bar", "below this the boiler is about to lock out (0.5 bar)"),
    "boiler.pressure_watch_low": Limit(1.0, "bar", "a sealed heating system needs at least this much"),
    "boiler.pressure_watch_high": Limit(2.5, "bar", "hot systems rarely go above this"),
    "boiler.pressure_act_high": Limit(2.8, "bar", "close to the 3 bar at which the relief valve opens"),
    "boiler.relief_opens": Limit(3.0, "bar", "pressure at which the relief valve dumps water"),
    "boiler.flow_watch": Limit(85.0, "degC", "flow water this hot is close to the overheat cut-out"),
    "boiler.flow_act": Limit(92.0, "degC", "the boiler cuts out at 95 degC"),
    "boiler.flue_watch": Limit(90.0, "degC", "flue gas this hot means heat escapes up the chimney"),
    "boiler.flue_act": Limit(110.0, "degC", "alert level; the burner locks out at 120 degC"),
    "boiler.scale_watch": Limit(35.0, "K", "flue gas this much hotter than the return water: scale build-up"),
    "boiler.scale_act": Limit(50.0, "K", "heavy scale: the heat exchanger passes heat on poorly"),
    "boiler.return_watch": Limit(65.0, "degC", "return water this hot: radiators give back little heat"),
    "boiler.pump_min_flow": Limit(0.5, "m3/h", "the pump moves ~1.1 m3/h; less while the burner fires is a fault"),
    "meter.voltage_act_low": Limit(207.0, "V", "230 V - 10 %, the legal minimum"),
    "meter.voltage_watch_low": Limit(216.0, "V", "230 V - 6 %"),
    "meter.voltage_watch_high": Limit(244.0, "V", "230 V + 6 %"),
    "meter.voltage_act_high": Limit(253.0, "V", "230 V + 10 %, the legal maximum"),
    "meter.frequency_watch": Limit(0.2, "Hz", "grid frequency further than this from 50 Hz"),
    "meter.frequency_act": Limit(1.0, "Hz", "grid frequency further than this from 50 Hz"),
    "tank.pressure_act_low": Limit(0.5, "bar", "nearly empty: whatever it feeds runs dry"),
    "tank.pressure_watch_low": Limit(1.0, "bar", "lower than a working tank should be"),
    "tank.pressure_watch_high": Limit(8.0, "bar", "higher than a working tank should be"),
    "tank.pressure_act_high": Limit(9.5, "bar", "close to the 10 bar at which the relief valve opens"),
    "tank.relief_opens": Limit(10.0, "bar", "pressure at which the tank's relief valve opens"),
}


def _t(name: str) -> float:
    return THRESHOLDS[name].value


@dataclass(frozen=True, slots=True)
class Reading:
    """The newest value of one metric."""

    value: float | bool | str | None
    ts_ms: int
    unit: str = ""
    quality: str = "good"


@dataclass(frozen=True, slots=True)
class AlertInfo:
    """What health needs of an alert that is not cleared."""

    severity: str
    metric: str
    message: str
    type: str = "threshold"
    value: float | None = None
    """The value that last triggered it (``Alert.last_value``)."""


@dataclass(frozen=True, slots=True)
class Component:
    """One part of the picture and its health."""

    id: str
    label: str
    status: Status
    reason: str
    reading: str = ""
    """The short value the picture prints next to the part ("1.5 bar"), "" when none."""


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    """Health of every component of one device."""

    device: str
    kind: str
    layout: str
    """Which drawing: ``boiler``, ``meter``, ``tank`` or ``generic``."""
    status: Status
    summary: str
    components: tuple[Component, ...]
    as_of_ms: int
    notes: tuple[str, ...] = field(default=())

    def component(self, cid: str) -> Component:
        """The component with id ``cid``."""
        return next(c for c in self.components if c.id == cid)


@dataclass(frozen=True, slots=True)
class _Part:
    id: str
    label: str
    rule: Callable[[_Values], tuple[Status, str]]
    reading: Callable[[_Values], str] = lambda v: ""


class _Values:
    """Numeric view of the fresh, good readings."""

    def __init__(self, readings: Mapping[str, Reading]) -> None:
        self.readings = readings

    def num(self, metric: str) -> float:
        value = self.readings[metric].value
        if isinstance(value, bool):
            return 1.0 if value else 0.0
        if isinstance(value, int | float):
            return float(value)
        raise KeyError(metric)

    def get(self, metric: str) -> float | None:
        try:
            return self.num(metric)
        except KeyError:
            return None


def _f(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}f}"


# --- boiler rules -----------------------------------------------------------------------------

def _pressure_vessel(v: _Values) -> tuple[Status, str]:
    p = v.num("pressure")
    if p < _t("boiler.pressure_act_low"):
        return Status.ACT, (f"Pressure {_f(p)} bar, far below the {_f(_t('boiler.pressure_watch_low'))} bar it needs: "
                            "the expansion vessel or a leak is losing water; the boiler will soon shut down")
    if p < _t("boiler.pressure_watch_low"):
        return Status.WATCH, (f"Pressure {_f(p)} bar, below the {_f(_t('boiler.pressure_watch_low'))} bar it needs: "
                              "the expansion vessel or a leak is losing water")
    if p > _t("boiler.pressure_watch_high"):
        return Status.WATCH, (f"Pressure {_f(p)} bar is high: the expansion vessel may have lost its air cushion "
                              "and can no longer absorb the water's expansion")
    return Status.OK, f"Pressure {_f(p)} bar, within the normal 1.0-2.5 bar: the vessel absorbs the expansion"


def _relief(v: _Values) -> tuple[Status, str]:
    p = v.num("pressure")
    opens = _f(_t("boiler.relief_opens"))
    if p >= _t("boiler.pressure_act_high"):
        return Status.ACT, f"Pressure {_f(p)} bar, close to the {opens} bar at which this valve opens and dumps water"
    if p > _t("boiler.pressure_watch_high"):
        return Status.WATCH, f"Pressure {_f(p)} bar is creeping towards the {opens} bar at which this valve opens"
    return Status.OK, f"Pressure {_f(p)} bar, well below the {opens} bar at which this safety valve opens"


_FAULTS = {1: "it shut itself down because the water pressure is too low",
           2: "it shut itself down because the water overheated",
           3: "it shut itself down because the flue gas is too hot"}


def _burner(v: _Values) -> tuple[Status, str]:
    fault = int(v.get("fault_code") or 0)
    if fault:
        return Status.ACT, f"Burner locked out (fault {fault}): {_FAULTS.get(fault, 'a safety fault is active')}"
    mod, on = v.get("modulation"), v.get("burner_on")
    if on or (mod or 0) > 0:
        power = f" at {mod:.0f} % of full power" if mod is not None else ""
        return Status.OK, f"Burning{power}, no faults"
    return Status.OK, "Off and ready: the building needs no more heat right now"


def _heat_exchanger(v: _Values) -> tuple[Status, str]:
    flow = v.num("flow_temp")
    if flow >= _t("boiler.flow_act"):
        return Status.ACT, f"Water leaves at {flow:.0f} °C, near the 95 °C at which the boiler cuts out"
    on = bool(v.get("burner_on")) or (v.get("modulation") or 0) > 0
    flue, ret = v.get("flue_temp"), v.get("return_temp")
    if on and flue is not None and ret is not None:
        gap = flue - ret
        if gap >= _t("boiler.scale_act"):
            return Status.ACT, (f"Flue gas {gap:.0f} °C hotter than the water coming back: heavy scale stops the "
                                "heat exchanger passing heat to the water; it needs descaling")
        if gap >= _t("boiler.scale_watch"):
            return Status.WATCH, (f"Flue gas {gap:.0f} °C hotter than the water coming back: scale may be building "
                                  "up on the heat exchanger")
    if flow >= _t("boiler.flow_watch"):
        return Status.WATCH, f"Water leaves at {flow:.0f} °C, hotter than usual (cut-out at 95 °C)"
    return Status.OK, f"Heats the water to {flow:.0f} °C and passes the flame's heat on well"


def _flue(v: _Values) -> tuple[Status, str]:
    t = v.num("flue_temp")
    if t >= _t("boiler.flue_act"):
        return Status.ACT, f"Flue gas {t:.0f} °C: too hot, the burner locks out at 120 °C"
    if t >= _t("boiler.flue_watch"):
        return Status.WATCH, f"Flue gas {t:.0f} °C: more heat than usual goes up the chimney"
    return Status.OK, f"Flue gas {t:.0f} °C: the heat goes into the water, not up the chimney"


def _pump(v: _Values) -> tuple[Status, str]:
    flow = v.num("water_flow")
    fault = int(v.get("fault_code") or 0)
    on = bool(v.get("burner_on")) or (v.get("modulation") or 0) > 0
    if fault == 1 and flow < _t("boiler.pump_min_flow"):
        return Status.ACT, "Stopped by the low-pressure safety cut-out: no heat reaches the radiators"
    if on and flow < _t("boiler.pump_min_flow"):
        return Status.ACT, (f"Only {flow:.1f} m³ of water an hour while the burner fires: the pump is not moving "
                            "the water, the boiler will overheat")
    if flow < _t("boiler.pump_min_flow"):
        return Status.OK, "Resting: no heat is needed right now"
    return Status.OK, f"Moving {flow:.1f} m³ of water an hour round the radiators"


def _flow_pipe(v: _Values) -> tuple[Status, str]:
    t = v.num("flow_temp")
    if t >= _t("boiler.flow_act"):
        return Status.ACT, f"Water to the radiators at {t:.0f} °C: dangerously hot (cut-out at 95 °C)"
    if t >= _t("boiler.flow_watch"):
        return Status.WATCH, f"Water to the radiators at {t:.0f} °C: hotter than it should be"
    return Status.OK, f"Hot water goes out to the radiators at {t:.0f} °C"


def _return_pipe(v: _Values) -> tuple[Status, str]:
    t = v.num("return_temp")
    flow = v.get("flow_temp")
    given = f", {flow - t:.0f} °C cooler than it left" if flow is not None else ""
    if t >= _t("boiler.return_watch"):
        return Status.WATCH, (f"Water comes back at {t:.0f} °C{given}: the radiators give off little heat and "
                              "the boiler cannot condense, which wastes fuel")
    return Status.OK, f"Water comes back from the radiators at {t:.0f} °C{given}"


def _unit(metric: str, unit: str, digits: int = 1) -> Callable[[_Values], str]:
    def reading(v: _Values) -> str:
        x = v.get(metric)
        return "" if x is None else f"{x:.{digits}f} {unit}"
    return reading


def _burner_reading(v: _Values) -> str:
    fault = v.get("fault_code")
    if fault:
        return f"fault {int(fault)}"
    mod = v.get("modulation")
    return "" if mod is None else (f"{mod:.0f} %" if mod > 0 else "off")


_BOILER: tuple[_Part, ...] = (
    _Part("burner", "Burner", _burner, _burner_reading),
    _Part("heat_exchanger", "Heat exchanger", _heat_exchanger),
    _Part("flue", "Flue (chimney)", _flue, _unit("flue_temp", "°C", 0)),
    _Part("pump", "Pump", _pump, _unit("water_flow", "m³/h")),
    _Part("expansion_vessel", "Expansion vessel", _pressure_vessel, _unit("pressure", "bar")),
    _Part("relief_valve", "Pressure relief valve", _relief),
    _Part("flow_pipe", "Flow pipe (to radiators)", _flow_pipe, _unit("flow_temp", "°C", 0)),
    _Part("return_pipe", "Return pipe (from radiators)", _return_pipe,
          _unit("return_temp", "°C", 0)),
)

# Metrics a part needs before its rule can speak (others its rule reads are optional context).
_REQUIRED: dict[str, tuple[str, ...]] = {
    "burner": ("fault_code",), "heat_exchanger": ("flow_temp",), "flue": ("flue_temp",),
    "pump": ("water_flow",), "expansion_vessel": ("pressure",), "relief_valve": ("pressure",),
    "flow_pipe": ("flow_temp",), "return_pipe": ("return_temp",),
    "meter": ("energy_import",), "supply": ("voltage",),
    "vessel": ("pressure",), "tank_relief": ("pressure",),
}


# --- meter rules ------------------------------------------------------------------------------

def _meter(v: _Values) -> tuple[Status, str]:
    e, p = v.num("energy_import"), v.get("power")
    now = f", now drawing {p:.1f} kW" if p is not None else ""
    return Status.OK, f"Counting: {e:,.0f} kWh used so far{now}"


def _supply(v: _Values) -> tuple[Status, str]:
    u, f = v.num("voltage"), v.get("frequency")
    if u < _t("meter.voltage_act_low") or u > _t("meter.voltage_act_high"):
        return Status.ACT, f"Mains at {u:.0f} V, outside the legal 207-253 V: equipment can be damaged"
    if u < _t("meter.voltage_watch_low") or u > _t("meter.voltage_watch_high"):
        return Status.WATCH, f"Mains at {u:.0f} V, near the edge of the legal 207-253 V"
    if f is not None and abs(f - 50.0) > _t("meter.frequency_act"):
        return Status.ACT, f"Grid frequency {f:.2f} Hz, far from 50 Hz"
    if f is not None and abs(f - 50.0) > _t("meter.frequency_watch"):
        return Status.WATCH, f"Grid frequency {f:.2f} Hz, off the usual 50 Hz"
    return Status.OK, f"Mains supply steady at {u:.0f} V"


def _tamper(v: _Values) -> tuple[Status, str]:
    flag = v.get("tamper")
    if flag:
        return Status.ACT, "The meter reports its cover was opened or a magnet held to it"
    return Status.OK, "No sign of interference"


_METER: tuple[_Part, ...] = (
    _Part("meter", "Meter register", _meter, _unit("energy_import", "kWh", 0)),
    _Part("supply", "Mains supply", _supply, _unit("voltage", "V", 0)),
    _Part("tamper", "Tamper seal", _tamper),
)


# --- pressure tank / pipeline rules -----------------------------------------------------------

def _vessel(v: _Values) -> tuple[Status, str]:
    p = v.num("pressure")
    if p < _t("tank.pressure_act_low"):
        return Status.ACT, f"Pressure {_f(p)} bar: nearly empty, whatever it feeds will run dry"
    if p < _t("tank.pressure_watch_low"):
        return Status.WATCH, f"Pressure {_f(p)} bar, lower than a working tank should be (leak or heavy use)"
    if p > _t("tank.pressure_watch_high"):
        return Status.WATCH, f"Pressure {_f(p)} bar, higher than a working tank should be"
    return Status.OK, f"Pressure {_f(p)} bar, within its normal working range"


def _tank_relief(v: _Values) -> tuple[Status, str]:
    p = v.num("pressure")
    opens = f"{_t('tank.relief_opens'):.0f}"
    if p >= _t("tank.pressure_act_high"):
        return Status.ACT, f"Pressure {_f(p)} bar, close to the {opens} bar at which this valve opens"
    return Status.OK, f"Pressure {_f(p)} bar, well below the {opens} bar at which this safety valve opens"


def _no_sensor(v: _Values) -> tuple[Status, str]:
    return Status.OK, "No sensor of its own; no alert or anomaly about it"


_TANK: tuple[_Part, ...] = (
    _Part("vessel", "Tank", _vessel, _unit("pressure", "bar")),
    _Part("tank_relief", "Pressure relief valve", _tank_relief),
    _Part("inlet", "Inlet pipe", _no_sensor),
    _Part("outlet", "Outlet pipe", _no_sensor),
)

_GENERIC: tuple[_Part, ...] = (_Part("device", "Device", _no_sensor),)

LAYOUT_PARTS: dict[str, tuple[_Part, ...]] = {"boiler": _BOILER, "meter": _METER, "tank": _TANK, "generic": _GENERIC}


def layout_for(kind: str) -> str:
    """Which drawing a device kind gets (pipelines are drawn as pressure tanks)."""
    if kind in ("tank", "pressure_tank", "pipeline"):
        return "tank"
    return kind if kind in LAYOUT_PARTS else "generic"


def component_ids(layout: str) -> tuple[str, ...]:
    """The component ids of a layout, in drawing order."""
    return tuple(p.id for p in LAYOUT_PARTS[layout])


def _minutes(ms: int) -> str:
    minutes = max(0, ms) // 60_000
    if minutes < 1:
        return "less than a minute"
    if minutes < 120:
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    hours = minutes // 60
    if hours < 48:
        return f"{hours} hours"
    return f"{hours // 24} days"


def _hhmm(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%d %b %H:%M UTC")


_SEVERITY = {"critical": Status.ACT, "warning": Status.WATCH, "info": Status.WATCH}


def assess(
    uid: str,
    kind: str,
    readings: Mapping[str, Reading],
    *,
    now_ms: int,
    stale_after_s: float = 120.0,
    anomaly: queries.AnomalyState | None = None,
    alerts: Sequence[AlertInfo] = (),
) -> DeviceHealth:
    """Health of every component of device ``uid`` of ``kind`` (pure: see the module docstring)."""
    layout = layout_for(kind)
    parts = LAYOUT_PARTS[layout]
    stale_ms = stale_after_s * 1000
    fresh: dict[str, Reading] = {}
    gone: dict[str, str] = {}  # metric -> why it cannot be used
    for metric, r in readings.items():
        age = now_ms - r.ts_ms
        if age > stale_ms:
            gone[metric] = f"no reading for {_minutes(age)}"
        elif r.quality != "good" or r.value is None or (isinstance(r.value, float) and not math.isfinite(r.value)):
            gone[metric] = f"the {metric.replace('_', ' ')} sensor gives no valid reading ({r.quality})"
        else:
            fresh[metric] = r
    values = _Values(fresh)
    newest = max((r.ts_ms for r in readings.values()), default=None)

    components: list[Component] = []
    for part in parts:
        required = _REQUIRED.get(part.id, ())
        missing = [m for m in required if m not in fresh]
        if missing:
            m = missing[0]
            if m in gone:
                status, reason = Status.UNKNOWN, gone[m][0].upper() + gone[m][1:]
            elif newest is None:
                status, reason = Status.UNKNOWN, "No reading has ever arrived from this device"
            else:
                status, reason = Status.UNKNOWN, f"This device does not report its {m.replace('_', ' ')}"
        elif not required and newest is not None and now_ms - newest > stale_ms:
            status, reason = Status.UNKNOWN, f"No reading for {_minutes(now_ms - newest)}"
        elif not required and newest is None:
            status, reason = Status.UNKNOWN, "No reading has ever arrived from this device"
        else:
            status, reason = part.rule(values)
        components.append(Component(part.id, part.label, status, reason + ".", part.reading(values)))

    notes: list[str] = []
    if anomaly is not None and anomaly.active:
        score = f" (score {anomaly.score:.1f})" if anomaly.score is not None else ""
        why = (f"The anomaly detector finds this {kind}'s readings unusual together{score} since "
               f"{_hhmm(anomaly.ts_ms)}; an engineer should look")
        notes.append(why + ".")
        components = [replace(c, status=Status.WATCH, reason=f"{c.reason} {why}.") if c.status == Status.OK else c
                      for c in components]

    index = {c.id: i for i, c in enumerate(components)}
    for alert in alerts:
        status = _SEVERITY.get(alert.severity, Status.WATCH)
        targets = [index[c] for c in _alert_parts(layout, alert) if c in index] or list(range(len(components)))
        text = f"Open alert ({alert.severity}): {alert.message or alert.metric or alert.type}."
        if len(targets) == len(components):
            notes.append(text)
        for i in targets:
            c = components[i]
            components[i] = replace(c, status=worst([c.status, status]), reason=f"{c.reason} {text}")

    overall = worst([c.status for c in components])
    summary = _summary(overall, components)
    return DeviceHealth(uid, kind, layout, overall, summary, tuple(components), now_ms, tuple(notes))


# Which part an alert about a metric lands on; an alert about a metric not listed (or none: stale,
# anomaly) lands on every part. High pressure is the relief valve's business, low the vessel's.
ALERT_PARTS: dict[str, dict[str, tuple[str, ...]]] = {
    "boiler": {"pressure": ("expansion_vessel",), "flue_temp": ("flue",), "flow_temp": ("flow_pipe",),
               "return_temp": ("return_pipe",), "water_flow": ("pump",), "modulation": ("burner",),
               "burner_on": ("burner",), "fault_code": ("burner",)},
    "meter": {"energy_import": ("meter",), "power": ("meter",), "voltage": ("supply",), "frequency": ("supply",),
              "current": ("supply",), "power_factor": ("supply",), "tamper": ("tamper",)},
    "tank": {"pressure": ("vessel",)},
    "generic": {},
}
_HIGH_PRESSURE_PART = {"boiler": ("relief_valve", "boiler.pressure_watch_high"),
                       "tank": ("tank_relief", "tank.pressure_watch_high")}


def _alert_parts(layout: str, alert: AlertInfo) -> tuple[str, ...]:
    high = _HIGH_PRESSURE_PART.get(layout)
    if high and alert.metric == "pressure" and alert.value is not None and alert.value > _t(high[1]):
        return (high[0],)
    return ALERT_PARTS[layout].get(alert.metric, ())


def _summary(overall: Status, components: Sequence[Component]) -> str:
    names = [c.label for c in components if c.status == overall]
    if overall == Status.OK:
        return "All parts working normally."
    if overall == Status.UNKNOWN:
        return f"No recent data for: {', '.join(names)}."
    if overall == Status.ACT:
        return f"Needs action: {', '.join(names)}."
    return f"Keep an eye on: {', '.join(names)}."


async def open_alerts(db: Database, uid: str) -> list[AlertInfo]:
    """Alerts of device ``uid`` that are not cleared, oldest first."""
    with db.activate():
        rows = await Alert.filter(device=uid, state__in=[AlertState.OPEN.value, AlertState.ACKNOWLEDGED.value]) \
            .order_by("opened_ms").values_list("severity", "metric", "message", "type", "last_value")
    return [AlertInfo(*r) for r in rows]


async def device_health(db: Database, dev: queries.DeviceRow, *, now_ms: int,
                        stale_after_s: float = 120.0) -> DeviceHealth:
    """Health of ``dev`` from the database: latest readings, anomaly state, open alerts."""
    rows = await queries.latest(db, dev.pk)
    readings = {r.metric: Reading(r.typed_value, r.ts_ms, r.unit, r.quality) for r in rows}
    states = await queries.anomaly_states(db, dev.gateway_pk)
    alerts = await open_alerts(db, dev.uid)
    return assess(dev.uid, dev.kind, readings, now_ms=now_ms, stale_after_s=stale_after_s,
                  anomaly=states.get((dev.gateway_pk, dev.name)), alerts=alerts)
