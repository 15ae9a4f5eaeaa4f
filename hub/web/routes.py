"""Pages of the dashboard: login, logout, fleet (the device and alerts pages: ``device_pages``).

Pages are guarded like API routes (:func:`hub.api.access.allow`); the browser's access token
travels in the HttpOnly cookie :data:`~hub.api.access.SESSION_COOKIE`. A page asked for without a
valid cookie redirects to the login form (303) instead of answering a JSON 401; the API keeps
answering 401. See ``docs/dashboard.md`` for the cookie and CSRF design.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, FastAPI, Form, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader
from starlette.exceptions import HTTPException as StarletteHTTPException

from hub.api.access import READERS, Principal, allow, check_routes, public
from hub.api.app import ApiContext
from hub.api.auth_routes import sign_in
from hub.users import MAX_PASSWORD_LENGTH
from hub.web import api
from hub.web.session import SessionRenewal, clear_session_cookie, set_session_cookie
from hub.web.summary import fleet_summary

HERE = Path(__file__).parent
PAGE_TAG = "page"
"""Tag of page routes: their 401 becomes a redirect to the login form."""

templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True,
                        lstrip_blocks=True)
router = APIRouter(include_in_schema=False, tags=[PAGE_TAG])

# Pages load nothing from elsewhere and run only the hub's own scripts; the JSON a page embeds is
# data (type="application/json"), not script.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_LOCAL_PATH = re.compile(r"^/(?!/)[A-Za-z0-9/_.\-]*$")


def _ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.hub
    return ctx


def render(name: str, status_code: int = 200, **values: Any) -> HTMLResponse:
    """A page from ``templates/name`` with the dashboard's security headers."""
    return HTMLResponse(templates.get_template(name).render(**values), status_code=status_code,
                        headers=SECURITY_HEADERS)


def _next_page(value: str | None) -> str:
    # Only a path on this hub: never an open redirect to another site.
    return value if value and _LOCAL_PATH.match(value) else "/fleet"


def _same_origin(request: Request) -> bool:
    # Login CSRF: another site must not sign a browser in (as the attacker's user). Browsers send
    # Origin with every form POST; a client without it (curl) is not a browser being tricked.
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


@router.get("/", dependencies=[public("a redirect to the fleet page, which is guarded itself")])
async def home() -> RedirectResponse:
    """The dashboard's start: the fleet page."""
    return RedirectResponse("/fleet", status_code=303)


@router.get("/login", dependencies=[public("the login form")])
async def login_form(next: str | None = None) -> HTMLResponse:
    """The login form."""
    return render("login.html", next=_next_page(next))


@router.post("/web/login", dependencies=[public("where a browser presents username and password")])
async def login(
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=MAX_PASSWORD_LENGTH)],
    next: Annotated[str, Form(max_length=500)] = "/fleet",
) -> Response:
    """Check the credentials (same code and rate limits as ``POST /api/v1/auth/token``), set the
    session cookie and go on to ``next`` (a local path) or the fleet page."""
    if not _same_origin(request):
        return render("login.html", 403, next=_next_page(next), username=username,
                      error="This sign-in came from another site and was refused.")
    try:
        token, ttl, _ = await sign_in(_ctx(request), request, username, password)
    except HTTPException as exc:
        error = ("Too many sign-in attempts. Wait a minute and try again." if exc.status_code == 429
                 else "Wrong username or password.")
        page = render("login.html", exc.status_code, next=_next_page(next), username=username, error=error)
        if exc.headers and "Retry-After" in exc.headers:
            page.headers["Retry-After"] = exc.headers["Retry-After"]
        return page
    answer = RedirectResponse(_next_page(next), status_code=303)
    set_session_cookie(answer, token, ttl, https=request.url.scheme == "https")
    return answer


@router.post("/web/logout", dependencies=[public("clearing one's own session cookie needs no identity")])
async def logout(request: Request) -> RedirectResponse:
    """Clear the session cookie and show the login form."""
    answer = RedirectResponse("/login", status_code=303)
    clear_session_cookie(answer, https=request.url.scheme == "https")
    return answer


@router.get("/fleet")
async def fleet(request: Request, user: Annotated[Principal, allow(*READERS)]) -> HTMLResponse:
    """Sites → gateways → devices, live (the page's script follows ``/api/v1/stream/fleet``)."""
    ctx = _ctx(request)
    summary = await fleet_summary(ctx.db, ctx.status, ctx.clock())
    return render("fleet.html", user=user, summary=summary, page="fleet")


async def _page_errors(request: Request, exc: Exception) -> Response:
    """401 on a page: to the login form (303); 403: a readable page. The API keeps JSON answers."""
    assert isinstance(exc, StarletteHTTPException)
    route = request.scope.get("route")
    if PAGE_TAG in (getattr(route, "tags", None) or ()):
        if exc.status_code == 401:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            answer = RedirectResponse(f"/login?next={quote(target, safe='/')}", status_code=303)
            clear_session_cookie(answer, https=request.url.scheme == "https")  # expired or invalid: of no use
            return answer
        if exc.status_code == 403:
            return render("error.html", 403, user=getattr(request.state, "principal", None), title="Not allowed",
                          message=str(exc.detail))
    return await http_exception_handler(request, exc)


def install(app: FastAPI) -> None:
    """Add the dashboard to the hub's app: pages, ``/static``, the fleet summary and stream APIs."""
    from hub.web.billing_pages import router as billing_router  # imported here: it imports this module
    from hub.web.device_pages import router as device_router  # imported here: it imports this module
    for r in (router, api.router, billing_router, device_router):
        check_routes(r.routes)
        app.include_router(r)
    app.add_middleware(SessionRenewal)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_exception_handler(StarletteHTTPException, _page_errors)
