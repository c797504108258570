"""The targets that compare a leasehold subject with a reference, in one table.

report.targets reads it for the page's rows, and the two scenarios it covers read
it for which subjects to run side by side (see common.paired_order), so a target
changed here changes both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Scenario = Literal["uncontended", "contention"]


@dataclass(frozen=True)
class Target:
    text: str
    scenario: Scenario  # uncontended: one process; contention: its 8-process cells
    subject: str
    reference: str | None  # None: the subject's own metric against the limit
    metric: str  # p50_us, throughput, handoff_p50_us, fairness
    limit: float
    at_most: bool


def _ratio(text: str, scenario: Scenario, subject: str, reference: str, metric: str,
           limit: float, *, at_most: bool) -> Target:  # fmt: skip
    return Target(text, scenario, subject, reference, metric, limit, at_most)


def _fairness(text: str, subject: str, limit: float) -> Target:
    return Target(text, "contention", subject, None, "fairness", limit, at_most=False)


# Issue #16's targets: against the peers users choose between, and the floors.
COMPARED: Final = (
    _ratio("Redis: uncontended sync p50 ≤ 1.10x redis-py Lock",
           "uncontended", "leasehold-redis", "redis-py", "p50_us", 1.10, at_most=True),
    _ratio("Redis: uncontended asyncio p50 ≤ 1.20x redis-py asyncio Lock",
           "uncontended", "leasehold-redis-async", "redis-py-async", "p50_us", 1.20,
           at_most=True),
    _ratio("Redis: 8 processes, throughput ≥ 1.2x python-redis-lock",
           "contention", "leasehold-redis", "python-redis-lock", "throughput", 1.2,
           at_most=False),
    _ratio("Redis: 8 processes, throughput ≥ 0.5x BLPOP floor",
           "contention", "leasehold-redis", "redis-blpop", "throughput", 0.5, at_most=False),
    _ratio("Redis: 8 processes, handoff p50 ≤ 2.0x BLPOP floor",
           "contention", "leasehold-redis", "redis-blpop", "handoff_p50_us", 2.0, at_most=True),
    _fairness("Redis: 8 processes, fairness ≥ 0.9", "leasehold-redis", 0.9),
    _ratio("PostgreSQL (durable): uncontended ≤ 2.5x advisory lock pair",
           "uncontended", "leasehold-postgres", "pg-advisory", "p50_us", 2.5, at_most=True),
    _ratio("PostgreSQL (durable): 8 processes, throughput ≥ 0.2x advisory floor",
           "contention", "leasehold-postgres", "pg-advisory", "throughput", 0.2,
           at_most=False),
    _fairness("PostgreSQL (durable): 8 processes, fairness ≥ 0.9", "leasehold-postgres", 0.9),
    _ratio("PostgreSQL (?durability=relaxed): uncontended ≤ 1.5x advisory lock pair",
           "uncontended", "leasehold-postgres-relaxed", "pg-advisory", "p50_us", 1.5,
           at_most=True),
    _ratio("PostgreSQL (?durability=relaxed): 8 processes, throughput ≥ 0.5x advisory floor",
           "contention", "leasehold-postgres-relaxed", "pg-advisory", "throughput", 0.5,
           at_most=False),
    _ratio("etcd: uncontended sync p50 ≤ 2x put + delete floor",
           "uncontended", "leasehold-etcd", "etcd-putdel", "p50_us", 2.0, at_most=True),
    _ratio("etcd: 8 processes, throughput ≥ 0.5x etcd v3lock",
           "contention", "leasehold-etcd", "etcd-v3lock", "throughput", 0.5, at_most=False),
    _fairness("etcd: 8 processes, fairness ≥ 0.8", "leasehold-etcd", 0.8),
    _ratio("SQLite: uncontended ≤ 1.0x filelock",
           "uncontended", "leasehold-sqlite", "filelock", "p50_us", 1.0, at_most=True),
)  # fmt: skip


def side_by_side(scenario: Scenario) -> dict[str, str]:
    """Subject -> its group, for common.paired_order: the subjects that any target
    of ``scenario`` compares, joined into one group when targets share a subject
    (leasehold-postgres, its relaxed variant and pg-advisory run together)."""
    group: dict[str, str] = {}
    for target in COMPARED:
        if target.scenario != scenario or target.reference is None:
            continue
        ends = {group.get(target.subject, target.subject), group.get(target.reference,
                                                                     target.reference)}  # fmt: skip
        name = min(ends)
        for subject, current in list(group.items()):
            if current in ends:
                group[subject] = name
        group[target.subject] = group[target.reference] = name
    return group
