"""Versioned MQTT payloads exchanged between gateways and the hub.

Every payload is a JSON object with an integer ``v``. The topic carries the same version
(``twin/v1/...``). :func:`decode_telemetry` and :func:`decode_status` dispatch on ``v`` so a v2
model can be added next to v1 while the hub keeps accepting v1 gateways. The full description
with examples lives in ``docs/protocol.md``.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from protocol.ids import Name

MAX_READINGS_PER_BATCH = 20_000
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024


class Quality(StrEnum):
    """How far a reading can be trusted."""

    GOOD = "good"  # read from the device and decoded
    BAD = "bad"  # the read failed (timeout, exception, bad frame); value is null
    STALE = "stale"  # the device answered but the value has not been refreshed in time


class DeviceKind(StrEnum):
    """What kind of asset a device is."""

    BOILER = "boiler"
    METER = "meter"
    TANK = "tank"


class GatewayState(StrEnum):
    """Connection state a gateway announces on its status topic."""

    ONLINE = "online"
    OFFLINE = "offline"


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Value = FiniteFloat | int | bool | str | None
"""A reading's value. NaN and infinities are refused: a device answer that decodes to one is a
bad read (quality ``bad``, value null), not a number to store."""
TimestampMs = Annotated[int, Field(ge=0, lt=2**53)]
"""Milliseconds since the Unix epoch, UTC. Integers keep timestamps exact across JSON."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReadingV1(_Strict):
    """One value of one metric of one device at one instant."""

    device: Name
    metric: Name
    seq: Annotated[int, Field(ge=0, lt=2**63)]
    """Per-(gateway, device) sequence number, strictly increasing, persisted across restarts.
    The hub deduplicates on (gateway, device, seq)."""
    ts: TimestampMs
    value: Value
    unit: Annotated[str, Field(max_length=16)] = ""
    quality: Quality = Quality.GOOD

    @model_validator(mode="after")
    def _good_has_value(self) -> ReadingV1:
        if self.quality is Quality.GOOD and self.value is None:
            raise ValueError("a reading of quality 'good' must have a value")
        return self


class DeviceInfoV1(_Strict):
    """What the hub needs to know about a device it may never have seen before."""

    kind: DeviceKind
    profile: Annotated[str, Field(max_length=64)] = ""


class TelemetryV1(_Strict):
    """A batch of readings from one gateway (topic ``twin/v1/{site}/{gateway}/telemetry``)."""

    v: Literal[1] = 1
    site: Name
    gateway: Name
    sent_at: TimestampMs
    devices: dict[Name, DeviceInfoV1]
    """Every device named by a reading in this batch, with its kind."""
    readings: Annotated[list[ReadingV1], Field(min_length=1, max_length=MAX_READINGS_PER_BATCH)]
    backlog: Annotated[int, Field(ge=0)] = 0
    """Readings still waiting in the gateway's buffer after this batch."""

    @model_validator(mode="after")
    def _devices_declared(self) -> TelemetryV1:
        for r in self.readings:
            if r.device not in self.devices:
                raise ValueError(f"reading names device {r.device!r} missing from 'devices'")
        return self


class StatusV1(_Strict):
    """Retained gateway status (topic ``twin/v1/{site}/{gateway}/status``); also the Last Will."""

    v: Literal[1] = 1
    site: Name
    gateway: Name
    state: GatewayState
    ts: TimestampMs
    agent_version: Annotated[str, Field(max_length=32)] = ""
    devices: dict[Name, DeviceInfoV1] = {}
    backlog: Annotated[int, Field(ge=0)] = 0
    models: dict[Name, ActiveModelV1] = {}
    """Anomaly model the gateway runs, per device profile."""


class ModelState(StrEnum):
    """Where a gateway stands with the model it was assigned for a profile."""

    ACTIVE = "active"  # loaded and scoring
    FAILED = "failed"  # the assigned version could not be used; the previous one (if any) runs


class ActiveModelV1(_Strict):
    """The model a gateway runs for one device profile, as reported in its status."""

    name: Name
    version: Annotated[int, Field(ge=1)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    state: ModelState = ModelState.ACTIVE
    error: Annotated[str, Field(max_length=500)] = ""
    """Why the last assigned version was refused or rolled back (empty when none was)."""


StatusV1.model_rebuild()


class EventType(StrEnum):
    """Things a gateway reports that are not readings."""

    BUFFER_THINNED = "buffer_thinned"  # disk cap reached: older readings thinned (dropped on purpose)
    BUFFER_CORRUPT = "buffer_corrupt"  # buffer file unreadable, moved aside, a new one started
    BUFFER_FULL = "buffer_full"  # the disk refused writes (SQLITE_FULL) even after thinning
    ANOMALY_STARTED = "anomaly_started"  # a device's anomaly score crossed its model's threshold
    ANOMALY_CLEARED = "anomaly_cleared"  # ... and fell back below the clear threshold
    MODEL_ACTIVATED = "model_activated"  # a new model version was loaded and is scoring
    MODEL_REJECTED = "model_rejected"  # an assigned model failed download, hash, load or self-test
    MODEL_ROLLED_BACK = "model_rolled_back"  # an active model misbehaved (NaN scores): previous one restored
    CONFIG_APPLIED = "config_applied"  # a remote configuration was validated and is running (details.version)
    CONFIG_REJECTED = "config_rejected"  # ... was invalid; the working one still runs (details.version, .error)
    COMMAND_APPLIED = "command_applied"  # a command was carried out (details.command_id, .point, .value)
    COMMAND_REFUSED = "command_refused"  # ... was refused before touching the device (outside safe range,
    # expired, unknown device or point); details.reason says which
    COMMAND_FAILED = "command_failed"  # ... was allowed but the device write failed (timeout, exception)


class EventV1(_Strict):
    """A gateway event (topic ``twin/v1/{site}/{gateway}/events``, QoS 1, not retained)."""

    v: Literal[1] = 1
    site: Name
    gateway: Name
    ts: TimestampMs
    type: EventType
    message: Annotated[str, Field(max_length=1000)] = ""
    readings_dropped: Annotated[int, Field(ge=0)] = 0
    """Readings removed from the buffer by this event (never sent)."""
    device: Name | None = None
    """Device the event is about (anomaly events), if any."""
    details: dict[str, int | float | str] = {}


class ModelAssignmentItemV1(_Strict):
    """One model a gateway must run: for the devices of ``profile``, fetch ``url`` and check ``sha256``."""

    profile: Name
    name: Name
    version: Annotated[int, Field(ge=1)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size: Annotated[int, Field(gt=0)]
    url: Annotated[str, Field(min_length=1, max_length=2000)]
    """Where to download the ONNX file (the hub's ``/api/v1/models/{name}/{version}/file``)."""


class ModelAssignmentV1(_Strict):
    """Retained hub-to-gateway message (topic ``twin/v1/{site}/{gateway}/models``): the models to run.

    The complete list each time: a profile missing from it has no model assigned (the gateway
    keeps what its own configuration gives it).
    """

    v: Literal[1] = 1
    site: Name
    gateway: Name
    ts: TimestampMs
    models: Annotated[list[ModelAssignmentItemV1], Field(max_length=64)] = []

    @model_validator(mode="after")
    def _one_per_profile(self) -> ModelAssignmentV1:
        profiles = [m.profile for m in self.models]
        if len(set(profiles)) != len(profiles):
            raise ValueError(f"more than one model for a profile: {profiles}")
        return self


class GatewayConfigV1(_Strict):
    """Retained hub-to-gateway message (topic ``twin/v1/{site}/{gateway}/config``): the device
    configuration the gateway must run.

    ``config`` holds the gateway's ``[[devices]]`` (and, optionally, ``[[serial_ports]]``) tables as
    JSON, in the edge configuration's own format; the gateway validates it completely and answers
    with a ``config_applied`` or ``config_rejected`` event naming ``version``. A gateway that cannot
    use it keeps running the configuration it has.
    """

    v: Literal[1] = 1
    site: Name
    gateway: Name
    ts: TimestampMs
    version: Annotated[int, Field(ge=1)]
    """Increases by one with every change made at the hub."""
    config: dict[str, Any]


class CommandV1(_Strict):
    """Hub-to-gateway command (topic ``twin/v1/{site}/{gateway}/commands``, QoS 1, not retained):
    write ``value`` to the writable point ``point`` of ``device``.

    The gateway checks the point's safe range from the device profile again (the hub checked it
    first) and answers with a ``command_applied`` / ``command_refused`` / ``command_failed`` event
    whose ``details.command_id`` is ``id``. A command received after ``expires`` is refused: a
    setpoint must not be written hours later because a gateway was offline.
    """

    v: Literal[1] = 1
    site: Name
    gateway: Name
    ts: TimestampMs
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    expires: TimestampMs
    device: Name
    point: Name
    value: float
    issued_by: Annotated[str, Field(max_length=64)] = ""


Telemetry = TelemetryV1
Status = StatusV1
Event = EventV1
ModelAssignment = ModelAssignmentV1

_TELEMETRY: dict[int, TypeAdapter[Any]] = {1: TypeAdapter(TelemetryV1)}
_STATUS: dict[int, TypeAdapter[Any]] = {1: TypeAdapter(StatusV1)}
_EVENT: dict[int, TypeAdapter[Any]] = {1: TypeAdapter(EventV1)}
_ASSIGNMENT: dict[int, TypeAdapter[Any]] = {1: TypeAdapter(ModelAssignmentV1)}
_GATEWAY_CONFIG: dict[int, TypeAdapter[Any]] = {1: TypeAdapter(GatewayConfigV1)}
_COMMAND: dict[int, TypeAdapter[Any]] = {1: TypeAdapter(CommandV1)}


class SchemaError(ValueError):
    """A payload that cannot be accepted; the message says why, for logs and counters."""


def _load(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise SchemaError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SchemaError(f"payload is not JSON: {exc}") from None
    except RecursionError:
        # Thousands of nested brackets exhaust the parser's stack; that is hostile input, not a crash.
        raise SchemaError("payload is not JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise SchemaError("payload is not a JSON object")
    return doc


def _decode(adapters: dict[int, TypeAdapter[Any]], payload: bytes, expect_version: int | None) -> Any:
    # Parse once, pick the model by "v", then validate the parsed object.
    doc = _load(payload)
    version = doc.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SchemaError("payload has no integer 'v' (schema version)")
    if expect_version is not None and version != expect_version:
        raise SchemaError(f"payload v={version} does not match topic version v{expect_version}")
    adapter = adapters.get(version)
    if adapter is None:
        raise SchemaError(f"unsupported schema version v={version} (supported: {sorted(adapters)})")
    try:
        return adapter.validate_python(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise SchemaError(f"invalid v{version} payload at {loc or '<root>'}: {first['msg']} "
                          f"({exc.error_count()} error(s))") from None


def decode_telemetry(payload: bytes, expect_version: int | None = None) -> Telemetry:
    """Validate a telemetry payload of any supported version; raises :class:`SchemaError`."""
    result: Telemetry = _decode(_TELEMETRY, payload, expect_version)
    return result


def decode_status(payload: bytes, expect_version: int | None = None) -> Status:
    """Validate a status payload of any supported version; raises :class:`SchemaError`."""
    result: Status = _decode(_STATUS, payload, expect_version)
    return result


def decode_event(payload: bytes, expect_version: int | None = None) -> Event:
    """Validate an event payload of any supported version; raises :class:`SchemaError`."""
    result: Event = _decode(_EVENT, payload, expect_version)
    return result


def decode_model_assignment(payload: bytes, expect_version: int | None = None) -> ModelAssignment:
    """Validate a model-assignment payload (hub to gateway); raises :class:`SchemaError`."""
    result: ModelAssignment = _decode(_ASSIGNMENT, payload, expect_version)
    return result


def decode_gateway_config(payload: bytes, expect_version: int | None = None) -> GatewayConfigV1:
    """Validate a remote-configuration payload (hub to gateway); raises :class:`SchemaError`."""
    result: GatewayConfigV1 = _decode(_GATEWAY_CONFIG, payload, expect_version)
    return result


def decode_command(payload: bytes, expect_version: int | None = None) -> CommandV1:
    """Validate a command payload (hub to gateway); raises :class:`SchemaError`."""
    result: CommandV1 = _decode(_COMMAND, payload, expect_version)
    return result


def encode(message: BaseModel) -> bytes:
    """Serialise a payload compactly (no whitespace, nulls kept: a null value is meaningful)."""
    return message.model_dump_json().encode()


def encode_telemetry_v1(
    site: str,
    gateway: str,
    sent_at: int,
    devices: dict[str, tuple[str, str]],
    readings: list[tuple[str, str, int, int, Value, str, str]],
    backlog: int = 0,
) -> bytes:
    """Build a v1 telemetry payload straight from buffer rows, without per-reading model objects.

    This is the gateway's hot path (tens of thousands of readings per second on a Pi-class CPU),
    so it skips validation; the test-suite checks its output against :class:`TelemetryV1`.
    ``devices`` maps device name to (kind, profile); each reading is
    ``(device, metric, seq, ts_ms, value, unit, quality)``.
    """
    doc = {
        "v": 1,
        "site": site,
        "gateway": gateway,
        "sent_at": sent_at,
        "devices": {name: {"kind": kind, "profile": prof} for name, (kind, prof) in devices.items()},
        "readings": [
            {"device": d, "metric": m, "seq": s, "ts": t, "value": v, "unit": u, "quality": q}
            for d, m, s, t, v, u, q in readings
        ],
        "backlog": backlog,
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
