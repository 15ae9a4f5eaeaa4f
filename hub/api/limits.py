"""A cap on request bodies: hostile clients must not make the hub hold gigabytes in memory.

Starlette reads a JSON body whole before validating it, and uvicorn sets no limit of its own, so
without this a single ``POST`` with a multi-gigabyte body (or an endless chunked one) would be
buffered in full. Every body is refused with 413 once it exceeds :data:`MAX_BODY_BYTES`: at once
when ``Content-Length`` says so, or as soon as the bytes read pass the limit (chunked uploads).
Model uploads (``POST /api/v1/models``) are exempt: that route streams the file and enforces the
model size limit itself.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 1024 * 1024
"""1 MiB: the largest JSON the API takes (a gateway configuration, a tariff) is a few kB."""

EXEMPT = frozenset({("POST", "/api/v1/models")})
"""(method, path) of routes that read and limit their body themselves."""


class BodyLimit:
    """ASGI middleware: 413 for a request body larger than ``limit`` bytes."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in EXEMPT:
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0  # h11 refuses a malformed length before we get here
                if declared > self.limit:
                    await _refuse(send, self.limit)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # Raised inside the route's body read: FastAPI passes an HTTPException through
                    # and the app's exception handler answers it.
                    raise HTTPException(413, f"request body exceeds {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps({"detail": f"request body exceeds {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
