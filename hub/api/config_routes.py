"""Route handlers of remote configuration (``/api/v1/gateways/{id}/config``); see
:mod:`hub.gateway_config` and ``docs/remote-config.md``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException
from pydantic import BaseModel

from hub import gateway_config
from hub.api.access import FIELD, Principal, allow
from hub.api.routes import Ctx, gateway_or_404
from hub.api.schemas import iso_ms

router = APIRouter(prefix="/api/v1")


class ConfigVersionOut(BaseModel):
    """One version in the history (the audit trail)."""

    version: int
    changed_by: str
    changed_at: str | None
    devices: int


class GatewayConfigOut(BaseModel):
    """The desired configuration of a gateway and what the gateway reported about it."""

    gateway: str
    version: int | None
    """Desired version (``null``: never configured from the hub; the gateway runs its edge.toml)."""
    config: dict[str, Any] | None
    """The desired ``devices`` (and ``serial_ports``) tables, in edge.toml's format."""
    state: Literal["none", "pending", "applied", "rejected"]
    """``applied``: the gateway runs the desired version; ``rejected``: it refused it (see
    ``last_error``) and runs ``applied_version``; ``pending``: not answered yet."""
    applied_version: int | None
    applied_at: str | None
    rejected_version: int | None
    rejected_at: str | None
    last_error: str
    """The gateway's error for ``rejected_version`` (which device, which key)."""
    history: list[ConfigVersionOut]
    """Newest first, at most 20."""


_EXAMPLE = {"devices": [{"name": "boiler-1", "profile": "sim-boiler", "host": "10.0.0.21", "port": 502,
                         "poll_interval_s": 5.0}]}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown gateway", "content": {"application/json": {
        "example": {"detail": "unknown gateway 'plant1.nope'"}}}},
    422: {"description": "Not of the shape of a gateway configuration", "content": {"application/json": {
        "example": {"detail": "devices: names must be unique; repeated: ['boiler-1']"}}}},
}


async def _out(uid: str, site: str, gateway: str) -> GatewayConfigOut:
    current = await gateway_config.current_config(site, gateway)
    rep = await gateway_config.reported_state(site, gateway)
    version = None if current is None else current[0]
    state: Literal["none", "pending", "applied", "rejected"] = "none"
    if version is not None:
        state = ("applied" if rep.applied_version == version else
                 "rejected" if rep.rejected_version == version else "pending")
    return GatewayConfigOut(
        gateway=uid, version=version, config=None if current is None else current[1], state=state,
        applied_version=rep.applied_version, applied_at=iso_ms(rep.applied_at_ms),
        rejected_version=rep.rejected_version, rejected_at=iso_ms(rep.rejected_at_ms), last_error=rep.last_error,
        history=[ConfigVersionOut(version=h.version, changed_by=h.changed_by, changed_at=iso_ms(h.changed_at_ms),
                                  devices=h.devices) for h in await gateway_config.history(site, gateway)])


@router.get("/gateways/{gateway_id}/config", response_model=GatewayConfigOut, responses=_RESPONSES)
async def get_config(ctx: Ctx, gateway_id: str, user: Annotated[Principal, allow(*FIELD)]) -> GatewayConfigOut:
    """The device configuration the gateway ``site.gateway`` must run, the version it runs, its last
    error, and who changed the configuration when."""
    gw = await gateway_or_404(ctx, gateway_id)
    return await _out(gw.uid, gw.site, gw.name)


@router.put("/gateways/{gateway_id}/config", response_model=GatewayConfigOut, responses=_RESPONSES)
async def put_config(ctx: Ctx, gateway_id: str, user: Annotated[Principal, allow(*FIELD)],
                     document: Annotated[Any, Body(examples=[_EXAMPLE])]) -> GatewayConfigOut:
    """Set the gateway's ``devices`` (and optionally ``serial_ports``), in edge.toml's format, as a new
    version, and send it to the gateway (retained MQTT message). The gateway validates it completely
    and applies it without a restart, or rejects it and keeps running what it has: watch ``state``."""
    gw = await gateway_or_404(ctx, gateway_id)
    try:
        await gateway_config.set_config(gw.site, gw.name, document, user.username, publisher=ctx.configs,
                                        clock=ctx.clock)
    except gateway_config.ConfigRefused as exc:
        raise HTTPException(exc.status, exc.message) from None
    return await _out(gw.uid, gw.site, gw.name)
