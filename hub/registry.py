"""Tortoise ORM models of the anomaly-model registry: uploaded model versions and their assignments.

A :class:`ModelVersion` is one ONNX file (at most :data:`protocol.anomaly.MAX_MODEL_BYTES`) with
its model card, kept in the database itself: backups then cover the models, and several hubs
sharing one database serve the same files. A :class:`ModelAssignment` says which version the
devices of one profile run, fleet-wide or on one gateway (a gateway's own assignment beats the
fleet-wide one). The logic around them is in :mod:`hub.rollout`.
"""

from __future__ import annotations

from typing import Any

from tortoise import fields
from tortoise.models import Model

from hub.models import Gateway

FLEET_SCOPE = "*"
"""``ModelAssignment.scope`` of a fleet-wide assignment; a gateway's is its id ``site.gateway``."""


class ModelVersion(Model):
    """One uploaded model file, immutable once stored; ``(name, version)`` is unique."""

    id = fields.IntField(primary_key=True)
    name = fields.CharField(max_length=64)
    version = fields.IntField()
    profile = fields.CharField(max_length=64)
    sha256 = fields.CharField(max_length=64)
    size = fields.IntField()
    # The model card (protocol.anomaly.ModelCard as JSON) with ``sha256`` filled in.
    card: fields.Field[dict[str, Any]] = fields.JSONField()
    # The ONNX file itself (BLOB / BYTEA).
    data = fields.BinaryField()
    # Hub clock, ms since the epoch.
    uploaded_ms = fields.BigIntField()
    # The signed-in user who uploaded it.
    uploaded_by = fields.CharField(max_length=128, default="")

    class Meta:
        table = "model_version"
        unique_together = (("name", "version"),)
        indexes = (("profile",),)


class ModelAssignment(Model):
    """A model version assigned to a device profile, fleet-wide or for one gateway.

    ``(profile, scope)`` is unique, with ``scope`` = ``"*"`` for fleet-wide (``gateway`` null) or
    the gateway's id ``site.gateway``: a unique key over the nullable ``gateway_id`` would let two
    fleet-wide rows in (NULLs never collide).
    """

    id = fields.IntField(primary_key=True)
    profile = fields.CharField(max_length=64)
    scope = fields.CharField(max_length=129)
    gateway: fields.ForeignKeyNullableRelation[Gateway] = fields.ForeignKeyField(
        "models.Gateway", related_name="model_assignments", on_delete=fields.CASCADE, null=True)
    gateway_id: int | None
    model: fields.ForeignKeyRelation[ModelVersion] = fields.ForeignKeyField(
        "models.ModelVersion", related_name="assignments", on_delete=fields.RESTRICT)
    model_id: int
    # Hub clock, ms since the epoch.
    assigned_ms = fields.BigIntField()
    assigned_by = fields.CharField(max_length=128, default="")

    class Meta:
        table = "model_assignment"
        unique_together = (("profile", "scope"),)
