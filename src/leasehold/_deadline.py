"""Deadlines for store operations: how every call keeps its bound when a store stalls.

A stalled server (a stopped process, a hung pooler, a silent network path whose
kernel still acknowledges) never closes its connections, so a client waiting for a
reply waits as long as the driver lets it: redis-py for its socket timeout, libpq
forever. Cancelling the wait is not enough either (psycopg answers a cancellation by
asking the server to cancel the query and waiting for that, too). What always works
is to stop the connection itself: ``shutdown()`` on its socket wakes every reader
and writer of it at once, in any thread or event loop, and the driver then fails
the call and discards the connection. So:

* ``bounded(seconds)`` opens a deadline for the operation running in this thread or
  task (a context variable; nested deadlines keep the earliest end).
* A backend ``attach``-es the socket of every connection an operation uses. Only
  then is the deadline armed with the watchdog thread, so operations of stores
  without sockets (memory, SQLite) cost a context variable and no more.
* When the deadline passes, the watchdog shuts the attached sockets down; the
  driver's error becomes ``StoreUnavailable``, and the operation's wrapper says the
  store gave no answer in time. A connection attached after that is shut at once,
  so a retry inside an expired operation fails fast instead of waiting again.

Waits that involve no socket of ours (SQLite's busy retries, a pool's wait for a
free connection, connecting) read ``remaining()`` and stop by themselves.

These are real-time (``time.monotonic``) deadlines on purpose: they bound how long
real sockets are waited on, like a socket timeout, not lease time, which the
injectable clock keeps.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from contextvars import ContextVar, Token

# The per-client bound of every store call but acquire(timeout=...), which keeps the
# caller's own timeout: Client(operation_timeout=...) and ?operation_timeout= change it.
DEFAULT_OPERATION_TIMEOUT = 5.0
MIN_OPERATION_TIMEOUT = 0.05
MAX_OPERATION_TIMEOUT = 3600.0

# How late the watchdog may act on a deadline (seconds).
_GRANULARITY = 0.02

_current: ContextVar[Deadline | None] = ContextVar("leasehold_deadline", default=None)
_monotonic = time.monotonic
_INF = float("inf")


class Deadline:
    """The end of one store operation (and of every operation nested in it).

    ``bounded(seconds)`` (this class) is also its context manager: a deadline
    ``seconds`` from now (None: only the enclosing one's) for the code inside,
    never later than an enclosing deadline. One object per guard, opened and
    closed with a context variable: it runs around every store call.

    An armed deadline (one with a socket attached) is one entry in the
    watchdog's table of open deadlines from its first ``attach`` to its exit:
    two dictionary operations under the watchdog's lock per store call, and no
    work at all for the watchdog when the call ends in time.
    """

    __slots__ = ("_done", "_expired", "_fds", "_token", "at", "seconds")
    at: float
    seconds: float

    def __init__(self, seconds: float | None) -> None:
        parent = _current.get()
        if seconds is None:
            at = given = _INF
        else:
            at = _monotonic() + (seconds if seconds > 0.0 else 0.0)
            given = seconds
        if parent is not None and parent.at < at:
            at = parent.at
            given = parent.seconds
        self.at = at
        # What the operation was given, for messages ("no answer within 5 s").
        self.seconds = given
        # The attached sockets: None until the first attach (most operations of
        # socket-less stores never arm). Changed only under the watchdog's lock.
        self._fds: list[int] | None = None
        self._done = False
        self._expired = False
        self._token: Token[Deadline | None] | None = None

    def __enter__(self) -> Deadline:
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        token = self._token
        if token is not None:
            _current.reset(token)
        self._done = True
        if self._fds is None:
            return  # never armed: the watchdog never heard of it
        with _WATCHDOG.lock:
            # Under the lock: once this returns, the watchdog touches no socket of
            # this operation (maybe back in a pool, serving another).
            self._fds = None
            _WATCHDOG.open.pop(id(self), None)

    def remaining(self) -> float:
        return max(0.0, self.at - _monotonic())

    @property
    def expired(self) -> bool:
        """True once the deadline passed (whether or not the watchdog acted yet)."""
        return self._expired or _monotonic() >= self.at

    def attach(self, fd: int) -> None:
        """Shut ``fd``'s socket down when the deadline passes (at once if it has)."""
        if fd < 0:
            return
        with _WATCHDOG.lock:
            if self._done:
                return
            if self._expired or _monotonic() >= self.at:
                self._expired = True
                _shutdown(fd)
                return
            fds = self._fds
            if fds is not None:
                fds.append(fd)
                return
            self._fds = [fd]
            if self.at != _INF:
                _WATCHDOG.add(self)

    def detach(self, fd: int) -> None:
        """The operation is done with ``fd`` (it went back to a pool)."""
        if self._fds is None:
            return
        with _WATCHDOG.lock:
            fds = self._fds
            if fds is not None and fd in fds:
                fds.remove(fd)

    def _expire(self) -> None:
        """Called by the watchdog, under its lock."""
        self._expired = True
        fds, self._fds = self._fds or [], []
        for fd in fds:
            _shutdown(fd)


# A class, not a generator-based context manager: it runs around every store call.
bounded = Deadline


def current() -> Deadline | None:
    """The deadline of the operation running in this thread or task, if any."""
    return _current.get()


def forget() -> None:
    """No deadline from here on in this context (for background tasks)."""
    _current.set(None)


def remaining(default: float) -> float:
    """Seconds left to the current deadline, at most ``default``."""
    deadline = _current.get()
    if deadline is None:
        return default
    return min(default, deadline.remaining())


def attach(fd: int | None) -> None:
    """Attach ``fd`` to the current deadline (nothing outside an operation)."""
    deadline = _current.get()
    if deadline is not None and fd is not None:
        deadline.attach(fd)


def detach(fd: int | None) -> None:
    deadline = _current.get()
    if deadline is not None and fd is not None:
        deadline.detach(fd)


def _shutdown(fd: int) -> None:
    """Stop a connection's socket: every blocked read or write on it returns now.

    The descriptor stays open (its driver closes it when it discards the
    connection); ``shutdown`` acts on the socket shared by every descriptor of it.
    """
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=os.dup(fd))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


class _Watchdog:
    """One daemon thread that expires the open armed deadlines when they pass."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._condition = threading.Condition(self.lock)
        # The armed deadlines whose operations still run, by id(): an operation
        # that ends removes its own, so this holds only calls in flight.
        self.open: dict[int, Deadline] = {}
        self._wake_at = _INF
        self._thread: threading.Thread | None = None
        # Whether the thread runs: set when it starts, cleared (under the lock) by
        # the thread itself if it ever ends. Read on every armed store call, where
        # Thread.is_alive() would cost three Python calls.
        self._running = False

    def add(self, deadline: Deadline) -> None:
        """Watch ``deadline`` (called under ``lock``)."""
        self.open[id(deadline)] = deadline
        if not self._running:
            thread = threading.Thread(target=self._run, name="leasehold-deadlines", daemon=True)
            thread.start()
            self._thread = thread
            self._running = True
        elif deadline.at < self._wake_at:
            self._condition.notify()

    def _run(self) -> None:
        try:
            self._watch()
        finally:
            with self.lock:
                self._running = False

    def _watch(self) -> None:
        while True:
            with self._condition:
                now = _monotonic()
                wake_at = _INF
                for key, deadline in list(self.open.items()):
                    if deadline.at <= now:
                        # Under the lock: the operation has not exited (it would
                        # have removed its entry), so its sockets are still its own.
                        del self.open[key]
                        deadline._expire()
                    elif deadline.at < wake_at:
                        wake_at = deadline.at
                self._wake_at = wake_at
                # Bounded sleeps: a lost notify costs at most a second. At least
                # _GRANULARITY: deadlines that fall due together are handled in
                # one pass, for a delay no caller notices.
                self._condition.wait(min(1.0, max(_GRANULARITY, wake_at - now)))

    def after_fork_in_child(self) -> None:
        # The thread and whatever it guarded belong to the parent.
        self.__init__()  # type: ignore[misc]


_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG.after_fork_in_child)


def validate_operation_timeout(value: object, *, what: str = "operation_timeout") -> float:
    """A number of seconds in range, else ``InvalidArgument``."""
    from leasehold._errors import InvalidArgument

    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidArgument(f"{what} must be a number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{what} must be a number of seconds, got {type(value).__name__}")
    seconds = float(value)
    if not MIN_OPERATION_TIMEOUT <= seconds <= MAX_OPERATION_TIMEOUT:
        raise InvalidArgument(
            f"{what} must be between {MIN_OPERATION_TIMEOUT:g} and "
            f"{MAX_OPERATION_TIMEOUT:g} seconds, got {seconds:g}"
        )
    return seconds
