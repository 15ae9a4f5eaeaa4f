"""What every field driver offers the poller."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from protocol.schema import Value


@dataclass(frozen=True, slots=True)
class PointResult:
    """The outcome for one point of one poll: a value, or the reason there is none."""

    name: str
    value: Value
    error: str | None = None
    """Short machine-friendly reason (``timeout``, ``exception-2``, ``decode``, ...) when ``value`` is None."""


class DeviceError(Exception):
    """The whole device could not be read (not connected, connection refused, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class Driver(Protocol):
    """A connection to one field device."""

    async def read(self) -> list[PointResult]:
        """Read every configured point once. Raises :class:`DeviceError` when nothing could be read;
        a partial failure comes back as results with ``error`` set."""
        ...

    async def close(self) -> None:
        """Release the connection."""
        ...
