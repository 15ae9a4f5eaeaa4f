"""IEC 62056-21 mode C: reading an electricity meter through its optical port.

The dialogue (IEC 62056-21:2002, 6.3.3, protocol mode C, data readout):

1. At 300 baud, 7E1, the gateway sends the sign-on ``/?{address}!CR LF``.
2. The meter answers its identification ``/XXXZ<ident>CR LF``: XXX is the manufacturer's
   three-letter id, Z the highest baud rate it offers ('0'=300, '1'=600, '2'=1200, '3'=2400,
   '4'=4800, '5'=9600, '6'=19200).
3. The gateway acknowledges with ``ACK 0 Z 0 CR LF`` (normal protocol, chosen rate, data readout)
   and both sides switch to the chosen rate.
4. The meter sends ``STX <data block> ! CR LF ETX BCC``. Each data line is
   ``OBIS(value*unit)``; BCC is the XOR of every byte after STX up to and including ETX.

pyserial has no asyncio interface; the readout is a few seconds of blocking, timed-out serial
I/O, so it runs in a worker thread and the event loop never waits on the port.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Collection
from dataclasses import dataclass
from functools import reduce

import serial

from edge.drivers.base import DeviceError, PointResult
from protocol.profile import DeviceProfile, ObisPoint
from protocol.schema import Value

STX, ETX, ACK = b"\x02", b"\x03", b"\x06"
BAUD_CHARS = {"0": 300, "1": 600, "2": 1200, "3": 2400, "4": 4800, "5": 9600, "6": 19200}
_LINE = re.compile(r"^(?P<code>[0-9A-Za-z.:*\-]+)\((?P<body>[^()]*)\)")
# Meters print energy in Wh or kWh, power in W or kW; profiles choose one spelling.
_UNIT_FACTORS = {("Wh", "kWh"): 0.001, ("kWh", "Wh"): 1000.0, ("W", "kW"): 0.001, ("kW", "W"): 1000.0,
                 ("varh", "kvarh"): 0.001, ("var", "kvar"): 0.001}


class ReadoutError(Exception):
    """A readout that failed; ``kind`` is a short label for counters."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Readout:
    """One successful data readout."""

    identification: str
    lines: dict[str, tuple[str, str]]
    """OBIS code → (value text, unit text)."""


def bcc(data: bytes) -> int:
    """Block check character: XOR of ``data``."""
    return reduce(lambda a, b: a ^ b, data, 0)


def parse_identification(line: bytes) -> tuple[str, str]:
    """``/XXXZident`` → (baud char, full identification); raises :class:`ReadoutError`."""
    text = line.decode("ascii", errors="replace").strip()
    if len(text) < 5 or not text.startswith("/") or text[4] not in BAUD_CHARS:
        raise ReadoutError("garbage", f"not an identification message: {text[:40]!r}")
    return text[4], text[1:]


def parse_data_block(frame: bytes) -> dict[str, tuple[str, str]]:
    """Check ``STX ... ETX BCC`` and split its data lines; raises :class:`ReadoutError`."""
    start = frame.find(STX)
    end = frame.find(ETX, start + 1)
    if start < 0 or end < 0 or end + 1 >= len(frame):
        raise ReadoutError("short-frame", "data block incomplete (no STX/ETX/BCC)")
    body = frame[start + 1 : end + 1]
    if bcc(body) != frame[end + 1]:
        raise ReadoutError("bcc", f"BCC mismatch: computed {bcc(body):#04x}, received {frame[end + 1]:#04x}")
    try:
        text = body[:-1].decode("ascii")
    except UnicodeDecodeError:
        raise ReadoutError("garbage", "data block is not ASCII") from None
    lines: dict[str, tuple[str, str]] = {}
    for raw in text.replace("\r", "").split("\n"):
        raw = raw.strip()
        if not raw or raw == "!":
            continue
        m = _LINE.match(raw)
        if not m:
            raise ReadoutError("garbage", f"unreadable data line {raw[:40]!r}")
        value, _, unit = m["body"].partition("*")
        lines[m["code"]] = (value, unit)
    if not text.rstrip("\r\n").endswith("!"):
        raise ReadoutError("short-frame", "data block does not end with '!'")
    return lines


def convert(obis: ObisPoint, value: str, unit: str) -> float | str:
    """The value of one data line in the profile's unit; raises ``ValueError``."""
    if obis.type == "string":
        return value
    number = float(value)
    if unit == obis.unit or not unit:
        return number
    factor = _UNIT_FACTORS.get((unit, obis.unit))
    if factor is None:
        raise ValueError(f"{obis.code}: meter sends {unit!r}, profile expects {obis.unit!r}")
    return round(number * factor, 9)


def read_meter(port: str, address: str = "", max_baud: int = 9600, timeout_s: float = 2.0,
               line_timeout_s: float = 10.0) -> Readout:
    """Run one mode C data readout on ``port`` (blocking; call it from a worker thread)."""
    try:
        ser = serial.Serial(port, 300, bytesize=serial.SEVENBITS, parity=serial.PARITY_EVEN,
                            stopbits=serial.STOPBITS_ONE, timeout=timeout_s)
    except (serial.SerialException, OSError) as exc:
        raise ReadoutError("connect", f"cannot open {port}: {exc}") from exc
    with ser:
        ser.reset_input_buffer()
        ser.write(f"/?{address}!\r\n".encode("ascii"))
        ident_line = ser.read_until(b"\r\n", 64)
        if not ident_line:
            raise ReadoutError("timeout", "no identification after sign-on")
        if not ident_line.endswith(b"\r\n"):
            raise ReadoutError("short-frame", f"identification cut short: {ident_line[:40]!r}")
        offered, ident = parse_identification(ident_line)
        chosen = max((c for c, b in BAUD_CHARS.items() if b <= min(max_baud, BAUD_CHARS[offered])), default="0")
        ser.write(ACK + f"0{chosen}0\r\n".encode("ascii"))
        ser.flush()
        ser.baudrate = BAUD_CHARS[chosen]
        frame = bytearray()
        deadline = time.monotonic() + line_timeout_s
        # Read until ETX and the BCC after it, within an overall limit: a meter streaming
        # garbage must not hold the port forever.
        while time.monotonic() < deadline:
            chunk = ser.read(max(1, ser.in_waiting))
            if not chunk:
                break
            frame += chunk
            etx = frame.find(ETX)
            if etx >= 0 and len(frame) > etx + 1:
                break
            if len(frame) > 16_384:
                raise ReadoutError("garbage", "data block longer than 16 KiB")
        if not frame:
            raise ReadoutError("timeout", "no data block after the acknowledgement")
        return Readout(ident, parse_data_block(bytes(frame)))


class Iec62056Driver:
    """A meter on an optical head; one readout per poll delivers every configured value."""

    def __init__(self, port: str, profile: DeviceProfile, address: str = "", max_baud: int = 9600,
                 timeout_s: float = 2.0, metric_names: Collection[str] | None = None) -> None:
        self.port = port
        self.address = address
        self.max_baud = max_baud
        self.timeout_s = timeout_s
        wanted = set(metric_names) if metric_names else None
        self.obis = [o for o in profile.obis if wanted is None or o.name in wanted]
        self.units = {o.name: o.unit for o in self.obis}
        self._lock = asyncio.Lock()  # one readout at a time on the optical head
        self.identification = ""

    async def read(self, metrics: Collection[str] | None = None) -> list[PointResult]:
        """One data readout; see :meth:`edge.drivers.base.Driver.read`."""
        async with self._lock:
            try:
                readout = await asyncio.to_thread(read_meter, self.port, self.address, self.max_baud,
                                                  self.timeout_s)
            except ReadoutError as exc:
                raise DeviceError(exc.kind, str(exc)) from None
        self.identification = readout.identification
        results = []
        for o in self.obis:
            if metrics is not None and o.name not in metrics:
                continue
            line = readout.lines.get(o.code)
            if line is None:
                results.append(PointResult(o.name, None, "missing"))
                continue
            try:
                results.append(PointResult(o.name, convert(o, *line)))
            except ValueError:
                results.append(PointResult(o.name, None, "decode"))
        return results

    async def write(self, point: str, value: float) -> Value:
        """Mode C data readout is read-only: always :class:`DeviceError` ``not-writable``."""
        raise DeviceError("not-writable", f"IEC 62056-21 meters cannot be written (point {point!r})")

    async def close(self) -> None:
        """Nothing stays open between readouts."""
