"""Throwaway etcd for tests: one member, or a cluster of several, on loopback.

``EtcdCluster`` starts exactly its own processes (random client and peer ports, a
private data dir per member) and only ever signals those PIDs. Short heartbeat and
election timeouts keep failovers (and etcd's minimum lease TTL) short. ``wipe()``
stops every member, deletes their data and starts a fresh cluster on the same
ports: the "store restart that lost data" failure mode.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
import weakref
from pathlib import Path

from tests.servers.redis import TLSFiles, make_tls_files


def etcd_binary() -> str | None:
    return shutil.which("etcd") or (
        "/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EtcdCluster:
    def __init__(
        self,
        members: int = 1,
        *,
        extra_args: tuple[str, ...] = (),
        tls: bool = False,
        client_cert_auth: bool = False,
    ) -> None:
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("etcd is not installed")
        self._binary = binary
        self.size = members
        self.extra_args = extra_args
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self.tls_files: TLSFiles | None = None
        self.directory = Path(tempfile.mkdtemp(prefix="leasehold-etcd-"))
        weakref.finalize(self, shutil.rmtree, self.directory, ignore_errors=True)
        self.names = [f"m{i}" for i in range(members)]
        self.client_ports: list[int] = []
        self.peer_ports: list[int] = []
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._token = f"leasehold-{os.getpid()}-{id(self)}"

    # -- addresses --------------------------------------------------------------

    def endpoint(self, index: int) -> str:
        return f"127.0.0.1:{self.client_ports[index]}"

    @property
    def scheme(self) -> str:
        return "etcds" if self.tls else "etcd"

    @property
    def url(self) -> str:
        return f"{self.scheme}://" + ",".join(self.endpoint(i) for i in range(self.size))

    def member_url(self, index: int) -> str:
        return f"{self.scheme}://{self.endpoint(index)}"

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.tls_files is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls_files.ca_cert))
        context.load_cert_chain(str(self.tls_files.cert), str(self.tls_files.key))
        return context

    def post(
        self, index: int, path: str, body: dict[str, object], timeout: float = 5.0
    ) -> dict[str, object]:
        """A raw gateway call for test set-up (users, roles, auth enable)."""
        scheme = "https" if self.tls else "http"
        request = urllib.request.Request(
            f"{scheme}://{self.endpoint(index)}/v3/{path}",
            data=json.dumps(body).encode(),
            method="POST",
        )
        with urllib.request.urlopen(
            request, timeout=timeout, context=self._ssl_context()
        ) as response:
            answer: dict[str, object] = json.loads(response.read())
            return answer

    def pid(self, index: int) -> int | None:
        process = self._processes.get(self.names[index])
        return None if process is None or process.poll() is not None else process.pid

    # -- lifecycle --------------------------------------------------------------

    def _command(self, index: int, state: str) -> list[str]:
        name = self.names[index]
        cluster = ",".join(
            f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports, strict=True)
        )
        scheme = "https" if self.tls else "http"
        client = f"{scheme}://127.0.0.1:{self.client_ports[index]}"
        peer = f"http://127.0.0.1:{self.peer_ports[index]}"
        return [
            self._binary,
            "--name", name,
            "--data-dir", str(self.directory / name),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", cluster,
            "--initial-cluster-token", self._token,
            "--initial-cluster-state", state,
            "--heartbeat-interval", "50",
            "--election-timeout", "250",
            "--logger", "zap",
            "--log-outputs", str(self.directory / f"{name}.log"),
            *self._tls_args(),
            *self.extra_args,
        ]  # fmt: skip

    def _tls_args(self) -> list[str]:
        if not self.tls:
            return []
        if self.tls_files is None:
            self.tls_files = make_tls_files(self.directory / "tls", "etcd")
        files = self.tls_files
        args = ["--cert-file", str(files.cert), "--key-file", str(files.key)]
        if self.client_cert_auth:
            args += ["--client-cert-auth", "--trusted-ca-file", str(files.ca_cert)]
        return args

    def _spawn(self, index: int, state: str = "new") -> None:
        self._processes[self.names[index]] = subprocess.Popen(
            self._command(index, state),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start(self, timeout: float = 30.0) -> None:
        for _attempt in range(5):
            self.client_ports = [_free_port() for _ in range(self.size)]
            self.peer_ports = [_free_port() for _ in range(self.size)]
            for index in range(self.size):
                self._spawn(index)
            if self.wait_ready(timeout):
                return
            self.stop()
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(parents=True, exist_ok=True)
        raise RuntimeError(f"etcd did not start; log:\n{self.log(0)}")

    def _status(self, index: int) -> dict[str, object] | None:
        try:
            return self.post(index, "maintenance/status", {}, timeout=1.0)
        except (OSError, ValueError):
            return None

    def leader(self) -> int | None:
        """The index of the member that currently leads, if the live ones agree."""
        for index in range(self.size):
            if self.pid(index) is None:
                continue
            status = self._status(index)
            if status is None:
                continue
            leader = status.get("leader")
            header = status.get("header")
            if isinstance(header, dict) and leader and header.get("member_id") == leader:
                return index
        return None

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """Every live member answers and one of them leads."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [i for i in range(self.size) if self.pid(i) is not None]
            if len(live) < len(self._processes):
                return False  # a member exited (most likely a port was taken)
            if all(self._status(i) is not None for i in live) and self.leader() is not None:
                return True
            time.sleep(0.05)
        return False

    def kill(self, index: int) -> None:
        """SIGKILL one member (no shutdown work)."""
        process = self._processes.pop(self.names[index], None)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=20)

    def pause(self, index: int) -> None:
        pid = self.pid(index)
        if pid is not None:
            os.kill(pid, signal.SIGSTOP)

    def resume(self, index: int) -> None:
        pid = self.pid(index)
        if pid is not None:
            os.kill(pid, signal.SIGCONT)

    def restart_member(self, index: int, timeout: float = 30.0) -> None:
        """Start a killed member again on its ports and data (it rejoins)."""
        if self.pid(index) is None:
            self._spawn(index, "existing")
        if not self.wait_ready(timeout):
            raise RuntimeError(f"etcd member {index} did not rejoin; log:\n{self.log(index)}")

    def wipe(self, timeout: float = 30.0) -> None:
        """Stop all members, lose their data, start a new cluster on the same ports."""
        self.stop()
        for name in self.names:
            shutil.rmtree(self.directory / name, ignore_errors=True)
        for index in range(self.size):
            self._spawn(index)
        if not self.wait_ready(timeout):
            raise RuntimeError(f"etcd did not start after the wipe; log:\n{self.log(0)}")

    def stop(self) -> None:
        processes, self._processes = self._processes, {}
        for process in processes.values():
            if process.poll() is None:
                with_cont = process.pid
                try:
                    os.kill(with_cont, signal.SIGCONT)  # a paused member must see TERM
                except ProcessLookupError:
                    continue
                process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=20)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log(self, index: int) -> str:
        path = self.directory / f"{self.names[index]}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"

    def __repr__(self) -> str:
        return f"EtcdCluster(members={self.size}, ports={self.client_ports})"
