"""Run the full network-fault suite and regenerate docs/safety.md from its results.

python scripts/gen_safety.py                 # full run (~12 min on 2 cores), then the page
python scripts/gen_safety.py --from-results  # only re-render from the last results file

The full run is ``LEASEHOLD_SAFETY_FULL=1 python -m pytest tests/faults -n 0``: every
scenario on every backend, sync and asyncio, several trials each, plus the naive-lock
controls. Every trial appends its summary (tests/faults/history.py ``summary``) as one
JSON line; this script collects them into tests/faults/results/results.json (with
the run's facts: date, commit, machine, versions, duration, pytest outcome) and renders
docs/safety.md. Nothing in the page is typed by hand except the prose around the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "tests" / "faults" / "results" / "results.json"
DOC = ROOT / "docs" / "safety.md"

SCENARIO_TEXT = {
    "partition": "partition of the holder, 3xTTL",
    "slow_replies": "replies to the holder slowed by 1.5xTTL",
    "small_delays": "0.1xTTL each way (0.2xTTL round trip; TTL doubled)",
    "late_grant": "late grant (reply 1.5xTTL late)",
    "lost_reply": "lost acquire reply (commit, then reset)",
    "stalled_store": "stalled store (silent, kernel ACKs)",
    "reset_renewal": "connections reset every 0.3xTTL",
    "clock_forward": "store clock stepped +3xTTL",
    "clock_backward": "store clock stepped -3xTTL",
    "failover": "failover to a replica that lacked the grant",
}
ORDER = list(SCENARIO_TEXT)
EXPECTED = {"clock_forward": {"overlap"}, "failover": {"overlap"}}


def _run(cmd: list[str], **kwargs: Any) -> str:
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=30, check=False, **kwargs
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def facts() -> dict[str, Any]:
    import leasehold

    versions = {"leasehold": leasehold.__version__}
    for module in ("redis", "psycopg"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:
            versions[module] = "?"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": _run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT),
        "dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT)),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Linux {platform.release()}, Python {platform.python_version()}",
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "redis_server": _run(["redis-server", "--version"]),
        "etcd_server": _etcd_version(),
        "versions": versions,
    }


def _etcd_version() -> str:
    """The etcd the fault suite starts (tests/servers/etcd.py picks it)."""
    sys.path.insert(0, str(ROOT))
    try:
        from tests.servers.etcd import etcd_binary

        binary = etcd_binary()
    finally:
        sys.path.remove(str(ROOT))
    if binary is None:
        return "not installed"
    return _run([binary, "--version"]).splitlines()[0]


def run_suite(extra: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="leasehold-safety-") as tmp:
        lines = Path(tmp) / "trials.jsonl"
        env = dict(os.environ, LEASEHOLD_SAFETY_FULL="1", LEASEHOLD_SAFETY_RESULTS=str(lines))
        # -n 0: in one process, alone on the machine, as every page so far: the
        # trials time what they inject and how soon each loss is noticed.
        cmd = [sys.executable, "-m", "pytest", "tests/faults", "-q", "-p", "no:cacheprovider",
               "-n", "0"]  # fmt: skip
        info = facts()
        started = time.monotonic()
        proc = subprocess.run([*cmd, *extra], cwd=ROOT, env=env, check=False)
        info["duration_s"] = round(time.monotonic() - started, 1)
        info["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        info["pytest_exit"] = proc.returncode
        info["command"] = "python scripts/gen_safety.py"
        trials = (
            [json.loads(line) for line in lines.read_text().splitlines()] if lines.exists() else []
        )
    return {"run": info, "trials": trials}


def _span(values: list[float]) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    if round(low) == round(high):
        return f"{low:.0f}"
    return f"{low:.0f} to {high:.0f}" if low < 0 else f"{low:.0f}-{high:.0f}"


def _bounds(trials: list[dict[str, Any]]) -> str:
    worst: dict[str, tuple[float | None, float]] = {}
    for trial in trials:
        for bound in trial["bounds"]:
            took, limit = bound["took"], bound["limit"]
            call = bound["call"]
            current = worst.get(call)
            if current is None or took is None or (current[0] is not None and took > current[0]):
                if current is not None and current[0] is None:
                    continue
                worst[call] = (took, limit)
    parts = []
    for call in sorted(worst):
        took, limit = worst[call]
        mark = "" if took is not None and took <= limit else " ❌"
        shown = "hung" if took is None else f"{took:.2f}"
        parts.append(f"{call} {shown}/{limit:.1f}{mark}")
    return "; ".join(parts) or "-"


def _notes(scenario: str, trials: list[dict[str, Any]]) -> str:
    notes: list[str] = []
    outcomes = [t["metrics"].get("outcome") for t in trials if t["metrics"].get("outcome")]
    if outcomes:
        counts = defaultdict(int)
        for outcome in outcomes:
            counts[outcome] += 1
        notes.append(", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    kept = [t["metrics"]["kept_lease"] for t in trials if "kept_lease" in t["metrics"]]
    if kept:
        notes.append(f"holder kept its lease {sum(kept)}/{len(kept)}")
    overlap = [t["metrics"]["overlap_ms"] for t in trials if "overlap_ms" in t["metrics"]]
    if overlap:
        notes.append(f"overlap {_span(overlap)} ms (expected)")
    stale = [t["metrics"].get("stale_writes_after_next_write", 0) for t in trials]
    if scenario in EXPECTED:
        accepted = [t["metrics"].get("stale_writes_accepted", 0) for t in trials]
        notes.append(
            f"old holder's fenced writes accepted after the new grant: {_span(accepted)}, "
            f"after the new holder's first write: {max(stale, default=0)}"
        )
    entries = [t["metrics"].get("body_entries") for t in trials if "body_entries" in t["metrics"]]
    if entries:
        notes.append(
            f"bodies entered {sum(entries)}, all with a held lease"
            if all(not [v for v in t["violations"] if v["kind"] == "dead-body"] for t in trials)
            else "a body ran under a dead lease"
        )
    return "; ".join(notes)


def table(trials: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for trial in trials:
        groups[(trial["scenario"], trial["backend"], trial["api"])].append(trial)

    def order(key: tuple[str, str, str]) -> tuple[int, str, str]:
        scenario, backend, api = key
        return (ORDER.index(scenario) if scenario in ORDER else 99, backend, api)

    lines = [
        "| scenario | backend | api | trials | violations | loss known before next grant (ms) "
        "| takeover (ms) | calls: worst s / bound s | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(groups, key=order):
        scenario, backend, api = key
        group = groups[key]
        expected = EXPECTED.get(scenario, set())
        if "naive" in backend:
            expected = {"overlap", "fence-order", "no-loss"}
        unexpected = [v for t in group for v in t["violations"] if v["kind"] not in expected]
        seen = sorted({v["kind"] for t in group for v in t["violations"]})
        if unexpected:
            cell = f"**{len(unexpected)}** ({', '.join(sorted({v['kind'] for v in unexpected}))})"
        elif seen:
            cell = f"0 (caught as expected: {', '.join(seen)})"
        else:
            cell = "0"
        leads = [x for t in group for x in t["lead_ms"]]
        takeovers = [t["takeover_ms"] for t in group if t["takeover_ms"] is not None]
        lines.append(
            f"| {SCENARIO_TEXT.get(scenario, scenario)} | {backend} | {api} | {len(group)} | "
            f"{cell} | {_span(leads)} | {_span(takeovers)} | {_bounds(group)} | "
            f"{_notes(scenario, group)} |"
        )
    return "\n".join(lines)


def violations_list(trials: list[dict[str, Any]]) -> str:
    rows = []
    for trial in trials:
        expected = EXPECTED.get(trial["scenario"], set())
        if "naive" in trial["backend"]:
            continue
        for v in trial["violations"]:
            if v["kind"] not in expected:
                rows.append(
                    f"- {trial['scenario']} / {trial['backend']} / {trial['api']} "
                    f"(trial {trial.get('trial', 0)}): **{v['kind']}**: {v['detail']}"
                )
    return "\n".join(rows) if rows else "None."


def measured(trials: list[dict[str, Any]], scenario: str) -> str:
    """One sentence of numbers for the prose: overlap and stale writes of a scenario."""
    group = [t for t in trials if t["scenario"] == scenario]
    overlap = [t["metrics"]["overlap_ms"] for t in group if "overlap_ms" in t["metrics"]]
    if not overlap:
        return "(not measured in this run)"
    accepted = [t["metrics"].get("stale_writes_accepted", 0) for t in group]
    after = [t["metrics"].get("stale_writes_after_next_write", 0) for t in group]
    rejected = [t["metrics"].get("stale_writes_rejected", 0) for t in group]
    return (
        f"in this run ({len(group)} trials, TTL 1 s, the new holder's first fenced write "
        f"0.15 s after its grant) the old holder reported the lease held for "
        f"{min(overlap) / 1000:.2f}-{max(overlap) / 1000:.2f} s after the other client's "
        f"grant; the ledger accepted {min(accepted)}-{max(accepted)} of its fenced writes "
        f"after that grant, {max(after, default=0)} after the new holder's first write, "
        f"and refused {min(rejected)}-{max(rejected)}"
    )


def render(data: dict[str, Any]) -> str:
    run = data["run"]
    trials = data["trials"]
    template = (Path(__file__).with_name("safety_template.md")).read_text()
    total = sum(1 for t in trials if "naive" not in t["backend"])
    replacements = {
        "{{DATE}}": run["date"],
        "{{COMMIT}}": run["commit"] + (" (with uncommitted changes)" if run.get("dirty") else ""),
        "{{MACHINE}}": run["machine"],
        "{{LOAD}}": f"{run['load_before']} / {run.get('load_after', '?')}",
        "{{DURATION}}": f"{run['duration_s'] / 60:.1f} min",
        "{{SERVERS}}": run["redis_server"],
        "{{ETCD}}": run.get("etcd_server") or "version not recorded by this run",
        "{{VERSIONS}}": ", ".join(f"{k} {v}" for k, v in sorted(run["versions"].items())),
        "{{PYTEST}}": "passed"
        if run["pytest_exit"] == 0
        else f"FAILED (exit {run['pytest_exit']})",
        "{{TRIALS}}": str(total),
        "{{TABLE}}": table(trials),
        "{{VIOLATIONS}}": violations_list(trials),
        "{{FAILOVER}}": measured(trials, "failover"),
        "{{CLOCKFWD}}": measured(trials, "clock_forward"),
    }
    for key, value in replacements.items():
        template = template.replace(key, value)
    return template


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-results", action="store_true", help="re-render only")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -k redis)")
    args = parser.parse_args()
    if args.from_results:
        data = json.loads(RESULTS.read_text())
    else:
        data = run_suite(args.pytest_args)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    DOC.write_text(render(data))
    print(f"wrote {RESULTS.relative_to(ROOT)} and {DOC.relative_to(ROOT)}")
    return 0 if data["run"]["pytest_exit"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
