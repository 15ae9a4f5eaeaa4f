"""Helpers for tests that drive a hub: payload builders, configs, waiting.

Not used by the running hub.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from hub.config import HubConfig
from protocol.schema import EventV1, TelemetryV1, Value, decode_event, decode_telemetry, encode_telemetry_v1

ReadingTuple = tuple[str, str, int, int, Value, str, str]
"""(device, metric, seq, ts_ms, value, unit, quality), as :func:`encode_telemetry_v1` takes."""

T0 = 1_764_079_200_000
"""A fixed reading time (2025-11-25T14:00:00Z) for reproducible tests."""


def telemetry_payload(site: str, gateway: str, readings: Sequence[ReadingTuple],
                      kinds: dict[str, str] | None = None, backlog: int = 0, sent_at: int | None = None) -> bytes:
    """A v1 telemetry payload; every device in ``readings`` is declared (kind from ``kinds``,
    default ``boiler``)."""
    devices = {r[0]: ((kinds or {}).get(r[0], "boiler"), f"sim-{(kinds or {}).get(r[0], 'boiler')}")
               for r in readings}
    return encode_telemetry_v1(site, gateway, sent_at if sent_at is not None else T0, devices, list(readings),
                               backlog=backlog)


def telemetry(site: str, gateway: str, readings: Sequence[ReadingTuple], **kw: Any) -> TelemetryV1:
    """Like :func:`telemetry_payload` but validated into a :class:`TelemetryV1`."""
    return decode_telemetry(telemetry_payload(site, gateway, readings, **kw))


def event_payload(site: str, gateway: str, type: str, ts: int = T0, *, readings_dropped: int = 0,
                  message: str = "", details: dict[str, Any] | None = None, device: str | None = None) -> bytes:
    """A v1 event payload (compact JSON, as a gateway sends it); ``device`` only when given."""
    doc: dict[str, Any] = {"v": 1, "site": site, "gateway": gateway, "ts": ts, "type": type, "message": message,
                           "readings_dropped": readings_dropped, "details": details or {}}
    if device is not None:
        doc["device"] = device
    return json.dumps(doc, separators=(",", ":")).encode()


def event(site: str, gateway: str, type: str, ts: int = T0, **kw: Any) -> EventV1:
    """Like :func:`event_payload` but validated into an :class:`EventV1`."""
    return decode_event(event_payload(site, gateway, type, ts, **kw))


def series(device: str, metric: str, n: int, *, seq0: int = 0, ts0: int = T0, step_ms: int = 1000,
           value0: float = 0.0, unit: str = "degC") -> list[ReadingTuple]:
    """``n`` good readings of one metric: seq ``seq0..``, value ``value0 + i``."""
    return [(device, metric, seq0 + i, ts0 + i * step_ms, value0 + i, unit, "good") for i in range(n)]


def hub_config(*, db_url: str, mqtt_port: int, client_id: str = "twin-hub", share_group: str | None = None,
               **sections: dict[str, Any]) -> HubConfig:
    """A config for an in-process hub: HTTP on a free port, short batch delay."""
    data: dict[str, Any] = {
        "database": {"url": db_url},
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "client_id": client_id, "share_group": share_group,
                 "reconnect_max_s": 1.0},
        "http": {"host": "127.0.0.1", "port": 0},
        "ingest": {"batch_max_delay_ms": 20},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return HubConfig.model_validate(data)


async def wait_until(predicate: Callable[[], bool], within_s: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 10 ms; ``AssertionError`` naming ``what`` after ``within_s``."""
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.01)
