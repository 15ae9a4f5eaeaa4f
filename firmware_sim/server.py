"""Serve simulated devices: Modbus TCP (one server per device), Modbus RTU (one bus on a pty) and
IEC 62056-21 meters (one pty each), all in one asyncio loop.

Registers are served through pymodbus' ``SimDevice`` datastore (the non-deprecated one in pymodbus
3.16; addresses are the 0-based protocol addresses, as in our profiles). Its ``action`` hook runs
on every request before pymodbus touches the registers: it copies the device's current snapshot
into the register block, so a request always sees one complete tick, and it hands writes of
settings to the model. The tick loop replaces each device's snapshot with plain assignments and no
``await`` in between, so a client can never observe a half-updated device.

Over TCP every device answers any unit id (0 and 1 included), like most Modbus TCP end devices;
1 is the documented one. On the RTU bus (:mod:`firmware_sim.rtu`) each device answers only its own.

Communication faults (:mod:`firmware_sim.inject`) are applied per request by each transport; over
TCP by a pymodbus request handler that decides before executing and damages the encoded answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import queue
import re
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ExceptionResponse
from pymodbus.pdu.device import ModbusDeviceIdentification
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import DataType, SimData, SimDevice

from firmware_sim.boiler import BoilerModel
from firmware_sim.iec import BAUD_CHARS, IecMeter
from firmware_sim.inject import DAMAGING_FAULTS, FaultInjector, InjectSpec, rates_for
from firmware_sim.line import LineSettings
from firmware_sim.meter import MeterModel
from firmware_sim.model import DeviceModel
from firmware_sim.rtu import RtuBus
from firmware_sim.truth import TruthSource
from protocol import codec
from protocol.logs import get_logger
from protocol.profile import DeviceProfile, Point, builtin_profile

log = get_logger("firmware_sim.server")

UNIT_ID = 1
"""Unit (slave) id the simulated TCP devices are documented to answer (they accept any)."""
MAX_RTU_UNIT = 247
"""Highest unit id a Modbus RTU device may have (248-255 are reserved)."""
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
    pad_registers: int = 0
    """Serve at least this many input and holding registers from address 0 (zeros beyond the
    profile), so that profile-independent reads (e.g. 125 registers at 0) are answered."""
    rtu: bool = False
    """Serve the boilers and meters on one Modbus RTU bus (a pty) instead of TCP."""
    rtu_link: Path | None = None
    """Symlink to the RTU bus' pty (e.g. /tmp/twin-rtu0), replaced if it exists, removed at stop."""
    rtu_first_unit: int = 1
    """Unit id of device 0 on the RTU bus; device ``i`` answers ``rtu_first_unit + i``."""
    line: LineSettings = field(default_factory=LineSettings)
    """RTU line settings (baud rate, parity, stop bits; 8 data bits)."""
    line_timing: bool = True
    """Emulate the wire time of the serial lines (RTU and IEC); False answers at once."""
    iec_meters: int = 0
    """Number of IEC 62056-21 meters ``iec-meter-1..K``, each on its own pty."""
    iec_link_prefix: Path | None = None
    """Symlinks ``<prefix>1``, ``<prefix>2``, ... to the IEC meters' ptys."""
    iec_address: str | None = None
    """Device address IEC meters require in a sign-on that carries one (None: accept any)."""
    iec_baud_char: str = "5"
    """Mode C baud-rate character the IEC meters offer ('5' = 9600 baud)."""
    inject: Sequence[InjectSpec] = ()
    """Communication fault rates (``--inject``)."""
    dead_time: float = 5.0
    """Seconds an RTU device stays silent after an injected ``disconnect``."""

    def device_names(self) -> list[tuple[str, str]]:
        """(name, kind) of every Modbus device, in port/unit order: ``boiler-1..N`` then ``meter-1..M``."""
        return ([(f"boiler-{i}", "boiler") for i in range(1, self.boilers + 1)]
                + [(f"meter-{i}", "meter") for i in range(1, self.meters + 1)])

    def iec_names(self) -> list[str]:
        """Names of the IEC 62056-21 meters: ``iec-meter-1..K``."""
        return [f"iec-meter-{i}" for i in range(1, self.iec_meters + 1)]

    def check(self) -> None:
        """Raise ``ValueError`` naming the first invalid option."""
        if self.boilers < 0 or self.meters < 0 or self.iec_meters < 0:
            raise ValueError("--boilers, --meters and --iec-meters must be >= 0")
        if self.boilers + self.meters + self.iec_meters == 0:
            raise ValueError("need at least one device (--boilers, --meters or --iec-meters)")
        if not (math.isfinite(self.tick) and self.tick > 0):
            raise ValueError(f"tick must be > 0 seconds, got {self.tick}")
        if not (math.isfinite(self.speed) and self.speed >= 0):
            raise ValueError(f"speed must be >= 0, got {self.speed}")
        last = self.base_port + self.boilers + self.meters - 1
        if not self.rtu and (self.base_port < 0 or (self.base_port and last > 65535)):
            raise ValueError(f"ports {self.base_port}..{last} are outside 1..65535")
        if not 0 <= self.pad_registers <= 65536:
            raise ValueError(f"pad_registers must be in 0..65536, got {self.pad_registers}")
        self.line.check()
        last_unit = self.rtu_first_unit + self.boilers + self.meters - 1
        if self.rtu and not (self.rtu_first_unit >= 1 and last_unit <= MAX_RTU_UNIT):
            raise ValueError(f"RTU unit ids {self.rtu_first_unit}..{last_unit} are outside 1..{MAX_RTU_UNIT}")
        if self.iec_baud_char not in BAUD_CHARS:
            raise ValueError(f"IEC baud character must be one of {''.join(BAUD_CHARS)}, got {self.iec_baud_char!r}")
        if self.iec_address is not None and not re.fullmatch(r"[0-9A-Za-z ]{1,32}", self.iec_address):
            raise ValueError(f"IEC address must be 1-32 letters, digits or spaces, got {self.iec_address!r}")
        if not (math.isfinite(self.dead_time) and self.dead_time >= 0):
            raise ValueError(f"dead time must be >= 0 seconds, got {self.dead_time}")
        names = {name for name, _ in self.device_names()} | set(self.iec_names())
        for device in self.faults:
            if device not in names:
                raise ValueError(f"fault for unknown device {device!r}; devices are {sorted(names)}")
        for spec in self.inject:
            if spec.device is not None and spec.device not in names:
                raise ValueError(f"--inject for unknown device {spec.device!r}; devices are {sorted(names)}")
        for name, _ in self.device_names():
            rates_for(self.inject, name)
        for name in self.iec_names():
            rates_for(self.inject, name, iec=True)


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

    def __init__(self, points: list[Point], pad: int = 0) -> None:
        self.points = sorted(points, key=lambda p: p.address)
        self.size = max((p.address + p.registers for p in self.points), default=0)
        if self.size or pad:
            self.size = max(self.size, pad)  # padding words read as 0 and refuse writes
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


class SimulatedDevice(TruthSource):
    """One simulated Modbus device: its model, register map, current snapshot and server."""

    def __init__(self, name: str, model: DeviceModel, profile: DeviceProfile, host: str, port: int, *,
                 unit_id: int = UNIT_ID, pad_registers: int = 0, injector: FaultInjector | None = None) -> None:
        self.name = name
        self.kind = model.kind
        self.model = model
        self.profile = profile
        self.host = host
        self.port = port
        """TCP port; the real one once listening (also when configured as 0). 0 on an RTU bus."""
        self.unit_id = unit_id
        """The unit id this device is documented to answer (on an RTU bus: the only one)."""
        self.transport = "tcp"
        """``tcp`` or ``rtu``."""
        self.bus: RtuBus | None = None
        """The RTU bus serving this device, if any."""
        self.injector = injector if injector is not None else FaultInjector(name, {}, 0)
        self._input = _Table([p for p in profile.points if p.table == "input"], pad_registers)
        self._holding = _Table([p for p in profile.points if p.table == "holding"], pad_registers)
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

    @property
    def serial(self) -> str:
        """Slave path of the RTU bus' pty ("" over TCP)."""
        return self.bus.path if self.bus is not None else ""

    def advance(self, dt: float) -> None:
        """Step the model by ``dt`` simulated seconds."""
        self.model.step(dt)

    def ready_entry(self) -> dict[str, Any]:
        """This device in the ready line."""
        entry: dict[str, Any] = {"name": self.name, "kind": self.kind, "profile": self.profile.name,
                                 "transport": self.transport}
        if self.bus is None:
            entry.update(host=self.host, port=self.port, unit_id=self.unit_id)
            return entry
        line = self.bus.line
        entry.update(serial=self.bus.path, unit_id=self.unit_id, baudrate=line.baudrate, parity=line.parity,
                     stopbits=line.stopbits, bytesize=line.bytesize)
        if self.bus.port.link is not None:
            entry["link"] = str(self.bus.port.link)
        return entry

    def publish(self, t_ms: int) -> None:
        """Make the model's current reading what clients see (atomically: no await here)."""
        input_words = self._input.encode(self.model.reading)
        holding_words = self._holding.encode(self.model.reading)
        visible = self._input.decode(input_words)
        visible.update(self._holding.decode(holding_words))
        self._words = {"input": input_words, "holding": holding_words}
        self.visible = visible
        self.visible_since_ms = t_ms


    def simdevice(self, device_id: int = 0) -> SimDevice:
        """pymodbus datastore for this device (coils, discrete inputs, holding, input registers).

        ``device_id`` 0 answers every unit id (TCP); on an RTU bus it is the device's unit id.
        """
        no_bits = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
        return SimDevice(
            id=device_id,
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


class _InjectingHandler(ServerRequestHandler):
    """pymodbus' per-connection request handler, with communication faults injected.

    The fault is decided before the request runs, so ``timeout``, ``exception`` and ``disconnect``
    execute nothing; ``crc``, ``garbage`` and ``short`` let pymodbus execute and encode the answer
    and then damage the bytes on their way out (:meth:`send` is the transport write pymodbus calls).
    """

    def __init__(self, owner: _InjectingTcpServer) -> None:
        super().__init__(owner, owner.trace_packet, owner.trace_pdu, owner.trace_connect)  # type: ignore[no-untyped-call]
        self._injector = owner.injector
        self._damage: str | None = None

    async def handle_request(self) -> None:
        pdu = self.last_pdu
        if pdu is None:
            return
        fault = self._injector.draw()
        if fault is None:
            await super().handle_request()  # type: ignore[no-untyped-call]
            return
        self._injector.record(fault, transport="tcp", function_code=pdu.function_code)
        if fault == "timeout":
            return
        if fault == "disconnect":
            self.close()
            return
        if fault not in DAMAGING_FAULTS:  # exception
            answer = ExceptionResponse(pdu.function_code, ExcCodes.DEVICE_FAILURE, device_id=pdu.dev_id,
                                       transaction=pdu.transaction_id)
            self.server_send(answer, self.last_addr)  # type: ignore[no-untyped-call]
            return
        self._damage = fault
        try:
            await super().handle_request()  # type: ignore[no-untyped-call]
        finally:
            self._damage = None

    def send(self, data: bytes, addr: tuple[Any, ...] | None = None) -> None:
        if self._damage is not None:
            data = self._injector.damage_tcp(self._damage, data)
        super().send(data, addr)


class _InjectingTcpServer(ModbusTcpServer):
    """A pymodbus TCP server whose connections inject the device's communication faults."""

    def __init__(self, context: SimDevice, injector: FaultInjector, **kwargs: Any) -> None:
        self.injector = injector
        super().__init__(context, **kwargs)

    def callback_new_connection(self) -> ServerRequestHandler:
        return _InjectingHandler(self)


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
        """The Modbus devices (boilers, then meters), over TCP or on the RTU bus."""
        counters: dict[str, int] = {}
        for index, (name, kind) in enumerate(config.device_names()):
            counters[kind] = counters.get(kind, 0) + 1
            try:
                model = make_model(config, name, kind, counters[kind])
            except ValueError as exc:  # FaultError included
                raise type(exc)(f"{name}: {exc}") from None
            profile = profiles.setdefault(model.profile_name, builtin_profile(model.profile_name))
            port = config.base_port + index if config.base_port and not config.rtu else 0
            unit_id = config.rtu_first_unit + index if config.rtu else UNIT_ID
            injector = FaultInjector(name, rates_for(config.inject, name), config.seed)
            device = SimulatedDevice(name, model, profile, config.host, port, unit_id=unit_id,
                                     pad_registers=config.pad_registers, injector=injector)
            device.on_write = self._republish
            self.devices.append(device)
        self.bus: RtuBus | None = None
        """The RTU bus (``config.rtu``), None over TCP."""
        if config.rtu and self.devices:
            self.bus = RtuBus(self.devices, config.line, line_timing=config.line_timing,
                              dead_time=config.dead_time, link=config.rtu_link)
            for d in self.devices:
                d.bus = self.bus
                d.transport = "rtu"
        self.iec_meters: list[IecMeter] = []
        """The IEC 62056-21 meters, each on its own pty."""
        for number, name in enumerate(config.iec_names(), start=1):
            try:
                meter = MeterModel(config.seed, stream=2000 + number, start_hour=config.start_hour,
                                   start_kwh=config.meter_start_kwh, faults=config.faults.get(name))
            except ValueError as exc:
                raise type(exc)(f"{name}: {exc}") from None
            link = None
            if config.iec_link_prefix is not None:
                link = config.iec_link_prefix.with_name(f"{config.iec_link_prefix.name}{number}")
            self.iec_meters.append(IecMeter(
                name, number, meter, FaultInjector(name, rates_for(config.inject, name, iec=True), config.seed),
                address=config.iec_address, baud_char=config.iec_baud_char, line_timing=config.line_timing,
                link=link))
        self._by_name = {d.name: d for d in self.devices}
        self._iec_by_name = {m.name: m for m in self.iec_meters}
        self._all: list[SimulatedDevice | IecMeter] = [*self.devices, *self.iec_meters]
        self._truth = _TruthLog(config.truth_log) if config.truth_log else None
        self._clock: asyncio.Task[None] | None = None
        self._behind_warned = False
        self._stepped = asyncio.Event()
        self.started = False

    def device(self, name: str) -> SimulatedDevice:
        """The Modbus device called ``name`` (``KeyError`` if none)."""
        return self._by_name[name]

    def iec_meter(self, name: str) -> IecMeter:
        """The IEC 62056-21 meter called ``name`` (``KeyError`` if none)."""
        return self._iec_by_name[name]

    @property
    def steps(self) -> int:
        """Ticks stepped so far (the same for every device)."""
        return self._all[0].model.steps

    def ready_message(self) -> dict[str, Any]:
        """The JSON object the CLI prints once every device is served."""
        return {"event": "ready", "devices": [d.ready_entry() for d in self._all]}

    async def start(self) -> None:
        """Serve every device and start the clock; raises :class:`SimulatorStartError`."""
        if self._truth is not None:
            try:
                await self._truth.open()
            except OSError as exc:
                raise SimulatorStartError(f"cannot open truth log {self.config.truth_log}: {exc}") from None
        self._publish_all()
        try:
            if self.bus is not None:
                await self._open_bus(self.bus)
            else:
                for d in self.devices:
                    await self._listen(d)
            for m in self.iec_meters:
                await self._open_iec(m)
        except BaseException:
            await self.stop()
            raise
        self.started = True
        if self.config.speed > 0:
            self._clock = asyncio.create_task(self._run_clock(), name="sim-clock")
        log.info("simulators ready", devices=len(self._all), tick=self.config.tick,
                 speed=self.config.speed, seed=self.config.seed)

    async def _listen(self, d: SimulatedDevice) -> None:
        identity = ModbusDeviceIdentification(info_name={  # type: ignore[no-untyped-call]
            "VendorName": d.profile.profile.manufacturer,
            "ProductCode": d.profile.name,
            "ModelName": d.profile.profile.model,
        })
        server = _InjectingTcpServer(d.simdevice(), d.injector, address=(d.host, d.port), identity=identity)
        try:
            await server.serve_forever(background=True)
        except RuntimeError:
            raise SimulatorStartError(_bind_error(d.name, d.host, d.port)) from None
        d.server = server
        if d.port == 0:
            d.port = _bound_port(server)
        log.info("device listening", device=d.name, kind=d.kind, host=d.host, port=d.port, unit_id=UNIT_ID,
                 faults=d.model.active_faults(), injected_rates=d.injector.rates)

    async def _open_bus(self, bus: RtuBus) -> None:
        try:
            await bus.start()
        except OSError as exc:
            raise SimulatorStartError(f"cannot create the RTU bus pty{_link_note(bus.port.link)}: {exc}") from None
        line = bus.line
        for d in self.devices:
            log.info("device on RTU bus", device=d.name, kind=d.kind, serial=bus.path, unit_id=d.unit_id,
                     faults=d.model.active_faults(), injected_rates=d.injector.rates)
        log.info("RTU bus ready", serial=bus.path, link=str(bus.port.link or ""), baudrate=line.baudrate,
                 parity=line.parity, stopbits=line.stopbits, line_timing=bus.line_timing)

    async def _open_iec(self, m: IecMeter) -> None:
        try:
            await m.start()
        except OSError as exc:
            raise SimulatorStartError(f"cannot create the pty of {m.name}{_link_note(m.link)}: {exc}") from None
        log.info("IEC 62056-21 meter ready", device=m.name, serial=m.path, link=str(m.link or ""),
                 baud_char=m.baud_char, faults=m.model.active_faults(), injected_rates=m.injector.rates)

    async def stop(self) -> None:
        """Stop the clock, every server and pty, then close the truth log (idempotent)."""
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
        if self.bus is not None:
            await self.bus.stop()
        for m in self.iec_meters:
            await m.stop()
        if self._truth is not None:
            await self._truth.close()
        if self.started:
            log.info("simulators stopped", steps=self.steps)
        self.started = False

    def step(self, n: int = 1) -> None:
        """Advance every model by ``n`` ticks now and publish the result (also while the clock runs)."""
        tick = self.config.tick
        for d in self._all:
            if d.failed:
                continue
            try:
                for _ in range(n):
                    d.advance(tick)
            except Exception:
                # Keep serving the last good values; the other devices carry on.
                d.failed = True
                log.exception("device model failed; its registers are frozen", device=d.name)
        self._publish_all()
        self._stepped.set()

    def _publish_all(self) -> None:
        t_ms = time.time_ns() // 1_000_000
        for d in self._all:
            d.publish(t_ms)
        if self._truth is not None:
            self._truth.put([d.truth_record() for d in self._all])

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


def _link_note(link: Path | None) -> str:
    return f" or its link {link}" if link is not None else ""


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
