"""`summary.md` + `summary.png`: every benchmark area's latest figures in one table.

The per-area reports (`memory.md`, `llm.md`, `gateway.md`, `security.md`) keep the details and notes; this
file is the one a person reads first: each measurement with our p50/p95/p99,
the bare baseline measured in the same run, the p50 ratio, and whether its
targets passed. The plot shows the ratios (our p50 / baseline p50).

A run of some areas only (`--only security`) keeps the other areas' rows as
their own last run left them (their `<area>.json` in the same folder), each
area naming when its run started: the summary stays whole.
"""

from __future__ import annotations

from pathlib import Path

from bench.report import load_results, write_files
from bench.stats import fmt_ratio, fmt_us, markdown_table

AREAS = ("memory", "llm", "gateway", "security")  # the table's order

# Why a measurement misses its goal, as its profile found (by result key). Written by
# people from the profiles named, not computed: a row whose cause changes needs its
# profile redone, and a failing row with no entry says so in the summary.
WHY_MISSED = {
    "appends": "the stack spends ~500-600 µs of CPU per append across NATS, the gateway, the "
               "indexer and Redis: ~3.3-4k/s on two idle cores at best (profile_l2.md)",
    "append_one": "2 NATS round trips + the JetStream store + the applier's Redis round trip "
                  "before the reply (read-your-writes): ~2.9× a bare publish at best (profile_l2.md)",
    "l1_hit": "the p99 is the box's scheduling of ~10 processes on 2 cores; 0.12 ms of an L1 hit "
              "is inside the sidecar (profile_memory.md)",
    "l2_hit": "two Python hops (sidecar, gateway) each a wake-up and a call; the cluster-valid "
              "read (state beside the user's script, one pipeline) costs 1.20-1.25× main's "
              "single script (profile_l2.md, scale.md)",
    "context": "BM25 reads and scores every row holding a query word: ~50 ms when the words are "
               "in most of a 10,000-message history (search_quality.md, the caveat)",
    "llm_exact": "not profiled on its own: a NATS round trip plus the broker's Redis lookup; the "
                 "same hit was p95 0.95 ms in the gateway bench's idle-box runs (profile_gateway.md)",
    "llm_dev": "no installable pair model not trained on the reserved sets (issue 12, blocked; "
               "cross_encoder.md)",
    "llm_partition": "the same missing pair model: the verifier cannot tell a partition's "
                     "near-duplicates apart (issue 12, blocked; cross_encoder.md)",
    "gateway_exact": "three processes taking turns on 2 cores; the gateway is on CPU ~27 % of a "
                     "hit's time (profile_gateway.md)",
}


def with_earlier_runs(parts: list[tuple[str, list, str]], out: Path) -> list[tuple[str, list, str]]:
    """This run's (area, results, started), plus every area it did not run, from `out/<area>.json`."""
    ran = {area for area, _, _ in parts}
    parts = list(parts)
    for area in AREAS:
        path = out / f"{area}.json"
        if area not in ran and path.is_file():
            started, results = load_results(path)
            parts.append((area, results, started))
    return sorted(parts, key=lambda p: AREAS.index(p[0]) if p[0] in AREAS else len(AREAS))


def _row(area: str, r) -> list[str]:
    s, b = r.summary, r.baseline
    if r.skipped:
        return [area, r.title, "skipped", "", "", r.baseline_label or "", "", "–", r.skipped[:80]]
    if r.kind == "throughput":
        ours = f"{r.rate:,.0f}/s" if r.rate else "–"
        base = f"{r.baseline_rate:,.0f}/s" if r.baseline_rate else "–"
        ratio = fmt_ratio(r.rate / r.baseline_rate) if r.rate and r.baseline_rate else "–"
        return [area, r.title, ours, "", "", r.baseline_label, base, ratio, _verdict(r)]
    return [area, r.title, fmt_us(s.p50) if s else "–", fmt_us(s.p95) if s else "–",
            fmt_us(s.p99) if s else "–", r.baseline_label,
            " / ".join(fmt_us(v) for v in (b.p50, b.p95, b.p99)) if b else "–",
            fmt_ratio(r.ratio_p50), _verdict(r)]


def _verdict(r) -> str:
    if not r.targets:
        return ""
    failed = [t.text for t in r.targets if not t.passed]
    return "PASS" if not failed else "**FAIL**: " + "; ".join(failed)


def markdown(parts: list[tuple[str, list, str]]) -> str:
    rows = [_row(area, r) for area, results, _ in parts for r in results]
    table = markdown_table(
        ["area", "measurement", "p50 / rate", "p95", "p99", "baseline (same run)",
         "baseline p50 / p95 / p99", "ratio p50", "targets"], rows,
        align=["l", "l", "r", "r", "r", "l", "r", "r", "l"])
    details = ", ".join(f"`{area}.md`" for area, _, _ in parts)
    starts = {started for _, _, started in parts}
    when = (f"Run started {starts.pop()}." if len(starts) == 1 else
            "Runs started: " + ", ".join(f"{area} {started}" for area, _, started in parts) + ".")
    return (f"# tiermem benchmarks: summary\n\n{when} Every figure next to its bare "
            f"baseline measured in the same run; details, notes and machine facts in {details}.\n\n"
            f"{table}\n\n{_why_missed(parts)}![ratios](summary.png)\n")


def _why_missed(parts: list[tuple[str, list, str]]) -> str:
    """One line per failing measurement: why, from its profile (`WHY_MISSED`)."""
    lines = [f"- **{r.title}**: {WHY_MISSED.get(r.key, 'no profile explains this yet')}"
             for _, results, _ in parts for r in results
             if not r.skipped and any(not t.passed for t in r.targets)]
    return "## Why a row misses its goal\n\n" + "\n".join(lines) + "\n\n" if lines else ""


def plot(parts: list[tuple[str, list, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{area}: {r.title}", r.ratio_p50) for area, results, _ in parts for r in results
            if not r.skipped and r.kind != "throughput" and r.ratio_p50]
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(rows) + 1.5))
    ax.barh([t for t, _ in rows][::-1], [v for _, v in rows][::-1], color="#4c72b0")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("our p50 / bare baseline p50 (same run; log scale)")
    ax.set_title("tiermem: each measurement as a multiple of its bare baseline")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(parts: list[tuple[str, list]], started: str, out: Path) -> list[Path]:
    """`summary.md` and `summary.png` for this run's (area, results), which started at `started`."""
    parts = with_earlier_runs([(area, results, started) for area, results in parts], out)
    return write_files(out, "summary", markdown=markdown(parts), plot=lambda png: plot(parts, png))
