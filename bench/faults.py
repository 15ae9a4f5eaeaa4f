"""Store-and-forward fault benchmark: ``python -m bench.faults [--quick]``.

On real processes (``twin-sim``, Mosquitto, ``twin-hub run`` on SQLite, ``twin-edge run``):

* **Crash iterations** — the edge polls 2 boilers and 2 meters every 50 ms through a proxy that
  adds 40 ms each way (so kills often land between a delivered publish and its PUBACK); it is
  killed with SIGKILL after a random 0.3–1.5 s (seeded) and restarted on the same buffer, 50
  times (20 with ``--quick``). Then it is stopped, its buffer drained, and the hub's rows are
  compared with the buffer's committed sequence numbers: ``lost`` (committed, not at the hub)
  and ``duplicated`` (stored twice) over all iterations, plus the redeliveries the hub absorbed.
* **Outage backlog** — a buffer pre-filled with 1,000,000 readings (100,000 with ``--quick``) of
  the same 4 devices, as left by a long outage (written through ``edge.buffer.ReadingBuffer``,
  timestamps one poll per second per device, ~7.7 h for the full million), is drained by a
  ``twin-edge run`` that also keeps polling the 4 devices at 1 Hz. Timed from the edge's start
  until the hub has committed every backlog reading to SQLite: ``backlog_drain_readings_per_s``
  end to end through Mosquitto; ``edge_rss_mb_during_drain`` is the edge's peak RSS meanwhile
  (psutil, every 0.1 s). The backlog and the live readings are then checked exactly-once too.

Targets: lost = 0, duplicated = 0, drain ≥ 30,000 readings/s, RSS ≤ 100 MB. The last line
printed is one JSON object with every figure; progress goes to stderr.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from tqdm import tqdm

from bench.common import log, run_bench
from edge.buffer import ReadingBuffer
from edge.reading import Reading
from fleet.broker import Mosquitto
from fleet.faults import (
    CrashRecord,
    FaultFleet,
    TelemetryTap,
    buffer_backlog,
    buffer_seq_ranges,
    committed_count,
    crash_loop,
    hub_duplicates,
    hub_stored_in,
)
from protocol.profile import builtin_profile

KINDS = {"boiler-1": "sim-boiler", "boiler-2": "sim-boiler", "meter-1": "sim-meter", "meter-2": "sim-meter"}


def bench_crashes(broker: Mosquitto, work: Path, iterations: int) -> dict[str, Any]:
    """kill -9 the edge ``iterations`` times under load; the exactly-once verdict over all of them."""
    tap = TelemetryTap(broker.port, "bench", "gw-crash").start()
    t0 = time.perf_counter()
    with FaultFleet(work, broker, site="bench", gateway="gw-crash", latency_s=0.04,
                    log_level="WARNING") as fleet, \
            tqdm(total=iterations, desc="kill -9 edge", unit="kill", file=sys.stderr) as bar:
        fleet.start()
        time.sleep(1.0)

        def killed(rec: CrashRecord) -> None:
            bar.update(1)
            bar.set_postfix(committed=rec.committed, backlog=rec.backlog)

        records = crash_loop(fleet, iterations, random.Random(20251125), time_limit_s=600, on_kill=killed)
        time.sleep(0.5)
        verdict = fleet.finish(drain_timeout=60)
        redelivered = hub_duplicates(fleet.hub_metrics())
    tap.stop()
    seen = tap.summary()
    if not verdict.ok:
        log(verdict.describe())
    return {
        "crash_iterations": len(records),
        "crash_seconds": round(time.perf_counter() - t0, 1),
        "crash_committed": verdict.committed,
        "crash_stored": verdict.stored,
        "lost": verdict.lost,
        "duplicated": verdict.duplicated,
        "crash_unexpected_seqs": verdict.unexpected,
        "crash_out_of_order": verdict.out_of_order,
        "crash_buffer_integrity_failures": sum(r.integrity != "ok" for r in records),
        "crash_backlog_at_kill_max": max((r.backlog for r in records), default=0),
        "crash_redeliveries_absorbed_by_hub": int(redelivered),
        "crash_seq_conflicts": seen["conflicts"],
    }


async def prefill(path: Path, n: int) -> float:
    """Write ``n`` readings of the 4 simulated devices into a new buffer, one poll per device
    per second ending now; returns the seconds it took."""
    t0 = time.perf_counter()
    buf = ReadingBuffer(path, flush_max_readings=100_000)
    await buf.open()
    await buf.register_devices({d: (builtin_profile(p).profile.kind.value, p) for d, p in KINDS.items()})
    units = {d: list(builtin_profile(p).units.items()) for d, p in KINDS.items()}
    per_round = sum(len(u) for u in units.values())
    rounds = -(-n // per_round)
    start = time.time_ns() // 1_000_000 - rounds * 1000
    left = n
    with tqdm(total=n, desc="pre-fill buffer", unit="rdg", unit_scale=True, file=sys.stderr) as bar:
        chunk: list[Reading] = []
        for r in range(rounds):
            ts = start + r * 1000
            for dev, pts in units.items():
                for i, (metric, unit) in enumerate(pts):
                    if left == 0:
                        break
                    chunk.append(Reading(dev, metric, ts, round(20.0 + (r % 600) / 10 + i, 2), unit))
                    left -= 1
            if len(chunk) >= 50_000 or left == 0:
                await buf.submit(chunk)
                await buf.flush()
                bar.update(len(chunk))
                chunk = []
            if left == 0:
                break
    await buf.close()
    return time.perf_counter() - t0


async def bench_backlog(broker: Mosquitto, work: Path, n: int) -> dict[str, Any]:
    """Drain a pre-filled backlog of ``n`` readings end to end; figures and the verdict."""
    fleet = FaultFleet(work, broker, site="bench", gateway="gw-backlog", poll_interval_s=1.0, log_level="WARNING")
    try:
        log(f"outage backlog: pre-filling {n:,} readings")
        prefill_s = await prefill(fleet.buffer_path, n)
        backlog = buffer_backlog(fleet.buffer_path)
        ranges = buffer_seq_ranges(fleet.buffer_path)
        assert backlog == n == committed_count(ranges), (backlog, n, ranges)
        await asyncio.to_thread(fleet.start, edge=False)
        log("edge starting on the backlog")
        t0 = time.perf_counter()
        edge = await asyncio.to_thread(fleet.start_edge)
        t_ready = time.perf_counter() - t0
        proc = psutil.Process(edge.pid)
        rss: list[float] = []
        stored = 0
        next_count = 0.0
        deadline = t0 + 600
        with tqdm(total=n, desc="backlog → hub", unit="rdg", unit_scale=True, file=sys.stderr) as bar:
            while time.perf_counter() < deadline:
                rss.append(proc.memory_info().rss / 2**20)
                if time.perf_counter() >= next_count:
                    now_stored = hub_stored_in(fleet.hub_db, fleet.site, fleet.gateway, ranges)
                    bar.update(now_stored - stored)
                    stored = now_stored
                    next_count = time.perf_counter() + 0.25
                    if stored >= n:
                        break
                await asyncio.sleep(0.1)
        elapsed = time.perf_counter() - t0
        buffer_left = buffer_backlog(fleet.buffer_path)
        log(f"  {stored:,} backlog readings at the hub in {elapsed:.1f}s ({stored / elapsed:,.0f}/s), "
            f"edge peak RSS {max(rss):.1f} MB")
        verdict = await asyncio.to_thread(fleet.finish, 120.0, 30.0)
        if not verdict.ok:
            log(verdict.describe())
        return {
            "backlog_readings": n,
            "backlog_prefill_seconds": round(prefill_s, 1),
            "backlog_drain_seconds": round(elapsed, 2),
            "backlog_drain_readings_per_s": round(stored / elapsed),
            "backlog_edge_ready_seconds": round(t_ready, 2),
            "backlog_stored": stored,
            "backlog_left_in_buffer_at_end": buffer_left,
            "edge_rss_mb_during_drain": round(max(rss), 1),
            "edge_rss_mb_during_drain_median": round(statistics.median(rss), 1),
            "backlog_lost": verdict.lost,
            "backlog_duplicated": verdict.duplicated,
            "backlog_live_readings": verdict.committed - n,
            "backlog_ok": verdict.ok,
        }
    finally:
        await asyncio.to_thread(fleet.close)


async def main_async(quick: bool) -> dict[str, Any]:
    iterations = 20 if quick else 50
    n_backlog = 100_000 if quick else 1_000_000
    result: dict[str, Any] = {"mode": "quick" if quick else "full"}
    with tempfile.TemporaryDirectory(prefix="twin-bench-faults-") as tmp:
        work = Path(tmp)
        with Mosquitto(workdir=work / "mosquitto") as broker:
            log(f"crash: {iterations} × kill -9 of the edge under load (4 devices every 50 ms, 40 ms link delay)")
            (work / "crash").mkdir()
            result.update(await asyncio.to_thread(bench_crashes, broker, work / "crash", iterations))
            log(f"  lost {result['lost']}, duplicated {result['duplicated']}, "
                f"redeliveries absorbed {result['crash_redeliveries_absorbed_by_hub']}")
            (work / "backlog").mkdir()
            result.update(await bench_backlog(broker, work / "backlog", n_backlog))
    result["targets_met"] = bool(
        result["lost"] == 0 and result["duplicated"] == 0 and result["backlog_ok"]
        and result["backlog_drain_readings_per_s"] >= 30_000 and result["edge_rss_mb_during_drain"] <= 100)
    result["cpu_count"] = psutil.cpu_count()
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the JSON summary as the last line."""
    return run_bench("bench.faults", __doc__, main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
