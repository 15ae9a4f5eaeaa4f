"""Alert engine cost: evaluation rate, and hub ingest with and without alerting.

``python -m bench.alerts [--quick]`` — the last line is one JSON object:

* ``engine_readings_per_s`` — ``AlertEngine.evaluate_batch`` with the built-in rules over
  ``sim-boiler`` readings (pressure, flue, flow and return temperature, all normal: no change of
  state), SQLite in a temp dir.
* ``ingest_readings_per_s_alerts_off`` / ``_on`` — an in-process hub, a real Mosquitto, SQLite:
  the same telemetry (messages of 500 readings) published with QoS 1, until every reading is
  stored; ``[alerts] enabled = false`` against the built-in rules (median of the runs).
* ``engine_lag_s`` — with alerting on, how long after the last commit the engine had evaluated
  everything.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt

from fleet.broker import Mosquitto
from hub.alerts.engine import AlertEngine
from hub.alerts.rules import AlertsConfig
from hub.config import HubConfig
from hub.db import Database
from hub.service import running_hub
from hub.store import TelemetryItem
from protocol.schema import Value, decode_telemetry, encode_telemetry_v1

METRICS = ("pressure", "flue_temp", "flow_temp", "return_temp")
NORMAL = {"pressure": 1.5, "flue_temp": 60.0, "flow_temp": 65.0, "return_temp": 45.0}
DEVICES = {f"boiler-{i}": ("boiler", "sim-boiler") for i in range(1, 5)}


def _payloads(n: int, per_msg: int, base: int) -> list[bytes]:
    seq = dict.fromkeys(DEVICES, 0)
    out = []
    for m in range(n // per_msg):
        rows: list[tuple[str, str, int, int, Value, str, str]] = []
        for j in range(per_msg):
            dev = f"boiler-{j % 4 + 1}"
            seq[dev] += 1
            metric = METRICS[(j // 4) % 4]
            rows.append((dev, metric, seq[dev], base + m * 1000 + j, NORMAL[metric], "", "good"))
        out.append(encode_telemetry_v1("bench", "gw-1", base, DEVICES, rows))
    return out


async def bench_engine(n: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        db = await Database(f"sqlite://{d}/hub.db").open()
        try:
            base = time.time_ns() // 1_000_000 - 3_600_000
            engine = AlertEngine(db, AlertsConfig(), clock=lambda: base)
            items = [TelemetryItem(decode_telemetry(p), base) for p in _payloads(n, 500, base)]
            t0 = time.perf_counter()
            for item in items:
                await engine.evaluate_batch([item])
            return n / (time.perf_counter() - t0)
        finally:
            await db.close()


async def bench_ingest(enabled: bool, n: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        broker = Mosquitto(workdir=Path(d) / "mosquitto")
        broker.start()
        try:
            config = HubConfig.model_validate({
                "database": {"url": f"sqlite://{d}/hub.db"}, "log_level": "WARNING",
                "mqtt": {"port": broker.port, "client_id": "bench-alerts-hub"}, "http": {"port": 0},
                "alerts": {"enabled": enabled}})
            payloads = _payloads(n, 500, time.time_ns() // 1_000_000 - 3_600_000)
            async with running_hub(config) as hub:
                t0 = time.perf_counter()
                async with aiomqtt.Client(broker.host, broker.port, identifier="bench-alerts-pub",
                                          max_inflight_messages=50) as pub:
                    for p in payloads:
                        await pub.publish("twin/v1/bench/gw-1/telemetry", p, qos=1)
                deadline = time.monotonic() + 300
                while hub.stats.readings_stored < n:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"only {hub.stats.readings_stored} of {n} readings stored")
                    await asyncio.sleep(0.01)
                stored = time.perf_counter()
                await hub.alerts.drain(60)
                return n / (stored - t0), time.perf_counter() - stored
        finally:
            broker.cleanup()


async def main_async(quick: bool) -> dict[str, Any]:
    n = 50_000 if quick else 200_000
    runs = 1 if quick else 3
    engine = await bench_engine(n)
    off, on, lag = [], [], []
    for _ in range(runs):
        off.append((await bench_ingest(False, n))[0])
        rate, behind = await bench_ingest(True, n)
        on.append(rate)
        lag.append(behind)
    return {"mode": "quick" if quick else "full", "readings": n, "runs": runs,
            "engine_readings_per_s": round(engine),
            "ingest_readings_per_s_alerts_off": round(statistics.median(off)),
            "ingest_readings_per_s_alerts_on": round(statistics.median(on)),
            "engine_lag_s": round(max(lag), 3)}


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m bench.alerts [--quick]``."""
    args = sys.argv[1:] if argv is None else argv
    print(json.dumps(asyncio.run(main_async("--quick" in args))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
