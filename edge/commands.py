"""Setpoint commands from the hub (``twin/v1/{site}/{gateway}/commands``), with guard rails.

The hub checks a command before sending it; the gateway checks it again (defence in depth: a
message may reach the broker without passing the hub, or the hub may run with another profile
version). In order, a command is

1. decoded (a malformed payload is logged and counted, never answered: it has no usable id);
2. dropped if its id was seen before (QoS 1 may deliver a message twice; the answer went out the
   first time);
3. refused if it names another gateway, has expired by this gateway's clock, names an unknown
   device or point, a point that is not writable, a value that is not finite or outside the
   point's safe range (``min``/``max`` in the device profile), or if too many commands are
   already in progress;
4. written through the device's poller (between two polls, on the poller's connection) and read
   back.

Every command that gets past step 2 is answered with one ``command_applied`` /
``command_refused`` / ``command_failed`` event through the durable buffer (so the answer survives
a broker outage or a restart) and logged as one structured ``command`` line.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from edge.drivers.base import DeviceError
from edge.metrics import EdgeMetrics
from protocol.logs import get_logger
from protocol.profile import DeviceProfile
from protocol.schema import CommandV1, EventType, SchemaError, Value, decode_command

log = get_logger("edge.commands")

REMEMBER_IDS = 4096
"""Command ids kept for deduplication (oldest forgotten first). The hub lets a command live for a
minute or so; a redelivery comes within seconds, so a few thousand ids is plenty."""
MAX_IN_PROGRESS = 32
"""Commands being executed at once (they queue per device behind its polls); more are refused
(``busy``) rather than piling up in memory."""


class EventSink(Protocol):
    """Where answers go (the buffer's events table, published by the uplink)."""

    async def add_event(self, type_: str, message: str, details: dict[str, int | float | str] | None = None, *,
                        device: str | None = None, ts_ms: int | None = None) -> None:
        """Record an event durably for the uplink to publish."""
        ...


class Writer(Protocol):
    """What writes a device's setpoint (its :class:`edge.poller.DevicePoller`)."""

    async def write(self, point: str, value: float) -> Value:
        """Write, read back, return the value read back; :class:`DeviceError` on failure."""
        ...


DeviceLookup = Callable[[str], "tuple[DeviceProfile, Writer] | None"]
"""Device name → its profile and writer, or ``None`` if this gateway has no such device (looked up
per command, so a device list replaced at run time is seen)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one command ended."""

    status: EventType
    reason: str = ""
    """Short machine-friendly reason for refused/failed (``out_of_range``, ``expired``, ``timeout``, ...)."""
    message: str = ""
    read_back: Value = None


def now_ms() -> int:
    """Gateway wall clock, ms since the epoch."""
    return time.time_ns() // 1_000_000


class CommandGuard:
    """Checks, executes and answers the hub's commands for one gateway."""

    def __init__(self, site: str, gateway: str, lookup: DeviceLookup, events: EventSink, metrics: EdgeMetrics,
                 clock: Callable[[], int] = now_ms, remember: int = REMEMBER_IDS,
                 max_in_progress: int = MAX_IN_PROGRESS) -> None:
        self.site = site
        self.gateway = gateway
        self.lookup = lookup
        self.events = events
        self.metrics = metrics
        self.clock = clock
        self.remember = remember
        self.max_in_progress = max_in_progress
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task[Outcome]] = set()

    def handle(self, payload: bytes) -> None:
        """Downlink handler (``Uplink.on_downlink("commands", ...)``): decode, deduplicate and
        start the command in its own task; never raises."""
        cmd = self.accept(payload)
        if cmd is None:
            return
        task = asyncio.get_running_loop().create_task(self.run(cmd), name=f"command-{cmd.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def accept(self, payload: bytes) -> CommandV1 | None:
        """The decoded command if it is new; ``None`` (logged and counted) if it is malformed or
        a redelivery."""
        try:
            cmd = decode_command(payload)
        except SchemaError as exc:
            self.metrics.commands.labels("malformed", "schema").inc()
            log.warning("command_malformed", error=str(exc)[:500], size=len(payload))
            return None
        if cmd.id in self._seen:
            self._seen.move_to_end(cmd.id)
            self.metrics.commands.labels("duplicate", "").inc()
            log.info("command_duplicate", id=cmd.id, device=cmd.device, point=cmd.point)
            return None
        self._seen[cmd.id] = None
        while len(self._seen) > self.remember:
            self._seen.popitem(last=False)
        return cmd

    async def run(self, cmd: CommandV1) -> Outcome:
        """Check and execute one accepted command, record its answer event, log it."""
        busy = len(self._tasks) > self.max_in_progress
        try:
            outcome = (Outcome(EventType.COMMAND_REFUSED, "busy", f"more than {self.max_in_progress} commands "
                               "in progress") if busy else await self._execute(cmd))
        except Exception as exc:  # a bug here must still produce an answer, not a silent hub
            log.exception("command_crashed", id=cmd.id, error=repr(exc))
            outcome = Outcome(EventType.COMMAND_FAILED, "internal", f"internal error: {exc!r}"[:500])
        label = {EventType.COMMAND_APPLIED: "applied", EventType.COMMAND_REFUSED: "refused"}.get(
            outcome.status, "failed")
        self.metrics.commands.labels(label, outcome.reason).inc()
        log_fn = log.info if outcome.status is EventType.COMMAND_APPLIED else log.warning
        log_fn("command", id=cmd.id, device=cmd.device, point=cmd.point, value=cmd.value,
               issued_by=cmd.issued_by, outcome=label, reason=outcome.reason or None,
               read_back=outcome.read_back, message=outcome.message or None)
        details: dict[str, int | float | str] = {
            "command_id": cmd.id, "point": cmd.point, "issued_by": cmd.issued_by,
            # A non-finite value cannot travel in JSON; its text does.
            "value": cmd.value if math.isfinite(cmd.value) else str(cmd.value)}
        if outcome.reason:
            details["reason"] = outcome.reason
        if isinstance(outcome.read_back, bool):
            details["read_back"] = int(outcome.read_back)
        elif isinstance(outcome.read_back, int | float):
            details["read_back"] = outcome.read_back
        try:
            await self.events.add_event(outcome.status.value, outcome.message[:1000], details,
                                        device=cmd.device if cmd.device else None)
        except Exception as exc:  # the buffer logs its own failures; the command is done regardless
            log.error("command_answer_not_recorded", id=cmd.id, error=repr(exc))
        return outcome

    def check(self, cmd: CommandV1) -> tuple[Outcome | None, Writer | None]:
        """The guard rails: a refusal, or ``(None, writer)`` when the command may go to the device."""
        def refuse(reason: str, message: str) -> tuple[Outcome, None]:
            return Outcome(EventType.COMMAND_REFUSED, reason, message), None

        if (cmd.site, cmd.gateway) != (self.site, self.gateway):
            return refuse("wrong_gateway", f"command is for {cmd.site}.{cmd.gateway}, this is "
                                           f"{self.site}.{self.gateway}")
        now = self.clock()
        if now > cmd.expires:
            return refuse("expired", f"command expired {(now - cmd.expires) / 1000:.1f} s ago by the gateway clock")
        found = self.lookup(cmd.device)
        if found is None:
            return refuse("unknown_device", f"this gateway has no device {cmd.device!r}")
        profile, writer = found
        try:
            point = profile.point(cmd.point)
        except KeyError:
            return refuse("unknown_point", f"profile {profile.name!r} has no point {cmd.point!r}")
        if not point.writable or point.min is None or point.max is None:
            return refuse("not_writable", f"point {cmd.point!r} of profile {profile.name!r} is not writable")
        if not math.isfinite(cmd.value):
            return refuse("not_finite", f"value {cmd.value!r} is not a finite number")
        if not point.min <= cmd.value <= point.max:
            unit = f" {point.unit}" if point.unit else ""
            return refuse("out_of_range", f"{cmd.point} = {cmd.value:g}{unit} is outside the safe range "
                                          f"{point.min:g}..{point.max:g}{unit}")
        return None, writer

    async def _execute(self, cmd: CommandV1) -> Outcome:
        refusal, writer = self.check(cmd)
        if refusal is not None or writer is None:
            return refusal or Outcome(EventType.COMMAND_REFUSED, "unknown_device")
        try:
            read_back = await writer.write(cmd.point, cmd.value)
        except DeviceError as exc:
            return Outcome(EventType.COMMAND_FAILED, exc.kind, f"{cmd.device}: {exc}"[:1000])
        return Outcome(EventType.COMMAND_APPLIED, "", f"{cmd.device}.{cmd.point} set to {cmd.value:g}, "
                                                     f"read back {read_back}", read_back)

    async def close(self) -> None:
        """Cancel commands still in progress (shutdown); their ids stay unanswered, the hub times
        them out as ``expired_no_answer``."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
