"""Hub configuration: pydantic models loaded from TOML (see ``examples/hub.toml``, ``docs/hub.md``).

Errors are reported as ``hub.toml:LINE: key: message`` through :mod:`protocol.tomlconfig`.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from hub.alerts.rules import AlertsConfig
from hub.billing.config import BillingConfig, PaymentsConfig
from hub.commands import CommandsConfig
from hub.provisioning_config import BrokerAuthConfig, ProvisioningConfig
from protocol.ids import NAME_PATTERN
from protocol.tls import TlsClientOptions
from protocol.tomlconfig import ConfigError, load_toml, parse_toml, problem_at

Port = Annotated[int, Field(ge=0, le=65535)]


class _Section(BaseModel):
    # Unknown keys are errors: a typo such as `bach_max_readings` must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class DatabaseConfig(_Section):
    """``[database]``: where readings are stored."""

    url: str = "sqlite://var/hub.db"
    """Tortoise ORM URL: ``sqlite://PATH`` (relative to the working directory) or
    ``postgres://USER:PASSWORD@HOST:PORT/DB``."""

    @model_validator(mode="after")
    def _known_scheme(self) -> DatabaseConfig:
        scheme = self.url.split("://", 1)[0] if "://" in self.url else ""
        if scheme not in ("sqlite", "postgres", "postgresql", "asyncpg"):
            raise ValueError("url must start with sqlite:// or postgres://")
        return self


class MqttConfig(_Section, TlsClientOptions):
    """``[mqtt]``: the broker the gateways publish to; TLS options (``tls``, ``ca_file``, ...) come from
    :class:`~protocol.tls.TlsClientOptions`."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    client_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")] = "twin-hub"
    """Fixed client id: the broker keeps this hub's persistent session (and its queued QoS 1
    messages) under it. Two hub processes must not share a client id."""
    share_group: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    """When set, telemetry is subscribed as ``$share/<group>/...`` so hubs in the group split it."""
    username: str | None = None
    password: SecretStr | None = None
    keepalive: Annotated[int, Field(ge=5, le=3600)] = 30
    reconnect_max_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    """Upper bound of the exponential back-off between reconnection attempts."""


class HttpConfig(_Section):
    """``[http]``: the REST API listener."""

    host: str = "127.0.0.1"
    port: Port = 8000
    """0 picks a free port (the ready line on stdout tells which)."""
    public_url: Annotated[str, Field(pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$", max_length=1000)] | None = None
    """Base URL under which gateways reach this hub's API (through a proxy, a DNS name, ...): model
    assignments tell gateways to download ``<public_url>/api/v1/models/{name}/{version}/file``.
    Unset: ``http://<host>:<port>`` of the listener (``0.0.0.0`` becomes ``127.0.0.1``)."""
    tls_cert_file: Path | None = None
    """PEM certificate (chain) of the API: with ``tls_key_file`` the API speaks HTTPS only."""
    tls_key_file: Path | None = None
    """Private key of ``tls_cert_file`` (PEM, unencrypted; keep it mode 0600)."""

    @model_validator(mode="after")
    def _no_trailing_slash(self) -> HttpConfig:
        if self.public_url is not None:
            self.public_url = self.public_url.rstrip("/")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        return self


class IngestConfig(_Section):
    """``[ingest]``: batching of readings into database transactions."""

    batch_max_readings: Annotated[int, Field(ge=1, le=1_000_000)] = 5000
    batch_max_delay_ms: Annotated[int, Field(ge=0, le=60_000)] = 50
    max_decoded_readings: Annotated[int, Field(ge=1, le=10_000_000)] = 20_000
    """Readings decoded and waiting for the database at most; beyond it the hub stops decoding
    until a batch is committed. Mosquitto does not hold a subscriber to its in-flight window once
    acknowledgements flow (measured: 1,900 of 2,000 messages outstanding against a window of
    100), so after an outage the broker's backlog arrives as fast as the network carries it; a
    decoded reading costs about 1 KB of memory, its JSON about a tenth of that, so the rest waits
    undecoded (and unacknowledged) in the MQTT client."""

    @model_validator(mode="after")
    def _room_for_a_batch(self) -> IngestConfig:
        if self.max_decoded_readings < self.batch_max_readings:
            raise ValueError("max_decoded_readings must be >= batch_max_readings (a batch must fit)")
        return self


class StatusConfig(_Section):
    """``[status]``: when devices and gateways count as stale or offline."""

    stale_after_s: Annotated[float, Field(gt=0)] = 120
    offline_after_s: Annotated[float, Field(gt=0)] = 600

    @model_validator(mode="after")
    def _ordered(self) -> StatusConfig:
        if self.offline_after_s < self.stale_after_s:
            raise ValueError("offline_after_s must be >= stale_after_s")
        return self


class AuthConfig(_Section):
    """``[auth]``: users' bearer tokens and sign-in limits (``docs/security.md``)."""

    token_ttl_s: Annotated[int, Field(ge=60, le=86_400)] = 900
    """Lifetime of a bearer token; short, because a token cannot be recalled (a disabled user is
    refused at once all the same: every request checks the user)."""
    session_max_s: Annotated[int, Field(ge=300, le=2_592_000)] = 43_200
    """Longest a dashboard (browser) session lasts from the password being typed. A browser's
    session cookie is renewed while the dashboard is used (any page or API request in the second
    half of the token's life), so an open fleet page stays signed in; after this many seconds the
    user types the password again. An unused session still ends after ``token_ttl_s``."""
    token_secret: Annotated[SecretStr, Field(min_length=32)] | None = None
    """HS256 signing key. Unset: the hub generates one and keeps it in its database (shared by all
    hubs on that database). Changing it signs everybody out and invalidates model-download URLs
    until the assignments are re-published (the hub does that at every start)."""
    login_failures_per_minute: Annotated[int, Field(ge=1, le=10_000)] = 10
    """Failed sign-ins allowed per username per minute; more get 429."""
    login_attempts_per_minute: Annotated[int, Field(ge=1, le=100_000)] = 30
    """Sign-ins allowed per client address per minute (successful ones too)."""


class HubConfig(_Section):
    """The whole ``hub.toml``."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"] = "INFO"
    database: DatabaseConfig = DatabaseConfig()
    mqtt: MqttConfig = MqttConfig()
    http: HttpConfig = HttpConfig()
    ingest: IngestConfig = IngestConfig()
    status: StatusConfig = StatusConfig()
    alerts: AlertsConfig = AlertsConfig()
    """Alert rules, contacts, SMTP and notification limits (``docs/alerts.md``)."""
    billing: BillingConfig = BillingConfig()
    """Plausibility limits of meter registers, statements (``docs/billing.md``)."""
    payments: PaymentsConfig = PaymentsConfig()
    """Payment provider of statements (``docs/billing.md``, "Payments")."""
    auth: AuthConfig = AuthConfig()
    """Sign-in tokens and limits (``docs/security.md``)."""
    commands: CommandsConfig = CommandsConfig()
    """Setpoint commands: expiry, answer grace, sweep (``docs/commands.md``)."""
    provisioning: ProvisioningConfig = ProvisioningConfig()
    """Claim codes and the broker address given to provisioned gateways (``docs/security.md``)."""
    broker_auth: BrokerAuthConfig = BrokerAuthConfig()
    """Mosquitto password and ACL files written by the hub (``docs/security.md``)."""

    @model_validator(mode="after")
    def _broker_auth_has_hub_login(self) -> HubConfig:
        # The hub's own broker user goes into the files it writes; without it the hub would lock itself out.
        if self.broker_auth.enabled and (self.mqtt.username is None or self.mqtt.password is None):
            raise ValueError("[broker_auth] enabled needs the hub's own broker login: [mqtt] username and password")
        return self


# Environment variable -> (section, key). Handy for containers and for launchers that pick ports.
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "HUB_PORT": ("http", "port"),
    "MQTT_PORT": ("mqtt", "port"),
    "HUB_DATABASE_URL": ("database", "url"),
    "HUB_PUBLIC_URL": ("http", "public_url"),
}


def load_config(path: str | Path) -> HubConfig:
    """Load and validate ``path``; raises :class:`ConfigError` naming file, line and key.

    Relative TLS file paths (``[mqtt] ca_file``, ``[http] tls_cert_file``, ...) are relative to the
    file, and each must exist and load."""
    config = load_toml(path, HubConfig)
    return _check_tls_files(config, Path(path))


def _check_tls_files(config: HubConfig, path: Path) -> HubConfig:
    mqtt_files, found = config.mqtt.tls_problems(path.parent)
    problems = [problem_at(path, ("mqtt", key), message) for key, message in found]
    http: dict[str, Path] = {}
    for key in ("tls_cert_file", "tls_key_file"):
        value: Path | None = getattr(config.http, key)
        if value is not None:
            http[key] = value if value.is_absolute() else path.parent / value
            if not http[key].is_file():
                problems.append(problem_at(path, ("http", key), f"no such file: {http[key]}"))
    if len(http) == 2 and not problems:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                str(http["tls_cert_file"]), str(http["tls_key_file"]))
        except (ssl.SSLError, OSError) as exc:
            problems.append(problem_at(path, ("http", "tls_cert_file"), f"certificate and key do not load "
                                       f"together ({http['tls_cert_file']}, {http['tls_key_file']}): {exc}"))
    if problems:
        raise ConfigError(str(path), problems)
    if mqtt_files:
        config.mqtt = config.mqtt.model_copy(update=mqtt_files)
    if http:
        config.http = config.http.model_copy(update=http)
    return config


def parse_config(text: str, source: str = "<string>") -> HubConfig:
    """Like :func:`load_config` for TOML text in memory."""
    return parse_toml(text, HubConfig, source=source)


def apply_env(config: HubConfig, environ: Mapping[str, str] | None = None) -> HubConfig:
    """Return ``config`` with ``HUB_PORT`` / ``MQTT_PORT`` / ``HUB_DATABASE_URL`` / ``HUB_PUBLIC_URL`` applied.

    A bad value raises :class:`ConfigError` naming the variable.
    """
    env = os.environ if environ is None else environ
    data: dict[str, Any] = config.model_dump()
    if config.mqtt.password is not None:
        data["mqtt"]["password"] = config.mqtt.password.get_secret_value()
    used: dict[tuple[str, str], str] = {}
    for var, (section, key) in ENV_OVERRIDES.items():
        if var in env:
            data[section][key] = env[var]
            used[(section, key)] = var
    if not used:
        return config
    try:
        return HubConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"][:2])
            name = used.get((loc[0], loc[1])) if len(loc) == 2 else None
            problems.append(f"environment {name or '.'.join(loc)}: {err['msg']}")
        raise ConfigError("environment", problems) from None
