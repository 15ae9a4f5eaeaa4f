"""Modbus driver, over TCP or RTU (serial).

Reads a device's points with the fewest requests (:mod:`edge.drivers.planner`) and decodes
them with the device profile. A failed request only affects its own points; the rest of the
poll still yields values. Devices on one RS-485 bus share a :class:`ModbusLink`, which sends
one request at a time and keeps the inter-frame silence the RTU specification demands.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from edge.drivers.base import DeviceError, PointResult
from edge.drivers.planner import ReadRequest, plan_requests
from protocol import codec
from protocol.profile import DeviceProfile, Point
from protocol.schema import Value


class ModbusLink:
    """One pymodbus client (a TCP connection or a serial port) and the turn-taking on it."""

    def __init__(self, client: Any, inter_frame_s: float = 0.0) -> None:
        self.client = client
        self.inter_frame_s = inter_frame_s
        self._turn = asyncio.Lock()
        self._last_frame_end = 0.0
        self._users = 0
        self._connect_lock = asyncio.Lock()

    @classmethod
    def tcp(cls, host: str, port: int, timeout_s: float) -> ModbusLink:
        """A link to one Modbus TCP device."""
        # reconnect_delay=0: pymodbus must not reconnect on its own in the background; the
        # poller owns the retry schedule (exponential back-off per device).
        return cls(AsyncModbusTcpClient(host, port=port, timeout=timeout_s, retries=0, reconnect_delay=0))

    @classmethod
    def rtu(cls, device: str, baudrate: int, parity: str, stopbits: int, bytesize: int, timeout_s: float,
            inter_frame_s: float) -> ModbusLink:
        """A link to an RS-485 bus; share it between the devices on that bus."""
        client = AsyncModbusSerialClient(device, framer=FramerType.RTU, baudrate=baudrate, parity=parity,
                                         stopbits=stopbits, bytesize=bytesize, timeout=timeout_s, retries=0,
                                         reconnect_delay=0)
        return cls(client, inter_frame_s)

    def acquire(self) -> ModbusLink:
        """Register one more device using this link."""
        self._users += 1
        return self

    async def ensure_connected(self) -> None:
        """Connect if needed; :class:`DeviceError` if that fails."""
        async with self._connect_lock:
            if self.client.connected:
                return
            try:
                ok = await self.client.connect()
            except (OSError, ModbusException) as exc:
                raise DeviceError("connect", f"cannot connect: {exc}") from exc
            if not ok:
                raise DeviceError("connect", "cannot connect")

    async def execute(self, call: Callable[..., Awaitable[Any]], *args: Any, **kw: Any) -> Any:
        """Run one request when it is our turn on the line."""
        async with self._turn:
            # Keep the bus silent for the inter-frame time after the previous answer, or a
            # slow device may merge our request into the tail of the last frame.
            wait = self._last_frame_end + self.inter_frame_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                return await call(*args, **kw)
            finally:
                self._last_frame_end = time.monotonic()

    async def release(self) -> None:
        """One device stopped using the link; the last one closes it."""
        self._users -= 1
        if self._users <= 0:
            self.client.close()


class ModbusDriver:
    """One Modbus device (unit id) reached through a :class:`ModbusLink`."""

    def __init__(self, link: ModbusLink, unit_id: int, profile: DeviceProfile,
                 point_names: Collection[str] | None = None) -> None:
        self.link = link.acquire()
        self.unit = unit_id
        self.profile = profile
        wanted = set(point_names) if point_names else None
        self.points = {p.name: p for p in profile.points if wanted is None or p.name in wanted}
        self.units = {name: p.unit for name, p in self.points.items()}
        self._plans: dict[frozenset[str], list[ReadRequest]] = {}
        client = link.client
        self._readers: dict[str, Callable[..., Awaitable[Any]]] = {
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
        }

    def plan(self, metrics: Collection[str] | None = None) -> list[ReadRequest]:
        """The requests that read ``metrics`` (all points by default); cached per set of points."""
        key = frozenset(self.points) if metrics is None else frozenset(metrics) & frozenset(self.points)
        plan = self._plans.get(key)
        if plan is None:
            info = self.profile.profile
            plan = self._plans[key] = plan_requests([self.points[n] for n in sorted(key)],
                                                    info.max_registers_per_request, info.max_gap)
        return plan

    async def read(self, metrics: Collection[str] | None = None) -> list[PointResult]:
        """Read the planned requests; see :meth:`edge.drivers.base.Driver.read`."""
        await self.link.ensure_connected()
        requests = self.plan(metrics)
        results: list[PointResult] = []
        failures: list[str] = []
        for i, req in enumerate(requests):
            try:
                words = await self._execute(req)
            except _RequestFailed as exc:
                failures.append(exc.kind)
                results.extend(PointResult(p.name, None, exc.kind) for p in req.points)
                if exc.kind == "disconnected":
                    # The link is gone: the remaining requests would only wait out their timeouts.
                    for rest in requests[i + 1:]:
                        results.extend(PointResult(p.name, None, "disconnected") for p in rest.points)
                    raise DeviceError("disconnected", "connection lost during poll") from None
                if exc.kind == "timeout" and len(requests) > 1 and i == 0:
                    # A device that does not answer the first request will not answer the next
                    # ones either; on a shared bus every further timeout steals the others' time.
                    raise DeviceError("timeout", "no answer") from None
                continue
            results.extend(self._decode(req, p, words) for p in req.points)
        if requests and len(failures) == len(requests) and all(f == "timeout" for f in failures):
            raise DeviceError("timeout", "no answer to any request")
        return results

    async def _request(self, call: Callable[..., Awaitable[Any]], *args: Any, **kw: Any) -> Any:
        """One request on the link; :class:`_RequestFailed` with a short kind when it fails."""
        try:
            rr = await self.link.execute(call, *args, device_id=self.unit, **kw)
        except ConnectionException as exc:
            raise _RequestFailed("disconnected") from exc
        except ModbusIOException as exc:
            # pymodbus drops frames that fail their CRC or cannot be parsed and then times out;
            # it reports both as an I/O error without saying which.
            raise _RequestFailed("timeout") from exc
        except ModbusException as exc:
            raise _RequestFailed("protocol") from exc
        if rr.isError():
            # Modbus exception response: 1 illegal function, 2 illegal address, 3 illegal value,
            # 4 device failure, 6 busy, ...
            raise _RequestFailed(f"exception-{getattr(rr, 'exception_code', 0)}")
        return rr

    async def _execute(self, req: ReadRequest) -> list[int]:
        rr = await self._request(self._readers[req.table], req.address, count=req.count)
        if req.table in ("coil", "discrete"):
            bits = list(rr.bits)
            if len(bits) < req.count:
                raise _RequestFailed("short-frame")
            return [int(b) for b in bits[: req.count]]
        words: list[int] = list(rr.registers)
        if len(words) != req.count:
            raise _RequestFailed("short-frame")
        return words

    async def write(self, point: str, value: float) -> Value:
        """Write one setpoint and read it back; see :meth:`edge.drivers.base.Driver.write`.

        A holding-register point of one register goes out as function code 6 (write single
        register), a wider one as 16 (write multiple registers) so that its words change together;
        a coil as 5. Any point of the profile may be written, polled or not.
        """
        try:
            p = self.profile.point(point)
        except KeyError:
            raise DeviceError("not-writable", f"profile {self.profile.name!r} has no point {point!r}") from None
        if not p.writable or p.table not in ("holding", "coil"):
            raise DeviceError("not-writable", f"point {point!r} of profile {self.profile.name!r} is not writable")
        try:
            words = codec.encode(p, value)
        except (OverflowError, ValueError, struct.error) as exc:
            raise DeviceError("encode", f"{point}: {value!r} cannot be encoded as {p.type}: {exc}") from None
        client = self.link.client
        arg: bool | int | list[int]
        if p.table == "coil":
            call, arg = client.write_coil, bool(words[0])
        elif len(words) == 1:
            call, arg = client.write_register, words[0]
        else:
            call, arg = client.write_registers, words
        await self.link.ensure_connected()
        try:
            await self._request(call, p.address, arg)
        except _RequestFailed as exc:
            raise DeviceError(exc.kind, f"write of {point} failed: {exc.kind}") from None
        # Read back what the device now holds: it may clamp, round or ignore a value and still
        # acknowledge the write.
        req = plan_requests([p])[0]
        try:
            got = self._decode(req, p, await self._execute(req))
        except _RequestFailed as exc:
            raise DeviceError(f"readback-{exc.kind}", f"{point} written, reading it back failed: {exc.kind}") from None
        if got.error is not None:
            raise DeviceError(f"readback-{got.error}", f"{point} written, reading it back failed: {got.error}")
        return got.value

    @staticmethod
    def _decode(req: ReadRequest, point: Point, words: list[int]) -> PointResult:
        if req.table in ("coil", "discrete"):
            return PointResult(point.name, bool(words[point.address - req.address]))
        try:
            return PointResult(point.name, codec.decode(point, req.slice_for(point, words)))
        except codec.DecodeError:
            return PointResult(point.name, None, "decode")

    async def close(self) -> None:
        """Stop using the link (closed when its last device closes)."""
        await self.link.release()


class _RequestFailed(Exception):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        super().__init__(kind)
