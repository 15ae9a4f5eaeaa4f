"""Modbus RTU: several simulated devices on one RS-485-like bus, served over a pseudo-terminal.

The transport (receiving, framing, timing, answering) is ours; the protocol is pymodbus': its
``FramerRTU`` and PDU decoder find and decode requests and build responses, and each request is
executed by the PDU's own ``datastore_update`` against a pymodbus ``SimCore`` holding every
device's ``SimDevice`` under its unit id, as pymodbus' own servers do.

Framing: bytes are collected until they form a complete frame according to the function code
(pymodbus' ``calculateRtuFrameSize``). A frame with a bad CRC is ignored, as the standard requires,
and so is everything after it until the line has been silent for t3.5 (3.5 character times,
1.75 ms above 19200 baud); bytes that never form a frame (garbage, an unknown function code) are
likewise dropped at the next silence. So garbage can never wedge the bus: the next request after
a silence is read afresh.

Addressing: device ``i`` answers unit id ``first_unit + i``; other unit ids get no answer. Unit 0
is a broadcast: every device executes it, none answers.

Timing (see :mod:`firmware_sim.line`): a request that started arriving at ``t0`` is complete at
``t0 + wire_time(len)``; the answer starts t3.5 later (and not before the previous answer has
finished) and is written when its last byte would have arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.simulator.simcore import SimCore

from firmware_sim.inject import DAMAGING_FAULTS
from firmware_sim.line import LineSettings, PtyPort, Transmitter
from protocol.logs import get_logger

if TYPE_CHECKING:
    from firmware_sim.server import SimulatedDevice

log = get_logger("firmware_sim.rtu")

MAX_FRAME = 256
"""Longest RTU frame (address + PDU of at most 253 bytes + CRC)."""
MIN_FRAME = 4
"""Address + function code + CRC."""


class RtuBus:
    """One pty carrying Modbus RTU for several devices, each under its own unit id."""

    def __init__(self, devices: Sequence[SimulatedDevice], line: LineSettings, *, line_timing: bool = True,
                 dead_time: float = 5.0, link: Path | None = None) -> None:
        self.devices = list(devices)
        self.line = line
        self.line_timing = line_timing
        self.dead_time = dead_time
        self.port = PtyPort("rtu", line, link)
        self._units = {d.unit_id: d for d in self.devices}
        # The same datastore pymodbus' servers build from a list of SimDevice ("an RS485 line").
        self._core = SimCore([d.simdevice(d.unit_id) for d in self.devices])
        self._framer = FramerRTU(DecodePDU(True))
        self._tx = Transmitter(self.port, timing=line_timing)
        self._buf = bytearray()
        self._frame_start = 0.0
        self._discarding = False
        self._silence: asyncio.TimerHandle | None = None
        self._requests: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._dead_until: dict[int, float] = {}
        self.frames_ignored = 0
        """Frames dropped for a bad CRC, garbage or an unknown function code (for tests)."""

    @property
    def path(self) -> str:
        """The slave path clients open, e.g. ``/dev/pts/7``."""
        return self.port.path

    async def start(self) -> None:
        """Create the pty and serve (raises ``OSError`` if the pty or the link cannot be made)."""
        self.port.open()
        self.port.start_reading(self._on_data)
        self._worker = asyncio.create_task(self._serve(), name="rtu-bus")

    async def stop(self) -> None:
        """Stop serving and close the pty (idempotent)."""
        if self._silence is not None:
            self._silence.cancel()
            self._silence = None
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        self.port.close()

    # --- receiving and framing ---

    def _on_data(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._silence is not None:
            self._silence.cancel()
        self._silence = loop.call_later(self.line.t35, self._on_silence)
        if self._discarding:
            return
        if not self._buf:
            self._frame_start = now
        self._buf += data
        self._extract_frames()

    def _on_silence(self) -> None:
        # t3.5 without a byte: whatever is buffered can no longer become a frame.
        self._silence = None
        if self._buf:
            log.debug("incomplete frame dropped at silence", data=self._buf.hex())
            self.frames_ignored += 1
        self._buf.clear()
        self._discarding = False

    def _drop_until_silence(self, why: str) -> None:
        log.debug("frame ignored", reason=why, data=self._buf.hex())
        self.frames_ignored += 1
        self._buf.clear()
        self._discarding = True

    def _extract_frames(self) -> None:
        while len(self._buf) >= MIN_FRAME:
            size = self._frame_size(bytes(self._buf))
            if not size or len(self._buf) < size:
                # Incomplete, or an unknown function code: only silence can tell where it ends.
                break
            frame = bytes(self._buf[:size])
            crc = int.from_bytes(frame[-2:], "big")
            if not FramerRTU.check_CRC(frame[:-2], crc):
                self._drop_until_silence("bad CRC")
                return
            del self._buf[:size]
            self._requests.put_nowait((self._frame_start, frame))
            # Back-to-back frames in one burst: the next one started when this one ended.
            self._frame_start += self.line.wire_time(size)
        if len(self._buf) > MAX_FRAME:
            self._drop_until_silence("longer than any frame")

    def _frame_size(self, data: bytes) -> int | None:
        """Length of the request frame at the start of ``data``: 0 if more bytes are needed to
        tell, None if its function code is not a request pymodbus knows."""
        if data[1] & 0x80:
            return None  # an exception response is not a request
        try:
            pdu_class = self._framer.decoder.lookupPduClass(data)
            if pdu_class is None:
                return None
            return int(pdu_class.calculateRtuFrameSize(data))
        except Exception:  # NotImplementedException for PDUs pymodbus cannot size, short sub-codes
            return None

    # --- answering ---

    async def _serve(self) -> None:
        while True:
            started, frame = await self._requests.get()
            try:
                await self._handle(started, frame)
            except Exception:
                log.exception("RTU request failed", frame=frame.hex())

    async def _handle(self, started: float, frame: bytes) -> None:
        unit = frame[0]
        if unit != 0 and unit not in self._units:
            return  # another device's request: on a real bus someone else answers
        pdu = self._framer.decoder.decode(frame[1:-2])
        if unit == 0:
            if pdu is not None:
                await self._broadcast(pdu)
            return
        device = self._units[unit]
        loop = asyncio.get_running_loop()
        if loop.time() < self._dead_until.get(unit, 0.0):
            return
        fault = device.injector.draw()
        response: ModbusPDU
        if fault is not None:
            device.injector.record(fault, transport="rtu", unit_id=unit, function_code=frame[1])
        if fault == "timeout":
            return
        if fault == "disconnect":
            self._dead_until[unit] = loop.time() + self.dead_time
            return
        if fault == "exception":
            response = ExceptionResponse(frame[1], ExcCodes.DEVICE_FAILURE)
        elif pdu is None:
            # A known function code whose body does not decode (e.g. count > 125): pymodbus'
            # servers answer exception 1, and so does the TCP simulator; stay consistent.
            response = ExceptionResponse(frame[1], ExcCodes.ILLEGAL_FUNCTION)
        else:
            response = await self._execute(pdu, unit)
        response.dev_id = unit
        response.transaction_id = 0
        out = self._framer.buildFrame(response)
        if fault in DAMAGING_FAULTS:
            out = device.injector.damage_rtu(fault, out)
        request_end = started + self.line.wire_time(len(frame))
        await self._tx.send(out, earliest=request_end + self.line.t35, line=self.line)

    async def _execute(self, pdu: ModbusPDU, unit: int) -> ModbusPDU:
        try:
            return await pdu.datastore_update(self._core, unit)  # type: ignore[arg-type]
        except Exception:
            # Same answer as pymodbus' server when a datastore fails.
            log.exception("datastore failed", unit_id=unit, function_code=pdu.function_code)
            return ExceptionResponse(pdu.function_code, ExcCodes.DEVICE_FAILURE)

    async def _broadcast(self, pdu: ModbusPDU) -> None:
        loop = asyncio.get_running_loop()
        for device in self.devices:
            if loop.time() < self._dead_until.get(device.unit_id, 0.0):
                continue
            await self._execute(pdu, device.unit_id)
