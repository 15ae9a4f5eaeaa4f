"""Serve simulated devices over Modbus TCP, one server (port) per device, in one asyncio loop.

Registers are served through pymodbus' ``SimDevice`` datastore (the non-deprecated one in pymodbus
3.16; addresses are the 0-based protocol addresses, as in our profiles). Its ``action`` hook runs
on every request before pymodbus touches the registers: it copies the device's current snapshot
into the register block, so a request always sees one complete tick, and it hands writes of
settings to the model. The tick loop replaces each device's snapshot with plain assignments and no
``await`` in between, so a client can never observe a half-updated device.

Every device answers any unit id (0 and 1 included), like most Modbus TCP end devices; 1 is the
documented one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import queue
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pymodbus.constants import ExcCodes
from pymodbus.pdu.device import ModbusDeviceIdentification
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from firmware_sim.boiler import BoilerModel
from firmware_sim.meter import MeterModel
from firmware_sim.model import DeviceModel
from protocol import codec
from protocol.logs import get_logger
from protocol.profile import DeviceProfile, Point, builtin_profile

log = get_logger("firmware_sim.server")

UNIT_ID = 1
"""Unit (slave) id the simulated devices are documented to answer (they accept any)."""
MAX_CATCH_UP_TICKS = 1000
"""Ticks stepped at most per wake-up when the loop falls behind (very high --speed)."""

Reading = float | int | bool | str

_READ_FCS = {3: "holding", 4: "input"}
_WRITE_FCS = frozenset({6, 16, 22, 23})
_BIT_FCS = frozenset({1, 2, 5, 15})


class SimulatorStartError(RuntimeError):
    """The simulators could not start (e.g. a port is already in use)."""


@dataclass(frozen=True)
class SimConfig:
    """What to simulate and where to serve it."""

    boilers: int = 2
    meters: int = 2
    host: str = "127.0.0.1"
    base_port: int = 5020
    """Device ``i`` (0-based, boilers first) listens on ``base_port + i``; 0 = OS-chosen free ports."""
    seed: int = 1
    tick: float = 1.0
    """Simulated seconds per step."""
    speed: float = 1.0
    """Simulated seconds per wall second; 0 stops the clock (advance with :meth:`Simulators.step`)."""
    truth_log: Path | None = None
    meter_start_kwh: float = 0.0
    start_hour: float = 0.0
    """Simulated time of day at start, hours."""
    faults: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    """Initial fault switches: device name -> {key: value}."""

    def device_names(self) -> list[tuple[str, str]]:
        """(name, kind) of every device, in port order: ``boiler-1..N`` then ``meter-1..M``."""
        return ([(f"boiler-{i}", "boiler") for i in range(1, self.boilers + 1)]
                + [(f"meter-{i}", "meter") for i in range(1, self.meters + 1)])

    def check(self) -> None:
        """Raise ``ValueError`` naming the first invalid option."""
        if self.boilers < 0 or self.meters < 0 or self.boilers + self.meters == 0:
            raise ValueError("need at least one device (--boilers/--meters must be >= 0, not both 0)")
        if not (math.isfinite(self.tick) and self.tick > 0):
            raise ValueError(f"tick must be > 0 seconds, got {self.tick}")
        if not (math.isfinite(self.speed) and self.speed >= 0):
            raise ValueError(f"speed must be >= 0, got {self.speed}")
        last = self.base_port + self.boilers + self.meters - 1
        if self.base_port < 0 or (self.base_port and last > 65535):
            raise ValueError(f"ports {self.base_port}..{last} are outside 1..65535")
        names = {name for name, _ in self.device_names()}
        for device in self.faults:
            if device not in names:
                raise ValueError(f"fault for unknown device {device!r}; devices are {sorted(names)}")


def make_model(config: SimConfig, name: str, kind: str, number: int) -> DeviceModel:
    """The model behind device ``name`` (the ``number``-th of its kind, from 1)."""
    faults = config.faults.get(name)
    if kind == "boiler":
        return BoilerModel(config.seed, stream=number, start_hour=config.start_hour, faults=faults)
    if kind == "meter":
        return MeterModel(config.seed, stream=1000 + number, start_hour=config.start_hour,
                          start_kwh=config.meter_start_kwh, faults=faults)
    raise ValueError(f"unknown device kind {kind!r}")


class _Table:
    """One register table of a profile, laid out as a flat list of words from address 0."""

    def __init__(self, points: list[Point]) -> None:
        self.points = sorted(points, key=lambda p: p.address)
        self.size = max((p.address + p.registers for p in self.points), default=0)
        # address -> the point occupying it, to validate writes
        self.owner: dict[int, Point] = {}
        for p in self.points:
            for a in range(p.address, p.address + p.registers):
                self.owner[a] = p

    def encode(self, values: Mapping[str, Reading]) -> list[int]:
        words = [0] * self.size
        for p in self.points:
            encoded = _encode_saturated(p, values[p.name])
            for i, w in enumerate(encoded):
                # Bools kept in single bits share a register.
                words[p.address + i] = words[p.address + i] | w if p.bit is not None else w
        return words

    def decode(self, words: list[int]) -> dict[str, Reading]:
        return {p.name: codec.decode(p, words[p.address : p.address + p.registers]) for p in self.points}

    def simdata(self) -> list[SimData]:
        if not self.size:
            # pymodbus needs a block per table; an invalid register makes every access an exception.
            return [SimData(0, datatype=DataType.INVALID)]
        return [SimData(0, values=[0] * self.size, datatype=DataType.REGISTERS)]


def _encode_saturated(point: Point, value: Reading) -> list[int]:
    """Encode like a real transmitter: a value beyond a signed register's range reads as its limit.

    Unsigned registers only overflow below zero (``codec.encode`` wraps them upwards, as counters
    do), so a negative value reads as the register's zero.
    """
    try:
        return codec.encode(point, value)
    except (OverflowError, struct.error):
        if point.type not in codec.INTEGER_TYPES:
            raise
    bits = 16 * point.registers
    if point.type.startswith("u"):
        raw_lo, raw_hi = 0, 0
    else:
        raw_lo, raw_hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    lo, hi = sorted((raw_lo * point.scale + point.offset, raw_hi * point.scale + point.offset))
    return codec.encode(point, min(max(float(value), lo), hi))


class SimulatedDevice:
    """One simulated device: its model, register map, current snapshot and Modbus server."""

    def __init__(self, name: str, model: DeviceModel, profile: DeviceProfile, host: str, port: int) -> None:
        self.name = name
        self.kind = model.kind
        self.model = model
        self.profile = profile
        self.host = host
        self.port = port
        """TCP port; the real one once listening (also when configured as 0)."""
        self.unit_id = UNIT_ID
        self._input = _Table([p for p in profile.points if p.table == "input"])
        self._holding = _Table([p for p in profile.points if p.table == "holding"])
        if any(p.table in ("coil", "discrete") for p in profile.points):
            raise ValueError(f"profile {profile.name}: coils/discrete inputs are not simulated")
        missing = {p.name for p in profile.points} - set(model.reading)
        if missing:
            raise ValueError(f"model {type(model).__name__} lacks profile points {sorted(missing)}")
        self._words: dict[str, list[int]] = {"input": [], "holding": []}
        self.visible: dict[str, Reading] = {}
        """Values a client decoding the registers gets right now (quantised)."""
        self.visible_since_ms = 0
        """Wall-clock epoch ms at which ``visible`` was published."""
        self.failed = False
        self.server: ModbusTcpServer | None = None
        self.on_write: Callable[[SimulatedDevice], None] | None = None
        """Called after a client changed a setting (the runner republishes and logs the truth)."""

    def publish(self, t_ms: int) -> None:
        """Make the model's current reading what clients see (atomically: no await here)."""
        input_words = self._input.encode(self.model.reading)
        holding_words = self._holding.encode(self.model.reading)
        visible = self._input.decode(input_words)
        visible.update(self._holding.decode(holding_words))
        self._words = {"input": input_words, "holding": holding_words}
        self.visible = visible
        self.visible_since_ms = t_ms

    def truth_record(self) -> dict[str, Any]:
        """The ground-truth log line for the current snapshot."""
        return {"t": self.visible_since_ms, "device": self.name, "kind": self.kind, "values": self.visible}

    def simdevice(self) -> SimDevice:
        """pymodbus datastore for this device (coils, discrete inputs, holding, input registers)."""
        no_bits = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
        return SimDevice(
            id=0,  # 0 = answer every unit id
            simdata=(no_bits, list(no_bits), self._holding.simdata(), self._input.simdata()),
            action=self._on_request,
        )

    async def _on_request(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        # pymodbus calls this before reading or writing `registers` (the whole table, from
        # `start_address`, which is always 0 here); nothing in here awaits.
        if function_code in _BIT_FCS:
            return ExcCodes.ILLEGAL_FUNCTION
        table = "holding" if function_code in _WRITE_FCS else _READ_FCS.get(function_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        if set_values is not None:
            error = self._write(address, [int(v) for v in set_values])
            if error is not None:
                return error
        words = self._words[table]
        registers[start_address : start_address + len(words)] = words
        return None

    def _write(self, address: int, values: list[int]) -> ExcCodes | None:
        table = self._holding
        targets: dict[str, Point] = {}
        for a in range(address, address + len(values)):
            p = table.owner.get(a)
            if p is None or not p.writable:
                return ExcCodes.ILLEGAL_ADDRESS
            targets[p.name] = p
        if any(p.address < address or p.address + p.registers > address + len(values)
               for p in targets.values()):
            return ExcCodes.ILLEGAL_ADDRESS  # a multi-register value must be written whole
        words = list(self._words["holding"])
        words[address : address + len(values)] = values
        decoded: dict[str, float] = {}
        for name, p in targets.items():
            try:
                value = codec.decode(p, words[p.address : p.address + p.registers])
            except codec.DecodeError:
                return ExcCodes.ILLEGAL_VALUE
            if isinstance(value, str) or (p.min is not None and value < p.min) or (
                    p.max is not None and value > p.max):
                return ExcCodes.ILLEGAL_VALUE
            decoded[name] = float(value)
        try:
            for name, value in decoded.items():
                self.model.write_setting(name, value)
        except ValueError:
            return ExcCodes.ILLEGAL_VALUE
        log.info("setting written", device=self.name, **decoded)
        if self.on_write is not None:
            self.on_write(self)
        return None


class _TruthLog:
    """Appends JSON lines from a worker thread, so file I/O never blocks the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[list[dict[str, Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._file: TextIO | None = None

    async def open(self) -> None:
        self._file = await asyncio.to_thread(self.path.open, "a", encoding="utf-8")
        self._thread = threading.Thread(target=self._run, name="truth-log", daemon=True)
        self._thread.start()

    def put(self, records: list[dict[str, Any]]) -> None:
        self._queue.put(records)

    def _run(self) -> None:
        assert self._file is not None
        f = self._file
        while True:
            batch = self._queue.get()
            stop = batch is None
            lines = [] if batch is None else batch
            # Drain what queued up meanwhile, then flush once: one flush per tick at most.
            while not stop:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                else:
                    lines.extend(more)
            if lines:
                f.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in lines))
                f.flush()
            if stop:
                f.close()
                return

    async def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None


class Simulators:
    """All simulated devices of one run, their servers and the tick loop."""

    def __init__(self, config: SimConfig) -> None:
        """Build the models (raises ``ValueError``/``FaultError`` on bad options); nothing listens yet."""
        config.check()
        self.config = config
        profiles: dict[str, DeviceProfile] = {}
        self.devices: list[SimulatedDevice] = []
        counters: dict[str, int] = {}
        for index, (name, kind) in enumerate(config.device_names()):
            counters[kind] = counters.get(kind, 0) + 1
            try:
                model = make_model(config, name, kind, counters[kind])
            except ValueError as exc:  # FaultError included
                raise type(exc)(f"{name}: {exc}") from None
            profile = profiles.setdefault(model.profile_name, builtin_profile(model.profile_name))
            port = config.base_port + index if config.base_port else 0
            device = SimulatedDevice(name, model, profile, config.host, port)
            device.on_write = self._republish
            self.devices.append(device)
        self._by_name = {d.name: d for d in self.devices}
        self._truth = _TruthLog(config.truth_log) if config.truth_log else None
        self._clock: asyncio.Task[None] | None = None
        self._behind_warned = False
        self._stepped = asyncio.Event()
        self.started = False

    def device(self, name: str) -> SimulatedDevice:
        """The device called ``name`` (``KeyError`` if none)."""
        return self._by_name[name]

    @property
    def steps(self) -> int:
        """Ticks stepped so far (the same for every device)."""
        return self.devices[0].model.steps

    def ready_message(self) -> dict[str, Any]:
        """The JSON object the CLI prints once every server listens."""
        return {"event": "ready", "devices": [
            {"name": d.name, "kind": d.kind, "profile": d.profile.name, "host": d.host, "port": d.port}
            for d in self.devices
        ]}

    async def start(self) -> None:
        """Listen on every device's port and start the clock; raises :class:`SimulatorStartError`."""
        if self._truth is not None:
            try:
                await self._truth.open()
            except OSError as exc:
                raise SimulatorStartError(f"cannot open truth log {self.config.truth_log}: {exc}") from None
        self._publish_all()
        try:
            for d in self.devices:
                await self._listen(d)
        except BaseException:
            await self.stop()
            raise
        self.started = True
        if self.config.speed > 0:
            self._clock = asyncio.create_task(self._run_clock(), name="sim-clock")
        log.info("simulators ready", devices=len(self.devices), tick=self.config.tick,
                 speed=self.config.speed, seed=self.config.seed)

    async def _listen(self, d: SimulatedDevice) -> None:
        identity = ModbusDeviceIdentification(info_name={  # type: ignore[no-untyped-call]
            "VendorName": d.profile.profile.manufacturer,
            "ProductCode": d.profile.name,
            "ModelName": d.profile.profile.model,
        })
        server = ModbusTcpServer(d.simdevice(), address=(d.host, d.port), identity=identity)
        try:
            await server.serve_forever(background=True)
        except RuntimeError:
            raise SimulatorStartError(_bind_error(d.name, d.host, d.port)) from None
        d.server = server
        if d.port == 0:
            d.port = _bound_port(server)
        log.info("device listening", device=d.name, kind=d.kind, host=d.host, port=d.port, unit_id=UNIT_ID,
                 faults=d.model.active_faults())

    async def stop(self) -> None:
        """Stop the clock and every server, then close the truth log (idempotent)."""
        if self._clock is not None:
            self._clock.cancel()
            # A clock that died has already logged why; stopping must still release the ports.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._clock
            self._clock = None
        for d in self.devices:
            if d.server is not None:
                await d.server.shutdown()  # type: ignore[no-untyped-call]
                d.server = None
        if self._truth is not None:
            await self._truth.close()
        if self.started:
            log.info("simulators stopped", steps=self.steps)
        self.started = False

    def step(self, n: int = 1) -> None:
        """Advance every model by ``n`` ticks now and publish the result (also while the clock runs)."""
        tick = self.config.tick
        for d in self.devices:
            if d.failed:
                continue
            try:
                for _ in range(n):
                    d.model.step(tick)
            except Exception:
                # Keep serving the last good values; the other devices carry on.
                d.failed = True
                log.exception("device model failed; its registers are frozen", device=d.name)
        self._publish_all()
        self._stepped.set()

    def _publish_all(self) -> None:
        t_ms = time.time_ns() // 1_000_000
        for d in self.devices:
            d.publish(t_ms)
        if self._truth is not None:
            self._truth.put([d.truth_record() for d in self.devices])

    def _republish(self, d: SimulatedDevice) -> None:
        d.publish(time.time_ns() // 1_000_000)
        if self._truth is not None:
            self._truth.put([d.truth_record()])

    async def _run_clock(self) -> None:
        # Ticks are scheduled against a fixed origin so wall-clock jitter never accumulates; the
        # simulated state only depends on how many whole ticks were stepped.
        loop = asyncio.get_running_loop()
        period = self.config.tick / self.config.speed
        origin = loop.time()
        done = 0
        while True:
            due = int((loop.time() - origin) / period)
            if due <= done:
                await asyncio.sleep(max(0.0, origin + (done + 1) * period - loop.time()))
                continue
            n = due - done
            if n > MAX_CATCH_UP_TICKS:
                if not self._behind_warned:
                    log.warning("simulation cannot keep up with --speed; simulated time runs slower",
                                behind_ticks=n)
                    self._behind_warned = True
                origin += (n - MAX_CATCH_UP_TICKS) * period
                n = MAX_CATCH_UP_TICKS
            try:
                self.step(n)
            except Exception:
                log.exception("simulation clock failed; served values are frozen")
                raise
            done += n
            await asyncio.sleep(0)  # let clients in between catch-up batches

    async def wait_steps(self, steps: int) -> None:
        """Wait until at least ``steps`` ticks were stepped in total (wrap in ``asyncio.timeout``)."""
        while self.steps < steps:
            self._stepped.clear()
            await self._stepped.wait()


def _bound_port(server: ModbusTcpServer) -> int:
    listener = server.transport
    if not isinstance(listener, asyncio.Server) or not listener.sockets:
        raise SimulatorStartError("pymodbus server has no listening socket")
    return int(listener.sockets[0].getsockname()[1])


def _bind_error(name: str, host: str, port: int) -> str:
    # pymodbus only says "could not start"; binding ourselves recovers the operating system's reason.
    reason = "cannot bind"
    try:
        probe = socket.create_server((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return f"port {port} on {host} is already in use (device {name})"
        reason = exc.strerror or str(exc)
    else:
        probe.close()
    return f"cannot listen on {host} port {port} (device {name}): {reason}"


@contextlib.asynccontextmanager
async def run_simulators(config: SimConfig) -> AsyncIterator[Simulators]:
    """Start the simulators, yield them while they serve, stop them on exit.

    ``async with run_simulators(SimConfig(boilers=1, meters=1, base_port=0)) as sim: ...``
    """
    sim = Simulators(config)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()
