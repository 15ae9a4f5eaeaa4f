"""The edge's command guard against a real simulated boiler over Modbus TCP: setpoint writes inside
the safe range reach the device's holding register and are read back; everything else (outside
the range, expired, redelivered, unknown device or point, another gateway, malformed) is refused
or dropped without touching the device, and answered exactly once through the real buffer."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from edge.buffer import BufferEvent, ReadingBuffer
from edge.commands import CommandGuard, Writer
from edge.drivers.base import DeviceError
from edge.drivers.iec62056 import Iec62056Driver
from edge.drivers.modbus import ModbusDriver, ModbusLink
from edge.metrics import EdgeMetrics
from edge.poller import DevicePoller
from edge.reading import Reading
from firmware_sim import SimConfig, Simulators, run_simulators
from protocol.profile import DeviceProfile, builtin_profile
from protocol.schema import CommandV1, EventType, encode
from tests.edgetools import holding0

SITE, GW = "site-1", "gw-cmd"
BOILER = builtin_profile("sim-boiler")


class Discard:
    async def submit(self, readings: list[Reading]) -> None:
        pass


@pytest.fixture
async def sim() -> AsyncIterator[Simulators]:
    async with run_simulators(SimConfig(boilers=1, meters=0, base_port=0, speed=0)) as s:
        yield s


@pytest.fixture
async def buffer(tmp_path: Path) -> AsyncIterator[ReadingBuffer]:
    buf = ReadingBuffer(tmp_path / "buf.db")
    await buf.open()
    yield buf
    await buf.close()


def make_poller(port: int, metrics: EdgeMetrics, name: str = "boiler-1", timeout: float = 1.0) -> DevicePoller:
    driver = ModbusDriver(ModbusLink.tcp("127.0.0.1", port, timeout), 1, BOILER)
    return DevicePoller(name, driver, 0.05, 1.0, Discard(), metrics)


def make_guard(buffer: ReadingBuffer, metrics: EdgeMetrics, devices: dict[str, tuple[DeviceProfile, Writer]],
               clock_ms: int | None = None) -> CommandGuard:
    clock = (lambda: clock_ms) if clock_ms is not None else (lambda: time.time_ns() // 1_000_000)
    return CommandGuard(SITE, GW, devices.get, buffer, metrics, clock=clock)  # type: ignore[arg-type]


def command(value: float, *, id: str = "c1", device: str = "boiler-1", point: str = "flow_setpoint",
            expires_in_ms: int = 60_000, gateway: str = GW) -> CommandV1:
    now = time.time_ns() // 1_000_000
    return CommandV1(site=SITE, gateway=gateway, ts=now, id=id, expires=now + expires_in_ms, device=device,
                     point=point, value=value, issued_by="tech1")


async def answers(buffer: ReadingBuffer) -> list[BufferEvent]:
    return [e for e in await buffer.events() if e.type.startswith("command_")]


async def settle(guard: CommandGuard, within_s: float = 5.0) -> None:
    """Wait for the commands started by ``handle`` to finish."""
    deadline = time.monotonic() + within_s
    while guard._tasks and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not guard._tasks, "commands still running"


def counted(metrics: EdgeMetrics, outcome: str, reason: str = "") -> float:
    value: float = metrics.commands.labels(outcome, reason)._value.get()
    return value


async def test_a_setpoint_inside_the_safe_range_is_written_and_read_back(
        sim: Simulators, buffer: ReadingBuffer) -> None:
    port = sim.device("boiler-1").port
    metrics = EdgeMetrics()
    poller = make_poller(port, metrics)
    guard = make_guard(buffer, metrics, {"boiler-1": (BOILER, poller)})
    before = await holding0(port)
    assert before != 650
    guard.handle(encode(command(65.0)))
    await settle(guard)
    assert await holding0(port) == 650  # raw int16, scale 0.1
    assert sim.device("boiler-1").model.flow_setpoint == pytest.approx(65.0)  # type: ignore[attr-defined]
    [ev] = await answers(buffer)
    assert ev.type == EventType.COMMAND_APPLIED.value
    assert ev.device == "boiler-1"
    assert ev.details == {"command_id": "c1", "point": "flow_setpoint", "value": 65.0, "read_back": 65.0,
                          "issued_by": "tech1"}
    assert counted(metrics, "applied") == 1
    # the boundaries of the safe range are inside it
    for i, v in enumerate((30.0, 80.0)):
        out = await guard.run(command(v, id=f"edge-{i}"))
        assert (out.status, out.read_back) == (EventType.COMMAND_APPLIED, v)
    assert await holding0(port) == 800
    await poller.driver.close()


@pytest.mark.parametrize(("value", "reason"), [(95.0, "out_of_range"), (29.9, "out_of_range"),
                                               (-5.0, "out_of_range"), (float("inf"), "not_finite")])
async def test_values_outside_the_safe_range_never_reach_the_device(
        sim: Simulators, buffer: ReadingBuffer, value: float, reason: str) -> None:
    port = sim.device("boiler-1").port
    metrics = EdgeMetrics()
    poller = make_poller(port, metrics)
    guard = make_guard(buffer, metrics, {"boiler-1": (BOILER, poller)})
    before = await holding0(port)
    out = await guard.run(command(value))
    assert (out.status, out.reason) == (EventType.COMMAND_REFUSED, reason)
    if reason == "out_of_range":
        assert "safe range 30..80 degC" in out.message
    assert await holding0(port) == before
    [ev] = await answers(buffer)
    assert ev.type == "command_refused" and ev.details["reason"] == reason
    assert ev.details["command_id"] == "c1"
    assert counted(metrics, "refused", reason) == 1
    await poller.driver.close()


async def test_nan_in_the_json_is_refused_not_written(sim: Simulators, buffer: ReadingBuffer) -> None:
    port = sim.device("boiler-1").port
    metrics = EdgeMetrics()
    poller = make_poller(port, metrics)
    guard = make_guard(buffer, metrics, {"boiler-1": (BOILER, poller)})
    doc: dict[str, Any] = json.loads(encode(command(50.0, id="nan-1")))
    payload = json.dumps(doc).replace("50.0", "NaN").encode()
    assert b"NaN" in payload
    before = await holding0(port)
    guard.handle(payload)
    await settle(guard)
    [ev] = await answers(buffer)
    assert (ev.type, ev.details["reason"], ev.details["value"]) == ("command_refused", "not_finite", "nan")
    assert await holding0(port) == before
    await poller.driver.close()


async def test_an_expired_command_is_refused_by_the_gateway_clock(sim: Simulators, buffer: ReadingBuffer) -> None:
    port = sim.device("boiler-1").port
    metrics = EdgeMetrics()
    poller = make_poller(port, metrics)
    cmd = command(65.0, id="late-1", expires_in_ms=1000)
    # the gateway clock is 5 s past the command's expiry
    guard = make_guard(buffer, metrics, {"boiler-1": (BOILER, poller)}, clock_ms=cmd.expires + 5000)
    before = await holding0(port)
    out = await guard.run(cmd)
    assert (out.status, out.reason) == (EventType.COMMAND_REFUSED, "expired")
    assert "expired 5.0 s ago" in out.message
    assert await holding0(port) == before
    [ev] = await answers(buffer)
    assert ev.details["reason"] == "expired"
    await poller.driver.close()


async def test_a_redelivered_command_executes_and_answers_once(sim: Simulators, buffer: ReadingBuffer) -> None:
    port = sim.device("boiler-1").port
    metrics = EdgeMetrics()
    writes: list[float] = []

    class Counting:
        def __init__(self, inner: DevicePoller) -> None:
            self.inner = inner

        async def write(self, point: str, value: float) -> Any:
            writes.append(value)
            return await self.inner.write(point, value)

    poller = make_poller(port, metrics)
    guard = make_guard(buffer, metrics, {"boiler-1": (BOILER, Counting(poller))})
    payload = encode(command(55.5, id="dup-1"))
    guard.handle(payload)
    guard.handle(payload)  # QoS 1 redelivery while the first is still running
    await settle(guard)
    guard.handle(payload)  # ... and after it finished
    await settle(guard)
    assert writes == [55.5]
    evs = await answers(buffer)
    assert [(e.type, e.details["command_id"]) for e in evs] == [("command_applied", "dup-1")]
    assert counted(metrics, "duplicate") == 2
    assert await holding0(port) == 555
    await poller.driver.close()


async def test_dedup_memory_is_bounded(buffer: ReadingBuffer) -> None:
    guard = CommandGuard(SITE, GW, lambda _: None, buffer, EdgeMetrics(), remember=10)
    for i in range(100):
        assert guard.accept(encode(command(50.0, id=f"m-{i}"))) is not None
    assert len(guard._seen) == 10
    assert guard.accept(encode(command(50.0, id="m-99"))) is None  # the newest are remembered


@pytest.mark.parametrize(("kw", "reason"), [
    ({"device": "boiler-7"}, "unknown_device"),
    ({"point": "nope"}, "unknown_point"),
    ({"point": "flow_temp"}, "not_writable"),  # an input register (a measurement)
    ({"gateway": "gw-other"}, "wrong_gateway"),
])
async def test_unknown_targets_are_refused(sim: Simulators, buffer: ReadingBuffer, kw: dict[str, str],
                                           reason: str) -> None:
    port = sim.device("boiler-1").port
    metrics = EdgeMetrics()
    poller = make_poller(port, metrics)
    guard = make_guard(buffer, metrics, {"boiler-1": (BOILER, poller)})
    before = await holding0(port)
    out = await guard.run(command(50.0, **kw))
    assert (out.status, out.reason) == (EventType.COMMAND_REFUSED, reason)
    assert await holding0(port) == before
    [ev] = await answers(buffer)
    assert (ev.type, ev.details["reason"]) == ("command_refused", reason)
    await poller.driver.close()


async def test_malformed_payloads_are_counted_and_never_answered(buffer: ReadingBuffer) -> None:
    metrics = EdgeMetrics()
    guard = make_guard(buffer, metrics, {})
    good: dict[str, Any] = json.loads(encode(command(50.0)))
    for payload in (b"", b"\xff\xfe", b"[1, 2]", b'{"v": 1}', json.dumps({**good, "id": "bad id!"}).encode(),
                    json.dumps({**good, "value": "hot"}).encode(), json.dumps({**good, "v": 9}).encode(),
                    b"{" * 100_000):
        guard.handle(payload)
    await settle(guard)
    assert counted(metrics, "malformed", "schema") == 8
    assert await answers(buffer) == []
    # and the guard still works afterwards
    guard.handle(encode(command(50.0, id="after")))
    await settle(guard)
    [ev] = await answers(buffer)
    assert ev.details["reason"] == "unknown_device"


async def test_a_device_that_does_not_answer_fails_the_command(buffer: ReadingBuffer) -> None:
    silent = socket.socket()  # accepts the connection, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        metrics = EdgeMetrics()
        poller = make_poller(silent.getsockname()[1], metrics, timeout=0.3)
        guard = make_guard(buffer, metrics, {"boiler-1": (BOILER, poller)})
        t0 = time.monotonic()
        out = await guard.run(command(60.0, id="silent-1"))
        assert time.monotonic() - t0 < 3
        assert (out.status, out.reason) == (EventType.COMMAND_FAILED, "timeout")
        [ev] = await answers(buffer)
        assert (ev.type, ev.details["reason"], ev.details["command_id"]) == ("command_failed", "timeout", "silent-1")
        await poller.driver.close()
    finally:
        silent.close()


async def test_a_connection_refused_fails_the_command(buffer: ReadingBuffer) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    metrics = EdgeMetrics()
    poller = make_poller(port, metrics, timeout=0.3)
    guard = make_guard(buffer, metrics, {"boiler-1": (BOILER, poller)})
    out = await guard.run(command(60.0))
    assert (out.status, out.reason) == (EventType.COMMAND_FAILED, "connect")
    await poller.driver.close()


async def test_writes_go_between_polls_on_the_pollers_connection(sim: Simulators, buffer: ReadingBuffer) -> None:
    port = sim.device("boiler-1").port
    metrics = EdgeMetrics()
    poller = make_poller(port, metrics)
    guard = make_guard(buffer, metrics, {"boiler-1": (BOILER, poller)})
    task = asyncio.create_task(poller.run())
    try:
        await asyncio.sleep(0.2)
        values = [40.0 + i for i in range(20)]
        outs = await asyncio.gather(*(guard.run(command(v, id=f"s-{i}")) for i, v in enumerate(values)))
        assert [o.status for o in outs] == [EventType.COMMAND_APPLIED] * 20
        assert sorted(o.read_back for o in outs if isinstance(o.read_back, float)) == values
        await asyncio.sleep(0.2)
    finally:
        poller.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    ok = metrics.polls.labels("boiler-1", "ok")._value.get()
    assert ok >= 4
    # no request of a poll was disturbed by a write on the same connection
    assert metrics.polls.labels("boiler-1", "failed")._value.get() == 0
    assert metrics.polls.labels("boiler-1", "partial")._value.get() == 0
    assert await holding0(port) in {round(v * 10) for v in values}


async def test_the_modbus_driver_refuses_points_that_are_not_writable(sim: Simulators) -> None:
    driver = ModbusDriver(ModbusLink.tcp("127.0.0.1", sim.device("boiler-1").port, 1.0), 1, BOILER)
    for point in ("flow_temp", "nope"):
        with pytest.raises(DeviceError) as err:
            await driver.write(point, 1.0)
        assert err.value.kind == "not-writable"
    await driver.close()


async def test_the_iec_driver_cannot_write() -> None:
    driver = Iec62056Driver("/dev/null", builtin_profile("iec-meter"))
    with pytest.raises(DeviceError) as err:
        await driver.write("energy_import", 1.0)
    assert err.value.kind == "not-writable"


def _profile(point: dict[str, Any]) -> DeviceProfile:
    return DeviceProfile.model_validate({"profile": {"name": "p", "kind": "boiler"},
                                         "points": [{"name": "sp", "address": 0, **point}]})


@pytest.mark.parametrize(("point", "message"), [
    ({"writable": True}, "writable point 'sp' needs a safe range: set both 'min' and 'max'"),
    ({"writable": True, "min": 10}, "needs a safe range"),
    ({"writable": True, "min": 10, "max": float("inf")}, "must be finite"),
    ({"writable": True, "type": "int16", "scale": 0.1, "min": 0, "max": 4000}, "does not fit int16"),
    ({"writable": True, "type": "uint16", "min": -1, "max": 10}, "does not fit uint16"),
    ({"writable": True, "type": "string", "length": 2, "min": 0, "max": 1}, "cannot be writable"),
])
def test_profiles_require_a_valid_safe_range_on_writable_points(point: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(")):
        _profile(point)


def test_the_shipped_boiler_setpoint_has_a_safe_range() -> None:
    assert BOILER.safe_range("flow_setpoint") == (30.0, 80.0)
    with pytest.raises(ValueError, match="not writable"):
        BOILER.safe_range("flow_temp")
    assert _profile({"writable": True, "min": 5, "max": 50}).safe_range("sp") == (5.0, 50.0)
