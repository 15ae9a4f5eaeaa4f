"""Tortoise models of stored alerts and their history (tables ``alert`` and ``alert_event``).

De-duplication lives in the database: ``alert.active_key`` holds the condition key while the alert
is open or acknowledged and NULL once it is cleared, under a UNIQUE constraint. NULLs never equal
each other there, so any number of cleared alerts of a condition are kept (history) while at most
one is not cleared — also with several hubs sharing the database.

Times are epoch milliseconds (hub clock), as everywhere in the hub database.
"""

from __future__ import annotations

from enum import StrEnum

from tortoise import fields
from tortoise.models import Model


class AlertState(StrEnum):
    """Life of an alert: open → acknowledged → cleared (or open → cleared)."""

    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    CLEARED = "cleared"


class Alert(Model):
    """One occurrence of a condition, from opening to clearing."""

    id = fields.IntField(primary_key=True)
    key = fields.CharField(max_length=300)
    """Condition key ``<rule>:<device uid | gateway id | site>``."""
    active_key = fields.CharField(max_length=300, null=True, unique=True)
    """``key`` while not cleared, NULL after: at most one open alert per condition."""
    rule = fields.CharField(max_length=64)
    type = fields.CharField(max_length=16)
    severity = fields.CharField(max_length=8)
    state = fields.CharField(max_length=16, default=AlertState.OPEN.value)
    site = fields.CharField(max_length=64, default="")
    gateway = fields.CharField(max_length=64, default="")
    device = fields.CharField(max_length=200, default="")
    """Device uid ``site.gateway.device`` ("" for gateway and site alerts)."""
    metric = fields.CharField(max_length=64, default="")
    message = fields.TextField(default="")
    opened_ms = fields.BigIntField()
    last_triggered_ms = fields.BigIntField()
    count = fields.IntField(default=1)
    """Times the condition triggered while this alert was not cleared (1 at opening)."""
    last_value = fields.FloatField(null=True)
    acknowledged_ms = fields.BigIntField(null=True)
    acknowledged_by = fields.CharField(max_length=128, null=True)
    cleared_ms = fields.BigIntField(null=True)
    cleared_by = fields.CharField(max_length=128, null=True)
    """Who cleared it; ``auto`` when the condition went back to normal."""
    notifications_sent = fields.IntField(default=0)
    notifications_suppressed = fields.IntField(default=0)

    class Meta:
        table = "alert"
        # "newest first" with or without a state filter; "alerts of a site / device".
        indexes = (("state", "opened_ms"), ("opened_ms",), ("site", "opened_ms"), ("device", "opened_ms"),
                   ("key", "opened_ms"))


class AlertEvent(Model):
    """One step in an alert's history: opened, retriggered, acknowledged, cleared, notified,
    notify_failed, suppressed."""

    id = fields.BigIntField(primary_key=True)
    alert: fields.ForeignKeyRelation[Alert] = fields.ForeignKeyField(
        "models.Alert", related_name="events", on_delete=fields.CASCADE)
    alert_id: int
    ts_ms = fields.BigIntField()
    action = fields.CharField(max_length=16)
    by = fields.CharField(max_length=128, default="")
    value = fields.FloatField(null=True)
    message = fields.TextField(default="")

    class Meta:
        table = "alert_event"
        indexes = (("alert", "ts_ms"),)
