"""Write a run's results: `<name>.md` for people, `<name>.json` for tools, `<name>.png` to look at.

`write_files` is the one writer every bench's report goes through (memory,
llm, security, the summary, the guard and judge calibrations, search
quality): each file appears whole or not at all, NaN and infinity become
JSON null, and a plot that fails costs the picture, never the numbers. The
memory report's own tables and plot follow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from bench.memory import Report, Result, Target
from bench.stats import Summary, fmt_ratio, fmt_us, markdown_table

NAME = "memory"


def write_files(out: Path, name: str, *, markdown: str | None = None, data=None,
                plot: Callable[[Path], object] | None = None) -> list[Path]:
    """`name`.md, `name`.json and `name`.png in `out`, for each of `markdown`, `data` and
    `plot` given; the paths written. `plot(path)` draws the picture (returning False:
    nothing to draw)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if markdown is not None:
        paths.append(out / f"{name}.md")
        atomic_write(paths[-1], markdown)
    if data is not None:
        paths.append(out / f"{name}.json")
        atomic_write(paths[-1], json.dumps(jsonable(data), indent=2, ensure_ascii=False) + "\n")
    if plot is not None:
        png = out / f"{name}.png"
        try:
            if plot(png) is not False:
                paths.append(png)
        except Exception as exc:  # noqa: BLE001 - the numbers matter more than the picture
            print(f"{name} plot failed: {exc}", flush=True)
    return paths


def write(report: Report, out: Path) -> list[Path]:
    return write_files(out, NAME, markdown=markdown(report), data=to_dict(report),
                       plot=lambda png: plot(report, png))


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------- JSON


def to_dict(report) -> dict:
    """A report (any area's dataclass with `results`) as JSON data, with its targets' summary."""
    d = asdict(report)
    d["summary"] = targets_summary(report.results)
    return d


def load_results(path: Path) -> tuple[str, list[Result]]:
    """(when the run started, its results) from a report's JSON file, as the run left them."""
    data = json.loads(path.read_text(encoding="utf-8"))
    known = {f.name for f in fields(Result)}

    def summary(value: dict | None) -> Summary | None:
        return Summary(**value) if value else None

    results = [Result(**{**{k: v for k, v in d.items() if k in known},
                         "summary": summary(d.get("summary")), "baseline": summary(d.get("baseline")),
                         "targets": [Target(**t) for t in d.get("targets", [])]})
               for d in data.get("results", [])]
    return data.get("started", "?"), results


def targets_table(results) -> str:
    """The Markdown table of every target and its verdict, shared by both reports."""
    targets = [(r.title, t) for r in results for t in r.targets]
    if not targets:
        return "No target could be checked in this run."
    return markdown_table(
        ["measurement", "target", "observed", "result"],
        [[title, t.text, t.observed, "PASS" if t.passed else "**FAIL**"] for title, t in targets],
        align=["l", "l", "r", "l"])


def targets_summary(results) -> dict:
    """Every target with its verdict, for the JSON files of both reports."""
    return {
        "targets": [{"measurement": r.title, **asdict(t)} for r in results for t in r.targets],
        "all_targets_passed": all(t.passed for r in results for t in r.targets),
        "skipped": {r.title: r.skipped for r in results if r.skipped},
    }


def jsonable(value):
    """`value` as plain JSON: numpy scalars as Python numbers, NaN and infinity as None,
    paths as strings."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------- Markdown


def notes_section(results) -> list[str]:
    """The "Notes" lines of a report: each result's notes and why a result was skipped."""
    notes = [(r.title, n) for r in results for n in r.notes]
    skipped = [r for r in results if r.skipped]
    if not (notes or skipped):
        return []
    return (["", "## Notes", ""] + [f"- **{title}**: {n}" for title, n in notes]
            + [f"- **{r.title}**: skipped: {r.skipped}" for r in skipped])


def markdown(report: Report) -> str:
    f, o = report.facts, report.options
    lines = [
        "# tiermem memory benchmark",
        "",
        f"{'Quick' if o.quick else 'Full'} run of `python -m bench{' --quick' if o.quick else ''}`, "
        f"started {report.started}, took {report.duration_s:.0f} s. "
        "Latencies are what a client sees over NATS, one request in flight unless stated; "
        "every figure is compared with the bare building blocks it is made of, measured in the same run "
        "on the same servers and interleaved with it in blocks of 50 requests (the box's load drifts).",
        "",
        "## Targets",
        "",
    ]
    lines.append(targets_table(report.results))
    lat = [r for r in report.results if r.kind == "latency" and not r.skipped and r.summary]
    lines += ["", "## Latency", ""]
    if lat:
        lines.append(markdown_table(
            ["measurement", "n", "p50", "p95", "p99", "baseline", "baseline p50", "baseline p99", "p50 ratio"],
            [[r.title, f"{r.summary.n:,}", fmt_us(r.summary.p50), fmt_us(r.summary.p95), fmt_us(r.summary.p99),
              r.baseline_label or "–", fmt_us(r.baseline.p50 if r.baseline else None),
              fmt_us(r.baseline.p99 if r.baseline else None), fmt_ratio(r.ratio_p50)] for r in lat],
            align=["l", "r", "r", "r", "r", "l", "r", "r", "r"]))
        lines += ["", "Composed baselines (e.g. 2× round trip + LRANGE) add the parts' percentiles; "
                  "for p95/p99 that is a generous upper bound."]
    thr = [r for r in report.results if r.kind == "throughput" and not r.skipped and r.rate]
    if thr:
        lines += ["", "## Throughput", ""]
        lines.append(markdown_table(
            ["measurement", "rate", "latency p50 / p99", "baseline", "baseline rate", "ratio"],
            [[r.title, f"{r.rate:,.0f}/s",
              f"{fmt_us(r.summary.p50)} / {fmt_us(r.summary.p99)}" if r.summary else "–",
              r.baseline_label or "–", f"{r.baseline_rate:,.0f}/s" if r.baseline_rate else "–",
              fmt_ratio(r.rate / r.baseline_rate) if r.baseline_rate else "–"] for r in thr],
            align=["l", "r", "r", "l", "r", "r"]))
    lines += ["", "## Baselines", ""]
    if report.baselines:
        lines.append(markdown_table(
            ["building block", "n", "p50", "p95", "p99"],
            [[report.baseline_labels.get(k, k), f"{s.n:,}", fmt_us(s.p50), fmt_us(s.p95), fmt_us(s.p99)]
             for k, s in report.baselines.items()],
            align=["l", "r", "r", "r", "r"]))
    lines += notes_section(report.results)
    lines += ["", "## Machine", ""]
    libs = ", ".join(f"{k} {v}" for k, v in f.get("libraries", {}).items())
    lines.append(markdown_table(["fact", "value"], [
        ["date (UTC)", f.get("date", "?")],
        ["cores", f.get("cores", "?")],
        ["CPU", f.get("cpu", "?")],
        ["platform", f.get("platform", "?")],
        ["Python", f.get("python", "?")],
        ["nats-server", f.get("nats_server", "?")],
        ["Redis-compatible server", f.get("redis_server", "?")],
        ["PostgreSQL / pgvector", f"{f.get('postgres', '?')} / {f.get('pgvector', '?')}"],
        ["embedder", f.get("embedder", "?")],
        ["libraries", libs + (" (hiredis parser in use)" if f.get("hiredis_in_use") else " (hiredis NOT in use)")],
        ["load average (1/5/15 min)", f"{f.get('load_average_at_start', '?')} at start, "
                                      f"{f.get('load_average_at_end', '?')} at the end"],
        ["git", f.get("git", "?")],
        ["data", f"{o.messages:,} messages, {o.users:,} users ({o.long_users} with {o.long_len}); "
                 f"{f.get('corpus', '?')}"],
    ], align=["l", "l"]))
    lines += ["", "Everything ran on this one machine over loopback: client, NATS, Redis, Postgres "
              "and every service as its own process share its cores.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, Summary, Summary | None]] = [
        (r.title, r.summary, r.baseline) for r in report.results
        if r.kind == "latency" and not r.skipped and r.summary is not None]
    if not rows:
        return
    pcts = ("p50", "p95", "p99")
    colors = {"p50": "#1f77b4", "p95": "#ff7f0e", "p99": "#d62728"}
    fig, ax = plt.subplots(figsize=(11, 1.6 + 1.3 * len(rows)))
    bar = 0.13
    labels, ticks, values = [], [], []
    for i, (title, ours, base) in enumerate(rows):  # top to bottom (y axis inverted below)
        for j, p in enumerate(pcts):
            y = i - 0.4 + j * bar
            v = getattr(ours, p)
            values.append(v)
            ax.barh(y, v, height=bar * 0.9, color=colors[p], label=f"tiermem {p}" if i == 0 else None)
            ax.text(v * 1.04, y, fmt_us(v), va="center", fontsize=7)
            if base is not None:
                yb = i + 0.02 + j * bar
                b = getattr(base, p)
                values.append(b)
                ax.barh(yb, b, height=bar * 0.9, color=colors[p], alpha=0.35, hatch="//",
                        edgecolor=colors[p], label=f"baseline {p}" if i == 0 else None)
                ax.text(b * 1.04, yb, fmt_us(b), va="center", fontsize=7, color="#555")
        ticks.append(i)
        labels.append(title.replace(": ", ":\n", 1))
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(min(values) * 0.6, max(values) * 2.2)
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_us(v)))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("latency (log scale) — solid: tiermem, hatched: the bare baseline of the same row")
    f = report.facts
    ax.set_title(f"tiermem memory latency vs bare building blocks — {f.get('cores', '?')} cores, "
                 f"{f.get('date', '')[:10]}{' (quick)' if report.options.quick else ''}", fontsize=10)
    ax.grid(axis="x", which="both", alpha=0.25)
    handles, names = ax.get_legend_handles_labels()
    order = sorted(range(len(names)), key=lambda k: (names[k].split()[0] != "tiermem", names[k]))
    ax.legend([handles[k] for k in order], [names[k] for k in order], fontsize=7, ncol=6,
              loc="upper center", bbox_to_anchor=(0.5, -0.09 - 0.3 / len(rows)), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def result_line(r: Result) -> str:
    """One line for the console summary."""
    if r.skipped:
        return f"{r.title}: skipped: {r.skipped}"
    if r.kind == "throughput" and r.rate:
        return f"{r.title}: {r.rate:,.0f}/s"
    if r.summary:
        s = r.summary
        return (f"{r.title}: p50 {fmt_us(s.p50)} p95 {fmt_us(s.p95)} p99 {fmt_us(s.p99)}"
                + (f" ({fmt_ratio(r.ratio_p50)} baseline p50)" if r.ratio_p50 else ""))
    return r.title
