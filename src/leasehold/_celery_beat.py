"""``leasehold.celery.LeaderScheduler``: one celery beat across hosts, the one that
leads an election. Imported from ``leasehold.celery``, where Celery's
``beat_scheduler = "leasehold.celery:LeaderScheduler"`` finds it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from celery.beat import Scheduler  # type: ignore[import-untyped]

from leasehold import retry as _retry
from leasehold._celery_url import _django_store_url, explicit_url
from leasehold._core import validate
from leasehold._errors import AcquireTimeout, StoreMisconfigured, StoreUnavailable
from leasehold._sync.client import Client
from leasehold._sync.election import Election
from leasehold._sync.lease import Lease

# The integration's one logger: beat's lines sit with the workers' in ``leasehold.celery``.
logger = logging.getLogger("leasehold.celery")


class LeaderScheduler(Scheduler):  # type: ignore[misc]
    """A celery beat scheduler that sends only while it leads an election.

    Run ``celery -A proj beat -S leasehold.celery:LeaderScheduler`` on as many
    hosts as you like. Configuration (``app.conf``): ``leasehold_url``,
    ``leasehold_beat_name`` (the election; default ``celery-beat:<app name>``),
    ``leasehold_beat_ttl`` (default 30 s: a dead leader is replaced within about
    that long).

    Followers block in the election's queue and take over when the leader stops
    (at once on a clean shutdown, which resigns) or dies (after the TTL). Right
    before each send the leader checks its lease, so a leader that lost its lease
    sends nothing more. The schedule state (each entry's last run and run count)
    lives in the store, written after each send, so a new leader neither repeats
    what its predecessor sent nor skips what fell due during the handover. A
    leader that dies between sending and writing may have that one send repeated
    by its successor: make the tasks themselves ``SingletonTask``/``OnceTask``
    when a repeat matters.
    """

    #: A follower campaigns in waits of at most this many seconds.
    standby_wait = 10.0

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        conf = app.conf
        self.election_name = validate.name(
            conf.get("leasehold_beat_name") or f"celery-beat:{app.main or 'celery'}",
            what="leasehold_beat_name",
        )
        self.lease_ttl = validate.ttl(
            float(conf.get("leasehold_beat_ttl") or 30.0), what="leasehold_beat_ttl"
        )
        url = conf.get("leasehold_url") or _django_store_url()
        self._url = explicit_url(None if url is None else str(url))
        self._client: Client | None = None
        self._election: Election | None = None
        self._lease: Lease | None = None
        self._in_store_call = 0
        self._failures = 0
        super().__init__(app, *args, **kwargs)

    # -- leadership --------------------------------------------------------------

    @property
    def leading(self) -> bool:
        lease = self._lease
        return lease is not None and lease.held

    @property
    def info(self) -> str:
        return f"    . leasehold election -> {self.election_name!r} (ttl {self.lease_ttl:g} s)"

    @contextmanager
    def _store_call(self) -> Iterator[None]:
        self._in_store_call += 1
        try:
            yield
        finally:
            self._in_store_call -= 1

    def _get_election(self) -> Election:
        if self._election is None:
            self._client = Client(self._url)
            self._election = self._client.election(self.election_name, ttl=self.lease_ttl)
        return self._election

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if self._lease is not None and not self._lease.held:
            logger.warning(
                "beat: lost the leadership of %r (term %d); standing by",
                self.election_name,
                self._lease.fence,
            )
            self._lease = None
        if self._lease is None:
            return self._stand_by()
        interval: float = super().tick(*args, **kwargs)
        return interval

    def _stand_by(self) -> float:
        election = self._get_election()
        try:
            with self._store_call():
                lease = election.campaign(timeout=min(self.max_interval, self.standby_wait))
                self._load_state(lease)
        except AcquireTimeout:
            return 0.0  # campaign again at once: the wait itself was the pause
        except StoreMisconfigured:
            raise  # beat stops with the error: retrying cannot fix the configuration
        except StoreUnavailable as exc:
            self._failures += 1
            pause = _retry.delay(min(self._failures - 1, 64), initial=0.5, maximum=10.0)
            logger.warning(
                "beat: store error while standing by (%s); retrying in %.2f s", exc, pause
            )
            return pause
        self._failures = 0
        self._lease = lease
        logger.info("beat: leading %r (term %d)", self.election_name, lease.fence)
        return 0.0

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        lease = self._lease
        if lease is None or not lease.held:
            logger.warning("beat: not sending %s: this beat does not lead any more", entry.name)
            return
        super().apply_entry(entry, producer=producer)
        self._save_state(lease, self.schedule.get(entry.name, entry))

    # -- shared schedule state ----------------------------------------------------

    @property
    def state_key(self) -> str:
        return f"{self.election_name}:schedule"

    def _load_state(self, lease: Lease) -> None:
        client = self._client
        assert client is not None
        record = client.store.read_record(self.state_key)
        data = json.loads(record.value) if record.value else {}
        for name, saved in data.get("entries", {}).items():
            entry = self.schedule.get(name)
            if entry is None:
                continue
            entry.last_run_at = datetime.fromisoformat(saved["last_run_at"])
            entry.total_run_count = int(saved["total_run_count"])
        # Rebuild the heap from the loaded state on the next tick.
        self._heap = None
        logger.debug("beat: term %d loaded the state of %d entries", lease.fence, len(data))

    def _save_state(self, lease: Lease, entry: Any) -> None:
        client = self._client
        assert client is not None
        store = client.store
        try:
            with self._store_call():
                while True:
                    record = store.read_record(self.state_key)
                    data = json.loads(record.value) if record.value else {}
                    if int(data.get("term", 0)) > lease.fence:
                        # A later leader has written: ours is over, whatever our
                        # lease still says.
                        logger.warning("beat: a newer leader wrote the schedule; standing by")
                        self._lease = None
                        return
                    data["term"] = lease.fence
                    data.setdefault("entries", {})[entry.name] = {
                        "last_run_at": entry.last_run_at.isoformat(),
                        "total_run_count": entry.total_run_count,
                    }
                    value = json.dumps(data, sort_keys=True).encode()
                    if store.write_record(self.state_key, record.version, value) is not None:
                        return
        except StoreUnavailable as exc:
            logger.warning("beat: could not save the schedule state of %s: %s", entry.name, exc)

    # -- shutdown -------------------------------------------------------------------

    def close(self) -> None:
        try:
            super().close()
        finally:
            # celery beat calls close() from its SIGTERM handler too, which may have
            # interrupted one of our own store calls; the SystemExit it raises then
            # unwinds that call and close() runs again, safely, where we resign.
            if not self._in_store_call:
                self._resign()

    def _resign(self) -> None:
        client, election = self._client, self._election
        self._client = self._election = self._lease = None
        if election is not None:
            try:
                if election.resign():
                    logger.info("beat: resigned the leadership of %r", self.election_name)
            except StoreUnavailable as exc:
                logger.warning("beat: could not resign (%s); the lease expires by itself", exc)
        if client is not None:
            client.close()
