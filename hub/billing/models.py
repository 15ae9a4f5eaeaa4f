"""Tortoise ORM tables of billing: tariffs with their bands, tariff assignments, manual readings.

They belong to the app ``models`` with the fleet tables (``hub.db.MODELS_MODULES``), so they can
refer to devices and sites. Money and rates are ``DECIMAL`` columns (exact; strings in SQLite),
never floats. Times are epoch ms (UTC) as everywhere in the hub.
"""

from __future__ import annotations

from decimal import Decimal

from tortoise import fields
from tortoise.models import Model

from hub.models import Device, Site


class Tariff(Model):
    """A tariff; ``name`` is unique and never reused for other terms (create a new tariff instead)."""

    id = fields.IntField(primary_key=True)
    name = fields.CharField(max_length=64, unique=True)
    currency = fields.CharField(max_length=3)
    timezone = fields.CharField(max_length=64)
    vat_rate: Decimal = fields.DecimalField(max_digits=7, decimal_places=4)
    standing_charge_per_day: Decimal = fields.DecimalField(
        max_digits=14, decimal_places=6)
    effective_from_ms = fields.BigIntField()
    created_ms = fields.BigIntField()
    created_by = fields.CharField(max_length=128, default="")

    class Meta:
        table = "tariff"


class TariffBand(Model):
    """A rate over local minutes ``[start_minute, end_minute)`` of days of type ``days``
    (see :class:`hub.billing.tariffs.Band`)."""

    id = fields.IntField(primary_key=True)
    tariff: fields.ForeignKeyRelation[Tariff] = fields.ForeignKeyField(
        "models.Tariff", related_name="bands", on_delete=fields.CASCADE)
    tariff_id: int
    position = fields.IntField()
    name = fields.CharField(max_length=64)
    rate: Decimal = fields.DecimalField(max_digits=14, decimal_places=6)
    start_minute = fields.IntField()
    end_minute = fields.IntField()
    days = fields.CharField(max_length=8)

    class Meta:
        table = "tariff_band"
        unique_together = (("tariff", "name"),)


class TariffAssignment(Model):
    """``tariff`` applies to one meter (``device``) or every meter of a site from ``effective_from_ms``
    until the next assignment of the same target. ``(target, effective_from_ms)`` is unique, with
    ``target`` = ``meter:<uid>`` or ``site:<name>`` (a key over two nullable columns would not be)."""

    id = fields.IntField(primary_key=True)
    target = fields.CharField(max_length=200)
    tariff: fields.ForeignKeyRelation[Tariff] = fields.ForeignKeyField(
        "models.Tariff", related_name="assignments", on_delete=fields.RESTRICT)
    tariff_id: int
    device: fields.ForeignKeyNullableRelation[Device] = fields.ForeignKeyField(
        "models.Device", related_name="tariff_assignments", on_delete=fields.CASCADE, null=True)
    device_id: int | None
    site: fields.ForeignKeyNullableRelation[Site] = fields.ForeignKeyField(
        "models.Site", related_name="tariff_assignments", on_delete=fields.CASCADE, null=True)
    site_id: int | None
    effective_from_ms = fields.BigIntField()
    created_ms = fields.BigIntField()
    created_by = fields.CharField(max_length=128, default="")

    class Meta:
        table = "tariff_assignment"
        unique_together = (("target", "effective_from_ms"),)


class ManualReading(Model):
    """A register reading (kWh) submitted by a person; ``replacement`` marks the first reading of a
    new meter (``serial``). ``(device, ts_ms)`` is unique."""

    id = fields.IntField(primary_key=True)
    device: fields.ForeignKeyRelation[Device] = fields.ForeignKeyField(
        "models.Device", related_name="manual_readings", on_delete=fields.CASCADE)
    device_id: int
    ts_ms = fields.BigIntField()
    value: Decimal = fields.DecimalField(max_digits=16, decimal_places=3)
    replacement = fields.BooleanField(default=False)
    serial = fields.CharField(max_length=64, default="")
    submitted_by = fields.CharField(max_length=128, default="")
    created_ms = fields.BigIntField()

    class Meta:
        table = "manual_reading"
        unique_together = (("device", "ts_ms"),)


class StatementCounter(Model):
    """The last statement number issued in a year (one row per year). A close increments it inside
    its transaction (``UPDATE ... SET last_number = last_number + 1``), which locks the row until commit: numbers
    are gap-free and never issued twice, and closes are serialised."""

    year = fields.IntField(primary_key=True)
    last_number = fields.IntField(default=0)

    class Meta:
        table = "statement_counter"


class Statement(Model):
    """A closed billing period: immutable apart from ``status``/``paid_ms`` (payment) and the
    ``sent_ms``/``send_attempts``/``send_error`` of its e-mail. ``document`` is the canonical JSON of
    the statement and ``content_hash`` its SHA-256."""

    id = fields.IntField(primary_key=True)
    number = fields.CharField(max_length=32, unique=True)
    target = fields.CharField(max_length=200)
    """``meter:<uid>`` or ``site:<name>``."""
    site = fields.CharField(max_length=64)
    """The site of the meter (or the site itself): overlap checks look at every statement of a site."""
    since_ms = fields.BigIntField()
    until_ms = fields.BigIntField()
    currency = fields.CharField(max_length=3)
    total: Decimal = fields.DecimalField(max_digits=16, decimal_places=4)
    document = fields.TextField()
    content_hash = fields.CharField(max_length=64)
    issued_ms = fields.BigIntField()
    issued_by = fields.CharField(max_length=128, default="")
    status = fields.CharField(max_length=16, default="issued")
    paid_ms = fields.BigIntField(null=True)
    sent_ms = fields.BigIntField(null=True)
    send_attempts = fields.IntField(default=0)
    send_error = fields.CharField(max_length=500, default="")

    class Meta:
        table = "statement"
        unique_together = (("target", "since_ms", "until_ms"),)


class Payment(Model):
    """A payment of a statement reported by a provider; ``(provider, event_id)`` is unique, so a
    webhook delivered twice records one payment."""

    id = fields.IntField(primary_key=True)
    statement: fields.ForeignKeyRelation[Statement] = fields.ForeignKeyField(
        "models.Statement", related_name="payments", on_delete=fields.RESTRICT)
    statement_id: int
    provider = fields.CharField(max_length=32)
    event_id = fields.CharField(max_length=255)
    reference = fields.CharField(max_length=255, default="")
    """The provider's id of the payment (e.g. the Stripe Checkout Session id)."""
    amount: Decimal = fields.DecimalField(max_digits=16, decimal_places=4)
    currency = fields.CharField(max_length=3)
    created_ms = fields.BigIntField()

    class Meta:
        table = "payment"
        unique_together = (("provider", "event_id"),)
