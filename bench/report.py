"""Turn results.json into Markdown tables, PNG plots and docs/benchmarks.md."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.targets import COMPARED, Target

GROUPS = {
    "redis": "Redis",
    "postgres": "PostgreSQL",
    "etcd": "etcd",
    "local": "One host (files, SQLite, memory)",
}
SHORT = {"redis": "Redis", "postgres": "PostgreSQL", "etcd": "etcd", "local": "local"}
# The floor each (group, mode) is compared with: the cheapest safe lock on that store.
FLOORS = {
    ("redis", "sync"): "redis-setnx",
    ("redis", "async"): "redis-ping-async",
    ("postgres", "sync"): "pg-advisory",
    ("postgres", "async"): "pg-advisory-async",
    ("etcd", "sync"): "etcd-putdel",
    ("etcd", "async"): "etcd-putdel-async",
    ("local", "sync"): "flock",
    ("local", "async"): "flock",
}
HERD_OPS_LIMIT = 4.0  # release + next acquire + its wait, with one to spare
NAN = float("nan")


# -- small helpers -------------------------------------------------------------------


def med(entry: dict[str, Any] | None, metric: str) -> float:
    if not entry or "error" in entry or metric not in entry:
        return NAN
    value = entry[metric]
    return float(value["median"] if isinstance(value, dict) else value)


def num(x: float, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) < 10 and digits == 0 and x != int(x):
        return f"{x:.1f}"
    return f"{x:,.{digits}f}"


def ranged(entry: dict[str, Any], metric: str, digits: int = 0) -> str:
    value = entry.get(metric)
    if not isinstance(value, dict):
        return num(med(entry, metric), digits)
    text = num(value["median"], digits)
    if value.get("n", 1) > 1:
        text += f" ({num(value['min'], digits)}-{num(value['max'], digits)})"
    return text


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else NAN


def xr(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}x"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def label(data: dict[str, Any], key: str) -> str:
    subject = data["subjects"].get(key)
    if subject is None:
        return key
    return subject["label"] + (" ⟵" if subject["kind"] == "leasehold" else "")


# -- scenario 1 -------------------------------------------------------------------------


def best_competitor(data: dict[str, Any], group: str, mode: str) -> str | None:
    summary = data["results"]["uncontended"]["summary"]
    candidates = [
        key for key, s in data["subjects"].items()
        if s["group"] == group and s["kind"] == "competitor" and s["mode"] == mode
        and not math.isnan(med(summary.get(key), "p50_us"))
    ]  # fmt: skip
    if not candidates and mode == "async":
        return best_competitor(data, group, "sync")
    return min(candidates, key=lambda k: med(summary[k], "p50_us"), default=None)


def uncontended_tables(data: dict[str, Any]) -> str:
    summary = data["results"]["uncontended"]["summary"]
    out = []
    for group, title in GROUPS.items():
        rows = []
        for key, subject in data["subjects"].items():
            if subject["group"] != group or key not in summary:
                continue
            entry = summary[key]
            if "error" in entry:
                rows.append([label(data, key), subject["mode"], "failed: " + _short(entry["error"]),
                             "", "", "", "", ""])  # fmt: skip
                continue
            p50 = med(entry, "p50_us")
            floor = FLOORS[(group, subject["mode"])]
            best = best_competitor(data, group, subject["mode"])
            vs_best = ratio(p50, med(summary.get(best), "p50_us")) if best else NAN
            rows.append([
                label(data, key), subject["mode"], ranged(entry, "p50_us"), ranged(entry, "p99_us"),
                num(med(entry, "ops_per_s")), num(med(entry, "cpu_us_per_op")),
                xr(ratio(p50, med(summary.get(floor), "p50_us"))),
                "" if key == best or subject["kind"] == "floor" else xr(vs_best),
            ])  # fmt: skip
        if rows:
            out.append(f"**{title}** — floors: {label(data, FLOORS[(group, 'sync')])} for sync, "
                       f"{label(data, FLOORS[(group, 'async')])} for asyncio\n")  # fmt: skip
            head = ["subject", "api", "p50 µs", "p99 µs", "ops/s", "CPU µs/op", "p50 x floor",
                    "p50 x best competitor"]  # fmt: skip
            out.append(table(head, rows) + "\n")
    return "\n".join(out)


# -- scenario 2 -------------------------------------------------------------------------


def contention_table(data: dict[str, Any]) -> str:
    summary = data["results"]["contention"]["summary"]
    rows = []
    order = list(data["subjects"])
    for cell in sorted(summary, key=lambda c: (order.index(c.split("@")[0]), int(c.split("@")[1]))):
        key, procs = cell.split("@")
        entry = summary[cell]
        group = SHORT[data["subjects"][key]["group"]]
        if "error" in entry:
            rows.append([group, label(data, key), procs, "failed: " + _short(entry["error"])]
                        + [""] * 7)  # fmt: skip
            continue
        starved = sum(1 for counts in entry["per_process"] for c in counts if c == 0)
        rows.append([
            group, label(data, key), procs, ranged(entry, "throughput"),
            ranged(entry, "handoff_p50_us"), ranged(entry, "handoff_p99_us"),
            num(med(entry, "wait_p99_us")), ranged(entry, "fairness", 2), str(starved),
            str(entry["lost_updates"]), str(entry["errors"]),
        ])  # fmt: skip
    head = ["store", "subject", "procs", "acq/s", "handoff p50 µs", "handoff p99 µs",
            "wait p99 µs", "fairness", "starved", "lost updates", "errors"]  # fmt: skip
    return table(head, rows)


# -- scenarios 3-5 ----------------------------------------------------------------------


def renewal_table(data: dict[str, Any]) -> str:
    res = data["results"]["renewal"]
    rows = []
    for cell, entry in res["summary"].items():
        backend, n = cell.split("@")
        if "error" in entry:
            rows.append([backend, n, "failed: " + _short(entry["error"])] + [""] * 6)
            continue
        rows.append([
            backend, f"{entry['leases']:,}", num(med(entry, "renew_calls_per_interval"), 2),
            num(med(entry, "items_per_call")), num(med(entry, "renew_call_ms"), 1),
            num(med(entry, "cpu_ms_per_interval"), 1),
            num(med(entry, "server_scripts_per_interval"), 2),
            num(med(entry, "populate_s"), 1), f"{entry['lost']} / {entry['warnings']}",
        ])  # fmt: skip
    head = ["store", "leases", "renew calls / interval", "items / call", "ms / renew call",
            "client CPU ms / interval", "Redis scripts / interval", "acquiring them took s",
            "lost / warnings"]  # fmt: skip
    return table(head, rows)


def herd_table(data: dict[str, Any]) -> str:
    rows = []
    for cell, r in data["results"]["herd"]["summary"].items():
        name = "redis-py asyncio Lock" if cell == "redis-py" else f"leasehold ({cell}, asyncio)"
        if "error" in r:
            rows.append([name, "failed: " + _short(r["error"])] + [""] * 9)
            continue
        kinds = ", ".join(
            f"{k} {v:.1f}" for k, v in sorted(r.get("ops_by_kind_per_handoff", {}).items())
        )
        server = r.get("server_per_handoff", {})
        rows.append([
            name, f"{r['handoffs']} / {r['waiters']}", num(r["ops_per_handoff"], 1), kinds or "-",
            num(server.get("server_scripts", NAN), 1), num(server.get("server_commands", NAN), 1),
            num(r["handoff_p50_us"]), num(r["handoff_p99_us"]), num(r["idle_ops_per_s"]),
            num(r["idle_server_commands_per_s"]) if "server_commands" in str(server) else "-",
            str(r.get("stuck_after_cancel", "-")),
        ])  # fmt: skip
    head = ["subject", "handoffs / waiters", "store ops / handoff", "by operation",
            "Redis scripts / handoff", "Redis commands / handoff", "handoff p50 µs",
            "handoff p99 µs", "idle store ops/s", "idle Redis commands/s",
            "waiters stuck 5 s after cancel()"]  # fmt: skip
    return table(head, rows)


def scale_table(data: dict[str, Any]) -> str:
    rows = []
    for cell, r in data["results"]["scale"]["summary"].items():
        name = "redis-py Lock" if cell == "redis-py" else f"leasehold ({cell})"
        if "error" in r:
            rows.append([name, "failed: " + _short(r["error"])] + [""] * 5)
            continue
        rows.append([
            name, f"{r['live']:,} / {r['target']:,}", num(r["fill_per_s"]),
            num(r["bytes_per_lease"]), num(r["ops_per_s_empty"]), num(r["ops_per_s_full"]),
            f"{r['slowdown']:.2f}x",
        ])  # fmt: skip
    head = ["subject", "live names", "filled per s", "store bytes / live lease",
            "acq+rel/s, empty", "acq+rel/s, full", "slowdown"]  # fmt: skip
    return table(head, rows)


# -- targets ----------------------------------------------------------------------------


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    res = data["results"]
    s1 = res.get("uncontended", {}).get("summary", {})
    s2 = res.get("contention", {}).get("summary", {})
    s3 = res.get("renewal", {}).get("summary", {})
    s4 = res.get("herd", {}).get("summary", {})
    out: list[dict[str, Any]] = []

    def add(target: str, value: float, limit: float, *, at_most: bool, shown: str = "") -> None:
        met = None if math.isnan(value) else (value <= limit if at_most else value >= limit)
        if not shown and xr(value) == xr(limit) and value != limit:
            # Two decimals would show the limit itself beside "missed" (or "met" for a
            # hair over it): a third tells which side of it the run fell.
            shown = f"{value:.3f}x"
        out.append({"target": target, "measured": shown or xr(value), "value": value, "met": met})

    def measured(target: Target, key: str) -> float:
        if target.scenario == "uncontended":
            return med(s1.get(key), target.metric)
        return med(s2.get(f"{key}@8"), target.metric)

    # Issue #16's targets (bench/targets.py): against the peers users choose between,
    # and the floors.
    for goal in COMPARED:
        mine = measured(goal, goal.subject)
        if goal.reference is None:
            add(goal.text, mine, goal.limit, at_most=goal.at_most, shown=num(mine, 2))
        else:
            reference = measured(goal, goal.reference)
            add(goal.text, ratio(mine, reference), goal.limit, at_most=goal.at_most)
    cells = [e for c, e in s2.items() if c.startswith("leasehold-sqlite@") and "error" not in e]
    worst = min((med(e, "fairness") for e in cells), default=NAN)
    add(
        "SQLite: contended fairness ≥ 0.8 (worst of 2/4/8 processes)",
        worst,
        0.8,
        at_most=False,
        shown=num(worst, 2),
    )
    starved = sum(1 for e in cells for counts in e["per_process"] for c in counts if c == 0)
    add(
        "SQLite: no starved process",
        float(starved) if cells else NAN,
        0,
        at_most=True,
        shown=f"{starved} starved" if cells else "",
    )
    largest: dict[str, str] = {}  # backend -> its biggest measured cell
    for cell in s3:
        backend, n = cell.split("@")
        if backend not in largest or int(n) > int(largest[backend].split("@")[1]):
            largest[backend] = cell
    for backend, cell in largest.items():
        entry, n = s3[cell], int(cell.split("@")[1])
        # Calls per renewal round: every call should carry all n leases. (Calls per
        # *nominal* interval run up to ~1.2: rounds come up to 10 % early by design
        # (jitter), and a window of a few intervals catches one round more or less.)
        items = med(entry, "items_per_call")
        value = n / items if items else NAN
        per_interval = num(med(entry, "renew_calls_per_interval"), 2)
        shown = f"{num(value, 2)} calls per round ({per_interval} per interval)"
        if backend == "redis":  # the server's view: one script call per round
            calls = med(entry, "renew_calls_per_interval")
            scripts = med(entry, "server_scripts_per_interval")
            value = max(value, scripts / calls if calls else NAN)
            shown = f"1 round trip carrying {num(value, 2)} scripts of ≤ 1,000 leases"
        add(
            f"Renewal ({backend}): 1 store call per renewal round for {n:,} leases",
            value,
            1.05,
            at_most=True,
            shown=shown,
        )
    for cell, entry in s4.items():
        if cell == "redis-py":
            continue
        value = entry.get("ops_per_handoff", NAN) if "error" not in entry else NAN
        if "error" not in entry and not entry.get("complete"):
            value = max(value, HERD_OPS_LIMIT + 1) if not math.isnan(value) else NAN
        shown = num(value, 1) + " ops/handoff"
        if "error" not in entry and not entry.get("complete"):
            shown += f" (only {entry['handoffs']} handoffs in time)"
        target = f"Herd ({cell}): O(1) store ops per handoff, 1,000 waiters (≤ {HERD_OPS_LIMIT:g})"
        add(target, value, HERD_OPS_LIMIT, at_most=True, shown=shown)
    return out


def targets_table(rows: list[dict[str, Any]]) -> str:
    marks = {True: "✅ met", False: "❌ missed", None: "not measured"}
    return table(["target", "measured", "status"],
                 [[r["target"], r["measured"] or "-", marks[r["met"]]] for r in rows])  # fmt: skip


PG_FLOORS_INTRO = (
    "Not targets: the PostgreSQL rows above measured against what their own guarantees "
    "cost on this server, in this run. Uncontended: a one-row INSERT + DELETE from the "
    "same Python client (psycopg), durable and with `synchronous_commit=off` (a table-kept "
    "lease's least cost: no fence, no expiry, no queue). 8 processes: the NOTIFY ring of "
    "section 6 (the fastest any hand-over woken by NOTIFY can go, with and without a WAL "
    "flush per hop), and that ring against the advisory floor: the most an 8-process "
    "target against that floor could ask of a NOTIFY-woken hand-over here."
)


def pg_floors(data: dict[str, Any]) -> list[list[str]]:
    """leasehold on PostgreSQL against floors with its own guarantees (see PG_FLOORS_INTRO)."""
    res = data["results"]
    s1 = res.get("uncontended", {}).get("summary", {})
    s2 = res.get("contention", {}).get("summary", {})
    probe = res.get("breakdown", {}).get("probes", {}).get("postgres-ring", {})
    eight = probe.get("rates", {}).get("8", {})
    rows: list[list[str]] = []

    def p50(key: str) -> float:
        return med(s1.get(key), "p50_us")

    def rate(key: str) -> float:
        return med(s2.get(f"{key}@8"), "throughput")

    for mode, key, floor in (
        ("durable", "leasehold-postgres", "pg-table"),
        ("relaxed", "leasehold-postgres-relaxed", "pg-table-relaxed"),
    ):
        mine, base = p50(key), p50(floor)
        if not (math.isnan(mine) or math.isnan(base)):
            floor_shown = f"{label(data, floor)}: {base:.0f} us"
            rows.append([f"{mode}, uncontended p50", f"{mine:.0f} us", floor_shown,
                         xr(ratio(mine, base))])  # fmt: skip
    advisory = rate("pg-advisory")
    for mode, key, kind in (
        ("durable", "leasehold-postgres", "durable ring"),
        ("relaxed", "leasehold-postgres-relaxed", "ring"),
    ):
        mine, base = rate(key), float(eight.get(kind, NAN))
        if not (math.isnan(mine) or math.isnan(base)):
            rows.append([f"{mode}, 8 processes", f"{mine:,.0f} acq/s",
                         f"NOTIFY {kind} of 8: {base:,.0f} hops/s "
                         f"(= {xr(ratio(base, advisory))} the advisory floor)",
                         xr(ratio(mine, base))])  # fmt: skip
    return rows


# -- plots ------------------------------------------------------------------------------


def plots(data: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    colors = {"floor": "#9e9e9e", "competitor": "#4c72b0", "leasehold": "#dd8452"}
    s1 = data["results"].get("uncontended", {}).get("summary", {})
    if s1:
        # Only the groups measured in this run (python -m bench --groups ...).
        shown = [g for g in GROUPS if any(data["subjects"][k]["group"] == g for k in s1)]
        fig, grid = plt.subplots(len(shown), 1, figsize=(9, 4 * len(shown)), squeeze=False)
        for ax, group in zip(grid[:, 0], shown, strict=True):
            keys = [
                k
                for k, s in data["subjects"].items()
                if s["group"] == group and not math.isnan(med(s1.get(k), "p50_us"))
            ]
            if not keys:  # a run of some subjects only (--subjects)
                ax.set_visible(False)
                continue
            p50 = [med(s1[k], "p50_us") for k in keys]
            p99 = [med(s1[k], "p99_us") for k in keys]
            names = [
                f"{data['subjects'][k]['label']} [{data['subjects'][k]['mode']}]" for k in keys
            ]
            cs = [colors[data["subjects"][k]["kind"]] for k in keys]
            ax.barh(names, p50, color=cs)
            ax.scatter(p99, names, marker="|", color="black", s=80, label="p99", zorder=3)
            ax.set_xscale("log")
            ax.invert_yaxis()
            short = SHORT[group] if group != "local" else "One host"
            ax.set_title(f"{short}: uncontended acquire+release, p50 bars, p99 ticks")
            ax.set_xlabel("µs (log scale)")
            ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=90)
        plt.close(fig)
        made.append("latency.png")
    s2 = data["results"].get("contention", {}).get("summary", {})
    if s2:
        present = {data["subjects"][c.split("@")[0]]["group"] for c in s2}
        groups = {g: t for g, t in GROUPS.items() if g in present}
        fig, grid = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4.5), squeeze=False)
        for ax, (group, title) in zip(grid[0], groups.items(), strict=True):
            for cell, entry in s2.items():
                key, procs = cell.split("@")
                if procs != "8" or data["subjects"][key]["group"] != group or "error" in entry:
                    continue
                xs = entry["handoff_sample_us"]
                if not xs:
                    continue
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                style = "-" if data["subjects"][key]["kind"] != "leasehold" else "-."
                width = 2.5 if data["subjects"][key]["kind"] == "leasehold" else 1.2
                ax.step(xs, ys, style, where="post", label=label(data, key), linewidth=width)
            ax.set_xscale("log")
            ax.set_title(f"{title.split(' (')[0]}: handoff latency, 8 processes")
            ax.set_xlabel("release → next holder's acquire returns, µs (log)")
            ax.set_ylabel("fraction of handoffs")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "handoff_cdf.png", dpi=90)
        plt.close(fig)
        made.append("handoff_cdf.png")

        procs_list = sorted({int(c.split("@")[1]) for c in s2})
        fig, grid = plt.subplots(len(groups), 1, figsize=(10.5, 3.7 * len(groups)), squeeze=False)
        for ax, (group, title) in zip(grid[:, 0], groups.items(), strict=True):
            keys = list(dict.fromkeys(
                c.split("@")[0] for c in s2 if data["subjects"][c.split("@")[0]]["group"] == group
            ))  # fmt: skip
            width = 0.8 / max(1, len(procs_list))
            for j, procs in enumerate(procs_list):
                vals = [med(s2.get(f"{k}@{procs}"), "fairness") for k in keys]
                ys = [i + j * width for i in range(len(keys))]
                ax.barh(ys, vals, height=width, label=f"{procs} processes")
                for y, v in zip(ys, vals, strict=True):
                    if not math.isnan(v):  # print the value: a 0.00 bar is invisible
                        ax.text(v + 0.01, y, f"{v:.2f}", va="center", fontsize=6)
            ax.set_yticks([i + width * (len(procs_list) - 1) / 2 for i in range(len(keys))])
            ax.set_yticklabels([label(data, k) for k in keys])
            ax.invert_yaxis()
            ax.set_xlim(0, 1.1)
            ax.axvline(0.9, color="grey", linestyle=":")
            ax.set_title(f"{title.split(' (')[0]}: fairness = min/max acquisitions per process")
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        fig.savefig(out / "fairness.png", dpi=90)
        plt.close(fig)
        made.append("fairness.png")
    return made


# -- documents --------------------------------------------------------------------------


def _short(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")[:160]


BREAKDOWN_INTRO = (
    "What `python -m bench.probes` reports for one uncontended acquire + release (and, "
    "for Redis and PostgreSQL, for a lock handed back and forth between two clients), run "
    "in this same run against the same servers, one process, nothing else running: "
    "round trips, what the server ran and the time it spent, WAL flushes (PostgreSQL), "
    "client CPU and Python function calls (cProfile counts; each resumption of a "
    "coroutine counts as a call, so compare asyncio only with itself). The asyncio "
    "Redis block sets the client's CPU (process time, which includes the kernel's "
    "loopback work for what it sends) and the server's beside the wall time, with "
    "the event loop's returns to its selector. Wall times here are single-process "
    "p50s, not the table's medians of repeats. **redis-pipeline** runs leasehold's Redis "
    "scripts from 8 processes on one lock over raw connections, with the queueing acquire "
    "and its BLPOP sent one after the other (3 round trips per contended acquisition, as "
    "the client does) and together (2): what that idea of issue #16 would give here. "
    "**postgres-layers** sends the same uncontended acquire + release four ways, "
    "interleaved: leasehold's two SQL functions through its direct path on a bare "
    "connection, the store's calls without and with the operation deadline that bounds "
    "every store call, and the whole lock; with the client's CPU (its calling thread), "
    "what each layer of the client adds to the PostgreSQL rows. "
    "**postgres-hops** runs 8 processes on "
    "one lock, as section 2 does, and times each hand-over link by link: what bounds "
    "the 8-process PostgreSQL rows, and whether it is CPU (then the CPUs stand busy) or "
    "the chain's latency (then they stand partly idle). **postgres-notify** times, from "
    "pgbench, the release that hands the lock over with no LISTEN connection in the "
    "database, with the waiter's alone, and with the waiter's and seven others on channels "
    "of their own (as at 8 processes): PostgreSQL signals every listening backend of the "
    "database at each NOTIFY, whatever its channel, and the release's commit sends those "
    "signals, inside the hand-over chain."
)
BREAKDOWN_ORDER = (
    "redis", "redis-asyncio", "redis-instructions", "redis-pipeline", "postgres",
    "postgres-relaxed", "postgres-layers", "postgres-c", "postgres-notify",
    "postgres-contended", "postgres-hops", "postgres-ring", "sqlite", "keeper",
)  # fmt: skip


def breakdown_text(data: dict[str, Any]) -> str:
    probes = data["results"]["breakdown"]["probes"]
    blocks = [BREAKDOWN_INTRO, ""]
    for which in BREAKDOWN_ORDER:
        found = probes.get(which)
        if found is None:
            continue
        if "error" in found:
            blocks.append(f"- {which}: probe failed: {_short(found['error'])}")
            continue
        blocks.append(f"**{which}**\n\n```\n" + "\n".join(found["lines"]) + "\n```\n")
    return "\n".join(blocks)


def results_markdown(data: dict[str, Any], target_rows: list[dict[str, Any]]) -> str:
    res = data["results"]
    parts = [f"## Targets\n\n{targets_table(target_rows)}\n"]
    floors = pg_floors(data)
    if floors:
        parts.append("### PostgreSQL against floors with its guarantees\n\n" + PG_FLOORS_INTRO
                     + "\n\n" + table(["leasehold", "measured", "floor", "ratio"], floors)
                     + "\n")  # fmt: skip
    if "uncontended" in res:
        parts.append("## 1. Uncontended acquire + release\n\nMedian over repeats; (min-max) "
                     "of the repeats in brackets. ⟵ marks leasehold.\n\n"
                     + uncontended_tables(data))  # fmt: skip
    if "contention" in res:
        parts.append("## 2. Contention: N processes, one lock, a non-atomic counter\n\n"
                     + contention_table(data) + "\n")  # fmt: skip
    if "renewal" in res:
        r = res["renewal"]
        parts.append(f"## 3. Renewal cost (ttl {r['ttl']:g} s, so the keeper's interval is "
                     f"{r['ttl'] / 3:g} s; measured over {r['window']:g} s and on to the end of "
                     "the next renew call, from just after one ended)\n\n"
                     + renewal_table(data) + "\n")  # fmt: skip
    if "herd" in res:
        parts.append("## 4. Herd: 1,000 asyncio waiters on one lock\n\n" + herd_table(data) + "\n")
    if "scale" in res:
        parts.append("## 5. Scale: many live names\n\n" + scale_table(data) + "\n")
    if "breakdown" in res:
        parts.append("## 6. Where the time goes\n\n" + breakdown_text(data) + "\n")
    if data["unavailable"]:
        rows = [[label(data, k), _short(v)] for k, v in data["unavailable"].items()]
        parts.append("## Not measured\n\n" + table(["subject", "why"], rows) + "\n")
    return "\n".join(parts)


def environment(data: dict[str, Any]) -> str:
    m = data["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(data["versions"].items()) if v)
    servers = "; ".join(data["servers"].values())
    load = m.get("load_before", "?")
    return (
        f"- run: `{data['command']}` on {data['created']} ({data['mode']} mode, "
        f"{data['settings']['repeats']} repeat(s), seed {data['seed']}, took "
        f"{data['runtime_s'] / 60:.1f} min)\n"
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux "
        f"{m['kernel']}, Python {m['python']}, git {m['git_commit'] or '?'}; load average "
        f"before/after: {load} / {m.get('load_after', '?')}\n"
        f"- servers (on loopback, started by the benchmark): {servers}\n"
        f"- libraries: {versions}\n"
    )


def competitors(data: dict[str, Any]) -> str:
    rows = [[s["label"], SHORT[s["group"]], s["kind"], s["mode"], s["settings"]]
            for s in data["subjects"].values()]  # fmt: skip
    return table(["subject", "store", "kind", "api", "settings"], rows)


DOC_HEAD = """# Benchmarks

<!-- GENERATED by `python -m bench` (bench/report.py) from bench/results/results.json.
     Do not edit by hand: run the benchmark again. -->

leasehold measured side by side with the locks users would pick instead, and with
the floor each store allows, all in the same run on the same machine.

## How to reproduce

```
pip install -e '.[all]' -r bench/requirements.txt
python -m venv .venv-mithril && .venv-mithril/bin/pip install mithril-locks  # pins redis<8
export LEASEHOLD_BENCH_MITHRIL_PYTHON=.venv-mithril/bin/python
python -m bench            # full run, about 30 minutes on 2 cores
python -m bench --quick    # smoke run, under 2 minutes
python -m bench --only uncontended,contention --no-docs   # a subset
python -m bench --only uncontended --subjects redis-py,leasehold-redis --no-docs --out /tmp/rows
python -m bench.probes     # where the time of one acquire + release goes
```

The command starts its own `redis-server` (random loopback port, `--save ""`,
no AOF) and a PostgreSQL 15 cluster (`initdb` into a temp dir, random port, default
settings except `max_connections=200`; run as the `postgres` user when started as root). It writes
`bench/results/results.json` (every repeat, machine facts, versions),
`bench/results/results.md` (the tables below), the plots, and this page.

How it measures:

- Every measurement runs in its own process (forked) with a time bound; a library that
  hangs or crashes costs at most that bound and is reported as failed, never faked.
- Subjects run in a shuffled order on every repeat, except that the subjects a target
  compares run one after another (in a random order of their own), so that both sides
  meet the same load; tables show the median over repeats and (min-max) across them.
- Handoff latency: the releasing process stamps `time.monotonic_ns()` just before it calls
  release; the next holder stamps when its acquire returns. CLOCK_MONOTONIC is system-wide
  on Linux, so the two stamps are comparable across processes.
- The critical section reads a shared-memory counter, yields the CPU, writes it back plus
  one: two holders at once lose updates. "lost updates" must be 0.
- Fairness = min / max acquisitions per process during the window.
- Competitors use their defaults. Where a default makes no sense for a lease lock (a lock
  that never expires) the setting is listed below.

"""

DOC_CAVEATS = """
## Reading these numbers

- This is a small shared VM: other jobs ran at the same time (see the load average
  above), so p99s are noisy and single repeats can be off by 2x; ratios within one run
  are more trustworthy than absolute numbers.
- Ratios against a floor also move with the machine. A faster loopback makes the floors
  (two plain commands, an advisory pair) faster, while the server work a lease adds
  (Lua scripts, PL/pgSQL functions) does not shrink with it, so the same code reads a
  higher ratio there. Compare runs made on the same machine.
- Unfair locks (redis-py, sherlock, tooz, portalocker, filelock) often show *higher*
  throughput than fair ones under contention: the releasing process re-acquires its own
  lock before a sleeping waiter wakes, so most "acquisitions" are no handoff at all.
  Fairness and the handoff latency show the price.
- leasehold renews leases by default (a keeper thread); the competitors measured here do
  not, unless stated.
- mithril-locks logs every acquire and release at `info` through structlog, which prints
  to stdout by default; the benchmark configures its structlog logger to warnings and
  above (no other setting changed). It requires redis-py < 8, so it runs in a virtual
  environment of its own (`LEASEHOLD_BENCH_MITHRIL_PYTHON=path/to/python`, see
  bench/requirements.txt) with that redis-py; every other subject uses the redis-py
  listed above. Without that variable it is measured here only if it imports.
- `leasehold (relaxed)` is PostgreSQL with `?durability=relaxed` (docs/backends.md,
  "Relaxed durability"): grants commit without waiting for their WAL flush, and a crash
  costs a quarantine of the longest ttl instead. `leasehold` is the default, durable.
- **postgres-c** in section 6 runs leasehold's SQL functions from pgbench, a C client
  with no cost of its own, against the advisory pair from the same client. Its ratios
  are the least any client could reach on this server and disk: where they are above a
  PostgreSQL target, that target is out of reach of client work. Its two "bare
  INSERT+DELETE" rows are the least any lease kept in a table costs (no fence, no
  per-name lock, no queue): where they are near or above a target, no table-kept lease
  with those guarantees meets it here.
- **postgres-ring** in section 6 passes a token around a ring of processes by NOTIFY
  alone: each LISTENs on its own channel and, woken, notifies the next one from its other
  connection, as a leasehold process does. No table, no lock, no fence; the durable ring
  also updates one row per hop, so every hop waits for a WAL flush, as a durable grant
  does. A fair lock that hands its place over and wakes the next holder by NOTIFY hands
  over no faster than this ring at the same process count: its ratio to the advisory
  floor is the most the 8-process PostgreSQL targets could reach with NOTIFY wake-ups
  here. (The advisory floor hands over inside the server: PostgreSQL's lock manager
  grants the released lock to the first waiting backend and wakes it, and that
  backend's blocked call answers its client; no notification, no second connection.)
- Contention runs use the sync flavour of every competitor; their asyncio twins wait the
  same way (polling with sleep) and are measured uncontended only. leasehold runs both.

## Not measured, and why

- The in-memory store in contention: it lives inside one process, so there is nothing for
  several processes to contend on (it is in the herd, which is one process).
- A herd on plain PostgreSQL advisory locks: each waiter needs its own connection, and
  1,000 waiters exceed `max_connections`.
- Renewal cost of the competitors: none renews by default. python-redis-lock's
  `auto_renewal=True` starts one thread per held lock, pottery extends by hand.
- Memory per live lock for tooz, sherlock, pottery, python-redis-lock: each stores one
  Redis string per lock, as redis-py's Lock does (measured); advisory locks keep no rows
  and are limited by `max_locks_per_transaction`.
- Any library that fails to install or to run here is listed in the "Not measured" table
  of the run above with its error (none in a run where that table is absent).
"""


def write(data: dict[str, Any], out: Path, docs: Path | None) -> None:
    target_rows = targets(data) if data["results"] else []
    data["targets"] = target_rows
    body = results_markdown(data, target_rows)
    made = plots(data, out)
    (out / "results.md").write_text("# Benchmark results\n\n" + environment(data) + "\n" + body)
    if docs is None:
        return
    images = "".join(f"![{name}](../bench/results/{name})\n\n" for name in made)
    text = (
        DOC_HEAD
        + "## This run\n\n" + environment(data) + "\n"
        + body + "\n"
        + ("## Plots\n\n" + images if images else "")
        + DOC_CAVEATS
        + "\n## Subjects and their settings\n\n" + competitors(data) + "\n"
    )  # fmt: skip
    docs.write_text(text)
