"""``/api/v1/fleet/summary`` and its live twin ``/api/v1/stream/fleet`` (server-sent events)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse

from hub.api.access import READERS, allow
from hub.api.app import ApiContext
from hub.live import FleetEvents
from hub.web.summary import fleet_summary

router = APIRouter(prefix="/api/v1", tags=["dashboard"])

HEARTBEAT_S = 15.0
"""A comment line this often keeps proxies from closing an idle stream and finds dead clients."""


def _ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.hub
    return ctx


Ctx = Annotated[ApiContext, Depends(_ctx)]


async def summary_of(ctx: ApiContext) -> dict[str, Any]:
    """The fleet summary of the hub serving ``ctx`` (now, by the hub clock)."""
    return await fleet_summary(ctx.db, ctx.status, ctx.clock())


@router.get("/fleet/summary", dependencies=[allow(*READERS)])
async def get_fleet_summary(ctx: Ctx) -> dict[str, Any]:
    """Sites → gateways → devices with liveness (online / stale / offline), counts per status,
    open (not cleared) alerts by severity and gateway backlogs: what the fleet page shows."""
    return await summary_of(ctx)


def _event(data: str) -> str:
    return f"event: fleet\ndata: {data}\n\n"


@router.get("/stream/fleet", dependencies=[allow(*READERS)], response_class=StreamingResponse,
            openapi_extra={"x-stream": True},
            responses={200: {"description": "`text/event-stream` of `fleet` events, each a fleet summary "
                                            "(as `/api/v1/fleet/summary`)",
                             "content": {"text/event-stream": {}}},
                       503: {"description": "The hub is stopping or serves too many streams"}})
async def stream_fleet(ctx: Ctx, request: Request) -> StreamingResponse:
    """Server-sent events: the fleet summary at once, then whenever ingest committed a batch or a
    status changed, at most one per second, and a comment line every 15 s while nothing happens.

    The stream ends when the hub stops, when the client does not keep up, and after 0.4 of the
    access token's lifetime (``[auth] token_ttl_s``): the browser reconnects, which checks the
    sign-in again and renews the session cookie. A hub without ingest (a read-only API) sends the one summary and ends.
    """
    events = ctx.fleet_events
    sub = None
    if events is not None:
        sub = events.subscribe()  # before the first summary: no change can fall between the two
        if sub is None:
            raise HTTPException(503, "the hub is stopping or serves too many live streams; try again")
    try:
        first = FleetEvents.encode(await summary_of(ctx))
    except BaseException:
        if sub is not None and events is not None:
            events.unsubscribe(sub)
        raise
    loop = asyncio.get_running_loop()
    # 0.4 of a token's life: the reconnect comes in the token's second half, while it is still
    # valid, so the access guard renews the session cookie on it (hub/web/session.py).
    ends = loop.time() + 0.4 * ctx.auth.token_ttl_s

    async def stream() -> AsyncIterator[str]:
        try:
            # retry: how long the browser waits before reconnecting after the stream ended.
            yield "retry: 2000\n" + _event(first)
            if sub is None:
                return
            while (left := ends - loop.time()) > 0:
                try:
                    data = await asyncio.wait_for(sub.queue.get(), min(HEARTBEAT_S, left))
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if data is None:
                    return
                yield _event(data)
        finally:
            if sub is not None and events is not None:
                events.unsubscribe(sub)

    # no-transform / X-Accel-Buffering: proxies must pass events on at once, not buffer them.
    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store, no-transform", "X-Accel-Buffering": "no"})
