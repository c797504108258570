"""The Celery app that tests/test_celery.py runs in real worker and beat processes.

Configured from the environment (the test sets it): ``LH_CELERY_BROKER`` (a redis
URL, broker and result backend), ``LH_CELERY_STORE`` (the leasehold store),
``LH_CELERY_DIR`` (where tasks report what they did), ``LH_BEAT_TTL``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from celery import Celery  # type: ignore[import-untyped]
from celery.signals import after_task_publish  # type: ignore[import-untyped]

from leasehold.celery import OnceTask, SingletonTask

REPORTS = Path(os.environ.get("LH_CELERY_DIR", "."))

app = Celery("lh_test", broker=os.environ.get("LH_CELERY_BROKER"))
app.conf.update(
    result_backend=os.environ.get("LH_CELERY_BROKER"),
    leasehold_url=os.environ.get("LH_CELERY_STORE"),
    leasehold_beat_name="test-beat",
    leasehold_beat_ttl=float(os.environ.get("LH_BEAT_TTL", "30")),
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    beat_max_loop_interval=1.0,
    beat_schedule={
        "tick": {
            "task": "tests._celery_app.beat_tick",
            "schedule": 0.3,
            # Nobody consumes this queue: the test counts sends, not runs.
            "options": {"queue": "beat-only"},
        }
    },
)


def report(kind: str, **fields: Any) -> None:
    line = json.dumps({"kind": kind, "pid": os.getpid(), "t": time.time(), **fields})
    fd = os.open(REPORTS / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@after_task_publish.connect
def _count_beat_sends(sender: str | None = None, **_: Any) -> None:
    if sender == "tests._celery_app.beat_tick":
        report("beat_send")


@app.task
def ping() -> str:
    return "pong"


@app.task
def beat_tick() -> None:
    pass


@app.task(base=SingletonTask, lock_key="meeting:{meeting_id}", when_busy="skip", lock_ttl=5)
def close_meeting(meeting_id: int, hold: float = 1.0, tag: str = "") -> dict[str, Any]:
    report("close_meeting", meeting_id=meeting_id, tag=tag, edge="start")
    time.sleep(hold)
    report("close_meeting", meeting_id=meeting_id, tag=tag, edge="end")
    return {"closed": meeting_id, "tag": tag}


@app.task(
    base=SingletonTask,
    bind=True,
    lock_key="item:{item}",
    when_busy="retry",
    lock_ttl=5,
    lock_retry_initial=0.2,
    lock_retry_maximum=0.4,
    lock_max_retries=100,
)
def process_item(self: Any, item: str, hold: float = 1.0, tag: str = "") -> dict[str, Any]:
    report("process_item", item=item, tag=tag, edge="start", retries=self.request.retries)
    time.sleep(hold)
    report("process_item", item=item, tag=tag, edge="end")
    return {"item": item, "tag": tag, "retries": self.request.retries}


@app.task(base=SingletonTask, lock_key="hog:{name}", lock_ttl=1.0)
def hog(name: str) -> None:
    """Holds its lease until the test kills this pool process."""
    report("hog", name=name)
    time.sleep(3600)


@app.task(base=SingletonTask, lock_key="revocable:{name}", lock_ttl=30.0)
def revocable(name: str) -> None:
    """Holds its lease (TTL 30 s) until revoked with terminate=True."""
    report("revocable", name=name)
    time.sleep(3600)


@app.task(base=OnceTask, once_key="render:{doc_id}")
def render(doc_id: int) -> dict[str, Any]:
    report("render", doc_id=doc_id)
    time.sleep(0.5)
    return {"doc": doc_id, "url": f"/files/{doc_id}.pdf", "pid": os.getpid()}


@app.task(
    base=SingletonTask,
    lock_key="sweep:{meeting_id}",
    once_per=600.0,
    dedupe=False,
    lock_ttl=5,
)
def sweep_meeting(meeting_id: int, sweep: str = "") -> int:
    """Each meeting once per 600 s across all workers, however many
    sweeps ask for it."""
    report("sweep_meeting", meeting_id=meeting_id, sweep=sweep)
    time.sleep(0.05)
    return meeting_id
