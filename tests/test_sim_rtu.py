"""Modbus RTU on a pseudo-terminal: several devices on one bus, framing, broadcast, wire timing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import tty
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusSerialClient, ModbusSerialClient
from pymodbus.exceptions import ModbusIOException

from firmware_sim.line import LineSettings
from firmware_sim.server import SimConfig, SimulatedDevice, Simulators, run_simulators
from protocol import codec
from tests.test_sim_modbus import REPO, cli_procs, decode_table, read_ready, start_cli, table_span

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning")
__all__ = ["cli_procs"]  # a fixture, used below

LINE = LineSettings(baudrate=19200, parity="E", stopbits=1)


def crc16(data: bytes) -> bytes:
    """Modbus CRC-16 (poly 0xA001, init 0xFFFF), low byte first: written here, not taken from pymodbus."""
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return struct.pack("<H", crc)


def frame(unit: int, pdu: bytes) -> bytes:
    body = bytes([unit]) + pdu
    return body + crc16(body)


def read_request(unit: int, fc: int, address: int, count: int) -> bytes:
    return frame(unit, struct.pack(">BHH", fc, address, count))


@contextlib.asynccontextmanager
async def rtu_client(path: str, timeout: float = 1.0) -> AsyncIterator[AsyncModbusSerialClient]:
    # Parity N on the client side: Linux ptys are always 8N1 and glibc's tcsetattr fails with
    # EINVAL when pymodbus re-applies "E" after opening (docs/simulators.md). The simulated wire
    # is still 8E1: its timing counts 11 bits per character.
    client = AsyncModbusSerialClient(port=path, baudrate=19200, parity="N", stopbits=1, bytesize=8,
                                     timeout=timeout, retries=0)
    assert await client.connect()
    try:
        yield client
    finally:
        client.close()


async def read_all(client: AsyncModbusSerialClient, device: SimulatedDevice) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for table, read in (("input", client.read_input_registers), ("holding", client.read_holding_registers)):
        if any(p.table == table for p in device.profile.points):
            rr = await read(0, count=table_span(device.profile, table), device_id=device.unit_id)
            assert not rr.isError(), rr
            values.update(decode_table(device.profile, table, rr.registers))
    return values


@contextlib.contextmanager
def raw_port(path: str) -> Iterator[int]:
    """The bus' slave end opened without pymodbus, to write arbitrary bytes."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd)
    try:
        yield fd
    finally:
        os.close(fd)


async def exchange(fd: int, data: bytes, expect: int, timeout: float = 0.4) -> bytes:
    """Write ``data`` and collect what comes back until ``expect`` bytes or ``timeout``."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    enough: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        with contextlib.suppress(BlockingIOError):
            got.extend(os.read(fd, 4096))
        if len(got) >= expect and not enough.done():
            enough.set_result(None)

    loop.add_reader(fd, readable)
    try:
        os.write(fd, data)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(enough, timeout)
    finally:
        loop.remove_reader(fd)
    return bytes(got)


@pytest.fixture
async def rtu_sim() -> AsyncIterator[Simulators]:
    """boiler-1 (unit 1) and meter-1 (unit 2) on one bus at 19200 8E1, clock stopped."""
    config = SimConfig(boilers=1, meters=1, rtu=True, speed=0, seed=5, start_hour=7.0, pad_registers=125)
    async with run_simulators(config) as sim:
        yield sim


async def test_two_devices_on_one_bus_serve_their_visible_values(rtu_sim: Simulators) -> None:
    sim = rtu_sim
    boiler, meter = sim.device("boiler-1"), sim.device("meter-1")
    assert sim.bus is not None and sim.bus.path.startswith("/dev/pts/")
    assert (boiler.unit_id, meter.unit_id) == (1, 2)
    assert sim.ready_message()["devices"] == [
        {"name": "boiler-1", "kind": "boiler", "profile": "sim-boiler", "transport": "rtu", "serial": sim.bus.path,
         "unit_id": 1, "baudrate": 19200, "parity": "E", "stopbits": 1, "bytesize": 8},
        {"name": "meter-1", "kind": "meter", "profile": "sim-meter", "transport": "rtu", "serial": sim.bus.path,
         "unit_id": 2, "baudrate": 19200, "parity": "E", "stopbits": 1, "bytesize": 8},
    ]
    sim.step(30)
    async with rtu_client(sim.bus.path) as client:
        first = {d.name: await read_all(client, d) for d in (boiler, meter)}
        assert first == {"boiler-1": boiler.visible, "meter-1": meter.visible}
        assert 40.0 < first["boiler-1"]["flow_temp"] < 90.0 and first["boiler-1"]["flow_setpoint"] == 70.0
        assert first["meter-1"]["voltage"] > 200.0
        sim.step(60)
        second = {d.name: await read_all(client, d) for d in (boiler, meter)}
        assert second == {"boiler-1": boiler.visible, "meter-1": meter.visible}
        assert second["meter-1"]["energy_import"] > first["meter-1"]["energy_import"]
        # Writes and Modbus exceptions travel over RTU like over TCP.
        point = boiler.profile.point("flow_setpoint")
        rr = await client.write_register(0, codec.encode(point, 55.5)[0], device_id=1)
        assert not rr.isError() and boiler.model.reading["flow_setpoint"] == 55.5
        rr = await client.write_register(0, codec.encode(point, 90.0)[0], device_id=1)
        assert rr.isError() and rr.exception_code == 3
        rr = await client.read_input_registers(125, count=1, device_id=2)  # past the 125 padded registers
        assert rr.isError() and rr.exception_code == 2
        rr = await client.read_coils(0, count=1, device_id=1)
        assert rr.isError() and rr.exception_code == 1


async def test_other_unit_ids_get_no_answer(rtu_sim: Simulators) -> None:
    assert rtu_sim.bus is not None
    async with rtu_client(rtu_sim.bus.path, timeout=0.3) as client:
        for unit in (7, 3, 247):
            started = time.monotonic()
            with pytest.raises(ModbusIOException):
                await client.read_input_registers(0, count=1, device_id=unit)
            assert time.monotonic() - started >= 0.29
        rr = await client.read_input_registers(0, count=1, device_id=1)
        assert not rr.isError()
    # Not even an answer under another unit id: nothing at all comes back.
    with raw_port(rtu_sim.bus.path) as fd:
        assert await exchange(fd, read_request(7, 4, 0, 1), 1, timeout=0.2) == b""
        assert len(await exchange(fd, read_request(1, 4, 0, 1), 7)) == 7


async def test_bad_crc_is_ignored_and_next_request_answered(rtu_sim: Simulators) -> None:
    bus = rtu_sim.bus
    assert bus is not None
    boiler = rtu_sim.device("boiler-1")
    good = read_request(1, 4, 0, 2)
    bad = good[:-1] + bytes([good[-1] ^ 0x01])
    with raw_port(bus.path) as fd:
        assert await exchange(fd, bad, 1, timeout=0.3) == b""
        assert bus.frames_ignored == 1
        await asyncio.sleep(0.01)
        answer = await exchange(fd, good, 9)
    # 01 04 04 <flow_temp> <return_temp> CRC
    assert len(answer) == 9 and answer[:3] == b"\x01\x04\x04"
    assert answer[-2:] == crc16(answer[:-2])
    flow, ret = struct.unpack(">hh", answer[3:7])
    assert (flow / 10, ret / 10) == (boiler.visible["flow_temp"], boiler.visible["return_temp"])


@pytest.mark.parametrize("noise", [
    bytes(range(0x80, 0xA0)),                    # nothing like a frame
    read_request(1, 4, 0, 2)[:5],                # a request cut short, then silence
    frame(1, b"\x41\x00\x00"),                   # unknown function code
    b"\x01\x10\x00\x00\x00\x7f\xfe\x00\x01",     # write-multiple announcing 254 bytes that never come
    b"\x00" * 300,                               # longer than any frame
    b"\x01\x04\x00\x00\x00\x02" + b"\x55" * 40,  # a frame drowned in noise (CRC can never match)
], ids=["noise", "truncated", "unknown-fc", "long-announced", "overlong", "drowned"])
async def test_garbage_does_not_wedge_the_bus(rtu_sim: Simulators, noise: bytes) -> None:
    bus = rtu_sim.bus
    assert bus is not None
    with raw_port(bus.path) as fd:
        assert await exchange(fd, noise, 1, timeout=0.2) == b""
        await asyncio.sleep(0.01)  # the line falls silent: the bus resynchronises
        answer = await exchange(fd, read_request(2, 4, 4, 1), 7)
    assert bus.frames_ignored >= 1
    assert answer[:3] == b"\x02\x04\x02" and answer[-2:] == crc16(answer[:-2])
    assert struct.unpack(">H", answer[3:5])[0] / 10 == rtu_sim.device("meter-1").visible["voltage"]


async def test_back_to_back_requests_in_one_write_are_all_answered(rtu_sim: Simulators) -> None:
    assert rtu_sim.bus is not None
    with raw_port(rtu_sim.bus.path) as fd:
        answers = await exchange(fd, read_request(1, 4, 0, 1) + read_request(2, 4, 0, 1), 14)
    assert answers[:3] == b"\x01\x04\x02" and answers[7:10] == b"\x02\x04\x02"


async def test_broadcast_write_is_applied_and_not_answered(rtu_sim: Simulators) -> None:
    boiler = rtu_sim.device("boiler-1")
    assert rtu_sim.bus is not None
    point = boiler.profile.point("flow_setpoint")
    write = frame(0, struct.pack(">BHH", 6, 0, codec.encode(point, 48.5)[0]))
    with raw_port(rtu_sim.bus.path) as fd:
        assert await exchange(fd, write, 1, timeout=0.3) == b""
    assert boiler.model.reading["flow_setpoint"] == 48.5
    async with rtu_client(rtu_sim.bus.path) as client:
        rr = await client.read_holding_registers(0, count=1, device_id=1)
        assert codec.decode(point, rr.registers) == 48.5


async def timed_reads(path: str, n: int) -> float:
    async with rtu_client(path, timeout=2.0) as client:
        rr = await client.read_input_registers(0, count=125, device_id=1)  # warm-up, not timed
        assert not rr.isError() and len(rr.registers) == 125
        started = time.perf_counter()
        for _ in range(n):
            rr = await client.read_input_registers(0, count=125, device_id=1)
            assert not rr.isError() and len(rr.registers) == 125
        return time.perf_counter() - started


async def test_line_timing_matches_19200_baud(rtu_sim: Simulators) -> None:
    assert rtu_sim.bus is not None
    n = 20
    request, response = 8, 3 + 2 * 125 + 2
    # Each exchange: request and response on the wire plus the t3.5 silence before the answer.
    theory = n * ((request + response) * 11 / 19200 + LINE.t35)
    elapsed = await timed_reads(rtu_sim.bus.path, n)
    assert 0.95 * theory <= elapsed <= 1.30 * theory, (elapsed, theory)
    # One exchange on an idle bus: the answer's last byte is not there before it could be.
    single = theory / n
    await asyncio.sleep(0.05)
    with raw_port(rtu_sim.bus.path) as fd:
        started = time.perf_counter()
        answer = await exchange(fd, read_request(1, 4, 0, 125), response, timeout=1.0)
        latency = time.perf_counter() - started
    assert len(answer) == response
    assert 0.97 * single <= latency <= single + 0.1, (latency, single)

    fast_config = SimConfig(boilers=1, meters=0, rtu=True, speed=0, pad_registers=125, line_timing=False)
    async with run_simulators(fast_config) as fast:
        assert fast.bus is not None
        fast_elapsed = await timed_reads(fast.bus.path, n)
    assert fast_elapsed < 0.25 * theory, (fast_elapsed, theory)


def test_cli_rtu_ready_line_symlinks_and_sigterm(cli_procs: list[Any], tmp_path: Path) -> None:
    link, iec_prefix = tmp_path / "twin-rtu0", tmp_path / "iec"
    proc = start_cli("--rtu", "--boilers", "2", "--meters", "1", "--baud", "19200", "--rtu-link", str(link),
                     "--iec-meters", "1", "--iec-link-prefix", str(iec_prefix), "--speed", "0",
                     "--log-level", "warning")
    cli_procs.append(proc)
    ready = read_ready(proc)
    serial = os.readlink(link)
    assert serial.startswith("/dev/pts/")
    common = {"transport": "rtu", "serial": serial, "baudrate": 19200, "parity": "E", "stopbits": 1,
              "bytesize": 8, "link": str(link)}
    iec_serial = os.readlink(tmp_path / "iec1")
    assert ready == {"event": "ready", "devices": [
        {"name": "boiler-1", "kind": "boiler", "profile": "sim-boiler", "unit_id": 1, **common},
        {"name": "boiler-2", "kind": "boiler", "profile": "sim-boiler", "unit_id": 2, **common},
        {"name": "meter-1", "kind": "meter", "profile": "sim-meter", "unit_id": 3, **common},
        {"name": "iec-meter-1", "kind": "meter", "profile": "iec-meter", "transport": "iec62056",
         "serial": iec_serial, "link": str(tmp_path / "iec1")},
    ]}
    assert iec_serial.startswith("/dev/pts/") and iec_serial != serial
    # A synchronous client through the stable link, as the edge agent would be configured.
    client = ModbusSerialClient(port=str(link), baudrate=19200, parity="N", stopbits=1, bytesize=8,
                                timeout=1, retries=0)
    assert client.connect()
    try:
        rr = client.read_input_registers(4, count=1, device_id=3)
        assert not rr.isError() and 2000 < rr.registers[0] < 2600  # meter voltage, 0.1 V
        rr = client.read_holding_registers(0, count=1, device_id=2)
        assert not rr.isError() and rr.registers == [700]
    finally:
        client.close()
    if shutil.which("mbpoll"):
        # libmodbus configures 8E1 once per open (and restores on close): even parity works.
        for _ in range(2):
            out = subprocess.run(["mbpoll", "-m", "rtu", "-a", "2", "-b", "19200", "-P", "even", "-t", "4",
                                  "-r", "1", "-c", "1", "-1", "-o", "1", str(link)],
                                 capture_output=True, text=True, timeout=10)
            assert out.returncode == 0, out.stdout + out.stderr
            assert "[1]: \t700" in out.stdout
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0
    assert not link.exists() and not link.is_symlink()
    assert not (tmp_path / "iec1").is_symlink()
    assert proc.stdout is not None and proc.stdout.read() == ""


def test_cli_rtu_bad_options_are_usage_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-link"
    blocker.mkdir()
    for args, message in (
        (["--rtu", "--rtu-first-unit", "247", "--boilers", "2"], "outside 1..247"),
        (["--rtu", "--baud", "0"], "baud rate"),
        (["--rtu", "--rtu-link", str(blocker)], "not a symlink"),
    ):
        proc = subprocess.run([sys.executable, "-m", "firmware_sim.cli", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=15)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr
        assert proc.stdout == ""
