"""Latency statistics and the tables the report prints. Pure code, no I/O.

Samples are durations in seconds (from `time.perf_counter`); summaries hold
microseconds, the unit every figure in the report uses. Every bench takes its
percentiles from `percentile` here, which is `numpy.percentile` (linear
interpolation between closest ranks, so p50 of an even-sized sample is the
mean of the two middle values): one definition, so two reports never disagree
on what "p95" means. Rates get their interval from `shared.wilson`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Summary", "percentile", "summarize", "ratio", "ratio_interval", "fmt_us", "fmt_ratio",
           "fmt_pct", "markdown_table"]


@dataclass(frozen=True)
class Summary:
    """One measurement's latency distribution, in microseconds."""

    n: int
    p50: float
    p95: float
    p99: float
    mean: float
    min: float
    max: float

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The `q`-th percentile (0..100) of a non-empty sample, in any order (`numpy.percentile`)."""
    if len(values) == 0:
        raise ValueError("percentile of an empty sample")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    return float(np.percentile(values, q))


def summarize(samples_s: Sequence[float]) -> Summary:
    """Summary in microseconds of durations given in seconds."""
    if not samples_s:
        raise ValueError("no samples")
    us = np.asarray(samples_s, dtype=float) * 1e6
    return Summary(
        n=int(us.size),
        p50=percentile(us, 50),
        p95=percentile(us, 95),
        p99=percentile(us, 99),
        mean=float(us.mean()),
        min=float(us.min()),
        max=float(us.max()),
    )


def ratio(ours: float, baseline: float) -> float:
    """ours / baseline; inf when the baseline is zero (and nan when both are)."""
    if baseline == 0:
        return math.nan if ours == 0 else math.inf
    return ours / baseline


def ratio_interval(ours_s: Sequence[float], base_s: Sequence[float], q: float = 50,
                   rounds: int = 400, seed: int = 1) -> tuple[float, float]:
    """A 95 % bootstrap interval of percentile q of `ours_s` over that of `base_s`.

    Why: a ratio near 1.05× is only a verdict if noise alone moves it less
    than that; the interval says how far resampling the same runs moves it.
    """
    rng = np.random.default_rng(seed)
    ours, base = np.asarray(ours_s, dtype=float), np.asarray(base_s, dtype=float)
    num = np.percentile(rng.choice(ours, (rounds, ours.size)), q, axis=1)
    den = np.percentile(rng.choice(base, (rounds, base.size)), q, axis=1)
    lo, hi = np.percentile(num / den, [2.5, 97.5])
    return float(lo), float(hi)


def fmt_us(value: float | None) -> str:
    """A latency for humans: µs below 1 ms, ms with two decimals above."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value < 1000:
        return f"{value:.0f} µs"
    return f"{value / 1000:.2f} ms"


def fmt_pct(value: float | None, digits: int = 1) -> str:
    """A rate (0..1) as a percentage; "–" when there is none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.{digits}f} %"


def fmt_ratio(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    if math.isinf(value):
        return "∞"
    return f"{value:.2f}×"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                   align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table; `align` per column is 'l' or 'r' (default: l then r)."""
    if align is None:
        align = ["l"] + ["r"] * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError("one alignment per column")
    cells = [[_cell(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, the table has {len(headers)} columns")
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(values, widths, align)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else (":" + "-" * (w + 1))
                          for w, a in zip(widths, align)) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in cells])


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def announce(say, result, baseline: str = "baseline") -> None:
    """One progress line per result (and per target) while a bench runs."""
    if result.skipped:
        say(f"{result.title}: skipped: {result.skipped}")
    elif result.summary is not None:
        s = result.summary
        extra = f", {result.ratio_p50:.2f}× {baseline} p50" if result.ratio_p50 else ""
        say(f"{result.title}: p50 {fmt_us(s.p50)}, p95 {fmt_us(s.p95)}, p99 {fmt_us(s.p99)}{extra}")
    for t in result.targets:
        say(f"  target {t.text}: {'PASS' if t.passed else 'FAIL'} ({t.observed})")
