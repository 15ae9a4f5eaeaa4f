"""Serial lines on pseudo-terminals: settings, the wire-timing model and the pty itself.

A pty carries bytes as fast as the kernel copies them and ignores the baud rate a client sets on
it. To make a simulated device feel like one on a real line, the sender computes when each byte
would have finished travelling at the configured speed and only hands bytes to the pty then:

* a character takes ``bits_per_char / baudrate`` seconds, with ``bits_per_char`` = 1 start bit
  + data bits + 1 parity bit (unless parity N) + stop bits: 11 for 8E1, 10 for 7E1;
* a frame of ``n`` bytes occupies ``n × bits_per_char / baudrate`` seconds;
* a request is taken to have started arriving when its first byte was read from the pty (the
  client wrote it all at once), so it is complete ``wire_time(n)`` later; the device may answer
  no earlier than that plus its own silence or reaction time.

The transmit side (:class:`Transmitter`) writes a frame so that no byte is available before it
would be on a real line, and never starts a frame before the previous one would have finished.

Parity and data bits on a pty: Linux forces every pty to CS8 without parity, and glibc (Debian,
Fedora) makes ``tcsetattr`` fail with EINVAL when a call would change nothing else. A client asking
for 8E1 or 7E1 therefore fails whenever it re-applies its settings without another change:
pymodbus' serial client always does (it sets the timeout right after opening), so pymodbus
clients must open a pty with parity N; the simulated wire keeps its own settings. To spare
clients that only configure once per open (pyserial scripts, libmodbus/mbpoll), the simulator
"parks" the pty's nominal speed at 50 baud whenever it receives bytes: a client's next
configuration then always changes the speed, and succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import termios
import tty
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from protocol.logs import get_logger

log = get_logger("firmware_sim.line")

PARITIES = ("N", "E", "O")
PARK_SPEED = termios.B50
"""Nominal pty speed between client configurations (no client asks for 50 baud)."""
FAST_BAUD = 19200
"""Above this rate Modbus fixes the inter-frame silence at 1.75 ms (and t1.5 at 0.75 ms)."""


@dataclass(frozen=True)
class LineSettings:
    """Serial line parameters and the wire-timing they imply."""

    baudrate: int = 19200
    parity: str = "E"
    stopbits: int = 1
    bytesize: int = 8

    def check(self) -> None:
        """Raise ``ValueError`` naming the first invalid setting."""
        if not (isinstance(self.baudrate, int) and self.baudrate > 0):
            raise ValueError(f"baud rate must be a positive integer, got {self.baudrate}")
        if self.parity not in PARITIES:
            raise ValueError(f"parity must be one of {'/'.join(PARITIES)}, got {self.parity!r}")
        if self.stopbits not in (1, 2):
            raise ValueError(f"stop bits must be 1 or 2, got {self.stopbits}")
        if self.bytesize not in (7, 8):
            raise ValueError(f"byte size must be 7 or 8, got {self.bytesize}")

    @property
    def bits_per_char(self) -> int:
        """Start bit + data bits + parity bit (if any) + stop bits."""
        return 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits

    @property
    def char_time(self) -> float:
        """Seconds one character occupies the line."""
        return self.bits_per_char / self.baudrate

    def wire_time(self, n: int) -> float:
        """Seconds ``n`` back-to-back characters occupy the line."""
        return n * self.char_time

    @property
    def t35(self) -> float:
        """Modbus RTU inter-frame silence: 3.5 character times, fixed 1.75 ms above 19200 baud."""
        return 0.00175 if self.baudrate > FAST_BAUD else 3.5 * self.char_time

    @property
    def t15(self) -> float:
        """Modbus RTU inter-character limit: 1.5 character times, fixed 0.75 ms above 19200 baud."""
        return 0.00075 if self.baudrate > FAST_BAUD else 1.5 * self.char_time


class PtyPort:
    """A pseudo-terminal pair: the simulator owns the master end, clients open :attr:`path`.

    The slave end stays open in the simulator as well, so the pty never hangs up when a client
    closes it (a hung-up master reads EIO until someone reopens the slave).
    """

    def __init__(self, name: str, line: LineSettings, link: Path | None = None) -> None:
        self.name = name
        self.line = line
        self.link = link
        self.path = ""
        """Slave device path, e.g. ``/dev/pts/7`` (set by :meth:`open`)."""
        self._master = -1
        self._slave = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def is_open(self) -> bool:
        """True between :meth:`open` and :meth:`close`."""
        return self._master >= 0

    def open(self) -> str:
        """Create the pty (and the symlink, if any); return the slave path. Raises ``OSError``."""
        master, slave = os.openpty()
        try:
            tty.setraw(slave)
            _park(slave)
            os.set_blocking(master, False)
            path = os.ttyname(slave)
            if self.link is not None:
                _replace_symlink(self.link, path)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        self._master, self._slave, self.path = master, slave, path
        return path

    def start_reading(self, on_data: Callable[[bytes], None]) -> None:
        """Call ``on_data`` from the event loop with every chunk a client writes."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._master, self._readable, on_data)

    def _readable(self, on_data: Callable[[bytes], None]) -> None:
        try:
            data = os.read(self._master, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            # Cannot happen while we hold the slave open; stop watching rather than spin on EIO.
            log.error("pty read failed; port closed", port=self.name, path=self.path, error=str(exc))
            if self._loop is not None:
                self._loop.remove_reader(self._master)
            return
        if data:
            # The client has configured the port by now; make its next configuration a change.
            _park(self._slave)
            on_data(data)

    def write(self, data: bytes) -> None:
        """Hand ``data`` to the client side now; drop what does not fit (nobody is reading)."""
        if not self.is_open:
            return
        try:
            written = os.write(self._master, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            written = 0
        if written < len(data):
            # The pty's input queue is full because no client drains it: like a line nobody
            # listens to, the bytes are lost.
            log.debug("pty full, bytes dropped", port=self.name, dropped=len(data) - written)

    def close(self) -> None:
        """Close both ends and remove the symlink if it still points at this pty (idempotent)."""
        if self._master >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self._master)
            os.close(self._master)
            os.close(self._slave)
            self._master = self._slave = -1
        if self.link is not None and self.path:
            with contextlib.suppress(OSError):
                if os.readlink(self.link) == self.path:
                    self.link.unlink()


def _park(fd: int) -> None:
    """Set the pty's nominal speed to :data:`PARK_SPEED` (see the module docstring)."""
    try:
        attrs = termios.tcgetattr(fd)
        if attrs[4] != PARK_SPEED or attrs[5] != PARK_SPEED:
            attrs[4] = attrs[5] = PARK_SPEED
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
    except termios.error as exc:
        log.debug("cannot park pty speed", error=str(exc))


def _replace_symlink(link: Path, target: str) -> None:
    # A symlink left behind by a killed run is replaced; anything else at that path is refused.
    if link.exists() and not link.is_symlink():
        raise FileExistsError(errno.EEXIST, "exists and is not a symlink", str(link))
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


async def sleep_until(when: float) -> None:
    """Sleep until the event loop's clock reads ``when`` (return at once if it has passed)."""
    loop = asyncio.get_running_loop()
    delay = when - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


class Transmitter:
    """Writes frames to a pty no faster than the emulated line could carry them."""

    def __init__(self, port: PtyPort, *, timing: bool) -> None:
        self.port = port
        self.timing = timing
        self.free_at = 0.0
        """Loop time at which the last frame's last byte was (or will be) on the wire."""

    async def send(self, data: bytes, *, earliest: float, line: LineSettings,
                   chunk_interval: float | None = None) -> None:
        """Transmit ``data`` starting no earlier than loop time ``earliest``.

        With ``chunk_interval`` None the whole frame is written at once when its last byte would
        have arrived: clients that find frame ends by silence then never see a gap inside a
        frame. Otherwise bytes are written in chunks of about ``chunk_interval`` seconds, each
        when its last byte would have arrived (slow lines, where a whole block takes seconds).
        """
        if not data:
            return
        if not self.timing:
            self.port.write(data)
            return
        start = max(earliest, self.free_at)
        self.free_at = start + line.wire_time(len(data))
        if chunk_interval is None:
            await sleep_until(self.free_at)
            self.port.write(data)
            return
        per_chunk = max(1, math.floor(chunk_interval / line.char_time))
        for offset in range(0, len(data), per_chunk):
            chunk = data[offset : offset + per_chunk]
            await sleep_until(start + line.wire_time(offset + len(chunk)))
            self.port.write(chunk)
