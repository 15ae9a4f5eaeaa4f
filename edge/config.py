"""Edge agent configuration (``edge.toml``), validated with pydantic.

Every option is documented in ``docs/edge.md``; ``examples/edge.toml`` is a working example.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from protocol.ids import Name
from protocol.profile import DeviceProfile, resolve_profile
from protocol.tls import TlsClientOptions
from protocol.tomlconfig import ConfigError, load_toml, problem_at

Seconds = Annotated[float, Field(gt=0, le=86_400)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySection(_Section):
    """Who this gateway is; both names appear in every MQTT topic it publishes to."""

    site: Name
    name: Name


class MqttSection(_Section, TlsClientOptions):
    """Uplink to the broker; TLS options (``tls``, ``ca_file``, ...) come from :class:`TlsClientOptions`."""

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
    max_bytes: Annotated[int, Field(ge=1_048_576)] = 512 * 2**20
    """Cap on the readings in the buffer file. At the cap the oldest half of the backlog is
    thinned to half resolution, then the oldest readings are dropped; never the newest. Each
    time is counted and reported to the hub as a ``buffer_thinned`` event (docs/delivery.md)."""


class MetricsSection(_Section):
    """Prometheus exporter."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9108
    """0 disables the exporter."""


class InferenceSection(_Section):
    """Anomaly scoring on the gateway (``edge/inference``) and the models the hub rolls out."""

    intra_op_threads: Annotated[int, Field(ge=1, le=64)] = 1
    """onnxruntime threads per scoring call. Scoring runs on one worker thread of its own; 1 keeps
    a Pi's other cores free for polling and the uplink."""
    model_dir: Path | None = None
    """Where models downloaded from the hub and ``active.json`` are kept (default: ``models``
    beside the buffer file). Relative to the config file."""
    hub_url: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/\S*)?$")] | None = None
    """The hub's public URL (its ``[http] public_url``), put before assignment URLs that are only a
    path (``/api/v1/models/...``). The hub normally sends absolute URLs."""
    download_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    """Longest a model download may take in total."""
    ca_file: Path | None = None
    """PEM CA file an ``https`` hub's certificate must be signed by; unset: ``[mqtt] ca_file`` when
    ``[mqtt] tls`` is on, else the system's trust store. Relative to the config file."""
    gap_factor: Annotated[float, Field(ge=1.5, le=100)] = 3.0
    """A gap of more than this many sample periods between two samples of a device restarts its window."""


class ModelConfig(_Section):
    """A model on the gateway's own disk, scoring the devices of one profile until the hub assigns another."""

    profile: Name
    """Device profile the model scores; must be the profile of at least one device, and match the model's card."""
    path: Path
    """The ONNX file, relative to the config file. A missing or unusable file is logged and
    counted at start; the agent then collects and forwards data without scoring that profile."""


class SerialPortConfig(_Section):
    """A serial line (RS-485 bus for Modbus RTU, or an optical head for IEC 62056-21)."""

    name: Name
    device: str
    """OS path of the port, e.g. ``/dev/ttyUSB0`` or ``/dev/serial/by-id/...``."""
    baudrate: Literal[300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200] = 19200
    """Modbus RTU: the line speed. IEC 62056-21: the highest speed to accept when the meter
    offers to switch (the sign-on itself is always 300 baud 7E1, as the standard says)."""
    parity: Literal["N", "E", "O"] = "E"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 0.5
    """How long to wait for an answer before counting a timeout."""
    inter_frame_ms: Annotated[float, Field(ge=0, le=1000)] | None = None
    """Silence kept between the end of one frame and the next request. Default: 3.5 character
    times, and 1.75 ms above 19200 baud, as the Modbus RTU specification requires."""

    @property
    def char_bits(self) -> int:
        """Bits on the wire per character: start + data + parity + stop."""
        return 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits

    @property
    def inter_frame_s(self) -> float:
        """The silence between frames, in seconds."""
        if self.inter_frame_ms is not None:
            return self.inter_frame_ms / 1000
        return 0.00175 if self.baudrate > 19200 else 3.5 * self.char_bits / self.baudrate


class _DeviceBase(_Section):
    name: Name
    profile: str
    """Built-in profile name (e.g. ``sim-boiler``) or a path to a profile ``.toml`` file
    (relative paths are relative to the config file)."""
    poll_interval_s: Annotated[float, Field(ge=0.005, le=86_400)] = 5.0
    backoff_max_s: Seconds = 60.0
    """Upper bound of the exponential back-off after failed polls."""
    points: list[Name] | None = None
    """Only poll these points of the profile (default: all)."""


class TcpDeviceConfig(_DeviceBase):
    """A Modbus TCP device."""

    transport: Literal["tcp"] = "tcp"
    host: str
    port: Annotated[int, Field(ge=1, le=65535)] = 502
    unit_id: Annotated[int, Field(ge=0, le=255)] = 1
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 1.0


class RtuDeviceConfig(_DeviceBase):
    """A Modbus RTU device on a serial bus shared with others."""

    transport: Literal["rtu"]
    serial_port: Name
    """``name`` of a ``[[serial_ports]]`` entry."""
    unit_id: Annotated[int, Field(ge=1, le=247)] = 1


class IecDeviceConfig(_DeviceBase):
    """An electricity meter read through its optical port with IEC 62056-21 mode C."""

    transport: Literal["iec62056"]
    profile: str = "iec-meter"
    serial_port: Name
    address: Annotated[str, Field(pattern=r"^[0-9A-Za-z ]{0,32}$")] = ""
    """Device address for the sign-on (``/?ADDRESS!``); empty addresses any meter on the port."""
    poll_interval_s: Annotated[float, Field(ge=1, le=86_400)] = 60.0


def _transport(value: object) -> str:
    # `transport` may be left out for TCP devices, so a plain field discriminator is not enough.
    if isinstance(value, dict):
        return str(value.get("transport", "tcp"))
    return str(getattr(value, "transport", "tcp"))


DeviceConfig = Annotated[
    Annotated[TcpDeviceConfig, Tag("tcp")] | Annotated[RtuDeviceConfig, Tag("rtu")]
    | Annotated[IecDeviceConfig, Tag("iec62056")],
    Discriminator(_transport, custom_error_type="transport",
                  custom_error_message="transport must be 'tcp', 'rtu' or 'iec62056'"),
]


class EdgeConfig(_Section):
    """The whole ``edge.toml``."""

    gateway: GatewaySection
    mqtt: MqttSection = MqttSection()
    buffer: BufferSection = BufferSection()
    metrics: MetricsSection = MetricsSection()
    inference: InferenceSection = InferenceSection()
    models: list[ModelConfig] = []
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    serial_ports: list[SerialPortConfig] = []
    devices: list[DeviceConfig] = []

    @model_validator(mode="after")
    def _consistent(self) -> EdgeConfig:
        names = [d.name for d in self.devices]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"device names must be unique; repeated: {dupes}")
        port_names = [p.name for p in self.serial_ports]
        dupes = sorted({n for n in port_names if port_names.count(n) > 1})
        if dupes:
            raise ValueError(f"serial port names must be unique; repeated: {dupes}")
        users: dict[str, list[RtuDeviceConfig | IecDeviceConfig]] = {}
        for d in self.devices:
            if isinstance(d, RtuDeviceConfig | IecDeviceConfig):
                if d.serial_port not in port_names:
                    raise ValueError(f"device {d.name!r}: no [[serial_ports]] entry named {d.serial_port!r}")
                users.setdefault(d.serial_port, []).append(d)
        for port, devs in users.items():
            kinds = {d.transport for d in devs}
            if len(kinds) > 1:
                raise ValueError(f"serial port {port!r} cannot carry both Modbus RTU and IEC 62056-21")
            if "iec62056" in kinds and len(devs) > 1:
                raise ValueError(f"serial port {port!r}: one IEC 62056-21 meter per optical port")
            units = [d.unit_id for d in devs if isinstance(d, RtuDeviceConfig)]
            clash = sorted({u for u in units if units.count(u) > 1})
            if clash:
                raise ValueError(f"serial port {port!r}: unit ids used twice on one bus: {clash}")
        model_profiles = [m.profile for m in self.models]
        dupes = sorted({p for p in model_profiles if model_profiles.count(p) > 1})
        if dupes:
            raise ValueError(f"one [[models]] entry per profile; repeated: {dupes}")
        return self

    @property
    def model_dir(self) -> Path:
        """Directory of downloaded models and ``active.json``."""
        return self.inference.model_dir or self.buffer.path.parent / "models"

    def serial_port(self, name: str) -> SerialPortConfig:
        """The ``[[serial_ports]]`` entry called ``name``."""
        return next(p for p in self.serial_ports if p.name == name)

    @property
    def client_id(self) -> str:
        """MQTT client id: configured, or derived from site and gateway name."""
        return self.mqtt.client_id or f"twin-edge-{self.gateway.site}-{self.gateway.name}"


def device_profiles(devices: Sequence[DeviceConfig], base_dir: Path | None = None,
                    ) -> tuple[dict[str, DeviceProfile], list[tuple[tuple[str | int, ...], str]]]:
    """Resolve the profile of every device and check that it fits the device (protocol, points).

    Returns device name → profile, and the problems as (key path, message); shared by
    :func:`load_config` and the remote configuration (:mod:`edge.remote_config`).
    """
    profiles: dict[str, DeviceProfile] = {}
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for i, dev in enumerate(devices):
        try:
            prof = resolve_profile(dev.profile, base_dir=base_dir)
        except ConfigError as exc:
            problems.extend((("devices", i, "profile"), p) for p in exc.problems)
            continue
        except FileNotFoundError as exc:
            problems.append((("devices", i, "profile"), str(exc)))
            continue
        expected = "iec62056-21" if dev.transport == "iec62056" else "modbus"
        if prof.profile.protocol != expected:
            problems.append((("devices", i, "profile"), f"profile {prof.name!r} is for {prof.profile.protocol}, "
                                                        f"transport {dev.transport!r} needs a {expected} profile"))
            continue
        unknown = sorted(set(dev.points or []) - set(prof.units))
        if unknown:
            problems.append((("devices", i, "points"), f"not in profile {prof.name!r}: {unknown}"))
        profiles[dev.name] = prof
    return profiles, problems


def load_config(path: str | Path) -> tuple[EdgeConfig, dict[str, DeviceProfile]]:
    """Load ``edge.toml`` and the profile of every device; raises ConfigError naming line and key."""
    path = Path(path)
    cfg = load_toml(path, EdgeConfig)
    profiles, found = device_profiles(cfg.devices, base_dir=path.parent)
    problems = [problem_at(path, loc, message) for loc, message in found]
    used = {p.name for p in profiles.values()}
    for i, m in enumerate(cfg.models):
        if m.profile not in used:
            problems.append(problem_at(path, ("models", i, "profile"),
                                       f"no device uses profile {m.profile!r} (devices use: {sorted(used)})"))
    tls_files, tls_problems = cfg.mqtt.tls_problems(path.parent)
    problems.extend(problem_at(path, ("mqtt", key), msg) for key, msg in tls_problems)
    https_ca = cfg.inference.ca_file
    if https_ca is not None and not https_ca.is_absolute():
        https_ca = path.parent / https_ca
    if https_ca is not None and not https_ca.is_file():
        problems.append(problem_at(path, ("inference", "ca_file"), f"no such file: {https_ca}"))
    if problems:
        raise ConfigError(str(path), problems)
    # Relative paths are relative to the config file, not to wherever the agent was started.
    update: dict[str, object] = {}
    if tls_files:
        update["mqtt"] = cfg.mqtt.model_copy(update=tls_files)
    if not cfg.buffer.path.is_absolute():
        update["buffer"] = cfg.buffer.model_copy(update={"path": path.parent / cfg.buffer.path})
    inference: dict[str, object] = {"ca_file": https_ca} if https_ca != cfg.inference.ca_file else {}
    if cfg.inference.model_dir is not None and not cfg.inference.model_dir.is_absolute():
        inference["model_dir"] = path.parent / cfg.inference.model_dir
    if inference:
        update["inference"] = cfg.inference.model_copy(update=inference)
    if any(not m.path.is_absolute() for m in cfg.models):
        update["models"] = [m if m.path.is_absolute() else m.model_copy(update={"path": path.parent / m.path})
                            for m in cfg.models]
    return (cfg.model_copy(update=update) if update else cfg), profiles
