"""The simulators over real Modbus TCP sockets, in-process and as the ``twin-sim`` CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient

from firmware_sim.server import SimConfig, SimulatedDevice, Simulators, run_simulators
from protocol import codec
from protocol.profile import DeviceProfile, Point

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> int:
    """First of ``n`` consecutive free TCP ports on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + n):
                    probe = stack.enter_context(socket.socket())
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no block of free ports")


def table_span(profile: DeviceProfile, table: str) -> int:
    return max(p.address + p.registers for p in profile.points if p.table == table)


def decode_table(profile: DeviceProfile, table: str, words: list[int]) -> dict[str, Any]:
    points: list[Point] = [p for p in profile.points if p.table == table]
    return {p.name: codec.decode(p, words[p.address : p.address + p.registers]) for p in points}


def quantized(device: SimulatedDevice) -> dict[str, Any]:
    return {p.name: codec.decode(p, codec.encode(p, device.model.reading[p.name])) for p in device.profile.points}


@contextlib.asynccontextmanager
async def client_for(device: SimulatedDevice) -> AsyncIterator[AsyncModbusTcpClient]:
    client = AsyncModbusTcpClient(device.host, port=device.port, timeout=2, retries=0)
    assert await client.connect()
    try:
        yield client
    finally:
        client.close()


async def read_all(client: AsyncModbusTcpClient, device: SimulatedDevice, unit: int = 1) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for table, read in (("input", client.read_input_registers), ("holding", client.read_holding_registers)):
        if not any(p.table == table for p in device.profile.points):
            continue
        rr = await read(0, count=table_span(device.profile, table), device_id=unit)
        assert not rr.isError(), rr
        values.update(decode_table(device.profile, table, rr.registers))
    return values


@pytest.fixture
async def frozen_sim(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Simulators]:
    """One boiler and one meter on OS-chosen ports, clock stopped (advance with sim.step)."""
    caplog.set_level(logging.WARNING)
    config = SimConfig(boilers=1, meters=1, base_port=0, seed=5, speed=0, start_hour=7.0,
                       truth_log=tmp_path / "truth.jsonl")
    async with run_simulators(config) as sim:
        yield sim
    # pymodbus announces its deprecated datastores through its logger, not the warnings module.
    assert not [r for r in caplog.records if "deprecat" in r.getMessage().lower()]


async def test_registers_match_model_from_address_0(frozen_sim: Simulators) -> None:
    sim = frozen_sim
    sim.step(30)
    for device in sim.devices:
        assert device.port > 0
        async with client_for(device) as client:
            served = await read_all(client, device)
            assert served == device.visible == quantized(device)
            # Address 0 of each table on its own: no off-by-one between protocol and datastore.
            rr = await client.read_input_registers(0, count=1, device_id=1)
            first_input = next(p for p in device.profile.points if p.table == "input" and p.address == 0)
            if first_input.registers == 1:
                assert codec.decode(first_input, rr.registers) == served[first_input.name]
            else:
                rr = await client.read_input_registers(0, count=first_input.registers, device_id=1)
                assert codec.decode(first_input, rr.registers) == served[first_input.name]
    boiler = sim.device("boiler-1")
    async with client_for(boiler) as client:
        rr = await client.read_holding_registers(0, count=1, device_id=1)
        assert codec.decode(boiler.profile.point("flow_setpoint"), rr.registers) == 70.0
        rr = await client.read_input_registers(0, count=1, device_id=1)
        assert codec.decode(boiler.profile.point("flow_temp"), rr.registers) == quantized(boiler)["flow_temp"]
        assert 40.0 < quantized(boiler)["flow_temp"] < 90.0


async def test_values_change_with_ticks_and_unit_ids(frozen_sim: Simulators) -> None:
    meter = frozen_sim.device("meter-1")
    async with client_for(meter) as client:
        before = await read_all(client, meter)
        frozen_sim.step(60)
        after = await read_all(client, meter)
        assert after != before
        assert after["energy_import"] > before["energy_import"]
        assert await read_all(client, meter, unit=0) == after
        # The meter has no holding registers and nothing lives past its input map.
        rr = await client.read_holding_registers(0, count=1, device_id=1)
        assert rr.isError() and rr.exception_code == 2
        rr = await client.read_input_registers(table_span(meter.profile, "input"), count=1, device_id=1)
        assert rr.isError() and rr.exception_code == 2


async def test_out_of_range_values_saturate_and_faults_apply_at_run_time(frozen_sim: Simulators) -> None:
    boiler = frozen_sim.device("boiler-1")
    boiler.model.set_fault("drift", -200.0)
    boiler.model.set_fault("drift_metric", "pressure")
    frozen_sim.step(60)  # -200 bar/h for a minute: the true value would be negative
    assert boiler.model.reading["pressure"] < 0
    async with client_for(boiler) as client:
        served = await read_all(client, boiler)
    assert served["pressure"] == 0.0
    assert served == boiler.visible


async def test_write_flow_setpoint_reaches_model(frozen_sim: Simulators, tmp_path: Path) -> None:
    boiler = frozen_sim.device("boiler-1")
    point = boiler.profile.point("flow_setpoint")
    async with client_for(boiler) as client:
        rr = await client.write_register(0, codec.encode(point, 55.5)[0], device_id=1)
        assert not rr.isError(), rr
        assert boiler.model.reading["flow_setpoint"] == 55.5
        assert getattr(boiler.model, "flow_setpoint") == 55.5  # noqa: B009 - model attribute
        rr = await client.read_holding_registers(0, count=1, device_id=1)
        assert codec.decode(point, rr.registers) == 55.5
        # Out of the profile's range: the device refuses (exception 3) and keeps its setpoint.
        rr = await client.write_register(0, codec.encode(point, 90.0)[0], device_id=1)
        assert rr.isError() and rr.exception_code == 3
        rr = await client.write_registers(0, codec.encode(point, 45.0), device_id=1)
        assert not rr.isError()
        assert boiler.model.reading["flow_setpoint"] == 45.0
        # Input registers are read-only by protocol; holding addresses without a setting too.
        rr = await client.write_register(1, 1, device_id=1)
        assert rr.isError() and rr.exception_code == 2
    # The physics uses the written value: the flow temperature settles near 45 degC.
    frozen_sim.step(3 * 360)
    assert abs(quantized(boiler)["flow_temp"] - 45.0) < 6.0
    await frozen_sim.stop()
    lines = [json.loads(line) for line in (tmp_path / "truth.jsonl").read_text().splitlines()]
    boiler_lines = [x for x in lines if x["device"] == "boiler-1"]
    setpoints = [x["values"]["flow_setpoint"] for x in boiler_lines]
    assert setpoints[0] == 70.0 and 55.5 in setpoints and setpoints[-1] == 45.0
    assert 90.0 not in setpoints


async def test_running_clock_serves_whole_ticks_matching_truth_log(tmp_path: Path) -> None:
    truth = tmp_path / "truth.jsonl"
    config = SimConfig(boilers=2, meters=1, base_port=0, seed=9, tick=1.0, speed=500.0, truth_log=truth)
    seen: list[dict[str, Any]] = []
    async with run_simulators(config) as sim:
        boiler, meter = sim.device("boiler-2"), sim.device("meter-1")
        async with client_for(boiler) as cb, client_for(meter) as cm:
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                seen.append({"device": "boiler-2", "values": await read_all(cb, boiler)})
                seen.append({"device": "meter-1", "values": await read_all(cm, meter)})
        async with asyncio.timeout(5):
            await sim.wait_steps(sim.steps + 5)
        steps = sim.steps
    assert 100 < steps < 400  # ~0.5 s at 500 ticks/s
    records = [json.loads(line) for line in truth.read_text().splitlines()]
    assert {r["device"] for r in records} == {"boiler-1", "boiler-2", "meter-1"}
    for r in records:
        assert set(r) == {"t", "device", "kind", "values"}
        assert abs(r["t"] - time.time() * 1000) < 60_000
    # One line per device per published state, in time order.
    per_device = [r for r in records if r["device"] == "meter-1"]
    assert [r["t"] for r in per_device] == sorted(r["t"] for r in per_device)
    assert len(per_device) >= 10
    # Every read returned one complete logged snapshot (never a mix of two ticks).
    logged = {(r["device"], json.dumps(r["values"], sort_keys=True)) for r in records}
    for s in seen:
        assert (s["device"], json.dumps(s["values"], sort_keys=True)) in logged
    assert len({json.dumps(s["values"]) for s in seen if s["device"] == "meter-1"}) > 3


async def test_busy_port_raises_naming_port() -> None:
    from firmware_sim.server import SimulatorStartError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sim = Simulators(SimConfig(boilers=1, meters=0, base_port=port))
        with pytest.raises(SimulatorStartError, match=str(port)):
            await sim.start()


# --- the CLI as a subprocess ---

def start_cli(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "firmware_sim.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_ready(proc: subprocess.Popen[str], timeout: float = 15.0) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no ready line"
    line = proc.stdout.readline()
    assert line.endswith("\n")
    return json.loads(line)  # type: ignore[no-any-return]


@pytest.fixture
def cli_procs() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_ready_line_and_clean_stop(cli_procs: list[subprocess.Popen[str]], tmp_path: Path,
                                      sig: signal.Signals) -> None:
    base = free_ports(2)
    truth = tmp_path / "t.jsonl"
    proc = start_cli("--boilers", "1", "--meters", "1", "--base-port", str(base), "--seed", "3",
                     "--speed", "20", "--truth-log", str(truth), "--fault", "meter-1:tamper=1",
                     "--log-level", "warning")
    cli_procs.append(proc)
    ready = read_ready(proc)
    assert ready == {"event": "ready", "devices": [
        {"name": "boiler-1", "kind": "boiler", "profile": "sim-boiler", "transport": "tcp", "host": "127.0.0.1",
         "port": base, "unit_id": 1},
        {"name": "meter-1", "kind": "meter", "profile": "sim-meter", "transport": "tcp", "host": "127.0.0.1",
         "port": base + 1, "unit_id": 1},
    ]}

    async def read_energy() -> float:
        client = AsyncModbusTcpClient("127.0.0.1", port=base + 1, timeout=2, retries=0)
        assert await client.connect()
        rr = await client.read_input_registers(0, count=2, device_id=1)
        client.close()
        return float(codec.decode(Point(name="e", table="input", address=0, type="uint32", scale=0.01),
                                  rr.registers))

    assert asyncio.run(read_energy()) == 0.0  # tamper=1: the counter does not move
    time.sleep(0.3)
    started = time.monotonic()
    proc.send_signal(sig)
    rc = proc.wait(timeout=5)
    assert rc == 0
    assert time.monotonic() - started < 2.0
    assert proc.stdout is not None and proc.stdout.read() == ""  # exactly one line on stdout
    assert truth.read_text().count('"device":"meter-1"') >= 2


def test_cli_busy_port_exit_2(cli_procs: list[subprocess.Popen[str]]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = start_cli("--boilers", "1", "--meters", "0", "--base-port", str(port))
        cli_procs.append(proc)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 2
    assert f"port {port}" in err and "already in use" in err


@pytest.mark.parametrize(("fault", "message"), [
    ("boiler-1leak=0.2", "DEVICE:KEY=VALUE"),
    ("boiler-1:leak", "DEVICE:KEY=VALUE"),
    ("boiler-9:leak=0.2", "unknown device 'boiler-9'"),
    ("boiler-1:tamper=1", "unknown fault 'tamper'"),
    ("boiler-1:scale=lots", "'lots' is not a number"),
])
def test_cli_bad_fault_is_a_usage_error(fault: str, message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "firmware_sim.cli", "--fault", fault, "--base-port", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=15)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "usage: twin-sim" in proc.stderr
    assert proc.stdout == ""
