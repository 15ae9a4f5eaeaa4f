"""Dashboard pages of one device (live charts, data quality, twin picture) and of the alerts.

Both pages are rendered with what they need to show at once (the device's latest values, the
signed-in user's role) and then kept up to date by their scripts (``static/device.js``,
``static/alerts.js``) through the public API, so whatever a page does is checked by the API's
guards again. See ``docs/dashboard.md``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from hub import queries
from hub.api.access import FIELD, READERS, Principal, allow
from hub.api.schemas import iso_ms
from hub.web.routes import PAGE_TAG, render

router = APIRouter(include_in_schema=False, tags=[PAGE_TAG])

RANGES = (("15m", "15 minutes", 15 * 60), ("1h", "1 hour", 3600), ("6h", "6 hours", 6 * 3600),
          ("24h", "24 hours", 86_400), ("7d", "7 days", 7 * 86_400))
"""Time ranges of the device charts: key, label, seconds (the readings API's ``since``)."""


def _db(request: Request) -> Any:
    return request.app.state.hub.db


@router.get("/devices/{device_id}")
async def device_page(request: Request, device_id: str, user: Annotated[Principal, allow(*READERS)]) -> HTMLResponse:
    """A device: latest values with units, a live chart per metric over a chosen time range with
    gaps, bad readings, anomaly events and alerts marked, and its twin picture with reasons."""
    db = _db(request)
    dev = await queries.find_device(db, device_id)
    if dev is None:
        return render("error.html", 404, user=user, title="Unknown device",
                      message=f"There is no device {device_id!r}.")
    rows = await queries.latest(db, dev.pk)
    values = [{"metric": r.metric, "value": r.typed_value, "unit": r.unit, "quality": r.quality,
               "ts": iso_ms(r.ts_ms)} for r in rows]
    info = {"id": dev.uid, "name": dev.name, "kind": dev.kind, "site": dev.site, "gateway": dev.gateway,
            "ranges": [{"key": k, "label": label, "seconds": s} for k, label, s in RANGES]}
    return render("device.html", user=user, device=dev, values=values, info=info, ranges=RANGES, page="fleet")


@router.get("/alerts")
async def alerts_page(request: Request, user: Annotated[Principal, allow(*READERS)]) -> HTMLResponse:
    """Alerts with filters, history, acknowledge and clear (roles that may), and the contacts
    notified per site."""
    sites = sorted({d.site for d in await queries.list_devices(_db(request))})
    can_act = user.role in FIELD
    info = {"user": user.username, "can_act": can_act, "sites": sites}
    return render("alerts.html", user=user, info=info, sites=sites, can_act=can_act, page="alerts")
