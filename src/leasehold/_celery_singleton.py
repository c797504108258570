"""The store side of ``leasehold.celery.SingletonTask``'s enqueue dedupe and
once-per-period runs. Plain functions over a sync client; no Celery imports.

Enqueue record ``celery-queued:<key>``: ``{"id": task_id, "state": "queued" |
"running"}``, written by compare-and-set with a TTL, so two producers racing
publish one task, and a record left by a killed producer or worker ends by
itself. A "running" record counts only while the task's lease (``<key>``) is
held: a killed worker's run stops deduplicating when its lease expires.

Period record ``celery-done:<key>``: when (store clock) the last successful run
started, kept for the period.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from leasehold._errors import StoreUnavailable
from leasehold._sync.client import Client

QUEUED = "celery-queued:"
DONE = "celery-done:"
_CAS_ATTEMPTS = 16


def _entry(value: bytes | None) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        found = json.loads(value)
    except ValueError:
        return None
    return found if isinstance(found, dict) and isinstance(found.get("id"), str) else None


def enqueue(  # noqa: PLR0917 -- internal, called from one place
    client: Client,
    key: str,
    task_id: str | None,
    ttl: float,
    publish: Callable[[str], Any],
    existing: Callable[[str], Any],
) -> Any:
    """``publish(task_id)`` unless a task for ``key`` is queued or running; then
    ``existing(its_id)``. ``task_id`` equal to the recorded one (a retry of that
    task) publishes again."""
    name = QUEUED + key
    store = client.store
    for _ in range(_CAS_ATTEMPTS):
        record = store.read_record(name)
        entry = _entry(record.value)
        if (
            entry is not None
            and entry["id"] != task_id
            and (entry.get("state") != "running" or client.holders(key))
        ):
            return existing(entry["id"])
        new_id = task_id or str(uuid.uuid4())
        value = json.dumps({"id": new_id, "state": "queued"}).encode()
        if store.write_record(name, record.version, value, ttl) is None:
            continue  # another producer won: look again
        try:
            return publish(new_id)
        except BaseException:
            forget(client, key, new_id)
            raise
    raise StoreUnavailable(f"enqueue of {key!r}: the record kept changing; try again")


def mark_running(client: Client, key: str, task_id: str, ttl: float) -> None:
    """The run of ``task_id`` started: duplicates now join it."""
    name = QUEUED + key
    store = client.store
    for _ in range(_CAS_ATTEMPTS):
        record = store.read_record(name)
        entry = _entry(record.value)
        if entry is not None and entry["id"] != task_id and entry.get("state") == "queued":
            return  # another task is queued behind this run: leave it pointing there
        value = json.dumps({"id": task_id, "state": "running"}).encode()
        if store.write_record(name, record.version, value, ttl) is not None:
            return


def requeue(client: Client, key: str, task_id: str, ttl: float) -> None:
    """``task_id`` was published again (a retry): queued as it, unless the record
    already points to another task."""
    name = QUEUED + key
    store = client.store
    for _ in range(_CAS_ATTEMPTS):
        record = store.read_record(name)
        entry = _entry(record.value)
        if entry is not None and entry["id"] != task_id:
            return
        value = json.dumps({"id": task_id, "state": "queued"}).encode()
        if store.write_record(name, record.version, value, ttl) is not None:
            return


def forget(client: Client, key: str, task_id: str) -> None:
    """Remove the record if it still points to ``task_id``."""
    name = QUEUED + key
    store = client.store
    for _ in range(_CAS_ATTEMPTS):
        record = store.read_record(name)
        entry = _entry(record.value)
        if entry is None or entry["id"] != task_id:
            return
        if store.write_record(name, record.version, None) is not None:
            return


def period_done(client: Client, key: str, period: float) -> tuple[bool, float, int]:
    """(a run of ``key`` started less than ``period`` seconds ago, now, the record
    version). Both times are the store's clock, the same for every worker."""
    record = client.store.read_record(DONE + key)
    try:
        last = float(record.value) if record.value is not None else None
    except ValueError:
        last = None
    done = last is not None and 0 <= record.now - last < period
    return done, record.now, record.version


def mark_period_done(client: Client, key: str, period: float, started: float, version: int) -> None:
    """Remember the start (store clock) of a successful run for ``period`` seconds."""
    client.store.write_record(DONE + key, version, repr(started).encode(), period)
