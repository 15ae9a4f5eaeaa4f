"""A reading as the agent handles it between the driver and the buffer."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.schema import Quality, Value


@dataclass(frozen=True, slots=True)
class Reading:
    """One value of one metric of one device; the buffer gives it its sequence number."""

    device: str
    metric: str
    ts_ms: int
    value: Value
    unit: str
    quality: Quality = Quality.GOOD


@dataclass(frozen=True, slots=True)
class StoredReading:
    """A reading as committed to the buffer: with its row id and per-device sequence number."""

    row_id: int
    device: str
    metric: str
    seq: int
    ts_ms: int
    value: Value
    unit: str
    quality: str
