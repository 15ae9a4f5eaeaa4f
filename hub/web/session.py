"""The dashboard's session cookie: how it is set, and its renewal on any response.

The cookie holds the same short-lived access token the API hands out. While a dashboard is used
(page loads, the device page's polling, the fleet stream's reconnects) the access guard renews a
token in the second half of its life (``hub.api.access``); :class:`SessionRenewal` puts the new
token on the response as it starts, whatever kind of response the route built (pages, JSON, the
event stream). See ``docs/dashboard.md``, "Sign-in cookie and CSRF".
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub.api.access import SESSION_COOKIE, SESSION_RENEWAL


def set_session_cookie(response: Response, token: str, ttl_s: int, https: bool) -> None:
    """HttpOnly (no script reads it), SameSite=Strict, Secure over https, lives as long as the token."""
    response.set_cookie(SESSION_COOKIE, token, max_age=ttl_s, path="/", httponly=True, samesite="strict",
                        secure=https)


def clear_session_cookie(response: Response, https: bool) -> None:
    """Tell the browser to forget the session cookie."""
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=https)


class SessionRenewal:
    """ASGI middleware: a renewed session (set by the access guard) goes out as ``Set-Cookie``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                renewal = scope.get("state", {}).get(SESSION_RENEWAL)
                if renewal is not None:
                    token, ttl = renewal
                    carrier = Response()
                    set_session_cookie(carrier, token, ttl, https=scope.get("scheme") == "https")
                    headers = MutableHeaders(scope=message)
                    for value in carrier.headers.getlist("set-cookie"):
                        headers.append("set-cookie", value)
            await send(message)

        await self.app(scope, receive, send_with_cookie)
