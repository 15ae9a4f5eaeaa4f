"""Polling real simulated devices over Modbus TCP: values, partial failures, dead devices,
and a slow device not holding up the others."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge.drivers.modbus import ModbusDriver, ModbusLink
from edge.metrics import EdgeMetrics
from edge.poller import DevicePoller
from edge.reading import Reading
from firmware_sim import SimConfig, Simulators, run_simulators
from fleet.net import free_port
from protocol.profile import builtin_profile, load_profile
from protocol.schema import Quality


class CaptureBuffer:
    """Stands in for the SQLite buffer: the poller only calls submit()."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []

    async def submit(self, readings: list[Reading]) -> None:
        self.readings.extend(readings)


@pytest.fixture
async def sims() -> AsyncIterator[Simulators]:
    async with run_simulators(SimConfig(boilers=1, meters=1, base_port=0, speed=0, start_hour=7)) as sim:
        sim.step(600)  # ten simulated minutes: the boiler is warm and the meter has counted
        yield sim


def poller_for(sim: Simulators, name: str, profile_name: str, buf: CaptureBuffer, interval: float = 1.0,
               profile_path: Path | None = None, port: int | None = None, timeout: float = 1.0) -> DevicePoller:
    dev = sim.device(name)
    profile = load_profile(profile_path) if profile_path else builtin_profile(profile_name)
    driver = ModbusDriver(ModbusLink.tcp("127.0.0.1", port or dev.port, timeout), 1, profile)
    return DevicePoller(name, driver, interval, 8.0, buf, EdgeMetrics())


async def test_poll_returns_exactly_what_the_device_serves(sims: Simulators) -> None:
    got: dict[str, dict[str, object]] = {}
    for name, profile in (("boiler-1", "sim-boiler"), ("meter-1", "sim-meter")):
        poller = poller_for(sims, name, profile, CaptureBuffer())
        readings = await poller.poll_once()
        await poller.driver.close()
        got[name] = {r.metric: r.value for r in readings}
        assert got[name] == sims.device(name).visible
        assert all(r.quality is Quality.GOOD for r in readings)
        units = {p.name: p.unit for p in builtin_profile(profile).points}
        assert {r.metric: r.unit for r in readings} == units
    # and the values are physically plausible, not just equal
    assert 0.5 < got["boiler-1"]["pressure"] < 3.0  # type: ignore[operator]
    assert 200 < got["meter-1"]["voltage"] < 260  # type: ignore[operator]


async def test_modbus_exception_marks_only_the_affected_points_bad(sims: Simulators, tmp_path: Path) -> None:
    # A profile that also asks for a register the device does not have (input 200, far from
    # the rest, so it gets its own request): the device answers "illegal data address".
    text = (Path(__file__).resolve().parents[1] / "protocol/profiles/sim-boiler.toml").read_text()
    text += '\n[[points]]\nname = "ghost"\ntable = "input"\naddress = 200\ntype = "uint16"\n'
    path = tmp_path / "ghost.toml"
    path.write_text(text)
    poller = poller_for(sims, "boiler-1", "", CaptureBuffer(), profile_path=path)
    readings = {r.metric: r for r in await poller.poll_once()}
    await poller.driver.close()
    assert readings["ghost"].quality is Quality.BAD and readings["ghost"].value is None
    assert readings["flow_temp"].quality is Quality.GOOD
    assert readings["flow_temp"].value == sims.device("boiler-1").visible["flow_temp"]
    errors = poller.metrics.poll_errors.labels("boiler-1", "exception-2")._value.get()
    assert errors == 1


async def test_device_that_disappears_gives_bad_readings_and_backs_off() -> None:
    port = free_port()
    cfg = SimConfig(boilers=1, meters=0, base_port=port, speed=0)
    buf = CaptureBuffer()
    async with run_simulators(cfg) as sim:
        poller = poller_for(sim, "boiler-1", "sim-boiler", buf, interval=0.5, port=port, timeout=0.3)
        good = await poller.poll_once()
        assert all(r.quality is Quality.GOOD for r in good) and poller.failures == 0
    # The device is gone (server stopped, connection closed).
    bad = await poller.poll_once()
    assert len(bad) == len(good) and all(r.quality is Quality.BAD and r.value is None for r in bad)
    await poller.poll_once()
    assert poller.failures == 2
    assert poller._next_delay() == 2.0  # 0.5 s doubled twice
    for _ in range(10):
        await poller.poll_once()
    assert poller._next_delay() == 8.0  # capped at backoff_max
    # It comes back on the same port: the next poll is good again and the back-off resets.
    async with run_simulators(cfg) as sim:
        again = await poller.poll_once()
        assert [r.value for r in again] == [sim.device("boiler-1").visible[r.metric] for r in again]
        assert poller.failures == 0 and poller._next_delay() == 0
    await poller.driver.close()


async def test_a_silent_device_does_not_delay_the_others(sims: Simulators) -> None:
    # A device that accepts the TCP connection and never answers: every request times out.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    fast_buf, slow_buf = CaptureBuffer(), CaptureBuffer()
    fast = poller_for(sims, "meter-1", "sim-meter", fast_buf, interval=0.05)
    slow = poller_for(sims, "boiler-1", "sim-boiler", slow_buf, interval=0.05,
                      port=silent.getsockname()[1], timeout=0.2)
    tasks = [asyncio.create_task(fast.run()), asyncio.create_task(slow.run())]
    t0 = time.monotonic()
    await asyncio.sleep(1.5)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.monotonic() - t0
    silent.close()
    fast_polls = len(fast_buf.readings) // len(builtin_profile("sim-meter").points)
    assert fast_polls >= 0.7 * elapsed / 0.05, f"only {fast_polls} polls of the healthy device in {elapsed:.1f}s"
    assert all(r.quality is Quality.GOOD for r in fast_buf.readings)
    assert slow_buf.readings and all(r.quality is Quality.BAD for r in slow_buf.readings)
    slow_polls = len(slow_buf.readings) // len(builtin_profile("sim-boiler").points)
    assert slow_polls <= 5  # timeouts plus exponential back-off, not 30 attempts
    assert slow.metrics.poll_errors.labels("boiler-1", "timeout")._value.get() >= 1


async def test_per_point_intervals_are_honoured(sims: Simulators, tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[1] / "protocol/profiles/sim-boiler.toml").read_text()
    # slow counters: read every 0.25 s while the rest is read every 0.05 s
    text = text.replace('name = "operating_hours"', 'name = "operating_hours"\ninterval_s = 0.25')
    text = text.replace('name = "burner_starts"', 'name = "burner_starts"\ninterval_s = 0.25')
    path = tmp_path / "slow.toml"
    path.write_text(text)
    profile = load_profile(path)
    buf = CaptureBuffer()
    driver = ModbusDriver(ModbusLink.tcp("127.0.0.1", sims.device("boiler-1").port, 1.0), 1, profile)
    poller = DevicePoller("boiler-1", driver, 0.05, 8.0, buf, EdgeMetrics(),
                          {p.name: p.interval_s for p in profile.points if p.interval_s})
    task = asyncio.create_task(poller.run())
    await asyncio.sleep(1.02)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    counts: dict[str, int] = {}
    for r in buf.readings:
        counts[r.metric] = counts.get(r.metric, 0) + 1
    assert 18 <= counts["flow_temp"] <= 22, counts
    assert 4 <= counts["operating_hours"] <= 5, counts
    assert counts["burner_starts"] == counts["operating_hours"]
    # When both groups are due they are read together: the slow points never get polls of their own.
    assert poller.metrics.polls.labels("boiler-1", "ok")._value.get() == counts["flow_temp"]
    assert driver.plan() != driver.plan(frozenset({"flow_temp"}))
