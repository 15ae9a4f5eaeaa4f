"""Remote configuration of gateways: the device list each gateway must run, versioned, published
to it over MQTT, and what the gateway reported back (``docs/remote-config.md``).

* Every change is a new :class:`GatewayConfigVersion` row (version 1, 2, ... per gateway) with who
  made it and when: the history is the audit trail, and the highest version is the desired one.
* :class:`GatewayConfigs` publishes the desired version as a retained
  :class:`~protocol.schema.GatewayConfigV1` (QoS 1) on ``twin/v1/{site}/{gateway}/config`` through
  the ingest's MQTT connection: at once after a change, and for every gateway again whenever that
  connection is (re)subscribed (a broker without persistence forgets retained messages).
* The gateway validates the document completely (the hub only checks its shape: the edge is the
  authority on what its configuration may contain) and answers with a ``config_applied`` or
  ``config_rejected`` event; :meth:`GatewayConfigs.on_batch` records that in
  :class:`GatewayConfigState` (applied version, rejected version, last error).

Other hub code (provisioning) uses :func:`current_config` and :func:`set_config`; like every ORM
call of the hub they run inside :meth:`hub.db.Database.activate` (API requests already do).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tortoise import fields
from tortoise.exceptions import IntegrityError
from tortoise.models import Model

from hub.db import Database
from hub.errors import RequestRefused
from hub.ingest import Ingest, now_ms
from hub.retained import GatewayKey, Publisher, RetainedPerGateway
from hub.store import EventItem, StatusItem, TelemetryItem
from protocol.ids import is_valid_name
from protocol.logs import get_logger
from protocol.schema import EventType, GatewayConfigV1, encode
from protocol.topics import config_topic

log = get_logger("hub.gateway_config")

MAX_DOCUMENT_BYTES = 65_536
"""Largest configuration document (as compact JSON) the hub accepts and publishes."""
CONFIG_KEYS = ("devices", "serial_ports")
"""The tables of ``edge.toml`` a remote configuration sets."""

"""(site, gateway)."""


class GatewayConfigVersion(Model):
    """One version of a gateway's device configuration; never changed once written."""

    id = fields.IntField(primary_key=True)
    site = fields.CharField(max_length=64)
    gateway = fields.CharField(max_length=64)
    version = fields.IntField()
    # {"devices": [...], "serial_ports": [...]} in the format of edge.toml's tables.
    document: fields.Field[dict[str, Any]] = fields.JSONField()
    changed_by = fields.CharField(max_length=128, default="")
    # Hub clock, ms since the epoch.
    changed_at_ms = fields.BigIntField()

    class Meta:
        table = "gateway_config_version"
        unique_together = (("site", "gateway", "version"),)


class GatewayConfigState(Model):
    """What a gateway last reported about its configuration (from its ``config_*`` events)."""

    id = fields.IntField(primary_key=True)
    site = fields.CharField(max_length=64)
    gateway = fields.CharField(max_length=64)
    applied_version = fields.IntField(null=True)
    # Gateway clock of the event, ms since the epoch.
    applied_at_ms = fields.BigIntField(null=True)
    rejected_version = fields.IntField(null=True)
    rejected_at_ms = fields.BigIntField(null=True)
    last_error = fields.TextField(default="")

    class Meta:
        table = "gateway_config_state"
        unique_together = (("site", "gateway"),)


class ConfigRefused(RequestRefused):
    """A configuration the hub refuses to store (``status`` 422, the message says which key)."""


@dataclass(frozen=True, slots=True)
class VersionRow:
    """One stored version (the document only where asked for)."""

    version: int
    changed_by: str
    changed_at_ms: int
    devices: int
    document: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ReportedState:
    """What the gateway reported (all ``None`` / empty before its first ``config_*`` event)."""

    applied_version: int | None = None
    applied_at_ms: int | None = None
    rejected_version: int | None = None
    rejected_at_ms: int | None = None
    last_error: str = ""


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def check_document(document: Any) -> dict[str, Any]:
    """The shape the hub insists on before storing a configuration; raises :class:`ConfigRefused`
    (422). Everything else (types, ranges, profiles) is the gateway's to check."""
    if not isinstance(document, dict):
        raise ConfigRefused(422, "the configuration must be a JSON object with 'devices' (and optionally "
                                 "'serial_ports')")
    extra = sorted(set(document) - set(CONFIG_KEYS))
    if extra:
        raise ConfigRefused(422, f"unknown key(s) {extra}: a gateway's remote configuration has only "
                                 f"{' and '.join(CONFIG_KEYS)}")
    if "devices" not in document:
        raise ConfigRefused(422, "'devices' is missing (an empty list removes every device)")
    clean: dict[str, Any] = {}
    for key in CONFIG_KEYS:
        if key not in document or (key == "serial_ports" and document[key] is None):
            continue
        items = document[key]
        if not isinstance(items, list):
            raise ConfigRefused(422, f"'{key}' must be a list of objects, not {type(items).__name__}")
        names: list[str] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ConfigRefused(422, f"{key}[{i}] must be an object, not {type(item).__name__}")
            name = item.get("name")
            if not isinstance(name, str) or not is_valid_name(name):
                raise ConfigRefused(422, f"{key}[{i}].name must be a name (1-64 letters, digits, '_' or '-'), "
                                         f"got {name!r}")
            names.append(name)
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigRefused(422, f"{key}: names must be unique; repeated: {dupes}")
        clean[key] = items
    size = len(json.dumps(clean, separators=(",", ":")).encode())
    if size > MAX_DOCUMENT_BYTES:
        raise ConfigRefused(422, f"configuration of {size} bytes exceeds the limit of {MAX_DOCUMENT_BYTES} bytes")
    return clean


# -- the stored configuration (run inside Database.activate) ---------------------------------------


async def current_config(site: str, gateway: str) -> tuple[int, dict[str, Any]] | None:
    """The desired configuration of ``site.gateway``: (version, document), or ``None`` if it never
    had one."""
    row = await (GatewayConfigVersion.filter(site=site, gateway=gateway).order_by("-version").first()
                 .values("version", "document"))
    return None if row is None else (int(row["version"]), _json(row["document"]))


async def set_config(site: str, gateway: str, document: dict[str, Any], changed_by: str,
                     *, publisher: GatewayConfigs | None = None, clock: Callable[[], int] = now_ms) -> int:
    """Store ``document`` as the new desired configuration of ``site.gateway`` and return its version;
    with ``publisher`` it is sent to the gateway at once (else at the next (re)subscription).

    Raises :class:`ConfigRefused` (422) for a document of the wrong shape. The same document as the
    current one stores nothing and returns the current version.
    """
    clean = check_document(document)
    for _ in range(5):  # two changes at once both pick max+1: the unique key lets one win, the other retries
        current = await current_config(site, gateway)
        if current is not None and current[1] == clean:
            return current[0]
        version = 1 if current is None else current[0] + 1
        try:
            await GatewayConfigVersion.create(site=site, gateway=gateway, version=version, document=clean,
                                              changed_by=changed_by[:128], changed_at_ms=clock())
        except IntegrityError:
            continue
        log.info("gateway_config_changed", site=site, gateway=gateway, version=version, by=changed_by,
                 devices=[d.get("name") for d in clean["devices"]])
        if publisher is not None:
            publisher.mark((site, gateway))
        return version
    raise ConfigRefused(409, f"the configuration of {site}.{gateway} is being changed by someone else; try again")


async def history(site: str, gateway: str, limit: int = 20) -> list[VersionRow]:
    """The newest ``limit`` versions, newest first, with who changed what when."""
    rows = await (GatewayConfigVersion.filter(site=site, gateway=gateway).order_by("-version").limit(limit)
                  .values("version", "changed_by", "changed_at_ms", "document"))
    return [VersionRow(r["version"], r["changed_by"], r["changed_at_ms"],
                       len(_json(r["document"]).get("devices", []))) for r in rows]


async def reported_state(site: str, gateway: str) -> ReportedState:
    """What the gateway last reported (applied version, rejected version, error)."""
    row = await GatewayConfigState.filter(site=site, gateway=gateway).first().values(
        "applied_version", "applied_at_ms", "rejected_version", "rejected_at_ms", "last_error")
    return ReportedState() if row is None else ReportedState(**row)


async def record_report(site: str, gateway: str, type_: str, version: int, ts_ms: int, error: str = "") -> None:
    """Record a ``config_applied`` / ``config_rejected`` event (older reports never undo newer ones)."""
    for _ in range(2):  # a first report of a gateway racing another makes create fail once
        state = await GatewayConfigState.filter(site=site, gateway=gateway).first()
        if state is None:
            try:
                state = await GatewayConfigState.create(site=site, gateway=gateway)
            except IntegrityError:
                continue
        if type_ == EventType.CONFIG_APPLIED.value:
            if state.applied_version is None or version >= state.applied_version:
                state.applied_version, state.applied_at_ms = version, ts_ms
        elif state.rejected_version is None or version >= state.rejected_version:
            state.rejected_version, state.rejected_at_ms, state.last_error = version, ts_ms, error
        await state.save()
        return


async def configured_gateways() -> list[GatewayKey]:
    """Every gateway with a stored configuration."""
    rows = await GatewayConfigVersion.all().distinct().values_list("site", "gateway")
    return sorted({(str(s), str(g)) for s, g in rows})


# -- publishing and reports -----------------------------------------------------------------------


class GatewayConfigs(RetainedPerGateway):
    """Publishes desired configurations (:meth:`mark`, :meth:`mark_all`, :meth:`run`; the mechanism:
    :class:`hub.retained.RetainedPerGateway`) and records the gateways' reports (:meth:`on_batch`)."""

    failure_event = "gateway_config_publish_failed"

    def __init__(self, db: Database, ingest: Ingest | None, clock: Callable[[], int] = now_ms) -> None:
        super().__init__(ingest)
        self.db = db
        self.clock = clock
        self.reports = 0
        """``config_*`` events recorded since start (tests wait on it)."""
        self._reports: asyncio.Queue[EventItem] = asyncio.Queue(maxsize=10_000)

    def on_batch(self, telemetry: Sequence[TelemetryItem], statuses: Sequence[StatusItem],
                 events: Sequence[EventItem]) -> None:
        """Ingest's post-commit hook: queue the ``config_*`` events (never blocks or raises)."""
        for e in events:
            if e.event.type in (EventType.CONFIG_APPLIED, EventType.CONFIG_REJECTED):
                try:
                    self._reports.put_nowait(e)
                except asyncio.QueueFull:
                    log.warning("config_report_dropped", site=e.event.site, gateway=e.event.gateway)
                self.wake()

    async def all_gateways(self) -> list[GatewayKey]:
        """Every gateway with a stored configuration."""
        with self.db.activate():
            return await configured_gateways()

    async def before_publishing(self) -> None:
        """Record the reports that arrived (before publishing, on the same task)."""
        await self._record_reports()

    async def _record_reports(self) -> None:
        while not self._reports.empty():
            e = self._reports.get_nowait().event
            version = e.details.get("version")
            if not isinstance(version, int):
                log.warning("config_report_without_version", site=e.site, gateway=e.gateway, type=e.type.value)
                continue
            error = str(e.details.get("error", e.message)) if e.type is EventType.CONFIG_REJECTED else ""
            try:
                with self.db.activate():
                    await record_report(e.site, e.gateway, e.type.value, version, e.ts, error)
            except Exception as exc:  # database away: the event itself is stored; the summary lags
                log.warning("config_report_not_recorded", site=e.site, gateway=e.gateway, error=str(exc))
                continue
            self.reports += 1
            log.info("gateway_config_reported", site=e.site, gateway=e.gateway, type=e.type.value, version=version,
                     error=error or None)

    async def publish_one(self, publisher: Publisher, site: str, gateway: str) -> GatewayConfigV1 | None:
        """Publish the desired configuration of one gateway (retained, QoS 1); ``None`` if it has none."""
        with self.db.activate():
            current = await current_config(site, gateway)
        if current is None:
            return None
        msg = GatewayConfigV1(site=site, gateway=gateway, ts=self.clock(), version=current[0], config=current[1])
        await publisher.publish(config_topic(site, gateway), encode(msg), qos=1, retain=True)
        self.published += 1
        log.info("gateway_config_published", site=site, gateway=gateway, version=current[0])
        return msg
