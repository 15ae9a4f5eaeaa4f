"""Route handlers of the anomaly-model registry and rollout (``/api/v1/models``,
``/api/v1/model-assignments``, ``/api/v1/gateways/{id}/models``); see :mod:`hub.rollout`."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from hub import queries, rollout
from hub.api.access import READERS, STAFF, ActingUser, allow, allow_or_model_capability
from hub.api.routes import MAX_LIMIT, Ctx, NameQuery, gateway_or_404
from hub.api.schemas import (
    AssignedModelOut,
    AssignmentChangeOut,
    AssignmentIn,
    AssignmentOut,
    GatewayModelOut,
    GatewayModelsOut,
    ModelVersionOut,
    RunningModelOut,
    iso_ms,
)
from hub.modelfile import ModelRejected, check_size, inspect_model
from hub.retained import GatewayKey
from hub.rollout import AssignmentRow, RegistryError, VersionRow
from protocol.anomaly import MAX_MODEL_BYTES
from protocol.ids import NAME_PATTERN

router = APIRouter(prefix="/api/v1")

NamePath = Annotated[str, Path(pattern=NAME_PATTERN, max_length=64)]
# Versions are 32-bit integer columns: a larger number in a path is a 422, not a database overflow.
MAX_VERSION = 2**31 - 1
VersionPath = Annotated[int, Path(ge=1, le=MAX_VERSION)]
User = ActingUser


def _error(status: int, description: str, example: str) -> dict[int | str, dict[str, Any]]:
    return {status: {"description": description, "content": {"application/json": {"example": {"detail": example}}}}}


_MODEL_NOT_FOUND = _error(404, "Unknown model version", "unknown model 'sim-boiler-anomaly' v9")
_UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    200: {"model": ModelVersionOut, "description": "The identical file was already stored (idempotent)"},
    **_error(400, "Empty body, or not a loadable ONNX model", "not a loadable ONNX model: ..."),
    **_error(409, "This name and version exist with other content",
             "model sim-boiler-anomaly v3 already exists with different content (...)"),
    **_error(413, "File too large", f"model file of 3000000 bytes exceeds the limit of {MAX_MODEL_BYTES} bytes"),
    **_error(415, "Sent as a form", "send the .onnx file as the raw request body"),
    **_error(422, "No or invalid model card, inputs/outputs not matching it, or not matching the query",
             "input 'window' has 2 features in its last dimension, the card lists 3 inputs [...]"),
}


def _version_out(v: VersionRow) -> ModelVersionOut:
    return ModelVersionOut(name=v.name, version=v.version, profile=v.profile, sha256=v.sha256, size=v.size,
                           card=v.card, uploaded_at=iso_ms(v.uploaded_ms), uploaded_by=v.uploaded_by,
                           file=rollout.file_path(v.name, v.version))


def _assignment_out(a: AssignmentRow) -> AssignmentOut:
    return AssignmentOut(profile=a.profile, gateway=a.gateway, name=a.name, version=a.version, sha256=a.sha256,
                         size=a.size, assigned_at=iso_ms(a.assigned_ms), assigned_by=a.assigned_by)


async def _read_model_body(request: Request) -> bytes:
    """The request body, refused with 413 as soon as it exceeds the model size limit."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/"):
        raise HTTPException(415, "send the .onnx file as the raw request body (Content-Type: "
                                 "application/octet-stream), not as a form upload")
    declared = request.headers.get("content-length", "")
    if declared.isdigit():
        try:
            check_size(int(declared))
        except ModelRejected as exc:
            if exc.status == 413:
                raise HTTPException(exc.status, exc.message) from None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_MODEL_BYTES:
            raise HTTPException(413, f"model file exceeds the limit of {MAX_MODEL_BYTES} bytes")
    return bytes(body)


@router.post(
    "/models", dependencies=[allow(*STAFF)], response_model=ModelVersionOut, status_code=201, responses=_UPLOAD_ERRORS,
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
async def upload_model(
    ctx: Ctx,
    request: Request,
    user: User,
    name: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=64,
                                      description="Refuse the file unless its card has this name")] = None,
    version: Annotated[int | None, Query(ge=1, le=MAX_VERSION,
                                         description="Refuse the file unless its card has this version")] = None,
    profile: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=64,
                                         description="Refuse the file unless its card has this profile")] = None,
) -> JSONResponse:
    """Upload a model: the request body is the ``.onnx`` file itself (at most 2 MiB). Name, version
    and profile come from the model card embedded in it (metadata ``twin.card``).

    The file is loaded with onnxruntime (in a worker thread) and checked against its card: one
    float32 input ``window`` of rank 3 whose last dimension is the number of card inputs, a float32
    output ``score`` giving one score per window. **201** with the stored version when new, **200**
    when the identical file is already stored under that name and version, **409** when different
    content is."""
    data = await _read_model_body(request)
    try:
        checked = await asyncio.to_thread(inspect_model, data)
    except ModelRejected as exc:
        raise HTTPException(exc.status, exc.message) from None
    card = checked.card
    for what, wanted, actual in (("name", name, card.name), ("version", version, card.version),
                                 ("profile", profile, card.profile)):
        if wanted is not None and wanted != actual:
            raise HTTPException(422, f"the model card says {what} {actual!r}, the request says {wanted!r}")
    try:
        stored, created = await rollout.save_version(ctx.db, checked, data, user or "", ctx.clock())
    except RegistryError as exc:
        raise HTTPException(exc.status, exc.message) from None
    return JSONResponse(_version_out(stored).model_dump(), status_code=201 if created else 200)


@router.get("/models", dependencies=[allow(*READERS)], response_model=list[ModelVersionOut])
async def list_models(
    ctx: Ctx,
    name: NameQuery = None,
    profile: NameQuery = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> list[ModelVersionOut]:
    """Stored model versions, newest upload first; optionally of one name or one profile."""
    return [_version_out(v) for v in await rollout.list_versions(ctx.db, name, profile, limit)]


async def _version_or_404(ctx: Ctx, name: str, version: int) -> VersionRow:
    found = await rollout.get_version(ctx.db, name, version)
    if found is None:
        raise HTTPException(404, f"unknown model {name!r} v{version}")
    return found


@router.get("/models/{name}/{version}",
    dependencies=[allow(*READERS)], response_model=ModelVersionOut, responses=_MODEL_NOT_FOUND)
async def get_model(ctx: Ctx, name: NamePath, version: VersionPath) -> ModelVersionOut:
    """One stored model version with its card."""
    return _version_out(await _version_or_404(ctx, name, version))


@router.get("/models/{name}/{version}/file",
    dependencies=[allow_or_model_capability(*STAFF)], response_class=Response, responses={
    200: {"description": "The ONNX file", "content": {"application/octet-stream": {}}},
    304: {"description": "If-None-Match named this file's ETag"}, **_MODEL_NOT_FOUND})
async def get_model_file(ctx: Ctx, request: Request, name: NamePath, version: VersionPath) -> Response:
    """The ONNX file of a model version (what gateways download). ``ETag`` is its quoted sha256;
    a request with that ETag in ``If-None-Match`` gets **304** without the body."""
    found = await rollout.version_file(ctx.db, name, version)
    if found is None:
        raise HTTPException(404, f"unknown model {name!r} v{version}")
    data, sha = found
    etag = f'"{sha}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    wanted = {t.strip() for t in request.headers.get("if-none-match", "").split(",")}
    if etag in wanted or f"W/{etag}" in wanted or "*" in wanted:
        return Response(status_code=304, headers=headers)
    headers["Content-Disposition"] = f'attachment; filename="{name}-v{version}.onnx"'
    return Response(content=data, media_type="application/octet-stream", headers=headers)


# -- assignments ------------------------------------------------------------------------------


async def _gateway_ref(ctx: Ctx, gateway: str | None) -> queries.GatewayRef | None:
    return None if gateway is None else await gateway_or_404(ctx, gateway)


def _republish(ctx: Ctx, gateways: list[GatewayKey]) -> list[str]:
    if ctx.rollout is not None:
        ctx.rollout.mark(*gateways)
    return [f"{site}.{gw}" for site, gw in gateways]


@router.put("/model-assignments", dependencies=[allow(*STAFF)], response_model=AssignmentChangeOut, responses={
    **_error(404, "Unknown model version or gateway", "unknown gateway 'site-1.nope'"),
    **_error(422, "The model is made for another profile",
             "model sim-meter-anomaly v1 is made for profile 'sim-meter', not 'sim-boiler'")})
async def put_assignment(ctx: Ctx, body: AssignmentIn, user: User) -> AssignmentChangeOut:
    """Assign a model version to the devices of ``profile``: fleet-wide (no ``gateway``) or on one
    gateway (``site.gateway``; a gateway's own assignment beats the fleet-wide one). Replaces what
    was assigned there. Every affected gateway is sent its new assignment list (retained MQTT
    message on ``twin/v1/{site}/{gateway}/models``); ``gateways`` lists them."""
    gateway = await _gateway_ref(ctx, body.gateway)
    try:
        made = await rollout.assign(ctx.db, body.profile, body.name, body.version, gateway, user or "",
                                    ctx.clock())
    except RegistryError as exc:
        raise HTTPException(exc.status, exc.message) from None
    affected = await rollout.affected_gateways(ctx.db, gateway)
    return AssignmentChangeOut(assignment=_assignment_out(made), gateways=_republish(ctx, affected))


@router.delete("/model-assignments", dependencies=[allow(*STAFF)], response_model=AssignmentChangeOut, responses={
    **_error(404, "No such assignment, or unknown gateway", "no fleet-wide assignment for profile 'sim-boiler'")})
async def delete_assignment(
    ctx: Ctx,
    profile: Annotated[str, Query(pattern=NAME_PATTERN, max_length=64)],
    gateway: Annotated[str | None, Query(description="`site.gateway`; omitted: the fleet-wide assignment")] = None,
) -> AssignmentChangeOut:
    """Remove the assignment of ``profile`` (the fleet-wide one, or ``gateway``'s own, after which
    the gateway falls back to the fleet-wide one). Affected gateways are sent their reduced list."""
    ref = await _gateway_ref(ctx, gateway)
    removed = await rollout.unassign(ctx.db, profile, ref)
    if removed is None:
        raise HTTPException(404, f"no fleet-wide assignment for profile {profile!r}" if ref is None
                            else f"no assignment for profile {profile!r} on gateway {ref.uid!r}")
    affected = await rollout.affected_gateways(ctx.db, ref)
    return AssignmentChangeOut(assignment=_assignment_out(removed), gateways=_republish(ctx, affected))


@router.get("/model-assignments", dependencies=[allow(*READERS)], response_model=list[AssignmentOut])
async def list_assignments(
    ctx: Ctx,
    profile: NameQuery = None,
    gateway: Annotated[str | None, Query(description="Only this gateway's own assignments (`site.gateway`)")] = None,
) -> list[AssignmentOut]:
    """Every assignment, by profile, fleet-wide first. For what one gateway ends up with, see
    ``GET /api/v1/gateways/{id}/models``."""
    ref = await _gateway_ref(ctx, gateway)
    return [_assignment_out(a) for a in await rollout.list_assignments(ctx.db, profile, ref)]


RolloutState = Literal["in_sync", "pending", "failed", "unassigned"]


def _rollout_state(assigned: AssignmentRow | None, running: RunningModelOut | None) -> RolloutState:
    if assigned is None:
        return "unassigned"
    if running is not None and running.state == "failed":
        return "failed"
    if running is not None and running.sha256 == assigned.sha256:
        return "in_sync"
    return "pending"


@router.get("/gateways/{gateway_id}/models",
    dependencies=[allow(*READERS)], response_model=GatewayModelsOut, responses=_error(
    404, "Unknown gateway", "unknown gateway 'plant1.nope'"))
async def gateway_models(ctx: Ctx, gateway_id: str) -> GatewayModelsOut:
    """Per device profile: the model assigned to the gateway (its own or fleet-wide), what the
    gateway reports running in its last "online" status, and how the two compare (``rollout``)."""
    gw = await gateway_or_404(ctx, gateway_id)
    report = await queries.gateway_models(ctx.db, gw)
    assigned = {a.profile: a for a in await rollout.effective_assignments(ctx.db, gw.site, gw.name)}
    running: dict[str, RunningModelOut] = {}
    for profile, m in report.reported.items():
        running[profile] = RunningModelOut(name=m.get("name", ""), version=m.get("version", 0),
                                           sha256=m.get("sha256", ""), state=m.get("state", "active"),
                                           error=m.get("error", ""))
    models = []
    for profile in sorted(assigned.keys() | running.keys()):
        a, r = assigned.get(profile), running.get(profile)
        models.append(GatewayModelOut(
            profile=profile, running=r,
            assigned=None if a is None else AssignedModelOut(
                name=a.name, version=a.version, sha256=a.sha256, scope="fleet" if a.gateway is None else "gateway"),
            rollout=_rollout_state(a, r)))
    state: Literal["online", "offline", "unknown"] = (
        "online" if report.state == "online" else "offline" if report.state == "offline" else "unknown")
    return GatewayModelsOut(id=gw.uid, state=state, state_since=iso_ms(report.state_ts_ms), models=models)
