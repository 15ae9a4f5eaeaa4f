"""Power loss of the gateway process: ``kill -9`` the edge agent again and again under load.

Real processes: ``twin-sim`` (2 boilers, 2 meters over Modbus TCP, simulated time running 20×),
Mosquitto, ``twin-hub run`` on SQLite, ``twin-edge run`` polling every device every 50 ms. The
edge reaches the broker through fleet/proxy.py with 40 ms added each way (a cellular link), so
a kill often falls between a delivered publish and its PUBACK and the batch is sent again. The
edge runs a random 0.3–1.5 s (seeded), is killed with SIGKILL, its buffer file must pass
``PRAGMA integrity_check``, and it is restarted on the same buffer (ready line checked). At the
end the edge is stopped cleanly, an agent without devices drains what is left, and the hub must
hold every reading the edge ever committed — seqs ``first_seq..last_seq`` of each device in
the buffer's ``device_seq`` table, each once — with timestamps non-decreasing along seq. A tap on
the broker checks that no sequence number ever carried two different readings (a reuse the hub's
deduplication would hide).
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

from fleet.broker import Mosquitto
from fleet.faults import (
    SIM_DEVICES,
    CrashRecord,
    FaultFleet,
    TelemetryTap,
    crash_loop,
    hub_duplicates,
    hub_rows_via_api,
)
from fleet.hubapi import sign_in
from tests.hubtools import ADMIN_PASSWORD

ITERATIONS = 12
LATENCY_S = 0.04
"""One-way delay between edge and broker (through fleet/proxy.py): a cellular link's 80 ms round
trip keeps a batch delivered-but-unacknowledged long enough for kills to land there."""


def test_kill_9_edge_under_load_loses_and_duplicates_nothing(mosquitto: Mosquitto, tmp_path: Path) -> None:
    rng = random.Random(20251125)
    tap = TelemetryTap(mosquitto.port, "site-f", "gw-f").start()
    kills: list[CrashRecord] = []
    t0 = time.monotonic()
    with FaultFleet(tmp_path, mosquitto, poll_interval_s=0.05, latency_s=LATENCY_S) as fleet:
        fleet.start()
        time.sleep(1.0)
        records = crash_loop(fleet, ITERATIONS, rng, time_limit_s=60, on_kill=kills.append)
        assert len(records) == ITERATIONS, f"only {len(records)} kills within the time limit"
        bad = [r for r in records if r.integrity != "ok"]
        assert not bad, f"buffer file damaged by kill -9: {bad}"
        assert fleet.edge_starts == ITERATIONS + 1
        time.sleep(0.5)
        verdict = fleet.finish()
        assert verdict.ok, f"after {ITERATIONS} kills:\n{verdict.describe()}\nhub log:\n{fleet.log_tail('hub')}"
        assert set(verdict.devices) == set(SIM_DEVICES)
        assert min(d.committed for d in verdict.devices.values()) > 500

        # The same rows through the REST API.
        api_rows = hub_rows_via_api(fleet.api, fleet.site, fleet.gateway, list(SIM_DEVICES),
                                    sign_in(fleet.api, "admin", ADMIN_PASSWORD))
        for dev, d in verdict.devices.items():
            assert sorted(s for s, _ in api_rows[dev]) == list(range(d.first_seq, d.last_seq + 1)), dev

        dups = hub_duplicates(fleet.hub_metrics())
        tap.stop()
        seen = tap.summary()
        assert seen["conflicts"] == 0, f"seqs reused for different readings: {tap.conflicts[:10]}"
        assert seen["distinct"] == verdict.committed, seen
        # Some kills fell between a delivered publish and its PUBACK: redelivery was exercised.
        assert seen["resent"] > 0 and dups > 0, (seen, dups)
        print(f"\ncrash: {ITERATIONS} kills in {time.monotonic() - t0:.1f}s, committed {verdict.committed}, "
              f"stored {verdict.stored}, hub duplicates absorbed {dups:.0f}, tap {seen}, "
              f"backlog at kills {[r.backlog for r in records]}")


def test_sigterm_while_first_polls_are_in_flight_stops_the_agent(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """docs/delivery.md: a clean stop (SIGTERM) commits everything captured and exits. Sent the
    moment the agent is ready, while its first Modbus requests are in flight, it must still exit
    (a supervisor would otherwise SIGKILL it and lose what it captured)."""
    codes: list[int | None] = []
    with FaultFleet(tmp_path, mosquitto) as fleet:
        fleet.start(hub=False, edge=False)
        for delay in (0.0, 0.0, 0.003, 0.5):
            edge = fleet.start_edge()
            time.sleep(delay)
            edge.signal(signal.SIGTERM)
            codes.append(edge.wait(5))
            edge.kill()
            edge.stop()
            fleet.edge = None
    assert codes == [0, 0, 0, 0], (
        f"exit codes {codes} for SIGTERM 0, 0, 3 ms and 0.5 s after the ready line; None = still running "
        f"5 s after SIGTERM (then killed). Edge log:\n"
        f"{fleet.log_tail('edge', 1500)}")
