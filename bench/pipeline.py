"""Pipeline benchmark: ``python -m bench.pipeline [--quick]``.

Measures, on real parts:

* ``edge_readings_per_s`` — the edge uplink draining a pre-filled SQLite buffer to a real
  Mosquitto with QoS 1 (a reading counts once the broker's PUBACK removed it from the buffer);
* ``hub_ingest_readings_per_s`` — the hub process (``twin-hub run``) taking v1 telemetry from the
  broker into SQLite with deduplication (10 % of the messages are sent twice, as QoS 1
  redelivery would); counted from first publish until the last row is committed;
* ``edge_rss_mb`` — peak RSS of a ``twin-edge run`` process polling 4 simulated devices (2
  boilers, 2 meters over Modbus TCP) every 100 ms, plus its CPU use, and its CPU use when
  polling at 1 Hz (the normal idle-ish state of a gateway).

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt
import psutil

from bench.common import log, run_bench
from edge.buffer import ReadingBuffer
from edge.config import EdgeConfig
from edge.metrics import EdgeMetrics
from edge.reading import Reading
from edge.uplink import Uplink
from fleet.broker import Mosquitto
from fleet.configs import write_edge_config, write_hub_config
from fleet.net import free_port
from fleet.procs import ReadyProcess
from protocol.schema import encode_telemetry_v1


async def bench_edge_uplink(broker: Mosquitto, work: Path, n: int) -> dict[str, Any]:
    """Fill a buffer with n readings, then time the uplink until the buffer is empty."""
    cfg = EdgeConfig.model_validate({
        "gateway": {"site": "bench", "name": "gw-1"},
        "mqtt": {"port": broker.port, "batch_max_readings": 1000, "max_inflight": 8},
        "buffer": {"path": str(work / "edge-bench.db")},
    })
    buf = ReadingBuffer(cfg.buffer.path)
    await buf.open()
    devices = {f"boiler-{i}": ("boiler", "sim-boiler") for i in range(1, 5)}
    await buf.register_devices(devices)
    now = time.time_ns() // 1_000_000
    metrics = ["flow_temp", "return_temp", "pressure", "flue_temp", "modulation", "water_flow"]
    await buf.submit([Reading(f"boiler-{i % 4 + 1}", metrics[i % 6], now - 60_000 + i // 24, 20.0 + (i % 500) / 10,
                              "degC") for i in range(n)])
    await buf.flush()
    up = Uplink(cfg, buf, devices, EdgeMetrics())
    t0 = time.perf_counter()
    task = asyncio.create_task(up.run())
    deadline = t0 + 300
    while buf.backlog and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - t0
    left = buf.backlog
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await buf.close()
    return {"edge_readings_per_s": round((n - left) / elapsed), "edge_uplink_readings": n - left,
            "edge_uplink_seconds": round(elapsed, 2)}


async def bench_hub_ingest(broker: Mosquitto, work: Path, n: int, per_msg: int = 500) -> dict[str, Any]:
    """Publish n readings in messages of per_msg (10 % sent twice); time until all are stored."""
    db = work / "hub-bench.db"
    http_port = free_port()
    cfg = write_hub_config(work / "hub.toml", database_url=f"sqlite://{db}", mqtt_port=broker.port,
                           http_port=http_port, client_id="bench-hub", log_level="WARNING")
    hub = ReadyProcess.python("twin-hub", "hub.cli", "run", "--config", str(cfg), log_path=work / "hub.log")
    hub.start(timeout=60)
    try:
        devices = {f"boiler-{i}": ("boiler", "sim-boiler") for i in range(1, 5)}
        base = time.time_ns() // 1_000_000 - 3_600_000
        payloads = []
        seq = dict.fromkeys(devices, 0)
        for m in range(n // per_msg):
            rows = []
            for j in range(per_msg):
                dev = f"boiler-{(j % 4) + 1}"
                seq[dev] += 1
                rows.append((dev, "flow_temp", seq[dev], base + m * 100 + j, 40.0 + (j % 400) / 10, "degC", "good"))
            payloads.append(encode_telemetry_v1("bench", "gw-1", base, devices, rows))
        rng = random.Random(1)
        sends = payloads + rng.sample(payloads, len(payloads) // 10)  # redelivered duplicates
        rng.shuffle(sends)
        proc = psutil.Process(hub.pid)
        proc.cpu_percent()
        t0 = time.perf_counter()
        async with aiomqtt.Client(broker.host, broker.port, identifier="bench-pub", max_inflight_messages=50) as pub:
            pub.pending_calls_threshold = 100  # 50 publishes in flight is the point here, not a leak
            sem = asyncio.Semaphore(50)

            async def send(p: bytes) -> None:
                async with sem:
                    await pub.publish("twin/v1/bench/gw-1/telemetry", p, qos=1)
            await asyncio.gather(*(send(p) for p in sends))
        t_pub = time.perf_counter() - t0
        stored = 0
        deadline = time.perf_counter() + 300
        while time.perf_counter() < deadline:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                stored = c.execute("SELECT count(*) FROM reading").fetchone()[0]
            if stored >= n:
                break
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - t0
        cpu = proc.cpu_percent()
        return {"hub_ingest_readings_per_s": round(stored / elapsed), "hub_ingest_readings": stored,
                "hub_ingest_expected": n, "hub_ingest_duplicate_messages": len(sends) - len(payloads),
                "hub_ingest_seconds": round(elapsed, 2), "hub_publish_seconds": round(t_pub, 2),
                "hub_cpu_percent_of_core": round(cpu, 1)}
    finally:
        hub.stop()


def bench_edge_rss(broker: Mosquitto, work: Path, seconds: float) -> dict[str, Any]:
    """Run sims + a real edge agent polling 4 devices; sample its RSS and CPU."""
    sim = ReadyProcess.python("twin-sim", "firmware_sim.cli", "--boilers", "2", "--meters", "2",
                              "--base-port", "0", "--log-level", "WARNING", log_path=work / "sim.log").start()
    out: dict[str, Any] = {}
    try:
        for label, interval, secs in (("fast", 0.1, seconds), ("1hz", 1.0, max(10.0, seconds / 2))):
            cfg = write_edge_config(work / f"edge-{label}.toml", site="bench", gateway=f"gw-{label}",
                                    mqtt_port=broker.port, devices=sim.ready["devices"],
                                    poll_interval_s=interval, buffer_path=work / f"edge-{label}.db",
                                    log_level="WARNING")
            edge = ReadyProcess.python("twin-edge", "edge.cli", "run", "--config", str(cfg),
                                       log_path=work / f"edge-{label}.log").start()
            try:
                proc = psutil.Process(edge.pid)
                time.sleep(1.0)  # imports and first connections are not the steady state
                proc.cpu_percent()
                rss = []
                t_end = time.monotonic() + secs
                while time.monotonic() < t_end:
                    rss.append(proc.memory_info().rss / 2**20)
                    time.sleep(0.25)
                cpu = proc.cpu_percent()
            finally:
                edge.stop()
            if label == "fast":
                out.update({"edge_rss_mb": round(max(rss), 1), "edge_rss_mb_median": round(statistics.median(rss), 1),
                            "edge_cpu_percent_polling_4_devices_10hz": round(cpu, 1)})
            else:
                out.update({"edge_cpu_percent_polling_4_devices_1hz": round(cpu, 1),
                            "edge_rss_mb_1hz": round(max(rss), 1)})
    finally:
        sim.stop()
    return out


async def main_async(quick: bool) -> dict[str, Any]:
    n_edge = 200_000 if quick else 1_000_000
    n_hub = 100_000 if quick else 500_000
    rss_secs = 10.0 if quick else 60.0
    result: dict[str, Any] = {"mode": "quick" if quick else "full"}
    with tempfile.TemporaryDirectory(prefix="twin-bench-") as tmp:
        work = Path(tmp)
        with Mosquitto(workdir=work / "mosquitto") as broker:
            log(f"edge uplink: {n_edge} readings buffer → Mosquitto (QoS 1)")
            result.update(await bench_edge_uplink(broker, work, n_edge))
            log(f"  {result['edge_readings_per_s']} readings/s")
            log(f"hub ingest: {n_hub} readings broker → SQLite with dedupe")
            result.update(await bench_hub_ingest(broker, work, n_hub))
            log(f"  {result['hub_ingest_readings_per_s']} readings/s")
            log(f"edge RSS/CPU: polling 4 devices for {rss_secs:.0f} s")
            result.update(await asyncio.to_thread(bench_edge_rss, broker, work, rss_secs))
            log(f"  peak RSS {result['edge_rss_mb']} MB")
    result["cpu_count"] = psutil.cpu_count()
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the JSON summary as the last line."""
    return run_bench("bench.pipeline", __doc__, main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
