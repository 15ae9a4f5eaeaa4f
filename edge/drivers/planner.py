"""Request planning: cover a device's points with as few Modbus reads as possible.

Points in the same table whose addresses are adjacent, or separated by at most ``max_gap``
unused registers, share one request, as long as the request stays within the device's
``max_registers_per_request`` (125 is the Modbus limit for registers, 2000 for coils). Fewer
requests matter: on RS-485 each one costs a turnaround, and on TCP a round trip.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.profile import Point

MAX_BITS_PER_REQUEST = 2000


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One read of ``count`` consecutive registers (or bits) starting at ``address``."""

    table: str
    address: int
    count: int
    points: tuple[Point, ...]

    def slice_for(self, point: Point, words: list[int]) -> list[int]:
        """The part of this request's answer that belongs to ``point``."""
        start = point.address - self.address
        return words[start : start + point.registers]


def plan_requests(points: list[Point], max_registers: int = 125, max_gap: int = 8) -> list[ReadRequest]:
    """Group ``points`` into read requests; every point ends up in exactly one request."""
    requests: list[ReadRequest] = []
    by_table: dict[str, list[Point]] = {}
    for p in points:
        by_table.setdefault(p.table, []).append(p)
    for table in sorted(by_table):
        limit = MAX_BITS_PER_REQUEST if table in ("coil", "discrete") else max_registers
        group: list[Point] = []
        start = end = 0
        for p in sorted(by_table[table], key=lambda q: (q.address, q.registers)):
            p_end = p.address + p.registers
            if p.registers > limit:
                raise ValueError(f"point {p.name!r} ({p.registers} registers) exceeds the request limit {limit}")
            if group and p.address - end <= max_gap and max(end, p_end) - start <= limit:
                group.append(p)
                end = max(end, p_end)
                continue
            if group:
                requests.append(ReadRequest(table, start, end - start, tuple(group)))
            group, start, end = [p], p.address, p_end
        if group:
            requests.append(ReadRequest(table, start, end - start, tuple(group)))
    return requests
