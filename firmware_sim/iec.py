"""An electricity meter read through its optical port with IEC 62056-21 mode C, on a pty.

Dialogue (mode C, data readout; characters are 7-bit ASCII, 7E1 on a real line)::

    client -> meter   /?!<CR><LF>                 sign-on at 300 baud (or /?ADDRESS!<CR><LF>)
    meter  -> client  /TWN5TWIN-IEC-1<CR><LF>     identification at 300 baud: manufacturer TWN,
                                                  baud-rate character 5 (= 9600 baud offered)
    client -> meter   <ACK>050<CR><LF>            option select at 300 baud: normal protocol (0),
                                                  baud character 5, data readout (0)
    meter  -> client  <STX>0.0.0(90000001)<CR><LF>...!<CR><LF><ETX><BCC>
                                                  data block at the selected speed

BCC is the XOR of every byte after STX up to and including ETX. Anything else gets no answer; an
incomplete or unanswered dialogue returns to waiting for a sign-on after 1.5 s without a byte, as
real meters do.

Timing (unless disabled): the meter answers a message no earlier than the message's wire time at
300 baud (10 bits per character) after its first byte arrived, plus the 200 ms minimum reaction
time the standard sets for a meter whose manufacturer id is upper case; the identification goes
out at 300 baud and the data block at the selected speed, paced byte by byte in small chunks.

Registers: the model is a :class:`~firmware_sim.meter.MeterModel`. Tariff registers 1.8.1 (day,
07:00-23:00 simulated time) and 1.8.2 (night) split the counted energy of every tick by the share
of that tick falling in each tariff window; since the model's power is constant during a tick,
this split is exact and does not depend on the tick length. The counters have 6 integer digits
and 3 decimals and roll over at 1,000,000 kWh.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Coroutine
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from firmware_sim.inject import FaultInjector
from firmware_sim.line import LineSettings, PtyPort, Transmitter
from firmware_sim.meter import MeterModel
from firmware_sim.truth import TruthSource
from protocol.logs import get_logger

log = get_logger("firmware_sim.iec")

Reading = float | int | bool | str

MANUFACTURER = "TWN"
"""3-letter manufacturer id in the identification (upper case: 200 ms minimum reaction time)."""
BAUD_CHARS = {"0": 300, "1": 600, "2": 1200, "3": 2400, "4": 4800, "5": 9600, "6": 19200}
"""Mode C baud-rate characters."""
SIGN_ON_LINE = LineSettings(baudrate=300, parity="E", stopbits=1, bytesize=7)
REACTION_TIME = 0.2
"""Seconds between receiving a message and answering (the standard's minimum for upper-case ids)."""
INACTIVITY_TIMEOUT = 1.5
"""Seconds without a byte after which the meter forgets a started dialogue."""
CHUNK_INTERVAL = 0.05
"""Answers are handed to the pty in chunks of about this many seconds of line time."""
COUNTER_ROLLOVER_KWH = 1_000_000.0
"""Energy registers show 6 integer digits: 999999.999 kWh is followed by 000000.000."""
SIM_EPOCH = date(2025, 1, 1)
"""Calendar date of simulated day 0 (for 0.9.2); fixed so that readouts are reproducible."""
SERIAL_BASE = 90_000_000
DAY_TARIFF_HOURS = (7.0, 23.0)
"""Tariff 1 (day) applies from 07:00 to 23:00 simulated time, tariff 2 (night) otherwise."""

STX, ETX, ACK = 0x02, 0x03, 0x06
_SIGN_ON = re.compile(rb"/\?([0-9A-Za-z ]{0,32})!")
_OPTION_SELECT = re.compile(rb"\x06([0-9])([0-9])([0-9])")

OBIS_LINES: tuple[tuple[str, str, str], ...] = (
    ("0.0.0", "meter_id", ""),
    ("0.9.1", "clock_time", ""),
    ("0.9.2", "clock_date", ""),
    ("1.8.0", "energy_import", "kWh"),
    ("1.8.1", "energy_import_t1", "kWh"),
    ("1.8.2", "energy_import_t2", "kWh"),
    ("2.8.0", "energy_export", "kWh"),
    ("16.7.0", "power", "kW"),
    ("32.7.0", "voltage", "V"),
    ("31.7.0", "current", "A"),
    ("13.7.0", "power_factor", ""),
    ("14.7.0", "frequency", "Hz"),
)
"""(OBIS code, truth-log name, unit) of every data line, in readout order."""
_TEXT_VALUES = frozenset({"meter_id", "clock_time", "clock_date"})


def bcc(data: bytes) -> int:
    """Block check character: XOR of ``data`` (everything after STX up to and including ETX)."""
    value = 0
    for b in data:
        value ^= b
    return value


def data_block(lines: list[str], *, bad_bcc: bool = False) -> bytes:
    """``STX lines... ! CR LF ETX BCC``; ``bad_bcc`` makes the BCC wrong (fault injection)."""
    body = ("".join(f"{line}\r\n" for line in lines) + "!\r\n").encode("ascii") + bytes([ETX])
    check = bcc(body)
    if bad_bcc:
        check ^= 0x55  # still 7-bit, always different
    return bytes([STX]) + body + bytes([check])


def day_share(t0: float, t1: float) -> float:
    """Fraction of the simulated interval ``[t0, t1]`` (seconds) inside the day tariff window."""
    if t1 <= t0:
        return 0.0
    start_h, end_h = DAY_TARIFF_HOURS
    inside = 0.0
    day = math.floor(t0 / 86_400.0)
    while day * 86_400.0 < t1:
        a, b = day * 86_400.0 + start_h * 3600.0, day * 86_400.0 + end_h * 3600.0
        inside += max(0.0, min(t1, b) - max(t0, a))
        day += 1
    return inside / (t1 - t0)


def _counter(kwh: float) -> str:
    return f"{kwh % COUNTER_ROLLOVER_KWH:010.3f}"


class IecMeter(TruthSource):
    """A simulated meter with an optical port (its own pty) speaking IEC 62056-21 mode C."""

    kind = "meter"
    profile_name = "iec-meter"

    def __init__(self, name: str, number: int, model: MeterModel, injector: FaultInjector, *,
                 address: str | None = None, baud_char: str = "5", line_timing: bool = True,
                 link: Path | None = None) -> None:
        if baud_char not in BAUD_CHARS:
            raise ValueError(f"baud character must be one of {''.join(BAUD_CHARS)}, got {baud_char!r}")
        self.name = name
        self.model = model
        self.injector = injector
        self.address = address
        """Only sign-ons without an address or with this one are answered (None: any)."""
        self.baud_char = baud_char
        self.line_timing = line_timing
        self.serial_number = str(SERIAL_BASE + number)
        self.identification = f"/{MANUFACTURER}{baud_char}TWIN-IEC-{number}"
        self.port = PtyPort(name, SIGN_ON_LINE, link)
        self.link = link
        self.t1_kwh = model.start_kwh
        """Day-tariff counter (the initial ``start_kwh`` is booked here), before roll-over."""
        self.t2_kwh = 0.0
        """Night-tariff counter, before roll-over."""
        self.failed = False
        self.visible: dict[str, Reading] = {}
        """Values a client parsing the data block gets right now."""
        self.visible_since_ms = 0
        self.lines: list[str] = []
        """Data lines of the current snapshot, ``OBIS(value*unit)``."""
        self.readouts = 0
        """Data blocks sent so far."""
        self._tx = Transmitter(self.port, timing=line_timing)
        self._state = "idle"  # idle -> (sign-on) busy -> wait_ack -> (ack) busy -> idle
        self._buf = bytearray()
        self._rx_start = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._fault: str | None = None

    @property
    def path(self) -> str:
        """Slave path of this meter's pty (an optical head is one device per port)."""
        return self.port.path

    # --- simulation ---

    def advance(self, dt: float) -> None:
        """Step the model by ``dt`` and book the counted energy to the tariff registers."""
        t0, counted0 = self.model.sim_time, self.model.counted_kwh
        self.model.step(dt)
        energy = self.model.counted_kwh - counted0
        share = day_share(t0, t0 + dt)
        self.t1_kwh += energy * share
        self.t2_kwh += energy * (1.0 - share)

    def publish(self, t_ms: int) -> None:
        """Make the model's current state the next readout (atomically: no await here)."""
        r = self.model.reading
        clock = int(self.model.sim_time)
        day, second = divmod(clock, 86_400)
        hh, rest = divmod(second, 3600)
        when = SIM_EPOCH + timedelta(days=day)
        texts = {
            "meter_id": self.serial_number,
            "clock_time": f"{hh:02d}:{rest // 60:02d}:{rest % 60:02d}",
            "clock_date": when.strftime("%y%m%d"),
            "energy_import": _counter(float(r["energy_import"])),
            "energy_import_t1": _counter(self.t1_kwh),
            "energy_import_t2": _counter(self.t2_kwh),
            "energy_export": _counter(0.0),
            "power": f"{float(r['power']):07.3f}",
            "voltage": f"{float(r['voltage']):05.1f}",
            "current": f"{float(r['current']):06.2f}",
            "power_factor": f"{float(r['power_factor']):05.3f}",
            "frequency": f"{float(r['frequency']):05.2f}",
        }
        lines: list[str] = []
        visible: dict[str, Reading] = {}
        for code, name, unit in OBIS_LINES:
            text = texts[name]
            lines.append(f"{code}({text}*{unit})" if unit else f"{code}({text})")
            visible[name] = text if name in _TEXT_VALUES else float(text)
        self.lines = lines
        self.visible = visible
        self.visible_since_ms = t_ms


    def ready_entry(self) -> dict[str, Any]:
        """This meter in the ready line."""
        entry: dict[str, Any] = {"name": self.name, "kind": self.kind, "profile": self.profile_name,
                                 "transport": "iec62056", "serial": self.path}
        if self.link is not None:
            entry["link"] = str(self.link)
        return entry

    # --- serving ---

    async def start(self) -> None:
        """Create the pty and wait for sign-ons (raises ``OSError``)."""
        self.port.open()
        self.port.start_reading(self._on_data)

    async def stop(self) -> None:
        """Stop answering and close the pty (idempotent)."""
        self._cancel_timer()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.port.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm_timer(self) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(INACTIVITY_TIMEOUT, self._on_inactive)

    def _on_inactive(self) -> None:
        self._timer = None
        if self._state == "busy":
            return
        if self._buf or self._state != "idle":
            log.debug("dialogue abandoned after inactivity", device=self.name, state=self._state)
        self._buf.clear()
        self._state = "idle"

    def _on_data(self, data: bytes) -> None:
        if self._state == "busy":
            return  # half duplex: what arrives while the meter talks is lost
        now = asyncio.get_running_loop().time()
        if not self._buf:
            self._rx_start = now
        # A 7E1 receiver hands over 7 data bits; clients that emulate 7E1 on an 8N1 port put the
        # parity in bit 7.
        self._buf += bytes(b & 0x7F for b in data)
        self._arm_timer()
        while (end := self._buf.find(b"\r\n")) >= 0:
            message = bytes(self._buf[:end])
            started = self._rx_start
            del self._buf[: end + 2]
            self._rx_start = now
            self._on_message(message, started, end + 2)
            if self._state == "busy":
                self._buf.clear()
                return
        if len(self._buf) > 256:
            self._buf.clear()  # no valid message is that long

    def _on_message(self, message: bytes, started: float, length: int) -> None:
        slash = message.rfind(b"/")
        # A receiver restarts a message at its start character, so leading noise is harmless.
        if slash >= 0 and (m := _SIGN_ON.fullmatch(message[slash:])):
            address = m.group(1).decode("ascii")
            if address and self.address is not None and address != self.address:
                log.debug("sign-on for another address", device=self.name, address=address)
                self._state = "idle"
                return
            self._begin(self._identify(started, length))
            return
        ack = message.rfind(b"\x06")
        if self._state == "wait_ack" and ack >= 0 and (m := _OPTION_SELECT.fullmatch(message[ack:])):
            protocol, baud, mode = (chr(g[0]) for g in m.groups())
            if protocol == "0" and mode == "0" and baud <= self.baud_char:
                self._begin(self._read_out(started, length, BAUD_CHARS[baud]))
                return
            log.debug("option select refused", device=self.name, message=message.hex())
        else:
            log.debug("message ignored", device=self.name, state=self._state, message=message.hex())
        self._state = "idle"

    def _begin(self, work: Coroutine[Any, Any, None]) -> None:
        self._state = "busy"
        self._cancel_timer()
        self._task = asyncio.create_task(work, name=f"{self.name}-answer")

    def _reply_at(self, started: float, length: int) -> float:
        if not self.line_timing:
            return 0.0
        return started + SIGN_ON_LINE.wire_time(length) + REACTION_TIME

    async def _identify(self, started: float, length: int) -> None:
        try:
            self._fault = self.injector.draw()
            if self._fault == "timeout":
                self.injector.record("timeout", transport="iec62056")
                self._fault = None
                self._state = "idle"
                return
            ident = (self.identification + "\r\n").encode("ascii")
            await self._tx.send(ident, earliest=self._reply_at(started, length), line=SIGN_ON_LINE,
                                chunk_interval=CHUNK_INTERVAL)
            self._state = "wait_ack"
            self._arm_timer()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("identification failed", device=self.name)
            self._state = "idle"

    async def _read_out(self, started: float, length: int, baudrate: int) -> None:
        try:
            block = data_block(self.lines, bad_bcc=self._fault == "crc")
            fault, self._fault = self._fault, None
            if fault == "garbage":
                block = self.injector.garbage(len(block), seven_bit=True)
            elif fault == "short":
                block = self.injector.short(block)
            if fault is not None:
                self.injector.record(fault, transport="iec62056")
            line = LineSettings(baudrate=baudrate, parity="E", stopbits=1, bytesize=7)
            await self._tx.send(block, earliest=self._reply_at(started, length), line=line,
                                chunk_interval=CHUNK_INTERVAL)
            self.readouts += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("data readout failed", device=self.name)
        finally:
            self._state = "idle"
