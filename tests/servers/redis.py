"""A throwaway redis-server for tests: a random loopback port, a temp dir, no snapshots.

``RedisServer`` starts exactly one process and only ever signals that process. Its
data lives in a private temp dir; with the default ``appendonly=False`` nothing is
persisted, so ``restart()`` comes back empty (the "restart without persistence"
failure mode). TLS servers get a throwaway CA and server certificate made with the
``openssl`` command line tool.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def openssl_binary() -> str | None:
    return shutil.which("openssl")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    binary = openssl_binary()
    if binary is None:
        raise RuntimeError("openssl is not installed")
    subprocess.run([binary, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_tls_files(directory: Path, name: str = "test") -> TLSFiles:
    """A new CA and a certificate it signed for 127.0.0.1/localhost (server or client)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / f"{name}-ca.key", directory / f"{name}-ca.crt"
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    ext = directory / f"{name}.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "basicConstraints=CA:FALSE\n"
    )
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN=leasehold {name} test CA",
        "-keyout", str(ca_key), "-out", str(ca_cert), cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", str(key), "-out", str(csr), cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert),
        cwd=directory,
    )  # fmt: skip
    return TLSFiles(ca_cert=ca_cert, cert=cert, key=key)


class RedisServer:
    """One redis-server process on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        *,
        tls: bool = False,
        password: str | None = None,
        appendonly: bool = False,
        cluster: bool = False,
        extra_config: Sequence[str] = (),
    ) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self._binary = binary
        self.tls = tls
        self.password = password
        self.appendonly = appendonly
        self.cluster = cluster
        self.extra_config = tuple(extra_config)
        self._dir: Path | None = None
        self._port: int | None = None
        # The cluster bus port: picked like the client port, since the default
        # (client port + 10000) may be taken or beyond 65535 for a random port.
        self._bus_port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._tls_files: TLSFiles | None = None

    # -- paths and addresses -------------------------------------------------

    @property
    def directory(self) -> Path:
        """Data, log and certificates; kept across restart(), removed by cleanup()
        or when this object is collected."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="leasehold-redis-"))
            weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)
        return self._dir

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server has not been started")
        return self._port

    @property
    def bus_port(self) -> int:
        if self._bus_port is None:
            raise RuntimeError("not a cluster node, or not started")
        return self._bus_port

    @property
    def tls_files(self) -> TLSFiles:
        if self._tls_files is None:
            self._tls_files = make_tls_files(self.directory / "tls", "server")
        return self._tls_files

    @property
    def url(self) -> str:
        auth = ""
        if self.password is not None:
            auth = f":{urllib.parse.quote(self.password, safe='')}@"
        if not self.tls:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        query = urllib.parse.urlencode({"ssl_ca_certs": str(self.tls_files.ca_cert)})
        return f"rediss://{auth}127.0.0.1:{self.port}/0?{query}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def client(self, **kwargs: Any) -> Any:
        """A plain redis-py client for test set-up (FLUSHALL, DBSIZE, ...); close it."""
        import redis

        options: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "password": self.password,
            "decode_responses": True,
            "socket_timeout": 10,
        }
        if self.tls:
            # The server's own certificate doubles as a client certificate, for
            # servers started with tls-auth-clients yes.
            files = self.tls_files
            options.update(
                ssl=True,
                ssl_ca_certs=str(files.ca_cert),
                ssl_certfile=str(files.cert),
                ssl_keyfile=str(files.key),
            )
        options.update(kwargs)
        return redis.Redis(**options)

    # -- lifecycle -----------------------------------------------------------

    def _command(self) -> list[str]:
        port = str(self.port)
        args = [
            self._binary,
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--logfile", str(self.directory / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        if self.tls:
            files = self.tls_files
            args += [
                "--port", "0",
                "--tls-port", port,
                "--tls-cert-file", str(files.cert),
                "--tls-key-file", str(files.key),
                "--tls-ca-cert-file", str(files.ca_cert),
                "--tls-auth-clients", "optional",
            ]  # fmt: skip
        else:
            args += ["--port", port]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(self._bus_port),
            ]  # fmt: skip
        for line in self.extra_config:
            key, _, value = line.partition(" ")
            args += [f"--{key}", *value.split()]
        return args

    def start(self, timeout: float = 20.0) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        fixed_port = self._port is not None
        for _attempt in range(1 if fixed_port else 5):
            if not fixed_port:
                self._port = _free_port()
                if self.cluster:
                    self._bus_port = _free_port()
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_ready(timeout):
                return
            self._reap()
        raise RuntimeError(f"redis-server did not start; log:\n{self.log()}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False  # exited: most likely the port was taken meanwhile
            client = self.client(socket_timeout=1, socket_connect_timeout=1)
            try:
                if client.ping():
                    return True
            except Exception:
                time.sleep(0.05)
            finally:
                client.close()
        return False

    def _reap(self, sig: str = "term") -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        if sig == "kill":
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)

    def stop(self) -> None:
        """Stop the process this object started (SIGTERM, then SIGKILL if it hangs)."""
        self._reap("term")

    def kill(self) -> None:
        """SIGKILL: no shutdown work at all (no AOF flush beyond what fsync did)."""
        self._reap("kill")

    def restart(self) -> None:
        """Stop, then start again on the same port and directory."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"RedisServer(port={self._port}, tls={self.tls}, pid={self.pid})"
