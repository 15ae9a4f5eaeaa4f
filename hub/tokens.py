"""Signed tokens: short-lived access tokens for users, download capabilities for gateways.

Both are JWTs (PyJWT, HS256) signed with the hub's secret. An access token names the user; the
API still loads the user on every request, so a disabled user or a changed role takes effect at
once rather than when the token expires. A model-download capability names one gateway and one
model version; the hub puts it into the download URL of that gateway's (ACL-protected, retained)
assignment message, so the gateway needs no user account to fetch its model, and a URL seen
elsewhere opens nothing but that one file.
"""

from __future__ import annotations

from dataclasses import dataclass

import jwt

ALGORITHM = "HS256"
ACCESS = "access"
MODEL_DOWNLOAD = "model-download"


class TokenError(ValueError):
    """The token is malformed, forged, expired or of the wrong kind."""


@dataclass(frozen=True)
class AccessClaims:
    """What a valid access token says."""

    username: str
    role: str
    expires_s: int
    signed_in_s: int
    """When the user typed the password; a renewed browser session keeps it (``[auth] session_max_s``)."""


def issue_access(secret: str, username: str, role: str, now_s: int, ttl_s: int,
                 signed_in_s: int | None = None) -> str:
    """A bearer token for ``username`` valid ``ttl_s`` seconds from ``now_s``; ``signed_in_s``
    (default ``now_s``) is when the password was checked, carried over when a session is renewed."""
    claims = {"typ": ACCESS, "sub": username, "role": role, "iat": now_s, "exp": now_s + ttl_s,
              "auth": now_s if signed_in_s is None else signed_in_s}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def check_access(secret: str, token: str, now_s: int) -> AccessClaims:
    """Verify signature, expiry and kind; raises :class:`TokenError`."""
    claims = _decode(secret, token, now_s, require_exp=True)
    if claims.get("typ") != ACCESS or not isinstance(claims.get("sub"), str):
        raise TokenError("not an access token")
    sub, exp, auth = claims["sub"], claims["exp"], claims.get("auth", claims.get("iat"))
    assert isinstance(sub, str) and isinstance(exp, int)  # checked above and in _decode
    if not isinstance(auth, int):
        raise TokenError("token says not when its user signed in")
    return AccessClaims(sub, str(claims.get("role", "")), exp, auth)


def issue_model_download(secret: str, site: str, gateway: str, name: str, version: int) -> str:
    """A capability for ``gateway`` to download model ``name`` v``version`` (no expiry: the
    assignment message is retained and a gateway may come back after a long outage)."""
    claims = {"typ": MODEL_DOWNLOAD, "gw": f"{site}.{gateway}", "model": name, "ver": version}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def check_model_download(secret: str, token: str, name: str, version: int) -> str:
    """Verify a download capability for this model version; returns the gateway uid."""
    claims = _decode(secret, token, 0, require_exp=False)
    if claims.get("typ") != MODEL_DOWNLOAD or claims.get("model") != name or claims.get("ver") != version:
        raise TokenError("capability is not for this model version")
    gateway = claims.get("gw")
    if not isinstance(gateway, str):
        raise TokenError("capability names no gateway")
    return gateway


def _decode(secret: str, token: str, now_s: int, require_exp: bool) -> dict[str, object]:
    if len(token) > 4096:
        raise TokenError("token too long")
    try:
        claims: dict[str, object] = jwt.decode(
            token, secret, algorithms=[ALGORITHM],
            options={"require": ["exp"] if require_exp else [], "verify_exp": False, "verify_iat": False})
    except jwt.PyJWTError as exc:
        raise TokenError(str(exc)) from None
    # Expiry against the hub's clock (injectable in tests) instead of PyJWT's wall clock.
    exp = claims.get("exp")
    if require_exp and (not isinstance(exp, int) or exp <= now_s):
        raise TokenError("token expired")
    return claims
