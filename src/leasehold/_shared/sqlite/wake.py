"""Same-host wake-ups for the SQLite store: one datagram to the waiter at the head.

SQLite has no channel between processes, so a waiter that must wait binds a Unix
datagram socket in Linux's abstract namespace (no file to clean up after a crash)
and records its address in its queue row. A release sends one datagram to the
waiters it makes eligible: O(1) wake-ups, no polling storm. A datagram sent
before the waiter starts waiting stays queued in its socket, so no wake-up is lost.
Where abstract sockets are unavailable (not Linux, or another network namespace)
nothing breaks: waiters fall back to polling.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import sys
import weakref

SUPPORTED = sys.platform.startswith("linux")
_PREFIX = "leasehold-wake-"


class WakeSocket:
    def __init__(self) -> None:
        self.address = _PREFIX + secrets.token_hex(12)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Stores keep spare sockets for reuse; one dropped without aclose() closes
        # its sockets when collected instead of leaking them until the socket's
        # own finalizer complains.
        weakref.finalize(self, self._sock.close)
        self._sock.bind("\0" + self.address)
        self._sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> bool:
        """Consume pending wake-ups; True if there was at least one."""
        woken = False
        while True:
            try:
                self._sock.recv(16)
            except (BlockingIOError, InterruptedError):
                return woken
            except OSError:
                return woken
            woken = True

    def receive(self) -> list[bytes]:
        """Consume pending wake-ups; their payloads, oldest first (empty: none)."""
        payloads = []
        while True:
            try:
                payloads.append(self._sock.recv(64))
            except (BlockingIOError, InterruptedError):
                return payloads
            except OSError:
                return payloads

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


def send(addresses: list[str]) -> None:
    """Best effort: a lost datagram only means the waiter notices by polling."""
    targets = [a for a in addresses if a.startswith(_PREFIX)]
    if not targets or not SUPPORTED:
        return
    # A socket per release (microseconds) rather than a shared one: nothing to
    # leak at exit, nothing to re-create after fork.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.setblocking(False)
        for address in targets:
            with contextlib.suppress(OSError):
                sender.sendto(b"w", "\0" + address)


def deliver(addresses: list[str]) -> list[str]:
    """Like ``send``, and return the addresses nobody is bound to any more (their
    owner closed its socket or died), so the caller can forget them. A full socket
    buffer is not among them: its owner has a wake-up pending already."""
    targets = [a for a in addresses if a.startswith(_PREFIX)]
    if not targets or not SUPPORTED:
        return []
    gone: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.setblocking(False)
        for address in targets:
            try:
                sender.sendto(b"a", "\0" + address)
            except (ConnectionRefusedError, FileNotFoundError):
                gone.append(address)
            except OSError:
                pass
    return gone


def send_messages(messages: list[tuple[str, bytes]]) -> None:
    """Best effort, like ``send``, with a payload per address (at most 64 bytes)."""
    targets = [(a, p) for a, p in messages if a.startswith(_PREFIX)]
    if not targets or not SUPPORTED:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.setblocking(False)
        for address, payload in targets:
            with contextlib.suppress(OSError):
                sender.sendto(payload, "\0" + address)
