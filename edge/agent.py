"""The edge agent process: pollers → buffer → uplink, with metrics and clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import sys

from edge import __version__
from edge.buffer import ReadingBuffer
from edge.commands import CommandGuard
from edge.config import EdgeConfig
from edge.drivers.registry import build_drivers, point_intervals
from edge.inference import wire_inference
from edge.metrics import EdgeMetrics
from edge.poller import DevicePoller
from edge.uplink import Uplink
from protocol.logs import get_logger
from protocol.profile import DeviceProfile

log = get_logger("edge.agent")


class AgentStartError(RuntimeError):
    """The agent cannot start (buffer file unusable, metrics port taken); the message says why."""


class EdgeAgent:
    """Owns every task of the agent; :meth:`run` returns after a clean shutdown."""

    def __init__(self, cfg: EdgeConfig, profiles: dict[str, DeviceProfile]) -> None:
        self.cfg = cfg
        self.profiles = profiles
        self.metrics = EdgeMetrics()
        b = cfg.buffer
        self.buffer = ReadingBuffer(b.path, b.synchronous, b.flush_interval_ms, b.flush_max_readings, b.max_bytes)
        self.buffer.on_commit = self.metrics.committed.inc
        self.buffer.on_dropped = self.metrics.buffer_dropped.inc
        self.devices = {d.name: (profiles[d.name].profile.kind.value, profiles[d.name].name) for d in cfg.devices}
        self.uplink = Uplink(cfg, self.buffer, self.devices, self.metrics)
        # Anomaly scoring: pollers hand each poll to the buffer, then to the scorer; scores and
        # events go back into the buffer. Models load in the background and may fail without
        # touching data collection.
        self.engine, self.scorer, self.rollout = wire_inference(cfg, profiles, self.buffer, self.uplink, self.metrics)
        drivers = build_drivers(cfg, profiles)
        sink = self.scorer.tap(self.buffer)
        self.pollers = [
            DevicePoller(d.name, drivers[d.name], d.poll_interval_s, d.backoff_max_s, sink, self.metrics,
                         point_intervals(profiles[d.name]))
            for d in cfg.devices
        ]
        # Setpoint commands from the hub: checked against the profiles' safe ranges, written
        # through the device's poller, answered with an event through the buffer.
        self.commands = CommandGuard(cfg.gateway.site, cfg.gateway.name, self._command_target, self.buffer,
                                     self.metrics)
        self.uplink.on_downlink("commands", self.commands.handle)
        self._stop = asyncio.Event()

    def _command_target(self, device: str) -> tuple[DeviceProfile, DevicePoller] | None:
        """The profile and poller of ``device`` as configured now (for :class:`CommandGuard`)."""
        poller = next((p for p in self.pollers if p.name == device), None)
        profile = self.profiles.get(device)
        return None if poller is None or profile is None else (profile, poller)

    def stop(self) -> None:
        """Ask the agent to shut down (signal handlers call this)."""
        self._stop.set()

    async def _gauges(self) -> None:
        while True:
            self.metrics.backlog.set(self.buffer.backlog)
            self.metrics.buffer_bytes.set(await self.buffer.size_bytes())
            await asyncio.sleep(5)

    async def run(self) -> None:
        """Run until :meth:`stop`; then stop polling, commit what was captured, say goodbye."""
        try:
            await self.buffer.open()
            await self.buffer.register_devices(self.devices)
        except (OSError, sqlite3.Error) as exc:
            raise AgentStartError(f"cannot open the buffer {self.cfg.buffer.path}: {exc}") from exc
        if self.cfg.metrics.port:
            try:
                self.metrics.serve(self.cfg.metrics.host, self.cfg.metrics.port)
            except OSError as exc:
                await self.buffer.close()
                raise AgentStartError(f"metrics exporter cannot listen on {self.cfg.metrics.host}:"
                                      f"{self.cfg.metrics.port}: {exc.strerror or exc}") from exc
        writer = asyncio.create_task(self.buffer.run_writer(), name="buffer-writer")
        uplink = asyncio.create_task(self.uplink.run(), name="uplink")
        polls = [asyncio.create_task(p.run(), name=f"poll-{p.name}") for p in self.pollers]
        gauges = asyncio.create_task(self._gauges(), name="gauges")
        # Not watched like the others: scoring and rollout catch their own failures, and the agent
        # must collect and forward data even if they died.
        scoring = [asyncio.create_task(self.scorer.run(), name="scorer"),
                   asyncio.create_task(self.rollout.run(), name="rollout")]
        log.info("edge_ready", site=self.cfg.gateway.site, gateway=self.cfg.gateway.name,
                 devices=len(self.pollers), backlog=self.buffer.backlog, version=__version__)
        print(json.dumps({"event": "ready", "gateway": self.cfg.gateway.name,
                          "devices": [p.name for p in self.pollers]}), flush=True)
        crashed = asyncio.ensure_future(asyncio.wait([writer, uplink, *polls], return_when=asyncio.FIRST_EXCEPTION))
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({crashed, stop}, return_when=asyncio.FIRST_COMPLETED)
        log.info("edge_stopping", reason="signal" if stop.done() else "task failed")
        for p in self.pollers:
            p.stop()
        for t in (*polls, gauges, *scoring):
            t.cancel()
        await self.commands.close()
        _, stuck = await asyncio.wait([*polls, gauges, *scoring], timeout=3)
        for t in stuck:  # a cancel swallowed by a library: ask again, then go on regardless
            t.cancel()
        if stuck:
            _, stuck = await asyncio.wait(stuck, timeout=2)
            if stuck:
                log.warning("edge_stopping_tasks_left", tasks=[t.get_name() for t in stuck])
        log.debug("edge_stopping_polls_done")
        writer.cancel()  # its finally-block commits everything still pending
        await asyncio.gather(writer, return_exceptions=True)
        log.debug("edge_stopping_writer_done")
        await self.uplink.announce_offline()
        log.debug("edge_stopping_offline_announced")
        self.uplink.stop()
        uplink.cancel()
        _, stuck = await asyncio.wait([uplink], timeout=3)
        if stuck:  # the cancel was lost in a connect (see Uplink.stop): ask again, then go on regardless
            uplink.cancel()
            _, stuck = await asyncio.wait([uplink], timeout=2)
            if stuck:
                log.warning("edge_stopping_tasks_left", tasks=["uplink"])
        crashed.cancel()
        stop.cancel()
        self.engine.close()
        await self.buffer.close()
        for t in (writer, uplink, *polls):
            if t.done() and not t.cancelled() and t.exception():
                log.error("task_failed", task=t.get_name(), error=repr(t.exception()))
                raise t.exception()  # type: ignore[misc]
        log.info("edge_stopped", backlog=self.buffer.backlog)


async def run_agent(cfg: EdgeConfig, profiles: dict[str, DeviceProfile]) -> None:
    """Run an agent with SIGINT/SIGTERM wired to a clean shutdown."""
    agent = EdgeAgent(cfg, profiles)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, agent.stop)
    try:
        await agent.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(sig)
    sys.stdout.flush()
