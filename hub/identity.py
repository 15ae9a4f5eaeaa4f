"""Tortoise models of gateway identities: one-time claim codes and broker credentials.

New tables only (the fleet tables in :mod:`hub.models` are not changed): a gateway row exists
before it is provisioned (a technician creates it) or appears when it first reports.
Secrets are never stored: a claim code is kept as its SHA-256, a broker password as the
Mosquitto password-file hash (:mod:`hub.broker_access`).
"""

from __future__ import annotations

from tortoise import fields
from tortoise.models import Model

from hub.models import Gateway


class ClaimCode(Model):
    """A one-time code with which a gateway fetches its identity (``POST /api/v1/provision``)."""

    id = fields.IntField(primary_key=True)
    gateway: fields.ForeignKeyRelation[Gateway] = fields.ForeignKeyField(
        "models.Gateway", related_name="claim_codes", on_delete=fields.CASCADE)
    gateway_id: int
    # SHA-256 (hex) of the code as typed, without its separators: the code is looked up by hash,
    # so no comparison ever runs over the secret itself.
    code_hash = fields.CharField(max_length=64, unique=True)
    created_ms = fields.BigIntField()
    created_by = fields.CharField(max_length=64, default="")
    expires_ms = fields.BigIntField()
    # Set in the transaction that issues the credentials; a code with used_ms is refused.
    used_ms = fields.BigIntField(null=True)
    used_from = fields.CharField(max_length=64, default="")
    # Set when a fresh code for the same gateway replaced this one before it was used.
    invalidated_ms = fields.BigIntField(null=True)

    class Meta:
        table = "claim_code"
        indexes = (("gateway", "created_ms"),)


class GatewayCredential(Model):
    """A gateway's broker login; one row per gateway, replaced by every provisioning."""

    id = fields.IntField(primary_key=True)
    gateway: fields.OneToOneRelation[Gateway] = fields.OneToOneField(
        "models.Gateway", related_name="credential", on_delete=fields.CASCADE)
    gateway_id: int
    username = fields.CharField(max_length=128, unique=True)
    # Mosquitto 2.x password-file hash ($7$: PBKDF2-SHA512), written to the broker's password file as is.
    password_hash = fields.CharField(max_length=255)
    issued_ms = fields.BigIntField()
    issued_by = fields.CharField(max_length=64, default="")
    """Who created the claim code the credentials were issued with."""
    revoked_ms = fields.BigIntField(null=True)
    revoked_by = fields.CharField(max_length=64, default="")

    class Meta:
        table = "gateway_credential"
