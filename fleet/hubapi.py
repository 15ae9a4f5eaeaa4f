"""Small client of the hub's REST API for the launchers (demo, fault runs): stdlib only."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class HttpRefused(ValueError):
    """The hub answered with an HTTP error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def http_json(method: str, url: str, body: bytes, content_type: str, token: str | None = None) -> dict[str, Any]:
    """Send ``body``, return the JSON answer; :class:`HttpRefused` for an HTTP error."""
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
            return doc
    except urllib.error.HTTPError as exc:
        raise HttpRefused(exc.code, f"{method} {url}: HTTP {exc.code} {exc.read()[:300]!r}") from None


def sign_in(api: str, username: str, password: str) -> str:
    """A bearer token from the hub (OAuth2 password flow)."""
    body = urllib.parse.urlencode({"username": username, "password": password}).encode()
    answer = http_json("POST", f"{api}/api/v1/auth/token", body, "application/x-www-form-urlencoded")
    return str(answer["access_token"])
