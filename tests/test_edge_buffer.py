"""The store-and-forward buffer: durability, sequence numbers, acknowledgement, corruption."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from edge.buffer import ReadingBuffer
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
    assert [(r.device, r.seq) for r in rows] == [
        ("boiler-1", 1), ("boiler-1", 2), ("boiler-1", 3), ("meter-1", 1), ("meter-1", 2), ("boiler-1", 4)]
    assert [r.value for r in rows if r.device == "boiler-1"] == [60.0, 60.1, 60.2, 60.3]
    await buf.ack(rows[0].row_id, rows[-1].row_id)
    await buf.close()

    again = await opened(tmp_path / "b.db")
    assert again.backlog == 0
    await again.submit(readings("boiler-1", 1))
    await again.flush()
    (row,) = await again.fetch(0, 10)
    assert (row.device, row.seq) == ("boiler-1", 5)  # never reused after a restart
    await again.close()


async def test_unacknowledged_readings_survive_reopen_and_ack_removes_exact_range(tmp_path: Path) -> None:
    buf = await opened(tmp_path / "b.db")
    await buf.submit(readings("boiler-1", 10))
    await buf.flush()
    rows = await buf.fetch(0, 4)
    assert await buf.ack(rows[0].row_id, rows[-1].row_id) == 4
    await buf.close()
    again = await opened(tmp_path / "b.db")
    assert again.backlog == 6
    assert [r.seq for r in await again.fetch(0, 100)] == [5, 6, 7, 8, 9, 10]
    # fetch after a cursor skips what is already in flight
    assert [r.seq for r in await again.fetch(rows[-1].row_id + 2, 100)] == [7, 8, 9, 10]
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
    assert [r.seq for r in await buf.fetch(0, 10)] == [1]  # the failed transaction used no sequence number
    await buf.close()


async def test_corrupt_file_is_moved_aside_and_agent_continues(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    path.write_bytes(b"this is not a database" * 100)
    buf = await opened(path)
    assert buf.moved_aside is not None and buf.moved_aside.exists()
    assert buf.moved_aside.read_bytes().startswith(b"this is not a database")
    await buf.submit(readings("boiler-1", 2))
    await buf.flush()
    assert buf.backlog == 2
    await buf.close()
