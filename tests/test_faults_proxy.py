"""The fault-injection proxy (fleet/proxy.py) against a plain TCP echo server: it forwards, and its
faults are the ones the fault tests rely on (RST on cut, refusal, black hole that resumes, a cut
after an exact number of bytes)."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from fleet.proxy import TcpProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        received = bytearray()
        self.server.received.append(received)  # type: ignore[attr-defined]
        try:
            while data := self.request.recv(65536):
                received.extend(data)
                self.request.sendall(data)
        except OSError as exc:
            self.server.errors.append(exc)  # type: ignore[attr-defined]


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.received: list[bytearray] = []
        self.errors: list[OSError] = []

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[TcpProxy]:
    with TcpProxy(echo.port) as p:
        yield p


def connect(proxy: TcpProxy, timeout: float = 2.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    return s


def roundtrip(s: socket.socket, data: bytes) -> bytes:
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_forwards_both_ways(proxy: TcpProxy) -> None:
    with connect(proxy) as s:
        assert roundtrip(s, b"hello") == b"hello"
        big = bytes(range(256)) * 4096  # 1 MiB through bounded buffers, both ways at once
        sender = threading.Thread(target=s.sendall, args=(big,))
        sender.start()
        got = bytearray()
        while len(got) < len(big):
            chunk = s.recv(65536)
            assert chunk
            got += chunk
        sender.join()
        assert got == big
    st = proxy.stats()
    assert st.accepted == 1 and st.bytes_up == st.bytes_down == 5 + len(big)


def test_cut_resets_both_sides(proxy: TcpProxy, echo: EchoServer) -> None:
    with connect(proxy) as s:
        assert roundtrip(s, b"x") == b"x"
        assert proxy.cut() == 1
        with pytest.raises(ConnectionResetError):
            for _ in range(50):  # the RST may take a moment to arrive
                s.sendall(b"y")
                if s.recv(1) == b"":
                    raise AssertionError("orderly FIN instead of RST")
                time.sleep(0.01)
    deadline = time.monotonic() + 2
    while not echo.errors and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any(isinstance(e, ConnectionResetError) for e in echo.errors), echo.errors
    assert proxy.stats().cut == 1


def test_block_refuses_then_unblock(proxy: TcpProxy) -> None:
    with connect(proxy) as s:
        assert roundtrip(s, b"a") == b"a"
        proxy.block()  # cuts the open connection too
        with pytest.raises(ConnectionResetError):
            s.sendall(b"b")
            s.recv(1)
            s.sendall(b"c")
            s.recv(1)
    # Reset at connect already, or at the first read.
    with pytest.raises(ConnectionResetError), connect(proxy) as s2:
        s2.sendall(b"hello")
        s2.recv(1)
    proxy.unblock()
    with connect(proxy) as s3:
        assert roundtrip(s3, b"again") == b"again"
    assert proxy.stats().refused >= 1


def test_blackhole_stalls_and_resumes(proxy: TcpProxy, echo: EchoServer) -> None:
    with connect(proxy, timeout=0.5) as s:
        assert roundtrip(s, b"before") == b"before"
        proxy.block("blackhole")
        s.sendall(b"during")
        with pytest.raises(TimeoutError):
            s.recv(1)
        fresh = connect(proxy, timeout=0.5)
        fresh.sendall(b"new")
        with pytest.raises(TimeoutError):
            fresh.recv(1)
        assert bytes(echo.received[0]) == b"before"
        proxy.unblock()
        s.settimeout(2)
        fresh.settimeout(2)
        assert s.recv(64) == b"during"
        assert fresh.recv(64) == b"new"
        fresh.close()


def test_drop_after_bytes_forwards_exactly_n(proxy: TcpProxy, echo: EchoServer) -> None:
    with connect(proxy) as s:
        assert roundtrip(s, b"12345") == b"12345"
        proxy.drop_after_bytes(10)
        assert proxy.drop_armed
        s.sendall(b"abcdefghijKLMNOPQRST")
        time.sleep(0.3)
        with pytest.raises(ConnectionResetError):
            for _ in range(3):
                s.recv(64)
                s.sendall(b"z")
    assert bytes(echo.received[0]) == b"12345abcdefghij"
    assert not proxy.drop_armed  # one shot
    with connect(proxy) as s2:
        assert roundtrip(s2, b"x" * 100) == b"x" * 100
    assert proxy.stats().dropped_after_bytes == 1


def test_target_down_resets_client() -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    with TcpProxy(port) as p, pytest.raises(ConnectionResetError), connect(p) as s:
        s.sendall(b"x")
        s.recv(1)
        s.sendall(b"x")
        s.recv(1)


def test_latency_delays_without_serialising(proxy: TcpProxy) -> None:
    with connect(proxy) as s:
        assert roundtrip(s, b"warm") == b"warm"
        proxy.set_latency(downstream_s=0.3)
        t0 = time.monotonic()
        for i in range(3):  # three chunks 0.1 s apart each arrive 0.3 s late, not 0.9 s
            s.sendall(b"%d" % i)
            time.sleep(0.1)
        got = b""
        while len(got) < 3:
            got += s.recv(16)
        elapsed = time.monotonic() - t0
        assert got == b"012"
        assert 0.5 <= elapsed < 0.9, elapsed
        proxy.set_latency()
        t0 = time.monotonic()
        assert roundtrip(s, b"fast") == b"fast"
        assert time.monotonic() - t0 < 0.2
