"""Hub users, their roles and their passwords (argon2id through ``argon2-cffi``).

Four roles, fixed in code because every route names the ones it allows (``hub/api/access.py``):

* ``admin`` — everything, including users;
* ``staff`` — central staff: billing, statements, tariffs, model rollout, gateway configuration;
* ``technician`` — field work: provisioning gateways, setpoint commands, meter readings, alerts;
* ``viewer`` — read-only fleet status and alerts (the board); no billing.

Passwords are stored only as argon2id hashes (the library's RFC 9106 low-memory profile) and
re-hashed on login when the parameters change. The hub's token-signing secret lives in the
database (``hub_secret``) unless the configuration gives one, so several hubs on one database
accept each other's tokens and a restart does not log everybody out.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from tortoise import fields
from tortoise.exceptions import IntegrityError
from tortoise.models import Model

USERNAME_PATTERN = r"^[a-z0-9][a-z0-9_.@-]{0,63}$"
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 256
"""Hashing cost grows with the input; a megabyte "password" must not become a way to burn CPU."""


class Role(StrEnum):
    """What a user may do; see the module docstring."""

    ADMIN = "admin"
    STAFF = "staff"
    TECHNICIAN = "technician"
    VIEWER = "viewer"


class User(Model):
    """A person who signs in to the hub."""

    id = fields.IntField(primary_key=True)
    username = fields.CharField(max_length=64, unique=True)
    password_hash = fields.CharField(max_length=255)
    role = fields.CharField(max_length=16)
    disabled = fields.BooleanField(default=False)
    created_ms = fields.BigIntField()
    created_by = fields.CharField(max_length=64, default="")

    class Meta:
        table = "hub_user"


class HubSecret(Model):
    """Secrets the hub generates once and shares between its processes (token signing key)."""

    name = fields.CharField(max_length=64, primary_key=True)
    value = fields.CharField(max_length=255)

    class Meta:
        table = "hub_secret"


@dataclass(frozen=True)
class UserInfo:
    """A user without the password hash."""

    username: str
    role: Role
    disabled: bool
    created_ms: int
    created_by: str


def _info(u: User) -> UserInfo:
    return UserInfo(u.username, Role(u.role), u.disabled, u.created_ms, u.created_by)


_hasher = PasswordHasher()
# Verifying against this when the user does not exist costs the same as a real check, so the
# response time does not tell an attacker which usernames exist.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    """argon2id hash of ``password`` (a CPU-heavy call: run it in a thread from async code)."""
    return _hasher.hash(password)


def check_password(password_hash: str | None, password: str) -> bool:
    """True when ``password`` matches; always does the full work (see ``_DUMMY_HASH``)."""
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """True when the stored hash used older parameters than the current ones."""
    return _hasher.check_needs_rehash(password_hash)


class UserError(ValueError):
    """A user cannot be created or changed (the message says why)."""


def check_new_password(password: str) -> None:
    """Raise :class:`UserError` when ``password`` is too short or too long."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UserError(f"password must have at most {MAX_PASSWORD_LENGTH} characters")


async def create_user(username: str, password_hash: str, role: Role, now_ms: int, created_by: str) -> UserInfo:
    """Store a new user; :class:`UserError` if the name is taken."""
    try:
        user = await User.create(username=username, password_hash=password_hash, role=role.value,
                                 created_ms=now_ms, created_by=created_by)
    except IntegrityError:
        raise UserError(f"user {username!r} exists") from None
    return _info(user)


async def get_user(username: str) -> User | None:
    """The user row (with its hash), or ``None``."""
    return await User.get_or_none(username=username)


async def list_users() -> list[UserInfo]:
    """All users, by name."""
    return [_info(u) for u in await User.all().order_by("username")]


async def update_user(username: str, *, role: Role | None = None, password_hash: str | None = None,
                      disabled: bool | None = None) -> UserInfo | None:
    """Change a user; ``None`` when there is no such user."""
    user = await User.get_or_none(username=username)
    if user is None:
        return None
    if role is not None:
        user.role = role.value
    if password_hash is not None:
        user.password_hash = password_hash
    if disabled is not None:
        user.disabled = disabled
    await user.save()
    return _info(user)


async def count_active_admins() -> int:
    """Enabled admins (the last one may not be demoted or disabled: nobody could manage users)."""
    return await User.filter(role=Role.ADMIN.value, disabled=False).count()


async def any_user() -> bool:
    """True once at least one user exists."""
    return await User.all().exists()


async def shared_secret(name: str) -> str:
    """The secret ``name``, generated and stored the first time (race-safe between hubs)."""
    found = await HubSecret.get_or_none(name=name)
    if found is not None:
        return found.value
    with contextlib.suppress(IntegrityError):  # another hub stored it first: use theirs
        await HubSecret.create(name=name, value=secrets.token_urlsafe(48))
    stored = await HubSecret.get(name=name)
    return stored.value


ADMIN_USERNAME = "admin"


async def ensure_admin(password: str | None, now_ms: int) -> str | None:
    """Create the first user, ``admin``, when the hub has none.

    ``password`` (from ``TWIN_ADMIN_PASSWORD``) is used when given, else a random one is made.
    Returns the generated password (for the caller to show once) or ``None`` when nothing was
    generated. A hub that has users already is left alone: the variable is not a back door that
    resets a changed password at every restart.
    """
    if await any_user():
        return None
    if password is not None:
        check_new_password(password)
    chosen = password if password is not None else secrets.token_urlsafe(15)
    pw_hash = await asyncio.to_thread(hash_password, chosen)
    try:
        await create_user(ADMIN_USERNAME, pw_hash, Role.ADMIN, now_ms, "bootstrap")
    except UserError:
        return None  # another hub on the same database created it first
    return None if password is not None else chosen
