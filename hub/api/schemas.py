"""Response models of the REST API (they also shape the OpenAPI document at ``/docs``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hub.status import Status
from protocol.ids import Name

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


class AnomalyOut(BaseModel):
    """A device's anomaly state, from its newest ``anomaly_started`` / ``anomaly_cleared`` event."""

    active: bool = Field(description="true after anomaly_started until anomaly_cleared")
    score: float | None = Field(description="`details.score` of that event (null when it has none)")
    since: str | None = Field(description="`ts` of that event, ISO 8601 UTC (null: no anomaly event yet)")


NO_ANOMALY = AnomalyOut(active=False, score=None, since=None)


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
    anomaly: AnomalyOut


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
    type: str = Field(description="buffer_thinned | buffer_corrupt | buffer_full | anomaly_started | "
                                  "anomaly_cleared | model_activated | model_rejected | model_rolled_back")
    device: str | None = Field(description="Name of the device the event is about (anomaly events), else null")
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


# -- anomaly-model registry and rollout -------------------------------------------------------------


class ModelVersionOut(BaseModel):
    """A stored model version (``POST /api/v1/models``, ``GET /api/v1/models[/{name}/{version}]``)."""

    name: str
    version: int
    profile: str = Field(description="Device profile whose devices the model scores")
    sha256: str = Field(description="SHA-256 of the ONNX file, hex")
    size: int = Field(description="File size in bytes")
    card: dict[str, Any] = Field(description="The model card (protocol.anomaly.ModelCard) with sha256")
    uploaded_at: str | None = Field(description="ISO 8601 UTC (hub clock)")
    uploaded_by: str = Field(description="The signed-in user who uploaded it")
    file: str = Field(description="Path of the file download, `/api/v1/models/{name}/{version}/file`")


class AssignmentIn(BaseModel):
    """Body of ``PUT /api/v1/model-assignments``."""

    model_config = ConfigDict(extra="forbid")

    profile: Name = Field(description="Device profile, e.g. `sim-boiler`")
    name: Name = Field(description="Model name")
    version: Annotated[int, Field(ge=1, le=2**31 - 1)]  # a 32-bit integer column: larger is a 422, not a 500
    gateway: str | None = Field(default=None, description="Gateway id `site.gateway`; omitted or null: "
                                                          "fleet-wide (every gateway without its own assignment)")


class AssignmentOut(BaseModel):
    """One assignment."""

    profile: str
    gateway: str | None = Field(description="Gateway id `site.gateway`, null for fleet-wide")
    name: str
    version: int
    sha256: str
    size: int
    assigned_at: str | None = Field(description="ISO 8601 UTC (hub clock)")
    assigned_by: str


class AssignmentChangeOut(BaseModel):
    """Answer of ``PUT`` / ``DELETE /api/v1/model-assignments``."""

    assignment: AssignmentOut = Field(description="The assignment made (PUT) or removed (DELETE)")
    gateways: list[str] = Field(description="Gateways (`site.gateway`) whose assignment list is republished")


class AssignedModelOut(BaseModel):
    """What the hub assigns a gateway for one profile."""

    name: str
    version: int
    sha256: str
    scope: Literal["fleet", "gateway"] = Field(description="fleet-wide, or the gateway's own assignment")


class RunningModelOut(BaseModel):
    """What the gateway reports running for one profile (its status, ``models``)."""

    name: str
    version: int
    sha256: str
    state: str = Field(description="active | failed (the assigned version could not be used)")
    error: str = Field(description="Why the last assigned version was refused or rolled back")


class GatewayModelOut(BaseModel):
    """Assigned versus running for one device profile of a gateway."""

    profile: str
    assigned: AssignedModelOut | None
    running: RunningModelOut | None
    rollout: Literal["in_sync", "pending", "failed", "unassigned"] = Field(
        description="in_sync: runs the assigned file; failed: reports a failure; pending: not (yet) running the "
                    "assigned file; unassigned: nothing assigned (it may run a model of its own configuration)")


class GatewayModelsOut(BaseModel):
    """``GET /api/v1/gateways/{id}/models``."""

    id: str
    state: Literal["online", "offline", "unknown"]
    state_since: str | None = Field(description="`ts` of the gateway's last status message (gateway clock)")
    models: list[GatewayModelOut]
