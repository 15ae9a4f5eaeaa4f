"""Tortoise ORM models of the hub database.

Times are integer milliseconds since the Unix epoch (UTC), exactly as they travel in the
protocol, so no timezone or precision is lost on the way through the database; the API turns
them into ISO 8601 strings.
"""

from __future__ import annotations

from tortoise import fields
from tortoise.models import Model


class Site(Model):
    """A plant or building; created when a gateway of it first reports."""

    id = fields.IntField(primary_key=True)
    name = fields.CharField(max_length=64, unique=True)
    first_seen_ms = fields.BigIntField()

    class Meta:
        table = "site"


class Gateway(Model):
    """An edge gateway; gateway names are unique per site only."""

    id = fields.IntField(primary_key=True)
    site: fields.ForeignKeyRelation[Site] = fields.ForeignKeyField(
        "models.Site", related_name="gateways", on_delete=fields.CASCADE)
    site_id: int
    name = fields.CharField(max_length=64)
    # State announced on the retained status topic (online / offline), "unknown" until one arrives.
    state = fields.CharField(max_length=16, default="unknown")
    # Gateway clock time of that status message (statuses are applied in arrival order).
    state_ts_ms = fields.BigIntField(null=True)
    agent_version = fields.CharField(max_length=32, default="")
    backlog = fields.BigIntField(default=0)
    first_seen_ms = fields.BigIntField()
    # Hub clock time of the last telemetry message from this gateway.
    last_seen_ms = fields.BigIntField(null=True)
    # Anomaly models the gateway reports running, per device profile, from its last "online"
    # status (StatusV1.models): {profile: {name, version, sha256, state, error}}.
    reported_models: fields.Field[dict[str, dict[str, str | int]]] = fields.JSONField(default=dict)

    class Meta:
        table = "gateway"
        unique_together = (("site", "name"),)


class Device(Model):
    """A boiler, meter or tank behind a gateway; its uid is ``site.gateway.name``."""

    id = fields.IntField(primary_key=True)
    gateway: fields.ForeignKeyRelation[Gateway] = fields.ForeignKeyField(
        "models.Gateway", related_name="devices", on_delete=fields.CASCADE)
    gateway_id: int
    name = fields.CharField(max_length=64)
    kind = fields.CharField(max_length=16)
    profile = fields.CharField(max_length=64, default="")
    first_seen_ms = fields.BigIntField()
    # Timestamp of the newest reading stored for this device, capped at the hub's clock when it
    # arrived (a gateway clock running ahead must not keep a device "online" forever).
    last_seen_ms = fields.BigIntField(null=True)

    class Meta:
        table = "device"
        unique_together = (("gateway", "name"),)


class Reading(Model):
    """One stored reading. ``(device, seq)`` is unique: redelivered batches are ignored.

    Numbers (and booleans, as 0/1) go to ``value``; strings go to ``value_text``. A boolean keeps
    ``value_text`` = ``"true"``/``"false"`` as well so the API can give it back as a boolean.
    """

    id = fields.BigIntField(primary_key=True)
    device: fields.ForeignKeyRelation[Device] = fields.ForeignKeyField(
        "models.Device", related_name="readings", on_delete=fields.CASCADE)
    device_id: int
    metric = fields.CharField(max_length=64)
    seq = fields.BigIntField()
    ts_ms = fields.BigIntField()
    value = fields.FloatField(null=True)
    value_text = fields.TextField(null=True)
    unit = fields.CharField(max_length=16, default="")
    quality = fields.CharField(max_length=8, default="good")

    class Meta:
        table = "reading"
        unique_together = (("device", "seq"),)
        # (device, metric, ts_ms): "readings of one metric in a time range" and "latest value per
        # metric"; (device, ts_ms): a time range over all metrics. Both are nearly append-only
        # (timestamps grow), so they cost little at insert time (measured: ~1%).
        indexes = (("device", "metric", "ts_ms"), ("device", "ts_ms"))


class GatewayEvent(Model):
    """Something a gateway reported that is not a reading (buffer thinned/corrupt/full, anomaly
    started/cleared, model activated/rejected/rolled back).

    ``(gateway, ts_ms, type, device)`` is unique: a QoS 1 redelivery, a gateway resending, or two
    hubs storing the same message keep one row (the first stored wins), while two devices of one
    gateway may start an anomaly in the same millisecond.
    """

    id = fields.BigIntField(primary_key=True)
    gateway: fields.ForeignKeyRelation[Gateway] = fields.ForeignKeyField(
        "models.Gateway", related_name="events", on_delete=fields.CASCADE)
    gateway_id: int
    # Gateway clock time of the event.
    ts_ms = fields.BigIntField()
    type = fields.CharField(max_length=32)
    # Name of the device the event is about (EventV1.device, anomaly events), "" when none: part
    # of the unique key, where a NULL would never equal another NULL and break deduplication.
    device = fields.CharField(max_length=64, default="")
    message = fields.TextField(default="")
    # Readings the gateway removed from its buffer without sending them.
    readings_dropped = fields.BigIntField(default=0)
    details: fields.Field[dict[str, int | float | str]] = fields.JSONField(default=dict)
    # Hub clock time when the event arrived.
    received_ms = fields.BigIntField()

    class Meta:
        table = "gateway_event"
        # Also the index of "events of one gateway, newest first" (gateway_id, ts_ms DESC).
        # hub.migrate creates the same constraint (same name) in a database of the earlier schema.
        unique_together = (("gateway", "ts_ms", "type", "device"),)
        # "Anomaly events of one device, newest first" and "latest anomaly event per device".
        indexes = (("gateway", "device", "ts_ms"),)
