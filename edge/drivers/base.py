"""What every field driver offers the poller."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from protocol.schema import Value


@dataclass(frozen=True, slots=True)
class PointResult:
    """The outcome for one point of one poll: a value, or the reason there is none."""

    name: str
    value: Value
    error: str | None = None
    """Short machine-friendly reason (``timeout``, ``exception-2``, ``decode``, ...) when there is no value."""


class DeviceError(Exception):
    """The whole device could not be read (not connected, connection refused, silent, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class Driver(Protocol):
    """A connection to one field device."""

    units: dict[str, str]
    """Unit of every metric this driver delivers."""

    async def read(self, metrics: Collection[str] | None = None) -> list[PointResult]:
        """Read ``metrics`` (default: all) once. Raises :class:`DeviceError` when nothing could be
        read; a partial failure comes back as results with ``error`` set."""
        ...

    async def write(self, point: str, value: float) -> Value:
        """Write ``value`` (engineering units) to the writable ``point``, read it back and return
        what the device now holds. Raises :class:`DeviceError` (``kind`` ``not-writable`` when the
        driver or the point cannot be written, else why the write failed: ``timeout``,
        ``exception-3``, ``connect``, ...). Range checks are the caller's (the command guard)."""
        ...

    async def close(self) -> None:
        """Release the connection."""
        ...
