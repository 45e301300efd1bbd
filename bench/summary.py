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
            f"{table}\n\n![ratios](summary.png)\n")


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
