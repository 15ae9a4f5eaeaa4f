"""``/api/v1/sites/{site}/report.pdf`` and ``.png``: the board report of a site (``docs/report.md``).

Viewers may download it (the board are viewers). Drawing takes about a second of CPU, so it runs in a
thread, and at most :data:`MAX_CONCURRENT` reports are built at once: further requests wait up to
:data:`WAIT_S` for a slot, then get 503 with ``Retry-After`` instead of piling up threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import Response

from hub import report
from hub.api.access import READERS, allow
from hub.api.routes import Ctx
from protocol.ids import NAME_PATTERN

router = APIRouter(prefix="/api/v1", tags=["report"])

MAX_CONCURRENT = 2
"""Reports built at the same time (the hub has other work; matplotlib draws one at a time anyway)."""
WAIT_S = 30.0
"""How long a request waits for a free slot before 503."""

SiteName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=64, description="Site name")]


def _slots(request: Request) -> asyncio.Semaphore:
    # Per app (created on first use, inside the app's event loop): not module-level, where one
    # semaphore would be shared by every hub of a process and bound to the first loop using it.
    slots: asyncio.Semaphore | None = getattr(request.app.state, "report_slots", None)
    if slots is None:
        slots = request.app.state.report_slots = asyncio.Semaphore(MAX_CONCURRENT)
    return slots


_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown site", "content": {"application/json": {"example": {"detail": "unknown site 'x'"}}}},
    503: {"description": "Too many reports being built; try again after Retry-After seconds"},
}


async def _build(request: Request, ctx: Any, site: str, render: Callable[[report.ReportData], bytes],
                 media_type: str, ext: str) -> Response:
    slots = _slots(request)
    try:
        await asyncio.wait_for(slots.acquire(), WAIT_S)
    except TimeoutError:
        raise HTTPException(503, "too many board reports being built; try again shortly",
                            headers={"Retry-After": "10"}) from None
    try:
        try:
            data = await report.gather(ctx.db, site, ctx.clock(), ctx.status, ctx.billing)
        except report.UnknownSite:
            raise HTTPException(404, f"unknown site {site!r}") from None
        body = await asyncio.to_thread(render, data)
    finally:
        slots.release()
    filename = f"board-report-{site}-{data.date}.{ext}"
    return Response(body, media_type=media_type, headers={
        "Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"})


@router.get("/sites/{site}/report.pdf", dependencies=[allow(*READERS)], response_class=Response,
            responses={200: {"content": {"application/pdf": {}}, "description": "The report (A4 landscape)"},
                       **_RESPONSES})
async def report_pdf(request: Request, ctx: Ctx, site: SiteName) -> Response:
    """The site's board report as PDF: headline, twin picture of the device most at risk, top risks,
    the last week's trends and the cost to date this month (page 1); devices, all risks and cost
    lines (page 2)."""
    return await _build(request, ctx, site, report.render_pdf, "application/pdf", "pdf")


@router.get("/sites/{site}/report.png", dependencies=[allow(*READERS)], response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "Page 1, 1753 × 1240 px (150 dpi)"},
                       **_RESPONSES})
async def report_png(request: Request, ctx: Ctx, site: SiteName) -> Response:
    """Page 1 of the site's board report as PNG (A4 landscape at 150 dpi)."""
    return await _build(request, ctx, site, report.render_png, "image/png", "png")
