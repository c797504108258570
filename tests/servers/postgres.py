"""A throwaway PostgreSQL cluster for tests: initdb into a temp dir, a random loopback port.

PostgreSQL refuses to run as root, so when the tests run as root every server
command runs as the unprivileged ``postgres`` user (subprocess ``user=``), and the
temp dir is handed to that user. The cluster uses trust authentication on
127.0.0.1 only, and a unix socket inside its own temp dir, so it never touches a
system cluster.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

_BINARIES = ("initdb", "pg_ctl", "postgres")
SUPERUSER = "postgres"


def postgres_bindir() -> Path | None:
    """The directory with initdb, pg_ctl and postgres: PATH first, then Debian's layout."""
    found = shutil.which("initdb")
    if found is not None:
        # /usr/local/bin/initdb is often a symlink into /usr/lib/postgresql/N/bin;
        # pg_ctl finds postgres next to its *resolved* location, so resolve too.
        bindir = Path(found).resolve().parent
        if all((bindir / name).exists() for name in _BINARIES):
            return bindir
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = sorted(
            (p for p in root.iterdir() if re.fullmatch(r"\d+(\.\d+)?", p.name)),
            key=lambda p: tuple(int(x) for x in p.name.split(".")),
            reverse=True,
        )
        for version in versions:
            bindir = version / "bin"
            if all((bindir / name).exists() for name in _BINARIES):
                return bindir
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresServer:
    """One private cluster. ``start()`` runs initdb the first time only, so
    ``shutdown()`` then ``start()`` (or ``restart()``) keeps the data and the port;
    ``stop()`` stops it for good and deletes its data."""

    def __init__(self, *, settings: dict[str, str] | None = None) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL binaries not found (apt-get install postgresql)")
        self._bindir = bindir
        self._settings = dict(settings or {})
        self._tmp: Path | None = None
        self._port: int | None = None
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._run_as = pwd.getpwnam("postgres")

    # -- properties ---------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    @property
    def data_dir(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("server not started")
        return self._tmp / "data"

    # -- process plumbing ---------------------------------------------------------

    def _run(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        kwargs: dict[str, Any] = {}
        if self._run_as is not None:
            kwargs.update(user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[])
        env = dict(os.environ)
        env.pop("PGDATA", None)
        env["LC_ALL"] = "C"
        proc = subprocess.run(
            [str(self._bindir / args[0]), *args[1:]],
            cwd=self._tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({proc.returncode}): {proc.stdout}{proc.stderr}{self._log_tail()}"
            )
        return proc.stdout

    def _log_tail(self) -> str:
        if self._tmp is None:
            return ""
        log = self._tmp / "server.log"
        if not log.exists():
            return ""
        return "\n--- server.log ---\n" + log.read_text(errors="replace")[-3000:]

    def _initdb(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="leasehold-pg-"))
        if self._run_as is not None:
            os.chown(self._tmp, self._run_as.pw_uid, self._run_as.pw_gid)
        self._tmp.chmod(0o700)
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",  # a test cluster: skip fsync of the template files
        )

    def _options(self) -> str:
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self._tmp}'",
            "shared_buffers": "16MB",
            "max_connections": "100",
            "logging_collector": "off",
            **self._settings,
        }
        return " ".join(f"-c {key}={value}" for key, value in settings.items())

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        if self._tmp is None:
            self._initdb()
        if self._port is not None:
            self._pg_ctl_start()
            return
        last: Exception | None = None
        for _attempt in range(5):  # a random free port can be taken before we bind it
            self._port = _free_port()
            try:
                self._pg_ctl_start()
                return
            except RuntimeError as exc:
                last = exc
                if "could not bind" not in str(exc) and "in use" not in str(exc):
                    raise
        raise RuntimeError(f"could not start PostgreSQL: {last}")

    def _pg_ctl_start(self) -> None:
        self._run(
            "pg_ctl",
            "start",
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            "60",
            "-l",
            str(self._tmp / "server.log") if self._tmp else "server.log",
            "-o",
            f"-p {self.port} {self._options()}",
        )

    def stop(self) -> None:
        """Stop this cluster (and only it) and delete its data. Idempotent."""
        if self._tmp is None:
            return
        self.shutdown("immediate")
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None
        self._port = None

    close = stop

    def shutdown(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Stop the server but keep its data and port for ``start()``."""
        if self._tmp is None:
            return
        if self.running():
            self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w", check=False)
        self._wait_gone()

    def restart(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Same data directory, same port. ``immediate`` is a crash: recovery replays
        the WAL on the way up."""
        self.shutdown(mode)
        self._pg_ctl_start()

    def kill(self) -> None:
        """SIGKILL the postmaster and its children: a crash, without any shutdown."""
        pids = self._cluster_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._wait_gone()
        # The postmaster was reparented to PID 1, which in a container may never reap
        # it: the zombie would keep its pid "alive" and the next postmaster would
        # refuse to start. After a real crash the lock file is simply stale.
        stale = [self.data_dir / "postmaster.pid"]
        if self._tmp is not None and self._port is not None:
            stale += [
                self._tmp / f".s.PGSQL.{self._port}.lock",
                self._tmp / f".s.PGSQL.{self._port}",
            ]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def running(self) -> bool:
        return self._postmaster_pid() is not None

    def _postmaster_pid(self) -> int | None:
        if self._tmp is None:
            return None
        pidfile = self.data_dir / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        # A stale pid file may name a recycled pid: check it is our postmaster.
        if str(self.data_dir).encode() not in cmdline:
            return None
        return pid

    def _cluster_pids(self) -> list[int]:
        master = self._postmaster_pid()
        if master is None:
            return []
        pids = [master]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # Field 4 is the parent pid; the command name (field 2) may contain spaces.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == master:
                pids.append(int(entry.name))
        return pids

    def _wait_gone(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        pids = self._cluster_pids()
        while time.monotonic() < deadline:
            alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
            if not alive:
                return
            time.sleep(0.02)
        raise RuntimeError(f"PostgreSQL processes still alive: {pids}")

    # -- helpers ------------------------------------------------------------------

    def execute(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser on a fresh connection; returns rows."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(query, params)  # type: ignore[arg-type]
            return list(cur.fetchall()) if cur.description is not None else []

    def terminate_backends(self, application_name: str | None = None) -> int:
        """pg_terminate_backend() every client connection but our own; returns how many."""
        rows = self.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend' "
            "AND (%s::text IS NULL OR application_name = %s::text)",
            (application_name, application_name),
        )
        return int(rows[0][0])

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresServer(port={self._port}, data={self._tmp})"


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def pgbouncer_binary() -> Path | None:
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
    )
    return Path(found) if found else None


class PgBouncer:
    """pgbouncer in front of a PostgresServer, in transaction mode by default, with a
    tiny server pool so that clients really share server sessions."""

    def __init__(
        self, server: PostgresServer, *, pool_mode: str = "transaction", pool_size: int = 2
    ) -> None:
        binary = pgbouncer_binary()
        if binary is None:
            raise RuntimeError("pgbouncer not found (apt-get install pgbouncer)")
        self._binary = binary
        self._server = server
        self._pool_mode = pool_mode
        self._pool_size = pool_size
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("pgbouncer not started")
        return self._port

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="leasehold-pgb-"))
        self._port = _free_port()
        (self._tmp / "userlist.txt").write_text(f'"{SUPERUSER}" ""\n')
        (self._tmp / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"postgres = host=127.0.0.1 port={self._server.port} dbname=postgres\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self._port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self._tmp / 'userlist.txt'}\n"
            f"pool_mode = {self._pool_mode}\n"
            f"default_pool_size = {self._pool_size}\n"
            "max_client_conn = 200\n"
            f"logfile = {self._tmp / 'pgbouncer.log'}\n"
        )
        kwargs: dict[str, Any] = {}
        if os.geteuid() == 0:  # pgbouncer refuses to run as root, like postgres
            user = pwd.getpwnam("postgres")
            for path in (self._tmp, *self._tmp.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)
            kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        self._proc = subprocess.Popen(
            [str(self._binary), str(self._tmp / "pgbouncer.ini")],
            cwd=self._tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **kwargs,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self._port), timeout=0.2),
            ):
                return
            if self._proc.poll() is not None:
                break
            time.sleep(0.02)
        log = self._tmp / "pgbouncer.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        self.stop()
        raise RuntimeError(f"pgbouncer did not start: {text[-2000:]}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
