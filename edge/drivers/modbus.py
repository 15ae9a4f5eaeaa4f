"""Modbus driver (TCP today; RTU shares everything but the transport).

Reads a device's points with the fewest requests (:mod:`edge.drivers.planner`) and decodes
them with the device profile. A failed request only affects its own points; the rest of the
poll still yields values.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from edge.drivers.base import DeviceError, PointResult
from edge.drivers.planner import ReadRequest, plan_requests
from protocol import codec
from protocol.profile import DeviceProfile, Point


class ModbusDriver:
    """One Modbus device reached through a pymodbus async client."""

    def __init__(self, client: Any, unit_id: int, profile: DeviceProfile,
                 point_names: list[str] | None = None) -> None:
        self._client = client
        self._unit = unit_id
        self.profile = profile
        wanted = set(point_names) if point_names else None
        points = [p for p in profile.points if wanted is None or p.name in wanted]
        self.requests: list[ReadRequest] = plan_requests(
            points, profile.profile.max_registers_per_request, profile.profile.max_gap)
        self._readers: dict[str, Callable[..., Awaitable[Any]]] = {
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
        }

    @classmethod
    def tcp(cls, host: str, port: int, unit_id: int, profile: DeviceProfile, timeout_s: float,
            point_names: list[str] | None = None) -> ModbusDriver:
        """A driver for a Modbus TCP device."""
        # reconnect_delay=0: pymodbus must not reconnect on its own in the background; the
        # poller owns the retry schedule (exponential back-off per device).
        client = AsyncModbusTcpClient(host, port=port, timeout=timeout_s, retries=0, reconnect_delay=0)
        return cls(client, unit_id, profile, point_names)

    async def _ensure_connected(self) -> None:
        if self._client.connected:
            return
        try:
            ok = await self._client.connect()
        except (OSError, ModbusException) as exc:
            raise DeviceError("connect", f"cannot connect: {exc}") from exc
        if not ok:
            raise DeviceError("connect", "cannot connect")

    async def read(self) -> list[PointResult]:
        """Read all planned requests; see :meth:`edge.drivers.base.Driver.read`."""
        await self._ensure_connected()
        results: list[PointResult] = []
        failures = 0
        for req in self.requests:
            try:
                words = await self._execute(req)
            except _RequestFailed as exc:
                failures += 1
                results.extend(PointResult(p.name, None, exc.kind) for p in req.points)
                if exc.kind == "disconnected":
                    # The link is gone: the remaining requests would only wait out their timeouts.
                    for rest in self.requests[self.requests.index(req) + 1:]:
                        results.extend(PointResult(p.name, None, "disconnected") for p in rest.points)
                    raise DeviceError("disconnected", "connection lost during poll") from None
                continue
            results.extend(self._decode(req, p, words) for p in req.points)
        if failures == len(self.requests) and all(r.error == "timeout" for r in results):
            raise DeviceError("timeout", "no answer to any request")
        return results

    async def _execute(self, req: ReadRequest) -> list[int]:
        try:
            rr = await self._readers[req.table](req.address, count=req.count, device_id=self._unit)
        except ConnectionException as exc:
            raise _RequestFailed("disconnected") from exc
        except ModbusIOException as exc:
            raise _RequestFailed("timeout") from exc
        except ModbusException as exc:
            raise _RequestFailed("protocol") from exc
        if rr.isError():
            # Modbus exception response: 1 illegal function, 2 illegal address, 3 illegal value,
            # 4 device failure, 6 busy, ...
            raise _RequestFailed(f"exception-{getattr(rr, 'exception_code', 0)}")
        if req.table in ("coil", "discrete"):
            return [int(b) for b in rr.bits[: req.count]]
        words: list[int] = list(rr.registers)
        if len(words) < req.count:
            raise _RequestFailed("short-frame")
        return words

    @staticmethod
    def _decode(req: ReadRequest, point: Point, words: list[int]) -> PointResult:
        if req.table in ("coil", "discrete"):
            return PointResult(point.name, bool(words[point.address - req.address]))
        try:
            return PointResult(point.name, codec.decode(point, req.slice_for(point, words)))
        except codec.DecodeError:
            return PointResult(point.name, None, "decode")

    async def close(self) -> None:
        """Close the connection."""
        self._client.close()


class _RequestFailed(Exception):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        super().__init__(kind)
