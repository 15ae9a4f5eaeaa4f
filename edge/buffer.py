"""Durable store-and-forward buffer: SQLite in WAL mode, one writer thread.

Contract (details in docs/delivery.md):

* A reading is *captured* when :meth:`ReadingBuffer.submit` accepts it and *durable* when the
  transaction that inserts it commits, at most ``flush_interval_ms`` later. With
  ``synchronous=FULL`` a committed reading survives a power cut; with ``NORMAL`` it survives a
  process crash, and a power cut may lose the last commits (WAL keeps the file consistent).
* Its per-device sequence number is assigned and persisted in that same transaction, so
  sequence numbers never repeat or go backwards across restarts.
* A reading leaves the buffer only through :meth:`ack`, which the uplink calls after the broker
  acknowledged (QoS 1 PUBACK) the message that carried it.

All SQLite work runs on one dedicated thread so the event loop never blocks on disk I/O and
the connection is never shared between threads.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from edge.reading import Reading, StoredReading
from protocol.logs import get_logger
from protocol.schema import Value

log = get_logger("edge.buffer")
T = TypeVar("T")

SCHEMA_VERSION = 1
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
CREATE TABLE IF NOT EXISTS device_seq (device TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY,
    series INTEGER NOT NULL REFERENCES series(id),
    seq INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    value,
    quality INTEGER NOT NULL
);
"""


class BufferCorrupt(RuntimeError):
    """The buffer file is not a usable SQLite database."""


class ReadingBuffer:
    """The agent's durable queue of readings waiting for the broker's acknowledgement."""

    def __init__(self, path: str | Path, synchronous: str = "FULL", flush_interval_ms: int = 100,
                 flush_max_readings: int = 5000) -> None:
        self.path = Path(path)
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
        self.moved_aside: Path | None = None

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

    def _connect_sync(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.executescript(_SCHEMA)
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"buffer schema version {row[0]} != {SCHEMA_VERSION}")
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
        try:
            while True:
                await self._pending_event.wait()
                if len(self._pending) < self.flush_max:
                    # Let a few polls accumulate: one transaction (one fsync) per interval,
                    # not one per poll, is what keeps 200 Hz polling cheap.
                    await asyncio.sleep(self.flush_interval)
                await self.flush()
        finally:
            await asyncio.shield(self.flush())

    async def flush(self) -> int:
        """Commit every pending reading now; returns how many were committed."""
        if not self._pending:
            self._pending_event.clear()
            return 0
        batch, self._pending = self._pending, []
        self._pending_event.clear()
        self._room.set()
        try:
            await self._run(self._insert_sync, batch)
        except BaseException:
            self._pending[:0] = batch  # nothing is lost on a failed commit: retry next time
            self._pending_event.set()
            raise
        if self.on_commit:
            self.on_commit(len(batch))
        self.new_data.set()
        return len(batch)

    def _insert_sync(self, batch: list[Reading]) -> None:
        db = self._db
        assert db is not None
        seqs = dict(self._last_seq)
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
                seq = seqs.get(r.device, 0) + 1
                seqs[r.device] = seq
                q = _QUALITY_CODE[r.quality]
                if isinstance(r.value, bool):
                    rows.append((sid, seq, r.ts_ms, int(r.value), q | _BOOL_FLAG))
                else:
                    rows.append((sid, seq, r.ts_ms, r.value, q))
            db.executemany("INSERT INTO readings (series, seq, ts, value, quality) VALUES (?, ?, ?, ?, ?)", rows)
            changed = {d: s for d, s in seqs.items() if self._last_seq.get(d) != s}
            db.executemany(
                "INSERT INTO device_seq (device, last_seq) VALUES (?, ?) "
                "ON CONFLICT(device) DO UPDATE SET last_seq = excluded.last_seq",
                list(changed.items()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        # In-memory state follows the database only once the commit succeeded.
        self._last_seq = seqs
        for key, sid in new_series.items():
            self._series[key] = sid
            self._series_by_id[sid] = key
        self._rows += len(rows)

    # -- reading and acknowledging ---------------------------------------------------------

    async def fetch(self, after_id: int, limit: int) -> list[StoredReading]:
        """Up to ``limit`` committed readings with row id > ``after_id``, oldest first."""
        return await self._run(self._fetch_sync, after_id, limit)

    def _fetch_sync(self, after_id: int, limit: int) -> list[StoredReading]:
        assert self._db is not None
        cur = self._db.execute(
            "SELECT id, series, seq, ts, value, quality FROM readings WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit))
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
