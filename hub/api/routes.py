"""Route handlers of ``/api/v1`` and ``/metrics``."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter

from hub import __version__, queries
from hub.api.access import READERS, allow, public
from hub.api.app import ApiContext
from hub.api.schemas import (
    NO_ANOMALY,
    AnomalyOut,
    BrokerHealth,
    DatabaseHealth,
    DeviceOut,
    EventOut,
    GatewayOut,
    HealthOut,
    LatestOut,
    LatestValue,
    ReadingOut,
    iso_ms,
    to_ms,
)
from hub.db import redact_url
from hub.metrics import CONTENT_TYPE
from hub.status import device_status, gateway_status
from protocol.ids import NAME_PATTERN
from protocol.schema import EventType

MAX_LIMIT = 10_000

router = APIRouter(prefix="/api/v1")
metrics_router = APIRouter()


def hub_context(request: Request) -> ApiContext:
    """The :class:`ApiContext` of the app serving ``request``."""
    ctx: ApiContext = request.app.state.hub
    return ctx


Ctx = Annotated[ApiContext, Depends(hub_context)]
NameQuery = Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=64)]

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "Unknown device", "content": {"application/json": {
    "example": {"detail": "unknown device 'plant1.gw1.nope'"}}}}}
_GATEWAY_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "Unknown gateway", "content": {
    "application/json": {"example": {"detail": "unknown gateway 'plant1.nope'"}}}}}
SinceQuery = Annotated[datetime | None, Query(description="ISO 8601, inclusive (no zone = UTC)")]
UntilQuery = Annotated[datetime | None, Query(description="ISO 8601, exclusive (no zone = UTC)")]


def _time_range(since: datetime | None, until: datetime | None) -> tuple[int | None, int | None]:
    since_ms = to_ms(since) if since is not None else None
    until_ms = to_ms(until) if until is not None else None
    if since_ms is not None and until_ms is not None and until_ms < since_ms:
        raise HTTPException(status_code=422, detail="'until' is before 'since'")
    return since_ms, until_ms


@router.get("/health",
    dependencies=[public("liveness for load balancers and process supervisors; no fleet data")],
    response_model=HealthOut, responses={503: {"model": HealthOut}})
async def health(ctx: Ctx) -> JSONResponse:
    """Database and broker connection state plus ingest counters. HTTP 503 while degraded."""
    db_ok = await ctx.db.ping()
    if ctx.ingest is None:
        broker = BrokerHealth(connected=False, state="disabled")
        broker_ok = True
    else:
        ing = ctx.ingest
        up = ing.connected and ing.subscribed.is_set()
        broker = BrokerHealth(connected=up, state="connected" if up else "disconnected",
                              host=ing.mqtt.host, port=ing.mqtt.port, error=None if up else ing.last_error)
        broker_ok = up
    body = HealthOut(
        status="ok" if db_ok and broker_ok else "degraded",
        version=__version__,
        uptime_s=round(time.monotonic() - ctx.started, 3),
        database=DatabaseHealth(connected=db_ok, backend=ctx.db.dialect, url=redact_url(ctx.db.url)),
        broker=broker,
        ingest={**ctx.metrics.stats.as_dict(), "pending": ctx.ingest.pending if ctx.ingest else 0},
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.status == "ok" else 503)


def _device_out(ctx: ApiContext, d: queries.DeviceRow, now: int,
                anomalies: dict[tuple[int, str], queries.AnomalyState]) -> DeviceOut:
    state = anomalies.get((d.gateway_pk, d.name))
    anomaly = NO_ANOMALY if state is None else AnomalyOut(active=state.active, score=state.score,
                                                           since=iso_ms(state.ts_ms))
    return DeviceOut(id=d.uid, kind=d.kind, site=d.site, gateway=d.gateway, name=d.name, profile=d.profile,
                     status=device_status(d.last_seen_ms, now, ctx.status),
                     last_seen=iso_ms(d.last_seen_ms), first_seen=iso_ms(d.first_seen_ms), anomaly=anomaly)


@router.get("/devices", dependencies=[allow(*READERS)], response_model=list[DeviceOut])
async def list_devices(ctx: Ctx, site: NameQuery = None, gateway: NameQuery = None) -> list[DeviceOut]:
    """All devices ever seen, ordered by id, with liveness and anomaly state; optionally only one
    site's or gateway's."""
    now = ctx.clock()
    devices = await queries.list_devices(ctx.db, site, gateway)
    anomalies = await queries.anomaly_states(ctx.db)
    return [_device_out(ctx, d, now, anomalies) for d in devices]


async def _device_or_404(ctx: ApiContext, device_id: str) -> queries.DeviceRow:
    dev = await queries.find_device(ctx.db, device_id)
    if dev is None:
        raise HTTPException(status_code=404, detail=f"unknown device {device_id!r}")
    return dev


@router.get("/devices/{device_id}", dependencies=[allow(*READERS)], response_model=DeviceOut, responses=_NOT_FOUND)
async def get_device(ctx: Ctx, device_id: str) -> DeviceOut:
    """One device by uid ``site.gateway.device``."""
    dev = await _device_or_404(ctx, device_id)
    return _device_out(ctx, dev, ctx.clock(), await queries.anomaly_states(ctx.db, dev.gateway_pk))


@router.get("/devices/{device_id}/latest",
    dependencies=[allow(*READERS)], response_model=LatestOut, responses=_NOT_FOUND)
async def latest(ctx: Ctx, device_id: str) -> LatestOut:
    """Newest value of each metric of the device (by reading timestamp)."""
    dev = await _device_or_404(ctx, device_id)
    rows = await queries.latest(ctx.db, dev.pk)
    return LatestOut(id=dev.uid, metrics={
        r.metric: LatestValue(value=r.typed_value, unit=r.unit, ts=iso_ms(r.ts_ms), quality=r.quality, seq=r.seq)
        for r in rows})


_READINGS_JSON: TypeAdapter[list[dict[str, Any]]] = TypeAdapter(list[dict[str, Any]])


@router.get("/devices/{device_id}/readings",
    dependencies=[allow(*READERS)], response_model=list[ReadingOut], responses=_NOT_FOUND)
async def readings(
    ctx: Ctx,
    device_id: str,
    metric: NameQuery = None,
    since: SinceQuery = None,
    until: UntilQuery = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 1000,
) -> Response:
    """Readings of a device ordered by timestamp (oldest first), optionally of one metric,
    in ``[since, until)``, at most ``limit`` (default 1000, max 10000)."""
    since_ms, until_ms = _time_range(since, until)
    dev = await _device_or_404(ctx, device_id)
    rows = await queries.readings(ctx.db, dev.pk, metric, since_ms, until_ms, limit)
    # The dashboard's device page loads up to 100,000 of these per range: plain dicts serialised
    # in one go, instead of a ReadingOut per row validated twice, take a third of the time
    # (bench.dashboard). The shape is ReadingOut's, which the OpenAPI document still declares.
    return Response(_READINGS_JSON.dump_json([
        {"ts": iso_ms(r.ts_ms), "metric": r.metric, "value": r.typed_value, "unit": r.unit, "quality": r.quality,
         "seq": r.seq} for r in rows]), media_type="application/json")


@router.get("/gateways", dependencies=[allow(*READERS)], response_model=list[GatewayOut])
async def list_gateways(ctx: Ctx) -> list[GatewayOut]:
    """All gateways with their announced state, liveness, backlog, dropped readings and device count."""
    now = ctx.clock()
    out = []
    for g in await queries.list_gateways(ctx.db):
        state = g.state if g.state in ("online", "offline") else "unknown"
        out.append(GatewayOut(
            id=f"{g.site}.{g.name}", site=g.site, gateway=g.name, state=state,
            status=gateway_status(g.state, g.last_seen_ms, now, ctx.status),
            last_seen=iso_ms(g.last_seen_ms), state_since=iso_ms(g.state_ts_ms), backlog=g.backlog,
            readings_dropped=g.readings_dropped, devices=g.devices, agent_version=g.agent_version))
    return out


def _event_out(e: queries.EventRow) -> EventOut:
    return EventOut(ts=iso_ms(e.ts_ms), type=e.type, device=e.device or None, message=e.message,
                    readings_dropped=e.readings_dropped, details=e.details, received=iso_ms(e.received_ms))


async def gateway_or_404(ctx: ApiContext, gateway_id: str) -> queries.GatewayRef:
    """The gateway ``site.gateway``; 404 ``unknown gateway`` when there is none."""
    gw = await queries.find_gateway(ctx.db, gateway_id)
    if gw is None:
        raise HTTPException(status_code=404, detail=f"unknown gateway {gateway_id!r}")
    return gw


@router.get("/gateways/{gateway_id}/events",
    dependencies=[allow(*READERS)], response_model=list[EventOut], responses=_GATEWAY_NOT_FOUND)
async def gateway_events(
    ctx: Ctx,
    gateway_id: str,
    since: SinceQuery = None,
    until: UntilQuery = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    type: Annotated[list[EventType] | None, Query(description="Only these types (repeat the parameter)")] = None,
    device: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=64,
                                        description="Only events about this device (its name)")] = None,
) -> list[EventOut]:
    """Events of the gateway ``site.gateway`` (buffer thinned/corrupt/full, anomaly started/cleared,
    model activated/rejected/rolled back), newest first, with ``ts`` in ``[since, until)``, at most
    ``limit`` (default 100, max 10000); optionally only of the given types
    (``type``, repeated) or only about one ``device`` (its name)."""
    since_ms, until_ms = _time_range(since, until)
    gw = await gateway_or_404(ctx, gateway_id)
    rows = await queries.events(ctx.db, gw.pk, since_ms, until_ms, limit, types=[t.value for t in type or ()],
                                device=device)
    return [_event_out(e) for e in rows]


@router.get("/devices/{device_id}/anomalies",
    dependencies=[allow(*READERS)], response_model=list[EventOut], responses=_NOT_FOUND)
async def device_anomalies(
    ctx: Ctx,
    device_id: str,
    since: SinceQuery = None,
    until: UntilQuery = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> list[EventOut]:
    """``anomaly_started`` / ``anomaly_cleared`` events of the device, newest first, with ``ts`` in
    ``[since, until)``, at most ``limit`` (default 100, max 10000)."""
    since_ms, until_ms = _time_range(since, until)
    dev = await _device_or_404(ctx, device_id)
    rows = await queries.events(ctx.db, dev.gateway_pk, since_ms, until_ms, limit, types=queries.ANOMALY_EVENTS,
                                device=dev.name)
    return [_event_out(e) for e in rows]


@metrics_router.get("/metrics",
    dependencies=[public("Prometheus scrape: counters only; restrict by network")], include_in_schema=False)
async def metrics(ctx: Ctx) -> Response:
    """Prometheus text exposition of the ingest counters."""
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)
