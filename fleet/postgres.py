"""Start a throw-away PostgreSQL cluster (the real server binaries) on a loopback port.

Used by the test-suite and the benchmarks to run the hub against PostgreSQL without a
system-wide server: ``initdb`` into a temporary directory, ``pg_ctl start`` on a free port with
fsync off (the data is disposable), one database, ``trust`` authentication on 127.0.0.1 only.
"""

from __future__ import annotations

import getpass
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from fleet.net import free_port, wait_for_port

_SYSTEM_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries (initdb, pg_ctl, postgres) are not installed."""


def find_pg_bindir() -> Path:
    """Directory holding ``initdb`` and ``pg_ctl``.

    Debian keeps them out of PATH in ``/usr/lib/postgresql/<major>/bin``; the newest major wins.
    """
    found = shutil.which("pg_ctl")
    if found:
        # Resolve symlinks such as /usr/local/bin/pg_ctl -> /usr/lib/postgresql/15/bin/pg_ctl so
        # that createdb and psql are taken from the same installation.
        bindir = Path(found).resolve().parent
        if os.access(bindir / "initdb", os.X_OK):
            return bindir
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                        key=lambda p: _major(Path(p).parent.parent.name), reverse=True)
    for pg_ctl in candidates:
        bindir = Path(pg_ctl).parent
        if os.access(bindir / "initdb", os.X_OK) and os.access(bindir / "postgres", os.X_OK):
            return bindir
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin "
        "(Debian: apt-get install postgresql)")


def _major(name: str) -> int:
    return int(name) if name.isdigit() else -1


class PostgresCluster:
    """A private PostgreSQL cluster in a temp dir, listening on 127.0.0.1:``port``.

    PostgreSQL refuses to run as root; when the current user is root, ``initdb`` and ``pg_ctl``
    run as the ``postgres`` system user through ``runuser`` and the directory is handed to it.
    """

    def __init__(self, port: int = 0, database: str = "twin", workdir: str | Path | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.database = database
        self.bindir = find_pg_bindir()
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="twin-postgres-"))
        self._as_root = os.geteuid() == 0
        if self._as_root:
            try:
                import pwd

                pwd.getpwnam(_SYSTEM_USER)
            except KeyError:
                raise PostgresUnavailable(
                    f"running as root but there is no {_SYSTEM_USER!r} system user to run PostgreSQL as"
                ) from None
            if not shutil.which("runuser"):
                raise PostgresUnavailable("running as root but `runuser` is not available")
        self.user = _SYSTEM_USER if self._as_root else getpass.getuser()
        self._started = False

    @property
    def datadir(self) -> Path:
        """The cluster's data directory."""
        return self.workdir / "data"

    @property
    def sockdir(self) -> Path:
        """Directory of the Unix socket (kept inside the work dir, not /var/run/postgresql)."""
        return self.workdir / "sock"

    @property
    def log_path(self) -> Path:
        """Server log written by ``pg_ctl``."""
        return self.workdir / "postgres.log"

    @property
    def url(self) -> str:
        """Tortoise ORM URL of the cluster's database."""
        return f"postgres://{self.user}@{self.host}:{self.port}/{self.database}"

    def _exe(self, name: str) -> str:
        local = self.bindir / name
        if os.access(local, os.X_OK):
            return str(local)
        found = shutil.which(name)
        if not found:
            raise PostgresUnavailable(f"PostgreSQL program {name!r} not found in {self.bindir} or on PATH")
        return found

    def _cmd(self, *args: str) -> list[str]:
        exe = [self._exe(args[0]), *args[1:]]
        return ["runuser", "-u", _SYSTEM_USER, "--", *exe] if self._as_root else exe

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        proc = subprocess.run(self._cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=timeout, check=False, cwd=self.workdir)
        if proc.returncode != 0:
            out = proc.stdout.decode(errors="replace")
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {out[-2000:]}{log[-2000:]}")

    def start(self, timeout: float = 30.0) -> PostgresCluster:
        """``initdb`` (first time only), start the server and create the database."""
        self.sockdir.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            shutil.chown(self.workdir, _SYSTEM_USER)
            for p in self.workdir.rglob("*"):
                shutil.chown(p, _SYSTEM_USER)
        if not (self.datadir / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.datadir), "-U", self.user, "--auth=trust",
                      "--encoding=UTF8", "--no-locale", "--no-sync")
        opts = (f"-p {self.port} -k {self.sockdir} -c listen_addresses={self.host} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.log_path), "-o", opts,
                  "-w", "-t", str(int(timeout)), "start", timeout=timeout + 5)
        self._started = True
        try:
            wait_for_port(self.host, self.port, timeout)
            self._create_database()
        except BaseException:
            self.stop()
            raise
        return self

    def _create_database(self) -> None:
        probe = subprocess.run(
            self._cmd("psql", "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", "postgres",
                      "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'"),
            capture_output=True, stdin=subprocess.DEVNULL, check=False,
            cwd=self.workdir)
        if probe.returncode == 0 and probe.stdout.strip() == b"1":
            return
        self._run("createdb", "-h", self.host, "-p", str(self.port), "-U", self.user, self.database)

    def create_database(self, name: str) -> str:
        """Create another (empty) database in the running cluster; returns its Tortoise URL.

        Tests use one database each so they cannot see each other's rows.
        """
        if not self._started:
            raise RuntimeError("cluster is not running")
        self._run("createdb", "-h", self.host, "-p", str(self.port), "-U", self.user, name)
        return f"postgres://{self.user}@{self.host}:{self.port}/{name}"

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (fast shutdown: disconnect clients, then exit)."""
        if not self._started:
            return
        try:
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "-t", str(int(timeout)),
                      "stop", timeout=timeout + 5)
        except (RuntimeError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "stop")
        self._started = False

    def cleanup(self) -> None:
        """Stop and delete the cluster if we created its directory."""
        try:
            self.stop()
        finally:
            if self._own_dir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()
