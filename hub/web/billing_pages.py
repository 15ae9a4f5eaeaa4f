"""Dashboard pages for meters and billing (``/meters``, ``/meters/{uid}``) and the what-if
simulator (``/whatif``).

The pages follow the API's roles (``hub/api/access.py``): reading a meter is field work (FIELD:
admin, staff, technician), cost and statements are billing (STAFF). A technician therefore gets
the meter page with its reading dialog but without the cost and statement sections; a viewer gets
the 403 page. The figures a page shows come from the API (the page scripts call
``/api/v1/meters/{id}/cost`` and ``/api/v1/statements``), so the API checks the role again.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from hub import queries, whatif
from hub.api.access import FIELD, STAFF, Principal, allow
from hub.api.app import ApiContext
from hub.api.schemas import iso_ms
from hub.billing import money, service
from hub.billing.service import BillingError, plain
from hub.billing.tariffs import assignment_at, to_local
from hub.web.routes import PAGE_TAG, render

router = APIRouter(include_in_schema=False, tags=[PAGE_TAG])


def _ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.hub
    return ctx


def is_staff(user: Principal) -> bool:
    """May ``user`` see cost and statements (the API's STAFF roles)?"""
    return user.role in STAFF


def month_start_ms(now_ms: int) -> int:
    """The 1st of the current UTC month, 00:00: where "cost to date" starts (as the board report)."""
    now = datetime.fromtimestamp(now_ms / 1000, UTC)
    return int(datetime(now.year, now.month, 1, tzinfo=UTC).timestamp()) * 1000


async def _meters(ctx: ApiContext) -> list[queries.DeviceRow]:
    return [d for d in await queries.list_devices(ctx.db) if await service.is_meter(ctx.db, d)]


@router.get("/meters")
async def meters(request: Request, user: Annotated[Principal, allow(*FIELD)]) -> HTMLResponse:
    """Every meter with its latest register reading and, for staff, its cost this month."""
    ctx = _ctx(request)
    now = ctx.clock()
    since = month_start_ms(now)
    staff = is_staff(user)
    rows: list[dict[str, Any]] = []
    for dev in await _meters(ctx):
        previous, _ = await service.neighbours(ctx.db, dev.pk, now)
        row: dict[str, Any] = {"uid": dev.uid, "site": dev.site, "name": dev.name,
                               "reading": plain(previous.value) if previous else None,
                               "reading_ts": iso_ms(previous.ts_ms) if previous else None}
        if staff:
            try:
                cost = (await service.meter_cost(ctx.db, dev, since, now, ctx.billing)).bill
            except BillingError as exc:  # e.g. tariffs of two currencies: say so, keep the list
                row["error"] = str(exc)
            else:
                row["kwh"] = str(money.kwh(cost.kwh))
                row["currency"] = cost.currency
                row["total"] = money.fmt(cost.total, cost.currency) if cost.currency else None
        rows.append(row)
    return render("meters.html", user=user, page="meters", meters=rows, staff=staff, since=iso_ms(since))


async def _tariff_now(ctx: ApiContext, dev: queries.DeviceRow, now: int) -> dict[str, Any] | None:
    """The tariff in force now and the rate of its band at this moment (for the estimate)."""
    current = assignment_at(await service.meter_assignments(ctx.db, dev), now)
    if current is None:
        return None
    tariff = current.tariff
    band = tariff.band_at_local(to_local(now, tariff.zone))
    return {"name": tariff.name, "currency": tariff.currency, "minor": money.minor_exponent(tariff.currency),
            "band": band.name, "rate": plain(band.rate), "vat_rate": plain(tariff.vat_rate),
            "vat_percent": plain(tariff.vat_rate * Decimal(100))}


@router.get("/meters/{meter_id}")
async def meter(request: Request, meter_id: str, user: Annotated[Principal, allow(*FIELD)]) -> HTMLResponse:
    """A meter: cost to date by band, standing charge and VAT, statements (staff), and the
    reading-entry dialog (everybody allowed to submit readings)."""
    ctx = _ctx(request)
    dev = await queries.find_device(ctx.db, meter_id)
    if dev is None or not await service.is_meter(ctx.db, dev):
        what = "There is no meter" if dev is None else "This device is not a meter:"
        return render("error.html", 404, user=user, title="Unknown meter", message=f"{what} {meter_id!r}.")
    now = ctx.clock()
    previous, _ = await service.neighbours(ctx.db, dev.pk, now)
    data = {
        "meter": dev.uid,
        "staff": is_staff(user),
        "since": iso_ms(month_start_ms(now)),
        "previous": {"value": plain(previous.value), "ts": iso_ms(previous.ts_ms),
                     "source": previous.source.value} if previous else None,
        "tariff": await _tariff_now(ctx, dev, now),
    }
    return render("meter.html", user=user, page="meters", device=dev, data=data)


def _number(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


@router.get("/whatif")
async def whatif_page(request: Request, user: Annotated[Principal, allow(*FIELD)]) -> HTMLResponse:
    """The what-if simulator's form and charts (the script calls ``POST /api/v1/whatif``), with the
    fleet's boilers to choose from and their latest setpoint and outdoor temperature."""
    low, high = whatif.profile().safe_range("flow_setpoint")
    boilers = [{"uid": b.device.uid, "label": f"{b.device.site} › {b.device.gateway} › {b.device.name}",
                "gateway": b.gateway, "setpoint": _number(b.defaults.get("flow_setpoint_c")),
                "outdoor": _number(b.defaults.get("outdoor_temp_c"))}
               for b in await whatif.fleet_boilers(_ctx(request).db)]
    return render("whatif.html", user=user, page="whatif", setpoint_min=low, setpoint_max=high,
                  max_horizon=whatif.MAX_HORIZON_H, boilers=boilers)
