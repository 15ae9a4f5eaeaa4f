"""``/api/v1/devices/{device_id}/health``, ``twin.svg``, ``twin.png``: the twin picture (docs/twin.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel

from hub.api.access import READERS, allow
from hub.api.app import ApiContext
from hub.api.routes import _NOT_FOUND, Ctx, _device_or_404
from hub.api.schemas import iso_ms
from hub.twin.drawing import render_png_async, render_svg
from hub.twin.health import DeviceHealth, device_health

router = APIRouter(prefix="/api/v1")

StatusName = Literal["ok", "watch", "act", "unknown"]


class ComponentOut(BaseModel):
    """One part of the device and its health."""

    id: str
    label: str
    status: StatusName
    reason: str
    """Plain-language reason (shown on hover in the picture)."""
    reading: str
    """Short value printed next to the part ("1.5 bar"), "" when none."""


class DeviceHealthOut(BaseModel):
    """Health of every part of one device."""

    id: str
    kind: str
    layout: Literal["boiler", "meter", "tank", "generic"]
    status: StatusName
    """Worst status of the parts."""
    summary: str
    components: list[ComponentOut]
    notes: list[str]
    """Anomalies and alerts that concern the whole device rather than one part."""
    as_of: str


async def _health(ctx: ApiContext, device_id: str) -> DeviceHealth:
    dev = await _device_or_404(ctx, device_id)
    return await device_health(ctx.db, dev, now_ms=ctx.clock(), stale_after_s=ctx.status.stale_after_s)


_IMAGE: dict[int | str, dict[str, Any]] = {**_NOT_FOUND}


@router.get("/devices/{device_id}/health", dependencies=[allow(*READERS)], response_model=DeviceHealthOut,
            responses=_NOT_FOUND)
async def get_health(ctx: Ctx, device_id: str) -> DeviceHealthOut:
    """Status (``ok`` / ``watch`` / ``act`` / ``unknown``) and reason of each part of the device, from its
    latest readings, anomaly state and open alerts."""
    h = await _health(ctx, device_id)
    return DeviceHealthOut(
        id=h.device, kind=h.kind, layout=h.layout, status=h.status.value, summary=h.summary,
        components=[ComponentOut(id=c.id, label=c.label, status=c.status.value, reason=c.reason,
                                 reading=c.reading) for c in h.components],
        notes=list(h.notes), as_of=iso_ms(h.as_of_ms))


@router.get("/devices/{device_id}/twin.svg", dependencies=[allow(*READERS)], response_class=Response,
            responses={200: {"content": {"image/svg+xml": {}}, "description": "The picture as SVG"}, **_IMAGE})
async def twin_svg(ctx: Ctx, device_id: str) -> Response:
    """The device's parts drawn and coloured by health; hovering a part shows its reason."""
    h = await _health(ctx, device_id)
    # Cheap string building (no matplotlib): fine on the event loop.
    return Response(render_svg(h), media_type="image/svg+xml", headers={"Cache-Control": "no-store"})


@router.get("/devices/{device_id}/twin.png", dependencies=[allow(*READERS)], response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "The picture as PNG"}, **_IMAGE})
async def twin_png(ctx: Ctx, device_id: str,
                   scale: Annotated[float, Query(ge=0.5, le=3.0, description="1 = 900 x 600 pixels")] = 1.0,
                   ) -> Response:
    """The same picture as PNG (for reports), drawn by matplotlib in a worker thread."""
    h = await _health(ctx, device_id)
    return Response(await render_png_async(h, scale), media_type="image/png", headers={"Cache-Control": "no-store"})
