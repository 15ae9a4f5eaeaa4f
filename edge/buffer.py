"""Durable store-and-forward buffer: SQLite in WAL mode, one writer thread.

Contract (details in docs/delivery.md):

* A reading is *captured* when :meth:`ReadingBuffer.submit` accepts it and *durable* when the
  transaction that inserts it commits, at most ``flush_interval_ms`` later. With
  ``synchronous=FULL`` a committed reading survives a power cut; with ``NORMAL`` it survives a
  process crash, and a power cut may lose the last commits (WAL keeps the file consistent).
* Its per-device sequence number is assigned and persisted in that same transaction, so
  sequence numbers never repeat or go backwards across restarts. A device's first sequence
  number in a buffer file is taken from the clock (epoch ms × 1000), so a new file (the old one
  was corrupt and moved aside, or the SD card was replaced) continues above every number the
  old one used, instead of restarting at 1 and being discarded by the hub as duplicates.
* The file is capped (``max_bytes``). When the readings reach the cap, the oldest half of the
  backlog is thinned to a quarter of its resolution per series; only if that does not free
  enough are the oldest readings dropped. The newest readings are never touched. Every such removal is
  counted and recorded as an event for the hub.
* A reading leaves the buffer only through :meth:`ack`, which the uplink calls after the broker
  acknowledged (QoS 1 PUBACK) the message that carried it.

All SQLite work runs on one dedicated thread so the event loop never blocks on disk I/O and
the connection is never shared between threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from edge.reading import Reading, StoredReading
from protocol.logs import get_logger
from protocol.schema import Value

log = get_logger("edge.buffer")
T = TypeVar("T")

SCHEMA_VERSION = 2
SEQ_EPOCH_FACTOR = 1000
"""First sequence number of a device in a new buffer file = epoch ms × this + 1."""
_QUALITY_CODE = {"good": 0, "bad": 1, "stale": 2}
_QUALITY_NAME = {v: k for k, v in _QUALITY_CODE.items()}
# SQLite has no boolean type; a flag next to the quality code keeps `true` from arriving at the
# hub as the number 1.
_BOOL_FLAG = 8

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- device/metric/unit strings are stored once per series, not once per reading: a day of
-- backlog is mostly numbers.
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL, metric TEXT NOT NULL, unit TEXT NOT NULL,
    UNIQUE (device, metric, unit)
);
-- Kind and profile of every device that has readings here, so a backlog still describes
-- devices that have since been removed from the configuration.
CREATE TABLE IF NOT EXISTS devices (device TEXT PRIMARY KEY, kind TEXT NOT NULL, profile TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS device_seq (
    device TEXT PRIMARY KEY, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL
);
-- Events (buffer thinned/corrupt/full, anomalies, model rollout) waiting to be published;
-- removed once acknowledged. `device` (anomaly events) is added to older files on open.
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, ts INTEGER NOT NULL, type TEXT NOT NULL, message TEXT NOT NULL,
    dropped INTEGER NOT NULL, details TEXT NOT NULL, device TEXT
);
-- AUTOINCREMENT: row ids must never be reused, or a reading committed after the buffer ran
-- empty would get an id below the uplink's cursor and never be sent.
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series INTEGER NOT NULL REFERENCES series(id),
    seq INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    value,
    quality INTEGER NOT NULL
);
"""


THIN_FRACTION = 0.5
"""Share of the backlog, oldest first, that a thinning pass coarsens."""
THIN_KEEP_EVERY = 4
"""A thinning pass keeps every 4th reading of each series in that share. (Keeping every 2nd
would free no disk: B-tree pages left half full are not merged, only those under a third.)"""
RESERVE_BYTES = 4 * 2**20
"""Disk kept free (as a file beside the buffer) for deleting rows when the disk is full."""
DROP_FRACTION = 0.1
"""Share of the backlog dropped outright, oldest first, when thinning freed too little."""


@dataclass(frozen=True, slots=True)
class BufferEvent:
    """An event waiting in the buffer to be published."""

    row_id: int
    ts_ms: int
    type: str
    message: str
    dropped: int
    details: dict[str, int | float | str]
    device: str | None = None


class ReadingBuffer:
    """The agent's durable queue of readings waiting for the broker's acknowledgement."""

    def __init__(self, path: str | Path, synchronous: str = "FULL", flush_interval_ms: int = 100,
                 flush_max_readings: int = 5000, max_bytes: int = 512 * 2**20) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.synchronous = synchronous
        self.flush_interval = flush_interval_ms / 1000
        self.flush_max = flush_max_readings
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-buffer")
        self._db: sqlite3.Connection | None = None
        self._series: dict[tuple[str, str, str], int] = {}
        self._series_by_id: dict[int, tuple[str, str, str]] = {}
        self._last_seq: dict[str, int] = {}
        self._devices: dict[str, tuple[str, str]] = {}
        self._rows = 0
        self._pending: list[Reading] = []
        self._pending_event = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.new_data = asyncio.Event()
        """Set whenever a commit added readings; the uplink waits on it instead of polling."""
        self.on_commit: Callable[[int], None] | None = None
        self.on_dropped: Callable[[int], None] | None = None
        self.moved_aside: Path | None = None
        self.events_waiting = True
        """Set when an event was recorded; the uplink publishes events and clears it."""
        self.dropped_total = 0
        """Readings removed by the disk cap since start (thinned or dropped, never sent)."""
        self._event_ts: dict[str, int] = {}  # last ts given to an event of each type
        self._page_size = 4096

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (or create) the buffer file; a corrupt file is moved aside and replaced."""
        await self._run(self._open_sync)
        if self._rows:
            self.new_data.set()

    async def close(self) -> None:
        """Commit what is pending and close the file."""
        await self.flush()
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._pool.shutdown(wait=True)

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._connect_sync()
        except sqlite3.DatabaseError as exc:
            # A file we cannot read must not stop the agent from capturing new readings.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            if self._db is not None:
                self._db.close()
                self._db = None
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    os.replace(src, Path(str(aside) + suffix))
            self.moved_aside = aside
            log.error("buffer_corrupt_moved_aside", path=str(self.path), moved_to=str(aside), error=str(exc))
            self._connect_sync()
            self._add_event_sync("buffer_corrupt", f"buffer file unreadable ({exc}); moved aside to {aside.name}",
                                 0, {"moved_to": str(aside)})

    def _connect_sync(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        # The WAL counts against the disk too: keep it small next to the cap (checkpoint early,
        # truncate after), so the file system holds at most max_bytes plus a quarter.
        wal_limit = min(16 * 2**20, self.max_bytes // 4)
        db.execute(f"PRAGMA journal_size_limit={wal_limit}")
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() if db.execute(
            "SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone() else None
        if row is not None and int(row[0]) == 1:
            db.executescript("""
                BEGIN;
                ALTER TABLE device_seq ADD COLUMN first_seq INTEGER NOT NULL DEFAULT 1;
                ALTER TABLE readings RENAME TO readings_v1;
                CREATE TABLE readings (id INTEGER PRIMARY KEY AUTOINCREMENT, series INTEGER NOT NULL
                    REFERENCES series(id), seq INTEGER NOT NULL, ts INTEGER NOT NULL, value,
                    quality INTEGER NOT NULL);
                INSERT INTO readings SELECT * FROM readings_v1;
                DROP TABLE readings_v1;
                UPDATE meta SET value = '2' WHERE key = 'schema_version';
                COMMIT;""")
            row = ("2",)
        db.executescript(_SCHEMA)
        if "device" not in {c[1] for c in db.execute("PRAGMA table_info(events)")}:
            # Additive and invisible to older agents (they name their columns), so no version bump.
            db.execute("ALTER TABLE events ADD COLUMN device TEXT")
        if row is None:
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"buffer schema version {row[0]} != {SCHEMA_VERSION}")
        self._page_size = db.execute("PRAGMA page_size").fetchone()[0]
        self._make_reserve_sync()
        db.execute(f"PRAGMA wal_autocheckpoint={max(16, min(1000, wal_limit // self._page_size // 2))}")
        for sid, dev, metric, unit in db.execute("SELECT id, device, metric, unit FROM series"):
            self._series[(dev, metric, unit)] = sid
            self._series_by_id[sid] = (dev, metric, unit)
        self._last_seq = dict(db.execute("SELECT device, last_seq FROM device_seq").fetchall())
        self._devices = {d: (k, p) for d, k, p in db.execute("SELECT device, kind, profile FROM devices")}
        self._rows = db.execute("SELECT count(*) FROM readings").fetchone()[0]

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def register_devices(self, devices: dict[str, tuple[str, str]]) -> None:
        """Record (kind, profile) of the configured devices before their readings arrive."""
        def upsert() -> None:
            assert self._db is not None
            self._db.executemany(
                "INSERT INTO devices VALUES (?, ?, ?) ON CONFLICT(device) DO UPDATE "
                "SET kind = excluded.kind, profile = excluded.profile",
                [(d, k, p) for d, (k, p) in devices.items()])
        await self._run(upsert)
        self._devices.update(devices)

    def device_info(self, device: str) -> tuple[str, str]:
        """(kind, profile) of a device that has readings in the buffer."""
        return self._devices[device]

    # -- writing ---------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Readings committed and not yet acknowledged by the broker."""
        return self._rows

    @property
    def pending(self) -> int:
        """Readings accepted but not yet committed."""
        return len(self._pending)

    def last_seq(self, device: str) -> int:
        """Last sequence number committed for ``device`` (0 if none yet)."""
        return self._last_seq.get(device, 0)

    async def submit(self, readings: list[Reading]) -> None:
        """Accept readings for the next commit. Waits (back-pressure) if commits fall far behind."""
        while len(self._pending) >= 4 * self.flush_max:
            self._room.clear()
            await self._room.wait()
        self._pending.extend(readings)
        self._pending_event.set()

    async def run_writer(self) -> None:
        """Commit submitted readings in batches until cancelled (then commit what is left)."""
        failures = 0
        try:
            while True:
                await self._pending_event.wait()
                if len(self._pending) < self.flush_max:
                    # Let a few polls accumulate: one transaction (one fsync) per interval,
                    # not one per poll, is what keeps 200 Hz polling cheap.
                    await asyncio.sleep(self.flush_interval)
                try:
                    await self.flush()
                    failures = 0
                except sqlite3.Error as exc:
                    # A disk that refuses writes must not stop the agent: the readings stay
                    # pending (bounded: submit() holds the pollers back) and the commit is retried.
                    failures += 1
                    log.error("buffer_commit_failed", error=str(exc), pending=len(self._pending),
                              retry_in_s=min(30, 2**failures))
                    await asyncio.sleep(min(30, 2**failures))
        finally:
            with contextlib.suppress(sqlite3.Error):
                await asyncio.shield(self.flush())

    async def flush(self) -> int:
        """Commit every pending reading now; returns how many were committed."""
        if not self._pending:
            self._pending_event.clear()
            return 0
        batch, self._pending = self._pending, []
        self._pending_event.clear()
        self._room.set()
        commit = asyncio.get_running_loop().run_in_executor(self._pool, self._insert_with_room_sync, batch)
        try:
            # Shielded: a cancel (shutdown) must not make us think the commit failed while the
            # thread goes on and commits it; putting the batch back would commit it twice.
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            try:
                await commit
            except Exception:
                self._pending[:0] = batch
                self._pending_event.set()
            raise
        except Exception:
            self._pending[:0] = batch  # nothing is lost on a failed commit: retry next time
            self._pending_event.set()
            raise
        if self.on_commit:
            self.on_commit(len(batch))
        self.new_data.set()
        return len(batch)

    def _insert_with_room_sync(self, batch: list[Reading]) -> None:
        for attempt in range(6):
            try:
                self._insert_sync(batch)
                break
            except sqlite3.OperationalError as exc:
                if "full" not in str(exc) or attempt == 5:
                    raise
                # The disk (or the file system's quota) is full before our own cap was reached:
                # make room the same way the cap does, then try again. Deleting needs room in
                # the WAL too, which is what the reserve file is kept for.
                self._release_reserve_sync()
                try:
                    freed = self._make_room_sync(force=True)
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[union-attr]
                finally:
                    self._make_reserve_sync()
                log.error("buffer_disk_full", error=str(exc), dropped=freed, attempt=attempt + 1)
                if not freed:
                    raise
        if self._used_bytes_sync() > self.max_bytes:
            self._make_room_sync()

    @property
    def _reserve_path(self) -> Path:
        return self.path.with_name(self.path.name + ".reserve")

    def _make_reserve_sync(self) -> None:
        """Keep a few MiB of disk for the day the file system fills up: SQLite cannot even delete
        rows without room for the WAL, so a full disk would otherwise be a dead end."""
        have = self._reserve_path.stat().st_size if self._reserve_path.exists() else 0
        free = shutil.disk_usage(self.path.parent).free
        size = min(RESERVE_BYTES, self.max_bytes // 8, have + free // 4)
        chunk = b"\0" * 65536
        # Written in chunks and kept even when only part fits: on an already nearly full disk
        # a partial reserve is still what lets the first deletion through.
        with contextlib.suppress(OSError), open(self._reserve_path, "ab") as f:
            while f.tell() < size:
                f.write(chunk[: size - f.tell()])
                f.flush()
            os.fsync(f.fileno())

    def _release_reserve_sync(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._reserve_path.unlink()

    def _used_bytes_sync(self) -> int:
        assert self._db is not None
        pages, free = (self._db.execute("PRAGMA page_count").fetchone()[0],
                       self._db.execute("PRAGMA freelist_count").fetchone()[0])
        return int((pages - free) * self._page_size)

    def _make_room_sync(self, force: bool = False) -> int:
        """Thin, then drop, the oldest readings until the data is below 90 % of the cap."""
        db = self._db
        assert db is not None
        target = int(self.max_bytes * 0.9)
        thinned = dropped = 0
        # A full disk needs whole free pages at once, which only dropping a contiguous run of the
        # oldest rows guarantees; the cap can afford to try thinning alone first.
        disk_full = force
        for _ in range(8):
            if not force and self._used_bytes_sync() <= target:
                break
            force = False
            lo, hi = db.execute("SELECT min(id), max(id) FROM readings").fetchone()
            if lo is None:
                break
            cut = lo + int((hi - lo) * THIN_FRACTION)
            # Coarsen every series in the oldest part: keep every THIN_KEEP_EVERY-th reading.
            cur = db.execute(
                "DELETE FROM readings WHERE id IN (SELECT id FROM (SELECT id, row_number() OVER "
                "(PARTITION BY series ORDER BY id) AS rn FROM readings WHERE id <= ?) WHERE rn % ? != 1)",
                (cut, THIN_KEEP_EVERY))
            thinned += cur.rowcount
            if disk_full or cur.rowcount == 0 or self._used_bytes_sync() > target:
                # Thinning could not help enough (one reading per series left): drop the oldest.
                drop_to = lo + max(1, int((hi - lo) * DROP_FRACTION))
                dropped += db.execute("DELETE FROM readings WHERE id <= ?", (drop_to,)).rowcount
        removed = thinned + dropped
        if removed:
            self._rows -= removed
            self.dropped_total += removed
            log.warning("buffer_cap_reached", max_bytes=self.max_bytes, thinned=thinned, dropped=dropped,
                        backlog=self._rows)
            self._add_event_sync("buffer_thinned", f"buffer reached its cap of {self.max_bytes} bytes: "
                                 f"{thinned} old readings thinned, {dropped} dropped", removed,
                                 {"thinned": thinned, "dropped": dropped, "max_bytes": self.max_bytes})
            if self.on_dropped:
                self.on_dropped(removed)
        return removed

    def _add_event_sync(self, type_: str, message: str, dropped: int, details: dict[str, int | float | str],
                        device: str | None = None, ts_ms: int | None = None) -> None:
        assert self._db is not None
        # The hub keeps one event per (gateway, ts, type): two events of a type never share a ts.
        ts = max(time.time_ns() // 1_000_000 if ts_ms is None else ts_ms, self._event_ts.get(type_, -1) + 1)
        try:
            self._db.execute("INSERT INTO events (ts, type, message, dropped, details, device) "
                             "VALUES (?, ?, ?, ?, ?, ?)", (ts, type_, message, dropped, json.dumps(details), device))
            self._event_ts[type_] = ts
            self.events_waiting = True
        except sqlite3.OperationalError as exc:  # a full disk may refuse even this small row
            log.error("buffer_event_not_recorded", type=type_, dropped=dropped, error=str(exc))

    async def add_event(self, type_: str, message: str, details: dict[str, int | float | str] | None = None, *,
                        device: str | None = None, ts_ms: int | None = None) -> None:
        """Record an event for the hub (published by the uplink, kept until the broker acknowledged it).

        ``ts_ms`` defaults to now; it is moved 1 ms past the previous event of the same type if
        needed, so that the hub (which keeps one event per gateway, ts and type) keeps both.
        """
        await self._run(self._add_event_sync, type_, message, 0, details or {}, device, ts_ms)
        self.new_data.set()  # wakes an idle uplink, which publishes waiting events first

    def _insert_sync(self, batch: list[Reading]) -> None:
        db = self._db
        assert db is not None
        seqs = dict(self._last_seq)
        firsts: dict[str, int] = {}
        new_series: dict[tuple[str, str, str], int] = {}
        rows: list[tuple[int, int, int, Value, int]] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for r in batch:
                key = (r.device, r.metric, r.unit)
                sid = self._series.get(key) or new_series.get(key)
                if sid is None:
                    cur = db.execute("INSERT INTO series (device, metric, unit) VALUES (?, ?, ?)", key)
                    sid = new_series[key] = int(cur.lastrowid or 0)
                last = seqs.get(r.device)
                if last is None:
                    seq = firsts[r.device] = time.time_ns() // 1_000_000 * SEQ_EPOCH_FACTOR + 1
                else:
                    seq = last + 1
                seqs[r.device] = seq
                q = _QUALITY_CODE[r.quality]
                if isinstance(r.value, bool):
                    rows.append((sid, seq, r.ts_ms, int(r.value), q | _BOOL_FLAG))
                else:
                    rows.append((sid, seq, r.ts_ms, r.value, q))
            db.executemany("INSERT INTO readings (series, seq, ts, value, quality) VALUES (?, ?, ?, ?, ?)", rows)
            changed = {d: s for d, s in seqs.items() if self._last_seq.get(d) != s}
            db.executemany(
                "INSERT INTO device_seq (device, first_seq, last_seq) VALUES (?, ?, ?) "
                "ON CONFLICT(device) DO UPDATE SET last_seq = excluded.last_seq",
                [(d, firsts.get(d, 0), s) for d, s in changed.items()])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite has already rolled back after SQLITE_FULL
                db.execute("ROLLBACK")
            raise
        # In-memory state follows the database only once the commit succeeded.
        self._last_seq = seqs
        for key, sid in new_series.items():
            self._series[key] = sid
            self._series_by_id[sid] = key
        self._rows += len(rows)

    # -- reading and acknowledging ---------------------------------------------------------

    async def fetch(self, after_id: int, limit: int, before_id: int | None = None) -> list[StoredReading]:
        """Up to ``limit`` committed readings with ``after_id < row id < before_id``, oldest first."""
        return await self._run(self._fetch_sync, after_id, limit, before_id)

    async def fetch_newest(self, limit: int, before_id: int | None = None) -> list[StoredReading]:
        """The newest ``limit`` readings with row id < ``before_id``, in row order."""
        def newest() -> list[StoredReading]:
            assert self._db is not None
            hi = before_id if before_id is not None else 2**63 - 1
            row = self._db.execute("SELECT id FROM readings WHERE id < ? ORDER BY id DESC LIMIT 1 OFFSET ?",
                                   (hi, limit)).fetchone()
            return self._fetch_sync(row[0] if row else 0, limit, before_id)
        return await self._run(newest)

    async def max_id(self) -> int:
        """Highest row id in the buffer (0 when empty)."""
        def top() -> int:
            assert self._db is not None
            return int(self._db.execute("SELECT coalesce(max(id), 0) FROM readings").fetchone()[0])
        return await self._run(top)

    async def events(self, limit: int = 100) -> list[BufferEvent]:
        """Events waiting to be published, oldest first."""
        def rows() -> list[BufferEvent]:
            assert self._db is not None
            return [BufferEvent(i, ts, t, m, d, json.loads(det), dev) for i, ts, t, m, d, det, dev in self._db.execute(
                "SELECT id, ts, type, message, dropped, details, device FROM events ORDER BY id LIMIT ?", (limit,))]
        return await self._run(rows)

    async def ack_event(self, row_id: int) -> None:
        """Remove a published event."""
        def delete() -> None:
            assert self._db is not None
            self._db.execute("DELETE FROM events WHERE id = ?", (row_id,))
        await self._run(delete)

    def _fetch_sync(self, after_id: int, limit: int, before_id: int | None = None) -> list[StoredReading]:
        assert self._db is not None
        cur = self._db.execute(
            "SELECT id, series, seq, ts, value, quality FROM readings WHERE id > ? AND id < ? ORDER BY id LIMIT ?",
            (after_id, before_id if before_id is not None else 2**63 - 1, limit))
        out = []
        series = self._series_by_id
        for rid, sid, seq, ts, value, q in cur:
            dev, metric, unit = series[sid]
            if q & _BOOL_FLAG:
                value, q = bool(value), q & ~_BOOL_FLAG
            out.append(StoredReading(rid, dev, metric, seq, ts, value, unit, _QUALITY_NAME[q]))
        return out

    async def ack(self, first_id: int, last_id: int) -> int:
        """Remove readings with ``first_id <= id <= last_id`` (broker acknowledged them)."""
        n = await self._run(self._ack_sync, first_id, last_id)
        return n

    def _ack_sync(self, first_id: int, last_id: int) -> int:
        assert self._db is not None
        cur = self._db.execute("DELETE FROM readings WHERE id BETWEEN ? AND ?", (first_id, last_id))
        self._rows -= cur.rowcount
        return cur.rowcount

    async def size_bytes(self) -> int:
        """Bytes on disk used by the buffer (database + WAL)."""
        def size() -> int:
            return sum(Path(str(self.path) + s).stat().st_size
                       for s in ("", "-wal") if Path(str(self.path) + s).exists())
        return await self._run(size)
