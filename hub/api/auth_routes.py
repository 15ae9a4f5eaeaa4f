"""Signing in (OAuth2 password flow) and managing users."""

from __future__ import annotations

import asyncio
import math
from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from hub import tokens, users
from hub.api.access import ADMIN, READERS, Principal, allow, public
from hub.api.app import ApiContext
from hub.api.schemas import iso_ms
from hub.users import MAX_PASSWORD_LENGTH, USERNAME_PATTERN, Role, UserError
from protocol.logs import get_logger

log = get_logger("hub.auth")
router = APIRouter(prefix="/api/v1", tags=["auth"])


def _ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.hub
    return ctx


Ctx = Annotated[ApiContext, Depends(_ctx)]
Username = Annotated[str, Field(pattern=USERNAME_PATTERN, max_length=64)]
Password = Annotated[str, Field(min_length=users.MIN_PASSWORD_LENGTH, max_length=MAX_PASSWORD_LENGTH)]


class TokenOut(BaseModel):
    """An OAuth2 bearer token."""

    access_token: str
    token_type: str = "bearer"
    expires_in: int = Field(description="Seconds the token is valid")
    role: Role


class UserOut(BaseModel):
    """A user (never the password or its hash)."""

    username: str
    role: Role
    disabled: bool
    created: str | None
    created_by: str


class UserIn(BaseModel):
    """A new user."""

    model_config = ConfigDict(extra="forbid")
    username: Username
    password: Password
    role: Role


class UserChange(BaseModel):
    """Changes to a user; absent fields stay as they are."""

    model_config = ConfigDict(extra="forbid")
    role: Role | None = None
    password: Password | None = None
    disabled: bool | None = None


def _out(u: users.UserInfo) -> UserOut:
    return UserOut(username=u.username, role=u.role, disabled=u.disabled, created=iso_ms(u.created_ms),
                   created_by=u.created_by)


def _error(status: int, description: str) -> dict[int | str, dict[str, object]]:
    return {status: {"description": description}}


@router.post("/auth/token", response_model=TokenOut,
             dependencies=[public("this is where a user presents username and password")],
             responses={**_error(401, "Wrong username or password"),
                        **_error(429, "Too many attempts; see Retry-After")})
async def token(
    ctx: Ctx, request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=MAX_PASSWORD_LENGTH)],
) -> TokenOut:
    """OAuth2 password flow: a bearer token valid ``expires_in`` seconds (``[auth] token_ttl_s``).

    Rate-limited per username (failed attempts) and per client address (all attempts): **429**
    with ``Retry-After`` beyond the limit, before the password is even looked at.
    """
    issued, ttl, role = await sign_in(ctx, request, username, password)
    return TokenOut(access_token=issued, expires_in=ttl, role=role)


async def sign_in(ctx: ApiContext, request: Request, username: str, password: str) -> tuple[str, int, Role]:
    """Check a username and password under the sign-in rate limits; (access token, lifetime in s, role).

    Shared by the API's token route and the dashboard's login form (:mod:`hub.web.routes`).
    Raises ``HTTPException`` **429** (with ``Retry-After``) or **401**.
    """
    auth = ctx.auth
    now = auth.monotonic()
    client = request.client.host if request.client else "?"
    name = username.strip().lower()
    wait = max(auth.login_attempts.retry_after(f"ip:{client}", now),
               auth.login_failures.retry_after(f"user:{name}", now))
    if wait > 0:
        ctx.metrics.login_refused("rate_limited")
        log.warning("login_rate_limited", username=name, client=client)
        raise HTTPException(429, "too many sign-in attempts; try again later",
                            headers={"Retry-After": str(math.ceil(wait))})
    auth.login_attempts.hit(f"ip:{client}", now)
    user = await users.get_user(name)
    # argon2 verification takes tens of milliseconds of CPU: off the event loop.
    ok = await asyncio.to_thread(users.check_password, user.password_hash if user else None, password)
    if user is None or not ok or user.disabled:
        auth.login_failures.hit(f"user:{name}", now)
        ctx.metrics.login_refused("disabled" if ok and user is not None else "bad_credentials")
        log.warning("login_failed", username=name, client=client)
        raise HTTPException(401, "wrong username or password", headers={"WWW-Authenticate": "Bearer"})
    if users.needs_rehash(user.password_hash):
        await users.update_user(name, password_hash=await asyncio.to_thread(users.hash_password, password))
    log.info("login", username=name, role=user.role, client=client)
    ttl = auth.token_ttl_s
    issued = tokens.issue_access(auth.secret, user.username, user.role, auth.now_s(), ttl)
    return issued, ttl, Role(user.role)


@router.get("/auth/me", response_model=UserOut)
async def me(user: Annotated[Principal, allow(*READERS)]) -> UserOut:
    """The signed-in user."""
    found = await users.get_user(user.username)
    if found is None:  # deleted between the guard and here
        raise HTTPException(401, "user unknown")
    return _out(users.UserInfo(found.username, Role(found.role), found.disabled, found.created_ms,
                               found.created_by))


@router.get("/users", response_model=list[UserOut])
async def list_users(_: Annotated[Principal, allow(*ADMIN)]) -> list[UserOut]:
    """All users (admin only)."""
    return [_out(u) for u in await users.list_users()]


@router.post("/users", response_model=UserOut, status_code=201,
             responses={**_error(409, "The username is taken")})
async def create_user(ctx: Ctx, body: UserIn, admin: Annotated[Principal, allow(*ADMIN)]) -> UserOut:
    """Create a user (admin only). Passwords: 10 to 256 characters; stored as argon2id hashes."""
    pw_hash = await asyncio.to_thread(users.hash_password, body.password)
    try:
        created = await users.create_user(body.username, pw_hash, body.role, ctx.clock(), admin.username)
    except UserError as exc:
        raise HTTPException(409, str(exc)) from None
    log.info("user_created", username=body.username, role=body.role.value, by=admin.username)
    return _out(created)


@router.patch("/users/{username}", response_model=UserOut,
              responses={**_error(404, "No such user"), **_error(409, "Would leave no enabled admin")})
async def change_user(
    body: UserChange,
    admin: Annotated[Principal, allow(*ADMIN)],
    username: Annotated[str, Path(pattern=USERNAME_PATTERN, max_length=64)],
) -> UserOut:
    """Change a user's role, password or disabled flag (admin only). The change applies to the
    user's next request: tokens are checked against the user on every call."""
    current = await users.get_user(username)
    if current is None:
        raise HTTPException(404, f"no user {username!r}")
    loses_admin = current.role == Role.ADMIN.value and not current.disabled and (
        (body.role is not None and body.role != Role.ADMIN) or body.disabled is True)
    if loses_admin and await users.count_active_admins() <= 1:
        raise HTTPException(409, "that would leave no enabled admin")
    pw_hash = None if body.password is None else await asyncio.to_thread(users.hash_password, body.password)
    changed = await users.update_user(username, role=body.role, password_hash=pw_hash, disabled=body.disabled)
    if changed is None:
        raise HTTPException(404, f"no user {username!r}")
    log.info("user_changed", username=username, by=admin.username, role=body.role, disabled=body.disabled,
             password_changed=body.password is not None)
    return _out(changed)
