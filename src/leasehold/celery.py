"""Celery integration: singleton tasks, once-only tasks, one beat across hosts.

    pip install 'leasehold[celery]'

* ``SingletonTask``: at most one run per key (``lock_key="meeting:{meeting_id}"``)
  at a time; when busy, skip, retry later with jitter, or wait. The lease is renewed
  while the task runs and released on success, failure, retry and revoke.
* ``OnceTask``: a second run with the same key returns the stored result of the
  first instead of running again (``client.once``).
* ``LeaderScheduler``: ``celery beat -S leasehold.celery:LeaderScheduler`` on every
  host; only the elected leader sends, and the schedule state is shared, so a new
  leader carries on where the old one stopped.

The store is ``app.conf.leasehold_url`` (or the task's ``leasehold_url``
attribute; in a Django project, else ``settings.LEASEHOLD``; else
``$LEASEHOLD_URL``). One sync client per worker process is
created on first use, after the pool has forked. See docs/celery.md.
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from celery import Task  # type: ignore[import-untyped]
from celery.exceptions import Retry  # type: ignore[import-untyped]
from celery.signals import worker_init  # type: ignore[import-untyped]
from celery.utils.dispatch import Signal  # type: ignore[import-untyped]

from leasehold import _celery_singleton as _singleton
from leasehold import retry as _retry
from leasehold._celery_beat import LeaderScheduler
from leasehold._celery_url import _django_store_url, explicit_url
from leasehold._core import calls, validate
from leasehold._errors import (
    InvalidArgument,
    LeaseholdError,
    StoreMisconfigured,
    StoreUnavailable,
)
from leasehold._sync.client import Client
from leasehold._sync.lease import Lease

__all__ = [
    "LeaderScheduler",
    "OnceTask",
    "SingletonTask",
    "Skipped",
    "check_startup",
    "client_for",
    "current_lease",
    "statistics",
    "task_skipped",
]

logger = logging.getLogger("leasehold.celery")

BUSY_POLICIES = ("skip", "retry", "wait")

#: Sent by a worker for every skipped run: ``sender`` is the task, with ``task_id``,
#: ``key`` and ``reason`` (``"busy"``: another run holds the key; ``"period"``: a
#: run started less than ``once_per`` seconds ago).
task_skipped = Signal(name="task_skipped")


class Skipped(LeaseholdError):
    """A ``SingletonTask`` run that did not run: its result (state ``FAILURE``, this
    exception type), never a ``SUCCESS`` with ``None``. ``reason`` is ``"busy"``
    or ``"period"``. Listed in the task's ``throws``: logged at INFO, not as an
    error."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(key, reason)
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        what = "another run holds it" if self.reason == "busy" else "it ran within once_per"
        return f"skipped {self.key!r}: {what}"


# -- one client per process --------------------------------------------------------

_clients: dict[tuple[int, str | None], Client] = {}
_clients_guard = threading.Lock()
_stats: Counter[str] = Counter()
_stats_guard = threading.Lock()
_current: contextvars.ContextVar[Lease | None] = contextvars.ContextVar(
    "leasehold_celery_lease", default=None
)


def _after_fork_in_child() -> None:
    global _clients_guard, _stats_guard
    # A lock held at fork time stays held in the child.
    _clients_guard, _stats_guard = threading.Lock(), threading.Lock()
    _stats.clear()


def _count(what: str) -> None:
    with _stats_guard:
        _stats[what] += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def client_for(url: str | None = None) -> Client:
    """The process's sync client for ``url`` (None: ``$LEASEHOLD_URL``; one of them
    is required), created on first use. Clients are never shared across ``fork()``."""
    url = explicit_url(url)
    key = (os.getpid(), url)
    with _clients_guard:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = Client(url)
        return client


def check_startup(app: Any) -> None:
    """Fail a worker's start when one of its leasehold tasks has no store URL or
    its store rejects the configuration (``StoreMisconfigured``); an unreachable
    store is only logged. Connected to ``worker_init``; call it yourself elsewhere."""
    urls = {
        _store_url(task)
        for task in list(app.tasks.values())
        if isinstance(task, SingletonTask | OnceTask)
    }
    for url in urls:
        client = Client(explicit_url(url))
        try:
            client.store.ping()
        except StoreMisconfigured:
            raise
        except StoreUnavailable as exc:
            logger.warning("the store cannot be reached at startup (%s)", exc)
        finally:
            client.close()


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is not None:
        check_startup(app)


worker_init.connect(_on_worker_init, weak=False)


def statistics() -> dict[str, int]:
    """This process's counters: ``ran``, ``skipped``, ``busy_retries``, ``waited``,
    ``lost``, ``once_runs``, and in producers ``deduped`` (enqueues answered with
    the result of a queued or running run)."""
    with _stats_guard:
        return dict(_stats)


def current_lease() -> Lease:
    """The lease of the ``SingletonTask`` running in this thread: call
    ``current_lease().check()`` before each side effect, and pass
    ``current_lease().fence`` to fenced writes."""
    lease = _current.get()
    if lease is None:
        raise LookupError("current_lease() works only inside a running SingletonTask")
    return lease


def _store_url(task: Any) -> str | None:
    url = getattr(task, "leasehold_url", None)
    if url is None:
        url = task.app.conf.get("leasehold_url")
    if url is None:
        url = _django_store_url()
    return None if url is None else str(url)


def _fields(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The task's arguments by name (defaults applied, ``**kwargs`` flattened)."""
    return calls.arguments(task.run, args, kwargs)


def format_key(
    task: Any,
    template: str | Callable[..., str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    what: str,
) -> str:
    """``template.format()`` with the task's arguments by name (and position), or
    ``template(*args, **kwargs)`` when it is callable."""
    if callable(template):
        key = template(*args, **kwargs)
    else:
        fields = _fields(task, args, kwargs)
        try:
            key = template.format(*args, **fields)
        except (KeyError, IndexError, AttributeError) as exc:
            raise InvalidArgument(
                f"{what} {template!r} of task {task.name!r} refers to {exc} "
                f"but the task's arguments are {sorted(fields)}"
            ) from None
    return validate.name(key, what=what)


def _key_option(task: Any, name: str) -> Any:
    """A key option as given: a function set as a class attribute would otherwise
    come back bound to the task, with the task as its first argument."""
    value = inspect.getattr_static(task, name, None)
    return value.__func__ if isinstance(value, (staticmethod, classmethod)) else value


def _policy(task: Any) -> str:
    policy = getattr(task, "when_busy", "skip")
    if policy not in BUSY_POLICIES:
        raise InvalidArgument(
            f"when_busy of task {task.name!r} must be one of {BUSY_POLICIES}, got {policy!r}"
        )
    return str(policy)


# -- tasks ---------------------------------------------------------------------------


class SingletonTask(Task):  # type: ignore[misc]
    """A task of which at most one run per key holds the lease at a time.

    Options (task attributes, e.g. ``@app.task(base=SingletonTask, lock_key=...)``):

    ``lock_key``: a ``str.format`` template over the task's arguments
    (``"meeting:{meeting_id}"``) or a callable taking them; default: the task
    name (one run at a time, whatever the arguments). The key is the lease name,
    so other code can take the same lock (``client.lock("meeting:7")``).
    ``lock_ttl``: lease TTL; the lease is renewed in the background while the
    task runs. ``when_busy``: ``"skip"`` (end at once with ``Skipped``; counted
    and logged), ``"retry"`` (``self.retry`` with a full-jitter countdown between
    ``lock_retry_initial`` and ``lock_retry_maximum`` seconds, at most
    ``lock_max_retries`` times -- None: the task's ``max_retries``) or ``"wait"``
    (block the worker slot until free, at most ``lock_wait_timeout`` seconds --
    None: forever -- then fail with ``AcquireTimeout``).

    ``dedupe`` (default True): ``apply_async``/``delay`` of a key already queued or
    running returns that run's ``AsyncResult`` (a record in the store, kept
    ``dedupe_ttl`` seconds at most, and counted as running only while the run's
    lease is held). ``once_per``: seconds; a key runs at most once per that long
    (store clock), later runs are skipped with reason ``"period"``.

    A skipped run ends with ``Skipped`` (never ``SUCCESS`` with ``None``), an INFO
    line and the ``task_skipped`` signal.

    The lease is released when the run ends: success, failure, ``self.retry()``,
    and ``revoke(terminate=True)`` (the pool child unwinds on SIGTERM). A killed
    worker's lease expires after ``lock_ttl``. If the lease is lost while the task
    runs (renewals failing until its safe deadline, or a successor after a long
    pause), the task fails with ``LeaseLost`` when it returns; call
    ``current_lease().check()`` before side effects to stop sooner.
    """

    lock_key: str | Callable[..., str] | None = None
    lock_ttl: float = 60.0
    when_busy: str = "skip"
    lock_wait_timeout: float | None = None
    lock_retry_initial: float = 1.0
    lock_retry_maximum: float = 60.0
    lock_max_retries: int | None = None
    leasehold_url: str | None = None
    dedupe: bool = True
    dedupe_ttl: float = 3600.0
    once_per: float | None = None
    throws = (Skipped,)

    def _leasehold_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        template = _key_option(self, "lock_key")
        if template is None:
            template = self.name
        return format_key(self, template, args, kwargs, what="lock_key")

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        **options: Any,
    ) -> Any:
        """Publish, unless a run of the same key is queued or running: then that
        run's ``AsyncResult`` (``dedupe = False`` turns this off)."""
        retrying = task_id is not None and task_id == self.request.id
        if not self.dedupe or retrying or self.app.conf.task_always_eager:
            return super().apply_async(args, kwargs, task_id=task_id, **options)
        key = self._leasehold_key(tuple(args or ()), dict(kwargs or {}))
        client = client_for(_store_url(self))

        def publish(new_id: str) -> Any:
            return super(SingletonTask, self).apply_async(args, kwargs, task_id=new_id, **options)

        def existing(found: str) -> Any:
            _count("deduped")
            logger.info("task %s: %r is already queued or running as %s", self.name, key, found)
            return self.AsyncResult(found)

        return _singleton.enqueue(client, key, task_id, self.dedupe_ttl, publish, existing)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        policy = _policy(self)
        key = self._leasehold_key(args, kwargs)
        client = client_for(_store_url(self))
        task_id = self.request.id
        if not (task_id and self.dedupe):
            return self._leasehold_run(client, key, policy, args, kwargs)
        try:
            result = self._leasehold_run(client, key, policy, args, kwargs)
        except Retry:
            # Published again under the same id (self.retry() publishes, then
            # raises): the key stays queued as that task, so enqueues still join it.
            _singleton.requeue(client, key, task_id, self.dedupe_ttl)
            raise
        except BaseException:
            _singleton.forget(client, key, task_id)
            raise
        _singleton.forget(client, key, task_id)  # this run is over
        return result

    def _leasehold_run(self, client: Client, key: str, policy: str, args: Any, kwargs: Any) -> Any:
        lock = client.lock(key, ttl=self.lock_ttl, on_lost=self._leasehold_lost)
        if policy == "wait":
            lease = lock.acquire(timeout=self.lock_wait_timeout)
            _count("waited")
        else:
            maybe = lock.try_acquire()
            if maybe is None:
                return self._leasehold_busy(client, key, policy)
            lease = maybe
        token = _current.set(lease)
        try:
            with lease:
                if self.request.id and self.dedupe:
                    _singleton.mark_running(client, key, self.request.id, self.dedupe_ttl)
                if self.once_per is None:
                    _count("ran")
                    return super().__call__(*args, **kwargs)
                done, started, version = _singleton.period_done(client, key, self.once_per)
                if done:
                    self._leasehold_skip(client, key, "period")
                _count("ran")
                result = super().__call__(*args, **kwargs)
                _singleton.mark_period_done(client, key, self.once_per, started, version)
                return result
        finally:
            _current.reset(token)

    def _leasehold_skip(self, client: Client, key: str, reason: str) -> None:
        _count("skipped")
        task_id = self.request.id
        if reason == "busy":
            owners = ", ".join(info.owner for info in client.holders(key)) or "nobody now"
            logger.info(
                "task %s[%s] skipped: %r is busy (held by %s)", self.name, task_id, key, owners
            )
        else:
            logger.info(
                "task %s[%s] skipped: %r already ran in the last %g s",
                self.name,
                task_id,
                key,
                self.once_per,
            )
        task_skipped.send(sender=self, task_id=task_id, key=key, reason=reason)
        raise Skipped(key, reason)

    def _leasehold_busy(self, client: Client, key: str, policy: str) -> Any:
        if policy == "skip":
            self._leasehold_skip(client, key, "busy")
        owners = ", ".join(info.owner for info in client.holders(key)) or "nobody now"
        task_id = self.request.id
        retries = int(self.request.retries or 0)
        countdown = _retry.delay(
            min(retries, 64), initial=self.lock_retry_initial, maximum=self.lock_retry_maximum
        )
        _count("busy_retries")
        logger.info(
            "task %s[%s]: %r is busy (held by %s); retrying in %.2f s",
            self.name,
            task_id,
            key,
            owners,
            countdown,
        )
        raise self.retry(countdown=countdown, max_retries=self.lock_max_retries)

    def _leasehold_lost(self, lease: Lease) -> None:
        _count("lost")
        logger.error(
            "task %s lost its lease %r (fence %d); it fails when it returns. "
            "Call leasehold.celery.current_lease().check() before side effects to stop sooner.",
            self.name,
            lease.name,
            lease.fence,
        )


class OnceTask(Task):  # type: ignore[misc]
    """A task that runs once per key; later runs return the stored result.

    Options: ``once_key`` (template or callable as for ``SingletonTask.lock_key``;
    default: the task name and a hash of its arguments, so "same task, same
    arguments" runs once), ``once_ttl`` (the runner's lease), ``once_keep``
    (seconds the result is kept; None: until forgotten), ``once_retry_failed``
    (after a failure, whether the next run runs again -- default True -- or fails
    with ``OnceFailed`` for ``once_keep`` seconds), ``once_wait_timeout`` (how long
    a duplicate waits for a running first run; None: as long as it takes).

    Concurrent duplicates wait for the first run and return its result; waiting
    duplicates of a failing run fail with ``OnceFailed``. Results are stored as
    JSON, like Celery's default result serializer.
    """

    once_key: str | Callable[..., str] | None = None
    once_ttl: float = 60.0
    once_keep: float | None = 24 * 3600.0
    once_retry_failed: bool = True
    once_wait_timeout: float | None = None
    leasehold_url: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        template = _key_option(self, "once_key")
        if template is None:
            digest = hashlib.sha256(
                json.dumps([args, kwargs], sort_keys=True, default=repr).encode()
            ).hexdigest()[:32]
            key = f"{self.name}:{digest}"
        else:
            key = format_key(self, template, args, kwargs, what="once_key")
        once = client_for(_store_url(self)).once(
            key,
            ttl=self.once_ttl,
            keep=self.once_keep,
            retry_failed=self.once_retry_failed,
            timeout=self.once_wait_timeout,
        )
        call = super().__call__

        def run(*args: Any, **kwargs: Any) -> Any:
            _count("once_runs")
            return call(*args, **kwargs)

        return once.run(run, *args, **kwargs)
