"""The hub process: database, MQTT ingest, model rollout and HTTP API in one asyncio event loop.

``twin-hub run`` uses :class:`Hub` through :mod:`hub.cli`; tests run it in-process::

    async with running_hub(config) as hub:
        httpx.get(f"{hub.api_url}/api/v1/devices")
        hub.stats.readings_stored
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator

import uvicorn

from hub import tokens, users
from hub.alerts.engine import AlertEngine
from hub.api import ApiContext, create_app
from hub.api.access import AuthState, RateLimiter
from hub.commands import CommandService
from hub.config import HubConfig
from hub.db import Database, redact_url
from hub.gateway_config import GatewayConfigs
from hub.ingest import Ingest, now_ms
from hub.live import FleetEvents
from hub.metrics import HubMetrics, IngestStats
from hub.provisioning import build_provisioning
from hub.rollout import Rollout
from hub.signals import SignalBus
from hub.store import Store
from hub.web.summary import fleet_summary
from protocol.logs import get_logger

log = get_logger("hub")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling.

    ``Server.serve()`` installs SIGINT/SIGTERM handlers and re-raises the signal after shutting
    down, which would kill the process before the ingest has flushed its batch; the hub's CLI
    handles the signals and stops the server itself.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HubError(RuntimeError):
    """The hub could not start (database, HTTP port)."""


class Hub:
    """One hub: open the database, start ingest and the API, stop them in order."""

    def __init__(self, config: HubConfig, admin_password: str | None = None) -> None:
        self.config = config
        self.admin_password = admin_password or os.environ.get("TWIN_ADMIN_PASSWORD") or None
        """Password of the ``admin`` user created when the database has no user (default:
        ``TWIN_ADMIN_PASSWORD``; neither: a random one, see :attr:`generated_admin_password`)."""
        self.generated_admin_password: str | None = None
        """Set when start() created ``admin`` with a random password, for the CLI to show once."""
        self.auth = AuthState(token_ttl_s=config.auth.token_ttl_s, session_max_s=config.auth.session_max_s,
                              login_failures=RateLimiter(config.auth.login_failures_per_minute, 60.0),
                              login_attempts=RateLimiter(config.auth.login_attempts_per_minute, 60.0))
        self.metrics = HubMetrics()
        self.signals = SignalBus()
        """The one in-process signal bus of this hub (see :mod:`hub.signals`)."""
        self.db = Database(config.database.url)
        self.store = Store(self.db)
        self.ingest = Ingest(config.mqtt, config.ingest, self.store, self.metrics)
        self.rollout = Rollout(self.db, self.ingest, lambda: self.public_url, self.metrics, now_ms)
        # A new gateway gets its (fleet-wide) assignments at once; every known gateway gets them
        # again whenever the MQTT connection is (re)subscribed.
        self.store.on_new_gateway = lambda site, gateway: self.rollout.mark((site, gateway))
        self.ingest.on_subscribed(self.rollout.mark_all)
        # Remote configuration: desired device lists published retained to each gateway (again on
        # every re-subscription), and the gateways' config_applied/config_rejected answers recorded.
        self.configs = GatewayConfigs(self.db, self.ingest, now_ms)
        self.ingest.on_subscribed(self.configs.mark_all)
        self.ingest.on_committed(self.configs.on_batch)
        # Alerts: every committed batch and every signal is handed to the engine (queued, off the
        # ingest path); it starts once the database is open.
        self.alerts = AlertEngine(self.db, config.alerts, clock=now_ms, registry=self.metrics.registry)
        self.ingest.on_committed(self.alerts.on_batch)
        self.signals.subscribe(self.alerts.on_signal)
        # Setpoint commands: published through the ingest's connection; the gateways' answers are
        # handed over from ingest (queued) to update the audit; refusals raise human-error signals.
        self.commands = CommandService(self.db, self.ingest, self.signals, config.commands, clock=now_ms)
        self.ingest.on_committed(self.commands.on_committed)
        # Provisioning: claim codes, gateway broker logins, and (with [broker_auth]) Mosquitto's files.
        self.provisioning = build_provisioning(config, self.db, self.configs)
        # Dashboard: every committed batch marks the live fleet summary out of date (coalesced, off
        # the ingest path; hub/live.py).
        self.fleet_events = FleetEvents(lambda: fleet_summary(self.db, config.status, now_ms()))
        self.ingest.on_committed(self.fleet_events.on_batch)
        self.alerts.on_change(self.fleet_events.changed)  # open alerts are on the page: at once
        self.port: int | None = None
        self._server: _Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def stats(self) -> IngestStats:
        """Ingest counters (messages, readings stored, duplicates, malformed, ...)."""
        return self.metrics.stats

    @property
    def api_url(self) -> str:
        """Base URL of the HTTP API, e.g. ``http://127.0.0.1:8000`` (``https://`` with ``[http] tls_cert_file``)."""
        if self.port is None:
            raise RuntimeError("hub is not started")
        host = self.config.http.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        scheme = "https" if self.config.http.tls_cert_file else "http"
        return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{self.port}"

    @property
    def public_url(self) -> str:
        """Base URL gateways download model files from: ``[http] public_url``, else :attr:`api_url`."""
        return self.config.http.public_url or self.api_url

    async def start(self, wait_subscribed: bool = True, ready_within_s: float | None = 15.0) -> None:
        """Open the database, start HTTP and ingest; with ``wait_subscribed`` return once the
        MQTT subscription is in place (``ready_within_s=None`` waits as long as the broker is away).

        Logs ``hub_ready`` when DB, HTTP and (if waited for) MQTT are all up.
        """
        try:
            await self.db.open()
        except Exception as exc:
            raise HubError(f"cannot open database {redact_url(self.db.url)}: {exc}") from exc
        try:
            # Before the ingest connects: the broker must know the hub's own login (and, after a
            # restore or a lost file, exactly the gateways the database says are provisioned).
            with self.db.activate():
                gateways = await self.provisioning.sync_broker()
        except Exception as exc:
            await self.db.close()
            raise HubError(f"cannot write the broker's access files: {exc}") from exc
        if self.provisioning.access is not None:
            log.info("broker_access_synced", gateways=gateways)
        try:
            with self.db.activate():
                await self._start_auth()
        except Exception as exc:
            await self.db.close()
            raise HubError(f"cannot set up users: {exc}") from exc
        await self.alerts.start()
        self.commands.start()
        self._tasks.append(asyncio.create_task(self.ingest.run(), name="hub-ingest"))
        app = create_app(ApiContext(db=self.db, status=self.config.status, ingest=self.ingest,
                                    metrics=self.metrics, rollout=self.rollout,
                                    signals=self.signals, billing=self.config.billing,
                                    smtp=self.config.alerts.smtp, alerts=self.config.alerts,
                                    payments=self.config.payments,
                                    configs=self.configs, commands=self.commands,
                                    provisioning=self.provisioning, auth=self.auth,
                                    fleet_events=self.fleet_events))
        http = self.config.http
        self._server = _Server(uvicorn.Config(
            app, host=http.host, port=http.port, log_config=None,
            access_log=False, lifespan="off", timeout_graceful_shutdown=3,
            # HTTPS when a certificate is configured; uvicorn's server context refuses TLS < 1.2
            # (Python's default), see docs/security.md, "TLS".
            ssl_certfile=str(http.tls_cert_file) if http.tls_cert_file else None,
            ssl_keyfile=str(http.tls_key_file) if http.tls_key_file else None))
        server_task = asyncio.create_task(self._serve(self._server), name="hub-http")
        self._tasks.append(server_task)
        while not self._server.started:
            if server_task.done():
                await self.stop()
                server_task.result()  # raises HubError
            await asyncio.sleep(0.01)
        sockets = self._server.servers[0].sockets
        self.port = int(sockets[0].getsockname()[1])
        # Started once the port (and so the download URL) is known; marks made before wait for it.
        self._tasks.append(asyncio.create_task(self.rollout.run(), name="hub-rollout"))
        self._tasks.append(asyncio.create_task(self.configs.run(), name="hub-gateway-config"))
        if wait_subscribed:
            try:
                await asyncio.wait_for(self.ingest.subscribed.wait(), ready_within_s)
            except TimeoutError:
                await self.stop()
                raise HubError(f"no MQTT subscription at {self.config.mqtt.host}:{self.config.mqtt.port} "
                               f"after {ready_within_s}s: {self.ingest.last_error}") from None
        log.info("hub_ready", api=self.api_url, db=redact_url(self.db.url), mqtt_subscribed=wait_subscribed,
                 broker=f"{self.config.mqtt.host}:{self.config.mqtt.port}",
                 share_group=self.config.mqtt.share_group)

    async def _start_auth(self) -> None:
        configured = self.config.auth.token_secret
        self.auth.secret = (configured.get_secret_value() if configured is not None
                            else await users.shared_secret("token-signing"))
        secret = self.auth.secret
        self.rollout.sign = lambda site, gw, name, version: tokens.issue_model_download(secret, site, gw, name, version)
        self.generated_admin_password = await users.ensure_admin(self.admin_password, now_ms())
        if self.generated_admin_password is not None or self.admin_password is not None:
            log.info("admin_user_ready", username=users.ADMIN_USERNAME,
                     password_source="generated" if self.generated_admin_password else "TWIN_ADMIN_PASSWORD")

    @staticmethod
    async def _serve(server: _Server) -> None:
        try:
            await server.serve()
        except SystemExit:  # uvicorn exits the process when it cannot bind; make it an error
            raise HubError(f"HTTP server could not start on {server.config.host}:{server.config.port} "
                           "(port in use?)") from None

    async def wait(self) -> None:
        """Return when a component stopped on its own (which is a failure); re-raises its error."""
        if not self._tasks:
            return
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()

    async def stop(self, drain_s: float = 5.0) -> None:
        """Graceful stop: commit and acknowledge what was received, disconnect MQTT, stop HTTP,
        close the database; the drain of received messages is bounded by ``drain_s``."""
        await self.rollout.stop()
        await self.configs.stop()
        await self.ingest.stop(drain_s)
        await self.fleet_events.close()  # ends the dashboards' streams, so HTTP can stop at once
        if self._server is not None:
            self._server.should_exit = True
        for task in self._tasks:
            try:
                await asyncio.wait_for(asyncio.shield(task), drain_s + 2)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            except Exception as exc:  # already reported by wait(); keep stopping the rest
                log.debug("task_failed", task=task.get_name(), error=str(exc))
        self._tasks.clear()
        await self.commands.stop()
        await self.alerts.stop()
        await self.db.close()
        log.info("hub_stopped", **{k: v for k, v in self.stats.as_dict().items() if isinstance(v, int)})


@contextlib.asynccontextmanager
async def running_hub(config: HubConfig, wait_subscribed: bool = True,
                      ready_within_s: float = 15.0, admin_password: str | None = None) -> AsyncIterator[Hub]:
    """Start a :class:`Hub` for the duration of the ``async with`` block (tests, benchmarks)."""
    hub = Hub(config, admin_password=admin_password)
    await hub.start(wait_subscribed=wait_subscribed, ready_within_s=ready_within_s)
    try:
        yield hub
    finally:
        await hub.stop()
