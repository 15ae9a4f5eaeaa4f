"""Start a private Mosquitto broker (the real Debian ``mosquitto``) on a loopback port.

Used by ``make demo`` (so no system-wide broker is needed), by the integration tests and by the
benchmarks. The broker keeps persistent sessions on disk so a hub that restarts finds the QoS 1
messages that arrived while it was away.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from fleet.net import free_port, port_open, wait_for_port
from protocol.schema import MAX_PAYLOAD_BYTES

MAX_PACKET_BYTES = MAX_PAYLOAD_BYTES + 64 * 1024
"""Mosquitto's ``max_packet_size``: the protocol's payload limit plus room for topic and header."""


class BrokerUnavailable(RuntimeError):
    """The mosquitto binary is not installed."""


def find_mosquitto() -> str:
    """Path of the mosquitto binary; Debian installs it in /usr/sbin, which is not on every PATH."""
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)
    if not found:
        raise BrokerUnavailable("mosquitto is not installed (Debian: apt-get install mosquitto)")
    return found


@dataclass(frozen=True)
class BrokerTls:
    """The files of a TLS listener (``fleet.tlsca`` makes them for tests and small fleets)."""

    cafile: Path
    """CA of the client certificates the broker accepts (and the one clients trust for the broker)."""
    certfile: Path
    keyfile: Path
    require_certificate: bool = False
    """Refuse clients that do not present a certificate signed by ``cafile``."""
    tls_version: str = "tlsv1.2"
    """Oldest TLS version accepted (Mosquitto's ``tls_version``)."""

    def listener_config(self) -> str:
        """The lines that follow a ``listener`` line to make it TLS."""
        return (f"cafile {self.cafile}\ncertfile {self.certfile}\nkeyfile {self.keyfile}\n"
                f"tls_version {self.tls_version}\n"
                f"require_certificate {'true' if self.require_certificate else 'false'}\n")


@dataclass(frozen=True)
class BrokerAuth:
    """Logins required: Mosquitto reads users from ``password_file`` and their rights from
    ``acl_file`` (both written by the hub, ``hub/broker_access.py``); anonymous clients are refused.
    Missing files are created empty at start (nobody may log in until the hub writes them)."""

    password_file: Path
    acl_file: Path

    def config(self) -> str:
        """The mosquitto.conf lines."""
        for path in (self.password_file, self.acl_file):
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        return f"allow_anonymous false\npassword_file {self.password_file}\nacl_file {self.acl_file}\n"


class Mosquitto:
    """A mosquitto process with its own config, data dir and log, on 127.0.0.1.

    With ``tls`` it has a TLS listener too: on ``tls_port`` beside the plain one on ``port``, or,
    with ``plain=False``, instead of it (then ``tls_port == port``).
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1", workdir: str | Path | None = None,
                 extra_config: str = "", tls: BrokerTls | None = None, tls_port: int = 0,
                 plain: bool = True, auth: BrokerAuth | None = None) -> None:
        if tls is None and not plain:
            raise ValueError("a broker without the plain listener needs tls")
        self.host = host
        self.port = port or free_port(host)
        self.tls = tls
        self.plain = plain
        self.tls_port: int | None = None
        if tls is not None:
            self.tls_port = (tls_port or free_port(host)) if plain else self.port
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="twin-mosquitto-"))
        self.extra_config = extra_config
        self.auth = auth
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        """Where the broker writes its log."""
        return self.workdir / "mosquitto.log"

    @property
    def pid_path(self) -> Path:
        """A file with the broker's pid while it runs (what the hub's ``[broker_auth] reload_pid_file``
        points at); written by this helper, since Mosquitto writes its own only when daemonised."""
        return self.workdir / "mosquitto.pid"

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its password and ACL files and re-checks connected clients."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("mosquitto is not running")
        self.proc.send_signal(signal.SIGHUP)

    def _write_config(self) -> Path:
        conf = self.workdir / "mosquitto.conf"
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        listeners = f"listener {self.port} {self.host}\n" if self.plain else ""
        if self.tls is not None:
            listeners += f"listener {self.tls_port} {self.host}\n" + self.tls.listener_config()
        conf.write_text(
            ("per_listener_settings false\n" if self.auth else "")
            + listeners
            + (self.auth.config() if self.auth else "allow_anonymous true\n")
            + ""
            "persistence true\n"
            f"persistence_location {data}/\n"
            # A hub that is down for hours must find its backlog queued, not dropped at the
            # default 1000 messages per session.
            "max_queued_messages 1000000\n"
            "max_inflight_messages 100\n"
            # Mosquitto only writes its queue to disk on autosave: a broker crash loses what
            # arrived since (docs/delivery.md). Every second keeps that window short.
            "autosave_interval 1\n"
            # A client that sends a bigger packet is disconnected before the broker buffers it
            # (docs/security.md, "Hostile input"); the headroom over the protocol's payload limit
            # lets a slightly oversized payload through to the hub, which rejects and counts it.
            f"max_packet_size {MAX_PACKET_BYTES}\n"
            f"log_dest file {self.log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "connection_messages true\n"
            # As root, mosquitto would switch to user 'mosquitto', which cannot enter a
            # private temp dir (pytest's are 0700); this broker is ours alone, so stay.
            + ("user root\n" if os.geteuid() == 0 else "")
            + f"{self.extra_config}\n"
        )
        return conf

    def start(self, timeout: float = 10.0) -> Mosquitto:
        """Start the broker and wait until it accepts connections."""
        if port_open(self.host, self.port):
            raise RuntimeError(f"port {self.host}:{self.port} is already in use; set another MQTT port")
        conf = self._write_config()
        self.proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=False)
        self.pid_path.write_text(f"{self.proc.pid}\n")
        try:
            wait_for_port(self.host, self.port, timeout)
            if self.tls_port is not None and self.tls_port != self.port:
                wait_for_port(self.host, self.tls_port, timeout)
        except TimeoutError:
            self.stop()
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            raise RuntimeError(f"mosquitto did not start on port {self.port}: {log[-2000:]}") from None
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL); persistent state is saved on SIGTERM."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def kill(self) -> None:
        """Kill -9 the broker (an unclean crash)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the same port and data dir."""
        self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        """Stop and remove the working directory if we created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()
