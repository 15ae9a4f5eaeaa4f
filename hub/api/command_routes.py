"""Route handlers of setpoint commands (``/api/v1/devices/{uid}/commands``, ``/api/v1/commands``);
see :mod:`hub.commands` and ``docs/commands.md``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from hub.api.access import FIELD, Principal, allow
from hub.api.routes import Ctx, NameQuery
from hub.api.schemas import iso_ms
from hub.commands import CommandRefused, CommandRow, CommandService
from protocol.ids import Name

router = APIRouter(prefix="/api/v1")


class CommandIn(BaseModel):
    """A setpoint to write."""

    model_config = ConfigDict(extra="forbid")

    point: Name = Field(description="A writable point of the device's profile, e.g. flow_setpoint")
    value: float = Field(allow_inf_nan=False, description="Engineering value (the point's unit), inside the "
                                                          "point's safe range")


class CommandOut(BaseModel):
    """One audited command."""

    id: str
    device: str
    """Device uid ``site.gateway.device``."""
    site: str
    gateway: str
    point: str
    value: float
    unit: str
    issued_by: str
    """The user who asked for it (empty when the hub never issued it, see ``via_hub``)."""
    issued_at: str | None
    expires_at: str | None
    status: str = Field(description="sent | refused_by_hub | applied | refused_by_gateway | failed | "
                                    "expired_no_answer")
    reason: str
    """Why refused or failed: out_of_range, not_writable, unknown_point, unknown_profile, expired,
    unknown_device, wrong_gateway, timeout, exception-N, connect, broker_unavailable, no_answer, ..."""
    message: str
    result_at: str | None
    """When the result was known at the hub (hub clock)."""
    read_back: float | None
    """What the device held after the write (``applied`` only)."""
    via_hub: bool
    """False: the hub did not issue this command; it only learnt of it from the gateway's answer."""


def _out(row: CommandRow) -> CommandOut:
    return CommandOut(id=row.id, device=row.device_uid, site=row.site, gateway=row.gateway, point=row.point,
                      value=row.value, unit=row.unit, issued_by=row.issued_by, issued_at=iso_ms(row.issued_at_ms),
                      expires_at=iso_ms(row.expires_ms), status=row.status, reason=row.reason, message=row.message,
                      result_at=iso_ms(row.result_at_ms), read_back=row.read_back, via_hub=row.via_hub)


def _service(ctx: Any) -> CommandService:
    service: CommandService | None = ctx.commands
    if service is None:
        raise HTTPException(503, "commands are not enabled on this hub")
    return service


_POST_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown device", "content": {"application/json": {
        "example": {"detail": "unknown device 'plant1.gw1.nope'"}}}},
    422: {"description": "Not writable, or outside the point's safe range (audited as refused_by_hub; an unsafe "
                         "value raises a human-error alert)", "content": {"application/json": {"example": {
                             "detail": "flow_setpoint = 95 degC is outside the safe range 30..80 degC of profile "
                                       "'sim-boiler'"}}}},
    503: {"description": "The hub is not connected to the broker: not sent (audited as failed)"},
}


@router.post("/devices/{device_id}/commands", status_code=202, response_model=CommandOut,
             responses=_POST_RESPONSES)
async def post_command(ctx: Ctx, device_id: str, body: CommandIn,
                       user: Annotated[Principal, allow(*FIELD)]) -> CommandOut:
    """Write a setpoint: checked against the device profile's safe range here, sent to the gateway
    (QoS 1, with an expiry), checked again and carried out there. Answers 202 with the audit record
    (``status`` ``sent``); follow it with ``GET /api/v1/commands/{id}`` until it is ``applied``,
    ``refused_by_gateway``, ``failed`` or ``expired_no_answer``."""
    try:
        row = await _service(ctx).issue(device_id, body.point, body.value, user.username)
    except CommandRefused as exc:
        raise HTTPException(exc.status, exc.message) from None
    return _out(row)


@router.get("/commands", response_model=list[CommandOut])
async def list_commands(
    ctx: Ctx,
    user: Annotated[Principal, allow(*FIELD)],
    device: Annotated[str | None, Query(max_length=200, description="Device uid site.gateway.device")] = None,
    gateway: Annotated[str | None, Query(max_length=130, pattern=r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$",
                                         description="Gateway uid site.gateway")] = None,
    site: NameQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[CommandOut]:
    """The command audit, newest first: who asked for which setpoint when, and how it ended."""
    gw_site, gw_name = gateway.split(".", 1) if gateway else (None, None)
    if site is not None and gw_site is not None and site != gw_site:
        return []
    rows = await _service(ctx).list(device_uid=device, site=gw_site or site, gateway=gw_name, limit=limit)
    return [_out(r) for r in rows]


@router.get("/commands/{command_id}", response_model=CommandOut, responses={404: {"description": "Unknown command"}})
async def get_command(ctx: Ctx, command_id: Annotated[str, Path(max_length=64)],
                      user: Annotated[Principal, allow(*FIELD)]) -> CommandOut:
    """One command's audit record."""
    row = await _service(ctx).get(command_id)
    if row is None:
        raise HTTPException(404, f"unknown command {command_id!r}")
    return _out(row)
