"""Who may call which route: bearer tokens, roles, and the rule that every route says so.

Every route declares exactly one guard, as a parameter or in ``dependencies``::

    async def ack(..., user: Annotated[Principal, allow(*FIELD)]) -> AlertOut: ...
    @router.post("/payments/stripe/webhook", dependencies=[public("signed by the provider")])

:func:`check_routes` (called by ``create_app``) refuses to build an app with a route that has no
guard or two, and writes the allowed roles into the OpenAPI document (``x-roles``), which is what
the route × role test walks. A missing or bad token gives **401** (with ``WWW-Authenticate:
Bearer``), a valid token of a role not allowed gives **403**.

Browsers (the dashboard, :mod:`hub.web`) carry the same access token in the HttpOnly cookie
:data:`SESSION_COOKIE` instead of the ``Authorization`` header; the header wins when both are
there. Because a browser attaches cookies on its own, a request authenticated by the cookie that
can change something (POST, PUT, PATCH, DELETE) must also carry ``X-Twin-CSRF: 1``: a cross-site
HTML form cannot set a header at all, and a cross-site ``fetch`` with a custom header needs a CORS
pre-flight the hub never grants. The cookie's ``SameSite=Strict`` already keeps other sites'
requests from carrying it in current browsers; the header also covers old browsers and sibling
sub-domains (which count as "same site"). See ``docs/dashboard.md``.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.routing import APIRoute
from fastapi.security import OAuth2PasswordBearer
from starlette.routing import BaseRoute

from hub import tokens, users
from hub.users import Role

__all__ = [
    "ADMIN",
    "CSRF_HEADER",
    "FIELD",
    "READERS",
    "SESSION_COOKIE",
    "SESSION_RENEWAL",
    "STAFF",
    "ActingUser",
    "AuthState",
    "Principal",
    "RateLimiter",
    "Role",
    "allow",
    "allow_or_model_capability",
    "check_routes",
    "public",
]

READERS: tuple[Role, ...] = (Role.ADMIN, Role.STAFF, Role.TECHNICIAN, Role.VIEWER)
"""Everybody signed in: fleet status, devices, readings, alerts."""
FIELD: tuple[Role, ...] = (Role.ADMIN, Role.STAFF, Role.TECHNICIAN)
"""Field work: provisioning, gateway configuration, setpoint commands, meter readings, acknowledging alerts."""
STAFF: tuple[Role, ...] = (Role.ADMIN, Role.STAFF)
"""Central staff: billing, statements, tariffs, model rollout, revoking gateways."""
ADMIN: tuple[Role, ...] = (Role.ADMIN,)
"""User management."""

TOKEN_URL = "/api/v1/auth/token"
SESSION_COOKIE = "twin_session"
"""Cookie holding a browser's access token (set by ``POST /web/login``)."""
CSRF_HEADER = "X-Twin-CSRF"
"""Header a cookie-authenticated unsafe request must carry (value ``1``)."""
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Principal:
    """The signed-in user of a request (``gateway`` set instead when a gateway used a capability)."""

    username: str
    role: Role | None
    gateway: str | None = None


class RateLimiter:
    """At most ``limit`` hits per key within ``window_s`` (sliding window, in memory).

    Bounded: at most ``max_keys`` keys are tracked; the least recently used is forgotten first, so
    a flood of made-up usernames costs memory it cannot grow. In memory means per hub process: two
    hubs behind a load balancer allow twice the rate, which still defeats password guessing.
    """

    def __init__(self, limit: int, window_s: float, max_keys: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again (0 when it may now)."""
        hits = self._hits.get(key)
        if hits is None:
            return 0.0
        while hits and hits[0] <= now - self.window_s:
            hits.popleft()
        if len(hits) < self.limit:
            return 0.0
        return max(0.0, hits[0] + self.window_s - now)

    def hit(self, key: str, now: float) -> None:
        """Count one attempt of ``key``."""
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = deque()
            if len(self._hits) > self.max_keys:
                self._hits.popitem(last=False)
        else:
            self._hits.move_to_end(key)
        hits.append(now)


@dataclass
class AuthState:
    """Token secret, lifetime and login limits of one API (``ApiContext.auth``)."""

    secret: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    """HS256 key; the hub sets the one from its database or configuration at start."""
    token_ttl_s: int = 900
    session_max_s: int = 43_200
    """Longest a browser session is renewed for, from the password being typed."""
    login_failures: RateLimiter = field(default_factory=lambda: RateLimiter(10, 60.0))
    """Failed logins per username."""
    login_attempts: RateLimiter = field(default_factory=lambda: RateLimiter(30, 60.0))
    """All logins per client address."""
    monotonic: Callable[[], float] = time.monotonic
    """Clock of the rate limits."""
    now_s: Callable[[], int] = field(default=lambda: int(time.time()))
    """Wall clock of token expiry: tokens are about real time, not the hub's (injectable) data clock."""


def _unauthorised(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


_bearer = OAuth2PasswordBearer(tokenUrl=TOKEN_URL, auto_error=False)


class _Allow:
    """The dependency :func:`allow` returns: checks the bearer token and the user's role."""

    def __init__(self, roles: tuple[Role, ...]) -> None:
        self.roles = frozenset(roles)

    async def __call__(self, request: Request, token: Annotated[str | None, Depends(_bearer)]) -> Principal:
        return await self.check(request, token)

    async def check(self, request: Request, token: str | None) -> Principal:
        ctx = request.app.state.hub
        from_cookie = not token
        if not token:
            token = request.cookies.get(SESSION_COOKIE)
            if token and request.method not in SAFE_METHODS and request.headers.get(CSRF_HEADER) != "1":
                raise HTTPException(403, f"a request signed in by cookie that changes something needs the "
                                         f"header {CSRF_HEADER}: 1")
        if not token:
            raise _unauthorised("sign in first: POST /api/v1/auth/token")
        try:
            claims = tokens.check_access(ctx.auth.secret, token, ctx.auth.now_s())
        except tokens.TokenError:
            raise _unauthorised("token invalid or expired; sign in again") from None
        user = await users.get_user(claims.username)
        if user is None or user.disabled:
            raise _unauthorised("user unknown or disabled")
        role = Role(user.role)
        if role not in self.roles:
            raise HTTPException(403, f"role {role.value!r} may not do this "
                                     f"(allowed: {', '.join(sorted(r.value for r in self.roles))})")
        principal = Principal(user.username, role)
        request.state.principal = principal
        if from_cookie:
            _renew_session(request, ctx.auth, claims, user.username, role)
        return principal


SESSION_RENEWAL = "session_renewal"
"""Key in the request's state of a renewed session: (token, lifetime in s), which the dashboard's
middleware (``hub.web.session``) sets as the new cookie on the response, whatever the route returns."""


def _renew_session(request: Request, auth: AuthState, claims: tokens.AccessClaims, username: str,
                   role: Role) -> None:
    """A cookie session in the second half of its token's life gets a fresh token, up to
    ``session_max_s`` after sign-in: a dashboard in use stays signed in, an unused one expires."""
    now = auth.now_s()
    if claims.expires_s - now > auth.token_ttl_s // 2:
        return
    ttl = min(auth.token_ttl_s, claims.signed_in_s + auth.session_max_s - now)
    if now + ttl <= claims.expires_s:
        return  # at the session's end: the token runs out, then the password is asked again
    fresh = tokens.issue_access(auth.secret, username, role.value, now, ttl, signed_in_s=claims.signed_in_s)
    setattr(request.state, SESSION_RENEWAL, (fresh, ttl))


def _acting_user(request: Request) -> str:
    principal: Principal | None = getattr(request.state, "principal", None)
    return principal.username if principal is not None else ""


ActingUser = Annotated[str, Depends(_acting_user)]
"""The signed-in user's name for audit fields (the route's guard has run first; empty for a gateway)."""


class _AllowOrModelCapability(_Allow):
    """Like :class:`_Allow`, or a gateway's download capability in ``?access=`` (``hub/tokens.py``)."""

    async def __call__(self, request: Request, token: Annotated[str | None, Depends(_bearer)]) -> Principal:
        capability = request.query_params.get("access")
        if capability is None or token:
            return await self.check(request, token)
        ctx = request.app.state.hub
        try:
            version = int(request.path_params.get("version", "0"))
            gateway = tokens.check_model_download(ctx.auth.secret, capability, request.path_params.get("name", ""),
                                                  version)
        except (tokens.TokenError, ValueError):
            raise _unauthorised("download capability invalid for this file") from None
        principal = Principal(username="", role=None, gateway=gateway)
        request.state.principal = principal
        return principal


class _Public:
    """The dependency :func:`public` returns: no check, but a stated reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def __call__(self) -> None:
        return None


def allow(*roles: Role) -> Any:
    """Guard: a signed-in user of one of ``roles``; the parameter receives the :class:`Principal`."""
    if not roles:
        raise ValueError("allow() needs at least one role; use public() for open routes")
    return Depends(_Allow(roles))


def allow_or_model_capability(*roles: Role) -> Any:
    """Guard of the model-file route: a user of ``roles`` or the gateway the file was assigned to."""
    return Depends(_AllowOrModelCapability(roles))


def public(reason: str) -> Any:
    """Guard of a route anyone may call; ``reason`` says why (it is kept in the OpenAPI document)."""
    return Depends(_Public(reason))


def _guards(route: APIRoute) -> list[_Allow | _Public]:
    found: list[_Allow | _Public] = []
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        if isinstance(dep.call, _Allow | _Public):
            found.append(dep.call)
        stack.extend(dep.dependencies)
    return found


def check_routes(routes: list[BaseRoute]) -> None:
    """Refuse routes without exactly one guard; record each route's roles in its OpenAPI entry."""
    problems = []
    for route in routes:
        if not isinstance(route, APIRoute):
            continue  # FastAPI's own /docs and /openapi.json
        guards = _guards(route)
        if len(guards) != 1:
            problems.append(f"{sorted(route.methods or ())} {route.path}: {len(guards)} guards (need exactly one)")
            continue
        guard = guards[0]
        extra = dict(route.openapi_extra or {})
        if isinstance(guard, _Public):
            extra["x-roles"] = []
            extra["x-public"] = guard.reason
        else:
            extra["x-roles"] = sorted(r.value for r in guard.roles)
            if isinstance(guard, _AllowOrModelCapability):
                extra["x-gateway-capability"] = True
            route.responses.setdefault(401, {"description": "Not signed in, or the token is invalid or expired"})
            route.responses.setdefault(403, {"description": "Signed in with a role this route does not allow"})
        route.openapi_extra = extra
    if problems:
        raise RuntimeError("routes without a declared access rule:\n" + "\n".join(problems))
