"""Uplink against a real Mosquitto: delivery, acknowledgement, outages, Last Will."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt

from edge.buffer import ReadingBuffer
from edge.config import EdgeConfig
from edge.metrics import EdgeMetrics
from edge.reading import Reading
from edge.uplink import Uplink
from fleet.broker import Mosquitto
from protocol.schema import decode_status, decode_telemetry

DEVICES = {"boiler-1": ("boiler", "sim-boiler")}


def config(broker: Mosquitto, tmp_path: Path, **mqtt: object) -> EdgeConfig:
    return EdgeConfig.model_validate({
        "gateway": {"site": "site-1", "name": "gw-1"},
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5,
                 "batch_max_readings": 250, "batch_max_delay_ms": 20, **mqtt},
        "buffer": {"path": str(tmp_path / "buf.db")},
    })


async def new_buffer(tmp_path: Path) -> ReadingBuffer:
    buf = ReadingBuffer(tmp_path / "buf.db")
    await buf.open()
    await buf.register_devices(DEVICES)
    return buf


def batch(n: int, start: int = 0) -> list[Reading]:
    now = time.time_ns() // 1_000_000
    return [Reading("boiler-1", "flow_temp", now, float(i), "degC") for i in range(start, start + n)]


async def drained(buf: ReadingBuffer, timeout: float = 5) -> int:
    """Wait until the buffer is empty (PUBACKs processed); returns the backlog left."""
    deadline = time.monotonic() + timeout
    while buf.backlog and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return buf.backlog


async def collect(sub: aiomqtt.Client, want: int, timeout: float = 20) -> list[tuple[int, float]]:
    got: list[tuple[int, float]] = []

    async def run() -> None:
        async for msg in sub.messages:
            if msg.topic.matches("twin/v1/+/+/telemetry"):
                got.extend((r.seq, r.value) for r in decode_telemetry(msg.payload).readings)  # type: ignore[misc]
                if len(got) >= want:
                    return
    await asyncio.wait_for(run(), timeout)
    return got


async def test_batches_reach_broker_and_leave_buffer_only_after_ack(mosquitto: Mosquitto, tmp_path: Path) -> None:
    buf = await new_buffer(tmp_path)
    await buf.submit(batch(1000))
    await buf.flush()
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t-sub") as sub:
        await sub.subscribe("twin/v1/#", qos=1)
        metrics = EdgeMetrics()
        up = Uplink(config(mosquitto, tmp_path), buf, DEVICES, metrics)
        task = asyncio.create_task(up.run())
        got = await collect(sub, 1000)
        s0 = min(got)[0]
        assert sorted(got) == [(s0 + i, float(i)) for i in range(1000)]  # all, once
        # Latest state first: the newest batch went out before the older backlog, which then
        # followed oldest first.
        assert got[:250] == [(s0 + i, float(i)) for i in range(750, 1000)]
        assert got[250:] == [(s0 + i, float(i)) for i in range(750)]
        assert await drained(buf) == 0
        assert metrics.published_readings._value.get() == 1000
        assert metrics.published_batches._value.get() == 4  # 250 per message
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await buf.close()


async def test_outage_keeps_readings_and_delivers_them_after_reconnect(mosquitto: Mosquitto, tmp_path: Path) -> None:
    # A persistent subscriber session survives the broker restart, so nothing the edge sends
    # after the restart can slip past the test.
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t-persist", clean_session=False) as sub:
        await sub.subscribe("twin/v1/+/+/telemetry", qos=1)
    mosquitto.stop()
    buf = await new_buffer(tmp_path)
    up = Uplink(config(mosquitto, tmp_path), buf, DEVICES, EdgeMetrics())
    task = asyncio.create_task(up.run())
    await buf.submit(batch(300))
    await buf.flush()
    await asyncio.sleep(0.5)
    assert buf.backlog == 300 and not up.connected.is_set()
    mosquitto.start()
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t-persist", clean_session=False) as sub:
        await buf.submit(batch(200, start=300))
        await buf.flush()
        got = await collect(sub, 500)
    s0 = min(got)[0]
    assert sorted(got) == [(s0 + i, float(i)) for i in range(500)]
    assert len({s for s, _ in got}) == len(got)
    assert await drained(buf) == 0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await buf.close()


async def test_status_online_retained_and_last_will_on_kill(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg = tmp_path / "edge.toml"
    cfg.write_text(
        f'[gateway]\nsite = "site-1"\nname = "gw-9"\n[mqtt]\nport = {mosquitto.port}\nkeepalive_s = 5\n'
        f'[buffer]\npath = "buf.db"\n[metrics]\nport = 0\n')
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready"
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t-status") as sub:
            await sub.subscribe("twin/v1/site-1/gw-9/status", qos=1)
            states = []
            async def wait_state(state: str) -> None:
                async for msg in sub.messages:
                    st = decode_status(msg.payload)
                    states.append((st.state, msg.retain))
                    if st.state == state:
                        return
            await asyncio.wait_for(wait_state("online"), 10)
            os.kill(proc.pid, signal.SIGKILL)  # no goodbye: the broker must publish the Will
            await asyncio.wait_for(wait_state("offline"), 20)
        assert states[-1][0] == "offline"
        # A subscriber that arrives later still learns the gateway is offline (retained).
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t-late") as late:
            await late.subscribe("twin/v1/site-1/gw-9/status", qos=1)
            msg = await asyncio.wait_for(anext(aiter(late.messages)), 5)
            assert msg.retain and decode_status(msg.payload).state == "offline"
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


async def test_live_readings_overtake_a_large_backlog(mosquitto: Mosquitto, tmp_path: Path) -> None:
    buf = await new_buffer(tmp_path)
    old = time.time_ns() // 1_000_000 - 86_400_000  # a day-old outage backlog
    await buf.submit([Reading("boiler-1", "flow_temp", old + i, float(i), "degC") for i in range(60_000)])
    await buf.flush()
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="t-live") as sub:
        await sub.subscribe("twin/v1/+/+/telemetry", qos=1)
        up = Uplink(config(mosquitto, tmp_path, batch_max_readings=1000, max_inflight=2), buf, DEVICES,
                    EdgeMetrics())
        task = asyncio.create_task(up.run())
        order: list[tuple[float, int]] = []  # (first value of the message, backlog left) per message
        live_at = None

        async def watch() -> None:
            nonlocal live_at
            async for msg in sub.messages:
                t = decode_telemetry(msg.payload)
                order.append((t.readings[0].value, t.backlog))  # type: ignore[arg-type]
                if len(order) == 1:  # the backlog drain has begun: now a live reading arrives
                    await buf.submit([Reading("boiler-1", "flow_temp", time.time_ns() // 1_000_000, -1.0, "degC")])
                    await buf.flush()
                if any(r.value == -1.0 for r in t.readings):
                    live_at = len(order)
                if sum(1 for _ in order) >= 61:
                    return
        try:
            await asyncio.wait_for(watch(), 30)
        except TimeoutError:
            raise AssertionError(f"only {len(order)} messages: {order[:5]} ... {order[-3:]}") from None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await buf.close()
    assert order[0][0] == 59_000.0  # the newest backlog batch went first: latest state at once
    assert live_at is not None and live_at <= 6, f"live reading stuck behind backlog (message {live_at})"
    assert order[live_at - 1][1] > 40_000  # most of the day-old backlog was still waiting
    backlog_firsts = [v for v, _ in order if v not in (59_000.0, -1.0)]
    assert backlog_firsts == sorted(backlog_firsts)  # the rest went oldest first


async def test_stop_ends_the_uplink_even_without_a_cancel(mosquitto: Mosquitto, tmp_path: Path) -> None:
    # Python 3.11's wait_for can lose a cancel that lands as aiomqtt's connect completes; the agent
    # then relies on stop(): run() must return by itself, before and during a connect.
    buf = await new_buffer(tmp_path)
    early = Uplink(config(mosquitto, tmp_path), buf, DEVICES, EdgeMetrics())
    early.stop()
    await asyncio.wait_for(early.run(), 5)  # stopped before the first connect: returns at once
    assert not early.connected.is_set()
    up = Uplink(config(mosquitto, tmp_path), buf, DEVICES, EdgeMetrics())
    task = asyncio.create_task(up.run())
    await asyncio.sleep(0)  # the connect has started
    up.stop()
    await asyncio.wait_for(task, 10)  # no cancel: returns once the connect completes
    assert task.done() and not task.cancelled() and task.exception() is None
    await buf.close()
