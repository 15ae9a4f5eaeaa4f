"""Ingest counters: plain integers (for tests and ``/api/v1/health``) mirrored to Prometheus.

Each hub has its own ``CollectorRegistry`` so two hubs in one process (tests) do not collide.
"""

from __future__ import annotations

from collections import Counter as _Tally
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from protocol.schema import EventType

CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass
class IngestStats:
    """Totals since the hub started."""

    messages: int = 0
    """MQTT messages received (telemetry + status + events, valid or not)."""
    telemetry_messages: int = 0
    status_messages: int = 0
    event_messages: int = 0
    """Messages received on the events channel (valid or not)."""
    events: int = 0
    """Gateway events newly stored (an event already stored is not counted again)."""
    events_by_type: _Tally[str] = field(default_factory=_Tally)
    event_duplicates: int = 0
    """Valid events that were already stored (QoS 1 redelivery, a gateway resending)."""
    readings_received: int = 0
    """Readings in valid telemetry messages that reached a committed batch."""
    readings_stored: int = 0
    """Readings newly inserted."""
    duplicates: int = 0
    """Readings already stored (QoS 1 redelivery, a gateway resending, a retried batch)."""
    malformed: int = 0
    malformed_by_reason: _Tally[str] = field(default_factory=_Tally)
    batches: int = 0
    db_errors: int = 0
    acked: int = 0
    """Messages acknowledged to the broker (after their batch was committed)."""
    reconnects: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly copy."""
        return {k: dict(v) if isinstance(v, _Tally) else v for k, v in self.__dict__.items()}


BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class HubMetrics:
    """All counters of one hub."""

    def __init__(self) -> None:
        self.stats = IngestStats()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._messages = Counter("twin_hub_mqtt_messages", "MQTT messages received", ["channel"], registry=r)
        self._readings_received = Counter("twin_hub_readings_received", "Readings in valid telemetry",
                                          registry=r)
        self._stored = Counter("twin_hub_readings_stored", "Readings inserted into the database", registry=r)
        self._duplicates = Counter("twin_hub_readings_duplicate",
                                   "Readings ignored because (device, seq) was already stored", registry=r)
        self._malformed = Counter("twin_hub_malformed_messages", "Messages rejected, by reason", ["reason"],
                                  registry=r)
        self._batches = Counter("twin_hub_batches", "Batches committed", registry=r)
        self._batch_seconds = Histogram("twin_hub_batch_seconds", "Time to commit one batch",
                                        buckets=BATCH_BUCKETS, registry=r)
        self._batch_readings = Histogram("twin_hub_batch_readings", "Readings per committed batch",
                                         buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 50000),
                                         registry=r)
        self._db_errors = Counter("twin_hub_db_errors", "Failed batch commits (retried)", registry=r)
        self._events = Counter("twin_hub_gateway_events", "Gateway events newly stored, by type", ["type"],
                               registry=r)
        for event_type in EventType:  # every known type is exported from the start, at 0
            self._events.labels(event_type.value)
        self._event_duplicates = Counter("twin_hub_gateway_events_duplicate",
                                         "Gateway events ignored because (gateway, ts, type) was already stored",
                                         registry=r)
        self._reconnects = Counter("twin_hub_mqtt_reconnects", "MQTT connection losses", registry=r)
        self.mqtt_connected = Gauge("twin_hub_mqtt_connected", "1 while connected and subscribed", registry=r)
        self.queue_depth = Gauge("twin_hub_ingest_queue_messages", "Messages received, not yet committed",
                                 registry=r)
        self.queue_readings = Gauge("twin_hub_ingest_queue_readings",
                                    "Readings decoded, not yet committed ([ingest] max_decoded_readings)",
                                    registry=r)
        self._paused = Counter("twin_hub_ingest_paused",
                               "Times decoding waited for the database (max_decoded_readings reached)",
                               registry=r)
        self._assignments = Counter("twin_hub_model_assignments_published",
                                    "Retained model-assignment messages acknowledged by the broker", registry=r)
        self._assignment_failures = Counter("twin_hub_model_assignments_publish_failures",
                                            "Model-assignment publishes that failed (retried)", registry=r)

        self._logins_refused = Counter("twin_hub_logins_refused",
                                       "Sign-ins refused, by reason (bad_credentials, disabled, rate_limited)",
                                       ["reason"], registry=r)

    def login_refused(self, reason: str) -> None:
        """Count one refused sign-in."""
        self._logins_refused.labels(reason).inc()

    def message(self, channel: str) -> None:
        """Count one received message of ``channel`` (telemetry, status, events or unknown)."""
        self.stats.messages += 1
        if channel == "telemetry":
            self.stats.telemetry_messages += 1
        elif channel == "status":
            self.stats.status_messages += 1
        elif channel == "events":
            self.stats.event_messages += 1
        self._messages.labels(channel).inc()

    def malformed(self, reason: str) -> None:
        """Count one rejected message."""
        self.stats.malformed += 1
        self.stats.malformed_by_reason[reason] += 1
        self._malformed.labels(reason).inc()

    def ingest_paused(self) -> None:
        """Decoding waits for the database: ``[ingest] max_decoded_readings`` readings are held."""
        self._paused.inc()

    def batch(self, seconds: float, readings: int, inserted: int) -> None:
        """Count one committed batch."""
        self.stats.batches += 1
        self.stats.readings_received += readings
        self.stats.readings_stored += inserted
        self.stats.duplicates += readings - inserted
        self._batches.inc()
        self._batch_seconds.observe(seconds)
        self._batch_readings.observe(readings)
        self._readings_received.inc(readings)
        self._stored.inc(inserted)
        self._duplicates.inc(readings - inserted)

    def events(self, received: int, stored_by_type: Mapping[str, int]) -> None:
        """Count the events of one committed batch: ``received`` in total, of which
        ``stored_by_type`` were new."""
        stored = sum(stored_by_type.values())
        self.stats.events += stored
        self.stats.event_duplicates += received - stored
        self._event_duplicates.inc(received - stored)
        for event_type, n in stored_by_type.items():
            if n:
                self.stats.events_by_type[event_type] += n
                self._events.labels(event_type).inc(n)

    def db_error(self) -> None:
        """Count one failed commit."""
        self.stats.db_errors += 1
        self._db_errors.inc()

    def reconnect(self) -> None:
        """Count one lost MQTT connection."""
        self.stats.reconnects += 1
        self._reconnects.inc()

    def assignment_published(self) -> None:
        """Count one model-assignment message acknowledged by the broker."""
        self._assignments.inc()

    def assignment_publish_failed(self) -> None:
        """Count one failed model-assignment publish."""
        self._assignment_failures.inc()

    def acked(self, n: int) -> None:
        """Count acknowledged messages."""
        self.stats.acked += n

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)
