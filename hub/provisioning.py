"""Provisioning of gateways by field technicians with one-time claim codes (``docs/security.md``).

1. A technician creates a gateway at the hub (``POST /api/v1/gateways``) and is shown a claim
   code once. Only its SHA-256 is stored, with an expiry (``[provisioning] claim_code_ttl_s``).
2. On the gateway, ``twin-edge provision --hub URL --code CODE`` sends the code to
   ``POST /api/v1/provision`` and gets the gateway's identity, a fresh broker password (generated
   here, returned this once, stored only as a Mosquitto hash) and its device configuration.
3. The code is marked used in the same transaction that stores the credentials: of two claims at
   once exactly one wins. The broker's password and ACL files are rewritten (:mod:`hub.broker_access`)
   before that transaction commits, so a broker that cannot be updated leaves the code unused.

Revoking a gateway (``POST /api/v1/gateways/{uid}/revoke``) removes its broker user and its unused
codes; Mosquitto drops its live connection on the reload.

Every function runs inside :meth:`hub.db.Database.activate` (API requests already do).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from hub import gateway_config
from hub.broker_access import BrokerAccess, BrokerReloadError, GatewayLogin, hash_password, new_password
from hub.config import HubConfig
from hub.db import Database
from hub.errors import RequestRefused
from hub.identity import ClaimCode, GatewayCredential
from hub.ingest import now_ms
from hub.models import Gateway, Site
from hub.provisioning_config import ProvisioningConfig
from protocol.logs import get_logger

log = get_logger("hub.provisioning")

# Crockford-style base32 without I, L, O, U: nothing a technician can misread or mistype between
# 1/I/L and 0/O. 20 symbols of 32 = 100 bits, shown in groups of four.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CODE_LENGTH = 20
_GROUP = 4


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    """Where and how gateways reach the broker."""

    host: str
    port: int
    tls: bool
    ca_file: Path | None
    """CA certificate given to gateways (its PEM text goes into the answer)."""

    @classmethod
    def from_config(cls, config: HubConfig) -> BrokerEndpoint:
        """``[provisioning]`` broker options, defaulting to the hub's own ``[mqtt]``."""
        prov, mqtt = config.provisioning, config.mqtt
        tls = mqtt.tls if prov.mqtt_tls is None else prov.mqtt_tls
        ca_file = prov.mqtt_ca_file or (mqtt.ca_file if tls else None)
        return cls(prov.mqtt_host or mqtt.host, prov.mqtt_port or mqtt.port, tls, ca_file)

    async def ca_pem(self) -> str | None:
        """The CA certificate's PEM text, read now (it may have been renewed since start)."""
        if self.ca_file is None:
            return None
        return await asyncio.to_thread(self.ca_file.read_text, "ascii")


@dataclass(frozen=True, slots=True)
class IssuedCode:
    """A claim code as shown to the technician (the only time it exists in clear)."""

    site: str
    gateway: str
    code: str
    expires_ms: int


@dataclass(frozen=True, slots=True)
class Provisioned:
    """What a gateway receives for a valid claim code."""

    site: str
    gateway: str
    client_id: str
    username: str
    password: str
    broker: BrokerEndpoint
    ca_pem: str | None
    config_version: int | None
    config: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Revoked:
    """What a revocation changed."""

    credentials_revoked: bool
    claim_codes_invalidated: int


def new_claim_code() -> str:
    """A fresh claim code, e.g. ``7K3M-Q9TX-...`` (100 random bits)."""
    raw = "".join(secrets.choice(_ALPHABET) for _ in range(_CODE_LENGTH))
    return "-".join(raw[i:i + _GROUP] for i in range(0, _CODE_LENGTH, _GROUP))


def normalise_code(code: str) -> str:
    """The code as stored (hashed): upper case, without separators or spaces; lookalikes mapped
    (``O`` → ``0``, ``I``/``L`` → ``1``) so a mistyped letter still matches."""
    text = "".join(ch for ch in code.upper() if ch not in "- \t")
    return text.translate(str.maketrans("OIL", "011"))


def code_hash(code: str) -> str:
    """SHA-256 (hex) of the normalised code: what the database keeps."""
    return hashlib.sha256(normalise_code(code).encode()).hexdigest()


def gateway_username(site: str, gateway: str) -> str:
    """The broker username of a gateway: its uid ``site.gateway``."""
    return f"{site}.{gateway}"


def gateway_client_id(site: str, gateway: str) -> str:
    """The MQTT client id a provisioned gateway uses (the edge's default for these names)."""
    return f"twin-edge-{site}-{gateway}"


class Provisioning:
    """Claim codes, credentials and the broker files of one hub."""

    def __init__(self, db: Database, config: ProvisioningConfig, broker: BrokerEndpoint,
                 access: BrokerAccess | None = None, clock: Callable[[], int] = now_ms,
                 configs: gateway_config.GatewayConfigs | None = None) -> None:
        self.db = db
        self.config = config
        self.broker = broker
        self.access = access
        """Writes the broker files; ``None`` when ``[broker_auth]`` is off (credentials are still issued)."""
        self.clock = clock
        self.configs = configs
        # One provisioning or revocation at a time in this hub: the broker files are computed from
        # the database inside the transaction, so two at once must not see each other half-done.
        self._lock = asyncio.Lock()

    async def _logins(self, conn: BaseDBAsyncClient | None = None) -> list[GatewayLogin]:
        rows = await (GatewayCredential.filter(revoked_ms=None).using_db(conn).order_by("username")
                      .values("username", "password_hash", "gateway__name", "gateway__site__name"))
        return [GatewayLogin(r["gateway__site__name"], r["gateway__name"], r["username"], r["password_hash"])
                for r in rows]

    async def _apply(self, conn: BaseDBAsyncClient) -> None:
        if self.access is None:
            return
        try:
            await self.access.apply(await self._logins(conn))
        except (BrokerReloadError, OSError) as exc:
            log.error("broker_access_failed", error=str(exc))
            raise RequestRefused(503, f"the broker's access files could not be updated ({exc}); nothing "
                                      "was changed, try again") from exc

    async def sync_broker(self) -> int:
        """Write the broker files from the database and reload the broker (hub start); returns the
        number of gateways with access. A no-op without ``[broker_auth]``. A failed reload is only
        logged; failing to write the files raises ``OSError``."""
        if self.access is None:
            return 0
        async with self._lock:
            logins = await self._logins()
            try:
                await self.access.apply(logins)
            except BrokerReloadError as exc:
                # The files are written; a broker that is down (or not yet up) reads them when it
                # starts. The hub keeps starting, as it does whenever the broker is away.
                log.warning("broker_reload_failed", error=str(exc))
        return len(logins)

    async def _gateway(self, site: str, name: str) -> Gateway | None:
        return await Gateway.filter(name=name, site__name=site).first()

    async def _new_code(self, gateway_id: int, site: str, name: str, created_by: str,
                        conn: BaseDBAsyncClient) -> IssuedCode:
        now = self.clock()
        await (ClaimCode.filter(gateway_id=gateway_id, used_ms=None, invalidated_ms=None).using_db(conn)
               .update(invalidated_ms=now))
        # 100 random bits: two codes colliding is not going to happen (the unique key would refuse it).
        code = new_claim_code()
        expires = now + self.config.claim_code_ttl_s * 1000
        await ClaimCode.create(gateway_id=gateway_id, code_hash=code_hash(code), created_ms=now,
                               created_by=created_by[:64], expires_ms=expires, using_db=conn)
        log.info("claim_code_issued", site=site, gateway=name, by=created_by)
        return IssuedCode(site, name, code, expires)

    async def create_gateway(self, site: str, name: str, created_by: str,
                             devices: list[dict[str, Any]] | None = None,
                             serial_ports: list[dict[str, Any]] | None = None) -> IssuedCode:
        """Create ``site.name`` (and its site) with an optional device configuration, and issue its
        first claim code. 409 when the gateway exists already (issue a new code for it instead)."""
        document: dict[str, Any] | None = None
        if devices is not None:
            document = {"devices": devices}
            if serial_ports is not None:
                document["serial_ports"] = serial_ports
            gateway_config.check_document(document)  # 422 before anything is created
        now = self.clock()
        # The site outside the transaction, like the ingest does: on PostgreSQL a unique violation
        # inside a transaction would abort the rest of it.
        site_row = await Site.get_or_none(name=site)
        if site_row is None:
            try:
                site_row = await Site.create(name=site, first_seen_ms=now)
            except IntegrityError:  # another request or the ingest created it a moment ago
                site_row = await Site.get(name=site)
        async with in_transaction(self.db.connection_name) as conn:
            if await Gateway.filter(site_id=site_row.id, name=name).using_db(conn).exists():
                raise RequestRefused(409, f"gateway {site}.{name} exists already; issue a new claim code with "
                                          f"POST /api/v1/gateways/{site}.{name}/claim-code")
            try:
                gw = await Gateway.create(site_id=site_row.id, name=name, first_seen_ms=now, using_db=conn)
            except IntegrityError:
                raise RequestRefused(409, f"gateway {site}.{name} exists already") from None
            issued = await self._new_code(gw.id, site, name, created_by, conn)
        if document is not None:
            await gateway_config.set_config(site, name, document, created_by, publisher=self.configs,
                                            clock=self.clock)
        log.info("gateway_created", site=site, gateway=name, by=created_by,
                 devices=len(devices) if devices is not None else None)
        return issued

    async def issue_code(self, site: str, name: str, created_by: str) -> IssuedCode:
        """A fresh claim code for an existing gateway (replacing its unused ones); 404 if unknown.

        Claiming it replaces the gateway's broker password (a replaced gateway, a lost config file)."""
        gw = await self._gateway(site, name)
        if gw is None:
            raise RequestRefused(404, f"unknown gateway {site}.{name!s}")
        async with in_transaction(self.db.connection_name) as conn:
            return await self._new_code(gw.id, site, name, created_by, conn)

    async def claim(self, code: str, client: str = "") -> Provisioned:
        """Use ``code``: new broker credentials, the identity and the configuration of its gateway.

        Refused without issuing anything: 403 for a code that does not exist, 410 for one that was
        used, replaced or has expired.
        """
        digest = code_hash(code)
        async with self._lock:
            now = self.clock()
            password = new_password()
            async with in_transaction(self.db.connection_name) as conn:
                # The conditional UPDATE is the claim: only one transaction can move used_ms from NULL.
                won = await (ClaimCode.filter(code_hash=digest, used_ms=None, invalidated_ms=None, expires_ms__gt=now)
                             .using_db(conn).update(used_ms=now, used_from=client[:64]))
                if not won:
                    raise await self._why_refused(digest, now, conn)
                row = await (ClaimCode.filter(code_hash=digest).using_db(conn)
                             .values("gateway_id", "created_by", "gateway__name", "gateway__site__name"))
                gw_id, site, name = row[0]["gateway_id"], row[0]["gateway__site__name"], row[0]["gateway__name"]
                username = gateway_username(site, name)
                await GatewayCredential.filter(gateway_id=gw_id).using_db(conn).delete()
                await GatewayCredential.create(gateway_id=gw_id, username=username,
                                               password_hash=hash_password(password), issued_ms=now,
                                               issued_by=str(row[0]["created_by"])[:64], using_db=conn)
                # Inside the transaction: a broker that cannot be updated rolls the claim back.
                await self._apply(conn)
        current = await gateway_config.current_config(site, name)
        log.info("gateway_provisioned", site=site, gateway=name, client=client)
        return Provisioned(site, name, gateway_client_id(site, name), username, password, self.broker,
                           await self.broker.ca_pem(), current[0] if current else None, current[1] if current else None)

    async def _why_refused(self, digest: str, now: int, conn: BaseDBAsyncClient) -> RequestRefused:
        row = await ClaimCode.filter(code_hash=digest).using_db(conn).first()
        if row is None:
            log.warning("claim_code_unknown")
            return RequestRefused(403, "unknown claim code: check what you typed, or ask for a new code")
        if row.used_ms is not None:
            log.warning("claim_code_reused", gateway_id=row.gateway_id)
            return RequestRefused(410, "this claim code has been used already; ask for a new code")
        if row.invalidated_ms is not None:
            return RequestRefused(410, "this claim code was replaced by a newer one; use the newest code")
        return RequestRefused(410, "this claim code has expired; ask for a new code")

    async def revoke(self, site: str, name: str, by: str) -> Revoked:
        """Take the gateway's broker access away (its live connection is dropped on the broker's
        reload) and invalidate its unused claim codes; 404 for an unknown gateway."""
        gw = await self._gateway(site, name)
        if gw is None:
            raise RequestRefused(404, f"unknown gateway {site}.{name}")
        async with self._lock:
            now = self.clock()
            async with in_transaction(self.db.connection_name) as conn:
                revoked = await (GatewayCredential.filter(gateway_id=gw.id, revoked_ms=None).using_db(conn)
                                 .update(revoked_ms=now, revoked_by=by[:64]))
                codes = await (ClaimCode.filter(gateway_id=gw.id, used_ms=None, invalidated_ms=None)
                               .using_db(conn).update(invalidated_ms=now))
                await self._apply(conn)
        log.info("gateway_revoked", site=site, gateway=name, by=by, credentials=bool(revoked), codes=codes)
        return Revoked(bool(revoked), int(codes))

    async def credential_state(self, site: str, name: str) -> str:
        """``none``, ``active`` or ``revoked``: the gateway's broker credentials."""
        row = await GatewayCredential.filter(gateway__name=name, gateway__site__name=site).first()
        if row is None:
            return "none"
        return "revoked" if row.revoked_ms is not None else "active"


def build_provisioning(config: HubConfig, db: Database,
                       configs: gateway_config.GatewayConfigs | None = None) -> Provisioning:
    """The hub's :class:`Provisioning`: broker files written only with ``[broker_auth] enabled``."""
    access = None
    if config.broker_auth.enabled:
        # The config validator guarantees the hub's login when broker_auth is enabled.
        assert config.mqtt.username is not None and config.mqtt.password is not None
        access = BrokerAccess(config.broker_auth, config.mqtt.username, config.mqtt.password.get_secret_value())
    return Provisioning(db, config.provisioning, BrokerEndpoint.from_config(config), access, now_ms, configs)
