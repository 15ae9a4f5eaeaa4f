"""Prometheus metrics of the edge agent (served on ``[metrics] port``, default 9108)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class EdgeMetrics:
    """All metrics of one agent, in their own registry (tests run several agents per process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.polls = Counter("twin_edge_polls", "Device polls by outcome", ["device", "outcome"], registry=r)
        self.poll_errors = Counter("twin_edge_poll_errors", "Failed requests or polls by kind",
                                   ["device", "kind"], registry=r)
        self.poll_duration = Histogram("twin_edge_poll_duration_seconds", "Time to poll a device",
                                       ["device"], registry=r,
                                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.poll_overruns = Counter("twin_edge_poll_overruns", "Polls skipped because the previous "
                                     "one was still running at the next deadline", ["device"], registry=r)
        self.readings = Counter("twin_edge_readings", "Readings captured by quality", ["device", "quality"],
                                registry=r)
        self.committed = Counter("twin_edge_buffer_committed_readings", "Readings committed to the buffer",
                                 registry=r)
        self.backlog = Gauge("twin_edge_buffer_backlog_readings", "Readings waiting for the broker", registry=r)
        self.buffer_dropped = Counter("twin_edge_buffer_dropped_readings",
                                      "Readings removed by the disk cap or a full disk (never sent)", registry=r)
        self.buffer_bytes = Gauge("twin_edge_buffer_bytes", "Buffer size on disk", registry=r)
        self.published_readings = Counter("twin_edge_published_readings", "Readings acknowledged by the broker",
                                          registry=r)
        self.published_batches = Counter("twin_edge_published_batches", "Batches acknowledged by the broker",
                                         registry=r)
        self.publish_latency = Histogram("twin_edge_publish_latency_seconds", "Publish to PUBACK", registry=r,
                                         buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5))
        self.mqtt_connected = Gauge("twin_edge_mqtt_connected", "1 while connected to the broker", registry=r)
        self.mqtt_reconnects = Counter("twin_edge_mqtt_disconnects", "Lost or failed broker connections",
                                       registry=r)

    def serve(self, host: str, port: int) -> None:
        """Start the exporter thread (prometheus_client's own HTTP server)."""
        start_http_server(port, addr=host, registry=self.registry)
