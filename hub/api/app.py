"""FastAPI application factory."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from hub import __version__
from hub.alerts.rules import AlertsConfig, SmtpConfig
from hub.api.access import AuthState, check_routes
from hub.api.limits import BodyLimit
from hub.billing.config import BillingConfig, PaymentsConfig
from hub.commands import CommandService
from hub.config import StatusConfig
from hub.db import Database
from hub.gateway_config import GatewayConfigs
from hub.ingest import Ingest, now_ms
from hub.live import FleetEvents
from hub.metrics import HubMetrics
from hub.provisioning import Provisioning
from hub.rollout import Rollout
from hub.signals import SignalBus


@dataclass
class ApiContext:
    """What the route handlers need; stored as ``app.state.hub``."""

    db: Database
    status: StatusConfig = field(default_factory=StatusConfig)
    ingest: Ingest | None = None
    """``None`` runs the API without ingest (tests, a read-only replica): broker "disabled"."""
    metrics: HubMetrics = field(default_factory=HubMetrics)
    clock: Callable[[], int] = now_ms
    """Hub clock in epoch ms, used for online/stale/offline."""
    rollout: Rollout | None = None
    """Publishes model assignments; ``None``: assignments are stored but not published (tests)."""
    started: float = field(default_factory=time.monotonic)
    billing: BillingConfig = field(default_factory=BillingConfig)
    """Plausibility limits of meter registers (``[billing]``)."""
    signals: SignalBus = field(default_factory=SignalBus)
    """The hub's one signal bus (billing emits human-error signals, the alert engine listens)."""
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    """The mail server statements are e-mailed through (``[alerts.smtp]``)."""
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    """The alert rules in force (``[alerts]``); the what-if simulator evaluates them."""
    payments: PaymentsConfig = field(default_factory=PaymentsConfig)
    """The payment provider of statements (``[payments]``; off by default)."""
    auth: AuthState = field(default_factory=AuthState)
    """Token secret and lifetime, sign-in rate limits (``[auth]``)."""
    configs: GatewayConfigs | None = None
    """Publishes gateways' remote configurations; ``None``: stored but not published (tests)."""
    commands: CommandService | None = None
    """Issues and audits setpoint commands (:mod:`hub.commands`); ``None``: the command routes answer 503."""
    provisioning: Provisioning | None = None
    """Claim codes, gateway broker logins and the broker's files (:mod:`hub.provisioning`); ``None``:
    the provisioning routes answer 503."""
    fleet_events: FleetEvents | None = None
    """Live fleet summaries for the dashboard's stream (:mod:`hub.live`); ``None``: the stream sends
    one summary and ends."""


class _ActivateDatabase:
    """Make the hub's Tortoise context current for each request.

    Tortoise resolves connections through a context variable; requests may run in tasks that did
    not inherit it (an ASGI test client, another hub in the same process).
    """

    def __init__(self, app: ASGIApp, db: Database) -> None:
        self.app = app
        self.db = db

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.db.is_open:
            await self.app(scope, receive, send)
            return
        with self.db.activate():
            await self.app(scope, receive, send)


def create_app(ctx: ApiContext) -> FastAPI:
    """Build the API around an open database (and optionally a running ingest)."""
    from hub.api.alert_routes import router as alerts_router
    from hub.api.auth_routes import router as auth_router
    from hub.api.billing_routes import router as billing_router
    from hub.api.command_routes import router as commands_router
    from hub.api.config_routes import router as config_router
    from hub.api.model_routes import router as models_router
    from hub.api.provisioning_routes import router as provisioning_router
    from hub.api.report_routes import router as report_router
    from hub.api.routes import metrics_router, router
    from hub.api.statement_routes import router as statements_router
    from hub.api.twin_routes import router as twin_router
    from hub.api.whatif_routes import router as whatif_router

    app = FastAPI(
        title="Digital twin hub",
        version=__version__,
        description="Devices, gateways and readings ingested from the gateways over MQTT; anomaly-model "
                    "registry and rollout.",
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    app.state.hub = ctx
    # Checked on each router before inclusion: FastAPI (0.16x) includes routers lazily, so the
    # app's own route list does not hold the APIRoute objects.
    for r in (auth_router, router, models_router, alerts_router, billing_router, statements_router, config_router,
              twin_router,
              whatif_router,
              commands_router, provisioning_router, report_router, metrics_router):
        check_routes(r.routes)
        app.include_router(r)
    from hub.web.routes import install as install_dashboard
    install_dashboard(app)  # pages, /static, fleet summary and stream (hub/web/)
    app.add_middleware(_ActivateDatabase, db=ctx.db)
    app.add_middleware(BodyLimit)  # 413 above 1 MiB (hub/api/limits.py): no unbounded buffering
    return app
