"""Opening and closing the hub database through Tortoise ORM.

Each :class:`Database` owns its own ``TortoiseContext`` instead of Tortoise's process-global
state, so a test can run two hubs (or a hub and a checker) in one process. Tortoise finds the
context through a context variable; every ORM call of the hub runs inside
:meth:`Database.activate` (the API does it per request), so it never depends on which task
happened to initialise Tortoise.

Limitation (Tortoise keeps the SQL dialect on the model classes): contexts open at the same
time must use the same backend; switching between SQLite and PostgreSQL one after the other
is fine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.backends.base.config_generator import expand_db_url
from tortoise.context import TortoiseContext, _current_context

from hub import migrate
from protocol.logs import get_logger

log = get_logger("hub.db")

Dialect = Literal["sqlite", "postgres"]
MODELS_MODULES = ["hub.models", "hub.registry", "hub.alerts.models", "hub.billing.models", "hub.commands",
                  "hub.gateway_config", "hub.identity", "hub.users"]
"""Modules of the Tortoise app ``models``: fleet and readings, the anomaly-model registry, alerts, billing,
commands, gateway configuration and identity, users."""

# SQLite pragmas for the hub's write pattern (one writer, large batches, concurrent API readers):
# WAL lets readers run beside the writer; synchronous=NORMAL is durable across process crashes in
# WAL mode (only a power cut may lose the last commits, which the gateways' QoS 1 redelivery and
# the (device, seq) dedup cover); busy_timeout waits for another process (a second hub) instead
# of failing with "database is locked".
SQLITE_PRAGMAS: dict[str, Any] = {
    "journal_mode": "WAL",
    "synchronous": "NORMAL",
    "busy_timeout": 10_000,
    "foreign_keys": "ON",
    "cache_size": -65_536,  # 64 MiB page cache
    "temp_store": "MEMORY",
}


def dialect_of(url: str) -> Dialect:
    """``sqlite`` or ``postgres`` for a Tortoise database URL."""
    scheme = url.split("://", 1)[0]
    if scheme == "sqlite":
        return "sqlite"
    if scheme in ("postgres", "postgresql", "asyncpg"):
        return "postgres"
    raise ValueError(f"unsupported database URL scheme {scheme!r} (use sqlite:// or postgres://)")


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs and the health endpoint)."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    userinfo, host = rest.rsplit("@", 1)
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return f"{scheme}://{userinfo}@{host}"


def _connection_config(url: str) -> dict[str, Any]:
    conf: dict[str, Any] = expand_db_url(url)
    if dialect_of(url) == "sqlite":
        path = conf["credentials"]["file_path"]
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        for key, value in SQLITE_PRAGMAS.items():
            conf["credentials"].setdefault(key, value)
    return conf


class Database:
    """One hub database: a Tortoise context with the hub models and one connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect: Dialect = dialect_of(url)
        # Tortoise caches generated SQL per connection *name* process-wide (EXECUTOR_CACHE), so
        # the name carries the dialect: a SQLite hub and a PostgreSQL hub (one after the other in
        # a test run) must not share "INSERT ... VALUES (?,?)" with each other.
        self.connection_name = f"hub_{self.dialect}"
        self._ctx: TortoiseContext | None = None

    @property
    def context(self) -> TortoiseContext:
        """The Tortoise context; raises if the database is not open."""
        if self._ctx is None:
            raise RuntimeError("database is not open")
        return self._ctx

    @property
    def conn(self) -> BaseDBAsyncClient:
        """The Tortoise connection (raw SQL goes through it)."""
        return self.context.db(self.connection_name)

    @property
    def is_open(self) -> bool:
        """True between :meth:`open` and :meth:`close`."""
        return self._ctx is not None

    async def open(self, generate_schemas: bool = True) -> Database:
        """Initialise Tortoise, upgrade tables of an earlier schema (:mod:`hub.migrate`) and create
        missing tables and indexes (``IF NOT EXISTS``)."""
        ctx = TortoiseContext()
        config = {
            "connections": {self.connection_name: _connection_config(self.url)},
            "apps": {"models": {"models": MODELS_MODULES, "default_connection": self.connection_name}},
        }
        self._ctx = ctx
        try:
            # init() resolves connections through the current context, so make it current.
            with self.activate():
                await ctx.init(config=config)
                if generate_schemas:
                    # Columns and keys added to existing tables first: the CREATE INDEX statements
                    # of generate_schemas run on existing tables too and may name a new column.
                    await migrate.before_generate(self)
                    # safe=True: CREATE ... IF NOT EXISTS, so several hubs may share a database.
                    await ctx.generate_schemas(safe=True)
                    await migrate.after_generate(self)
                # Connect now rather than on the first query, so a wrong URL fails at start-up.
                await self.conn.execute_query("SELECT 1")
        except BaseException:
            await self.close()
            raise
        log.info("db_open", url=redact_url(self.url), dialect=self.dialect)
        return self

    def sql(self, text: str) -> str:
        """Adapt ``?`` placeholders to the backend (asyncpg wants ``$1, $2, ...``)."""
        if self.dialect != "postgres":
            return text
        parts = text.split("?")
        return parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], start=1))

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Make this database current for the code inside (e.g. one API request)."""
        token = _current_context.set(self.context)
        try:
            yield
        finally:
            _current_context.reset(token)

    async def ping(self, within_s: float = 2.0) -> bool:
        """True when a trivial query succeeds within ``within_s`` seconds."""
        if self._ctx is None:
            return False
        try:
            with self.activate():
                await asyncio.wait_for(self.conn.execute_query("SELECT 1"), within_s)
            return True
        except Exception:  # any driver error means "not connected"
            return False

    async def close(self) -> None:
        """Close the connections; safe to call twice."""
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            return
        await ctx.close_connections()
        log.info("db_closed", url=redact_url(self.url))

    async def __aenter__(self) -> Database:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
