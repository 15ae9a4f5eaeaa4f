"""Edge agent configuration (``edge.toml``), validated with pydantic.

Every option is documented in ``docs/edge.md``; ``examples/edge.toml`` is a working example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.ids import Name
from protocol.profile import DeviceProfile, resolve_profile
from protocol.tomlconfig import ConfigError, load_toml, problem_at

Seconds = Annotated[float, Field(gt=0, le=86_400)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySection(_Section):
    """Who this gateway is; both names appear in every MQTT topic it publishes to."""

    site: Name
    name: Name


class MqttSection(_Section):
    """Uplink to the broker."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    client_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    username: str | None = None
    password: str | None = None
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    batch_max_readings: Annotated[int, Field(ge=1, le=20_000)] = 1000
    """Most readings in one MQTT message (the hub accepts up to 20,000)."""
    batch_max_delay_ms: Annotated[int, Field(ge=0, le=60_000)] = 200
    """How long a part-filled batch may wait for more readings before it is sent."""
    max_inflight: Annotated[int, Field(ge=1, le=1000)] = 8
    """Batches published but not yet acknowledged by the broker."""
    publish_timeout_s: Seconds = 15.0
    reconnect_min_s: Seconds = 0.5
    reconnect_max_s: Seconds = 60.0


class BufferSection(_Section):
    """The store-and-forward buffer (SQLite, WAL)."""

    path: Path = Path("var/edge-buffer.db")
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    """SQLite ``synchronous``: FULL survives power cuts for every committed reading; NORMAL
    survives process crashes but a power cut may lose the last commits (see docs/delivery.md)."""
    flush_interval_ms: Annotated[int, Field(ge=1, le=10_000)] = 100
    """Readings are committed in one transaction at most this long after they were polled."""
    flush_max_readings: Annotated[int, Field(ge=1, le=100_000)] = 5000


class MetricsSection(_Section):
    """Prometheus exporter."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9108
    """0 disables the exporter."""


class TcpDeviceConfig(_Section):
    """A Modbus TCP device."""

    name: Name
    transport: Literal["tcp"] = "tcp"
    profile: str
    """Built-in profile name (e.g. ``sim-boiler``) or a path to a profile ``.toml`` file
    (relative paths are relative to the config file)."""
    host: str
    port: Annotated[int, Field(ge=1, le=65535)] = 502
    unit_id: Annotated[int, Field(ge=0, le=255)] = 1
    poll_interval_s: Annotated[float, Field(ge=0.005, le=86_400)] = 5.0
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    backoff_max_s: Seconds = 60.0
    """Upper bound of the exponential back-off after failed polls."""
    points: list[Name] | None = None
    """Only poll these points of the profile (default: all)."""


DeviceConfig = TcpDeviceConfig


class EdgeConfig(_Section):
    """The whole ``edge.toml``."""

    gateway: GatewaySection
    mqtt: MqttSection = MqttSection()
    buffer: BufferSection = BufferSection()
    metrics: MetricsSection = MetricsSection()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    devices: list[DeviceConfig] = []

    @model_validator(mode="after")
    def _unique_devices(self) -> EdgeConfig:
        names = [d.name for d in self.devices]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"device names must be unique; repeated: {dupes}")
        return self

    @property
    def client_id(self) -> str:
        """MQTT client id: configured, or derived from site and gateway name."""
        return self.mqtt.client_id or f"twin-edge-{self.gateway.site}-{self.gateway.name}"


def load_config(path: str | Path) -> tuple[EdgeConfig, dict[str, DeviceProfile]]:
    """Load ``edge.toml`` and the profile of every device; raises ConfigError naming line and key."""
    path = Path(path)
    cfg = load_toml(path, EdgeConfig)
    profiles: dict[str, DeviceProfile] = {}
    problems: list[str] = []
    for i, dev in enumerate(cfg.devices):
        try:
            prof = resolve_profile(dev.profile, base_dir=path.parent)
        except ConfigError as exc:
            problems.extend(problem_at(path, ("devices", i, "profile"), p) for p in exc.problems)
            continue
        except FileNotFoundError as exc:
            problems.append(problem_at(path, ("devices", i, "profile"), str(exc)))
            continue
        unknown = sorted(set(dev.points or []) - {p.name for p in prof.points})
        if unknown:
            problems.append(problem_at(path, ("devices", i, "points"),
                                       f"not in profile {prof.name!r}: {unknown}"))
        profiles[dev.name] = prof
    if problems:
        raise ConfigError(str(path), problems)
    if cfg.buffer.path.is_absolute():
        return cfg, profiles
    # A relative buffer path is relative to the config file, not to wherever the agent was started.
    buf = cfg.buffer.model_copy(update={"path": path.parent / cfg.buffer.path})
    return cfg.model_copy(update={"buffer": buf}), profiles
