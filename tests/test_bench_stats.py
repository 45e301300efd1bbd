"""The benchmark's statistics: percentiles, ratios and tables (pure code, no I/O)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from bench.guard_calibration import load_mrpc
from bench.llm import DevTally, counts_as_failure, read_mrpc, report_half, sample_pairs, variants
from bench.memory import Result, Target
from bench.report import write_files
from bench.stats import Summary, fmt_ratio, fmt_us, markdown_table, percentile, ratio, summarize


def test_percentile_interpolates_between_closest_ranks_in_any_order():
    # rank (5 - 1) * 0.9 = 3.6: 40 + 0.6 * (50 - 40)
    assert percentile([50.0, 10.0, 40.0, 20.0, 30.0], 90) == pytest.approx(46.0)
    assert percentile([7.0], 99) == 7.0
    assert percentile(np.array([3.0, 1.0, 2.0]), 0) == 1.0


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


# --------------------------------------------------------------------------- bench/llm.py's pure helpers


def test_read_mrpc_strips_the_bom_keeps_quotes_and_skips_bad_rows(tmp_path):
    path = tmp_path / "mrpc.txt"
    path.write_bytes("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n"
                     '1\t11\t12\tHe said "the witness" lied.\t"The witness" lied, he said.\r\n'
                     "0\t21\t22\tPrices rose 3%.\tPrices fell 3%.\n"
                     "x\t31\t32\tbad quality\tbad\n"
                     "1\t41\tonly four fields\tz\n".encode("utf-8"))
    pairs = read_mrpc(path)
    assert [(p.quality, p.id1, p.id2) for p in pairs] == [(1, "11", "12"), (0, "21", "22")]
    assert pairs[0].s1 == 'He said "the witness" lied.' and pairs[0].s2 == '"The witness" lied, he said.'


def test_the_broker_bench_reports_only_on_the_half_the_guard_was_not_fitted_on(tmp_path):
    path = tmp_path / "mrpc.txt"
    rows = "".join(f"{i % 2}\t{i}\t{i + 1000}\ta{i}\tb{i}\n" for i in range(200))
    path.write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + rows, encoding="utf-8")
    fitted = {p.id for p in load_mrpc(path) if p.fit}  # what bench/guard_calibration.py fits on
    reported = {f"{p.id1}-{p.id2}" for p in report_half(read_mrpc(path))}
    assert fitted and reported and not fitted & reported
    assert len(fitted) + len(reported) == 200


def test_sample_pairs_is_deterministic_in_file_order_and_all_when_asked():
    pairs = list(range(50))
    a, b = sample_pairs(pairs, 20, seed=42), sample_pairs(pairs, 20, seed=42)
    assert a == b and len(a) == 20 and a == sorted(a)
    assert sample_pairs(pairs, 20, seed=7) != a
    assert sample_pairs(pairs, None, seed=42) == pairs == sample_pairs(pairs, 500, seed=42)


def test_dev_tally_rates():
    t = DevTally()
    for quality, hit in [(1, True)] * 8 + [(1, False)] * 2 + [(0, True)] + [(0, False)] * 99:
        t.add(quality, hit)
    r = t.rates()
    assert (t.paraphrases, t.negatives, r["served"]) == (10, 100, 9)
    assert r["hit_rate"] == pytest.approx(0.8) and r["false_hit_rate"] == pytest.approx(0.01)
    assert r["precision"] == pytest.approx(8 / 9)
    assert math.isnan(DevTally().rates()["precision"])


def test_variants_differ_from_the_question():
    q = "Is the house on Main Street still available?"
    out = variants(q, "Is the house on Main Street available still?")
    assert len(out) == 9 and all(text != q for _, text in out)
    # a rewording equal to the question is dropped, not sent as a "semantic" probe
    assert all(t != "no punctuation" for _, t in variants("no punctuation", "no punctuation"))


def test_only_absent_dev_data_is_an_acceptable_skip():
    assert not counts_as_failure(Result(key="llm_dev", title="dev", skipped="no dev data (absent)"))
    assert counts_as_failure(Result(key="llm_dev", title="dev", skipped="failed: TimeoutError"))
    assert counts_as_failure(Result(key="llm_exact", title="exact", skipped="no dev data"))
    assert counts_as_failure(Result(key="x", title="x", targets=[Target("t", False, "")]))
    assert not counts_as_failure(Result(key="x", title="x", targets=[Target("t", True, "")]))


def test_the_summary_puts_every_measurement_in_one_table_with_a_plot(tmp_path):
    from bench import summary
    from bench.memory import Result, Target
    from bench.stats import Summary

    lat = Result(key="l1_hit", title="L1 hit", summary=Summary(100, 250.0, 500.0, 900.0, 260.0, 200.0, 1e3),
                 baseline_label="bare NATS round trip",
                 baseline=Summary(100, 200.0, 400.0, 800.0, 210.0, 150.0, 900.0), ratio_p50=1.25,
                 targets=[Target("p50 ≤ 1.2×", False, "1.25×")])
    thr = Result(key="appends", title="appends", kind="throughput", rate=5000.0, baseline_rate=20000.0,
                 baseline_label="bare JetStream publish")
    skipped = Result(key="l3", title="L3 recent", skipped="not loaded")
    paths = summary.write([("memory", [lat, thr]), ("llm", [skipped])], "2026-11-26T12:00Z", tmp_path)
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("| ")]
    assert ["memory", "L1 hit", "250 µs", "500 µs", "900 µs", "bare NATS round trip",
            "200 µs / 400 µs / 800 µs", "1.25×", "**FAIL**: p50 ≤ 1.2×"] in rows
    assert ["memory", "appends", "5,000/s", "", "", "bare JetStream publish", "20,000/s", "0.25×", ""] in rows
    assert rows[-1][:3] == ["llm", "L3 recent", "skipped"]
    assert (tmp_path / "summary.png").stat().st_size > 1000 and len(paths) == 2
    text = (tmp_path / "summary.md").read_text()
    assert f"- **L1 hit**: {summary.WHY_MISSED['l1_hit']}" in text  # the failing row says why
    assert "**appends**" not in text  # a row without failing targets needs no reason


def test_a_failing_row_with_no_profile_says_so():
    from bench import summary
    from bench.memory import Result, Target

    new = Result(key="not_profiled", title="New thing", targets=[Target("fast", False, "slow")])
    assert "- **New thing**: no profile explains this yet" in summary._why_missed([("memory", [new], "")])


def test_a_run_of_one_area_keeps_the_other_areas_rows_from_their_last_run(tmp_path):
    from bench import report, summary
    from bench.memory import Options, Report, Result, Target
    from bench.stats import Summary

    earlier = Report(options=Options(), started="2026-11-26T12:00Z", results=[
        Result(key="l1_hit", title="L1 hit", summary=Summary(100, 250.0, 500.0, 900.0, 260.0, 200.0, 1e3),
               baseline_label="bare NATS round trip", ratio_p50=1.25,
               baseline=Summary(100, 200.0, 400.0, 800.0, 210.0, 150.0, 900.0),
               targets=[Target("p50 ≤ 1.2×", False, "1.25×")])])
    report.write(earlier, tmp_path)
    now = Result(key="security_l1_locked", title="Auth cost: L1 hit", ratio_p50=1.02,
                 summary=Summary(100, 255.0, 500.0, 900.0, 260.0, 200.0, 1e3), baseline_label="open server",
                 baseline=Summary(100, 250.0, 400.0, 800.0, 210.0, 150.0, 900.0))
    summary.write([("security", [now])], "2026-12-05T08:00Z", tmp_path)

    text = (tmp_path / "summary.md").read_text()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ")]
    assert [r[:3] for r in rows[1:]] == [["memory", "L1 hit", "250 µs"], ["security", "Auth cost: L1 hit", "255 µs"]]
    assert rows[1][-1] == "**FAIL**: p50 ≤ 1.2×"
    assert "memory 2026-11-26T12:00Z, security 2026-12-05T08:00Z" in text


def test_the_one_report_writer_writes_what_it_is_given_and_survives_a_failed_plot(tmp_path):
    def broken(png):
        raise RuntimeError("no display")

    paths = write_files(tmp_path, "x", markdown="# x\n", data={"p": np.float64(0.5), "q": math.nan},
                        plot=broken)
    assert paths == [tmp_path / "x.md", tmp_path / "x.json"] and not (tmp_path / "x.png").exists()
    assert json.loads((tmp_path / "x.json").read_text()) == {"p": 0.5, "q": None}
    assert write_files(tmp_path, "y", data=[1], plot=lambda png: False) == [tmp_path / "y.json"]
    assert write_files(tmp_path, "z", markdown="z", plot=lambda png: png.write_bytes(b"png")) == [
        tmp_path / "z.md", tmp_path / "z.png"]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_match_check_counts_the_clients_error_replies_and_raw_ones_alike():
    """The llm bench's exact-hit row goes through tiermem.AsyncClient (which raises on an
    error reply) and its client-overhead baseline is raw: both are checked the same way."""
    import msgspec
    from nats.aio.msg import Msg

    from bench.llm import MatchCheck
    from shared.contract import CompleteReply
    from shared.errors import Unavailable

    hit = {"text": "x", "content": [], "model": "m", "stop_reason": "end_turn",
           "usage": {"input_tokens": 1, "output_tokens": 1}, "cost_usd": 0.0, "saved_usd": 0.0,
           "cache": {"status": "hit", "match": "exact"}}
    check = MatchCheck("exact")
    check(msgspec.convert(hit, CompleteReply))
    check(Msg(None, data=msgspec.json.encode(hit)))
    check(Unavailable("no service answers llm.complete"))
    check(Msg(None, data=b"{}", headers={"Nats-Service-Error-Code": "503",
                                         "Nats-Service-Error": "down"}))
    assert (check.seen, dict(check.wrong)) == (4, {"error 503": 2})


def test_the_memory_benchs_appends_and_their_encoded_bodies_are_the_same_messages():
    import msgspec

    from bench import corpus
    from bench.memory import Options, Plan

    plan = Plan.build(Options.make(True, users=5, messages=40, long_users=1, long_len=10),
                      corpus.load(seed=1), "t")
    assert [msgspec.json.decode(b) for b in plan.bodies] == plan.appends
    assert len(plan.appends) == len(plan.owner) == 40
