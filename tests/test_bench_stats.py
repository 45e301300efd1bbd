"""The benchmark's statistics: percentiles, ratios and tables (pure code, no I/O)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from bench.stats import Summary, fmt_ratio, fmt_us, markdown_table, percentile, ratio, summarize


def test_percentile_matches_numpy_linear_interpolation():
    rng = random.Random(7)
    for size in (1, 2, 3, 10, 101, 1000):
        values = sorted(rng.expovariate(1 / 300) for _ in range(size))
        for q in (0, 1, 50, 90, 95, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_even_sample_is_midpoint_of_the_middle_pair():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_percentile_rejects_empty_sample_and_out_of_range_q():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_converts_seconds_to_microseconds_whatever_the_order():
    s = summarize([0.003, 0.001, 0.002])
    assert s == Summary(n=3, p50=pytest.approx(2000), p95=pytest.approx(2900), p99=pytest.approx(2980),
                        mean=pytest.approx(2000), min=pytest.approx(1000), max=pytest.approx(3000))


def test_summarize_percentiles_are_ordered():
    rng = random.Random(1)
    s = summarize([rng.lognormvariate(-8, 0.5) for _ in range(5000)])
    assert s.min <= s.p50 <= s.p95 <= s.p99 <= s.max


def test_summarize_needs_samples():
    with pytest.raises(ValueError):
        summarize([])


def test_ratio_handles_a_zero_baseline():
    assert ratio(300, 250) == pytest.approx(1.2)
    assert math.isinf(ratio(1, 0))
    assert math.isnan(ratio(0, 0))


def test_formatting_picks_a_readable_unit():
    assert fmt_us(276.4) == "276 µs"
    assert fmt_us(1530) == "1.53 ms"
    assert fmt_us(None) == "–"
    assert fmt_ratio(1.234) == "1.23×"
    assert fmt_ratio(math.inf) == "∞"
    assert fmt_ratio(None) == "–"


def test_markdown_table_aligns_columns_and_escapes_pipes():
    table = markdown_table(["name", "p50"], [["a|b", "1 µs"], ["longer name", "12 µs"]])
    lines = table.splitlines()
    assert lines[0] == "| name        |   p50 |"
    assert lines[1] == "|:------------|------:|"
    assert lines[2] == "| a\\|b        |  1 µs |"
    assert len({len(line) for line in lines}) == 1


def test_markdown_table_rejects_ragged_rows():
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [["only one"]])
