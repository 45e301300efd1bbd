"""`bench/results/chaos.md` (+ `.json`, `.png`): per fault, the counts that must be 0 and recovery p95.

One run mode writes its own JSON (`chaos.json`, `chaos-cluster.json`); the
Markdown shows every mode whose JSON is there, so the single-node suite and
the cluster run can be re-run independently.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from bench.report import write_files
from bench.stats import markdown_table, percentile
from chaos.runner import GRACE_S, TrialResult

COLUMNS = ("acked_lost", "duplicates", "stale_served", "forgotten_served", "stale_llm_hits")
MODES = {"single": ("chaos", "single NATS server, stream R1"), "cluster": ("chaos-cluster", "3-node NATS cluster, stream R3")}


def rows(results: list[TrialResult]) -> list[dict]:
    by_fault: dict[str, list[TrialResult]] = {}
    for r in results:
        by_fault.setdefault(r.fault, []).append(r)
    out = []
    for fault, trials in by_fault.items():
        recov = [r.recovery_s for r in trials if r.recovery_s is not None]
        p95s = [p for r in trials for _, p, _ in r.timeline if p is not None]
        out.append({"fault": fault, "trials": len(trials), **{c: sum(getattr(r, c) for r in trials) for c in COLUMNS},
                    "not_recovered": sum(r.recovery_s is None for r in trials),
                    "forget_failed": sum(not r.forget_ok for r in trials),
                    "recovery_p95_s": percentile(recov, 95) if recov else None,
                    "latency_p95_max_ms": max(p95s) if p95s else None,
                    "notes": sorted({n for r in trials for n in r.notes})[:4]})
    return out


def failed(summary: list[dict]) -> bool:
    return any(row[c] for row in summary for c in COLUMNS) or any(row["not_recovered"] for row in summary)


def write(results: list[TrialResult], out: Path, mode: str, options: dict) -> list[Path]:
    stem, title = MODES[mode]
    data = {"mode": mode, "options": options, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "summary": rows(results), "trials": [asdict(r) for r in results]}
    # this mode's JSON first: the Markdown shows every mode whose JSON is there
    paths = write_files(out, stem, data=data, plot=lambda png: plot(results, png, title))
    return paths[:1] + write_files(out, "chaos", markdown=markdown(out)) + paths[1:]


def table(summary: list[dict]) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    return markdown_table(
        ["fault", "trials", "acked lost", "duplicates", "stale served", "forgotten served", "stale LLM hits",
         "not recovered", "recovery p95 (s)", "worst p95 latency (ms)", "notes"],
        [[r["fault"], r["trials"], *(("**%d**" % r[c]) if r[c] else 0 for c in COLUMNS),
          ("**%d**" % r["not_recovered"]) if r["not_recovered"] else 0, fmt(r["recovery_p95_s"]),
          "n/a" if r["latency_p95_max_ms"] is None else f"{r['latency_p95_max_ms']:.0f}",
          "; ".join(r["notes"])] for r in summary],
        align=["l"] + ["r"] * 9 + ["l"])


def markdown(out: Path) -> str:
    parts = ["# Fault suite (`just chaos`)", "",
             "Each trial runs the memory and LLM workloads (paced, loopback only) against the stack as separate "
             "processes, injects one fault, forgets a user while it lasts, heals it and checks the truth log the "
             "client kept: every acknowledged append must be in the durable log and in L3 (acked lost), once "
             "(duplicates); no read may lack an acknowledged message with seq <= `min_seq` or one acknowledged more "
             f"than {GRACE_S:.0f} s before it (stale served); nothing of a forgotten user may be served after the "
             "forget's reply (forgotten served); no `lead_intent` hit may have been stored before the user's latest "
             "message (acknowledged more than the grace before the hit) was sent, "
             "and no hit may be an answer cut short on `max_tokens` (stale LLM hits). Recovery: from the fault's end "
             "until the workload's requests succeed again. Bold numbers are failures; `just chaos` exits 1 on any.", ""]
    for mode, (stem, title) in MODES.items():
        path = out / f"{stem}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        o = data["options"]
        parts += [f"## {title}", "",
                  f"{data['finished']}: {o['trials']} trial(s) per fault, {o['users']} users, "
                  f"stream `MEMORY` R{o.get('stream_replicas')}, "
                  f"{o['wall_s']:.0f} s wall time{'; stopped at the deadline' if o.get('deadline_hit') else ''}; "
                  + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in o.get("checked", {}).items()) + " checked. "
                  f"Plot: `{stem}.png` (p95 latency through each fault's first trial).", "",
                  table(data["summary"]), ""]
    return "\n".join(parts)


def plot(results: list[TrialResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first: dict[str, TrialResult] = {}
    for r in results:
        first.setdefault(r.fault, r)
    n = len(first)
    cols = min(4, n)
    rows_ = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(3.2 * cols, 2.3 * rows_), squeeze=False, sharex=True)
    for ax, (name, r) in zip(axes.flat, first.items()):
        xs = [x for x, p, _ in r.timeline]
        ax.plot(xs, [p if p is not None else float("nan") for _, p, _ in r.timeline], lw=1.2)
        errs = [(x, e) for x, _, e in r.timeline if e]
        for x, _ in errs:
            ax.axvspan(x, x + 0.5, color="red", alpha=0.15, lw=0)
        ax.axvline(1.0, color="grey", ls=":", lw=0.8)  # inject (PRE_S after the start)
        ax.set_title(name, fontsize=8)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{title}: p95 latency (ms) per 0.5 s, errors shaded; fault injected at the dotted line",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
