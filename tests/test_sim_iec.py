"""IEC 62056-21 mode C meters on pseudo-terminals, read by a pyserial client written here."""

from __future__ import annotations

import asyncio
import json
import re
import termios
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import serial

from firmware_sim.inject import InjectSpec
from firmware_sim.meter import MeterModel
from firmware_sim.server import SimConfig, Simulators, run_simulators

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning")

BAUDS = {"0": 300, "1": 600, "2": 1200, "3": 2400, "4": 4800, "5": 9600, "6": 19200}
STX, ETX = 0x02, 0x03
LINE_RE = re.compile(r"([0-9A-Z]+(?:\.[0-9A-Z]+)+)\(([^()*]*)(?:\*([^()]*))?\)")


@dataclass
class Readout:
    ident: bytes
    block: bytes
    ident_s: float
    block_s: float


def open_port(path: str, timeout: float) -> serial.Serial:
    """The port at 300 baud 7E1, as a terminal opens it.

    Linux ptys refuse (EINVAL) a configuration that changes nothing but data bits and parity
    (firmware_sim/line.py). The simulator parks the pty's speed so that a client's next open is a
    change, but a client can still come in before the park: then step through another speed, as a
    terminal on a real line never needs to.
    """
    try:
        return serial.Serial(path, 300, bytesize=7, parity="E", stopbits=1, timeout=timeout)
    except termios.error:
        port = serial.Serial(path, 600, bytesize=7, parity="E", stopbits=1, timeout=timeout)
        port.baudrate = 300
        return port


def readout(path: str, *, sign_on: bytes = b"/?!\r\n", ack: bytes | None = None, ack_delay: float = 0.0,
            timeout: float = 3.0) -> Readout:
    """One mode C data readout, as a hand-held terminal does it (blocking: run it in a thread)."""
    with open_port(path, timeout) as port:
        started = time.monotonic()
        port.write(sign_on)
        ident = port.readline()
        ident_s = time.monotonic() - started
        if not ident.endswith(b"\r\n"):
            return Readout(ident, b"", ident_s, 0.0)
        if ack is None:
            ack = b"\x060" + ident[4:5] + b"0\r\n"  # accept the offered speed, data readout
        time.sleep(ack_delay)
        started = time.monotonic()
        port.write(ack)
        port.flush()
        port.baudrate = BAUDS[chr(ack[2])]
        block = port.read_until(bytes([ETX]))
        if block.endswith(bytes([ETX])):
            block += port.read(1)
        return Readout(ident, block, ident_s, time.monotonic() - started)


def parse_block(block: bytes) -> dict[str, tuple[str, str]]:
    """OBIS code -> (value, unit) of a data block whose framing and BCC are right."""
    assert block[0] == STX and block[-2] == ETX, block
    check = 0
    for b in block[1:-1]:
        check ^= b
    assert check == block[-1], "BCC mismatch"
    lines = block[1:-2].decode("ascii").split("\r\n")
    assert lines[-2:] == ["!", ""]
    values: dict[str, tuple[str, str]] = {}
    for line in lines[:-2]:
        m = LINE_RE.fullmatch(line)
        assert m, line
        values[m.group(1)] = (m.group(2), m.group(3) or "")
    return values


@pytest.fixture
async def iec_sim(tmp_path: Path) -> AsyncIterator[Simulators]:
    """One IEC meter at 06:30, clock stopped, ticks of one minute."""
    config = SimConfig(boilers=0, meters=0, iec_meters=1, speed=0, seed=3, tick=60.0, start_hour=6.5,
                       meter_start_kwh=999_997.0, truth_log=tmp_path / "truth.jsonl")
    async with run_simulators(config) as sim:
        yield sim


async def test_mode_c_readout_values_tariffs_bcc_and_timing(iec_sim: Simulators) -> None:
    meter = iec_sim.iec_meter("iec-meter-1")
    iec_sim.step(120)  # 06:30 -> 08:30: half an hour of night tariff, 1.5 hours of day tariff
    r = await asyncio.to_thread(readout, meter.path)
    assert r.ident == b"/TWN5TWIN-IEC-1\r\n"
    values = parse_block(r.block)

    # An independent reference: the same model, stepped here, energy booked by the hour it flowed.
    ref = MeterModel(3, stream=2001, start_hour=6.5, start_kwh=999_997.0)
    day, night = 999_997.0, 0.0
    for _ in range(120):
        hour, before = ref.hour_of_day, ref.counted_kwh
        ref.step(60.0)
        if 7.0 <= hour < 23.0:
            day += ref.counted_kwh - before
        else:
            night += ref.counted_kwh - before
    total = ref.energy_import
    assert total > 1_000_000.0  # the 6-digit register has rolled over
    expect = {
        "1.8.0": (total % 1e6, "kWh"), "1.8.1": (day % 1e6, "kWh"), "1.8.2": (night, "kWh"),
        "2.8.0": (0.0, "kWh"), "16.7.0": (ref.power, "kW"), "32.7.0": (ref.voltage, "V"),
        "31.7.0": (ref.current, "A"), "13.7.0": (ref.power_factor, ""), "14.7.0": (ref.frequency, "Hz"),
    }
    decimals = {"kWh": 3, "kW": 3, "V": 1, "A": 2, "": 3, "Hz": 2}
    for code, (value, unit) in expect.items():
        text, got_unit = values[code]
        assert got_unit == unit, code
        assert float(text) == pytest.approx(value, abs=0.6 * 10 ** -decimals[unit]), code
    assert values["1.8.0"][0] == f"{total - 1_000_000.0:010.3f}"  # zero-padded, 6 + 3 digits
    assert 0.5 < night < 5.0 and day - 999_997.0 > 2 * night
    assert values["0.0.0"] == ("90000001", "")
    assert values["0.9.1"] == ("08:30:00", "") and values["0.9.2"] == ("250101", "")
    # What the client parsed is what the simulator says it served.
    assert meter.visible == {
        name: (values[code][0] if name in ("meter_id", "clock_time", "clock_date") else float(values[code][0]))
        for code, name in [("0.0.0", "meter_id"), ("0.9.1", "clock_time"), ("0.9.2", "clock_date"),
                           ("1.8.0", "energy_import"), ("1.8.1", "energy_import_t1"),
                           ("1.8.2", "energy_import_t2"), ("2.8.0", "energy_export"), ("16.7.0", "power"),
                           ("32.7.0", "voltage"), ("31.7.0", "current"), ("13.7.0", "power_factor"),
                           ("14.7.0", "frequency")]}
    # 300 baud 7E1 = 10 bits per character: sign-on 5 + identification 17 characters, + 200 ms.
    ident_min = (5 + 17) * 10 / 300 + 0.2
    assert ident_min - 0.01 <= r.ident_s < ident_min + 0.4
    block_min = 6 * 10 / 300 + 0.2 + len(r.block) * 10 / 9600
    assert block_min - 0.01 <= r.block_s < block_min + 0.4
    assert meter.readouts == 1


async def test_wrong_sign_on_gets_nothing() -> None:
    # Without line timing an answer would come within milliseconds, so a short wait proves silence.
    config = SimConfig(boilers=0, meters=0, iec_meters=1, speed=0, line_timing=False)
    async with run_simulators(config) as sim:
        meter = sim.iec_meter("iec-meter-1")
        for wrong in (b"/!?\r\n", b"/?!\n", b"?!\r\n", b"/?!!\r\n", b"\x06050\r\n", b"hello\r\n"):
            r = await asyncio.to_thread(readout, meter.path, sign_on=wrong, timeout=0.3)
            assert r.ident == b"", wrong
        # Noise before the start character does not matter; the meter still answers afterwards.
        r = await asyncio.to_thread(readout, meter.path, sign_on=b"\x00\x7f/?!\r\n", timeout=0.3)
        assert r.ident == b"/TWN5TWIN-IEC-1\r\n"
        parse_block(r.block)


async def test_address_option_select_and_inactivity_rules() -> None:
    config = SimConfig(boilers=0, meters=0, iec_meters=2, speed=0, iec_address="12345678", iec_baud_char="4",
                       line_timing=False)
    async with run_simulators(config) as sim:
        path = sim.iec_meter("iec-meter-2").path
        assert path != sim.iec_meter("iec-meter-1").path
        r = await asyncio.to_thread(readout, path, sign_on=b"/?12345678!\r\n")
        assert r.ident == b"/TWN4TWIN-IEC-2\r\n"
        assert parse_block(r.block)["0.0.0"] == ("90000002", "")
        r = await asyncio.to_thread(readout, path, sign_on=b"/?87654321!\r\n", timeout=0.3)
        assert r.ident == b""
        # A baud character above the offered one, programming mode, or another protocol: no data.
        for ack in (b"\x06050\r\n", b"\x06041\r\n", b"\x06140\r\n"):
            r = await asyncio.to_thread(readout, path, ack=ack, timeout=0.3)
            assert r.ident.startswith(b"/TWN4") and r.block == b"", ack
        # 300 baud ('0') is always acceptable.
        r = await asyncio.to_thread(readout, path, ack=b"\x06000\r\n")
        assert parse_block(r.block)["0.0.0"] == ("90000002", "")
        # More than 1.5 s between identification and option select: the meter has given up.
        r = await asyncio.to_thread(readout, path, ack_delay=1.7, timeout=0.3)
        assert r.ident.startswith(b"/TWN4") and r.block == b""
        r = await asyncio.to_thread(readout, path)
        parse_block(r.block)


@pytest.mark.parametrize("kind", ["crc", "short", "garbage", "timeout"])
async def test_fault_injection(kind: str, tmp_path: Path) -> None:
    truth = tmp_path / "truth.jsonl"
    config = SimConfig(boilers=0, meters=0, iec_meters=2, speed=0, line_timing=False, truth_log=truth,
                       inject=(InjectSpec("iec-meter-1", {kind: 1.0}), InjectSpec(None, {"exception": 1.0})))
    async with run_simulators(config) as sim:
        meter, healthy = sim.iec_meter("iec-meter-1"), sim.iec_meter("iec-meter-2")
        for _ in range(2):
            r = await asyncio.to_thread(readout, meter.path, timeout=0.5)
            if kind == "timeout":
                assert r.ident == b""
                continue
            assert r.ident == b"/TWN5TWIN-IEC-1\r\n"
            if kind == "crc":
                assert r.block[0] == STX and r.block[-2] == ETX
                with pytest.raises(AssertionError, match="BCC mismatch"):
                    parse_block(r.block)
            elif kind == "short":
                assert r.block and ETX not in r.block  # cut before the end: the client times out
            else:
                with pytest.raises(AssertionError):
                    parse_block(r.block)
        assert meter.injector.counts == {kind: 2}
        # 'exception' does not apply to IEC meters: the all-devices spec leaves them alone.
        parse_block((await asyncio.to_thread(readout, healthy.path)).block)
        assert healthy.injector.counts == {}
        sim.step()
    records = [json.loads(line) for line in truth.read_text().splitlines()]
    last = {r["device"]: r for r in records}
    assert last["iec-meter-1"]["injected"] == {kind: 2}
    assert "injected" not in last["iec-meter-2"] and "injected" not in records[0]


async def test_no_line_timing_is_fast_and_truth_log_has_the_readout(tmp_path: Path) -> None:
    truth = tmp_path / "truth.jsonl"
    config = SimConfig(boilers=1, meters=0, iec_meters=1, base_port=0, speed=0, line_timing=False,
                       truth_log=truth, start_hour=12.0)
    async with run_simulators(config) as sim:
        meter = sim.iec_meter("iec-meter-1")
        sim.step(10)
        started = time.monotonic()
        r = await asyncio.to_thread(readout, meter.path)
        assert time.monotonic() - started < 0.3
        values = parse_block(r.block)
    last = [json.loads(line) for line in truth.read_text().splitlines() if '"iec-meter-1"' in line][-1]
    assert last["kind"] == "meter"
    assert last["values"]["power"] == float(values["16.7.0"][0])
    assert last["values"]["energy_import_t1"] == float(values["1.8.1"][0]) > 0
    assert last["values"]["clock_time"] == values["0.9.1"][0] == "12:00:10"


def test_data_lines_cover_the_edge_profile() -> None:
    """Every OBIS code the edge's iec-meter profile reads is in the readout, with the same unit."""
    from firmware_sim.iec import OBIS_LINES
    from protocol.profile import builtin_profile

    profile = builtin_profile("iec-meter")
    served = {code: (name, unit) for code, name, unit in OBIS_LINES}
    for o in profile.obis:
        assert o.code in served, o.code
        assert served[o.code] == (o.name, o.unit), o.code
