"""Batch writer: validated telemetry, status and event messages into the database, one transaction
per batch.

Readings are inserted with ``INSERT ... ON CONFLICT (device_id, seq) DO NOTHING`` so a batch that
the broker redelivers (QoS 1 is at-least-once) or that a retry writes twice is stored once. The
insert goes through the Tortoise connection as one parametrised statement per batch instead of
``Reading.bulk_create``: building a model object per reading costs more than the whole SQLite
insert (see ``docs/hub.md``, "Performance").

Gateway events are inserted with ``ON CONFLICT (gateway_id, ts_ms, type, device) DO NOTHING`` for
the same reason; the statement's ``RETURNING`` tells which of them were new.

Sites, gateways and devices are created on first sight and their ids cached, so the hot path
does no per-reading lookups.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from hub.db import Database
from hub.models import Device, Gateway, Site
from protocol.logs import get_logger
from protocol.schema import DeviceInfoV1, EventV1, GatewayState, StatusV1, TelemetryV1

log = get_logger("hub.store")

Row = tuple[int, str, int, int, float | None, str | None, str, str]
"""(device_id, metric, seq, ts_ms, value, value_text, unit, quality) as inserted."""

_COLUMNS = "device_id, metric, seq, ts_ms, value, value_text, unit, quality"

# SQLite: one statement over a JSON array of rows. Compared with executemany this binds a single
# parameter, and the statement's change count tells how many rows were new (duplicates are not).
_INSERT_SQLITE = (
    f"INSERT INTO reading ({_COLUMNS}) "
    "SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3, j.value ->> 4, "
    "j.value ->> 5, j.value ->> 6, j.value ->> 7 FROM json_each(?) AS j WHERE true "
    # "WHERE true" resolves SQLite's parsing ambiguity between INSERT...SELECT and ON CONFLICT.
    "ON CONFLICT (device_id, seq) DO NOTHING"
)
# PostgreSQL: one statement over column arrays. The count comes from RETURNING wrapped in a CTE
# (Tortoise's asyncpg client reads the OID, not the row count, from an INSERT command tag).
_INSERT_POSTGRES = (
    "WITH ins AS ("
    f"INSERT INTO reading ({_COLUMNS}) "
    "SELECT * FROM unnest($1::int[], $2::varchar[], $3::bigint[], $4::bigint[], "
    "$5::float8[], $6::text[], $7::varchar[], $8::varchar[]) "
    "ON CONFLICT (device_id, seq) DO NOTHING RETURNING 1"
    ") SELECT count(*) AS n FROM ins"
)


_INSERT_EVENT = (
    "INSERT INTO gateway_event (gateway_id, ts_ms, type, device, message, readings_dropped, details, "
    "received_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (gateway_id, ts_ms, type, device) DO NOTHING RETURNING type"
)

MAX_READINGS_DROPPED = 2**53
"""Largest ``readings_dropped`` the hub stores (exclusive): JSON-safe, and far from the 64-bit
limit of the column and of the per-gateway sum."""
MAX_EVENT_DETAILS_BYTES = 16_384
"""Largest ``details`` object (as compact JSON) the hub stores."""


@dataclass(slots=True)
class TelemetryItem:
    """A validated telemetry message and when the hub received it (hub clock, ms)."""

    telemetry: TelemetryV1
    received_ms: int


@dataclass(slots=True)
class StatusItem:
    """A validated gateway status message and when the hub received it (hub clock, ms)."""

    status: StatusV1
    received_ms: int


@dataclass(slots=True)
class EventItem:
    """A validated gateway event and when the hub received it (hub clock, ms)."""

    event: EventV1
    received_ms: int


@dataclass(slots=True)
class WriteResult:
    """What one committed batch did."""

    readings: int = 0
    inserted: int = 0
    statuses: int = 0
    events: int = 0
    """Events in the batch."""
    events_inserted: Counter[str] = field(default_factory=Counter)
    """Newly stored events by type (an event already stored is not counted)."""

    @property
    def event_duplicates(self) -> int:
        """Events that were already stored (redelivery, resend, another hub)."""
        return self.events - sum(self.events_inserted.values())

    @property
    def duplicates(self) -> int:
        """Readings that were already stored (redelivery or retry)."""
        return self.readings - self.inserted


def convert_value(value: Any) -> tuple[float | None, str | None]:
    """Map a protocol value to the ``(value, value_text)`` columns.

    Numbers go to ``value``; booleans to 1.0/0.0 plus ``"true"``/``"false"`` so they can be given
    back as booleans; strings to ``value_text``. (The schema refuses NaN and infinities.)
    """
    if value is None:
        return None, None
    if value is True:
        return 1.0, "true"
    if value is False:
        return 0.0, "false"
    if isinstance(value, int | float):
        return float(value), None
    return None, str(value)


def check_event(event: EventV1) -> None:
    """Refuse an event the database cannot store faithfully; raises ``ValueError`` saying why.

    The schema accepts any non-negative ``readings_dropped`` and any float in ``details``; a
    64-bit overflow or a NaN (which PostgreSQL's JSONB refuses) would make the batch fail on every
    retry and stall ingest, so such an event is rejected as malformed instead.
    """
    if event.readings_dropped >= MAX_READINGS_DROPPED:
        raise ValueError(f"readings_dropped {event.readings_dropped} is not below 2**53")
    for key, value in event.details.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"details.{key[:50]} is not a finite number")
        if isinstance(value, int) and not -MAX_READINGS_DROPPED < value < MAX_READINGS_DROPPED:
            raise ValueError(f"details.{key[:50]} is outside +-2**53")
    size = len(details_json(event.details).encode())
    if size > MAX_EVENT_DETAILS_BYTES:
        raise ValueError(f"details of {size} bytes exceed {MAX_EVENT_DETAILS_BYTES}")


def clean_text(text: str) -> str:
    """``text`` made storable in every backend: NUL (valid in JSON as ``\\u0000``, refused by
    PostgreSQL's text and JSONB) becomes U+FFFD. (Unpaired surrogates never get here: the schema
    refuses them.)"""
    return text.replace("\x00", "\ufffd")


def details_json(details: dict[str, int | float | str]) -> str:
    """An event's ``details`` as the compact JSON text stored in ``gateway_event.details``."""
    clean = {clean_text(k): clean_text(v) if isinstance(v, str) else v for k, v in details.items()}
    return json.dumps(clean, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclass
class _Caches:
    sites: dict[str, int] = field(default_factory=dict)
    gateways: dict[tuple[str, str], int] = field(default_factory=dict)
    # (site, gateway, device) -> (device id, kind, profile)
    devices: dict[tuple[str, str, str], tuple[int, str, str]] = field(default_factory=dict)


def models_json(status: StatusV1) -> str:
    """A status's ``models`` as the JSON text stored in ``gateway.reported_models``."""
    models = {profile: m.model_dump(mode="json") for profile, m in status.models.items()}
    return json.dumps(models, separators=(",", ":"), ensure_ascii=False)


class Store:
    """Writes batches for one :class:`~hub.db.Database`. One writer task per store."""

    def __init__(self, db: Database, on_new_gateway: Callable[[str, str], None] | None = None) -> None:
        self.db = db
        self.on_new_gateway = on_new_gateway
        """Called with (site, gateway) when this store creates a gateway (the hub publishes the
        new gateway's model assignments). Must not block."""
        self._cache = _Caches()

    def forget_cache(self) -> None:
        """Drop cached ids (after the database was replaced or rows deleted behind our back)."""
        self._cache = _Caches()

    # -- entities ---------------------------------------------------------------------------

    async def _site_id(self, site: str, now_ms: int) -> int:
        sid = self._cache.sites.get(site)
        if sid is None:
            obj = await Site.get_or_none(name=site)
            if obj is None:
                try:
                    obj = await Site.create(name=site, first_seen_ms=now_ms)
                    log.info("site_new", site=site)
                except IntegrityError:  # another hub created it a moment ago
                    obj = await Site.get(name=site)
            sid = self._cache.sites[site] = obj.id
        return sid

    async def _gateway_id(self, site: str, gateway: str, now_ms: int) -> int:
        key = (site, gateway)
        gid = self._cache.gateways.get(key)
        if gid is None:
            sid = await self._site_id(site, now_ms)
            obj = await Gateway.get_or_none(site_id=sid, name=gateway)
            if obj is None:
                try:
                    obj = await Gateway.create(site_id=sid, name=gateway, first_seen_ms=now_ms)
                    log.info("gateway_new", site=site, gateway=gateway)
                    if self.on_new_gateway is not None:
                        self.on_new_gateway(site, gateway)
                except IntegrityError:
                    obj = await Gateway.get(site_id=sid, name=gateway)
            gid = self._cache.gateways[key] = obj.id
        return gid

    async def _device_id(self, site: str, gateway: str, device: str, info: DeviceInfoV1,
                         now_ms: int) -> int:
        key = (site, gateway, device)
        kind, profile = info.kind.value, info.profile
        cached = self._cache.devices.get(key)
        if cached is not None and cached[1] == kind and cached[2] == profile:
            return cached[0]
        gid = await self._gateway_id(site, gateway, now_ms)
        obj = await Device.get_or_none(gateway_id=gid, name=device)
        if obj is None:
            try:
                obj = await Device.create(gateway_id=gid, name=device, kind=kind, profile=profile,
                                          first_seen_ms=now_ms)
                log.info("device_new", site=site, gateway=gateway, device=device, kind=kind)
            except IntegrityError:
                obj = await Device.get(gateway_id=gid, name=device)
        if obj.kind != kind or obj.profile != profile:
            # A gateway re-configured the device (new profile); the newest declaration wins.
            await Device.filter(id=obj.id).update(kind=kind, profile=profile)
            log.info("device_changed", site=site, gateway=gateway, device=device, kind=kind,
                     profile=profile)
        self._cache.devices[key] = (obj.id, kind, profile)
        return obj.id

    async def device_ids(self, site: str, gateway: str, devices: dict[str, DeviceInfoV1],
                         now_ms: int) -> dict[str, int]:
        """Ids of ``devices`` of one gateway, creating site, gateway and devices as needed."""
        with self.db.activate():
            return {name: await self._device_id(site, gateway, name, info, now_ms)
                    for name, info in devices.items()}

    # -- batches ----------------------------------------------------------------------------

    async def write(self, telemetry: Sequence[TelemetryItem], statuses: Sequence[StatusItem] = (),
                    events: Sequence[EventItem] = ()) -> WriteResult:
        """Store a batch in one transaction; returns how many readings and events were new.

        Events must have passed :func:`check_event`. Raises the driver's exception when the
        database fails; nothing of the batch is then committed and the caller may simply call
        again with the same batch.
        """
        with self.db.activate():
            return await self._write(telemetry, statuses, events)

    async def _write(self, telemetry: Sequence[TelemetryItem], statuses: Sequence[StatusItem],
                     events: Sequence[EventItem]) -> WriteResult:
        result = WriteResult(statuses=len(statuses), events=len(events))
        rows: list[Row] = []
        # device id -> newest reading ts (capped at arrival time); gateway id -> (seen, backlog)
        device_seen: dict[int, int] = {}
        gateway_seen: dict[int, tuple[int, int]] = {}
        for item in telemetry:
            t = item.telemetry
            ids = await self.device_ids(t.site, t.gateway, t.devices, item.received_ms)
            gid = self._cache.gateways[(t.site, t.gateway)]
            prev = gateway_seen.get(gid)
            if prev is None or item.received_ms >= prev[0]:
                gateway_seen[gid] = (item.received_ms, t.backlog)
            newest: dict[int, int] = {}
            append = rows.append
            for r in t.readings:
                did = ids[r.device]
                value, text = convert_value(r.value)
                append((did, r.metric, r.seq, r.ts, value, text, r.unit, r.quality.value))
                if r.ts > newest.get(did, -1):
                    newest[did] = r.ts
            for did, ts in newest.items():
                seen = min(ts, item.received_ms)
                if seen > device_seen.get(did, -1):
                    device_seen[did] = seen
        status_rows = []
        models_rows = []
        for s_item in statuses:
            s = s_item.status
            gid = await self._gateway_id(s.site, s.gateway, s_item.received_ms)
            if s.devices:
                await self.device_ids(s.site, s.gateway, s.devices, s_item.received_ms)
            status_rows.append([s.state.value, s.ts, s.agent_version, s.backlog, gid])
            # Only an "online" status says what runs now; an "offline" one (the Last Will is
            # composed at connect time) keeps the last report visible.
            if s.state is GatewayState.ONLINE:
                models_rows.append([models_json(s), gid])
        event_rows = []
        for e_item in events:
            e = e_item.event
            gid = await self._gateway_id(e.site, e.gateway, e_item.received_ms)
            event_rows.append([gid, e.ts, e.type.value, e.device or "", clean_text(e.message),
                               e.readings_dropped, details_json(e.details), e_item.received_ms])
        result.readings = len(rows)

        sql = self.db.sql
        async with in_transaction(self.db.connection_name) as conn:
            if rows:
                result.inserted = await self._insert(conn, rows)
            if device_seen:
                await conn.execute_many(sql(
                    "UPDATE device SET last_seen_ms = ? WHERE id = ? "
                    "AND (last_seen_ms IS NULL OR last_seen_ms < ?)"),
                    [[seen, did, seen] for did, seen in device_seen.items()])
            if gateway_seen:
                await conn.execute_many(sql(
                    "UPDATE gateway SET last_seen_ms = ?, backlog = ? WHERE id = ? "
                    "AND (last_seen_ms IS NULL OR last_seen_ms <= ?)"),
                    [[seen, backlog, gid, seen] for gid, (seen, backlog) in gateway_seen.items()])
            if status_rows:
                # Applied in arrival order, not by the message's ts: a Last Will is composed when
                # the gateway connects, so it carries an older ts than the "online" it overrides.
                await conn.execute_many(sql(
                    "UPDATE gateway SET state = ?, state_ts_ms = ?, agent_version = ?, backlog = ? "
                    "WHERE id = ?"), status_rows)
            if models_rows:
                await conn.execute_many(sql("UPDATE gateway SET reported_models = ? WHERE id = ?"), models_rows)
            insert_event = sql(_INSERT_EVENT)
            for row in event_rows:  # events are rare: one statement each tells which were new
                for new in await conn.execute_query_dict(insert_event, row):
                    result.events_inserted[new["type"]] += 1
        return result

    async def _insert(self, conn: Any, rows: list[Row]) -> int:
        if self.db.dialect == "postgres":
            cols = list(zip(*rows, strict=True))
            _, res = await conn.execute_query(_INSERT_POSTGRES, [list(c) for c in cols])
            return int(res[0]["n"])
        # Tortoise's SQLite execute_query reports the statement's change count.
        payload = json.dumps(rows, separators=(",", ":"), allow_nan=False)
        n, _ = await conn.execute_query(_INSERT_SQLITE, [payload])
        return int(n)
