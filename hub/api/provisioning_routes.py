"""Routes of gateway provisioning (:mod:`hub.provisioning`, ``docs/security.md``): a technician
creates a gateway and gets a one-time claim code; the gateway trades the code for its identity,
broker login and device configuration; staff revoke a gateway."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from hub.api.access import FIELD, STAFF, Principal, RateLimiter, allow, public
from hub.api.app import ApiContext
from hub.api.routes import Ctx, gateway_or_404
from hub.api.schemas import iso_ms
from hub.errors import RequestRefused
from hub.provisioning import IssuedCode, Provisioning
from protocol.ids import Name

router = APIRouter(prefix="/api/v1", tags=["provisioning"])

# Codes, passwords: nothing of these answers may be kept by a proxy or a browser cache.
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GatewayCreateIn(_In):
    """A gateway to create, with the device configuration it will be given."""

    site: Name
    name: Name
    devices: Annotated[list[dict[str, Any]], Field(max_length=1000)] | None = None
    """The gateway's ``[[devices]]`` in the edge configuration's format (``docs/edge.md``); checked
    completely by the gateway, which reports the result (``docs/remote-config.md``)."""
    serial_ports: Annotated[list[dict[str, Any]], Field(max_length=64)] | None = None
    """Its ``[[serial_ports]]``, for RS-485 and optical-head devices."""


class ClaimCodeOut(BaseModel):
    """A claim code, shown this once: write it down or hand it to the gateway now."""

    gateway: str
    site: str
    name: str
    claim_code: str
    expires_at: str


class ProvisionIn(_In):
    """The claim code, as shown to the technician (separators and case do not matter)."""

    code: Annotated[str, Field(min_length=1, max_length=64)]


class GatewayIdentityOut(BaseModel):
    site: str
    name: str
    client_id: str


class BrokerLoginOut(BaseModel):
    host: str
    port: int
    tls: bool
    ca_pem: str | None
    """The CA certificate to verify the broker with (``null``: the gateway's system trust store)."""
    username: str
    password: str
    """Only ever sent in this answer; the hub keeps a hash."""


class DeviceConfigOut(BaseModel):
    version: int
    devices: list[dict[str, Any]]
    serial_ports: list[dict[str, Any]] = []


class ProvisionOut(BaseModel):
    """Everything a gateway needs to run: who it is, how it logs in to the broker, what it polls."""

    gateway: GatewayIdentityOut
    mqtt: BrokerLoginOut
    config: DeviceConfigOut | None
    """``null`` when nobody set a device configuration yet (staff can send one later)."""


class RevokeOut(BaseModel):
    gateway: str
    credentials_revoked: bool
    claim_codes_invalidated: int


def _error(status: int, description: str, example: str) -> dict[int | str, dict[str, Any]]:
    return {status: {"description": description, "content": {"application/json": {"example": {"detail": example}}}}}


def _provisioning(ctx: ApiContext) -> Provisioning:
    if ctx.provisioning is None:
        raise HTTPException(503, "provisioning is not available on this hub")
    return ctx.provisioning


def _code_out(issued: IssuedCode) -> ClaimCodeOut:
    return ClaimCodeOut(gateway=f"{issued.site}.{issued.gateway}", site=issued.site, name=issued.gateway,
                        claim_code=issued.code, expires_at=iso_ms(issued.expires_ms))


def _refused(exc: RequestRefused) -> HTTPException:
    return HTTPException(exc.status, exc.message)


@router.post("/gateways", status_code=201, response_model=ClaimCodeOut,
             responses={**_error(409, "The gateway exists already", "gateway site-1.gw-1 exists already; ..."),
                        **_error(422, "Invalid names or device configuration shape", "'devices' is missing")})
async def create_gateway(body: GatewayCreateIn, ctx: Ctx, response: Response,
                         user: Annotated[Principal, allow(*FIELD)]) -> ClaimCodeOut:
    """Create a gateway (and its site) and issue its one-time claim code, returned only here."""
    try:
        issued = await _provisioning(ctx).create_gateway(body.site, body.name, user.username, body.devices,
                                                         body.serial_ports)
    except RequestRefused as exc:
        raise _refused(exc) from None
    response.headers.update(_NO_STORE)
    return _code_out(issued)


@router.post("/gateways/{gateway_id}/claim-code", status_code=201, response_model=ClaimCodeOut,
             responses=_error(404, "Unknown gateway", "unknown gateway 'site-1.gw-9'"))
async def new_claim_code(gateway_id: str, ctx: Ctx, response: Response,
                         user: Annotated[Principal, allow(*FIELD)]) -> ClaimCodeOut:
    """A fresh claim code for a gateway; its older unused codes stop working. Claiming it gives the
    gateway a new broker password (replacing the old one)."""
    gw = await gateway_or_404(ctx, gateway_id)
    try:
        issued = await _provisioning(ctx).issue_code(gw.site, gw.name, user.username)
    except RequestRefused as exc:
        raise _refused(exc) from None
    response.headers.update(_NO_STORE)
    return _code_out(issued)


@router.post("/provision", response_model=ProvisionOut,
             dependencies=[public("the one-time claim code is the credential")],
             responses={**_error(403, "Unknown claim code", "unknown claim code: ..."),
                        **_error(410, "Claim code used, replaced or expired", "this claim code has expired; ..."),
                        **_error(429, "Too many attempts from this address", "too many attempts; retry in 42 s")})
async def provision(body: ProvisionIn, ctx: Ctx, request: Request, response: Response) -> ProvisionOut:
    """Trade a claim code for the gateway's identity, a new broker login and its device configuration.

    The code works once: of two requests with it, one gets the answer and the other 410."""
    prov = _provisioning(ctx)
    limiter: RateLimiter | None = getattr(request.app.state, "provision_limiter", None)
    if limiter is None:
        limiter = request.app.state.provision_limiter = RateLimiter(prov.config.claim_attempts_per_minute, 60.0)
    client = request.client.host if request.client else "unknown"
    now = time.monotonic()
    wait = limiter.retry_after(client, now)
    if wait > 0:
        raise HTTPException(429, f"too many attempts; retry in {int(wait) + 1} s",
                            headers={"Retry-After": str(int(wait) + 1)})
    limiter.hit(client, now)
    try:
        got = await prov.claim(body.code, client)
    except RequestRefused as exc:
        raise _refused(exc) from None
    response.headers.update(_NO_STORE)
    config = None
    if got.config is not None and got.config_version is not None:
        config = DeviceConfigOut(version=got.config_version, devices=got.config.get("devices", []),
                                 serial_ports=got.config.get("serial_ports", []))
    return ProvisionOut(
        gateway=GatewayIdentityOut(site=got.site, name=got.gateway, client_id=got.client_id),
        mqtt=BrokerLoginOut(host=got.broker.host, port=got.broker.port, tls=got.broker.tls, ca_pem=got.ca_pem,
                            username=got.username, password=got.password),
        config=config)


@router.post("/gateways/{gateway_id}/revoke", response_model=RevokeOut,
             responses=_error(404, "Unknown gateway", "unknown gateway 'site-1.gw-9'"))
async def revoke_gateway(gateway_id: str, ctx: Ctx, user: Annotated[Principal, allow(*STAFF)]) -> RevokeOut:
    """Revoke a gateway's broker login (its connection is dropped at once) and its unused claim codes.

    To let it back in, issue a new claim code and provision it again."""
    gw = await gateway_or_404(ctx, gateway_id)
    try:
        done = await _provisioning(ctx).revoke(gw.site, gw.name, user.username)
    except RequestRefused as exc:
        raise _refused(exc) from None
    return RevokeOut(gateway=gw.uid, credentials_revoked=done.credentials_revoked,
                     claim_codes_invalidated=done.claim_codes_invalidated)
