"""A TCP proxy on loopback for fault injection: put it between a client (the edge agent) and a
server (Mosquitto) and break the network on demand.

The proxy runs its own asyncio event loop in a daemon thread, so the same object serves a
test's event loop and a plain-threaded benchmark; every control method is thread-safe and
returns once the proxy has applied it::

    with TcpProxy(target_port=broker.port) as proxy:   # listens on proxy.port
        ...  # point the edge at proxy.port
        proxy.cut()                  # reset every open connection (RST), mid-stream
        proxy.block()                # refuse new connections (accepted, then reset at once)
        proxy.block("blackhole")     # stall everything: no byte forwarded, no answer, no error
        proxy.unblock()              # back to normal; stalled connections resume
        proxy.drop_after_bytes(5000) # reset the next connection after 5000 more client bytes

Faults:

* :meth:`cut` aborts both sides of every open connection with ``SO_LINGER`` 0, so the peers
  get a TCP RST, not an orderly FIN: bytes in flight are lost, as when a link dies.
* :meth:`block` ``"refuse"`` resets every new connection as soon as it is accepted (the client
  sees its connect succeed and then ``Connection reset``; a closed port would be indistinguishable
  to MQTT). Open connections are cut too unless ``cut_open=False``.
  ``"blackhole"`` keeps accepting but forwards nothing in either direction, for open and new
  connections alike, like a partition where packets vanish: clients notice only through their
  own timeouts (MQTT keep-alive, publish timeout). :meth:`unblock` lets stalled connections
  resume where they stopped, as after a short partition heals.
* :meth:`drop_after_bytes` forwards exactly ``n`` more client→server bytes on a connection
  (possibly part of an MQTT packet) and then resets it: a cut in the middle of a publish.

Bounded: each direction holds at most a few read chunks (``chunk_bytes``) plus the transport's
write buffer (the writer waits for it to drain); a stalled connection is not read at
all, so the kernel's socket buffers absorb what the client keeps sending and then TCP's flow
control stops it. At most ``max_connections`` connections are open; more are reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar

T = TypeVar("T")
BlockMode = Literal["refuse", "blackhole"]
_QUEUE_CHUNKS = 4
"""Chunks read ahead per direction (bounds memory; with a latency, bounds its bandwidth)."""


@dataclass
class ProxyStats:
    """Counters since the proxy started (a snapshot; see :meth:`TcpProxy.stats`)."""

    accepted: int = 0
    """Connections accepted and forwarded to the target."""
    refused: int = 0
    """Connections reset at once (blocked in ``refuse`` mode, target down, over the limit)."""
    cut: int = 0
    """Open connections reset by :meth:`TcpProxy.cut`, by ``refuse`` blocking or by a byte limit."""
    dropped_after_bytes: int = 0
    """Of those, connections reset by a :meth:`TcpProxy.drop_after_bytes` limit."""
    bytes_up: int = 0
    """Client → target bytes forwarded."""
    bytes_down: int = 0
    """Target → client bytes forwarded."""
    open: int = 0
    """Connections open now."""


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection abruptly: RST instead of FIN, unsent data discarded."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Conn:
    """One proxied connection: a client side and a target side, two pumps."""

    def __init__(self, proxy: TcpProxy, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter,
                 t_reader: asyncio.StreamReader, t_writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.c_reader, self.c_writer = c_reader, c_writer
        self.t_reader, self.t_writer = t_reader, t_writer
        self.budget: int | None = None  # client→target bytes still allowed before a reset
        self.closed = False
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        if not self.closed:
            self.closed = True
            _reset(self.c_writer)
            _reset(self.t_writer)

    def close(self) -> None:
        """Orderly close after one side closed its end."""
        if not self.closed:
            self.closed = True
            for w in (self.c_writer, self.t_writer):
                with contextlib.suppress(Exception):
                    w.close()

    async def pump(self, upstream: bool) -> None:
        """Forward one direction: a reader and a writer joined by a small bounded queue, so a
        latency delays every chunk by the same amount without serialising them."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=_QUEUE_CHUNKS)
        reader = asyncio.create_task(self._read(upstream, queue))
        try:
            await self._write(upstream, queue)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            self.close()

    async def _read(self, upstream: bool, queue: asyncio.Queue[tuple[float, bytes] | None]) -> None:
        reader = self.c_reader if upstream else self.t_reader
        p = self.proxy
        loop = asyncio.get_running_loop()
        try:
            while not self.closed:
                await p._flowing.wait()  # a black hole: stop reading, let TCP push back
                data = await reader.read(p.chunk_bytes)
                if not data:
                    break
                delay = p._latency[0 if upstream else 1]
                await queue.put((loop.time() + delay, data))
        except (ConnectionError, OSError):
            pass
        await queue.put(None)

    async def _write(self, upstream: bool, queue: asyncio.Queue[tuple[float, bytes] | None]) -> None:
        writer = self.t_writer if upstream else self.c_writer
        p = self.proxy
        loop = asyncio.get_running_loop()
        try:
            while not self.closed:
                item = await queue.get()
                if item is None:
                    break
                due, data = item
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                await p._flowing.wait()  # blocked while this chunk was on its way
                if self.closed:
                    break
                if upstream and self.budget is not None and len(data) >= self.budget:
                    writer.write(data[:self.budget])
                    p._stats.bytes_up += self.budget
                    with contextlib.suppress(ConnectionError):
                        await writer.drain()
                    p._dropped(self)
                    return
                writer.write(data)
                if upstream:
                    p._stats.bytes_up += len(data)
                    if self.budget is not None:
                        self.budget -= len(data)
                else:
                    p._stats.bytes_down += len(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass


class TcpProxy:
    """A fault-injecting TCP proxy ``host:port`` → ``target_host:target_port`` in its own thread."""

    def __init__(self, target_port: int, port: int = 0, host: str = "127.0.0.1",
                 target_host: str = "127.0.0.1", chunk_bytes: int = 65536, max_connections: int = 64,
                 connect_timeout_s: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.target_host = target_host
        self.target_port = target_port
        self.chunk_bytes = chunk_bytes
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self._stats = ProxyStats()
        self._conns: set[_Conn] = set()
        self._mode: BlockMode | None = None
        self._latency = (0.0, 0.0)
        self._drop_new: int | None = None
        self._drop_every = False
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event  # set unless black-holed; created on the proxy's loop
        self._stopped: asyncio.Event

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> TcpProxy:
        """Start the thread and listen; returns once connections are accepted on :attr:`port`."""
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve(started))
            except BaseException as exc:
                failure.append(exc)
                started.set()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=main, name=f"tcp-proxy-{self.target_port}", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise TimeoutError(f"proxy to port {self.target_port} did not start within {timeout}s")
        if failure:
            self._thread.join()
            self._thread = None
            raise RuntimeError(f"proxy could not listen on {self.host}:{self.port}: {failure[0]}") from failure[0]
        return self

    async def _serve(self, started: threading.Event) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  limit=self.chunk_bytes, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        started.set()
        try:
            await self._stopped.wait()
        finally:
            self._closing = True
            self._server.close()
            self._flowing.set()  # wake connections waiting in a black hole so they end
            for c in list(self._conns):
                c.reset()
            for t in list(self._handlers):
                t.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

    def stop(self) -> None:
        """Reset every connection, stop listening and end the thread."""
        if self._thread is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- controls (thread-safe) ------------------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the proxy's loop and return its result (directly if already on it)."""
        loop = self._loop
        if loop is None or self._thread is None:
            raise RuntimeError("proxy is not running")
        if threading.current_thread() is self._thread:
            return fn()

        async def run() -> T:
            return fn()

        coro: Coroutine[Any, Any, T] = run()
        return asyncio.run_coroutine_threadsafe(coro, loop).result(10)

    def cut(self) -> int:
        """Reset every open connection now (RST both ways); returns how many were open."""
        def do() -> int:
            n = 0
            for c in list(self._conns):
                if not c.closed:
                    c.reset()
                    n += 1
            self._stats.cut += n
            return n
        return self._call(do)

    def block(self, mode: BlockMode = "refuse", cut_open: bool = True) -> None:
        """Start an outage. ``refuse``: reset new connections (and, with ``cut_open``, the open
        ones). ``blackhole``: forward nothing, answer nothing, for open and new connections."""
        if mode not in ("refuse", "blackhole"):
            raise ValueError(f"unknown block mode {mode!r}")

        def do() -> None:
            self._mode = mode
            if mode == "blackhole":
                self._flowing.clear()
            else:
                self._flowing.set()
                if cut_open:
                    for c in list(self._conns):
                        if not c.closed:
                            c.reset()
                            self._stats.cut += 1
        self._call(do)

    def unblock(self) -> None:
        """End the outage: accept and forward again; black-holed connections resume."""
        def do() -> None:
            self._mode = None
            self._flowing.set()
        self._call(do)

    @property
    def blocked(self) -> BlockMode | None:
        """The current outage mode, or None."""
        return self._mode

    def drop_after_bytes(self, n: int | None, every: bool = False) -> None:
        """Reset a connection once it forwarded ``n`` more client→server bytes.

        One-shot: the first connection (open now or opened later) to forward ``n`` more bytes is
        reset and the limit is disarmed. With ``every``, each connection, open and future, is
        reset after ``n`` bytes (counted from now, or from its start) until this is called
        again. ``None`` disarms it.
        """
        if n is not None and n < 0:
            raise ValueError("n must be >= 0")

        def do() -> None:
            for c in self._conns:
                c.budget = n
            self._drop_new = n
            self._drop_every = every
        self._call(do)

    @property
    def drop_armed(self) -> bool:
        """True while a :meth:`drop_after_bytes` limit waits to fire."""
        return self._drop_new is not None

    def _dropped(self, conn: _Conn) -> None:
        self._stats.dropped_after_bytes += 1
        self._stats.cut += 1
        conn.reset()
        if not self._drop_every:
            self._drop_new = None
            for c in self._conns:
                c.budget = None

    def set_latency(self, upstream_s: float = 0.0, downstream_s: float = 0.0) -> None:
        """Delay every chunk client→server by ``upstream_s`` and server→client by
        ``downstream_s`` (a slow link; e.g. a late PUBACK widens the window in which a crash
        leaves a delivered message unacknowledged)."""
        if upstream_s < 0 or downstream_s < 0:
            raise ValueError("latency must be >= 0")

        def do() -> None:
            self._latency = (upstream_s, downstream_s)
        self._call(do)

    def stats(self) -> ProxyStats:
        """A copy of the counters."""
        def do() -> ProxyStats:
            self._stats.open = sum(1 for c in self._conns if not c.closed)
            return ProxyStats(**vars(self._stats))
        return self._call(do)

    # -- connections -----------------------------------------------------------------------

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        if self._closing or self._mode == "refuse" or len(self._handlers) >= self.max_connections:
            self._stats.refused += 1
            _reset(c_writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._connect(c_reader, c_writer)
        except asyncio.CancelledError:
            # Only stop() cancels a connection's task; it is the top of its task, so ending
            # quietly is right (asyncio would log the cancellation as an error).
            _reset(c_writer)
        finally:
            self._handlers.discard(task)

    async def _connect(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            await self._flowing.wait()  # a black hole: the client waits for an answer that never comes
            if self._closing:
                raise OSError("proxy stopping")
            t_reader, t_writer = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port, limit=self.chunk_bytes),
                self.connect_timeout_s)
        except (OSError, TimeoutError):
            self._stats.refused += 1
            _reset(c_writer)
            return
        except asyncio.CancelledError:
            _reset(c_writer)
            raise
        if self._closing or self._mode == "refuse":  # blocked while connecting
            self._stats.refused += 1
            _reset(c_writer)
            _reset(t_writer)
            return
        conn = _Conn(self, c_reader, c_writer, t_reader, t_writer)
        conn.budget = self._drop_new
        self._conns.add(conn)
        self._stats.accepted += 1
        conn.tasks = [asyncio.create_task(conn.pump(True)), asyncio.create_task(conn.pump(False))]
        try:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            conn.close()
            self._conns.discard(conn)
