"""bench/gateway.py's checks and report, and the bare HTTP server it compares with (no stack)."""

from __future__ import annotations

import aiohttp

from bench import baselines
from bench.gateway import GatewayBench, GatewayReport, HitCheck, markdown, request_body
from bench.memory import Options, Result, Target
from bench.stats import summarize
from devstack.process import free_port


def test_a_hit_check_counts_every_kind_of_wrong_reply():
    check = HitCheck([b"a", b"b"])
    for got in ((0, 200, "hit", b"a"), (1, 200, "hit", b"b"), (2, 200, "hit", b"a"),  # right
                (3, 200, "hit", b"a"), (0, 200, "miss", b"a"), (1, 529, None, b"{}")):  # wrong
        check(got)
    t = check.target()
    assert not t.passed and check.seen == 6
    assert dict(check.wrong) == {"a different body": 1, "tiermem-cache miss": 1, "status 529": 1}
    ok = HitCheck([b"a"])
    ok((5, 200, "hit", b"a"))
    assert ok.target().passed


async def test_the_bench_refuses_a_stack_off_loopback_or_without_a_gateway():
    env = {"NATS_URL": "nats://127.0.0.1:4222", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"}
    for extra, why in (({}, "no TIERMEM_ANTHROPIC_BASE_URL"),
                       ({"TIERMEM_ANTHROPIC_BASE_URL": "http://10.0.0.5:8080"}, "not on loopback")):
        rep = await GatewayBench(Options.make(True), {**env, **extra}, lambda _: None).run()
        assert [r.key for r in rep.results] == ["gateway_exact", "gateway_stream_ttfb"]
        assert all(why in r.skipped for r in rep.results)


async def test_the_bare_http_server_answers_every_post_with_its_fixed_body():
    port, body = free_port(), '{"type": "message", "content": []}'
    proc = await baselines.spawn_echo(["--http", str(port), body], {})
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/v1/messages", "/x"):
                async with http.post(f"http://127.0.0.1:{port}{path}", data=request_body("q", False)) as r:
                    assert r.status == 200 and await r.read() == body.encode()
    finally:
        await baselines.stop_child(proc)


def test_the_report_shows_targets_figures_and_skips():
    s = summarize([0.001, 0.0012, 0.0025])
    rep = GatewayReport(started="2026-01-01T00:00:00+00:00", baselines={"http_rt": summarize([0.0003])},
                        baseline_labels={"http_rt": "bare HTTP"})
    rep.results = [Result(key="gateway_exact", title="Exact hit over HTTP", summary=s, ratio_p50=4.0,
                          targets=[Target("p95 ≤ 2 ms", False, "2.37 ms")]),
                   Result(key="gateway_stream_ttfb", title="Replayed stream", skipped="failed: boom")]
    text = markdown(rep)
    assert "| Exact hit over HTTP | p95 ≤ 2 ms" in text and "**FAIL**" in text
    assert "skipped: failed: boom" in text and "bare HTTP" in text
