"""End to end on real parts: simulators (Modbus TCP) → edge agent → Mosquitto → hub → REST API.

The test compares what the hub serves with what the simulators served (their ground-truth
log), not just that rows exist; and, after the edge is stopped and its buffer drained by a
restarted agent, that every sequence number the edge committed is stored at the hub exactly once.
"""

from __future__ import annotations

import bisect
import json
import signal
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet.broker import Mosquitto
from fleet.configs import write_edge_config, write_hub_config
from fleet.faults import prometheus_values
from fleet.net import free_port
from fleet.procs import ReadyProcess
from tests.hubtools import admin_auth

KINDS = {"boiler-1": "boiler", "boiler-2": "boiler", "meter-1": "meter", "meter-2": "meter"}


def load_truth(path: Path) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    truth: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        truth.setdefault(rec["device"], []).append((rec["t"], rec["values"]))
    for rows in truth.values():
        rows.sort(key=lambda r: r[0])
    return truth


def served_candidates(rows: list[tuple[int, dict[str, Any]]], ts_ms: int, metric: str) -> list[Any]:
    """Values the device could have answered for a read that started at ts_ms: the snapshot
    visible at ts_ms, or one that became visible during the read (a tick landing mid-request)."""
    times = [t for t, _ in rows]
    i = bisect.bisect_right(times, ts_ms) - 1
    cands = [rows[i][1][metric]] if i >= 0 else []
    cands += [v[metric] for t, v in rows[i + 1:] if t <= ts_ms + 300]
    return cands


def run_fleet_and_check(mosquitto: Mosquitto, work: Path, database_url: str) -> None:
    truth_path = work / "truth.jsonl"
    procs: list[ReadyProcess] = []
    try:
        http_port = free_port()
        hub_cfg = write_hub_config(work / "hub.toml", database_url=database_url, mqtt_port=mosquitto.port,
                                   http_port=http_port, client_id=f"hub-{work.name[-20:]}")
        hub = ReadyProcess.python("twin-hub", "hub.cli", "run", "--config", str(hub_cfg), log_path=work / "hub.log")
        procs.append(hub.start(timeout=60))
        api = hub.ready["api"]

        # The simulators start after the hub: the meters begin 4 Wh below the rollover, and the
        # edge must read them before they wrap, whatever the hub's start-up takes.
        sim = ReadyProcess.python("twin-sim", "firmware_sim.cli", "--boilers", "2", "--meters", "2",
                                  "--base-port", "0", "--seed", "7", "--tick", "1", "--speed", "10",
                                  "--start-hour", "7", "--meter-start-kwh", "42949672.946",
                                  "--truth-log", str(truth_path), log_path=work / "sim.log")
        procs.append(sim.start())
        devices = sim.ready["devices"]
        assert [d["name"] for d in devices] == list(KINDS)

        edge_metrics_port = free_port()
        edge_cfg = write_edge_config(work / "edge.toml", site="site-1", gateway="gw-1", mqtt_port=mosquitto.port,
                                     devices=devices, poll_interval_s=0.25, metrics_port=edge_metrics_port,
                                     mqtt={"batch_max_delay_ms": 50})
        edge = ReadyProcess.python("twin-edge", "edge.cli", "run", "--config", str(edge_cfg),
                                   log_path=work / "edge.log")
        procs.append(edge.start())

        with httpx.Client(auth=admin_auth(), base_url=api, timeout=10) as client:
            # Let the fleet run until every device has a few seconds of data at the hub.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                devs = client.get("/api/v1/devices").json()
                if len(devs) == 4 and all(d["last_seen"] for d in devs):
                    counts = [len(client.get(f"/api/v1/devices/{d['id']}/readings",
                                             params={"metric": "flow_temp" if d["kind"] == "boiler" else "power"})
                                  .json()) for d in devs]
                    if min(counts) >= 12:
                        break
                time.sleep(0.3)
            else:
                pytest.fail(f"hub did not get data for 4 devices in 30 s; edge log:\n{edge.log_tail()}")

            edge_metrics = prometheus_values(httpx.get(f"http://127.0.0.1:{edge_metrics_port}/metrics").text)
            assert edge_metrics["twin_edge_published_readings_total"] > 0
            assert edge_metrics["twin_edge_mqtt_connected"] == 1
            assert edge_metrics['twin_edge_polls_total{device="boiler-1",outcome="ok"}'] >= 10

            assert edge.stop() == 0  # SIGTERM: commits what it captured, announces offline
            assert sim.stop() == 0
            time.sleep(1.0)  # let the last acknowledged batches land at the hub

            devs = {d["id"]: d for d in client.get("/api/v1/devices").json()}
            assert set(devs) == {f"site-1.gw-1.{n}" for n in KINDS}
            for uid, d in devs.items():
                assert (d["kind"], d["site"], d["gateway"]) == (KINDS[uid.split(".")[2]], "site-1", "gw-1")
                assert d["status"] in ("online", "stale", "offline")

            health = client.get("/api/v1/health").json()
            assert health["status"] in ("ok", "degraded")

            truth = load_truth(truth_path)
            buffer_db = sqlite3.connect(work / "edge-buffer.db")
            seq_range = {d: (first, last) for d, first, last in
                         buffer_db.execute("SELECT device, first_seq, last_seq FROM device_seq")}
            buffer_db.close()
            assert set(seq_range) == set(KINDS) and min(b - a for a, b in seq_range.values()) > 50

            # Whatever the stopped agent had not handed over is still in its buffer; an agent
            # with no devices on the same buffer only drains it (device kinds come from the
            # buffer itself). Readings may have reached the hub without their PUBACK reaching
            # the edge; they are sent again and must be absorbed by deduplication.
            drain_cfg = write_edge_config(work / "edge-drain.toml", site="site-1", gateway="gw-1",
                                          mqtt_port=mosquitto.port, devices=[],
                                          buffer_path=work / "edge-buffer.db")
            drain = ReadyProcess.python("twin-edge", "edge.cli", "run", "--config", str(drain_cfg),
                                        log_path=work / "edge-drain.log")
            procs.append(drain.start())
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                with sqlite3.connect(work / "edge-buffer.db") as db:
                    if db.execute("SELECT count(*) FROM readings").fetchone()[0] == 0:
                        break
                time.sleep(0.2)
            assert drain.stop() == 0
            time.sleep(1.0)

            checked = 0
            stored = 0
            for uid in devs:
                name = uid.split(".")[2]
                readings = client.get(f"/api/v1/devices/{uid}/readings", params={"limit": 10000}).json()
                seqs = [r["seq"] for r in readings]
                stored += len(seqs)
                assert len(seqs) == len(set(seqs)), f"{uid}: duplicated sequence numbers at the hub"
                # Nothing lost, nothing twice: every sequence number the edge committed is stored once.
                first, last = seq_range[name]
                assert sorted(seqs) == list(range(first, last + 1)), f"{uid}: lost readings"
                for r in readings:
                    assert r["quality"] == "good", r
                    if r["metric"] == "burner_on":
                        assert type(r["value"]) is bool, r  # not 1.0: types survive buffer and hub
                    ts_ms = int(datetime.fromisoformat(r["ts"].replace("Z", "+00:00")).timestamp() * 1000)
                    cands = served_candidates(truth[name], ts_ms, r["metric"])
                    assert any(float(c) == float(r["value"]) for c in cands), (
                        f"{uid} {r['metric']} at {r['ts']}: hub has {r['value']}, simulator served {cands}")
                    checked += 1
                latest = client.get(f"/api/v1/devices/{uid}/latest").json()
                assert latest["id"] == uid
                latest_by_metric = latest["metrics"]
                newest: dict[str, Any] = {}
                for r in readings:
                    newest[r["metric"]] = r
                assert set(latest_by_metric) == set(newest)
                for metric, r in newest.items():
                    got = latest_by_metric[metric]
                    assert (got["value"], got["seq"]) == (r["value"], r["seq"])
            assert checked > 300
            hub_metrics = prometheus_values(client.get("/metrics").text)
            assert hub_metrics["twin_hub_readings_stored_total"] == stored
            assert hub_metrics.get('twin_hub_malformed_messages_total{reason="invalid"}', 0) == 0

            # The meters started 4 Wh below the 32-bit rollover: the hub sees the counter wrap.
            for meter in ("meter-1", "meter-2"):
                energy = client.get(f"/api/v1/devices/site-1.gw-1.{meter}/readings",
                                    params={"metric": "energy_import", "limit": 10000}).json()
                values = [r["value"] for r in sorted(energy, key=lambda r: r["seq"])]
                assert values[0] >= 42949672.94 and values[-1] < 1.0, values
                wrap = next(i for i, v in enumerate(values) if v < 1.0)
                assert values[:wrap] == sorted(values[:wrap]) and values[wrap:] == sorted(values[wrap:])
                assert all(r["unit"] == "kWh" for r in energy)

            assert client.get("/api/v1/devices/site-1.gw-1.nope/latest").status_code == 404
            assert client.get("/api/v1/devices/site-1.gw-1.boiler-1/readings",
                              params={"since": "yesterday"}).status_code == 422
    finally:
        for p in reversed(procs):
            if p.alive():
                p.signal(signal.SIGTERM)
            p.stop()


def test_end_to_end_sqlite(mosquitto: Mosquitto, tmp_path: Path) -> None:
    run_fleet_and_check(mosquitto, tmp_path, f"sqlite://{tmp_path / 'hub.db'}")


def test_end_to_end_postgres(mosquitto: Mosquitto, tmp_path: Path, postgres: Any) -> None:
    run_fleet_and_check(mosquitto, tmp_path, postgres.create_database("e2e"))
