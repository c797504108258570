"""The per-meeting Celery worker: each open meeting processed by one worker at a
time, renewed through slow calls, its writes fenced.

Environment: ``BROKER_URL`` (Redis: broker and results), ``LEASEHOLD_URL`` (the
lease store; here the same PostgreSQL), ``DATABASE_URL`` (the meetings table).

    python meetings.py init 20                 # create the table and 20 meetings
    celery -A meetings worker -c 3             # as many workers and hosts as you like
    python meetings.py sweep                   # from cron or beat, on any host, any number of times
"""

from __future__ import annotations

import os
import sys
import time

import psycopg
from celery import Celery
from celery.utils.log import get_task_logger

import leasehold.fence
from leasehold.celery import SingletonTask, current_lease

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql:///meetings")
SLOW_CALL_SECONDS = float(os.environ.get("SLOW_CALL_SECONDS", "3"))
logger = get_task_logger(__name__)

app = Celery("meetings", broker=os.environ.get("BROKER_URL"))
app.conf.update(
    result_backend=os.environ.get("BROKER_URL"),
    leasehold_url=os.environ.get("LEASEHOLD_URL"),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)


def transcribe(meeting_id: int) -> str:
    """Stands for the slow external call (transcription, video API): longer than
    the lease's TTL, so the lease must be renewed while it runs."""
    time.sleep(SLOW_CALL_SECONDS)
    return f"summary of meeting {meeting_id}"


@app.task(base=SingletonTask, lock_key="meeting:{meeting_id}", lock_ttl=2.0, when_busy="skip")
def process_meeting(meeting_id: int) -> int | None:
    lease = current_lease()
    # The lease makes runs of one meeting take turns; this check makes a late one a
    # no-op. A sweep that read the meeting as open just before the previous run
    # closed it enqueues it once more after that run ended (dedupe covers queued and
    # running tasks only), and that run finds it closed here, under the lease.
    with psycopg.connect(DATABASE_URL) as conn:
        row = conn.execute("SELECT status FROM meetings WHERE id = %s", (meeting_id,)).fetchone()
    if row is None or row[0] != "open":
        logger.info("meeting %s is %s already: nothing to do", meeting_id, row and row[0])
        return None
    summary = transcribe(meeting_id)  # 3 s under a 2 s TTL: renewed in the background
    lease.check()  # still ours? (LeaseLost if not: nothing written)
    with psycopg.connect(DATABASE_URL) as conn, conn.transaction():
        # The database itself refuses a superseded holder's write.
        leasehold.fence.check(conn, lease.name, lease.fence)
        conn.execute(
            "UPDATE meetings SET status = 'closed', summary = %s, fence = %s, runs = runs + 1 "
            "WHERE id = %s",
            (summary, lease.fence, meeting_id),
        )
    return lease.fence


@app.task
def sweep() -> list[str]:
    """Enqueue every open meeting. Run it from several hosts at once: a meeting
    queued or running already is not queued again (the same AsyncResult comes
    back), and a duplicate that slips through is skipped, visibly."""
    with psycopg.connect(DATABASE_URL) as conn:
        ids = [row[0] for row in conn.execute("SELECT id FROM meetings WHERE status = 'open'")]
    return [process_meeting.delay(meeting_id).id for meeting_id in ids]


def init(count: int) -> None:
    with psycopg.connect(DATABASE_URL) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS meetings (id int PRIMARY KEY, status text NOT NULL, "
            "summary text, fence bigint, runs int NOT NULL DEFAULT 0)"
        )
        conn.execute("TRUNCATE meetings")
        for meeting_id in range(1, count + 1):
            conn.execute("INSERT INTO meetings (id, status) VALUES (%s, 'open')", (meeting_id,))


if __name__ == "__main__":
    if sys.argv[1:2] == ["init"]:
        init(int(sys.argv[2]) if len(sys.argv) > 2 else 20)
    elif sys.argv[1:2] == ["sweep"]:
        print(len(sweep.delay().get(timeout=60)), "meetings enqueued")
    else:
        sys.exit(__doc__)
