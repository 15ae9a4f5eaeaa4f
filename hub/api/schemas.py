"""Response models of the REST API (they also shape the OpenAPI document at ``/docs``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, Field

from hub.status import Status

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Value = float | bool | str | None


def iso_ms(ms: int | None) -> str | None:
    """Epoch milliseconds as ISO 8601 UTC with millisecond precision, e.g. ``2024-05-01T12:00:00.250Z``."""
    if ms is None:
        return None
    return (_EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_ms(dt: datetime) -> int:
    """A datetime (naive means UTC) as epoch milliseconds."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // timedelta(milliseconds=1)


class DeviceOut(BaseModel):
    """A device as listed by ``GET /api/v1/devices``."""

    id: str = Field(description="Device uid `site.gateway.device`", examples=["plant1.gw1.boiler1"])
    kind: str = Field(description="boiler | meter | tank")
    site: str
    gateway: str
    name: str = Field(description="Device name, unique per gateway")
    profile: str
    status: Status
    last_seen: str | None = Field(description="Newest reading time, ISO 8601 UTC (null before the first)")
    first_seen: str | None


class LatestValue(BaseModel):
    """The newest reading of one metric."""

    value: Value
    unit: str
    ts: str | None
    quality: str
    seq: int


class LatestOut(BaseModel):
    """``GET /api/v1/devices/{id}/latest``: newest value of each metric, keyed by metric name."""

    id: str
    metrics: dict[str, LatestValue]


class ReadingOut(BaseModel):
    """One reading of ``GET /api/v1/devices/{id}/readings``."""

    ts: str | None = Field(description="ISO 8601 UTC")
    metric: str
    value: Value
    unit: str
    quality: str
    seq: int


class GatewayOut(BaseModel):
    """A gateway as listed by ``GET /api/v1/gateways``."""

    id: str = Field(description="`site.gateway`")
    site: str
    gateway: str
    state: Literal["online", "offline", "unknown"] = Field(
        description="What the gateway's retained status topic says (unknown: no status seen yet)")
    status: Status = Field(description="state combined with data freshness")
    last_seen: str | None = Field(description="When the hub last received telemetry from it (hub clock)")
    state_since: str | None = Field(description="Timestamp of the status message (gateway clock)")
    backlog: int = Field(description="Readings waiting in the gateway's buffer, as last reported")
    readings_dropped: int = Field(
        description="Readings the gateway dropped from its buffer unsent: sum over its stored events")
    devices: int
    agent_version: str


class EventOut(BaseModel):
    """One event of ``GET /api/v1/gateways/{id}/events``."""

    ts: str | None = Field(description="When it happened, ISO 8601 UTC (gateway clock)")
    type: str = Field(description="buffer_thinned | buffer_corrupt | buffer_full")
    message: str
    readings_dropped: int = Field(description="Readings removed from the buffer by this event")
    details: dict[str, int | float | str]
    received: str | None = Field(description="When the hub received it, ISO 8601 UTC (hub clock)")


class DatabaseHealth(BaseModel):
    """Database part of the health report."""

    connected: bool
    backend: str
    url: str


class BrokerHealth(BaseModel):
    """Broker part of the health report."""

    connected: bool
    state: Literal["connected", "disconnected", "disabled"]
    host: str | None = None
    port: int | None = None
    error: str | None = None


class HealthOut(BaseModel):
    """``GET /api/v1/health``."""

    status: Literal["ok", "degraded"]
    version: str
    uptime_s: float
    database: DatabaseHealth
    broker: BrokerHealth
    ingest: dict[str, Any] = Field(default_factory=dict, description="Ingest counters since start")
