"""The store-and-forward buffer: durability, sequence numbers, acknowledgement, corruption."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from edge.buffer import SEQ_EPOCH_FACTOR, ReadingBuffer
from edge.reading import Reading
from protocol.schema import Quality

DEVICES = {"boiler-1": ("boiler", "sim-boiler"), "meter-1": ("meter", "sim-meter")}


async def opened(path: Path, **kw: object) -> ReadingBuffer:
    buf = ReadingBuffer(path, **kw)  # type: ignore[arg-type]
    await buf.open()
    await buf.register_devices(DEVICES)
    return buf


def readings(device: str, n: int, start: int = 0) -> list[Reading]:
    return [Reading(device, "flow_temp", 1000 + i, 60.0 + i / 10, "degC") for i in range(start, start + n)]


async def test_sequence_numbers_are_per_device_and_survive_reopen(tmp_path: Path) -> None:
    buf = await opened(tmp_path / "b.db")
    await buf.submit(readings("boiler-1", 3) + readings("meter-1", 2) + readings("boiler-1", 1, 3))
    assert await buf.flush() == 6
    rows = await buf.fetch(0, 100)
    b0, m0 = rows[0].seq, rows[3].seq  # first numbers come from the clock (epoch ms x 1000 + 1)
    assert abs(b0 // SEQ_EPOCH_FACTOR - time.time() * 1000) < 10_000
    assert [(r.device, r.seq) for r in rows] == [
        ("boiler-1", b0), ("boiler-1", b0 + 1), ("boiler-1", b0 + 2), ("meter-1", m0), ("meter-1", m0 + 1),
        ("boiler-1", b0 + 3)]
    assert [r.value for r in rows if r.device == "boiler-1"] == [60.0, 60.1, 60.2, 60.3]
    await buf.ack(rows[0].row_id, rows[-1].row_id)
    await buf.close()

    again = await opened(tmp_path / "b.db")
    assert again.backlog == 0
    await again.submit(readings("boiler-1", 1))
    await again.flush()
    (row,) = await again.fetch(0, 10)
    assert (row.device, row.seq) == ("boiler-1", b0 + 4)  # never reused after a restart
    with sqlite3.connect(tmp_path / "b.db") as db:
        assert dict(db.execute("SELECT device, first_seq FROM device_seq")) == {"boiler-1": b0, "meter-1": m0}
    await again.close()


async def test_unacknowledged_readings_survive_reopen_and_ack_removes_exact_range(tmp_path: Path) -> None:
    buf = await opened(tmp_path / "b.db")
    await buf.submit(readings("boiler-1", 10))
    await buf.flush()
    rows = await buf.fetch(0, 4)
    s0 = rows[0].seq
    assert await buf.ack(rows[0].row_id, rows[-1].row_id) == 4
    await buf.close()
    again = await opened(tmp_path / "b.db")
    assert again.backlog == 6
    assert [r.seq - s0 for r in await again.fetch(0, 100)] == [4, 5, 6, 7, 8, 9]
    # fetch after a cursor skips what is already in flight
    assert [r.seq - s0 for r in await again.fetch(rows[-1].row_id + 2, 100)] == [6, 7, 8, 9]
    await again.close()


async def test_values_of_every_kind_and_quality(tmp_path: Path) -> None:
    buf = await opened(tmp_path / "b.db")
    await buf.submit([
        Reading("boiler-1", "burner_on", 1, True, ""),
        Reading("boiler-1", "starts", 1, 123456789012, ""),
        Reading("boiler-1", "pressure", 1, None, "bar", Quality.BAD),
        Reading("boiler-1", "model", 1, "SB-24", ""),
    ])
    await buf.flush()
    got = [(r.metric, r.value, r.unit, r.quality) for r in await buf.fetch(0, 10)]
    assert type(got[0][1]) is bool and type(got[1][1]) is int  # True == 1 alone would not tell
    assert got == [("burner_on", True, "", "good"), ("starts", 123456789012, "", "good"),
                   ("pressure", None, "bar", "bad"), ("model", "SB-24", "", "good")]
    assert buf.device_info("meter-1") == ("meter", "sim-meter")
    await buf.close()


async def test_writer_commits_within_flush_interval_and_on_cancel(tmp_path: Path) -> None:
    buf = await opened(tmp_path / "b.db", flush_interval_ms=20)
    writer = asyncio.create_task(buf.run_writer())
    await buf.submit(readings("boiler-1", 5))
    for _ in range(100):
        if buf.backlog == 5:
            break
        await asyncio.sleep(0.01)
    assert buf.backlog == 5 and buf.pending == 0
    await buf.submit(readings("boiler-1", 3))
    writer.cancel()  # a clean shutdown commits what was captured
    await asyncio.gather(writer, return_exceptions=True)
    assert buf.backlog == 8
    await buf.close()
    with sqlite3.connect(tmp_path / "b.db") as db:
        assert db.execute("select count(*) from readings").fetchone()[0] == 8
        assert db.execute("pragma journal_mode").fetchone()[0] == "wal"


async def test_failed_commit_keeps_readings_pending(tmp_path: Path) -> None:
    buf = await opened(tmp_path / "b.db")
    await buf.submit([Reading("boiler-1", "x", 1, 1.0, "", "weird")])  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        await buf.flush()
    assert buf.pending == 1 and buf.backlog == 0
    await buf.submit(readings("boiler-1", 1))
    assert buf.pending == 2
    buf._pending.pop(0)  # drop the poisoned reading the test planted
    await buf.flush()
    with sqlite3.connect(tmp_path / "b.db") as db:  # the failed transaction used no sequence number
        (first, last), = db.execute("SELECT first_seq, last_seq FROM device_seq").fetchall()
    assert [r.seq for r in await buf.fetch(0, 10)] == [first] and first == last
    await buf.close()


async def test_corrupt_file_is_moved_aside_and_numbering_continues(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    old = await opened(path)
    await old.submit(readings("boiler-1", 3))
    await old.flush()
    old_last = old.last_seq("boiler-1")
    await old.close()
    path.write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    buf = await opened(path)
    assert buf.moved_aside is not None and buf.moved_aside.exists()
    assert buf.moved_aside.read_bytes().startswith(b"this is not a database")
    await buf.submit(readings("boiler-1", 2))
    await buf.flush()
    assert buf.backlog == 2
    # A fresh file must not restart at the numbers the lost one used: the hub would take the new
    # readings for duplicates and drop them.
    assert min(r.seq for r in await buf.fetch(0, 10)) > old_last
    (event,) = await buf.events()
    assert event.type == "buffer_corrupt" and event.details["moved_to"] == str(buf.moved_aside)
    await buf.close()


async def test_cap_thins_oldest_half_then_drops_and_never_touches_the_newest(tmp_path: Path) -> None:
    buf = await opened(tmp_path / "b.db", max_bytes=2 * 2**20)
    dropped: list[int] = []
    buf.on_dropped = dropped.append
    ts = 0
    for _ in range(40):  # far more than 2 MiB of readings, in commits like a long outage
        batch = []
        for _i in range(2000):
            ts += 1
            batch += [Reading("boiler-1", "flow_temp", ts, 60.0, "degC"), Reading("meter-1", "power", ts, 1.5, "kW")]
        await buf.submit(batch)
        await buf.flush()
    newest_ts = ts
    size = await buf.size_bytes()
    with sqlite3.connect(tmp_path / "b.db") as db:
        used = db.execute("SELECT (SELECT page_count FROM pragma_page_count()) - "
                          "(SELECT freelist_count FROM pragma_freelist_count())").fetchone()[0] * 4096
    assert used <= 2 * 2**20, used
    assert size < 4 * 2**20  # the file (with its WAL) stays near the cap, not 40 batches (~5 MiB) big
    rows = await buf.fetch(0, 10**6)
    assert buf.backlog == len(rows) and sum(dropped) == 160_000 - len(rows) == buf.dropped_total
    # the newest batch is complete, at full resolution, for both series
    assert {r.ts_ms for r in rows if r.device == "boiler-1"} >= set(range(newest_ts - 1999, newest_ts + 1))
    # older data is thinned: fewer readings per unit of time at the start than at the end
    first_half = [r for r in rows if r.ts_ms <= newest_ts // 2]
    assert len(first_half) < len(rows) / 2
    events = await buf.events()
    assert events and all(e.type == "buffer_thinned" for e in events)
    assert sum(e.dropped for e in events) == sum(dropped)
    await buf.close()


async def test_disk_full_makes_room_and_keeps_capturing(tmp_path: Path) -> None:
    buf = await opened(tmp_path / "b.db")
    await buf.submit(readings("boiler-1", 3000))
    await buf.flush()
    # Emulate a full file system: SQLite may not grow the file any further.
    pages = await buf._run(lambda: buf._db.execute("PRAGMA page_count").fetchone()[0])  # type: ignore[union-attr]
    await buf._run(lambda: buf._db.execute(f"PRAGMA max_page_count = {pages}"))  # type: ignore[union-attr]
    for i in range(10):
        await buf.submit(readings("boiler-1", 1000, start=10_000 + i * 1000))
        await buf.flush()
    rows = await buf.fetch(0, 10**6)
    assert rows[-1].value == pytest.approx(60.0 + (10_000 + 9999) / 10)  # the newest reading is in
    assert buf.dropped_total > 0 and buf.backlog == len(rows)
    await buf.close()


async def test_row_ids_are_never_reused_after_the_buffer_ran_empty(tmp_path: Path) -> None:
    # The uplink's cursor is a row id: a reading committed after a full drain must get a higher
    # id than anything before it, or it is never sent (SQLite reuses max(id)+1 without AUTOINCREMENT).
    buf = await opened(tmp_path / "b.db")
    await buf.submit(readings("boiler-1", 5))
    await buf.flush()
    rows = await buf.fetch(0, 10)
    await buf.ack(rows[0].row_id, rows[-1].row_id)
    assert await buf.max_id() == 0
    await buf.submit(readings("boiler-1", 1))
    await buf.flush()
    (new,) = await buf.fetch(rows[-1].row_id, 10)
    assert new.row_id > rows[-1].row_id
    await buf.close()


async def test_cancelling_a_flush_in_progress_never_commits_twice(tmp_path: Path) -> None:
    # Shutdown cancels the writer while a commit runs in the buffer thread; the batch must be
    # committed exactly once (a second copy would get new sequence numbers: a duplicate the hub
    # cannot recognise).
    buf = await opened(tmp_path / "b.db")
    await buf.submit(readings("boiler-1", 100_000))
    task = asyncio.create_task(buf.flush())
    await asyncio.sleep(0.02)  # the commit (~0.2 s) is now running in the buffer thread
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await buf.flush()  # what shutdown does next
    assert buf.backlog == 100_000 and buf.pending == 0
    rows = await buf.fetch(0, 200_000)
    assert len(rows) == 100_000 and len({r.ts_ms for r in rows}) == 100_000
    await buf.close()
