"""Bad device answers, injected by the simulators, as the edge sees them.

Every fault kind (CRC error, timeout, Modbus exception, garbage, truncated frame, vanished
device) must give ``bad`` readings instead of values, be counted per device, back the faulty
device off, and leave the other devices on the same bus on their schedule with good values.
Over RTU the bus is a real pty with the simulator emulating the 19200-baud wire.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable

import pytest

from edge.drivers.base import DeviceError
from edge.drivers.iec62056 import Iec62056Driver
from edge.drivers.modbus import ModbusDriver, ModbusLink
from edge.metrics import EdgeMetrics
from edge.poller import DevicePoller
from edge.reading import Reading
from firmware_sim import SimConfig, run_simulators
from firmware_sim.inject import parse_inject
from protocol.profile import builtin_profile
from protocol.schema import Quality


class Capture:
    def __init__(self) -> None:
        self.readings: list[Reading] = []

    async def submit(self, readings: list[Reading]) -> None:
        self.readings.extend(readings)


def errors(metrics: EdgeMetrics, device: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for metric in metrics.poll_errors.collect():
        for s in metric.samples:
            if s.name.endswith("_total") and s.labels["device"] == device and s.value:
                out[s.labels["kind"]] += int(s.value)
    return out


async def run_pollers(pollers: Iterable[DevicePoller], seconds: float) -> None:
    tasks = [asyncio.create_task(p.run()) for p in pollers]
    await asyncio.sleep(seconds)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# What the edge can tell apart: pymodbus drops frames with a bad CRC, garbage or a cut-off
# tail and waits for a proper answer, so these surface as timeouts.
RTU_EXPECTED = {"crc": {"timeout"}, "timeout": {"timeout"}, "exception": {"exception-4"},
                "garbage": {"timeout"}, "short": {"timeout"}, "disconnect": {"timeout"}}


@pytest.mark.parametrize("kind", sorted(RTU_EXPECTED))
async def test_rtu_fault_kinds_on_a_shared_bus(kind: str) -> None:
    cfg = SimConfig(boilers=2, meters=0, rtu=True, speed=0, seed=3, inject=[parse_inject(f"boiler-2:{kind}=1")],
                    dead_time=60)
    async with run_simulators(cfg) as sim:
        path = sim.device("boiler-1").bus.path  # type: ignore[union-attr]
        # Linux ptys refuse 8E1; the simulator still times the wire as 8E1.
        link = ModbusLink.rtu(path, 19200, "N", 1, 8, 0.15, 3.5 * 11 / 19200)
        profile = builtin_profile("sim-boiler")
        metrics = EdgeMetrics()
        good_buf, bad_buf = Capture(), Capture()
        healthy = DevicePoller("boiler-1", ModbusDriver(link, 1, profile), 0.1, 0.8, good_buf, metrics)
        faulty = DevicePoller("boiler-2", ModbusDriver(link, 2, profile), 0.1, 0.8, bad_buf, metrics)
        await run_pollers([healthy, faulty], 2.0)
        served = sim.device("boiler-1").visible
    n_points = len(profile.points)
    good_polls = len(good_buf.readings) // n_points
    assert good_polls >= 15, f"healthy device polled only {good_polls} times in 2 s"
    assert all(r.quality is Quality.GOOD and r.value == served[r.metric] for r in good_buf.readings)
    assert bad_buf.readings and all(r.quality is Quality.BAD and r.value is None for r in bad_buf.readings)
    bad_polls = len(bad_buf.readings) // n_points
    assert bad_polls <= 6, f"faulty device was not backed off ({bad_polls} polls in 2 s)"
    counted = errors(metrics, "boiler-2")
    assert counted and set(counted) <= RTU_EXPECTED[kind], counted
    assert not errors(metrics, "boiler-1")


TCP_EXPECTED = {"crc": {"timeout", "protocol", "disconnected", "connect"},
                "timeout": {"timeout"}, "exception": {"exception-4"},
                "garbage": {"timeout", "protocol", "disconnected", "connect"},
                "short": {"timeout", "protocol", "disconnected", "connect"},
                "disconnect": {"disconnected", "connect", "timeout"}}


@pytest.mark.parametrize("kind", sorted(TCP_EXPECTED))
async def test_tcp_fault_kinds(kind: str) -> None:
    cfg = SimConfig(boilers=1, meters=1, base_port=0, speed=0, seed=3, inject=[parse_inject(f"meter-1:{kind}=1")])
    async with run_simulators(cfg) as sim:
        metrics = EdgeMetrics()
        bufs = {"boiler-1": Capture(), "meter-1": Capture()}
        pollers = []
        for name in bufs:
            d = sim.device(name)
            driver = ModbusDriver(ModbusLink.tcp("127.0.0.1", d.port, 0.2), 1, d.profile)
            pollers.append(DevicePoller(name, driver, 0.05, 0.8, bufs[name], metrics))
        await run_pollers(pollers, 1.5)
        served = sim.device("boiler-1").visible
    assert len(bufs["boiler-1"].readings) // 13 >= 20
    assert all(r.quality is Quality.GOOD and r.value == served[r.metric] for r in bufs["boiler-1"].readings)
    bad = bufs["meter-1"].readings
    assert bad and all(r.quality is Quality.BAD and r.value is None for r in bad)
    assert len(bad) // 6 <= 6
    counted = errors(metrics, "meter-1")
    assert counted and set(counted) <= TCP_EXPECTED[kind], counted


async def test_partial_fault_rate_keeps_every_good_value_exact() -> None:
    cfg = SimConfig(boilers=1, meters=1, rtu=True, speed=0, seed=11, line_timing=False,
                    inject=[parse_inject("crc=0.3,exception=0.1")])
    async with run_simulators(cfg) as sim:
        link = ModbusLink.rtu(sim.device("boiler-1").bus.path, 19200, "N", 1, 8, 0.1, 0.002)  # type: ignore[union-attr]
        drivers = {n: ModbusDriver(link, sim.device(n).unit_id, sim.device(n).profile) for n in ("boiler-1", "meter-1")}
        outcomes: Counter[str] = Counter()
        for _ in range(40):
            for name, driver in drivers.items():
                try:
                    results = await driver.read()
                except DeviceError as exc:
                    outcomes[exc.kind] += 1
                    continue
                for r in results:
                    if r.error is None:
                        assert r.value == sim.device(name).visible[r.name]
                        outcomes["good"] += 1
                    else:
                        outcomes[r.error] += 1
        for d in drivers.values():
            await d.close()
    assert outcomes["good"] > 200 and outcomes["timeout"] > 5 and outcomes["exception-4"] > 0, outcomes


async def test_iec_meter_readout_and_faults() -> None:
    profile = builtin_profile("iec-meter")
    async with run_simulators(SimConfig(boilers=0, meters=0, iec_meters=1, speed=0, line_timing=False)) as sim:
        meter = sim.iec_meter("iec-meter-1")
        driver = Iec62056Driver(meter.path, profile, timeout_s=1.0)
        results = {r.name: r for r in await driver.read()}
        assert {n: r.error for n, r in results.items() if r.error} == {}
        assert {n: r.value for n, r in results.items()} == {n: meter.visible[n] for n in results}
        assert isinstance(results["energy_import"].value, float) and results["meter_id"].value
        assert driver.identification.startswith("TWN")
    cut = {"garbage", "timeout", "short-frame"}  # a broken block may end before its ETX
    for kind, expected in (("crc", {"bcc"}), ("timeout", {"timeout"}), ("garbage", cut), ("short", cut)):
        cfg = SimConfig(boilers=0, meters=0, iec_meters=1, speed=0, line_timing=False,
                        inject=[parse_inject(f"{kind}=1")])
        async with run_simulators(cfg) as sim:
            driver = Iec62056Driver(sim.iec_meter("iec-meter-1").path, profile, timeout_s=0.5)
            with pytest.raises(DeviceError) as err:
                await driver.read()
            assert err.value.kind in expected, (kind, err.value.kind, str(err.value))
