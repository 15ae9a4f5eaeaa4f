"""Dashboard benchmark: ``python -m bench.dashboard [--quick]``.

What the hub's web dashboard costs at fleet scale, on real parts: a Mosquitto, ``twin-hub run``
as a child process (HTTP on loopback, SQLite in a temp dir, admin password from
``TWIN_ADMIN_PASSWORD``), everything seeded through MQTT ingest (QoS 1) as gateways send it.

The fleet: 10 sites x 5 gateways x 20 devices = 1000 (``--quick``: 4 x 5 x 10 = 200), boilers and
meters, a few readings each; per gateway the last device is offline (newest reading 1 h old) and
the one before stale (5 min), the rest online; per site one boiler over pressure and one meter
over voltage, so the built-in rules open alerts (and ``device-stale`` one per offline device).
One boiler also has an hour of 1 Hz readings of its 12 metrics (43,200 rows).

Figures (the last line printed is one JSON object; bearer auth on every request):

* ``fleet_summary_ms_p50/p99`` — ``GET /api/v1/fleet/summary``; ``fleet_page_ms_p50/p99`` —
  ``GET /fleet`` (HTML with the summary embedded); sequential requests, bodies read in full.
* ``device_readings_1h_ms_p50/p99`` — the device page's range load: the boiler's hour through
  ``GET /api/v1/devices/{id}/readings?since=...&limit=10000``, page after page (the next page from
  the last row's ``ts``, as ``device.js`` does) until a short page; ``device_poll_ms_p50/p99`` —
  its 4-second poll (``since`` = newest held reading - 4 s: about 60 rows). Bodies are read in
  full but not parsed as JSON (the browser's parse is not the hub's cost).
* ``sse_clients`` streams of ``GET /api/v1/stream/fleet`` (httpx, all in the bench process)
  while the fleet sends live telemetry (one message per gateway per second, so the summary
  changes every second): ``sse_event_lag_ms_p50/p99`` — from publishing a new device's first
  reading to each client having the event that shows it (the hub's batching, its coalescing of
  summaries to at most one a second, the build and the fan-out); ``sse_fanout_spread_ms_p50/p99``
  — per such event, from the first client having it to the last.
* ``ingest_readings_per_s_with_sse`` / ``_without_sse`` — the same volume of live telemetry
  (messages of 500, QoS 1, 50 in flight) from first publish until the hub's
  ``twin_hub_readings_stored_total`` counted all of it; without streams is the mean of a run
  before the streams connect and one after they closed (the table grows in between). The
  clients share the machine's cores with the hub, so ``ingest_hub_cpu_ms_per_1k_readings_*`` —
  the hub process's CPU per 1000 readings stored — says what the streams cost the hub itself;
  ``ingest_hub_queue_peak_messages`` the most messages received and not yet committed.
* ``hub_cpu_percent_idle_with_sse`` — the hub process's CPU (percent of one core) over 30 s
  (``--quick`` 10 s) with the streams open and no ingest (the 5 s re-check and the alert
  engine's 10 s sweep run); ``hub_cpu_percent_idle_no_sse`` the same before any stream (10 s,
  ``--quick`` 5 s).
* ``hub_rss_mb`` — the hub's resident memory at the end; ``hub_rss_mb_by_phase`` after each step.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import psutil

from bench.common import log, run_bench
from fleet.broker import Mosquitto
from fleet.configs import write_hub_config
from fleet.net import free_port
from fleet.procs import ReadyProcess
from hub.api.schemas import iso_ms
from protocol.schema import Value, encode_telemetry_v1

Row = tuple[str, str, int, int, Value, str, str]
"""(device, metric, seq, ts_ms, value, unit, quality), as :func:`encode_telemetry_v1` takes."""

BOILER = ("boiler", "sim-boiler")
METER = ("meter", "sim-meter")
BOILER_METRICS: tuple[tuple[str, float, str], ...] = (
    ("flow_temp", 65.0, "degC"), ("return_temp", 45.0, "degC"), ("pressure", 1.5, "bar"), ("flue_temp", 60.0, "degC"))
METER_METRICS: tuple[tuple[str, float, str], ...] = (
    ("energy_import", 1000.0, "kWh"), ("power", 3.2, "kW"), ("voltage", 231.0, "V"))
# The boiler with an hour of history: all 12 points of the sim-boiler profile at 1 Hz.
HISTORY_METRICS: tuple[tuple[str, float, str], ...] = (
    ("flow_temp", 65.0, "degC"), ("return_temp", 45.0, "degC"), ("pressure", 1.5, "bar"),
    ("flue_temp", 60.0, "degC"), ("modulation", 55.0, "%"), ("water_flow", 1.1, "m3/h"), ("burner_on", 1, ""),
    ("fault_code", 0, ""), ("operating_hours", 1234.5, "h"), ("burner_starts", 4321, ""),
    ("outdoor_temp", 5.0, "degC"), ("flow_setpoint", 65.0, "degC"))
PAGE = 10_000  # device.js: the readings API's largest page
MAX_PAGES = 10  # device.js: at most 100 000 readings per range
PER_MSG = 500  # readings per message of the ingest runs
IN_FLIGHT = 50  # QoS 1 publishes in flight during the ingest runs


def now_ms() -> int:
    """Wall-clock epoch milliseconds (reading timestamps, the hub's clock)."""
    return time.time_ns() // 1_000_000


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile ``p`` (0-100) of ``values``; 0.0 when empty."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def p50_p99(name: str, values: list[float]) -> dict[str, Any]:
    """``{name}_p50`` and ``{name}_p99`` rounded to 0.1."""
    return {f"{name}_p50": round(pct(values, 50), 1), f"{name}_p99": round(pct(values, 99), 1)}


class Fleet:
    """Names, roles and reading sequence numbers of the benchmark's fleet."""

    def __init__(self, sites: int, gateways: int, per_gateway: int) -> None:
        self.gateways = [(f"site-{s:02d}", f"gw-{g}") for s in range(1, sites + 1) for g in range(1, gateways + 1)]
        self.per_gateway = per_gateway
        self.seq: dict[str, int] = {}
        self.history = ("site-01", "gw-1", "boiler-02")
        """The boiler with an hour of 1 Hz readings of 12 metrics."""

    @property
    def devices(self) -> int:
        """How many devices the fleet has."""
        return len(self.gateways) * self.per_gateway

    def names(self) -> dict[str, tuple[str, str]]:
        """Device name -> (kind, profile), the same on every gateway: even boilers, odd meters."""
        return {(f"boiler-{j:02d}" if j % 2 == 0 else f"meter-{j:02d}"): (BOILER if j % 2 == 0 else METER)
                for j in range(self.per_gateway)}

    def age_s(self, j: int) -> float:
        """How old the newest seeded reading of device ``j`` is: the last offline, the one before stale."""
        if j == self.per_gateway - 1:
            return 3600.0
        if j == self.per_gateway - 2:
            return 300.0
        return 2.0

    def online(self) -> dict[str, tuple[str, str]]:
        """The devices that get live telemetry (neither the stale nor the offline one)."""
        return {n: kp for j, (n, kp) in enumerate(self.names().items()) if self.age_s(j) < 60}

    def next_seq(self, uid: str) -> int:
        """The next per-device sequence number ((device, seq) is unique in the hub)."""
        self.seq[uid] = self.seq.get(uid, 0) + 1
        return self.seq[uid]

    def seed_payloads(self, t: int) -> list[tuple[str, bytes]]:
        """One message per gateway: three readings, 10 s apart, of each metric of each device."""
        out = []
        for site, gw in self.gateways:
            rows: list[Row] = []
            for j, (name, kp) in enumerate(self.names().items()):
                if (site, gw, name) == self.history:
                    continue  # its hour comes separately
                newest = t - int(self.age_s(j) * 1000)
                metrics = BOILER_METRICS if kp is BOILER else METER_METRICS
                for k in range(3):
                    for metric, value, unit in metrics:
                        v = value
                        if gw == "gw-1" and name == "boiler-00" and metric == "pressure":
                            v = 3.2  # boiler-pressure, critical
                        elif gw == "gw-2" and name == "meter-01" and metric == "voltage":
                            v = 262.0  # meter-voltage, warning
                        elif metric == "energy_import":
                            v = value + k * 0.01
                        rows.append((name, metric, self.next_seq(f"{site}.{gw}.{name}"), newest - (2 - k) * 10_000,
                                     v, unit, "good"))
            out.append((topic(site, gw), encode_telemetry_v1(site, gw, t, self.names(), rows)))
        return out

    def history_payloads(self, end: int, seconds: int = 3600, per_msg_s: int = 50) -> list[tuple[str, bytes]]:
        """The history boiler's hour: 12 metrics at 1 Hz ending at ``end``, 50 s per message."""
        site, gw, name = self.history
        uid = f"{site}.{gw}.{name}"
        out = []
        for m in range(0, seconds, per_msg_s):
            rows: list[Row] = []
            for s in range(m, min(seconds, m + per_msg_s)):
                ts = end - (seconds - 1 - s) * 1000
                wave = math.sin(s / 300)
                for metric, value, unit in HISTORY_METRICS:
                    v: Value = round(value + wave, 2) if isinstance(value, float) else value
                    rows.append((name, metric, self.next_seq(uid), ts, v, unit, "good"))
            out.append((topic(site, gw), encode_telemetry_v1(site, gw, end, {name: BOILER}, rows)))
        return out

    def live_payloads(self, readings: int, per_msg: int) -> list[tuple[str, bytes]]:
        """``readings`` of the online devices, ``per_msg`` a message, gateway after gateway, stamped now."""
        online = self.online()
        names = list(online)
        t = now_ms()
        out = []
        for m in range(max(1, readings // per_msg)):
            site, gw = self.gateways[m % len(self.gateways)]
            rows: list[Row] = []
            for i in range(per_msg):
                name = names[i % len(names)]
                metrics = BOILER_METRICS if online[name] is BOILER else METER_METRICS
                metric, value, unit = metrics[(i // len(names)) % len(metrics)]
                rows.append((name, metric, self.next_seq(f"{site}.{gw}.{name}"), t - 1000 + i, value, unit, "good"))
            out.append((topic(site, gw), encode_telemetry_v1(site, gw, t, online, rows)))
        return out

    def tick_payloads(self) -> list[tuple[str, bytes]]:
        """One second of a live fleet: one message per gateway, one reading per online device."""
        online = self.online()
        t = now_ms()
        out = []
        for site, gw in self.gateways:
            rows: list[Row] = []
            for name, kp in online.items():
                metric, value, unit = (BOILER_METRICS if kp is BOILER else METER_METRICS)[0]
                rows.append((name, metric, self.next_seq(f"{site}.{gw}.{name}"), t, value, unit, "good"))
            out.append((topic(site, gw), encode_telemetry_v1(site, gw, t, online, rows)))
        return out


def topic(site: str, gateway: str) -> str:
    """The telemetry topic of a gateway."""
    return f"twin/v1/{site}/{gateway}/telemetry"


# -- the hub as the dashboard sees it ---------------------------------------------------------


async def hub_counts(http: httpx.AsyncClient) -> tuple[int, int]:
    """(``twin_hub_readings_stored_total``, ``twin_hub_ingest_queue_messages``) from ``/metrics``."""
    r = await http.get("/metrics")
    r.raise_for_status()
    found: dict[str, int] = {}
    for line in r.text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("twin_hub_readings_stored_total", "twin_hub_ingest_queue_messages"):
            found[name] = int(float(value))
    return found["twin_hub_readings_stored_total"], found["twin_hub_ingest_queue_messages"]


async def wait_stored(http: httpx.AsyncClient, target: int, within_s: float) -> int:
    """Poll ``/metrics`` every 20 ms until ``target`` readings are stored; returns the most messages
    seen queued in the hub meanwhile. ``TimeoutError`` after ``within_s``."""
    deadline = time.monotonic() + within_s
    peak = 0
    while True:
        n, queued = await hub_counts(http)
        peak = max(peak, queued)
        if n >= target:
            return peak
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {n} of {target} readings stored after {within_s:.0f} s")
        await asyncio.sleep(0.02)


async def publish_all(broker: Mosquitto, payloads: list[tuple[str, bytes]], client_id: str) -> None:
    """Publish with QoS 1, at most :data:`IN_FLIGHT` unacknowledged."""
    async with aiomqtt.Client(broker.host, broker.port, identifier=client_id,
                              max_inflight_messages=IN_FLIGHT) as pub:
        pub.pending_calls_threshold = 2 * IN_FLIGHT  # 50 publishes in flight is the point, not a leak
        sem = asyncio.Semaphore(IN_FLIGHT)

        async def send(t: str, p: bytes) -> None:
            async with sem:
                await pub.publish(t, p, qos=1)
        await asyncio.gather(*(send(t, p) for t, p in payloads))


async def latencies(n: int, max_s: float, call: Callable[[], Awaitable[Any]], warmup: int = 3) -> list[float]:
    """Milliseconds of ``n`` sequential calls (fewer if ``max_s`` ran out), after ``warmup`` unmeasured."""
    for _ in range(warmup):
        await call()
    out: list[float] = []
    deadline = time.perf_counter() + max_s
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append((time.perf_counter() - t0) * 1000)
        if time.perf_counter() > deadline:
            break
    return out


async def get_ok(http: httpx.AsyncClient, path: str, params: dict[str, Any] | None = None) -> bytes:
    """GET ``path``; the whole body, or ``HTTPStatusError``."""
    r = await http.get(path, params=params)
    r.raise_for_status()
    return r.content


async def load_range(http: httpx.AsyncClient, uid: str, since_ms: int) -> tuple[int, int]:
    """``device.js``'s ``loadRange``: pages of 10000 from ``since`` on; returns (rows, pages)."""
    since = iso_ms(since_ms)
    rows = pages = 0
    for _ in range(MAX_PAGES):
        body = await get_ok(http, f"/api/v1/devices/{uid}/readings", {"since": since, "limit": PAGE})
        pages += 1
        n = body.count(b'"ts":"')
        rows += n
        if n < PAGE:
            break
        at = body.rfind(b'"ts":"') + 6
        since = body[at:body.index(b'"', at)].decode()  # inclusive: the page repeats that instant
    return rows, pages


def rss_mb(proc: psutil.Process) -> float:
    """Resident memory of ``proc`` in MiB."""
    return round(float(proc.memory_info().rss) / 2**20, 1)


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds of ``proc`` so far."""
    t = proc.cpu_times()
    return float(t.user + t.system)


async def cpu_percent(proc: psutil.Process, seconds: float) -> float:
    """``proc``'s CPU over the next ``seconds`` as percent of one core."""
    c0, t0 = cpu_seconds(proc), time.perf_counter()
    await asyncio.sleep(seconds)
    return 100 * (cpu_seconds(proc) - c0) / (time.perf_counter() - t0)


# -- server-sent event clients ----------------------------------------------------------------


class Streams:
    """``n`` clients of ``/api/v1/stream/fleet`` that note when each event carrying a probe arrives."""

    def __init__(self, http: httpx.AsyncClient, n: int, deadline: float) -> None:
        self.http = http
        self.n = n
        self.deadline = deadline
        self.pending: dict[bytes, float] = {}
        """Probe marker -> perf_counter when its telemetry was published."""
        self.got: list[set[bytes]] = [set() for _ in range(n)]
        self.lags_ms: dict[bytes, list[float]] = {}
        """Probe marker -> each client's lag (ms) in order of arrival."""
        self.events = [0] * n
        self.bytes = 0
        self.event_bytes = 0
        self.errors: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._gate = asyncio.Semaphore(10)  # connect 10 at a time: each connect builds a summary

    @property
    def connected(self) -> int:
        """Clients that have their first event."""
        return sum(1 for e in self.events if e > 0)

    @property
    def total_events(self) -> int:
        """Events received by all clients together."""
        return sum(self.events)

    def start(self) -> None:
        """Start every client."""
        self._tasks = [asyncio.create_task(self._client(i), name=f"sse-{i}") for i in range(self.n)]

    async def _client(self, i: int) -> None:
        gated = False
        try:
            await self._gate.acquire()
            gated = True
            async with self.http.stream("GET", "/api/v1/stream/fleet") as r:
                r.raise_for_status()
                buf = bytearray()
                scan = 0
                async for chunk in r.aiter_raw():
                    now = time.perf_counter()
                    self.bytes += len(chunk)
                    buf += chunk
                    while (end := buf.find(b"\n\n", scan)) >= 0:
                        event = bytes(buf[:end])
                        del buf[:end + 2]
                        scan = 0
                        if b"data: " in event:
                            self._on_event(i, event, now)
                            if gated:
                                self._gate.release()
                                gated = False
                    scan = max(0, len(buf) - 1)
                    if now > self.deadline:
                        break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.errors.append(f"client {i}: {type(exc).__name__}: {exc}")
        finally:
            if gated:
                self._gate.release()

    def _on_event(self, i: int, event: bytes, now: float) -> None:
        self.events[i] += 1
        self.event_bytes = len(event)
        for marker, t_pub in self.pending.items():
            if marker not in self.got[i] and marker in event:
                self.got[i].add(marker)
                self.lags_ms.setdefault(marker, []).append((now - t_pub) * 1000)

    def have(self, marker: bytes) -> int:
        """How many clients have seen ``marker``."""
        return sum(1 for g in self.got if marker in g)

    async def wait(self, predicate: Callable[[], bool], within_s: float) -> bool:
        """Poll ``predicate`` every 5 ms for up to ``within_s``; whether it became true."""
        deadline = time.perf_counter() + within_s
        while not predicate():
            if time.perf_counter() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def close(self) -> None:
        """End every client."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def live_fleet(broker: Mosquitto, fleet: Fleet, stop: asyncio.Event, max_s: float) -> int:
    """Every second one message per gateway until ``stop`` (at most ``max_s``); returns readings sent."""
    sent = 0
    deadline = time.monotonic() + max_s
    async with aiomqtt.Client(broker.host, broker.port, identifier="bench-dash-live") as pub:
        while not stop.is_set() and time.monotonic() < deadline:
            t0 = time.monotonic()
            for t, p in fleet.tick_payloads():
                await pub.publish(t, p, qos=1)
            sent += len(fleet.gateways) * len(fleet.online())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, 1.0 - (time.monotonic() - t0)))
    return sent


async def probe_lags(broker: Mosquitto, fleet: Fleet, streams: Streams, probes: int) -> int:
    """Publish ``probes`` new devices' first readings, one at a time; returns how many clients missed one."""
    rng = random.Random(8)
    missed = 0
    site, gw = fleet.gateways[0]
    async with aiomqtt.Client(broker.host, broker.port, identifier="bench-dash-probe") as pub:
        for k in range(probes):
            name = f"probe-{k:03d}"
            marker = f'"name":"{name}"'.encode()
            t = now_ms()
            payload = encode_telemetry_v1(site, gw, t, {name: BOILER}, [(name, "pressure", 1, t, 1.5, "bar", "good")])
            streams.pending[marker] = time.perf_counter()
            await pub.publish(topic(site, gw), payload, qos=1)
            await streams.wait(lambda: streams.have(marker) >= streams.n, 10.0)  # noqa: B023 - awaited here
            missed += streams.n - streams.have(marker)
            del streams.pending[marker]
            # A random phase against the hub's once-a-second summaries, as real changes have.
            await asyncio.sleep(rng.uniform(0.2, 1.2))
    return missed


# -- the run ------------------------------------------------------------------------------------


async def ingest_run(broker: Mosquitto, http: httpx.AsyncClient, proc: psutil.Process, fleet: Fleet,
                     readings: int, label: str) -> tuple[float, float, int]:
    """Publish ``readings`` of live telemetry until all are stored: (readings per second, hub CPU
    milliseconds per 1000 readings, most messages queued in the hub)."""
    payloads = fleet.live_payloads(readings, PER_MSG)
    n = len(payloads) * PER_MSG
    start, _ = await hub_counts(http)
    c0 = cpu_seconds(proc)
    t0 = time.perf_counter()
    _, peak = await asyncio.gather(publish_all(broker, payloads, f"bench-dash-{label}"),
                                   wait_stored(http, start + n, 120))
    rate = n / (time.perf_counter() - t0)
    cpu = (cpu_seconds(proc) - c0) * 1000 / (n / 1000)
    log(f"  ingest {label}: {n} readings, {rate:,.0f} readings/s, hub CPU {cpu:.1f} ms per 1000, "
        f"at most {peak} messages queued in the hub")
    return rate, cpu, peak


@dataclass(frozen=True)
class Sizes:
    """How much of everything a run does."""

    fleet: tuple[int, int, int]  # sites, gateways per site, devices per gateway
    summary: int  # requests of each kind
    page: int
    range_loads: int
    poll: int
    sse: int  # stream clients
    probes: int
    ingest: int  # readings per ingest run
    idle_s: float  # hub CPU with streams open
    idle_base_s: float  # hub CPU before any stream


FULL = Sizes(fleet=(10, 5, 20), summary=200, page=100, range_loads=10, poll=200, sse=100, probes=20,
             ingest=200_000, idle_s=30.0, idle_base_s=10.0)
QUICK = Sizes(fleet=(4, 5, 10), summary=50, page=30, range_loads=3, poll=50, sse=20, probes=8,
              ingest=50_000, idle_s=10.0, idle_base_s=5.0)


async def main_async(quick: bool) -> dict[str, Any]:
    size = QUICK if quick else FULL
    fleet = Fleet(*size.fleet)
    result: dict[str, Any] = {"mode": "quick" if quick else "full", "devices": fleet.devices,
                              "sites": size.fleet[0], "gateways": len(fleet.gateways)}
    password = secrets.token_urlsafe(18)
    with tempfile.TemporaryDirectory(prefix="twin-bench-dash-") as tmp:
        work = Path(tmp)
        with Mosquitto(workdir=work / "mosquitto") as broker:
            cfg = write_hub_config(work / "hub.toml", database_url=f"sqlite://{work / 'hub.db'}",
                                   mqtt_port=broker.port, http_port=free_port(), client_id="bench-dash-hub",
                                   log_level="WARNING")
            hub = ReadyProcess.python("twin-hub", "hub.cli", "run", "--config", str(cfg), log_path=work / "hub.log",
                                      env={"TWIN_ADMIN_PASSWORD": password})
            hub.start(timeout=60)
            try:
                result.update(await run_against(hub, broker, fleet, password, size))
            except Exception:
                log(f"hub log tail:\n{hub.log_tail()}")
                raise
            finally:
                hub.stop()
    result["cpu_count"] = psutil.cpu_count()
    return result


async def run_against(hub: ReadyProcess, broker: Mosquitto, fleet: Fleet, password: str,
                      size: Sizes) -> dict[str, Any]:
    """Every measurement against one running hub, in an order that keeps them apart."""
    out: dict[str, Any] = {}
    rss: dict[str, float] = {"start": rss_mb(proc := psutil.Process(hub.pid))}
    api = str(hub.ready["api"])
    async with httpx.AsyncClient(base_url=api, timeout=60) as anon:
        r = await anon.post("/api/v1/auth/token", data={"username": "admin", "password": password})
        r.raise_for_status()
        token = r.json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=api, headers=headers, timeout=60) as http:
        # -- seed: the history boiler's hour first (older), then the fleet, all through MQTT
        t_seed = now_ms()
        history = fleet.history_payloads(t_seed - 5_000)
        seed = fleet.seed_payloads(t_seed)
        expected = sum(fleet.seq.values())
        log(f"seeding {fleet.devices} devices ({len(fleet.gateways)} gateways) and one boiler's hour "
            f"({len(history)} messages): {expected} readings")
        t0 = time.perf_counter()
        await publish_all(broker, history + seed, "bench-dash-seed")
        await wait_stored(http, expected, 120)
        out["seed_readings"] = expected
        out["seed_seconds"] = round(time.perf_counter() - t0, 1)
        log(f"  stored in {out['seed_seconds']} s")

        # -- the device page (does not care about alerts: runs while the alert sweep opens them)
        uid = ".".join(fleet.history)
        since = t_seed - 5_000 - 3_600_000 + 1000
        rows, pages = await load_range(http, uid, since)
        log(f"device page range load, 1 h of {uid}: {rows} rows in {pages} pages, x{size.range_loads}")
        lat = await latencies(size.range_loads, 60, lambda: load_range(http, uid, since), warmup=1)
        out.update(p50_p99("device_readings_1h_ms", lat), device_readings_1h_rows=rows, device_readings_1h_pages=pages,
                   device_readings_1h_loads=len(lat))
        log(f"  p50 {out['device_readings_1h_ms_p50']} ms, p99 {out['device_readings_1h_ms_p99']} ms")
        poll_since = iso_ms(t_seed - 5_000 - 4_000)
        poll_rows = (await get_ok(http, f"/api/v1/devices/{uid}/readings",
                                  {"since": poll_since, "limit": PAGE})).count(b'"ts":"')
        log(f"device page 4 s poll ({poll_rows} rows), x{size.poll}")
        lat = await latencies(size.poll, 30, lambda: get_ok(http, f"/api/v1/devices/{uid}/readings",
                                                         {"since": poll_since, "limit": PAGE}))
        out.update(p50_p99("device_poll_ms", lat), device_poll_rows=poll_rows)
        log(f"  p50 {out['device_poll_ms_p50']} ms, p99 {out['device_poll_ms_p99']} ms")

        # -- wait for the alerts the seed opens (threshold at ingest, device-stale on the 10 s sweep)
        want = 2 * len({s for s, _ in fleet.gateways}) + len(fleet.gateways)
        deadline = time.monotonic() + 25
        summary: dict[str, Any] = {}
        while time.monotonic() < deadline:
            summary = (await http.get("/api/v1/fleet/summary")).raise_for_status().json()
            if sum(summary["totals"]["alerts"].values()) >= want:
                break
            await asyncio.sleep(0.5)
        totals = summary["totals"]
        out.update(open_alerts=sum(totals["alerts"].values()), devices_by_status=totals["devices"])
        log(f"fleet: devices {totals['devices']}, open alerts {totals['alerts']} (expected {want})")

        # -- the fleet page and its summary
        body = await get_ok(http, "/api/v1/fleet/summary")
        out["fleet_summary_bytes"] = len(body)
        log(f"GET /api/v1/fleet/summary ({len(body):,} bytes), x{size.summary}")
        lat = await latencies(size.summary, 40, lambda: get_ok(http, "/api/v1/fleet/summary"))
        out.update(p50_p99("fleet_summary_ms", lat))
        log(f"  p50 {out['fleet_summary_ms_p50']} ms, p99 {out['fleet_summary_ms_p99']} ms")
        page = await get_ok(http, "/fleet")
        out["fleet_page_bytes"] = len(page)
        log(f"GET /fleet ({len(page):,} bytes), x{size.page}")
        lat = await latencies(size.page, 40, lambda: get_ok(http, "/fleet"))
        out.update(p50_p99("fleet_page_ms", lat))
        log(f"  p50 {out['fleet_page_ms_p50']} ms, p99 {out['fleet_page_ms_p99']} ms")

        # -- idle hub without streams, ingest without streams
        await asyncio.sleep(1.0)
        out["hub_cpu_percent_idle_no_sse"] = round(await cpu_percent(proc, size.idle_base_s), 1)
        log(f"hub CPU idle, no streams, {size.idle_base_s:.0f} s: {out['hub_cpu_percent_idle_no_sse']} %")
        log(f"ingest without streams: {size.ingest} readings, {PER_MSG} a message, QoS 1")
        rss["after_seed_and_queries"] = rss_mb(proc)
        without = [await ingest_run(broker, http, proc, fleet, size.ingest, "no-sse-1")]
        rss["after_ingest_no_sse"] = rss_mb(proc)

    # -- the streams: a client of its own (connection pool as large as the crowd)
    limits = httpx.Limits(max_connections=size.sse + 20, max_keepalive_connections=size.sse + 20)
    timeout = httpx.Timeout(60, read=60)
    async with httpx.AsyncClient(base_url=api, headers=headers, timeout=timeout, limits=limits) as sse_http, \
            httpx.AsyncClient(base_url=api, headers=headers, timeout=60) as http:
        streams = Streams(sse_http, size.sse, time.perf_counter() + 240)
        log(f"{size.sse} stream clients connecting")
        t0 = time.perf_counter()
        streams.start()
        if not await streams.wait(lambda: streams.connected + len(streams.errors) >= size.sse, 60):
            raise TimeoutError(f"only {streams.connected} of {size.sse} streams got their first event")
        if streams.errors:
            raise RuntimeError(f"streams failed: {streams.errors[:3]}")
        out["sse_clients"] = streams.connected
        out["sse_connect_all_s"] = round(time.perf_counter() - t0, 2)
        rss["sse_connected"] = rss_mb(proc)
        log(f"  all connected in {out['sse_connect_all_s']} s")
        try:
            log(f"live fleet telemetry (1 message per gateway per second), {size.probes} new devices as probes")
            stop = asyncio.Event()
            live = asyncio.create_task(live_fleet(broker, fleet, stop, 120))
            await asyncio.sleep(2.0)
            ev0, t_ev0 = streams.total_events, time.perf_counter()
            missed = await probe_lags(broker, fleet, streams, size.probes)
            events_per_client_s = (streams.total_events - ev0) / size.sse / (time.perf_counter() - t_ev0)
            stop.set()
            live_readings = await live
            rss["after_live_probes"] = rss_mb(proc)
            lags = [ms for per in streams.lags_ms.values() for ms in per]
            # Fan-out: from the first client's event to the last one's, per probe.
            spread = [max(per) - min(per) for per in streams.lags_ms.values() if per]
            out.update(p50_p99("sse_event_lag_ms", lags), **p50_p99("sse_fanout_spread_ms", spread),
                       sse_event_lag_samples=len(lags),
                       sse_event_lag_missed=missed, sse_events_per_client_per_s_live=round(events_per_client_s, 2),
                       sse_event_bytes=streams.event_bytes, live_readings_sent=live_readings)
            log(f"  lag p50 {out['sse_event_lag_ms_p50']} ms, p99 {out['sse_event_lag_ms_p99']} ms "
                f"({len(lags)} samples, {missed} missed), first to last client p50 "
                f"{out['sse_fanout_spread_ms_p50']} ms, {events_per_client_s:.2f} events/s per client")

            log(f"ingest with {size.sse} streams: {size.ingest} readings")
            ev0 = streams.total_events
            with_sse = await ingest_run(broker, http, proc, fleet, size.ingest, "sse")
            rss["after_ingest_with_sse"] = rss_mb(proc)
            out["sse_events_during_ingest_per_client"] = round((streams.total_events - ev0) / size.sse, 1)

            await asyncio.sleep(3.0)  # the last summary after the ingest goes out
            ev0, b0 = streams.total_events, streams.bytes
            log(f"hub CPU idle with {size.sse} streams open, {size.idle_s:.0f} s")
            out["hub_cpu_percent_idle_with_sse"] = round(await cpu_percent(proc, size.idle_s), 1)
            out["sse_events_during_idle"] = streams.total_events - ev0
            out["sse_bytes_during_idle"] = streams.bytes - b0
            log(f"  {out['hub_cpu_percent_idle_with_sse']} % ({out['sse_events_during_idle']} events, "
                f"{out['sse_bytes_during_idle']} bytes to all clients)")
            rss["after_idle_with_sse"] = rss_mb(proc)
            if streams.errors:
                raise RuntimeError(f"streams failed: {streams.errors[:3]}")
        finally:
            await streams.close()

        log(f"ingest without streams again: {size.ingest} readings")
        without.append(await ingest_run(broker, http, proc, fleet, size.ingest, "no-sse-2"))
        rss["after_ingest_no_sse_again"] = rss_mb(proc)
        out["ingest_readings_per_s_without_sse"] = round(sum(w[0] for w in without) / len(without))
        out["ingest_readings_per_s_without_sse_runs"] = [round(w[0]) for w in without]
        out["ingest_readings_per_s_with_sse"] = round(with_sse[0])
        out["ingest_hub_cpu_ms_per_1k_readings_without_sse"] = round(sum(w[1] for w in without) / len(without), 2)
        out["ingest_hub_cpu_ms_per_1k_readings_with_sse"] = round(with_sse[1], 2)
        out["ingest_readings"] = size.ingest // PER_MSG * PER_MSG
        out["ingest_hub_queue_peak_messages"] = max(r[2] for r in [*without, with_sse])
        out["hub_rss_mb"] = rss_mb(proc)
        out["hub_rss_mb_by_phase"] = rss
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the JSON summary as the last line."""
    return run_bench("bench.dashboard", __doc__, main_async, argv)


if __name__ == "__main__":
    sys.exit(main())
