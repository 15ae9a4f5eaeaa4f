"""``[provisioning]`` and ``[broker_auth]`` sections of ``hub.toml`` (``docs/security.md``, ``docs/hub.md``).

Kept apart from :mod:`hub.provisioning` and :mod:`hub.broker_access` so that :mod:`hub.config` can
import them without the ORM models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ProvisioningConfig(BaseModel):
    """``[provisioning]``: claim codes and what a provisioned gateway is told about the broker."""

    model_config = ConfigDict(extra="forbid")

    claim_code_ttl_s: Annotated[int, Field(ge=60, le=30 * 86_400)] = 86_400
    """How long a claim code can be used after it was issued."""
    claim_attempts_per_minute: Annotated[int, Field(ge=1, le=10_000)] = 10
    """``POST /api/v1/provision`` attempts per client address and minute (wrong codes included)."""
    mqtt_host: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    """Broker host name gateways connect to (default: ``[mqtt] host``, which is right only when the
    hub and the gateways reach the broker by the same name)."""
    mqtt_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """Broker port for gateways (default: ``[mqtt] port``)."""
    mqtt_tls: bool | None = None
    """Tell gateways to use TLS (default: ``[mqtt] tls``)."""
    mqtt_ca_file: Path | None = None
    """PEM CA certificate sent to gateways to verify the broker with (default: ``[mqtt] ca_file``
    when TLS is on; unset: gateways use their system trust store)."""


class BrokerAuthConfig(BaseModel):
    """``[broker_auth]``: the hub writes Mosquitto's password and ACL files and reloads it."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    """Off: the hub writes no broker files (a broker that allows anonymous clients, the demo)."""
    password_file: Path | None = None
    """Mosquitto's ``password_file``; the hub owns it and rewrites it whole (mode 0640)."""
    acl_file: Path | None = None
    """Mosquitto's ``acl_file``; the hub owns it and rewrites it whole (mode 0640)."""
    reload_pid_file: Path | None = None
    """A file holding Mosquitto's pid; the hub sends that process SIGHUP after writing the files."""
    reload_command: Annotated[str, Field(max_length=1000)] | None = None
    """A command run (without a shell) after writing the files, e.g. ``systemctl reload mosquitto``."""
    file_group: Annotated[str, Field(max_length=64)] | None = None
    """Group given to both files (e.g. ``mosquitto``) so a broker running as another user can read them."""

    @model_validator(mode="after")
    def _complete(self) -> BrokerAuthConfig:
        if self.enabled:
            if self.password_file is None or self.acl_file is None:
                raise ValueError("enabled needs password_file and acl_file")
            if self.reload_pid_file is None and self.reload_command is None:
                raise ValueError("enabled needs reload_pid_file or reload_command (how to tell Mosquitto)")
        if self.reload_pid_file is not None and self.reload_command is not None:
            raise ValueError("set reload_pid_file or reload_command, not both")
        return self


