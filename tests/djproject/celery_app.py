"""A Celery app of the Django test project, for a real worker process.

Environment: ``LH_DJ_BROKER`` (Redis), ``LH_DJ_PG_PORT``/``LH_DJ_PG_NAME`` (the
database), ``LH_DJ_EVENTS`` (a file the task appends to). No ``leasehold_url``:
the store is ``settings.LEASEHOLD`` (the Django database).
"""

from __future__ import annotations

import json
import os
import time

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.djproject.settings")
django.setup()

from celery import Celery  # noqa: E402
from django.db import connection, transaction  # noqa: E402

import leasehold.fence  # noqa: E402
from leasehold.celery import SingletonTask, current_lease  # noqa: E402
from tests.djproject.audio.models import Ledger  # noqa: E402

app = Celery("djproject", broker=os.environ.get("LH_DJ_BROKER"))
app.conf.update(
    result_backend=os.environ.get("LH_DJ_BROKER"),
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)


@app.task(base=SingletonTask, lock_key="dj-meeting:{meeting_id}", lock_ttl=5)
def close_meeting(meeting_id: int, hold: float = 1.0) -> int:
    lease = current_lease()
    with open(os.environ["LH_DJ_EVENTS"], "a") as events:
        events.write(json.dumps({"meeting": meeting_id, "pid": os.getpid()}) + "\n")
    time.sleep(hold)
    with transaction.atomic():
        leasehold.fence.check(connection, lease.name, lease.fence)
        Ledger.objects.create(name=lease.name, fence=lease.fence)
    return lease.fence
