"""Which local process dialled a loopback TCP connection (Linux /proc only).

Every peer of a test cluster connects from 127.0.0.1, so a proxy cannot tell its
clients apart by address. It can by process: the connection's client port is the
dialler's local port, /proc/net/tcp{,6} maps that (local port, remote port) pair to
a socket inode, and the socket is the dialler's if one of /proc/<pid>/fd links to
``socket:[inode]``. ``dialled_by`` turns that into a ``FaultProxy`` predicate.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

SUPPORTED = sys.platform.startswith("linux") and Path("/proc/net/tcp").exists()
_ESTABLISHED = "01"


def _loopback(hex_address: str) -> bool:
    # IPv4 is 8 hex digits, little-endian (0100007F = 127.0.0.1); IPv6 is 32, and
    # IPv4-mapped loopback ends in FFFF0000 0100007F.
    return hex_address.endswith("7F") if len(hex_address) in (8, 32) else False


def socket_inode(local_port: int, remote_port: int) -> int | None:
    """The inode of the established loopback socket local_port -> remote_port."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _ESTABLISHED:
                continue
            local_host, local = fields[1].split(":")
            remote_host, remote = fields[2].split(":")
            if (int(local, 16), int(remote, 16)) == (local_port, remote_port) and (
                _loopback(local_host) and _loopback(remote_host)
            ):
                return int(fields[9])
    return None


def owns_socket(pid: int, inode: int) -> bool:
    target = f"socket:[{inode}]"
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False  # gone
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == target:
                return True
        except OSError:
            continue  # closed meanwhile
    return False


def dialled_by(pid: int, proxy_port: int) -> Callable[[tuple[str, int]], bool]:
    """A ``FaultProxy`` ``where=`` predicate: the connection to ``proxy_port`` came from
    process ``pid``. A dialler whose socket is already gone sends nothing: False."""

    def where(address: tuple[str, int]) -> bool:
        inode = socket_inode(address[1], proxy_port)
        return inode is not None and owns_socket(pid, inode)

    return where
