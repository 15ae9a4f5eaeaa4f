"""``/api/v1/alerts``: list, detail with history, acknowledge, clear (``docs/alerts.md``)."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from hub.alerts import engine
from hub.alerts.models import Alert, AlertState
from hub.alerts.rules import Severity
from hub.api.access import FIELD, READERS, allow
from hub.api.app import ApiContext
from hub.api.schemas import iso_ms
from protocol.ids import NAME_PATTERN

router = APIRouter(prefix="/api/v1", tags=["alerts"])

MAX_ALERTS = 1000


def _ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.hub
    return ctx


Ctx = Annotated[ApiContext, Depends(_ctx)]
AlertId = Annotated[int, Path(ge=1, le=2**31 - 1, description="Alert id")]


class AlertOut(BaseModel):
    """An alert."""

    id: int
    key: str = Field(description="Condition key `<rule>:<device uid | gateway id | site>`; one alert per key "
                                 "is open or acknowledged at a time")
    rule: str
    type: str = Field(description="threshold | rate | stale | gateway_offline | gap | anomaly | human_error")
    severity: Severity
    state: AlertState
    site: str | None
    gateway: str | None
    device: str | None = Field(description="Device uid `site.gateway.device`")
    metric: str | None
    message: str
    count: int = Field(description="Times the condition triggered while this alert was not cleared (1 at opening)")
    last_value: float | None
    opened_at: str | None
    last_triggered_at: str | None
    acknowledged_at: str | None
    acknowledged_by: str | None
    cleared_at: str | None
    cleared_by: str | None = Field(description="Who cleared it; `auto` when the condition went back to normal")
    notifications_sent: int
    notifications_suppressed: int = Field(description="Held back by the rate limit")


class AlertEventOut(BaseModel):
    """One step of an alert's history."""

    ts: str | None
    action: str = Field(description="opened | retriggered | acknowledged | cleared | notified | notify_failed")
    by: str | None
    value: float | None
    message: str


class AlertDetailOut(AlertOut):
    """An alert with its history, oldest first."""

    history: list[AlertEventOut]


class ActionIn(BaseModel):
    """Body of ``ack`` and ``clear``."""

    model_config = ConfigDict(extra="forbid")

    by: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^\S(.*\S)?$",
                             description="Who acknowledges / clears (free text until there is auth)")]
    note: Annotated[str, Field(max_length=2000)] = ""


def _out(a: Alert) -> dict[str, Any]:
    return {"id": a.id, "key": a.key, "rule": a.rule, "type": a.type, "severity": a.severity, "state": a.state,
            "site": a.site or None, "gateway": a.gateway or None, "device": a.device or None,
            "metric": a.metric or None, "message": a.message, "count": a.count, "last_value": a.last_value,
            "opened_at": iso_ms(a.opened_ms), "last_triggered_at": iso_ms(a.last_triggered_ms),
            "acknowledged_at": iso_ms(a.acknowledged_ms), "acknowledged_by": a.acknowledged_by,
            "cleared_at": iso_ms(a.cleared_ms), "cleared_by": a.cleared_by,
            "notifications_sent": a.notifications_sent, "notifications_suppressed": a.notifications_suppressed}


_404: dict[int | str, dict[str, Any]] = {404: {"description": "Unknown alert", "content": {"application/json": {
    "example": {"detail": "unknown alert 42"}}}}}
_409: dict[int | str, dict[str, Any]] = {409: {"description": "Not possible in the alert's state", "content": {
    "application/json": {"example": {"detail": "alert 42 is cleared; a cleared alert cannot be acknowledged"}}}}}


@router.get("/alerts", dependencies=[allow(*READERS)], response_model=list[AlertOut])
async def list_alerts(
    ctx: Ctx,
    state: Annotated[list[AlertState] | None, Query(description="Only these states (repeat the parameter)")] = None,
    severity: Annotated[list[Severity] | None, Query(description="Only these severities (repeat)")] = None,
    site: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=64)] = None,
    device: Annotated[str | None, Query(max_length=200, pattern=r"^[A-Za-z0-9_.-]+$",
                                        description="Device uid `site.gateway.device`")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_ALERTS)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> list[dict[str, Any]]:
    """Alerts, newest first (by opening time), optionally filtered; ``limit`` (default 100, max 1000)
    and ``offset`` page through them."""
    with ctx.db.activate():
        q = Alert.all()
        if state:
            q = q.filter(state__in=[s.value for s in state])
        if severity:
            q = q.filter(severity__in=[s.value for s in severity])
        if site is not None:
            q = q.filter(site=site)
        if device is not None:
            q = q.filter(device=device)
        rows = await q.order_by("-opened_ms", "-id").offset(offset).limit(limit)
    return [_out(a) for a in rows]


class ContactOut(BaseModel):
    """A notification contact of ``[[alerts.contacts]]`` (the webhook's host only)."""

    name: str
    role: str = Field(description="maintenance | engineering | operations")
    sites: list[str] = Field(description="Sites it looks after; empty: every site (and alerts without a site)")
    min_severity: Severity = Field(description="The least severity it hears of")
    email: list[str]
    webhook_host: str | None = Field(description="Host of its webhook; the URL itself often holds a secret token "
                                                 "and is not shown")


# Declared before /alerts/{alert_id}, which would otherwise take "contacts" for an id (422).
@router.get("/alerts/contacts", dependencies=[allow(*READERS)], response_model=list[ContactOut])
async def list_contacts(ctx: Ctx) -> list[dict[str, Any]]:
    """Who is notified of which alerts (``[[alerts.contacts]]`` of the hub's configuration), so
    whoever looks at an alert knows who has heard of it. Every role may read it: these are the
    people to call. Webhook URLs are reduced to their host (their path is often a secret)."""
    return [{"name": c.name, "role": c.role, "sites": list(c.sites), "min_severity": c.min_severity,
             "email": list(c.email), "webhook_host": urlsplit(c.webhook).hostname if c.webhook else None}
            for c in ctx.alerts.contacts]


async def _alert_or_404(ctx: ApiContext, alert_id: int) -> Alert:
    with ctx.db.activate():
        alert = await Alert.get_or_none(id=alert_id)
    if alert is None:
        raise HTTPException(status_code=404, detail=f"unknown alert {alert_id}")
    return alert


async def _detail(ctx: ApiContext, alert: Alert) -> dict[str, Any]:
    events = await engine.history(ctx.db, alert.id)
    return {**_out(alert), "history": [
        {"ts": iso_ms(e["ts_ms"]), "action": e["action"], "by": e["by"] or None, "value": e["value"],
         "message": e["message"]} for e in events]}


@router.get("/alerts/{alert_id}", dependencies=[allow(*READERS)], response_model=AlertDetailOut, responses=_404)
async def get_alert(ctx: Ctx, alert_id: AlertId) -> dict[str, Any]:
    """One alert with its history (opened, retriggered, acknowledged, cleared, notifications)."""
    return await _detail(ctx, await _alert_or_404(ctx, alert_id))


@router.post("/alerts/{alert_id}/ack",
    dependencies=[allow(*FIELD)], response_model=AlertDetailOut, responses={**_404, **_409})
async def ack_alert(ctx: Ctx, alert_id: AlertId, body: Annotated[ActionIn, Body()]) -> dict[str, Any]:
    """Acknowledge an open alert: someone is on it. It stays until cleared (by hand, or by itself
    when its rule clears automatically); a repeat of the condition counts on it. **409** when it is
    already acknowledged or cleared."""
    try:
        alert = await engine.acknowledge(ctx.db, alert_id, body.by, ctx.clock(), body.note)
    except engine.AlertNotFound as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except engine.AlertConflict as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    return await _detail(ctx, alert)


@router.post("/alerts/{alert_id}/clear",
    dependencies=[allow(*FIELD)], response_model=AlertDetailOut, responses={**_404, **_409})
async def clear_alert(ctx: Ctx, alert_id: AlertId, body: Annotated[ActionIn, Body()]) -> dict[str, Any]:
    """Clear an open or acknowledged alert by hand; the next breach opens a new alert. **409** when
    it is already cleared."""
    try:
        alert = await engine.clear(ctx.db, alert_id, body.by, ctx.clock(), body.note)
    except engine.AlertNotFound as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except engine.AlertConflict as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    if ctx.fleet_events is not None:
        ctx.fleet_events.changed()  # one alert fewer open on the dashboards' fleet pages
    return await _detail(ctx, alert)
