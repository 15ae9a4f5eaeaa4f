"""Hub memory and drain rate when a backlog waits for it in the broker.

``python -m bench.hub_backlog [--quick]`` — the last line is one JSON object:

* ``backlog_readings`` — readings queued in Mosquitto for the hub's persistent session while the
  hub was stopped (messages of 500 readings from 1000 devices, QoS 1): 1,000,000 (quick: 300,000).
* ``drain_readings_per_s`` — from the hub's start until the last of them is committed (SQLite).
* ``hub_rss_mb_peak`` / ``hub_rss_mb_end`` — the hub process, sampled every 100 ms meanwhile.

A real Mosquitto and ``twin-hub`` as its own process. What it guards: the hub reads its broker
connection only as fast as it commits (``[ingest] max_decoded_readings`` and the read gate in
``hub/ingest.py``), because Mosquitto 2.0 does not keep a subscriber to its in-flight window.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import log, run_bench
from bench.dashboard import PER_MSG, Fleet, hub_counts, publish_all, rss_mb
from fleet.broker import Mosquitto
from fleet.configs import write_hub_config
from fleet.net import free_port
from fleet.procs import ReadyProcess

DRAIN_WITHIN_S = 300.0


async def main_async(quick: bool) -> dict[str, Any]:
    readings = 300_000 if quick else 1_000_000
    fleet = Fleet(10, 5, 20)
    password = secrets.token_urlsafe(18)
    with tempfile.TemporaryDirectory(prefix="twin-bench-backlog-") as tmp:
        work = Path(tmp)
        with Mosquitto(workdir=work / "mosquitto") as broker:
            port = free_port()
            cfg = write_hub_config(work / "hub.toml", database_url=f"sqlite://{work / 'hub.db'}",
                                   mqtt_port=broker.port, http_port=port, client_id="bench-backlog-hub",
                                   log_level="WARNING")

            def hub() -> ReadyProcess:
                return ReadyProcess.python("twin-hub", "hub.cli", "run", "--config", str(cfg),
                                           log_path=work / "hub.log", env={"TWIN_ADMIN_PASSWORD": password})

            hub().start(timeout=60).stop()  # the hub's persistent session now exists at the broker
            payloads = fleet.live_payloads(readings, PER_MSG)
            total = len(payloads) * PER_MSG
            await publish_all(broker, payloads, "bench-backlog")
            del payloads
            log(f"{total:,} readings queued in the broker for the stopped hub")
            running = hub().start(timeout=60)
            try:
                assert running.proc is not None
                proc = psutil.Process(running.proc.pid)
                peak, stored = 0.0, 0
                t0 = time.monotonic()
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                    while stored < total:
                        if time.monotonic() - t0 > DRAIN_WITHIN_S:
                            raise TimeoutError(f"only {stored} of {total} readings stored in {DRAIN_WITHIN_S:.0f} s")
                        stored, _ = await hub_counts(http)
                        peak = max(peak, rss_mb(proc))
                        await asyncio.sleep(0.1)
                seconds = time.monotonic() - t0
                end = rss_mb(proc)
            finally:
                running.stop()
    log(f"drained in {seconds:.1f} s; hub RSS peak {peak:.0f} MB, end {end:.0f} MB")
    return {"mode": "quick" if quick else "full", "backlog_readings": total,
            "drain_readings_per_s": round(total / seconds), "hub_rss_mb_peak": round(peak, 1),
            "hub_rss_mb_end": round(end, 1)}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the JSON summary as the last line."""
    return run_bench("bench.hub_backlog", __doc__, main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
