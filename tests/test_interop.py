"""Interoperability with Modbus implementations nobody here wrote.

* Debian's ``mbpoll`` (libmodbus) reads the simulated devices and gets the documented values.
* The edge driver reads a server built with pyModbusTCP, through a register map written by
  hand the way a technician would for a new device.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge.drivers.modbus import ModbusDriver, ModbusLink
from firmware_sim import SimConfig, Simulators, run_simulators
from fleet.net import free_port
from protocol.profile import builtin_profile, load_profile
from tests.parts import missing_part


def mbpoll() -> str:
    path = shutil.which("mbpoll")
    if path is None:
        missing_part("mbpoll (Debian package of libmodbus' command-line master)", "apt-get install mbpoll")
    return path


async def run_mbpoll(*args: str) -> list[float]:
    """Run mbpoll once and return the values it printed, in reference order. (The simulators
    share this event loop, so the subprocess must not block it.)"""
    proc = await asyncio.create_subprocess_exec(mbpoll(), "-1", "-0", "-o", "2", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, (out + err).decode()
    values = []
    for line in out.decode().splitlines():
        if line.startswith("["):
            values.append(float(line.split(":", 1)[1].split()[0]))
    return values


@pytest.fixture
async def sims() -> AsyncIterator[Simulators]:
    async with run_simulators(SimConfig(boilers=1, meters=1, base_port=0, speed=0, start_hour=8)) as sim:
        sim.step(900)
        yield sim


async def test_mbpoll_reads_documented_boiler_values_over_tcp(sims: Simulators) -> None:
    boiler = sims.device("boiler-1")
    profile = builtin_profile("sim-boiler")
    raw = await run_mbpoll("-m", "tcp", "-p", str(boiler.port), "-a", "1", "-t", "3", "-r", "0", "-c", "13",
                     "127.0.0.1")
    assert len(raw) == 13
    v = boiler.visible
    # 16-bit registers as documented in docs/profiles.md: value = raw x scale (int16 two's complement)
    signed = [r - 65536 if r > 32767 else r for r in raw]
    assert signed[0] * 0.1 == pytest.approx(v["flow_temp"])
    assert signed[1] * 0.1 == pytest.approx(v["return_temp"])
    assert raw[2] * 0.001 == pytest.approx(v["pressure"])
    assert raw[3] * 0.1 == pytest.approx(v["flue_temp"])
    assert raw[6] == int(v["burner_on"])
    assert raw[7] == v["fault_code"]
    assert (raw[8] * 65536 + raw[9]) * 0.01 == pytest.approx(v["operating_hours"])
    assert raw[10] * 65536 + raw[11] == v["burner_starts"]
    assert profile.point("outdoor_temp").address == 12 and signed[12] * 0.1 == pytest.approx(v["outdoor_temp"])
    setpoint = await run_mbpoll("-m", "tcp", "-p", str(boiler.port), "-t", "4", "-r", "0", "-c", "1", "127.0.0.1")
    assert setpoint[0] * 0.1 == pytest.approx(v["flow_setpoint"])


async def test_mbpoll_reads_meter_float_and_counter_over_tcp(sims: Simulators) -> None:
    meter = sims.device("meter-1")
    v = meter.visible
    tcp = ("-m", "tcp", "-p", str(meter.port))
    power = await run_mbpoll(*tcp, "-t", "3:float", "-B", "-r", "2", "-c", "1", "127.0.0.1")
    assert power[0] == pytest.approx(v["power"], rel=1e-6)
    energy = await run_mbpoll(*tcp, "-t", "3:int", "-B", "-r", "0", "-c", "1", "127.0.0.1")
    assert energy[0] * 0.01 == pytest.approx(v["energy_import"])


HAND_WRITTEN_MAP = """\
# A pump controller nobody here built, described by hand from its (imaginary) manual.
[profile]
name = "acme-pump"
kind = "boiler"
max_registers_per_request = 16
max_gap = 2

[[points]]
name = "speed_setpoint"
address = 0
type = "int16"
unit = "%"

[[points]]
name = "motor_current"
address = 1
type = "float32"
word_order = "little"
unit = "A"

[[points]]
name = "run_seconds"
address = 3
type = "uint32"
unit = "s"

[[points]]
name = "energy_wh"
address = 5
type = "int64"
byte_order = "little"
word_order = "little"
unit = "Wh"

[[points]]
name = "tag"
address = 10
type = "string"
length = 4

[[points]]
name = "suction_pressure"
address = 20
type = "uint16"
scale = 0.01
unit = "bar"

[[points]]
name = "winding_temp"
table = "input"
address = 0
type = "int16"
scale = 0.1
offset = -40.0
unit = "degC"

[[points]]
name = "alarm_word_bit3"
table = "input"
address = 1
type = "bool"
bit = 3

[[points]]
name = "running"
table = "coil"
address = 0
type = "bool"

[[points]]
name = "remote"
table = "coil"
address = 2
type = "bool"

[[points]]
name = "dry_run_switch"
table = "discrete"
address = 5
type = "bool"
"""


async def test_edge_reads_pymodbustcp_server_with_hand_written_map(tmp_path: Path) -> None:
    from pyModbusTCP.server import DataBank, ModbusServer

    bank = DataBank()
    swap = lambda w: ((w & 0xFF) << 8) | (w >> 8)  # noqa: E731 - bytes swapped inside one register
    current = struct.unpack(">HH", struct.pack(">f", 12.75))
    energy = struct.unpack(">HHHH", struct.pack(">q", -123456789012))
    bank.set_holding_registers(0, [(-42) & 0xFFFF, current[1], current[0], 0x0001, 0x86A0,
                                   swap(energy[3]), swap(energy[2]), swap(energy[1]), swap(energy[0])])
    bank.set_holding_registers(10, [0x5055, 0x4D50, 0x2D37, 0x0000])  # "PUMP-7"
    bank.set_holding_registers(20, [153])
    bank.set_input_registers(0, [650, 0b1000])
    bank.set_coils(0, [True, False, False])
    bank.set_discrete_inputs(5, [True])
    port = free_port()
    server = ModbusServer("127.0.0.1", port, no_block=True, data_bank=bank)
    server.start()
    try:
        path = tmp_path / "acme-pump.toml"
        path.write_text(HAND_WRITTEN_MAP)
        driver = ModbusDriver(ModbusLink.tcp("127.0.0.1", port, 2.0), 1, load_profile(path))
        results = {r.name: r for r in await driver.read()}
        await driver.close()
    finally:
        server.stop()
    assert {n: r.error for n, r in results.items() if r.error} == {}
    assert {n: r.value for n, r in results.items()} == {
        "speed_setpoint": -42, "motor_current": 12.75, "run_seconds": 100000, "energy_wh": -123456789012,
        "tag": "PUMP-7", "suction_pressure": 1.53, "winding_temp": 25.0, "alarm_word_bit3": True,
        "running": True, "remote": False, "dry_run_switch": True,
    }
    # max_gap = 2 lets the string (1 unused register away) join the first read; register 20 is
    # 6 away and gets a read of its own
    assert [(r.table, r.address, r.count) for r in driver.plan()] == [
        ("coil", 0, 3), ("discrete", 5, 1), ("holding", 0, 14), ("holding", 20, 1), ("input", 0, 2)]


async def test_mbpoll_reads_documented_values_over_rtu() -> None:
    cfg = SimConfig(boilers=1, meters=1, rtu=True, speed=0, start_hour=8)
    async with run_simulators(cfg) as sim:
        sim.step(900)
        path = sim.device("boiler-1").bus.path  # type: ignore[union-attr]
        rtu = ("-m", "rtu", "-b", "19200", "-P", "even", "-s", "1")
        raw = await run_mbpoll(*rtu, "-a", "1", "-t", "3", "-r", "0", "-c", "8", path)
        boiler = sim.device("boiler-1").visible
        assert raw[0] * 0.1 == pytest.approx(boiler["flow_temp"])
        assert raw[2] * 0.001 == pytest.approx(boiler["pressure"])
        assert raw[7] == boiler["fault_code"]
        # the second device on the same bus, by its unit id
        power = await run_mbpoll(*rtu, "-a", "2", "-t", "3:float", "-B", "-r", "2", "-c", "1", path)
        assert power[0] == pytest.approx(sim.device("meter-1").visible["power"], rel=1e-6)
