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
from edge.config import DeviceConfig, EdgeConfig, RtuDeviceConfig
from edge.drivers.base import Driver
from edge.drivers.modbus import ModbusLink
from edge.drivers.registry import build_drivers, point_intervals
from edge.inference import scored_devices, wire_inference
from edge.metrics import EdgeMetrics
from edge.poller import DevicePoller
from edge.remote_config import RemoteConfig, changed_devices, load_persisted, remote_config_path
from edge.uplink import Uplink
from protocol.logs import get_logger
from protocol.profile import DeviceProfile

log = get_logger("edge.agent")


class AgentStartError(RuntimeError):
    """The agent cannot start (buffer file unusable, metrics port taken); the message says why."""


class EdgeAgent:
    """Owns every task of the agent; :meth:`run` returns after a clean shutdown."""

    def __init__(self, cfg: EdgeConfig, profiles: dict[str, DeviceProfile]) -> None:
        # A configuration the hub sent earlier (and this gateway validated and persisted) replaces
        # the devices of edge.toml; every other section always comes from edge.toml.
        toml_cfg = cfg
        persisted = load_persisted(cfg)
        applied_version = 0
        if persisted is not None:
            cfg, profiles, applied_version = persisted
            log.info("device_config", source="remote", version=applied_version, path=str(remote_config_path(cfg)),
                     devices=[d.name for d in cfg.devices])
        else:
            log.info("device_config", source="edge.toml", devices=[d.name for d in cfg.devices])
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
        self._sink = self.scorer.tap(self.buffer)
        self._buses: dict[str, ModbusLink] = {}
        """Serial port name → the link its RS-485 devices share (kept across reconfigurations)."""
        self.drivers: dict[str, Driver] = build_drivers(cfg, profiles, buses=self._buses)
        self.pollers: dict[str, DevicePoller] = {d.name: self._poller(d) for d in cfg.devices}
        """Device name → its poller: always the devices of the running configuration."""
        self._poll_tasks: dict[str, asyncio.Task[None]] = {}
        self._poll_failed = asyncio.Event()
        self._failed_polls: list[asyncio.Task[None]] = []
        self._running = False
        self._reconfiguring = asyncio.Lock()
        # Remote configuration: device lists from the hub, validated and applied without a restart.
        self.remote = RemoteConfig(toml_cfg, (cfg, profiles), applied_version, self.apply_devices, self.buffer)
        self.uplink.on_downlink("config", self.remote.handle)
        # Setpoint commands from the hub: checked against the profiles' safe ranges, written
        # through the device's poller, answered with an event through the buffer.
        self.commands = CommandGuard(cfg.gateway.site, cfg.gateway.name, self._command_target, self.buffer,
                                     self.metrics)
        self.uplink.on_downlink("commands", self.commands.handle)
        self._stop = asyncio.Event()

    def _command_target(self, device: str) -> tuple[DeviceProfile, DevicePoller] | None:
        """The profile and poller of ``device`` as configured now (for :class:`CommandGuard`)."""
        poller = self.pollers.get(device)
        profile = self.profiles.get(device)
        return None if poller is None or profile is None else (profile, poller)

    def _poller(self, d: DeviceConfig) -> DevicePoller:
        return DevicePoller(d.name, self.drivers[d.name], d.poll_interval_s, d.backoff_max_s, self._sink,
                            self.metrics, point_intervals(self.profiles[d.name]))

    def _start_poller(self, poller: DevicePoller) -> None:
        task = asyncio.create_task(poller.run(), name=f"poll-{poller.name}")
        self._poll_tasks[poller.name] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._poll_tasks.get(poller.name) is t:
                del self._poll_tasks[poller.name]
            if not t.cancelled() and t.exception() is not None:
                self._failed_polls.append(t)  # a bug in a poller stops the agent, like any task failing
                self._poll_failed.set()
        task.add_done_callback(done)

    @staticmethod
    async def _end(tasks: list[asyncio.Task[None]]) -> list[asyncio.Task[None]]:
        """Cancel ``tasks`` and wait for them, asking twice (a library may swallow a cancel);
        returns those still running."""
        for t in tasks:
            t.cancel()
        if not tasks:
            return []
        _, stuck = await asyncio.wait(tasks, timeout=3)
        for t in stuck:
            t.cancel()
        if stuck:
            _, stuck = await asyncio.wait(stuck, timeout=2)
        return list(stuck)

    async def apply_devices(self, cfg: EdgeConfig, profiles: dict[str, DeviceProfile]) -> dict[str, list[str]]:
        """Run the devices of ``cfg`` (validated, see :mod:`edge.remote_config`) from now on, without a
        restart: pollers of removed or changed devices are stopped and their drivers closed, new and
        changed ones started; unchanged devices keep their poller, driver and schedule. Readings
        already taken stay in the buffer. Returns the names removed, changed and added."""
        async with self._reconfiguring:
            removed, changed, added = changed_devices(self.cfg, cfg, self.profiles, profiles)
            going = sorted(removed | changed)
            for name in going:
                self.pollers[name].stop()
            stuck = await self._end([t for n in going if (t := self._poll_tasks.get(n)) is not None])
            if stuck:
                log.warning("reconfigure_tasks_left", tasks=[t.get_name() for t in stuck])
            for name in going:
                del self.pollers[name]
                await self.drivers.pop(name).close()
            # A serial bus keeps its link only while a device that stays uses it; a bus whose port
            # settings changed has only changed devices on it, so it gets a new link.
            kept = {d.serial_port for d in cfg.devices
                    if isinstance(d, RtuDeviceConfig) and d.name not in changed | added}
            for port in list(self._buses):
                if port not in kept:
                    del self._buses[port]
            starting = sorted(changed | added)
            self.cfg, self.profiles = cfg, profiles
            self.drivers.update(build_drivers(cfg, profiles, names=starting, buses=self._buses))
            # The uplink reports this same dict in its status: update it in place.
            self.devices.clear()
            self.devices.update({d.name: (profiles[d.name].profile.kind.value, profiles[d.name].name)
                                 for d in cfg.devices})
            await self.buffer.register_devices(self.devices)
            await self.scorer.replace_devices(scored_devices(cfg, profiles))
            for name in starting:
                poller = self.pollers[name] = self._poller(next(d for d in cfg.devices if d.name == name))
                if self._running:
                    self._start_poller(poller)
            self.uplink.status_changed()
            self.rollout.devices_changed()
            result = {"removed": sorted(removed), "changed": sorted(changed), "added": sorted(added)}
            log.info("devices_reconfigured", **result, running=sorted(self.pollers))
            return result

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
        self._running = True
        for p in self.pollers.values():
            self._start_poller(p)
        gauges = asyncio.create_task(self._gauges(), name="gauges")
        # Not watched like the others: scoring, rollout and remote configuration catch their own
        # failures, and the agent must collect and forward data even if they died.
        scoring = [asyncio.create_task(self.scorer.run(), name="scorer"),
                   asyncio.create_task(self.rollout.run(), name="rollout"),
                   asyncio.create_task(self.remote.run(), name="remote-config")]
        log.info("edge_ready", site=self.cfg.gateway.site, gateway=self.cfg.gateway.name,
                 devices=len(self.pollers), backlog=self.buffer.backlog, version=__version__)
        print(json.dumps({"event": "ready", "gateway": self.cfg.gateway.name,
                          "devices": list(self.pollers)}), flush=True)
        crashed = asyncio.ensure_future(asyncio.wait([writer, uplink], return_when=asyncio.FIRST_EXCEPTION))
        poll_failed = asyncio.ensure_future(self._poll_failed.wait())
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({crashed, poll_failed, stop}, return_when=asyncio.FIRST_COMPLETED)
        log.info("edge_stopping", reason="signal" if stop.done() else "task failed")
        # Remote configuration first: a reconfiguration half done would start pollers again.
        scoring[-1].cancel()
        await asyncio.wait([scoring[-1]], timeout=5)
        self._running = False
        for p in self.pollers.values():
            p.stop()
        polls = list(self._poll_tasks.values())
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
        poll_failed.cancel()
        stop.cancel()
        self.engine.close()
        await self.buffer.close()
        for t in (writer, uplink, *self._failed_polls):
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
