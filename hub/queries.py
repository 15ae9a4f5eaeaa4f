"""Read side of the database, used by the REST API (the write side is :mod:`hub.store`)."""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from tortoise.functions import Count

from hub.db import Database
from hub.models import Device, Gateway, GatewayEvent
from protocol.ids import device_uid, is_valid_name, split_device_uid
from protocol.schema import EventType

ANOMALY_EVENTS = (EventType.ANOMALY_STARTED.value, EventType.ANOMALY_CLEARED.value)


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """A device with the names of its site and gateway."""

    pk: int
    site: str
    gateway: str
    name: str
    kind: str
    profile: str
    first_seen_ms: int
    last_seen_ms: int | None
    gateway_pk: int

    @property
    def uid(self) -> str:
        """``site.gateway.device``."""
        return device_uid(self.site, self.gateway, self.name)


@dataclass(frozen=True, slots=True)
class ReadingRow:
    """A stored reading, columns as in the database."""

    metric: str
    ts_ms: int
    value: float | None
    value_text: str | None
    unit: str
    quality: str
    seq: int

    @property
    def typed_value(self) -> float | bool | str | None:
        """The value as the gateway sent it: number, boolean, string or null (see ``Reading``)."""
        if self.value_text is None:
            return self.value
        if self.value is not None and self.value_text in ("true", "false"):
            return self.value_text == "true"
        return self.value_text


@dataclass(frozen=True, slots=True)
class GatewayRow:
    """A gateway with its site name and number of devices."""

    pk: int
    site: str
    name: str
    state: str
    state_ts_ms: int | None
    agent_version: str
    backlog: int
    first_seen_ms: int
    last_seen_ms: int | None
    devices: int
    readings_dropped: int
    """Sum of ``readings_dropped`` over the gateway's stored events."""


@dataclass(frozen=True, slots=True)
class GatewayRef:
    """A gateway's primary key and names."""

    pk: int
    site: str
    name: str

    @property
    def uid(self) -> str:
        """``site.gateway``."""
        return f"{self.site}.{self.name}"


@dataclass(frozen=True, slots=True)
class EventRow:
    """A stored gateway event, columns as in the database."""

    ts_ms: int
    type: str
    device: str
    """Device the event is about, ``""`` when none."""
    message: str
    readings_dropped: int
    details: dict[str, Any]
    received_ms: int


@dataclass(frozen=True, slots=True)
class AnomalyState:
    """A device's anomaly state, from its newest ``anomaly_started`` / ``anomaly_cleared`` event."""

    active: bool
    score: float | None
    """``details.score`` of that event, when it carries a number."""
    ts_ms: int


_DEVICE_FIELDS = ("id", "gateway__site__name", "gateway__name", "name", "kind", "profile",
                  "first_seen_ms", "last_seen_ms", "gateway_id")
_READING_FIELDS = ("metric", "ts_ms", "value", "value_text", "unit", "quality", "seq")


def _device(row: dict[str, Any]) -> DeviceRow:
    return DeviceRow(row["id"], row["gateway__site__name"], row["gateway__name"], row["name"], row["kind"],
                     row["profile"], row["first_seen_ms"], row["last_seen_ms"], row["gateway_id"])


async def list_devices(db: Database, site: str | None = None, gateway: str | None = None) -> list[DeviceRow]:
    """All devices (optionally of one site / gateway), ordered by uid."""
    with db.activate():
        q = Device.all()
        if site is not None:
            q = q.filter(gateway__site__name=site)
        if gateway is not None:
            q = q.filter(gateway__name=gateway)
        rows = await q.order_by("gateway__site__name", "gateway__name", "name").values(*_DEVICE_FIELDS)
    return [_device(r) for r in rows]


async def find_device(db: Database, uid: str) -> DeviceRow | None:
    """The device with uid ``site.gateway.device``; ``None`` if unknown or not a uid."""
    try:
        site, gateway, name = split_device_uid(uid)
    except ValueError:
        return None
    with db.activate():
        rows = await Device.filter(name=name, gateway__name=gateway, gateway__site__name=site).values(
            *_DEVICE_FIELDS)
    return _device(rows[0]) if rows else None


# Latest row of every metric of one device without scanning its history: the recursive CTE
# walks the distinct metric names through the (device_id, metric, ts_ms) index ("skip scan"),
# and for each one the newest row is a single index probe.
_LATEST_SQL = """
WITH RECURSIVE m(metric) AS (
    SELECT MIN(metric) FROM reading WHERE device_id = ?
    UNION ALL
    SELECT (SELECT MIN(r.metric) FROM reading r WHERE r.device_id = ? AND r.metric > m.metric)
    FROM m WHERE m.metric IS NOT NULL
)
SELECT r.metric, r.ts_ms, r.value, r.value_text, r.unit, r.quality, r.seq
FROM m JOIN reading r ON r.id = (
    SELECT r2.id FROM reading r2 WHERE r2.device_id = ? AND r2.metric = m.metric
    ORDER BY r2.ts_ms DESC LIMIT 1)
ORDER BY r.metric
"""


async def latest(db: Database, device_pk: int) -> list[ReadingRow]:
    """Newest reading (by timestamp) of each metric of a device, ordered by metric."""
    sql = db.sql(_LATEST_SQL)
    with db.activate():
        rows = await db.conn.execute_query_dict(sql, [device_pk, device_pk, device_pk])
    return [ReadingRow(r["metric"], int(r["ts_ms"]), r["value"], r["value_text"], r["unit"], r["quality"],
                       int(r["seq"])) for r in rows]


async def readings(db: Database, device_pk: int, metric: str | None = None, since_ms: int | None = None,
                   until_ms: int | None = None, limit: int = 1000) -> list[ReadingRow]:
    """Readings of a device in ``[since, until)``, oldest first, at most ``limit``."""
    # Hand-written like _LATEST_SQL: Tortoise's per-field conversion of values_list cost about as
    # much as the query itself (~36 ms per 10,000 rows), and the device page asks for 100,000.
    where: list[str] = ["device_id = ?"]
    params: list[str | int] = [device_pk]
    for clause, value in (("metric = ?", metric), ("ts_ms >= ?", since_ms), ("ts_ms < ?", until_ms)):
        if value is not None:
            where.append(clause)
            params.append(value)
    sql = db.sql(f"SELECT {', '.join(_READING_FIELDS)} FROM reading WHERE {' AND '.join(where)} "
                 "ORDER BY ts_ms, seq LIMIT ?")
    with db.activate():
        _, rows = await db.conn.execute_query(sql, [*params, limit])
    return [ReadingRow(*r) for r in rows]


# SQLite's SUM raises on 64-bit overflow; TOTAL never does (a float, exact below 2**53).
# PostgreSQL's SUM of bigint is numeric and cannot overflow.
_DROPPED_SQL = "SELECT gateway_id, {fn}(readings_dropped) AS n FROM gateway_event GROUP BY gateway_id"


async def list_gateways(db: Database) -> list[GatewayRow]:
    """All gateways with their device counts and dropped readings, ordered by site and name."""
    with db.activate():
        rows = await Gateway.all().order_by("site__name", "name").values(
            "id", "site__name", "name", "state", "state_ts_ms", "agent_version", "backlog",
            "first_seen_ms", "last_seen_ms")
        counts = await Device.all().group_by("gateway_id").annotate(n=Count("id")).values("gateway_id", "n")
        dropped = await db.conn.execute_query_dict(
            _DROPPED_SQL.format(fn="TOTAL" if db.dialect == "sqlite" else "SUM"))
    per_gateway = {c["gateway_id"]: c["n"] for c in counts}
    dropped_per_gateway = {d["gateway_id"]: int(d["n"]) for d in dropped}
    return [GatewayRow(r["id"], r["site__name"], r["name"], r["state"], r["state_ts_ms"], r["agent_version"],
                       r["backlog"], r["first_seen_ms"], r["last_seen_ms"], per_gateway.get(r["id"], 0),
                       dropped_per_gateway.get(r["id"], 0))
            for r in rows]


async def find_gateway(db: Database, uid: str) -> GatewayRef | None:
    """The gateway with id ``site.gateway``; ``None`` if unknown or not of that form."""
    parts = uid.split(".")
    if len(parts) != 2 or not all(is_valid_name(p) for p in parts):
        return None
    with db.activate():
        row = await Gateway.filter(name=parts[1], site__name=parts[0]).first().values("id")
    return GatewayRef(row["id"], parts[0], parts[1]) if row else None


async def events(db: Database, gateway_pk: int, since_ms: int | None = None, until_ms: int | None = None,
                 limit: int = 100, types: Collection[str] = (), device: str | None = None) -> list[EventRow]:
    """Events of a gateway with ``ts`` in ``[since, until)``, newest first, at most ``limit``;
    only of ``types`` when given, only about ``device`` (a device name) when given."""
    with db.activate():
        q = GatewayEvent.filter(gateway_id=gateway_pk)
        if since_ms is not None:
            q = q.filter(ts_ms__gte=since_ms)
        if until_ms is not None:
            q = q.filter(ts_ms__lt=until_ms)
        if types:
            q = q.filter(type__in=list(types))
        if device is not None:
            q = q.filter(device=device)
        rows = await q.order_by("-ts_ms", "-id").limit(limit).values_list(
            "ts_ms", "type", "device", "message", "readings_dropped", "details", "received_ms")
    return [EventRow(*r) for r in rows]


# The newest anomaly event of every (gateway, device): ROW_NUMBER() exists in SQLite >= 3.25 and
# PostgreSQL; the (gateway_id, device, ts_ms) index serves the partitions.
_ANOMALY_SQL = """
SELECT gateway_id, device, type, ts_ms, details FROM (
    SELECT gateway_id, device, type, ts_ms, details,
           ROW_NUMBER() OVER (PARTITION BY gateway_id, device ORDER BY ts_ms DESC, id DESC) AS rn
    FROM gateway_event WHERE type IN (?, ?) AND device <> '' {where}
) newest WHERE rn = 1
"""


def _score(details: Any) -> float | None:
    if isinstance(details, str | bytes):  # raw SQL gives JSON text (SQLite) or a str (asyncpg)
        details = json.loads(details)
    value = details.get("score") if isinstance(details, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


async def anomaly_states(db: Database, gateway_pk: int | None = None) -> dict[tuple[int, str], AnomalyState]:
    """(gateway pk, device name) -> anomaly state, for every device with an anomaly event
    (optionally only of one gateway). Derived from the events when asked, so it cannot drift from
    them and does not depend on the order the events arrived in."""
    params: list[Any] = list(ANOMALY_EVENTS)
    where = ""
    if gateway_pk is not None:
        where = "AND gateway_id = ?"
        params.append(gateway_pk)
    with db.activate():
        rows = await db.conn.execute_query_dict(db.sql(_ANOMALY_SQL.format(where=where)), params)
    return {(r["gateway_id"], r["device"]): AnomalyState(r["type"] == EventType.ANOMALY_STARTED.value,
                                                        _score(r["details"]), int(r["ts_ms"]))
            for r in rows}


@dataclass(frozen=True, slots=True)
class GatewayModels:
    """A gateway's state and the models it reported running in its last "online" status."""

    ref: GatewayRef
    state: str
    state_ts_ms: int | None
    reported: dict[str, dict[str, Any]]
    """profile -> {name, version, sha256, state, error} (StatusV1.models)."""


async def gateway_models(db: Database, gateway: GatewayRef) -> GatewayModels:
    """What ``gateway`` reported about its models."""
    with db.activate():
        row = await Gateway.filter(id=gateway.pk).first().values("state", "state_ts_ms", "reported_models")
    if row is None:
        raise LookupError(f"gateway {gateway.uid} vanished")
    reported = row["reported_models"]
    if isinstance(reported, str):
        reported = json.loads(reported)
    return GatewayModels(gateway, row["state"], row["state_ts_ms"], reported or {})


@dataclass(frozen=True, slots=True)
class DailyStat:
    """Good numeric readings of one metric of one device over one UTC day."""

    device_pk: int
    metric: str
    day_ms: int
    """Start of the UTC day (epoch ms)."""
    mean: float
    low: float
    high: float
    count: int


DAY_MS = 86_400_000

# One row per (device, metric, UTC day): the grouping runs in the database over the
# (device_id, metric, ts_ms) index, so a week of 1 s readings is a few dozen rows, not millions.
# GROUP BY by position: PostgreSQL would see "ts_ms / $1" and "ts_ms / $2" as different expressions.
_DAILY_SQL = """
SELECT device_id, metric, ts_ms / ? AS day, AVG(value) AS mean, MIN(value) AS low, MAX(value) AS high,
       COUNT(*) AS n
FROM reading
WHERE device_id IN ({devices}) AND metric IN ({metrics}) AND quality = 'good' AND value IS NOT NULL
      AND ts_ms >= ? AND ts_ms < ?
GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""


async def daily_stats(db: Database, device_pks: Collection[int], metrics: Collection[str], since_ms: int,
                      until_ms: int) -> list[DailyStat]:
    """Daily mean / min / max of good numeric readings of ``metrics`` of the devices in ``[since, until)``,
    by device, metric and day."""
    if not device_pks or not metrics:
        return []
    sql = _DAILY_SQL.format(devices=", ".join("?" * len(device_pks)), metrics=", ".join("?" * len(metrics)))
    params: list[Any] = [DAY_MS, *device_pks, *metrics, since_ms, until_ms]
    with db.activate():
        rows = await db.conn.execute_query_dict(db.sql(sql), params)
    return [DailyStat(int(r["device_id"]), r["metric"], int(r["day"]) * DAY_MS, float(r["mean"]), float(r["low"]),
                      float(r["high"]), int(r["n"])) for r in rows]
