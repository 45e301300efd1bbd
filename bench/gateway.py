"""The llm-gateway benchmark: what a cache hit costs an app speaking the Anthropic API over HTTP.

Order of a run (each step reports "skipped: <why>" instead of crashing):

1. safety: the gateway, NATS and the simulator behind the broker must be on
   loopback (the bench never sends load to Claude or to another machine);
2. setup: QUESTIONS questions are posted to `POST /v1/messages` twice as
   plain JSON and QUESTIONS others twice with `stream: true`; the first ask
   must be a miss, the second a hit with the same message (JSON) or the same
   event stream (SSE) as the miss. The hits' bodies are kept as the reference;
3. latency, one request in flight, all interleaved in blocks of 50: the
   exact hit over HTTP (a repeated JSON request), the replayed stream hit
   (a repeated `stream: true` request; time to its first body byte, and to
   its last), the same hit asked as `llm.complete` over NATS (what the
   gateway adds is the difference), and the two bare round trips they are
   compared with: HTTP to a tiny aiohttp server in another process answering
   a fixed body as large as a hit's (`bench.echo --http`), NATS to an echo.
   Every reply is checked: status 200, `tiermem-cache: hit`, the body equal
   byte for byte to the reference.

Requests carry `tiermem-volatility: market_context` (1 h TTL) and a namespace
of their own (`tiermem-namespace: bench<run>`), so a run against a shared
stack never meets other traffic and leaves nothing behind for long.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from bench import baselines
from bench.llm import MODEL, SYSTEM_CHAT, is_loopback, questions
from bench.memory import Options, Result, Target, load_average, machine_facts
from bench.report import notes_section, targets_table, to_dict, write_files
from bench.stats import Summary, announce, fmt_ratio, fmt_us, markdown_table, ratio, summarize
from shared import bus
from shared.permissions import ADMIN

NAME = "gateway"
QUESTIONS = 20  # per kind (JSON, stream); cycled during the measurement
VOLATILITY = "market_context"
GOAL_EXACT_P95_US = 2000.0  # issue 14: exact hit over HTTP p95 ≤ 2 ms
ECHO_SUBJECT = "bench.gateway.echo"

LABELS = {
    "http_rt": "bare HTTP round trip: aiohttp client → aiohttp.web in another process, fixed JSON body",
    "nats_rt": baselines.LABELS["nats_rt"],
    "complete_exact": "the same exact hit asked as llm.complete over NATS (no HTTP, no gateway)",
    "stream_full": "replayed stream hit: time to the last byte of the event stream",
}

Say = Callable[[str], None]


@dataclass
class GatewayReport:
    options: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    baselines: dict[str, Summary] = field(default_factory=dict)
    baseline_labels: dict[str, str] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)
    setup: dict = field(default_factory=dict)
    started: str = ""
    duration_s: float = 0.0


def request_body(question: str, stream: bool) -> bytes:
    body = {"model": MODEL, "max_tokens": 200, "system": SYSTEM_CHAT,
            "messages": [{"role": "user", "content": question}]}
    if stream:
        body["stream"] = True
    return msgspec.json.encode(body)


class HitCheck:
    """Counts replies that are not a hit or whose body differs from the reference."""

    def __init__(self, reference: list[bytes]) -> None:
        self.reference = reference
        self.seen = 0
        self.wrong: Counter[str] = Counter()

    def __call__(self, got: tuple) -> None:
        i, status, cache, data = got[:4]
        self.seen += 1
        if status != 200:
            self.wrong[f"status {status}"] += 1
        elif cache != "hit":
            self.wrong[f"tiermem-cache {cache}"] += 1
        elif data != self.reference[i % len(self.reference)]:
            self.wrong["a different body"] += 1

    def target(self) -> Target:
        n = sum(self.wrong.values())
        return Target("every reply a hit with the reference body", n == 0,
                      f"{n} of {self.seen} wrong" + (f": {dict(self.wrong)}" if self.wrong else ""))


class GatewayBench:
    def __init__(self, opts: Options, env: dict[str, str], say: Say, stack_problem: str = "") -> None:
        self.opts = opts
        self.env = env
        self.say = say
        self.stack_problem = stack_problem
        self.run_id = secrets.token_hex(3)
        self.base = env.get("TIERMEM_ANTHROPIC_BASE_URL", "").rstrip("/")
        # a key the gateway accepts when the stack restricts them (GATEWAY_API_KEYS), any key otherwise
        keys = (env.get("GATEWAY_API_KEYS") or os.environ.get("GATEWAY_API_KEYS") or "bench").split(",")
        self.headers = {"x-api-key": keys[0].strip(), "anthropic-version": "2023-06-01",
                        "content-type": "application/json", "tiermem-volatility": VOLATILITY,
                        "tiermem-namespace": f"bench{self.run_id}"}
        self.report = GatewayReport(options={
            "quick": opts.quick, "samples": opts.samples, "warmup": opts.warmup,
            "questions_per_kind": QUESTIONS, "volatility": VOLATILITY, "model": MODEL,
            "http_client": "aiohttp.ClientSession, keep-alive, one request in flight",
            "stack": str(opts.stack_env) if opts.stack_env else "started by the bench",
        })
        self.json_bodies: list[bytes] = []
        self.stream_bodies: list[bytes] = []
        self.json_ref: list[bytes] = []
        self.stream_ref: list[bytes] = []

    def add(self, result: Result) -> Result:
        self.report.results.append(result)
        announce(self.say, result, "bare HTTP round trip")
        return result

    def _skip_all(self, why: str) -> None:
        for key, title in (("gateway_exact", "Exact hit over HTTP"),
                           ("gateway_stream_ttfb", "Replayed stream hit: time to first byte")):
            self.add(Result(key=key, title=title, skipped=why))

    def _unsafe(self) -> str:
        nats_url, sim = self.env.get("NATS_URL", ""), self.env.get("ANTHROPIC_BASE_URL", "")
        if not self.base:
            return "no TIERMEM_ANTHROPIC_BASE_URL in the stack environment (llm-gateway not started)"
        for what, url in (("the gateway", self.base), ("NATS", nats_url), ("the LLM endpoint", sim)):
            if not url:
                return f"no URL for {what} in the stack environment"
            if not is_loopback(url):
                return f"{what} at {url} is not on loopback; the bench only loads this machine"
        return ""

    async def run(self) -> GatewayReport:
        import aiohttp

        t0 = time.monotonic()
        self.report.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if why := self._unsafe():
            self._skip_all(why + (f" ({self.stack_problem})" if self.stack_problem else ""))
            self.report.duration_s = time.monotonic() - t0
            return self.report
        nc = http_echo = nats_echo = None
        # One connection per server, kept alive: what an SDK client does.
        gw = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        bare = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        try:
            nc = await bus.connect_as(self.env, ADMIN, name="bench-gateway", allow_reconnect=False,
                                      max_reconnect_attempts=1, connect_timeout=5)
            self.report.facts = await machine_facts(nc, self.env)
            try:
                await self.setup(gw)
            except Exception as exc:  # noqa: BLE001 - a failed step is a skipped row
                self._skip_all(f"failed: setup: {type(exc).__name__}: {exc}"[:400])
                return self.report
            from devstack.process import free_port

            port = free_port()
            identity = baselines.auth_env(bus.BusAuth.from_env(self.env, ADMIN))
            http_echo = await baselines.spawn_echo(["--http", str(port), self.json_ref[0].decode()], identity)
            nats_echo = await baselines.spawn_echo([self.env["NATS_URL"], ECHO_SUBJECT], identity)
            try:
                await self.latency(gw, bare, f"http://127.0.0.1:{port}/v1/messages", nc)
            except Exception as exc:  # noqa: BLE001
                self._skip_all(f"failed: latency: {type(exc).__name__}: {exc}"[:400])
        finally:
            self.report.facts["load_average_at_end"] = load_average()
            for proc in (http_echo, nats_echo):
                if proc is not None:
                    await baselines.stop_child(proc)
            await gw.close()
            await bare.close()
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()
            self.report.duration_s = time.monotonic() - t0
        return self.report

    # -- setup

    async def post(self, session, body: bytes, i: int = 0) -> tuple:
        """(i, status, tiermem-cache, body bytes, seconds to the first body byte)."""
        clock = time.perf_counter
        t0 = clock()
        async with session.post(self.base + "/v1/messages", data=body, headers=self.headers) as resp:
            first = await resp.content.readany()
            ttfb = clock() - t0
            data = first + await resp.content.read()
            return i, resp.status, resp.headers.get("tiermem-cache"), data, ttfb

    async def setup(self, gw) -> None:
        qs = [q for _, q, _ in questions()][: 2 * QUESTIONS]
        self.json_bodies = [request_body(q, False) for q in qs[:QUESTIONS]]
        self.stream_bodies = [request_body(q, True) for q in qs[QUESTIONS:]]
        tally: Counter[str] = Counter()
        for kind, bodies, ref in (("json", self.json_bodies, self.json_ref),
                                  ("stream", self.stream_bodies, self.stream_ref)):
            for b in bodies:
                _, s1, c1, first, _ = await self.post(gw, b)
                _, s2, c2, second, _ = await self.post(gw, b)
                if (s1, c1) != (200, "miss") or (s2, c2) != (200, "hit"):
                    raise RuntimeError(f"{kind}: expected miss then hit, got {s1} {c1} then {s2} {c2}: "
                                       f"{second[:200]!r}")
                same = (msgspec.json.decode(first) == msgspec.json.decode(second) if kind == "json"
                        else first == second)
                tally[f"{kind} hit same as miss" if same else f"{kind} hit differs from miss"] += 1
                ref.append(second)
        self.report.setup = {"questions_per_kind": QUESTIONS, **tally,
                             "json_reply_bytes": len(self.json_ref[0]),
                             "stream_reply_bytes": len(self.stream_ref[0])}
        self.say(f"gateway setup: {dict(tally)}")

    # -- latency

    async def latency(self, gw, bare, echo_url: str, nc) -> None:
        from services.llm_gateway import translate

        o = self.opts
        json_bodies, stream_bodies = self.json_bodies, self.stream_bodies
        echo_body, echo_ref = json_bodies[0], self.json_ref[0]
        complete = [msgspec.json.encode(translate.complete_body(msgspec.json.decode(b), self.headers).body)
                    for b in json_bodies]
        post = self.post

        async def exact(i: int):
            return await post(gw, json_bodies[i % len(json_bodies)], i)

        async def stream(i: int):
            return await post(gw, stream_bodies[i % len(stream_bodies)], i)

        async def http_rt(i: int):
            async with bare.post(echo_url, data=echo_body, headers=self.headers) as resp:
                return i, resp.status, "hit", await resp.read()

        async def complete_exact(i: int):
            return await nc.request("llm.complete", complete[i % len(complete)], timeout=10)

        async def nats_rt(_i: int):
            return await nc.request(ECHO_SUBJECT, echo_body, timeout=5)

        ttfb: list[float] = []
        exact_check, stream_check, bare_check = HitCheck(self.json_ref), HitCheck(self.stream_ref), HitCheck([echo_ref])
        complete_wrong: Counter[str] = Counter()

        def stream_seen(got: tuple) -> None:
            ttfb.append(got[4])
            stream_check(got)

        def complete_seen(msg) -> None:
            try:
                c = msgspec.json.decode(msg.data)["cache"]
                got = f"{c['status']}/{c.get('match')}"
            except (msgspec.DecodeError, KeyError, TypeError):
                got = f"error {msg.data[:80]!r}"
            if got != "hit/exact":
                complete_wrong[got] += 1

        calls = {"exact": (exact, exact_check), "stream_full": (stream, stream_seen),
                 "http_rt": (http_rt, bare_check), "complete_exact": (complete_exact, complete_seen),
                 "nats_rt": (nats_rt, None)}
        self.say(f"gateway latency: {o.samples:,} samples of each of {', '.join(calls)}, interleaved in blocks of 50")
        out = await baselines.interleaved(calls, o.samples, o.warmup)
        if bare_check.wrong:
            raise RuntimeError(f"the bare HTTP server answered wrongly: {dict(bare_check.wrong)}")
        for key in ("http_rt", "nats_rt", "complete_exact", "stream_full"):
            s = self.report.baselines[key] = summarize(out[key])
            self.report.baseline_labels[key] = LABELS[key]
            self.say(f"{LABELS[key]}: p50 {fmt_us(s.p50)}, p95 {fmt_us(s.p95)}, p99 {fmt_us(s.p99)}")
        b = self.report.baselines
        rt, comp = b["http_rt"], b["complete_exact"]

        r = Result(key="gateway_exact", title="Exact hit over HTTP: POST /v1/messages repeat",
                   baseline_label="bare HTTP round trip", baseline=rt)
        s = r.summary = summarize(out["exact"])
        r.ratio_p50 = ratio(s.p50, rt.p50)
        r.targets.append(Target("p95 ≤ 2 ms", s.p95 <= GOAL_EXACT_P95_US, fmt_us(s.p95)))
        r.targets.append(exact_check.target())
        n_wrong = sum(complete_wrong.values())
        r.notes.append(f"{len(json_bodies)} cached questions, cycled, {len(self.json_ref[0])} B replies; p95 "
                       f"{fmt_ratio(ratio(s.p95, rt.p95))} and p99 {fmt_ratio(ratio(s.p99, rt.p99))} the bare "
                       "HTTP round trip's")
        r.notes.append(f"the same hit as llm.complete over NATS, interleaved: p50 {fmt_us(comp.p50)}, p95 "
                       f"{fmt_us(comp.p95)} ({n_wrong} of {len(out['complete_exact'])} not hit/exact"
                       + (f": {dict(complete_wrong)}" if complete_wrong else "") + "); bare HTTP + that = "
                       f"{fmt_us(rt.p50 + comp.p50)} at p50, so the gateway's own work (parse, translate, "
                       f"encode, its NATS hop's client side) is about {fmt_us(max(0.0, s.p50 - rt.p50 - comp.p50))}")
        self.add(r)

        r = Result(key="gateway_stream_ttfb", title="Replayed stream hit: time to first byte",
                   baseline_label="bare HTTP round trip", baseline=rt)
        s = r.summary = summarize(ttfb)
        full = b["stream_full"]
        r.ratio_p50 = ratio(s.p50, rt.p50)
        r.targets.append(stream_check.target())
        r.notes.append(f"{len(stream_bodies)} cached `stream: true` questions, cycled, {len(self.stream_ref[0])} B "
                       f"event streams; to the last byte: p50 {fmt_us(full.p50)}, p95 {fmt_us(full.p95)}; p95 "
                       f"{fmt_ratio(ratio(s.p95, rt.p95))} the bare HTTP round trip's (whose whole reply is "
                       "its first byte)")
        r.notes.append("a hit is known only once the broker's whole reply (its recorded events) is in, so the "
                       "replay's headers and first event leave after that: time to first byte is the exact "
                       "hit's round trip plus the larger reply, and the rest of the stream follows at once")
        self.add(r)


# --------------------------------------------------------------------------- the report


def markdown(report: GatewayReport) -> str:
    o, f = report.options, report.facts
    lines = [
        "# tiermem llm-gateway benchmark",
        "",
        f"{'Quick' if o.get('quick') else 'Full'} run of `python -m bench --only gateway"
        f"{' --quick' if o.get('quick') else ''}` (or part of `--only all`), started {report.started}, took "
        f"{report.duration_s:.0f} s. An app's view of a cache hit through the Anthropic Messages API over HTTP "
        "(`POST /v1/messages` on the llm-gateway, answered by the llm-broker over NATS), one request in flight "
        "on a kept-alive connection, interleaved in blocks of 50 with the bare round trips it is compared "
        "with, measured in the same run on the same box.",
        "",
        "## Targets",
        "",
        targets_table(report.results),
        "",
        "## Latency",
        "",
    ]
    rows = []
    for r in report.results:
        if r.skipped:
            rows.append([r.title, "skipped", "", "", "", ""])
        elif r.summary is not None:
            s = r.summary
            rows.append([r.title, s.n, fmt_us(s.p50), fmt_us(s.p95), fmt_us(s.p99), fmt_ratio(r.ratio_p50)])
    rt = report.baselines.get("http_rt")
    for key, s in report.baselines.items():
        rows.append([report.baseline_labels.get(key, key), s.n, fmt_us(s.p50), fmt_us(s.p95), fmt_us(s.p99),
                     fmt_ratio(ratio(s.p50, rt.p50)) if rt else "–"])
    lines.append(markdown_table(["measurement", "n", "p50", "p95", "p99", "p50 / bare HTTP p50"], rows)
                 if rows else "Nothing measured.")
    if report.setup:
        lines += ["", "## Setup", "", markdown_table(["", "value"], [[k, v] for k, v in report.setup.items()],
                                                     align=["l", "r"])]
    lines += notes_section(report.results)
    if f:
        libs = ", ".join(f"{k} {v}" for k, v in f.get("libraries", {}).items())
        lines += ["", "## Machine", "", markdown_table(["fact", "value"], [
            ["date (UTC)", f.get("date", "?")], ["cores", f.get("cores", "?")], ["CPU", f.get("cpu", "?")],
            ["Python", f.get("python", "?")], ["nats-server", f.get("nats_server", "?")],
            ["Redis-compatible server", f.get("redis_server", "?")], ["libraries", libs],
            ["stack", o.get("stack", "?")],
            ["load average (1/5/15 min)", f"{f.get('load_average_at_start', '?')} at start, "
                                          f"{f.get('load_average_at_end', '?')} at the end"],
            ["git", f.get("git", "?")]], align=["l", "l"]),
            "", "Everything ran on this one machine over loopback: the bench's HTTP client, the gateway, NATS, "
            "the broker, Redis, Postgres and the bare servers share its cores."]
    return "\n".join(lines) + "\n"


def write(report: GatewayReport, out: Path) -> list[Path]:
    return write_files(out, NAME, markdown=markdown(report), data=to_dict(report))
