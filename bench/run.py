"""Run every benchmark scenario and write bench/results/ and docs/benchmarks.md.

    python -m bench            # the full run (about 30 minutes on 2 cores)
    python -m bench --quick    # a smoke run (under 2 minutes)
    python -m bench --only uncontended,contention --subjects redis-py,leasehold-redis \
        --no-docs --out /tmp/some-rows   # some rows only

Starts its own redis-server, PostgreSQL and etcd on loopback; nothing else is needed
beyond ``pip install -r bench/requirements.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import breakdown, contention, herd, renewal, report, scale, uncontended
from bench.common import isolated, machine
from bench.servers import EtcdServer, PostgresServer, RedisServer, Unavailable
from bench.subjects import BY_KEY, SUBJECTS, needs, version

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {
    "uncontended": uncontended,
    "contention": contention,
    "renewal": renewal,
    "herd": herd,
    "scale": scale,
    "breakdown": breakdown,  # last: its PostgreSQL probe changes server settings
}


@dataclass
class Settings:
    repeats: int
    s1_seconds: float
    s2_procs: tuple[int, ...]
    s2_seconds: float
    s3_sizes: tuple[int, ...]
    s3_ttl: float
    s3_window: float
    s4_waiters: int
    s4_handoffs: int
    s5_names: int
    s5_budget: float
    s5_seconds: float


# Five repeats: on the shared 2-core hosts the median of three still let rows within a
# few percent of their limits change sides from one run to the next.
FULL = Settings(
    repeats=5, s1_seconds=1.0, s2_procs=(2, 4, 8), s2_seconds=1.5,
    s3_sizes=(1, 100, 10_000), s3_ttl=3.0, s3_window=6.0,
    s4_waiters=1000, s4_handoffs=100, s5_names=100_000, s5_budget=90.0, s5_seconds=1.0,
)  # fmt: skip
QUICK = Settings(
    repeats=1, s1_seconds=0.2, s2_procs=(8,), s2_seconds=0.5,
    s3_sizes=(1, 1000), s3_ttl=1.5, s3_window=2.0,
    s4_waiters=1000, s4_handoffs=30, s5_names=10_000, s5_budget=10.0, s5_seconds=0.2,
)  # fmt: skip


@dataclass
class Context:
    settings: Settings
    env: dict[str, Any]
    rng: random.Random
    available: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    servers: dict[str, Any] = field(default_factory=dict)  # the server objects, by name

    def __getattr__(self, name: str) -> Any:  # ctx.s1_seconds etc.
        return getattr(self.settings, name)

    @staticmethod
    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _smoke(key: str, env: dict[str, Any]) -> dict[str, Any]:
    """One acquire + release: does this subject work here at all?"""
    subject = BY_KEY[key]
    name = f"bench-smoke-{key}-{uuid.uuid4().hex[:8]}"
    if subject.prepare is not None:
        subject.prepare(env, name)
    handle = subject.make(env, name)
    if subject.is_async:

        async def go() -> None:
            try:
                await handle.acquire()
                await handle.release()
            finally:
                await handle.close()

        asyncio.run(go())
    else:
        try:
            handle.acquire()
            handle.release()
        finally:
            handle.close()
    return {}


def check_subjects(
    ctx: Context, servers: dict[str, str], groups: list[str], keys: list[str]
) -> None:
    for subject in SUBJECTS:
        if keys and subject.key not in keys:
            continue
        if groups and subject.group not in groups:
            ctx.unavailable[subject.key] = "not selected (--groups)"
            continue
        server = needs(subject)
        if server is not None and server in servers:
            ctx.unavailable[subject.key] = servers[server]
            continue
        result = isolated(_smoke, subject.key, ctx.env, timeout=60)
        if "error" in result:
            ctx.unavailable[subject.key] = result["error"]
            ctx.log(f"UNAVAILABLE {subject.key}: {result['error'][:300]}")
        else:
            ctx.available.append(subject.key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (< 2 minutes)")
    parser.add_argument(
        "--only", default="", help="comma-separated scenarios: " + ",".join(SCENARIOS)
    )
    parser.add_argument(
        "--subjects",
        default="",
        help="comma-separated subject keys to measure (default: all): " + ",".join(BY_KEY),
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--groups", default="", help="comma-separated subject groups: redis,postgres,etcd,local"
    )
    args = parser.parse_args(argv)
    # The probes (breakdown) are left out of a quick run unless asked for.
    only = [s for s in args.only.split(",") if s] or [
        s for s in SCENARIOS if not (args.quick and s == "breakdown")
    ]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    keys = [k for k in args.subjects.split(",") if k]
    if set(keys) - set(BY_KEY):
        parser.error(f"unknown subjects: {', '.join(sorted(set(keys) - set(BY_KEY)))}")

    seed = args.seed if args.seed is not None else random.randrange(2**32)
    started = time.monotonic()
    load_before = os.getloadavg()
    workdir = tempfile.mkdtemp(prefix="leasehold-bench-")
    ctx = Context(QUICK if args.quick else FULL, {"dir": workdir}, random.Random(seed))
    servers: dict[str, Any] = {}
    down: dict[str, str] = {}
    groups = [g for g in args.groups.split(",") if g]
    launchers = (("redis", RedisServer), ("postgres", PostgresServer), ("etcd", EtcdServer))
    for name, launcher in launchers:
        if groups and name not in groups:
            continue
        try:
            servers[name] = ctx.servers[name] = launcher()
            ctx.env[name] = servers[name].url
            ctx.log(f"{name} at {servers[name].url}")
        except (Unavailable, OSError) as exc:
            down[name] = f"{name} server unavailable: {exc}"
            ctx.log(down[name])
    results: dict[str, Any] = {}
    try:
        check_subjects(ctx, down, groups, keys)
        for name in only:
            t0 = time.monotonic()
            ctx.log(f"== {name}")
            results[name] = SCENARIOS[name].run(ctx)
            results[name]["seconds"] = round(time.monotonic() - t0, 1)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    data = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "mode": "quick" if args.quick else "full",
        "seed": seed,
        "command": "python -m bench" + (" --quick" if args.quick else ""),
        "settings": vars(ctx.settings),
        "machine": {
            **machine(),
            "load_before": " ".join(f"{x:.1f}" for x in load_before),
            "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        },
        "servers": {name: server.version for name, server in servers.items()},
        "versions": {s.package: version(s.package) for s in SUBJECTS if s.package is not None},
        "subjects": {
            s.key: {
                "label": s.label,
                "group": s.group,
                "kind": s.kind,
                "mode": s.mode,
                "package": s.package,
                "settings": s.settings,
            }
            for s in SUBJECTS
        },
        "unavailable": ctx.unavailable,
        "results": results,
        "runtime_s": round(time.monotonic() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    report.write(data, args.out, None if args.no_docs else args.docs)  # adds data["targets"]
    (args.out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    ctx.log(f"done in {data['runtime_s']:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
