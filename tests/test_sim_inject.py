"""Communication fault injection: spec parsing, seeded decisions, and every kind seen by clients."""

from __future__ import annotations

import asyncio
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException

from firmware_sim.inject import FAULT_KINDS, FaultInjector, InjectSpec, parse_inject, rates_for
from firmware_sim.server import SimConfig, run_simulators
from tests.test_sim_modbus import REPO, decode_table
from tests.test_sim_rtu import crc16, exchange, raw_port, read_request, rtu_client

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning")

# --- specs and decisions ---


def test_parse_inject_specs() -> None:
    assert parse_inject("crc=0.1") == InjectSpec(None, {"crc": 0.1})
    assert parse_inject("boiler-1:timeout=0.5, exception=0 ,garbage=1") == InjectSpec(
        "boiler-1", {"timeout": 0.5, "exception": 0.0, "garbage": 1.0})
    for bad, message in (("crc", "kind=rate"), ("crc=", "number"), ("crc=x", "number"), ("crc=1.5", "[0, 1]"),
                         ("crc=nan", "[0, 1]"), ("bogus=0.1", "unknown fault kind"), (":crc=0.1", "empty device"),
                         ("crc=0.1,", "kind=rate")):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_inject(bad)


def test_rates_merge_per_device_and_refuse_impossible_combinations() -> None:
    specs = [parse_inject("crc=0.2,timeout=0.1"), parse_inject("meter-1:timeout=0,exception=0.3"),
             parse_inject("crc=0.25")]
    assert rates_for(specs, "boiler-1") == {"crc": 0.25, "timeout": 0.1}
    assert rates_for(specs, "meter-1") == {"crc": 0.25, "exception": 0.3}  # its own timeout=0 wins
    # All-devices kinds that mean nothing to an IEC meter are dropped for it, its own are refused.
    assert rates_for([parse_inject("exception=0.5,short=0.1")], "iec-meter-1", iec=True) == {"short": 0.1}
    with pytest.raises(ValueError, match="does not apply"):
        rates_for([parse_inject("iec-meter-1:disconnect=0.1")], "iec-meter-1", iec=True)
    with pytest.raises(ValueError, match=r"add up to 1\.2"):
        rates_for([parse_inject("crc=0.7"), parse_inject("boiler-1:short=0.5")], "boiler-1")
    with pytest.raises(ValueError, match="unknown device 'boiler-9'"):
        SimConfig(inject=(parse_inject("boiler-9:crc=1"),)).check()


def test_decisions_are_seeded_and_rates_hold() -> None:
    def decisions(seed: int, device: str, rates: dict[str, float], n: int = 4000) -> list[str | None]:
        injector = FaultInjector(device, rates, seed)
        return [injector.draw() for _ in range(n)]

    mixed = {"crc": 0.1, "timeout": 0.2, "short": 0.05}
    a = decisions(1, "boiler-1", mixed)
    assert a == decisions(1, "boiler-1", mixed)
    assert a != decisions(2, "boiler-1", mixed) and a != decisions(1, "boiler-2", mixed)
    for kind, rate in mixed.items():
        # binomial, n = 4000: 5 standard deviations
        assert abs(a.count(kind) - rate * 4000) < 5 * (4000 * rate * (1 - rate)) ** 0.5, kind
    assert a.count(None) > 2400
    assert set(decisions(1, "x", {"crc": 0.0, "garbage": 0.0})) == {None}
    for kind in FAULT_KINDS:
        assert set(decisions(7, "x", {kind: 1.0}, 500)) == {kind}
    # One draw per request whatever the rates: the same requests fail when a rate is added elsewhere.
    only_crc = decisions(1, "boiler-1", {"crc": 0.1})
    assert [d == "crc" for d in only_crc] == [d == "crc" for d in decisions(1, "boiler-1", {"crc": 0.1, "short": 0.3})]


# --- Modbus TCP ---

TCP_OUTCOMES = {
    "crc": "io-error", "timeout": "io-error", "garbage": "io-error", "short": "io-error",
    "exception": "exception-4", "disconnect": "io-error",
}


async def tcp_outcome(client: AsyncModbusTcpClient) -> tuple[str, float]:
    started = time.monotonic()
    try:
        rr = await client.read_input_registers(0, count=2, device_id=1)
    except ModbusIOException:
        return "io-error", time.monotonic() - started
    if rr.isError():
        return f"exception-{rr.exception_code}", time.monotonic() - started
    return "ok", time.monotonic() - started


@pytest.mark.parametrize("kind", FAULT_KINDS)
async def test_every_kind_is_seen_by_a_tcp_client(kind: str, tmp_path: Path) -> None:
    truth = tmp_path / "truth.jsonl"
    config = SimConfig(boilers=1, meters=1, base_port=0, speed=0, truth_log=truth,
                       inject=(InjectSpec("boiler-1", {kind: 1.0}),))
    async with run_simulators(config) as sim:
        boiler, meter = sim.device("boiler-1"), sim.device("meter-1")
        bad = AsyncModbusTcpClient("127.0.0.1", port=boiler.port, timeout=0.3, retries=0)
        good = AsyncModbusTcpClient("127.0.0.1", port=meter.port, timeout=0.3, retries=0)
        assert await bad.connect() and await good.connect()
        try:
            for _ in range(3):
                outcome, _ = await tcp_outcome(bad)
                assert outcome == TCP_OUTCOMES[kind]
                if kind == "disconnect":
                    await asyncio.sleep(0.3)  # let the client reconnect
                rr = await good.read_input_registers(0, count=8, device_id=1)
                assert decode_table(meter.profile, "input", rr.registers) == dict(meter.visible)
        finally:
            bad.close()
            good.close()
        if kind in ("crc", "short", "garbage", "disconnect"):
            # What exactly arrives, seen on a plain socket.
            reader, writer = await asyncio.open_connection("127.0.0.1", boiler.port)
            writer.write(struct.pack(">HHHBBHH", 7, 0, 6, 1, 4, 0, 2))
            got = await asyncio.wait_for(reader.read(100), 1.0)  # b"" = the server closed
            writer.close()
            expected_len = 7 + 2 + 4  # MBAP + function code + byte count + 2 registers
            if kind == "crc":
                assert got[:2] == b"\x00\x07" and got[2:4] == b"\xff\xff" and len(got) == expected_len
            elif kind == "short":
                assert 0 < len(got) < expected_len and got[:2] == b"\x00\x07"
            elif kind == "garbage":
                assert len(got) == expected_len and got[2:4] != b"\x00\x00"
            else:
                assert got == b""
        assert boiler.injector.counts == {kind: 3 if kind in ("timeout", "exception") else 4}
        assert meter.injector.counts == {}
        sim.step()
    records = [json.loads(line) for line in truth.read_text().splitlines()]
    last = {r["device"]: r for r in records}
    assert last["boiler-1"]["injected"] == boiler.injector.counts
    assert "injected" not in last["meter-1"]
    assert all("injected" not in r for r in records[:2])  # the initial lines: nothing injected yet


async def test_tcp_rate_zero_never_and_global_spec_with_device_override() -> None:
    config = SimConfig(boilers=1, meters=1, base_port=0, speed=0,
                       inject=(InjectSpec(None, {"exception": 1.0}), InjectSpec("meter-1", {"exception": 0.0})))
    async with run_simulators(config) as sim:
        boiler, meter = sim.device("boiler-1"), sim.device("meter-1")
        for device, expected in ((boiler, "exception-4"), (meter, "ok")):
            client = AsyncModbusTcpClient("127.0.0.1", port=device.port, timeout=1, retries=0)
            assert await client.connect()
            outcomes = {(await tcp_outcome(client))[0] for _ in range(20)}
            client.close()
            assert outcomes == {expected}
        assert boiler.injector.counts == {"exception": 20} and meter.injector.counts == {}


async def test_tcp_faults_are_reproducible_from_the_seed() -> None:
    async def pattern(seed: int) -> list[str]:
        config = SimConfig(boilers=1, meters=0, base_port=0, speed=0, seed=seed,
                           inject=(InjectSpec(None, {"exception": 0.5}),))
        async with run_simulators(config) as sim:
            client = AsyncModbusTcpClient("127.0.0.1", port=sim.device("boiler-1").port, timeout=1, retries=0)
            assert await client.connect()
            out = [(await tcp_outcome(client))[0] for _ in range(40)]
            client.close()
        return out

    a = await pattern(11)
    assert a == await pattern(11)
    assert a != await pattern(12)
    assert 8 < a.count("exception-4") < 32 and set(a) == {"ok", "exception-4"}


# --- Modbus RTU ---

RTU_OUTCOMES = {
    "crc": "io-error", "timeout": "io-error", "garbage": "io-error", "short": "io-error",
    "exception": "exception-4", "disconnect": "io-error",
}


@pytest.mark.parametrize("kind", FAULT_KINDS)
async def test_every_kind_is_seen_on_the_rtu_bus(kind: str) -> None:
    config = SimConfig(boilers=1, meters=1, rtu=True, speed=0, dead_time=0.8,
                       inject=(InjectSpec("boiler-1", {kind: 1.0}),))
    async with run_simulators(config) as sim:
        assert sim.bus is not None
        boiler, meter = sim.device("boiler-1"), sim.device("meter-1")
        async with rtu_client(sim.bus.path, timeout=0.25) as client:
            for _ in range(2):
                try:
                    rr = await client.read_input_registers(0, count=2, device_id=1)
                    outcome = f"exception-{rr.exception_code}" if rr.isError() else "ok"
                except ModbusIOException:
                    outcome = "io-error"
                assert outcome == RTU_OUTCOMES[kind]
                rr = await client.read_input_registers(0, count=8, device_id=2)  # the other unit answers
                assert decode_table(meter.profile, "input", rr.registers) == dict(meter.visible)
        # The damaged frame itself, read raw.
        with raw_port(sim.bus.path) as fd:
            got = await exchange(fd, read_request(1, 4, 0, 2), 9, timeout=0.25)
        if kind == "crc":
            assert len(got) == 9 and got[:3] == b"\x01\x04\x04" and got[-2:] != crc16(got[:-2])
        elif kind == "short":
            assert 0 < len(got) < 9 and got[:1] == b"\x01"
        elif kind == "garbage":
            assert len(got) == 9 and got[-2:] != crc16(got[:-2])
        elif kind == "exception":
            assert got == b"\x01\x84\x04" + crc16(b"\x01\x84\x04")
        else:
            assert got == b""
        if kind == "disconnect":
            # The device fell silent once and stayed silent for the dead time, drawing nothing.
            assert boiler.injector.counts == {"disconnect": 1}
            boiler.injector.rates = {}
            await asyncio.sleep(0.8)
            with raw_port(sim.bus.path) as fd:
                got = await exchange(fd, read_request(1, 4, 0, 2), 9)
            assert len(got) == 9 and got[-2:] == crc16(got[:-2])
        else:
            assert boiler.injector.counts == {kind: 3}
        assert meter.injector.counts == {}


async def test_rtu_rate_zero_never_injects() -> None:
    config = SimConfig(boilers=1, meters=0, rtu=True, speed=0, line_timing=False,
                       inject=(InjectSpec(None, dict.fromkeys(FAULT_KINDS, 0.0)),))
    async with run_simulators(config) as sim:
        assert sim.bus is not None
        async with rtu_client(sim.bus.path, timeout=0.5) as client:
            for _ in range(30):
                rr = await client.read_input_registers(0, count=2, device_id=1)
                assert not rr.isError()
        assert sim.device("boiler-1").injector.counts == {}


# --- CLI ---

@pytest.mark.parametrize(("spec", "message"), [
    ("boiler-1:crc", "kind=rate"),
    ("boiler-1:flaky=0.1", "unknown fault kind 'flaky'"),
    ("boiler-9:crc=0.1", "unknown device 'boiler-9'"),
    ("crc=0.6,short=0.6", "add up to 1.2"),
])
def test_cli_bad_inject_is_a_usage_error(spec: str, message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "firmware_sim.cli", "--inject", spec, "--base-port", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=15, env=dict(os.environ))
    assert proc.returncode == 2
    assert message in proc.stderr and "usage: twin-sim" in proc.stderr
    assert proc.stdout == ""
