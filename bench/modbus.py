"""Field-bus benchmark: ``python -m bench.modbus [--quick]``.

* ``rtu_line_utilisation`` — payload registers per second achieved over Modbus RTU at 19200
  baud 8E1 against the simulator on a pseudo-terminal (which emulates the wire timing), divided
  by the theoretical maximum of that line with 125-register reads:

      request  = 8 bytes (addr, fc, start, count, CRC)
      response = 5 + 2 × 125 bytes (addr, fc, byte count, data, CRC)
      t_cycle  = (8 + 255) × 11 / baud  +  2 × 3.5 × 11 / baud      (11 bits per 8E1 character)
      max      = 125 / t_cycle  registers/s  (≈ 808 at 19200 baud)

* ``tcp_registers_per_s`` — payload registers per second when the edge's Modbus driver polls
  several simulated devices concurrently over TCP on loopback, 125 registers per request.
* ``poll_jitter_ms_p99`` — how late (or early) polls start against their fixed-rate schedule
  with 20 devices polled every second by the edge's pollers.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import log, run_bench
from edge.drivers.modbus import ModbusDriver, ModbusLink
from edge.metrics import EdgeMetrics
from edge.poller import DevicePoller
from edge.reading import Reading
from fleet.procs import ReadyProcess
from protocol.profile import DeviceProfile, builtin_profile, load_profile

BLOCK_PROFILE = """\
[profile]
name = "block-125"
kind = "boiler"
max_registers_per_request = 125
max_gap = 124

[[points]]
name = "first"
table = "input"
address = 0

[[points]]
name = "last"
table = "input"
address = 124
"""



def rtu_theoretical_registers_per_s(baud: int, char_bits: int = 11, count: int = 125) -> float:
    """Payload registers/s of a line that does nothing but back-to-back reads of ``count``."""
    frame_bytes = 8 + 5 + 2 * count
    t_cycle = frame_bytes * char_bits / baud + 2 * 3.5 * char_bits / baud
    return count / t_cycle


def block_profile(work: Path) -> DeviceProfile:
    path = work / "block-125.toml"
    path.write_text(BLOCK_PROFILE)
    return load_profile(path)


def start_sim(work: Path, *args: str, name: str = "sim") -> ReadyProcess:
    return ReadyProcess.python("twin-sim", "firmware_sim.cli", "--log-level", "WARNING", *args,
                               log_path=work / f"{name}.log").start(timeout=60)


async def read_loop(driver: ModbusDriver, until: float) -> tuple[int, int, list[float]]:
    """Back-to-back polls until ``until``; returns (registers, errors, latencies)."""
    regs = errors = 0
    lat: list[float] = []
    count = sum(r.count for r in driver.plan())
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        results = await driver.read()
        lat.append(time.perf_counter() - t0)
        if any(r.error for r in results):
            errors += 1
        else:
            regs += count
    return regs, errors, lat


async def poll_concurrently(drivers: list[ModbusDriver], seconds: float
                            ) -> tuple[list[tuple[int, int, list[float]]], float]:
    """Back-to-back polls of every driver at once for ``seconds``; results and elapsed time."""
    until = time.perf_counter() + seconds
    t0 = time.perf_counter()
    results = await asyncio.gather(*(read_loop(d, until) for d in drivers))
    elapsed = time.perf_counter() - t0
    for d in drivers:
        await d.close()
    return results, elapsed


async def bench_rtu(work: Path, seconds: float, baud: int = 19200) -> dict[str, Any]:
    sim = start_sim(work, "--rtu", "--boilers", "2", "--meters", "0", "--baud", str(baud), "--parity", "E",
                    "--pad-registers", "125", name="sim-rtu")
    try:
        devices = sim.ready["devices"]
        # Linux ptys refuse 8E1 (tcsetattr EINVAL), so the client opens the pty 8N1; the
        # simulator still times the wire as 8E1 (11 bits per character), which is what we measure.
        link = ModbusLink.rtu(devices[0]["serial"], baud, "N", 1, 8, 1.0, 3.5 * 11 / baud)
        profile = block_profile(work)
        # Two devices on one bus, polled concurrently: the link serialises them.
        drivers = [ModbusDriver(link, d["unit_id"], profile) for d in devices]
        await link.ensure_connected()
        results, elapsed = await poll_concurrently(drivers, seconds)
    finally:
        sim.stop()
    regs = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    achieved = regs / elapsed
    theory = rtu_theoretical_registers_per_s(baud)
    lat = sorted(x for r in results for x in r[2])
    return {"rtu_line_utilisation": round(achieved / theory, 3), "rtu_registers_per_s": round(achieved, 1),
            "rtu_theoretical_registers_per_s": round(theory, 1), "rtu_errors": errors, "rtu_baud": baud,
            "rtu_request_p50_ms": round(1000 * lat[len(lat) // 2], 1) if lat else None}


async def bench_tcp(work: Path, seconds: float, devices: int = 8) -> dict[str, Any]:
    sim = start_sim(work, "--boilers", str(devices), "--meters", "0", "--base-port", "0",
                    "--pad-registers", "125", name="sim-tcp")
    try:
        profile = block_profile(work)
        drivers = [ModbusDriver(ModbusLink.tcp(d["host"], d["port"], 2.0), 1, profile)
                   for d in sim.ready["devices"]]
        for d in drivers:
            await d.link.ensure_connected()
        results, elapsed = await poll_concurrently(drivers, seconds)
    finally:
        sim.stop()
    lat = sorted(x for r in results for x in r[2])
    return {"tcp_registers_per_s": round(sum(r[0] for r in results) / elapsed),
            "tcp_devices": devices, "tcp_errors": sum(r[1] for r in results),
            "tcp_request_p50_ms": round(1000 * lat[len(lat) // 2], 2),
            "tcp_request_p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 2)}


class _Capture:
    def __init__(self) -> None:
        self.polls: dict[str, list[int]] = {}

    async def submit(self, readings: list[Reading]) -> None:
        if readings:
            self.polls.setdefault(readings[0].device, []).append(readings[0].ts_ms)


async def bench_jitter(work: Path, seconds: float, devices: int = 20) -> dict[str, Any]:
    sim = start_sim(work, "--boilers", str(devices // 2), "--meters", str(devices - devices // 2),
                    "--base-port", "0", name="sim-jitter")
    try:
        sink = _Capture()
        metrics = EdgeMetrics()
        pollers = []
        for d in sim.ready["devices"]:
            profile = builtin_profile(d["profile"])
            driver = ModbusDriver(ModbusLink.tcp(d["host"], d["port"], 1.0), 1, profile)
            pollers.append(DevicePoller(d["name"], driver, 1.0, 60.0, sink, metrics))
        tasks = [asyncio.create_task(p.run()) for p in pollers]
        await asyncio.sleep(seconds + 0.5)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        sim.stop()
    deviations = []
    for stamps in sink.polls.values():
        t0 = stamps[0]
        deviations += [abs(ts - (t0 + 1000 * k)) for k, ts in enumerate(stamps)]
    deviations.sort()
    return {"poll_jitter_ms_p99": deviations[int(len(deviations) * 0.99)] if deviations else None,
            "poll_jitter_ms_p50": statistics.median(deviations) if deviations else None,
            "poll_jitter_ms_max": deviations[-1] if deviations else None,
            "poll_jitter_samples": len(deviations), "poll_jitter_devices": len(sink.polls)}


async def main_async(quick: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"mode": "quick" if quick else "full"}
    with tempfile.TemporaryDirectory(prefix="twin-bench-modbus-") as tmp:
        work = Path(tmp)
        secs = 8.0 if quick else 30.0
        log(f"RTU 19200 8E1 over a pty, 125-register reads, {secs:.0f} s")
        result.update(await bench_rtu(work, secs))
        log(f"  utilisation {result['rtu_line_utilisation']}")
        log(f"TCP, 8 devices concurrently, 125-register reads, {secs / 2:.0f} s")
        result.update(await bench_tcp(work, secs / 2))
        log(f"  {result['tcp_registers_per_s']} registers/s")
        jitter_secs = 10.0 if quick else 60.0
        log(f"poll jitter, 20 devices at 1 s, {jitter_secs:.0f} s")
        result.update(await bench_jitter(work, jitter_secs))
        log(f"  p99 {result['poll_jitter_ms_p99']} ms")
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the JSON summary as the last line."""
    return run_bench("bench.modbus", __doc__, main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
