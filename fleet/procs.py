"""Child processes that announce readiness with a JSON line on stdout.

Every long-running program of the project (``twin-sim``, ``twin-edge run``, ``twin-hub run``)
prints one ``{"event": "ready", ...}`` line once it is serving. Launchers (the demo, tests,
benchmarks) wait for that line instead of sleeping and hoping.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any


class ProcessFailed(RuntimeError):
    """A child exited or stayed silent before it was ready."""


class ReadyProcess:
    """A child process started with :meth:`start`, ready once it printed its ready line."""

    def __init__(self, name: str, argv: list[str], log_path: Path | None = None,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}
        self._log: IO[bytes] | None = None
        self._pump: threading.Thread | None = None

    @classmethod
    def python(cls, name: str, module: str, *args: str, **kw: Any) -> ReadyProcess:
        """A ``python -m module args`` child using this interpreter."""
        return cls(name, [sys.executable, "-m", module, *args], **kw)

    def start(self, timeout: float = 30.0) -> ReadyProcess:
        """Start and wait for the ready line; raises :class:`ProcessFailed` with the log tail."""
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        env = {**os.environ, **(self.env or {})}
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                     stderr=self._log or subprocess.DEVNULL, env=env, cwd=self.cwd)
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        buf = b""
        try:
            while time.monotonic() < deadline:
                if not sel.select(timeout=0.1):
                    if self.proc.poll() is not None:
                        break
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if self._log:
                        self._log.write(line + b"\n")
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(msg, dict) and msg.get("event") == "ready":
                        self.ready = msg
                        self._pump = threading.Thread(target=self._drain_stdout, daemon=True)
                        self._pump.start()
                        return self
        finally:
            sel.close()
        code = self.proc.poll()
        self.stop()
        raise ProcessFailed(f"{self.name} {'exited with ' + str(code) if code is not None else 'timed out'} "
                            f"before it was ready; log:\n{self.log_tail()}")

    def _drain_stdout(self) -> None:
        # Keep reading so the child never blocks on a full pipe.
        assert self.proc is not None and self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            if self._log and not self._log.closed:
                self._log.write(line)
                self._log.flush()

    def log_tail(self, n: int = 4000) -> str:
        """The end of the child's log (stderr and stdout)."""
        if self._log and not self._log.closed:
            self._log.flush()
        if self.log_path and self.log_path.exists():
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        return "(no log)"

    @property
    def pid(self) -> int:
        """Process id of the running child."""
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        """True while the child runs."""
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send a signal if the child is still running."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s for exit; returns the exit code or None."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 8.0) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                self.proc.kill()
                self.proc.wait()
        if self._pump:
            self._pump.join(timeout=2)
        if self.proc.stdout:
            self.proc.stdout.close()
        if self._log:
            self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (a crash, as far as the child can tell)."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()
