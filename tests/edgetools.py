"""Helpers for tests that run an edge agent in-process: its config, its lifetime, what it publishes,
and an HTTP server for model files on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
from pymodbus.client import AsyncModbusTcpClient

from edge.agent import EdgeAgent
from edge.config import load_config
from firmware_sim import Simulators
from fleet.broker import Mosquitto
from protocol.schema import decode_event, decode_status, decode_telemetry


def agent_toml(tmp_path: Path, sim: Simulators, broker: Mosquitto, extra: str = "", gateway: str = "gw-ai",
               devices: tuple[str, ...] = ("boiler-1", "meter-1"), poll_interval_s: float = 0.1) -> Path:
    """An edge.toml polling simulated ``devices`` every 0.1 s; ``extra`` is appended before the devices."""
    text = f"""
[gateway]
site = "site-1"
name = "{gateway}"

[mqtt]
port = {broker.port}
batch_max_delay_ms = 20
reconnect_min_s = 0.1
reconnect_max_s = 0.5

[buffer]
path = "buf.db"
flush_interval_ms = 20

[metrics]
port = 0
{extra}
"""
    for name in devices:
        profile = "sim-boiler" if name.startswith("boiler") else "sim-meter"
        text += (f'\n[[devices]]\nname = "{name}"\nprofile = "{profile}"\nhost = "127.0.0.1"\n'
                 f'port = {sim.device(name).port}\npoll_interval_s = {poll_interval_s}\n')
    path = tmp_path / "edge.toml"
    path.write_text(text)
    return path


@contextlib.asynccontextmanager
async def running_agent(path: Path) -> AsyncIterator[EdgeAgent]:
    """An :class:`EdgeAgent` running in this event loop, stopped cleanly afterwards."""
    cfg, profiles = load_config(path)
    agent = EdgeAgent(cfg, profiles)
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        agent.stop()
        await asyncio.wait_for(task, 15)


async def collect(sub: aiomqtt.Client, done: Callable[[dict[str, list[Any]]], object],
                  timeout: float = 15) -> dict[str, list[Any]]:
    """Messages until ``done(got)``: readings under "device.metric", decoded "events" and "status"."""
    got: dict[str, list[Any]] = {"events": [], "status": []}

    async def run() -> None:
        async for msg in sub.messages:
            payload: bytes = msg.payload  # type: ignore[assignment]
            if msg.topic.matches("+/+/+/+/telemetry"):
                for r in decode_telemetry(payload).readings:
                    got.setdefault(f"{r.device}.{r.metric}", []).append(r)
            elif msg.topic.matches("+/+/+/+/events"):
                got["events"].append(decode_event(payload))
            elif msg.topic.matches("+/+/+/+/status"):
                got["status"].append(decode_status(payload))
            if done(got):
                return
    try:
        await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        summary = {k: len(v) for k, v in got.items()}
        raise AssertionError(f"gave up after {timeout} s; got {summary}; events {got['events']}; "
                             f"last status {got['status'][-1:]}") from None
    return got


class ModelServer:
    """Serves ``files`` (path → bytes) over HTTP on 127.0.0.1 from a thread; 404 for anything else."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "no such model")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="model-server", daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def __enter__(self) -> ModelServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


async def holding0(port: int) -> int:
    """Holding register 0 of the simulator, read by a separate Modbus client."""
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
    await client.connect()
    try:
        rr = await client.read_holding_registers(0, count=1, device_id=1)
        assert not rr.isError(), rr
        word: int = rr.registers[0]
        return word
    finally:
        client.close()
