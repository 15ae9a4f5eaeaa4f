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
        # Anomaly scoring (edge/inference).
        self.windows_scored = Counter("twin_edge_inference_windows_scored", "Windows scored by an anomaly model",
                                      ["device"], registry=r)
        self.scoring_latency = Histogram("twin_edge_inference_latency_seconds", "One batched scoring call, "
                                         "queued on the worker thread until scores are back", ["profile"], registry=r,
                                         buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                  0.1, 0.25, 1))
        self.scoring_failures = Counter("twin_edge_inference_failures", "Scoring calls that raised or returned "
                                        "non-finite scores", ["profile"], registry=r)
        self.window_resets = Counter("twin_edge_inference_window_resets", "Windows restarted after a gap in the "
                                     "samples", ["device"], registry=r)
        self.anomaly_active = Gauge("twin_edge_anomaly_active", "1 while the device's anomaly is active",
                                    ["device"], registry=r)
        self.model_load_failures = Counter("twin_edge_model_load_failures", "Models refused at start or at "
                                           "rollout, by reason", ["profile", "kind"], registry=r)
        self.model_activations = Counter("twin_edge_model_activations", "Models switched to", ["profile"],
                                         registry=r)
        self.model_rollbacks = Counter("twin_edge_model_rollbacks", "Active models rolled back after failing live",
                                       ["profile"], registry=r)
        # Setpoint commands from the hub (edge/commands.py).
        self.commands = Counter("twin_edge_commands", "Hub commands by outcome (applied, refused, failed, "
                                "duplicate, malformed) and reason", ["outcome", "reason"], registry=r)
        # Hostile or broken hub-to-gateway messages (edge/uplink.py): dropped before their handler.
        self.downlink_rejected = Counter("twin_edge_downlink_rejected", "Hub-to-gateway messages dropped, by "
                                         "channel and reason (too_large, not_json, invalid, error)",
                                         ["channel", "reason"], registry=r)

    def serve(self, host: str, port: int) -> None:
        """Start the exporter thread (prometheus_client's own HTTP server)."""
        start_http_server(port, addr=host, registry=self.registry)
