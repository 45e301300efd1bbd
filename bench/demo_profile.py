"""`python -m bench.demo_profile DEMO_RUN_DIR`: where a demo run's memory lookups spend their time.

Reads what `just demo` leaves in its run folder (`calls-*.jsonl`, the
workers' own timing of every lookup, and `spans.jsonl`, the services' spans
of the sampled traces) and prints:

* latency per tier and over all tiers (p50 / p95 / p99, as the demo's table),
  and which lookups make up the slowest 5 % (tier, kind, n);
* for the traced lookups of each tier, the median and p95 time of each span
  name (summed within a trace), and the time no span covers (the worker's
  own time minus the outermost span of each hop: NATS transit, queueing
  before a handler, the client's decode).

Nothing here is fitted: it reads one run and describes it
(bench/results/profile_memory.md).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from bench.stats import percentile

TIERS = ("l1", "l2", "l3")


def lookups(run: Path) -> list[dict]:
    out = []
    for path in sorted(run.glob("calls-*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                if r.get("kind") in ("get", "search") and r.get("code") == 200:
                    out.append(r)
    return out


def spans_of(run: Path, traces: set[str]) -> dict[str, list[dict]]:
    by_trace: dict[str, list[dict]] = defaultdict(list)
    path = run / "spans.jsonl"
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                s = json.loads(line)
                if s["trace_id"] in traces:
                    by_trace[s["trace_id"]].append(s)
    return by_trace


def _pcts(values: list[float]) -> dict:
    return {"n": len(values), **{f"p{p}": round(percentile(values, p), 3) for p in (50, 95, 99)}} \
        if values else {"n": 0}


def _name(span: dict) -> str:
    """A span's name with the sidecar's own subject folded (memory.get.<l1-id>)."""
    name = span["name"]
    return "memory.get.<l1-id> process" if name.startswith("memory.get.") and name.endswith(" process") \
        and name != "memory.get process" else name


def kind_of(r: dict) -> str:
    if r["kind"] == "search":
        return "search"
    n = r.get("n") or 0
    return "recent n<=10" if n <= 10 else "recent n=30..100" if n <= 100 else "recent n=101..500"


def profile(run: Path) -> dict:
    calls = lookups(run)
    ms_all = [r["ms"] for r in calls]
    by_tier = defaultdict(list)
    for r in calls:
        by_tier[r["tier"]].append(r["ms"])
    cut = percentile(ms_all, 95)
    slow = [r for r in calls if r["ms"] >= cut]
    report = {
        "lookups": len(calls),
        "share": {t: round(len(by_tier[t]) / len(calls), 3) for t in TIERS},
        "latency_ms": {**{t: _pcts(by_tier[t]) for t in TIERS}, "all": _pcts(ms_all)},
        "slowest_5pct": {"cutoff_ms": round(cut, 3),
                         "by": dict(Counter(f"{r['tier']} {kind_of(r)}" for r in slow).most_common())},
        "by_kind": {f"{t} {k}": _pcts([r["ms"] for r in calls if r["tier"] == t and kind_of(r) == k])
                    for t in TIERS for k in ("recent n<=10", "recent n=30..100", "recent n=101..500", "search")
                    if any(r["tier"] == t and kind_of(r) == k for r in calls)},
    }
    traced = [r for r in calls if r.get("trace")]
    spans = spans_of(run, {r["trace"] for r in traced})
    per_tier: dict[str, dict[str, list[float]]] = {t: defaultdict(list) for t in TIERS}
    for r in traced:
        tree = spans.get(r["trace"])
        if not tree:
            continue
        sums: dict[str, float] = defaultdict(float)
        for s in tree:
            sums[f"{s['service']}: {_name(s)}"] += (s["end_ns"] - s["start_ns"]) / 1e6
        ids = {s["span_id"] for s in tree}
        roots = [s for s in tree if s["parent_id"] not in ids]
        # the outermost span of the first hop: what the worker waited that no service saw
        first = min(roots, key=lambda s: s["start_ns"])
        sums["(worker's time outside the first service's span)"] = r["ms"] - (
            first["end_ns"] - first["start_ns"]) / 1e6
        sums["(the worker's time)"] = r["ms"]
        for name, v in sums.items():
            per_tier[r["tier"]][name].append(v)
    report["traced_spans_ms"] = {
        t: {name: {"n": len(v), "p50": round(percentile(v, 50), 3), "p95": round(percentile(v, 95), 3)}
            for name, v in sorted(per_tier[t].items())}
        for t in TIERS if per_tier[t]}
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.demo_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="the demo's run folder (DEMO_DIR/run)")
    ap.add_argument("--out", type=Path, help="also write the report here as JSON")
    args = ap.parse_args(argv)
    report = profile(args.run)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
