"""Scenario 6: where the time of one acquire + release goes, for the page.

Runs the probes of ``python -m bench.probes`` (Redis, its asyncio cycle decomposed,
the instructions Redis executes per cycle under callgrind, and what one round trip
fewer per contended acquisition would give 8 processes, PostgreSQL durable
and relaxed, the PostgreSQL client's own time layer by layer, both from a C client
and both handing a lock over, 8 processes' hand-over chain link by link, SQLite,
the keeper) and the NOTIFY
ring of ``python -m bench.ring`` (the ceiling of a hand-over that NOTIFY wakes, beside
the advisory floor) against this run's own servers, and keeps what they print: round
trips, commands or statements the server ran and its time, WAL flushes, client CPU
and Python calls per acquire + release. It runs last: the PostgreSQL probe turns on
WAL timing and auto_explain on the server.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from typing import Any

from bench import hops, layers, pipeline, probes, ring
from bench.common import isolated

PROBE_TIMEOUT = 240.0


def _probe(which: str, env: dict[str, Any]) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if which == "redis":
            probes.redis_probe(env["redis"])
        elif which == "redis-asyncio":
            probes.redis_asyncio(env["redis"])
        elif which == "redis-instructions":
            probes.redis_instructions()
        elif which == "redis-pipeline":
            print("\n".join(pipeline.measure(env["redis"])))
        elif which == "postgres":
            probes.postgres_probe(env["postgres_server"])
        elif which == "postgres-relaxed":
            probes.postgres_probe(env["postgres_server"], relaxed=True)
        elif which == "postgres-layers":
            print("\n".join(layers.both(env["postgres_server"].url)))
        elif which == "postgres-c":
            probes.postgres_c_client(env["postgres_server"])
        elif which == "postgres-notify":
            probes.postgres_notify_fanout(env["postgres_server"])
        elif which == "postgres-contended":
            probes.postgres_contended(env["postgres_server"])
            probes.postgres_contended(env["postgres_server"], relaxed=True)
        elif which == "postgres-hops":
            for relaxed in (False, True):
                print("\n".join(hops.measure(env["postgres_server"], relaxed=relaxed)))
        elif which == "postgres-ring":
            rates = ring.measure(env["postgres"])
            for line in ring.lines(rates):
                print(line)
            return {"lines": out.getvalue().rstrip("\n").splitlines(), "rates": rates}
        elif which == "sqlite":
            probes.sqlite_probe(f"sqlite:///{tempfile.mkdtemp(prefix='leasehold-probe-')}/p.db")
        elif which == "keeper":
            urls = {"memory": "memory://"}
            urls.update({k: env[k] for k in ("redis", "postgres") if k in env})
            probes.keeper(urls)
    return {"lines": out.getvalue().rstrip("\n").splitlines()}


def run(ctx: Any) -> dict[str, Any]:
    env = {k: ctx.env[k] for k in ("redis", "postgres") if k in ctx.env}
    wanted = ["keeper", "sqlite"]
    if "redis" in env:
        wanted[:0] = ["redis", "redis-asyncio", "redis-instructions", "redis-pipeline"]
    if "postgres" in ctx.servers:
        env["postgres_server"] = ctx.servers["postgres"]
        wanted[1:1] = [
            "postgres", "postgres-relaxed", "postgres-layers", "postgres-c",
            "postgres-notify", "postgres-contended", "postgres-hops",
            "postgres-ring",
        ]  # fmt: skip
    found: dict[str, Any] = {}
    for which in wanted:
        ctx.log(f"probe {which}")
        found[which] = isolated(_probe, which, env, timeout=PROBE_TIMEOUT)
    return {"probes": found}
