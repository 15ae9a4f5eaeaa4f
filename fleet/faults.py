"""Fault injection on a local fleet: the parts, the crashes and the exactly-once verdict shared by
the fault-injection tests (``tests/test_faults_*.py``) and their benchmark (``bench/faults.py``).

The ground truth is the edge buffer's ``device_seq`` table: the buffer assigns a device's
sequence numbers in the transaction that commits its readings, consecutively from ``first_seq``
(taken from the clock when the file first saw the device), so ``first_seq..last_seq`` is exactly
the set of readings the edge ever committed to that file (docs/delivery.md). After a fault the
hub must hold every one of them exactly once, and a device's readings ordered by ``seq`` must
have non-decreasing timestamps. Readings captured but not yet committed when the agent died are
allowed to be lost: they never got a sequence number.

Everything here drives real processes (``twin-sim``, ``twin-edge run``, ``twin-hub run``) and
reads both databases read-only with SQLite; nothing imports the edge or the hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from fleet.broker import Mosquitto
from fleet.configs import write_edge_config
from fleet.net import free_port
from fleet.procs import ReadyProcess
from fleet.proxy import TcpProxy

SIM_DEVICES = ("boiler-1", "boiler-2", "meter-1", "meter-2")


# -- reading the two databases (read-only) -----------------------------------------------------


@contextlib.contextmanager
def _readonly(path: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        yield db
    finally:
        db.close()


SeqRanges = dict[str, tuple[int, int]]
"""``device → (first_seq, last_seq)``: the sequence numbers an edge buffer committed."""


def buffer_seq_ranges(path: Path) -> SeqRanges:
    """``device → (first_seq, last_seq)`` of an edge buffer: the readings the edge ever committed."""
    with _readonly(path) as db:
        return {d: (int(a), int(b)) for d, a, b in db.execute("SELECT device, first_seq, last_seq FROM device_seq")}


def committed_count(ranges: SeqRanges) -> int:
    """Readings committed, all devices."""
    return sum(b - a + 1 for a, b in ranges.values())


def buffer_backlog(path: Path) -> int:
    """Readings committed to an edge buffer and not yet acknowledged by the broker."""
    with _readonly(path) as db:
        return int(db.execute("SELECT count(*) FROM readings").fetchone()[0])


def buffer_integrity(path: Path) -> str:
    """``PRAGMA integrity_check`` of an edge buffer (``"ok"`` when sound), read-only, WAL included."""
    with _readonly(path) as db:
        rows = db.execute("PRAGMA integrity_check").fetchall()
    return "; ".join(str(r[0]) for r in rows)


_HUB_ROWS = """
SELECT d.name, r.seq, r.ts_ms FROM reading r
JOIN device d ON d.id = r.device_id JOIN gateway g ON g.id = d.gateway_id JOIN site s ON s.id = g.site_id
WHERE s.name = ? AND g.name = ?
"""


def hub_rows(db_path: Path, site: str, gateway: str) -> dict[str, list[tuple[int, int]]]:
    """``device → [(seq, ts_ms), ...]`` of one gateway, read from the hub's SQLite database."""
    out: dict[str, list[tuple[int, int]]] = {}
    if not db_path.exists():
        return out
    with _readonly(db_path) as db:
        try:
            for dev, seq, ts in db.execute(_HUB_ROWS, (site, gateway)):
                out.setdefault(dev, []).append((int(seq), int(ts)))
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
    return out


def hub_stored_in(db_path: Path, site: str, gateway: str, ranges: SeqRanges) -> int:
    """Readings of each device with a seq in ``ranges[device]`` stored at the hub (an index range
    scan: cheap enough to poll while a million-reading backlog drains)."""
    total = 0
    if not db_path.exists():
        return 0
    with _readonly(db_path) as db:
        for dev, (first, last) in ranges.items():
            try:
                row = db.execute(
                    "SELECT count(*) FROM reading r JOIN device d ON d.id = r.device_id JOIN gateway g ON "
                    "g.id = d.gateway_id JOIN site s ON s.id = g.site_id WHERE s.name = ? AND g.name = ? "
                    "AND d.name = ? AND r.seq BETWEEN ? AND ?", (site, gateway, dev, first, last)).fetchone()
            except sqlite3.OperationalError as exc:
                if "no such table" not in str(exc):
                    raise
                return 0
            total += int(row[0])
    return total


def hub_rows_via_api(api: str, site: str, gateway: str, devices: list[str], token: str,
                     page: int = 10_000) -> dict[str, list[tuple[int, int]]]:
    """Like :func:`hub_rows`, through ``GET /api/v1/devices/{id}/readings`` (paged with ``since``),
    signed in with the bearer ``token``."""
    out: dict[str, list[tuple[int, int]]] = {}
    for dev in devices:
        uid = f"{site}.{gateway}.{dev}"
        seen: dict[int, tuple[int, int]] = {}
        raw: list[tuple[int, int]] = []
        since: str | None = None
        while True:
            query = {"limit": str(page), **({"since": since} if since else {})}
            url = f"{api}/api/v1/devices/{uid}/readings?{urllib.parse.urlencode(query)}"
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=30) as resp:
                batch = json.loads(resp.read())
            fresh = [r for r in batch if r["seq"] not in seen]
            for r in fresh:
                ts = _iso_ms(r["ts"])
                seen[r["seq"]] = (r["seq"], ts)
                raw.append((r["seq"], ts))
            if len(batch) < page or not fresh:
                break
            since = batch[-1]["ts"]  # inclusive: the overlap is skipped by seq above
        out[dev] = raw
    return out


def _iso_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


# -- the verdict -------------------------------------------------------------------------------


@dataclass
class DeviceVerdict:
    """What the hub holds of one device against what its edge committed."""

    device: str
    first_seq: int
    last_seq: int
    """Seqs ``first_seq..last_seq`` were committed by the edge and must each be stored once."""
    stored: int
    """Rows at the hub."""
    lost: list[int] = field(default_factory=list)
    """Committed seqs missing at the hub."""
    duplicated: int = 0
    """Rows beyond the first per seq."""
    unexpected: list[int] = field(default_factory=list)
    """Seqs at the hub the edge never committed (a seq that went backwards or was reused)."""
    out_of_order: int = 0
    """Adjacent pairs (by seq) whose timestamp goes backwards."""

    @property
    def committed(self) -> int:
        """Readings the edge committed for this device."""
        return self.last_seq - self.first_seq + 1 if self.last_seq else 0


@dataclass
class Verdict:
    """Exactly-once and order, per device; :attr:`ok` when nothing is lost, doubled or foreign."""

    devices: dict[str, DeviceVerdict]

    @property
    def committed(self) -> int:
        """Readings the edge committed, all devices."""
        return sum(d.committed for d in self.devices.values())

    @property
    def stored(self) -> int:
        """Rows at the hub, all devices."""
        return sum(d.stored for d in self.devices.values())

    @property
    def lost(self) -> int:
        """Committed readings missing at the hub."""
        return sum(len(d.lost) for d in self.devices.values())

    @property
    def duplicated(self) -> int:
        """Readings stored more than once."""
        return sum(d.duplicated for d in self.devices.values())

    @property
    def unexpected(self) -> int:
        """Readings at the hub outside 1..last_seq."""
        return sum(len(d.unexpected) for d in self.devices.values())

    @property
    def out_of_order(self) -> int:
        """Timestamp inversions along seq."""
        return sum(d.out_of_order for d in self.devices.values())

    @property
    def ok(self) -> bool:
        """Every committed reading stored exactly once, nothing else, order intact."""
        return not (self.lost or self.duplicated or self.unexpected or self.out_of_order)

    def describe(self) -> str:
        """One line per device, with the first offending seqs."""
        lines = [f"committed {self.committed}, stored {self.stored}, lost {self.lost}, "
                 f"duplicated {self.duplicated}, unexpected {self.unexpected}, out of order {self.out_of_order}"]
        for d in self.devices.values():
            lines.append(f"  {d.device}: committed {d.first_seq}..{d.last_seq} ({d.committed}), stored {d.stored}, "
                         f"lost {len(d.lost)} "
                         f"{_ranges(d.lost)}, duplicated {d.duplicated}, unexpected {_ranges(d.unexpected)}, "
                         f"out of order {d.out_of_order}")
        return "\n".join(lines)


def _ranges(seqs: list[int], limit: int = 8) -> str:
    if not seqs:
        return "[]"
    out: list[str] = []
    start = prev = seqs[0]
    for s in [*seqs[1:], None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if s is not None:
            start = prev = s
    more = f" …(+{len(out) - limit} ranges)" if len(out) > limit else ""
    return "[" + ", ".join(out[:limit]) + more + "]"


def check_exactly_once(ranges: SeqRanges, hub: dict[str, list[tuple[int, int]]]) -> Verdict:
    """Compare the hub's rows with what the edge committed (``first_seq..last_seq`` per device)."""
    devices: dict[str, DeviceVerdict] = {}
    for dev in sorted(set(ranges) | set(hub)):
        first, last = ranges.get(dev, (0, 0))
        rows = sorted(hub.get(dev, []))
        seqs = [s for s, _ in rows]
        distinct = set(seqs)
        v = DeviceVerdict(dev, first, last, len(rows))
        v.duplicated = len(seqs) - len(distinct)
        v.lost = [s for s in range(first, last + 1) if s not in distinct] if last else []
        v.unexpected = sorted(s for s in distinct if not (last and first <= s <= last))
        v.out_of_order = sum(1 for (_, t0), (_, t1) in itertools.pairwise(rows) if t1 < t0)
        devices[dev] = v
    return Verdict(devices)


# -- watching what goes over the broker ----------------------------------------------------------


class TelemetryTap:
    """A plain MQTT subscriber to one gateway's telemetry and events that remembers each
    (device, seq).

    The hub keeps the first copy of a (device, seq) and ignores later ones, so a sequence
    number reused for a *different* reading would be a silent loss that no count at the hub can
    show. The tap sees every copy and counts such conflicts (same device and seq, different
    metric, time, value or quality), and how often readings were sent again. It also keeps the
    gateway's events (``buffer_thinned`` and the like) with their ``readings_dropped``.
    """

    def __init__(self, broker_port: int, site: str, gateway: str, host: str = "127.0.0.1") -> None:
        self.topic = f"twin/v1/{site}/{gateway}/telemetry"
        self.events_topic = f"twin/v1/{site}/{gateway}/events"
        self.messages = 0
        self.readings = 0
        self.resent = 0
        self.conflicts: list[tuple[str, int]] = []
        self.events: list[dict[str, Any]] = []
        self._digest: dict[tuple[str, int], bytes] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"tap-{site}-{gateway}",
                                   clean_session=True)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(1, 1)
        self._host, self._port = host, broker_port

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe([(self.topic, 1), (self.events_topic, 1)])
        self._subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        data = json.loads(msg.payload)
        with self._lock:
            if msg.topic == self.events_topic:
                self.events.append(data)
                return
            self.messages += 1
            for r in data["readings"]:
                key = (r["device"], int(r["seq"]))
                digest = hashlib.blake2b(json.dumps([r["metric"], r["ts"], r["value"], r.get("quality")])
                                         .encode(), digest_size=8).digest()
                self.readings += 1
                old = self._digest.setdefault(key, digest)
                if old is not digest:
                    self.resent += 1
                    if old != digest:
                        self.conflicts.append(key)

    def dropped_reported(self) -> int:
        """Sum of ``readings_dropped`` over the events seen (each event may arrive twice: QoS 1,
        so events are counted once per (ts, type, readings_dropped))."""
        with self._lock:
            unique = {(e.get("ts"), e.get("type"), e.get("readings_dropped", 0)) for e in self.events}
        return sum(int(d) for _, _, d in unique)

    def start(self, timeout: float = 10.0) -> TelemetryTap:
        """Connect and subscribe; returns once the subscription is sent."""
        self._client.connect(self._host, self._port, keepalive=10)
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise TimeoutError(f"telemetry tap could not subscribe on port {self._port}")
        return self

    def stop(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def summary(self) -> dict[str, int]:
        """Counters: messages, readings, distinct readings, resent readings, conflicts, events."""
        with self._lock:
            return {"messages": self.messages, "readings": self.readings, "distinct": len(self._digest),
                    "resent": self.resent, "conflicts": len(self.conflicts), "events": len(self.events)}


# -- the fleet -----------------------------------------------------------------------------------


def prometheus_values(text: str) -> dict[str, float]:
    """Sample name (with labels) → value, from the Prometheus text format."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def scrape(url: str, timeout: float = 5.0) -> dict[str, float]:
    """GET a Prometheus endpoint and parse it."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return prometheus_values(resp.read().decode())


def write_fault_hub_config(path: Path, *, db_path: Path, mqtt_port: int, http_port: int, client_id: str,
                           log_level: str = "INFO") -> Path:
    """A ``hub.toml`` that reconnects within a second of the broker coming back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'log_level = "{log_level}"\n\n'
        f'[database]\nurl = "sqlite://{db_path}"\n\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {mqtt_port}\nclient_id = "{client_id}"\n'
        "keepalive = 5\nreconnect_max_s = 1.0\n\n"
        f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n')
    return path


EDGE_MQTT = {"keepalive_s": 5, "publish_timeout_s": 3.0, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0,
             "batch_max_delay_ms": 50}
"""Edge uplink settings for fault runs: notice a dead link within seconds, retry every second."""


class FaultFleet:
    """Simulators, hub and edge agent around one Mosquitto, with the controls the faults need.

    The edge reaches the broker through a :class:`~fleet.proxy.TcpProxy` when ``via_proxy``
    (with ``latency_s`` added each way, like a cellular link); its buffer lives at
    ``buffer_path`` (default ``work/edge-buffer.db``), so a test can put it on a small file
    system.
    """

    def __init__(self, work: Path, broker: Mosquitto, *, site: str = "site-f", gateway: str = "gw-f",
                 poll_interval_s: float = 0.05, seed: int = 1, via_proxy: bool = False, latency_s: float = 0.0,
                 buffer_path: Path | None = None, edge_mqtt: dict[str, Any] | None = None,
                 edge_buffer: dict[str, Any] | None = None, log_level: str = "INFO") -> None:
        self.work = work
        self.broker = broker
        self.site, self.gateway = site, gateway
        self.poll_interval_s = poll_interval_s
        self.seed = seed
        self.log_level = log_level
        self.buffer_path = buffer_path or work / "edge-buffer.db"
        self.hub_db = work / "hub.db"
        self.edge_mqtt = {**EDGE_MQTT, **(edge_mqtt or {})}
        self.edge_buffer = edge_buffer or {}
        self.proxy: TcpProxy | None = TcpProxy(broker.port) if via_proxy or latency_s else None
        self.latency_s = latency_s
        self.sim: ReadyProcess | None = None
        self.hub: ReadyProcess | None = None
        self.edge: ReadyProcess | None = None
        self.api = ""
        self.http_port = free_port()
        self.edge_metrics_port = free_port()
        self.edge_starts = 0
        self.hub_starts = 0
        self.devices: list[dict[str, Any]] = []
        self.hub_duplicates_seen = 0.0
        """Sum of the hub's duplicate counter over hub processes that were scraped before they
        stopped (a hub killed with SIGKILL takes its count with it)."""

    # -- parts ---------------------------------------------------------------------------------

    def start(self, hub: bool = True, edge: bool = True) -> FaultFleet:
        """Start simulators, (proxy,) hub and edge."""
        if self.proxy:
            self.proxy.start()
            self.proxy.set_latency(self.latency_s, self.latency_s)
        self.sim = ReadyProcess.python(
            "twin-sim", "firmware_sim.cli", "--boilers", "2", "--meters", "2", "--base-port", "0",
            "--seed", str(self.seed), "--tick", "1", "--speed", "20", "--log-level", "WARNING",
            log_path=self.work / "sim.log").start()
        self.devices = self.sim.ready["devices"]
        if [d["name"] for d in self.devices] != list(SIM_DEVICES):
            raise RuntimeError(f"twin-sim served {self.devices}, expected {SIM_DEVICES}")
        if hub:
            self.start_hub()
        if edge:
            self.start_edge()
        return self

    @property
    def edge_mqtt_port(self) -> int:
        """Where the edge connects: the proxy if there is one, else the broker."""
        return self.proxy.port if self.proxy else self.broker.port

    def start_hub(self, timeout: float = 60.0) -> ReadyProcess:
        """Start ``twin-hub run`` on the fleet's database (same client id: same broker session)."""
        cfg = write_fault_hub_config(self.work / "hub.toml", db_path=self.hub_db, mqtt_port=self.broker.port,
                                     http_port=self.http_port, client_id=f"hub-{self.site}-{self.gateway}",
                                     log_level=self.log_level)
        self.hub_starts += 1
        self.hub = ReadyProcess.python("twin-hub", "hub.cli", "run", "--config", str(cfg),
                                       log_path=self.work / "hub.log").start(timeout)
        self.api = str(self.hub.ready["api"])
        return self.hub

    def hub_metrics(self) -> dict[str, float]:
        """The running hub's Prometheus metrics."""
        return scrape(f"{self.api}/metrics")

    def stop_hub(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Stop the hub with ``sig`` (SIGKILL for a crash); returns its exit code."""
        if self.hub is None:
            return None
        hub, self.hub = self.hub, None
        if sig == signal.SIGKILL:
            hub.kill()
            return hub.stop()
        with contextlib.suppress(OSError):
            self.hub_duplicates_seen += hub_duplicates(scrape(f"{self.api}/metrics"))
        hub.signal(sig)
        code = hub.wait(timeout)
        hub.stop()
        return code

    def edge_config(self, devices: bool = True, name: str = "edge.toml", port: int | None = None) -> Path:
        """Write the edge config: all simulated devices (or none, to only drain the buffer)."""
        return write_edge_config(
            self.work / name, site=self.site, gateway=self.gateway,
            mqtt_port=port or self.edge_mqtt_port, devices=self.devices if devices else [],
            poll_interval_s=self.poll_interval_s, buffer_path=self.buffer_path,
            metrics_port=self.edge_metrics_port if devices else 0, mqtt=self.edge_mqtt,
            buffer=self.edge_buffer, log_level=self.log_level)

    def start_edge(self, timeout: float = 30.0) -> ReadyProcess:
        """Start ``twin-edge run`` on the fleet's buffer; checks the ready line names every device."""
        cfg = self.edge_config()
        self.edge_starts += 1
        self.edge = ReadyProcess.python("twin-edge", "edge.cli", "run", "--config", str(cfg),
                                        log_path=self.work / "edge.log").start(timeout)
        ready = self.edge.ready
        if ready.get("gateway") != self.gateway or ready.get("devices") != list(SIM_DEVICES):
            raise RuntimeError(f"edge ready line {ready} does not name gateway {self.gateway} and {SIM_DEVICES}")
        return self.edge

    def edge_metrics(self) -> dict[str, float]:
        """The running edge's Prometheus metrics."""
        return scrape(f"http://127.0.0.1:{self.edge_metrics_port}/metrics")

    def kill_edge(self) -> None:
        """``kill -9`` the edge agent (a crash or a power cut of the process)."""
        if self.edge is not None:
            self.edge.kill()
            self.edge.stop()
            self.edge = None

    def stop_edge(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the edge: it commits what it captured and says goodbye; returns the exit code."""
        if self.edge is None:
            return None
        edge, self.edge = self.edge, None
        edge.signal(signal.SIGTERM)
        code = edge.wait(timeout)
        edge.stop()
        return code

    def drain(self, timeout: float = 60.0, progress: Callable[[int], None] | None = None) -> int:
        """With the edge stopped: run an agent without devices on the same buffer (directly on the
        broker) until the buffer is empty, then stop it cleanly. Returns readings left (0)."""
        if self.edge is not None:
            raise RuntimeError("stop the edge before draining its buffer")
        cfg = self.edge_config(devices=False, name="edge-drain.toml", port=self.broker.port)
        drain = ReadyProcess.python("twin-edge", "edge.cli", "run", "--config", str(cfg),
                                    log_path=self.work / "edge-drain.log").start()
        left = buffer_backlog(self.buffer_path)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                left = buffer_backlog(self.buffer_path)
                if progress:
                    progress(left)
                if left == 0:
                    break
                time.sleep(0.1)
        finally:
            drain.signal(signal.SIGTERM)
            code = drain.wait(15)
            drain.stop()
        if code != 0:
            raise RuntimeError(f"draining agent exited with {code}:\n{drain.log_tail()}")
        return left

    def verdict(self, ranges: SeqRanges | None = None) -> Verdict:
        """The hub's rows of this gateway against the buffer's committed seqs."""
        truth = ranges if ranges is not None else buffer_seq_ranges(self.buffer_path)
        return check_exactly_once(truth, hub_rows(self.hub_db, self.site, self.gateway))

    def wait_for_hub(self, timeout: float = 20.0, allowed_lost: int = 0) -> Verdict:
        """Wait until the hub stored every committed reading but ``allowed_lost`` (or ``timeout``);
        the last verdict."""
        truth = buffer_seq_ranges(self.buffer_path)
        want = committed_count(truth) - allowed_lost
        deadline = time.monotonic() + timeout
        while True:
            if hub_stored_in(self.hub_db, self.site, self.gateway, truth) >= want or time.monotonic() > deadline:
                return self.verdict(truth)
            time.sleep(0.2)

    def finish(self, drain_timeout: float = 60.0, hub_timeout: float = 20.0, allowed_lost: int = 0) -> Verdict:
        """Stop the edge cleanly, drain its buffer, wait for the hub; the final verdict."""
        if self.edge is not None:
            code = self.stop_edge()
            if code != 0:
                raise RuntimeError(f"edge exited with {code} on SIGTERM:\n{self.log_tail('edge')}")
        left = self.drain(drain_timeout)
        if left:
            raise RuntimeError(f"{left} readings still in the buffer after {drain_timeout}s of draining")
        return self.wait_for_hub(hub_timeout, allowed_lost)

    def log_tail(self, part: str, n: int = 3000) -> str:
        """The end of a part's log file (``edge``, ``hub``, ``sim``, ``edge-drain``)."""
        p = self.work / f"{part}.log"
        return p.read_bytes()[-n:].decode(errors="replace") if p.exists() else "(no log)"

    def close(self) -> None:
        """Stop everything that still runs (the broker belongs to the caller)."""
        for proc in (self.edge, self.hub, self.sim):
            if proc is not None:
                proc.stop()
        self.edge = self.hub = self.sim = None
        if self.proxy:
            self.proxy.stop()

    def __enter__(self) -> FaultFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hub_duplicates(metrics: dict[str, float]) -> float:
    """The hub's duplicate-reading counter from its metrics."""
    return metrics.get("twin_hub_readings_duplicate_total", 0.0)


# -- crash loop ----------------------------------------------------------------------------------


@dataclass
class CrashRecord:
    """The state of the buffer right after one ``kill -9``."""

    iteration: int
    ran_s: float
    integrity: str
    committed: int
    backlog: int


def crash_loop(fleet: FaultFleet, iterations: int, rng: random.Random, *, min_s: float = 0.3,
               max_s: float = 1.5, time_limit_s: float = 600.0,
               on_kill: Callable[[CrashRecord], None] | None = None) -> list[CrashRecord]:
    """Let the edge run a random while, ``kill -9`` it, check the buffer file, restart it on the
    same buffer (ready line checked); ``iterations`` times or until ``time_limit_s``.

    Raises if the buffer's committed sequence numbers ever go backwards between kills.
    """
    records: list[CrashRecord] = []
    deadline = time.monotonic() + time_limit_s
    previous: SeqRanges = {}
    for i in range(iterations):
        if time.monotonic() > deadline:
            break
        if fleet.edge is None:
            fleet.start_edge()
        ran = rng.uniform(min_s, max_s)
        time.sleep(ran)
        fleet.kill_edge()
        now = buffer_seq_ranges(fleet.buffer_path)
        went_back = {d: (previous[d], r) for d, r in now.items()
                     if d in previous and (r[0] != previous[d][0] or r[1] < previous[d][1])}
        if went_back or set(previous) - set(now):
            raise AssertionError(f"kill {i + 1}: committed seqs went backwards: {went_back}, {previous} → {now}")
        previous = now
        rec = CrashRecord(i + 1, round(ran, 3), buffer_integrity(fleet.buffer_path), committed_count(now),
                          buffer_backlog(fleet.buffer_path))
        records.append(rec)
        if on_kill:
            on_kill(rec)
        fleet.start_edge()
    return records


# -- a file system that fills up -----------------------------------------------------------------


class MountUnavailable(RuntimeError):
    """A tmpfs cannot be mounted here (not root, or no CAP_SYS_ADMIN in this container)."""


@contextlib.contextmanager
def small_filesystem(path: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of ``size_bytes`` on ``path`` (created) for the block; needs root."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise MountUnavailable(f"mount -t tmpfs on {path} failed ({proc.returncode}): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer can still put on the file system of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill_until(path: Path, leave_bytes: int) -> Path:
    """Write a ballast file at ``path`` so that about ``leave_bytes`` stay free on its file system."""
    n = max(0, free_bytes(path.parent) - leave_bytes)
    with open(path, "wb") as f:
        chunk = b"\0" * 2**20
        while n > 0:
            f.write(chunk[:min(n, len(chunk))])
            n -= min(n, len(chunk))
    return path
