"""Anomaly-model registry and rollout: store uploaded versions, assign them to device profiles
(fleet-wide or per gateway), and tell every affected gateway over MQTT.

Rollout flow (``docs/hub.md``, "Anomaly models"):

1. ``POST /api/v1/models`` stores a checked ONNX file (:mod:`hub.modelfile`) as a
   :class:`~hub.registry.ModelVersion`.
2. ``PUT /api/v1/model-assignments`` records a :class:`~hub.registry.ModelAssignment` and marks
   the affected gateways (all known gateways for a fleet-wide one).
3. :class:`Rollout` publishes, for each marked gateway, its *complete* assignment list — per
   profile the gateway's own assignment if it has one, else the fleet-wide one — as a retained
   :class:`~protocol.schema.ModelAssignmentV1` with QoS 1 on ``twin/v1/{site}/{gateway}/models``.
   The list is computed from the database when it is published, so a burst of changes ends with
   the latest state, and a failed publish is simply retried.
4. The gateway downloads ``<public_url>/api/v1/models/{name}/{version}/file``, checks ``sha256``
   and reports what it runs in its status (``StatusV1.models``), shown by
   ``GET /api/v1/gateways/{id}/models``.

Every known gateway is published again whenever the hub's MQTT connection is (re)subscribed (hub
start, broker restart: a broker without persistence forgets retained messages), and a gateway the
hub creates (its first status, telemetry or event) is published at once, so it gets the
fleet-wide assignments.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tortoise.exceptions import IntegrityError

from hub.db import Database
from hub.errors import RequestRefused
from hub.metrics import HubMetrics
from hub.modelfile import CheckedModel
from hub.models import Gateway
from hub.queries import GatewayRef
from hub.registry import FLEET_SCOPE, ModelAssignment, ModelVersion
from hub.retained import GatewayKey, Publisher, RetainedPerGateway
from protocol.anomaly import card_json, sha256_of
from protocol.logs import get_logger
from protocol.schema import ModelAssignmentItemV1, ModelAssignmentV1, encode
from protocol.topics import models_topic

log = get_logger("hub.rollout")

"""(site, gateway)."""

_VERSION_FIELDS = ("name", "version", "profile", "sha256", "size", "card", "uploaded_ms", "uploaded_by")
_ASSIGNMENT_FIELDS = ("profile", "scope", "assigned_ms", "assigned_by", "model__name", "model__version",
                      "model__profile", "model__sha256", "model__size")


class RegistryError(RequestRefused):
    """A registry request that cannot be done (``status``, ``message``: see :class:`RequestRefused`)."""


@dataclass(frozen=True, slots=True)
class VersionRow:
    """A stored model version (without its bytes)."""

    name: str
    version: int
    profile: str
    sha256: str
    size: int
    card: dict[str, Any]
    uploaded_ms: int
    uploaded_by: str


@dataclass(frozen=True, slots=True)
class AssignmentRow:
    """An assignment with the model version it names."""

    profile: str
    gateway: str | None
    """Gateway id ``site.gateway``, ``None`` for fleet-wide."""
    name: str
    version: int
    sha256: str
    size: int
    assigned_ms: int
    assigned_by: str


def file_path(name: str, version: int) -> str:
    """Path of a model file under the API (names are URL-safe by construction)."""
    return f"/api/v1/models/{name}/{version}/file"


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def _version(row: dict[str, Any]) -> VersionRow:
    return VersionRow(row["name"], row["version"], row["profile"], row["sha256"], row["size"], _json(row["card"]),
                      row["uploaded_ms"], row["uploaded_by"])


def _assignment(row: dict[str, Any]) -> AssignmentRow:
    scope = row["scope"]
    return AssignmentRow(row["profile"], None if scope == FLEET_SCOPE else scope, row["model__name"],
                         row["model__version"], row["model__sha256"], row["model__size"], row["assigned_ms"],
                         row["assigned_by"])


# -- model versions ---------------------------------------------------------------------------


async def save_version(db: Database, checked: CheckedModel, data: bytes, uploaded_by: str,
                       now_ms: int) -> tuple[VersionRow, bool]:
    """Store a checked model file; returns the stored version and whether it is new.

    The same bytes under an existing (name, version) are the same version (idempotent); other bytes
    raise :class:`RegistryError` 409: a version is immutable once gateways may have fetched it.
    """
    card = checked.card
    with db.activate():
        existing = await get_version(db, card.name, card.version)
        if existing is None:
            try:
                await ModelVersion.create(
                    name=card.name, version=card.version, profile=card.profile, sha256=checked.sha256,
                    size=checked.size, card=json.loads(card_json(card)), data=data, uploaded_ms=now_ms,
                    uploaded_by=uploaded_by)
                log.info("model_uploaded", name=card.name, version=card.version, profile=card.profile,
                         sha256=checked.sha256, size=checked.size, by=uploaded_by)
                created = await get_version(db, card.name, card.version)
                assert created is not None
                return created, True
            except IntegrityError:  # the same (name, version) stored a moment ago by another request
                existing = await get_version(db, card.name, card.version)
                if existing is None:
                    raise
    if existing.sha256 != checked.sha256:
        raise RegistryError(409, f"model {card.name} v{card.version} already exists with different content "
                                 f"(stored sha256 {existing.sha256}, uploaded {checked.sha256}); "
                                 "give the new file a new version")
    return existing, False


async def get_version(db: Database, name: str, version: int) -> VersionRow | None:
    """The stored version ``name`` v``version``, or ``None``."""
    with db.activate():
        row = await ModelVersion.filter(name=name, version=version).first().values(*_VERSION_FIELDS)
    return _version(row) if row else None


async def list_versions(db: Database, name: str | None = None, profile: str | None = None,
                        limit: int = 100) -> list[VersionRow]:
    """Stored versions, newest upload first (then highest version), at most ``limit``."""
    with db.activate():
        q = ModelVersion.all()
        if name is not None:
            q = q.filter(name=name)
        if profile is not None:
            q = q.filter(profile=profile)
        rows = await q.order_by("-uploaded_ms", "-version", "-id").limit(limit).values(*_VERSION_FIELDS)
    return [_version(r) for r in rows]


class _FileCache:
    """The last few model files by sha256: a fleet-wide rollout has every gateway download the
    same file, which then comes from memory instead of a 2 MB database read each. Keyed by content
    hash, so it can never serve other bytes than the database holds under that hash."""

    def __init__(self, entries: int = 8) -> None:
        self.entries = entries
        self._files: OrderedDict[str, bytes] = OrderedDict()

    def get(self, sha256: str) -> bytes | None:
        data = self._files.get(sha256)
        if data is not None:
            self._files.move_to_end(sha256)
        return data

    def put(self, sha256: str, data: bytes) -> None:
        self._files[sha256] = data
        self._files.move_to_end(sha256)
        while len(self._files) > self.entries:
            self._files.popitem(last=False)


FILE_CACHE = _FileCache()


async def version_file(db: Database, name: str, version: int) -> tuple[bytes, str] | None:
    """The bytes and sha256 of a stored version, or ``None``."""
    with db.activate():
        row = await ModelVersion.filter(name=name, version=version).first().values("sha256")
        if row is None:
            return None
        sha = row["sha256"]
        data = FILE_CACHE.get(sha)
        if data is None:
            blob = await ModelVersion.filter(name=name, version=version).first().values("data")
            if blob is None:  # deleted in between
                return None
            data = bytes(blob["data"])
            if sha256_of(data) != sha:
                raise RuntimeError(f"stored model {name} v{version} does not match its sha256")
            FILE_CACHE.put(sha, data)
    return data, sha


# -- assignments ------------------------------------------------------------------------------


def _scope(gateway: GatewayRef | None) -> str:
    return FLEET_SCOPE if gateway is None else gateway.uid


async def assign(db: Database, profile: str, name: str, version: int, gateway: GatewayRef | None,
                 assigned_by: str, now_ms: int) -> AssignmentRow:
    """Assign ``name`` v``version`` to the devices of ``profile`` (of ``gateway``, or fleet-wide),
    replacing what was assigned there. :class:`RegistryError` 404 for an unknown version, 422 when
    the model is made for another profile."""
    scope = _scope(gateway)
    with db.activate():
        model = await ModelVersion.filter(name=name, version=version).first().values("id", "profile")
        if model is None:
            raise RegistryError(404, f"unknown model {name!r} v{version}")
        if model["profile"] != profile:
            raise RegistryError(422, f"model {name} v{version} is made for profile {model['profile']!r}, "
                                     f"not {profile!r}")
        values = {"model_id": model["id"], "gateway_id": None if gateway is None else gateway.pk,
                  "assigned_ms": now_ms, "assigned_by": assigned_by}
        for _ in range(2):  # a concurrent first assignment of the same (profile, scope) makes create fail
            if await ModelAssignment.filter(profile=profile, scope=scope).update(**values):
                break
            try:
                await ModelAssignment.create(profile=profile, scope=scope, **values)
                break
            except IntegrityError:
                continue
        row = await ModelAssignment.filter(profile=profile, scope=scope).first().values(*_ASSIGNMENT_FIELDS)
    log.info("model_assigned", profile=profile, scope=scope, name=name, version=version, by=assigned_by)
    assert row is not None
    return _assignment(row)


async def unassign(db: Database, profile: str, gateway: GatewayRef | None) -> AssignmentRow | None:
    """Remove the assignment of ``profile`` (of ``gateway``, or the fleet-wide one); returns what
    was removed, ``None`` when there was none."""
    scope = _scope(gateway)
    with db.activate():
        row = await ModelAssignment.filter(profile=profile, scope=scope).first().values(*_ASSIGNMENT_FIELDS)
        if row is None:
            return None
        await ModelAssignment.filter(profile=profile, scope=scope).delete()
    log.info("model_unassigned", profile=profile, scope=scope)
    return _assignment(row)


async def list_assignments(db: Database, profile: str | None = None,
                           gateway: GatewayRef | None = None) -> list[AssignmentRow]:
    """Assignments ordered by profile, fleet-wide first; only of ``profile`` / only ``gateway``'s
    own (not the fleet-wide ones it inherits) when given."""
    with db.activate():
        q = ModelAssignment.all()
        if profile is not None:
            q = q.filter(profile=profile)
        if gateway is not None:
            q = q.filter(scope=gateway.uid)
        rows = await q.values(*_ASSIGNMENT_FIELDS)
    out = [_assignment(r) for r in rows]
    out.sort(key=lambda a: (a.profile, a.gateway is not None, a.gateway or ""))
    return out


async def effective_assignments(db: Database, site: str, gateway: str) -> list[AssignmentRow]:
    """What gateway ``site.gateway`` must run, one per profile (its own assignment beats the
    fleet-wide one), ordered by profile."""
    uid = f"{site}.{gateway}"
    with db.activate():
        rows = await ModelAssignment.filter(scope__in=[FLEET_SCOPE, uid]).values(*_ASSIGNMENT_FIELDS)
    chosen: dict[str, AssignmentRow] = {}
    for r in sorted(rows, key=lambda r: r["scope"] != FLEET_SCOPE):  # fleet-wide first, overridden after
        chosen[r["profile"]] = _assignment(r)
    return [chosen[p] for p in sorted(chosen)]


async def known_gateways(db: Database) -> list[GatewayKey]:
    """Every gateway in the database as (site, gateway), ordered."""
    with db.activate():
        rows = await Gateway.all().order_by("site__name", "name").values_list("site__name", "name")
    return [(site, name) for site, name in rows]


async def affected_gateways(db: Database, gateway: GatewayRef | None) -> list[GatewayKey]:
    """Gateways whose assignment list changes with an assignment of ``gateway`` (``None``: all)."""
    if gateway is not None:
        return [(gateway.site, gateway.name)]
    return await known_gateways(db)


DownloadSigner = Callable[[str, str, str, int], str]
"""``(site, gateway, model name, version) -> capability`` appended to the URL as ``?access=``."""


def assignment_message(site: str, gateway: str, rows: list[AssignmentRow], base_url: str,
                       ts_ms: int, sign: DownloadSigner | None = None) -> ModelAssignmentV1:
    """The retained message telling ``site/gateway`` to run ``rows``; with ``sign``, each URL
    carries that gateway's download capability (the API requires one, or a staff login)."""
    def url(r: AssignmentRow) -> str:
        plain = base_url + file_path(r.name, r.version)
        return plain if sign is None else f"{plain}?access={sign(site, gateway, r.name, r.version)}"

    return ModelAssignmentV1(site=site, gateway=gateway, ts=ts_ms, models=[
        ModelAssignmentItemV1(profile=r.profile, name=r.name, version=r.version, sha256=r.sha256, size=r.size,
                              url=url(r))
        for r in rows])


# -- publishing -------------------------------------------------------------------------------


class Rollout(RetainedPerGateway):
    """Publishes gateways' model assignments: :meth:`mark` the changed ones, :meth:`run` sends
    (the mechanism: :class:`hub.retained.RetainedPerGateway`)."""

    failure_event = "assignments_publish_failed"

    def __init__(self, db: Database, publisher: Publisher | None, base_url: Callable[[], str],
                 metrics: HubMetrics, clock: Callable[[], int]) -> None:
        super().__init__(publisher)
        self.db = db
        self.base_url = base_url
        self.metrics = metrics
        self.clock = clock
        self.sign: DownloadSigner | None = None
        """Signs download URLs (set by the hub once its token secret is known)."""

    async def all_gateways(self) -> list[GatewayKey]:
        """Every gateway the hub knows."""
        return await known_gateways(self.db)

    def publish_failed(self) -> None:
        """Counted in ``twin_hub_model_assignments_publish_failures``."""
        self.metrics.assignment_publish_failed()

    async def publish_one(self, publisher: Publisher, site: str, gateway: str) -> ModelAssignmentV1:
        """Compute and publish one gateway's retained assignment list; returns the message."""
        rows = await effective_assignments(self.db, site, gateway)
        message = assignment_message(site, gateway, rows, self.base_url(), self.clock(), self.sign)
        await publisher.publish(models_topic(site, gateway), encode(message), qos=1, retain=True)
        self.published += 1
        self.metrics.assignment_published()
        log.info("assignments_published", site=site, gateway=gateway,
                 models=[f"{m.profile}={m.name}:v{m.version}" for m in message.models])
        return message
