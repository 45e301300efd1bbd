"""The bench's "Auth and TLS cost" step: its rows, and a short real run on its three servers."""

from __future__ import annotations

import json

import pytest

from bench import security
from bench.memory import Options

KEYS = {f"{call}_{kind}" for call in ("rt", "l1") for kind in ("open", "locked", "tls")}


def _samples(us: dict[str, float], n: int = 200) -> dict[str, list[float]]:
    """`n` durations (seconds) around each call's given p50 (µs), spread ±10 %."""
    return {k: [v * (0.9 + 0.2 * i / (n - 1)) / 1e6 for i in range(n)] for k, v in us.items()}


def test_each_locked_and_tls_figure_is_a_ratio_to_the_open_server_and_auth_on_l1_hits_has_the_goal():
    rows = security.results(_samples({"rt_open": 200, "rt_locked": 204, "rt_tls": 260,
                                      "l1_open": 250, "l1_locked": 270, "l1_tls": 330}))
    by_key = {r.key: r for r in rows}
    assert set(by_key) == {"security_rt_locked", "security_rt_tls", "security_l1_locked", "security_l1_tls"}
    assert by_key["security_rt_tls"].ratio_p50 == pytest.approx(1.3)
    assert by_key["security_l1_locked"].baseline.p50 == pytest.approx(250)
    (goal,) = by_key["security_l1_locked"].targets
    assert "1.05×" in goal.text and not goal.passed and goal.observed == "1.080×"
    assert all(not r.targets for k, r in by_key.items() if k != "security_l1_locked")
    assert "bootstrap interval" in by_key["security_rt_locked"].notes[0]


def test_auth_within_five_percent_on_l1_hits_passes():
    rows = security.results(_samples({"rt_open": 200, "rt_locked": 200, "rt_tls": 200,
                                      "l1_open": 250, "l1_locked": 262, "l1_tls": 300}))
    (goal,) = next(r for r in rows if r.key == "security_l1_locked").targets
    assert goal.passed


async def test_the_step_measures_both_calls_on_the_open_locked_and_tls_servers(tmp_path):
    said: list[str] = []
    report = await security.run(Options.make(True, samples=60, warmup=10), said.append)

    assert not [r.skipped for r in report.results if r.skipped], said
    assert set(report.baselines) == KEYS and all(s.n == 60 for s in report.baselines.values())
    assert len(report.results) == 4
    targets = [t for r in report.results for t in r.targets]
    assert any(t.text.startswith("auth ≤ 1.05×") for t in targets)
    l1_checks = [t for t in targets if t.text.startswith("every reply from l1")]
    assert len(l1_checks) == 2 and all(t.passed for t in l1_checks)  # real sidecar hits, on all three
    assert report.facts["anonymous_refused"] == {"open": False, "locked": True, "tls": True}
    assert report.facts["tls"].startswith("TLSv1.")  # the TLS server really spoke TLS

    paths = security.write(report, tmp_path)
    md = (tmp_path / "security.md").read_text()
    assert "## What the ratios mean" in md and "locked + TLS" in md and "open (no auth)" in md
    data = json.loads((tmp_path / "security.json").read_text())
    assert {r["key"] for r in data["results"]} >= {"security_l1_locked", "security_l1_tls"}
    assert len(paths) == 2
