"""The llm-broker benchmark: what `llm.complete` costs on a hit, and how often it is right.

Order of a run (each step reports "skipped: <why>" instead of crashing):

1. safety: the stack must have the local simulator (`ANTHROPIC_BASE_URL` on
   loopback, answering `/stats` as the tiermem simulator) and NATS on
   loopback; the bench never sends load to Claude or to another machine;
2. setup: 200 chat questions over 40 users are asked once (misses, stored),
   then near-identical rewordings of each (casing, punctuation, a greeting,
   word order) are asked once and the ones the broker serves as semantic
   hits are kept for the measurement;
3. latency, one request in flight, all interleaved in blocks of 50 with the
   bare NATS round trip to an echo process, the service framework's floor,
   the wordllama embedding of one sentence, and the broker's own work done
   in this process (exact: Redis GET + stats write; semantic: Redis GET +
   embed + pgvector nearest + guard + stats write): exact hits (every reply
   checked: `hit`/`exact`) and semantic hits (`hit`/`semantic`);
4. the dev pairs: MRPC's training pairs of the report half (the guard was
   fitted on the other half) through the real broker, each pair in
   its own partition (a user per pair): sentence #1 (a miss, stored), then
   sentence #2; a hit on a paraphrase counts toward the hit rate, a hit on a
   non-paraphrase is a false hit. Skipped when the development data is absent;
5. accounting: `llm.stats` totals and the simulator's upstream call count,
   before and after, against the misses the bench saw.

`llm.complete` goes through `tiermem.AsyncClient`, as an application sends
it; the bare baselines stay raw, and the latency step times the raw request
of the same pre-encoded exact hit too, so the client's own cost is a row
("Client overhead") instead of hiding in the ratios.

Entries use the `market_context` class (1 h TTL) and users named
`bench<run>-...`, so a run against a shared stack never meets other traffic
and leaves nothing behind for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from bench import baselines
from bench.guard_calibration import in_fit_half
from bench.report import notes_section, targets_table, to_dict, write_files
from bench.memory import (
    REPO_ROOT, Options, Result, ServiceError, Target, decode, load_average, machine_facts, ping,
)
from bench.stats import (
    Summary, announce, fmt_pct, fmt_ratio, fmt_us, markdown_table, percentile, ratio, summarize,
)
from shared import bus
from shared.contract import CompleteReply, LLMStatsReply, decoder
from shared.permissions import ADMIN
from shared.errors import TierError
from shared.wilson import wilson
from tiermem import AsyncClient

NAME = "llm"
MRPC = REPO_ROOT.parent / "shared" / "data" / "mrpc" / "msr_paraphrase_train.txt"
SERVICE = "llm-broker"
IN_FLIGHT = 32  # pairs in flight during the dev-pair run
QUICK_PAIRS = 1000  # deterministic sample with --quick (all pairs otherwise)
QUICK_PARTITION = 500  # pairs in the one-partition run with --quick
USERS = 40  # latency setup: USERS users ...
MODEL = "claude-haiku-4-5"
VOLATILITY = "market_context"  # 1 h TTL, not dropped when the user speaks
SYSTEM_CHAT = ("You are a helpful real-estate assistant. Answer the lead's question in one or two "
               "friendly sentences.")
SYSTEM_DEV = "You are a helpful assistant. Reply to the user's message in one or two sentences."
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
NO_DEV_DATA = "no dev data"

Say = Callable[[str], None]

LABELS = {
    "nats_rt": baselines.LABELS["nats_rt"],
    "framework_floor": baselines.LABELS["framework_floor"],
    "embed": "wordllama embedding of one sentence, in this process",
    "inproc_exact": "the broker's exact-hit work in this process: Redis GET + decode + stats write",
    "inproc_semantic": "the broker's semantic-hit work in this process: Redis GET (miss) + embed "
                       "+ pgvector nearest + guard + stats write",
}


# --------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True)
class Pair:
    quality: int  # 1: paraphrase
    id1: str
    id2: str
    s1: str
    s2: str


def read_mrpc(path: Path) -> list[Pair]:
    """MRPC's TSV: UTF-8 with a BOM, a header row, `"` an ordinary character.

    Rows that do not have five fields or a 0/1 quality are skipped.
    """
    pairs = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for n, line in enumerate(f):
            cols = line.rstrip("\r\n").split("\t")
            if n == 0 and cols and cols[0] == "Quality":
                continue
            if len(cols) != 5 or cols[0] not in ("0", "1"):
                continue
            pairs.append(Pair(int(cols[0]), cols[1], cols[2], cols[3], cols[4]))
    return pairs


def same_sentence(a: str, b: str) -> bool:
    """The same sentence up to case, spacing and punctuation (its words and figures in order)."""
    return _letters(a) == _letters(b)


def _letters(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", text.lower())


def report_half(pairs: list[Pair]) -> list[Pair]:
    """The pairs the guard was not fitted on (bench/guard_calibration.py's split)."""
    return [p for p in pairs if not in_fit_half(f"{p.id1}-{p.id2}")]


def sample_pairs(pairs: list[Pair], n: int | None, seed: int) -> list[Pair]:
    """All pairs (n None or >= len), else a deterministic sample of n, in file order."""
    if n is None or n >= len(pairs):
        return list(pairs)
    keep = sorted(random.Random(seed).sample(range(len(pairs)), n))
    return [pairs[i] for i in keep]


@dataclass
class DevTally:
    """Outcomes of the dev pairs: how many of each kind were served from cache."""

    paraphrases: int = 0
    negatives: int = 0
    paraphrase_hits: int = 0
    false_hits: int = 0
    identical_pairs: int = 0  # #1 == #2 verbatim: an exact hit, not a test of the guard
    first_not_miss: int = 0  # #1 hit: the partition was not empty (should be 0)
    errors: int = 0

    def add(self, quality: int, hit: bool) -> None:
        if quality:
            self.paraphrases += 1
            self.paraphrase_hits += hit
        else:
            self.negatives += 1
            self.false_hits += hit

    def rates(self) -> dict:
        hits = self.paraphrase_hits + self.false_hits
        return {
            "hit_rate": self.paraphrase_hits / self.paraphrases if self.paraphrases else math.nan,
            "hit_rate_ci95": wilson(self.paraphrase_hits, self.paraphrases),
            "false_hit_rate": self.false_hits / self.negatives if self.negatives else math.nan,
            "false_hit_rate_ci95": wilson(self.false_hits, self.negatives),
            "precision": self.paraphrase_hits / hits if hits else math.nan,
            "served": hits,
        }


# Latency setup: 5 questions about each of 40 listings; each question has a
# word-order rewording next to it (the broker decides whether it is served).
TEMPLATES = (
    ("Is the {p} still available?", "Is the {p} available still?"),
    ("What is the asking price of the {p}?", "The asking price of the {p}, what is it?"),
    ("Can I schedule a viewing of the {p} this weekend?",
     "This weekend, can I schedule a viewing of the {p}?"),
    ("Does the {p} come with parking?", "Does parking come with the {p}?"),
    ("How old is the roof on the {p}?", "On the {p}, how old is the roof?"),
)
PLACES = tuple(
    f"{kind} {where}" for where in (
        "on Main Street", "near Riverside Park", "on Oak Avenue", "by the lake", "downtown",
        "on Maple Drive", "near the high school", "on Elm Court", "by the marina", "on Cedar Lane")
    for kind in ("house", "condo", "townhouse", "cottage"))


def questions() -> list[tuple[int, str, str]]:
    """(user index, question, its word-order rewording): USERS users x len(TEMPLATES)."""
    return [(u, q.format(p=PLACES[u]), r.format(p=PLACES[u]))
            for u in range(USERS) for q, r in TEMPLATES]


def variants(question: str, reordered: str) -> list[tuple[str, str]]:
    """Near-identical rewordings of a question: (kind, text), none equal to it."""
    core = question.rstrip("?!. ")
    out = [
        ("lower case", question.lower()),
        ("no question mark", core),
        ("space before ?", core + " ?"),
        ("! for ?", core + "!"),
        ("lower case, no ?", core.lower()),
        ("greeting", "Hi, " + question[:1].lower() + question[1:]),
        ("please", core + ", please?"),
        ("thanks", question + " Thanks!"),
        ("word order", reordered),
    ]
    return [(k, t) for k, t in out if t != question]


# --------------------------------------------------------------------------- the report


@dataclass
class LlmReport:
    options: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    baselines: dict[str, Summary] = field(default_factory=dict)
    baseline_labels: dict[str, str] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)
    setup: dict = field(default_factory=dict)
    dev: dict = field(default_factory=dict)
    partition: dict = field(default_factory=dict)
    accounting: dict = field(default_factory=dict)
    started: str = ""
    duration_s: float = 0.0


_reply = decoder(CompleteReply)
_stats = decoder(LLMStatsReply)
_encode = msgspec.json.Encoder().encode


def body(text: str, user: str, system: str = SYSTEM_CHAT, task: str = "reply") -> dict:
    """An `llm.complete` request, as `AsyncClient.complete` takes it."""
    return ({"task": task, "user_id": user, "model": MODEL, "system": system,
                    "max_tokens": 200, "temperature": 0,
                    "messages": [{"role": "user", "content": text}],
                    "cache": {"volatility": VOLATILITY, "mode": "semantic", "scope": "user"}})


async def _or_error(call):
    """The reply, or the client's exception for an error reply (counted by `MatchCheck`)."""
    try:
        return await call
    except TierError as exc:
        return exc


class MatchCheck:
    """Counts replies that are not a hit of the expected match."""

    def __init__(self, match: str, on_miss: Callable[[], None] | None = None) -> None:
        self.match = match
        self.on_miss = on_miss
        self.seen = 0
        self.wrong: Counter[str] = Counter()

    def __call__(self, reply: CompleteReply | TierError) -> None:
        """`reply`: a `CompleteReply`, the client's `TierError`, or a raw NATS reply."""
        self.seen += 1
        if isinstance(reply, TierError):
            got = f"error {reply.code}"
        else:
            try:
                c = (reply if isinstance(reply, CompleteReply) else decode(reply, _reply)).cache
                got = f"{c.status}/{c.match}" if c.status == "hit" else c.status
            except ServiceError as exc:
                got = f"error {exc.code}"
        if got == "miss" and self.on_miss is not None:
            self.on_miss()
        if got != f"hit/{self.match}":
            self.wrong[got] += 1

    @property
    def mismatches(self) -> int:
        return sum(self.wrong.values())

    def target(self) -> Target:
        return Target(f"every reply a hit/{self.match}", self.mismatches == 0,
                      f"{self.mismatches} of {self.seen} mismatched"
                      + (f": {dict(self.wrong)}" if self.wrong else ""))


def is_loopback(url: str) -> bool:
    try:
        return (urlsplit(url).hostname or "") in LOOPBACK
    except ValueError:
        return False


# --------------------------------------------------------------------------- the run


class LlmBench:
    def __init__(self, opts: Options, env: dict[str, str], say: Say, stack_problem: str = "") -> None:
        self.opts = opts
        self.env = env
        self.say = say
        self.stack_problem = stack_problem
        self.run_id = secrets.token_hex(3)
        self.report = LlmReport(options={
            "quick": opts.quick, "samples": opts.samples, "warmup": opts.warmup, "seed": opts.seed,
            "dev_pairs": QUICK_PAIRS if opts.quick else "all", "dev_in_flight": IN_FLIGHT,
            "volatility": VOLATILITY, "model": MODEL,
            "simulator_latency_median_s": os.environ.get("SIMULATOR_LATENCY_MEDIAN_S", "default"),
            "simulator_latency_p95_s": os.environ.get("SIMULATOR_LATENCY_P95_S", "default"),
            "stack": str(opts.stack_env) if opts.stack_env else "started by the bench",
        })
        self.nc = None
        self.bare: baselines.Bare | None = None
        self.failed = False
        self.misses_seen = 0  # replies with status miss: what the simulator should have been asked
        self.tm: AsyncClient | None = None  # llm.complete, over `nc`
        self.exact_bodies: list[dict] = []  # requests (`body`)
        self.semantic_bodies: list[dict] = []
        self.semantic_texts: list[tuple[str, str]] = []  # (user, text) of each semantic body

    # -- helpers

    def add(self, result: Result) -> Result:
        self.report.results.append(result)
        announce(self.say, result, _versus(result))
        return result

    def baseline(self, key: str, samples: list[float]) -> Summary:
        s = summarize(samples)
        self.report.baselines[key] = s
        self.report.baseline_labels[key] = LABELS.get(key, key)
        self.say(f"baseline {self.report.baseline_labels[key]}: "
                 f"p50 {fmt_us(s.p50)}, p95 {fmt_us(s.p95)}, p99 {fmt_us(s.p99)}")
        return s

    async def step(self, title: str, coro_fn) -> None:
        try:
            await coro_fn()
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - a failed step is a skipped row, not a crash
            self.failed = True
            why = f"{type(exc).__name__}: {exc}".strip()[:400]
            self.add(Result(key=title.lower().replace(" ", "_"), title=title, skipped=f"failed: {why}"))

    async def complete(self, request: dict) -> CompleteReply:
        reply = await self.tm.complete(request)
        self.misses_seen += reply.cache.status == "miss"
        return reply

    async def llm_stats(self) -> dict:
        msg = await self.nc.request("llm.stats", b"{}", timeout=5)
        return msgspec.structs.asdict(decode(msg, _stats))

    async def simulator_stats(self) -> dict:
        import httpx

        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(self.env["ANTHROPIC_BASE_URL"].rstrip("/") + "/stats")
            r.raise_for_status()
            return r.json()

    # -- main

    async def run(self) -> LlmReport:
        t0 = time.monotonic()
        self.report.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if why := self._unsafe():
            for title in ("Exact hit", "Semantic hit", "Dev pairs (MRPC)", "Accounting"):
                self.add(Result(key=title.lower(), title=title, skipped=why))
            self.report.duration_s = time.monotonic() - t0
            return self.report
        try:
            # Admin, like the memory bench: its bare baselines answer on the bench's own subjects.
            self.nc = await bus.connect_as(self.env, ADMIN, name="bench-llm", allow_reconnect=False,
                                           max_reconnect_attempts=1, connect_timeout=5,
                                           pending_size=64 * 1024 * 1024)
            self.tm = AsyncClient(self.nc, llm_timeout=30)
            self.report.facts = await machine_facts(self.nc, self.env)
            self.report.facts["guard_model"] = guard_model_fact()
            up = await ping(self.nc, SERVICE)
            sim = None
            with contextlib.suppress(Exception):
                sim = await self.simulator_stats()
            if not up or not sim or sim.get("simulator") != "tiermem":
                why = (f"{SERVICE} not answering $SRV.PING" if not up
                       else f"no tiermem simulator at {self.env.get('ANTHROPIC_BASE_URL')}/stats")
                why += f" ({self.stack_problem})" if self.stack_problem else ""
                for title in ("Exact hit", "Semantic hit", "Dev pairs (MRPC)", "Accounting"):
                    self.add(Result(key=title.lower(), title=title, skipped=why))
                return self.report
            self.stats_before = await self.llm_stats()
            self.sim_before = sim["requests"]
            await self.step("Setup", self.setup)
            if self.report.setup.get("ok"):
                await self.step("Hit latency", self.latency)
            await self.step("Dev pairs (MRPC)", self.dev_pairs)
            await self.step("One partition (MRPC)", self.dev_partition)
            await self.step("Accounting", self.accounting)
        finally:
            self.report.facts["load_average_at_end"] = load_average()
            if self.bare is not None:
                with contextlib.suppress(Exception):
                    await self.bare.stop()
            if self.nc is not None:
                with contextlib.suppress(Exception):
                    await self.nc.close()
            self.report.duration_s = time.monotonic() - t0
        return self.report

    def _unsafe(self) -> str:
        """Why this stack must not get the load ('' when it is fine)."""
        nats_url, sim = self.env.get("NATS_URL", ""), self.env.get("ANTHROPIC_BASE_URL", "")
        if not nats_url:
            return "no NATS_URL in the stack environment"
        if not is_loopback(nats_url):
            return f"NATS at {nats_url} is not on this machine's loopback; the bench only loads 127.0.0.1"
        if not sim:
            return ("no local simulator in the stack (ANTHROPIC_BASE_URL unset: the broker may call "
                    "Claude, and the bench never does)")
        if not is_loopback(sim):
            return f"the LLM endpoint {sim} is not on loopback; the bench only loads the local simulator"
        return ""

    # -- setup: store the questions, find the rewordings the broker serves

    async def setup(self) -> None:
        qs = questions()
        users = [f"bench{self.run_id}-lead-{u:02d}" for u in range(USERS)]
        first = Counter()
        for u, q, _ in qs:
            b = body(q, users[u])
            first[(await self.complete(b)).cache.status] += 1
            self.exact_bodies.append(b)
        served: Counter[str] = Counter()
        tried: Counter[str] = Counter()
        refused_examples = []
        for u, q, r in qs:
            for kind, text in variants(q, r):
                tried[kind] += 1
                b = body(text, users[u])
                c = (await self.complete(b)).cache
                if c.status == "hit" and c.match == "semantic":
                    served[kind] += 1
                    self.semantic_bodies.append(b)
                    self.semantic_texts.append((users[u], text))
                elif len(refused_examples) < 5:
                    refused_examples.append({"stored": q, "asked": text, "got": c.status})
        self.report.setup = {
            "questions": len(qs), "users": USERS, "first_asks": dict(first),
            "rewordings_tried": sum(tried.values()), "rewordings_served": sum(served.values()),
            "served_by_kind": {k: f"{served[k]}/{tried[k]}" for k in tried},
            "refused_examples": refused_examples,
        }
        self.say(f"setup: {first['miss']}/{len(qs)} questions stored as misses; "
                 f"{sum(served.values())}/{sum(tried.values())} rewordings served as semantic hits "
                 f"({', '.join(f'{k} {served[k]}/{tried[k]}' for k in tried)})")
        if first["miss"] != len(qs):
            raise RuntimeError(f"the first ask of each question should miss; got {dict(first)}")
        self.report.setup["ok"] = True

    # -- latency

    async def latency(self) -> None:
        o = self.opts
        self.bare = baselines.Bare(self.nc, self.env, self.run_id)
        await self.bare.start(_encode(self.exact_bodies[0]), [b"x" * 100] * 10)
        for key, why in self.bare.problems.items():
            self.say(f"baseline {key} unavailable: {why}")
        if "nats_rt" not in self.bare.calls:
            raise RuntimeError(f"no bare NATS round trip: {self.bare.problems.get('nats_rt')}")
        nc, tm, exact, semantic = self.nc, self.tm, self.exact_bodies, self.semantic_bodies
        raw = [_encode(b) for b in exact]

        async def ours_exact(i: int):
            return await _or_error(tm.complete(exact[i % len(exact)]))

        async def ours_semantic(i: int):
            return await _or_error(tm.complete(semantic[i % len(semantic)]))

        async def raw_exact(i: int):  # the same hit as a raw request: what the client adds
            return await nc.request("llm.complete", raw[i % len(raw)], timeout=10)

        def missed() -> None:
            self.misses_seen += 1

        exact_check, semantic_check = MatchCheck("exact", missed), MatchCheck("semantic", missed)
        raw_check = MatchCheck("exact", missed)
        calls = {"exact": (ours_exact, exact_check), "raw_exact": (raw_exact, raw_check)}
        if semantic:
            calls["semantic"] = (ours_semantic, semantic_check)
        calls.update({k: self.bare.calls[k] for k in ("nats_rt", "framework_floor") if k in self.bare.calls})
        async with self._inproc() as inproc:
            calls.update(inproc)
            self.say(f"latency: {o.samples:,} samples of each of {', '.join(calls)}, "
                     f"interleaved in blocks of 50")
            out = await baselines.interleaved(calls, o.samples, o.warmup)
        for key in ("nats_rt", "framework_floor", "embed", "inproc_exact", "inproc_semantic"):
            if key in out:
                self.baseline(key, out[key])
        rt = self.report.baselines["nats_rt"]
        floor = self.report.baselines.get("framework_floor")

        r = Result(key="llm_exact", title="Exact hit: llm.complete repeat",
                   baseline_label="bare NATS round trip", baseline=rt)
        s = r.summary = summarize(out["exact"])
        r.ratio_p50 = ratio(s.p50, rt.p50)
        r.targets.append(Target("p95 ≤ 1 ms", s.p95 <= 1000, fmt_us(s.p95)))
        r.targets.append(exact_check.target())
        r.notes.append(f"{len(exact)} cached questions of {USERS} users, cycled; p95 "
                       f"{fmt_ratio(ratio(s.p95, rt.p95))} and p99 {fmt_ratio(ratio(s.p99, rt.p99))} "
                       "the bare round trip's")
        if floor:
            r.notes.append(f"the service framework with no work inside adds {fmt_us(floor.p50 - rt.p50)} "
                           f"to a bare round trip at p50 (its p50 {fmt_us(floor.p50)}, p95 {fmt_us(floor.p95)})")
        if (part := self.report.baselines.get("inproc_exact")) is not None:
            r.notes.append(f"the broker's own work, done in this process ({LABELS['inproc_exact']}): "
                           f"p50 {fmt_us(part.p50)}, p95 {fmt_us(part.p95)}; round trip + that = "
                           f"{fmt_us(rt.p50 + part.p50)} at p50")
            r.notes.append(_unaccounted(s, floor or rt, part))
        self.add(r)

        self._client_overhead(out, raw_check)

        r = Result(key="llm_semantic", title="Semantic hit: llm.complete near-identical rewording",
                   baseline_label="bare NATS round trip", baseline=rt)
        if not semantic:
            r.skipped = "the broker served none of the rewordings as a semantic hit"
            self.add(r)
            return
        s = r.summary = summarize(out["semantic"])
        r.ratio_p50 = ratio(s.p50, rt.p50)
        emb = self.report.baselines.get("embed")
        r.targets.append(Target("p95 ≤ 5 ms, embedding, nearest and guard (rules + verifier) included",
                                s.p95 <= 5000, fmt_us(s.p95)))
        r.targets.append(semantic_check.target())
        st = self.report.setup
        r.notes.append(f"{len(semantic)} rewordings the broker served in setup "
                       f"({st['rewordings_served']}/{st['rewordings_tried']} tried), cycled; a semantic hit "
                       "stores nothing, so a repeat stays semantic; p95 "
                       f"{fmt_ratio(ratio(s.p95, rt.p95))} the bare round trip's")
        if emb is not None:
            r.notes.append(f"embedding one sentence in this process: p50 {fmt_us(emb.p50)}, "
                           f"p95 {fmt_us(emb.p95)}")
        if (part := self.report.baselines.get("inproc_semantic")) is not None:
            r.notes.append(f"the broker's own work, done in this process ({LABELS['inproc_semantic']}): "
                           f"p50 {fmt_us(part.p50)}, p95 {fmt_us(part.p95)}; round trip + that = "
                           f"{fmt_us(rt.p50 + part.p50)} at p50")
            r.notes.append(_unaccounted(s, floor or rt, part))
        self.add(r)

    def _client_overhead(self, out: dict, raw_check: MatchCheck) -> None:
        r = Result(key="llm_client_overhead", title="Client overhead: exact hit through tiermem.AsyncClient",
                   baseline_label="raw NATS request of the same llm.complete (pre-encoded, reply not decoded)")
        s, base = r.summary, r.baseline = summarize(out["exact"]), summarize(out["raw_exact"])
        r.ratio_p50 = ratio(s.p50, base.p50)
        r.targets.append(raw_check.target())
        r.notes.append(f"the client adds {fmt_us(s.p50 - base.p50)} at p50 (encode the request, inject the "
                       f"trace context, decode the typed reply); interleaved with the rows above")
        self.add(r)

    @contextlib.asynccontextmanager
    async def _inproc(self):
        """In-process parts: the embedding and the broker's own lookups (empty dict when unavailable)."""
        calls: dict = {}
        embedder = cache = redis = None
        try:
            from shared.embeddings import embedder_from_settings
            from shared.settings import Settings

            settings = Settings.from_env({**os.environ, **self.env})
            embedder = embedder_from_settings(settings)
            texts = [t for _, t in self.semantic_texts] or ["Is the house on Main Street still available?"]

            async def embed(i: int):
                return await embedder.embed([texts[i % len(texts)]], input_type="query")

            calls["embed"] = (embed, None)
            self.report.facts["embedder_model"] = embedder.model_id
        except Exception as exc:  # noqa: BLE001 - the measurement goes on without it
            self.say(f"no in-process embedding: {type(exc).__name__}: {exc}")
        try:
            if embedder is None:
                raise RuntimeError("no embedder")
            calls.update(await self._inproc_lookups(embedder))
            cache, redis = self._cache, self._redis
        except Exception as exc:  # noqa: BLE001
            self.say(f"no in-process lookup baseline: {type(exc).__name__}: {exc}")
        try:
            yield calls
        finally:
            if redis is not None:
                with contextlib.suppress(Exception):
                    await redis.delete(self._stats_key)
                with contextlib.suppress(Exception):
                    await redis.aclose()
            if cache is not None:
                with contextlib.suppress(Exception):
                    await cache.close()
            if embedder is not None:
                with contextlib.suppress(Exception):
                    await embedder.aclose()

    async def _inproc_lookups(self, embedder) -> dict:
        """What the broker does for a hit, here: the same calls on the same servers."""
        from redis.asyncio import Redis

        from services.llm_broker import guard
        from services.llm_broker.cache import ResponseCache
        from services.llm_broker.policy import exact_key, latest_user_text, partition_key
        from shared.contract import CompleteRequest

        self._redis = redis = Redis.from_url(self.env["REDIS_URL"])
        self._cache = cache = await ResponseCache.open(redis, self.env["DATABASE_URL"], embedder.model_id,
                                                       command_timeout=30.0)
        self._stats_key = stats_key = f"bench:{self.run_id}:llm-stats"
        def prepared(bodies: list[dict]):
            out = []
            for b in bodies:
                req = msgspec.convert(b, CompleteRequest)
                part = partition_key(req)
                out.append((exact_key(part, req), part, latest_user_text(req)))
            return out

        exact, semantic = prepared(self.exact_bodies), prepared(self.semantic_bodies)

        async def stats_write() -> None:  # the shape of services.llm_broker.stats.record on a hit
            pipe = redis.pipeline(transaction=False)
            pipe.hincrby(stats_key, "requests", 1)
            pipe.hincrby(stats_key, "hits", 1)
            pipe.hincrbyfloat(stats_key, "cost_usd", 0.0)
            pipe.hincrbyfloat(stats_key, "saved_usd", 0.001)
            await pipe.execute()

        async def exact_lookup(i: int):
            key, _, _ = exact[i % len(exact)]
            entry, _ = await cache.lookup(key, None, time.time())
            await stats_write()
            return entry

        def exact_ok(entry) -> None:
            if entry is None:
                raise AssertionError("in-process exact lookup found nothing")

        calls = {"inproc_exact": (exact_lookup, exact_ok)}
        if semantic:
            space = embedder.model_id

            async def semantic_lookup(i: int):
                key, part, text = semantic[i % len(semantic)]
                await cache.lookup(key, None, time.time())  # the broker tries the exact tier first
                vec = (await embedder.embed([text], input_type="query"))[0]
                found = None
                for cand in await cache.nearest(part, vec, time.time()):
                    if guard.decide(text, cand.entry.query, cand.similarity, space=space).serve:
                        found = cand
                        break
                await stats_write()
                return found

            def semantic_ok(found) -> None:
                if found is None:
                    raise AssertionError("in-process semantic lookup served nothing")

            calls["inproc_semantic"] = (semantic_lookup, semantic_ok)
        return calls

    # -- dev pairs

    async def dev_pairs(self) -> None:
        r = Result(key="llm_dev", title="Dev pairs (MRPC): paraphrase hits and false hits", kind="quality")
        if not MRPC.is_file():
            r.skipped = f"{NO_DEV_DATA} ({MRPC} is absent; the repository does not need it)"
            self.report.dev = {"skipped": r.skipped}
            self.add(r)
            return
        everything = report_half(read_mrpc(MRPC))
        pairs = sample_pairs(everything, QUICK_PAIRS if self.opts.quick else None, self.opts.seed)
        tally = DevTally()
        false_hits: list[dict] = []
        hit_sims: list[float] = []
        miss_lat: list[float] = []
        second_lat: dict[str, list[float]] = {"hit": [], "miss": []}
        errors: list[str] = []
        done = 0
        clock = time.perf_counter
        run = self.run_id

        async def one(i: int) -> None:
            nonlocal done
            p = pairs[i]
            user = f"bench{run}-mrpc-{i}"
            try:
                t0 = clock()
                first = await self.complete(body(p.s1, user, SYSTEM_DEV, "chat"))
                t1 = clock()
                second = await self.complete(body(p.s2, user, SYSTEM_DEV, "chat"))
                t2 = clock()
            except Exception as exc:  # noqa: BLE001 - counted; the pair is left out of the rates
                tally.errors += 1
                if len(errors) < 3:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            finally:
                done += 1
                if done % 500 == 0:
                    self.say(f"  {done:,}/{len(pairs):,} pairs")
            if first.cache.status != "miss":
                tally.first_not_miss += 1
            hit = second.cache.status == "hit"
            if p.s1 == p.s2:
                tally.identical_pairs += 1
            tally.add(p.quality, hit)
            miss_lat.append(t1 - t0)
            second_lat["hit" if hit else "miss"].append(t2 - t1)
            if hit:
                hit_sims.append(second.cache.similarity or 1.0)
                if not p.quality:
                    false_hits.append({"id1": p.id1, "id2": p.id2, "s1": p.s1, "s2": p.s2,
                                       "match": second.cache.match, "similarity": second.cache.similarity})

        self.say(f"dev pairs: {len(pairs):,} of {len(everything):,} MRPC report-half pairs, "
                 f"{IN_FLIGHT} pairs in flight")
        res = await baselines.run_concurrent(one, len(pairs), IN_FLIGHT)
        rates = tally.rates()
        self.report.dev = {
            "source": str(MRPC), "pairs_in_file": len(everything), "pairs": len(pairs),
            "sampled": len(pairs) < len(everything), "in_flight": IN_FLIGHT,
            "elapsed_s": res.elapsed_s, "pairs_per_s": len(pairs) / res.elapsed_s if res.elapsed_s else None,
            **asdict(tally), **rates,
            "false_hit_examples": false_hits,
            "hit_similarity": summarize_plain(hit_sims),
            "latency_first_miss": summarize(miss_lat).as_dict() if miss_lat else None,
            "latency_second_hit": summarize(second_lat["hit"]).as_dict() if second_lat["hit"] else None,
            "latency_second_miss": summarize(second_lat["miss"]).as_dict() if second_lat["miss"] else None,
            "errors_first": errors,
        }
        lo, hi = rates["false_hit_rate_ci95"]
        r.targets.append(Target("false hits ≤ 1 % of the non-paraphrases", rates["false_hit_rate"] <= 0.01,
                                f"{tally.false_hits}/{tally.negatives} = {fmt_pct(rates['false_hit_rate'], 2)} "
                                f"(95 % CI {fmt_pct(lo, 2)}–{fmt_pct(hi, 2)})"))
        lo, hi = rates["hit_rate_ci95"]
        r.targets.append(Target("≥ 40 % of the paraphrases hit", rates["hit_rate"] >= 0.40,
                                f"{tally.paraphrase_hits}/{tally.paraphrases} = {fmt_pct(rates['hit_rate'])} "
                                f"(95 % CI {fmt_pct(lo)}–{fmt_pct(hi)})"))
        r.targets.append(Target("no errors, every first ask a miss", tally.errors == 0 and not tally.first_not_miss,
                                f"{tally.errors} errors, {tally.first_not_miss} first asks not a miss"))
        which = "a deterministic sample, --quick" if len(pairs) < len(everything) else "all"
        r.notes.append(f"{len(pairs):,} pairs ({which}"
                       f"; {tally.paraphrases:,} paraphrases, {tally.negatives:,} non-paraphrases) through the real "
                       f"broker in {res.elapsed_s:.1f} s ({2 * len(pairs) / res.elapsed_s:,.0f} requests/s, "
                       f"most of them misses that call the simulator and store), {IN_FLIGHT} pairs in flight; "
                       "a user per pair, cache.mode semantic, a free-text task")
        r.notes.append(f"precision {fmt_pct(rates['precision'])}: {rates['served']} served, "
                       f"{tally.false_hits} of them wrong; {tally.identical_pairs} pairs were identical strings")
        if errors:
            r.notes.append(f"first errors: {errors}")
        self.add(r)

    # -- one large partition

    async def dev_partition(self) -> None:
        """Every report-half sentence #1 in ONE partition, then every #2 asked there.

        The per-pair run above cannot serve a pair another pair's answer; a
        real partition (a user's questions, a global task) can. Each hit is
        classified by the sentence whose answer it served (known from the
        misses that stored them): the asked sentence itself up to case,
        spacing and punctuation (MRPC reuses sentences across pairs) is
        right; the pair's own #1 is right for a paraphrase and wrong for a
        non-paraphrase (MRPC's label); any other sentence has no label and is
        counted apart, and as wrong in the bound the target is held to.
        """
        r = Result(key="llm_partition", title="One partition (MRPC report half): right and wrong hits",
                   kind="quality")
        if not MRPC.is_file():
            r.skipped = f"{NO_DEV_DATA} ({MRPC} is absent; the repository does not need it)"
            self.report.partition = {"skipped": r.skipped}
            self.add(r)
            return
        pairs = sample_pairs(report_half(read_mrpc(MRPC)), QUICK_PARTITION if self.opts.quick else None,
                             self.opts.seed)
        user = f"bench{self.run_id}-partition"
        firsts = list(dict.fromkeys(p.s1 for p in pairs))
        stored: set[str] = set()
        served_by: dict[str, list[str]] = {}  # an answer a miss stored -> the sentence(s) it answers
        hits: list[tuple[str, Pair | None, str, float | None]] = []  # (asked, its pair, answer, similarity)
        errors = 0
        outcome: Counter[str] = Counter()

        async def ask(text: str, pair: Pair | None) -> None:
            nonlocal errors
            try:
                reply = await self.complete(body(text, user, SYSTEM_DEV, "chat"))
            except Exception:  # noqa: BLE001 - counted
                errors += 1
                return
            if pair is None:
                stored.add(text)
            else:
                outcome["paraphrases" if pair.quality else "non_paraphrases"] += 1
            if reply.cache.status == "hit":
                hits.append((text, pair, reply.text, reply.cache.similarity))
            else:
                served_by.setdefault(reply.text, []).append(text)

        async def store(i: int) -> None:
            await ask(firsts[i], None)

        async def second(i: int) -> None:
            p = pairs[i]
            if p.s2 in stored or p.s1 not in stored:
                outcome["skipped_pairs"] += 1  # #2 is itself a stored #1, or its #1 failed
                return
            await ask(p.s2, p)

        self.say(f"one partition: {len(firsts):,} sentences #1 stored, then {len(pairs):,} sentences #2 asked")
        t0 = time.perf_counter()
        await baselines.run_concurrent(store, len(firsts), IN_FLIGHT)
        await baselines.run_concurrent(second, len(pairs), IN_FLIGHT)
        elapsed = time.perf_counter() - t0
        examples: dict[str, list[dict]] = {"wrong": [], "unlabelled": []}
        for asked, pair, answer, similarity in hits:
            served = served_by.get(answer, [])
            if any(same_sentence(s, asked) for s in served):
                kind = "right"
            elif pair is not None and pair.s1 in served:
                kind = "right" if pair.quality else "wrong"
            else:
                kind = "unlabelled"
            outcome[kind] += 1
            outcome["paraphrases_right"] += kind == "right" and pair is not None and bool(pair.quality)
            if kind != "right" and len(examples[kind]) < 5:
                examples[kind].append({"asked": asked, "served_for": served[:1], "similarity": similarity,
                                       "own_first": pair.s1 if pair else None,
                                       "quality": pair.quality if pair else None})
        n_hits = len(hits)
        labelled = outcome["right"] + outcome["wrong"]
        bound = (outcome["wrong"] + outcome["unlabelled"]) / n_hits if n_hits else 0.0
        right_rate = outcome["paraphrases_right"] / outcome["paraphrases"] if outcome["paraphrases"] else math.nan
        self.report.partition = {
            "pairs": len(pairs), "stored": len(stored), "errors": errors, "hits": n_hits, **outcome,
            "right_hit_rate": right_rate,
            "right_hit_rate_ci95": wilson(outcome["paraphrases_right"], outcome["paraphrases"]),
            "wrong_share_labelled": outcome["wrong"] / labelled if labelled else 0.0,
            "wrong_share_bound": bound,
            "wrong_share_bound_ci95": wilson(outcome["wrong"] + outcome["unlabelled"], n_hits),
            "examples": examples, "elapsed_s": elapsed,
        }
        r.targets.append(Target("≤ 1 % of the hits wrong (unlabelled hits counted wrong)", bound <= 0.01,
                                f"{outcome['wrong']} wrong + {outcome['unlabelled']} unlabelled of {n_hits} "
                                f"= {fmt_pct(bound, 2)}"))
        r.targets.append(Target("≥ 85 % of the paraphrases served right", right_rate >= 0.85,
                                f"{outcome['paraphrases_right']}/{outcome['paraphrases']} = {fmt_pct(right_rate)}"))
        r.targets.append(Target("no errors", errors == 0, f"{errors} errors"))
        r.notes.append(f"{len(stored):,} distinct sentences #1 stored in one partition, then {len(pairs):,} #2 "
                       f"asked ({outcome['skipped_pairs']} skipped: #2 equals a stored #1); {n_hits} hits: "
                       f"{outcome['right']} right, {outcome['wrong']} wrong by MRPC's label, "
                       f"{outcome['unlabelled']} served another pair's sentence (no label); "
                       f"{elapsed:.1f} s, {IN_FLIGHT} in flight")
        self.add(r)

    # -- accounting

    async def accounting(self) -> None:
        r = Result(key="llm_accounting", title="Accounting: llm.stats and upstream calls", kind="accounting")
        after = await self.llm_stats()
        sim_after = (await self.simulator_stats())["requests"]
        before = self.stats_before
        delta = {k: (after.get(k, 0) - before.get(k, 0)) for k in after
                 if isinstance(after.get(k), (int, float)) and k != "hit_rate"}
        for k in ("cost_usd", "saved_usd"):
            delta[k] = round(delta.get(k, 0.0), 6)
        upstream = sim_after - self.sim_before
        self.report.accounting = {"llm_stats_totals": after, "llm_stats_during_run": delta,
                                  "simulator_requests_during_run": upstream,
                                  "simulator_requests_total": sim_after,
                                  "misses_seen_by_bench": self.misses_seen}
        paid = delta.get("misses", 0) + delta.get("uncached", 0)
        r.targets.append(Target("simulator calls = broker misses = misses the bench saw",
                                upstream == paid == self.misses_seen,
                                f"{upstream:,} upstream calls, {paid:,} misses in llm.stats, "
                                f"{self.misses_seen:,} seen"))
        hits = delta.get("hits_exact", 0) + delta.get("hits_semantic", 0)
        req = delta.get("requests", 0)
        r.notes.append(f"during the run: {req:,} requests, {delta.get('hits_exact', 0):,} exact and "
                       f"{delta.get('hits_semantic', 0):,} semantic hits ({fmt_pct(hits / req if req else None)}), "
                       f"{delta.get('misses', 0):,} misses; spent ${delta.get('cost_usd', 0):.4f}, "
                       f"saved ${delta.get('saved_usd', 0):.4f} (simulated prices)")
        self.add(r)


def _unaccounted(ours: Summary, floor: Summary, part: Summary) -> str:
    both = floor.p50 + part.p50
    return (f"not explained by the parts: {fmt_us(max(0.0, ours.p50 - both))} at p50 ({fmt_us(ours.p50)} "
            f"measured vs {fmt_us(both)} = framework floor + the broker's I/O done here): the broker "
            "process's per-request overhead beyond its Redis/Postgres calls (metrics, spans, logging, "
            "scheduling on a shared box)")


def guard_model_fact() -> str:
    """Which guard model the broker loaded (the file changes when the guard is recalibrated)."""
    import hashlib

    path = REPO_ROOT / "services" / "llm_broker" / "guard_model.json"
    try:
        raw = path.read_bytes()
        doc = json.loads(raw)
        default = doc.get("default", "?")
        threshold = doc.get("models", {}).get(default, {}).get("threshold")
        return (f"guard_model.json sha256 {hashlib.sha256(raw).hexdigest()[:12]}, default {default}"
                + (f", threshold {threshold:.4f}" if isinstance(threshold, float) else ""))
    except (OSError, ValueError, AttributeError) as exc:
        return f"unreadable: {exc}"


def summarize_plain(values: list[float]) -> dict | None:
    """min/p50/max of plain numbers (similarities), or None."""
    if not values:
        return None
    return {"n": len(values), "min": min(values), "p50": percentile(values, 50), "max": max(values)}


# --------------------------------------------------------------------------- writing the report


def write(report: LlmReport, out: Path) -> list[Path]:
    return write_files(out, NAME, markdown=markdown(report), data=to_dict(report),
                       plot=lambda png: plot(report, png))


def markdown(report: LlmReport) -> str:
    f, o = report.facts, report.options
    lines = [
        "# tiermem llm-broker benchmark",
        "",
        f"{'Quick' if o.get('quick') else 'Full'} run of `python -m bench --only llm"
        f"{' --quick' if o.get('quick') else ''}` (or part of `python -m bench`), started {report.started}, "
        f"took {report.duration_s:.0f} s. Latencies are what a client sees over NATS, one request in "
        "flight, interleaved in blocks of 50 with the bare baselines measured in the same run on the "
        "same servers. The upstream is the local simulator (latency median "
        f"{o.get('simulator_latency_median_s')} s, p95 {o.get('simulator_latency_p95_s')} s); "
        "the bench never calls Claude.",
        "",
        "## Targets",
        "",
    ]
    lines.append(targets_table(report.results))
    lat = [r for r in report.results if r.kind == "latency" and not r.skipped and r.summary]
    if lat:
        lines += ["", "## Hit latency", ""]
        lines.append(markdown_table(
            ["measurement", "n", "p50", "p95", "p99", "bare round trip p50 / p95", "ratio p50", "ratio p95"],
            [[r.title, f"{r.summary.n:,}", fmt_us(r.summary.p50), fmt_us(r.summary.p95), fmt_us(r.summary.p99),
              f"{fmt_us(r.baseline.p50)} / {fmt_us(r.baseline.p95)}" if r.baseline else "–",
              fmt_ratio(r.ratio_p50), fmt_ratio(ratio(r.summary.p95, r.baseline.p95)) if r.baseline else "–"]
             for r in lat],
            align=["l", "r", "r", "r", "r", "r", "r", "r"]))
    if report.baselines:
        lines += ["", "### Baselines and parts, interleaved with the above", ""]
        lines.append(markdown_table(
            ["building block", "n", "p50", "p95", "p99"],
            [[report.baseline_labels.get(k, k), f"{s.n:,}", fmt_us(s.p50), fmt_us(s.p95), fmt_us(s.p99)]
             for k, s in report.baselines.items()],
            align=["l", "r", "r", "r", "r"]))
    st = report.setup
    if st:
        lines += ["", "### Which rewordings the broker served", "",
                  f"{st['questions']} questions over {st['users']} users were asked once (misses, stored); then "
                  f"each rewording once: {st['rewordings_served']}/{st['rewordings_tried']} were served as "
                  "semantic hits. The semantic-hit latency cycles over the served ones.", ""]
        lines.append(markdown_table(["rewording", "served"], [[k, v] for k, v in st["served_by_kind"].items()],
                                    align=["l", "r"]))
        if st.get("refused_examples"):
            lines += ["", "Refused (first few): " + "; ".join(
                f"“{e['asked']}” for “{e['stored']}” ({e['got']})" for e in st["refused_examples"])]
    d = report.dev
    lines += ["", "## Dev pairs: MRPC through the real broker", ""]
    if not d or d.get("skipped"):
        lines.append(f"skipped: {d['skipped']}" if d and d.get("skipped") else "not run")
    else:
        ci = d["hit_rate_ci95"]
        fci = d["false_hit_rate_ci95"]
        lines += [
            f"{d['pairs']:,} of the {d['pairs_in_file']:,} report-half pairs of `msr_paraphrase_train.txt` "
            "(the half the guard was not fitted on; bench/guard_calibration.py)"
            f"{' (deterministic sample)' if d['sampled'] else ''}, {d['in_flight']} pairs in flight, "
            f"{d['elapsed_s']:.1f} s. Each pair has its own user, so its own partition: sentence #1 is asked "
            "(a miss, stored), then sentence #2 (cache.mode semantic, a free-text task). A hit on a Quality-1 "
            "pair is a paraphrase hit; a hit on a Quality-0 pair is a false hit (a wrong answer served).",
            "",
            markdown_table(
                ["", "pairs", "served from cache", "rate", "95 % CI"],
                [["paraphrases (Quality 1)", f"{d['paraphrases']:,}", f"{d['paraphrase_hits']:,}",
                  fmt_pct(d["hit_rate"]), f"{fmt_pct(ci[0])}–{fmt_pct(ci[1])}"],
                 ["non-paraphrases (Quality 0): false hits", f"{d['negatives']:,}", f"{d['false_hits']:,}",
                  fmt_pct(d["false_hit_rate"], 2), f"{fmt_pct(fci[0], 2)}–{fmt_pct(fci[1], 2)}"],
                 ["precision (served pairs that are paraphrases)", "", f"{d['served']:,}",
                  fmt_pct(d["precision"]), ""]],
                align=["l", "r", "r", "r", "r"]),
            "",
            f"Targets: false hits ≤ 1 % — **{'met' if d['false_hit_rate'] <= 0.01 else 'not met'}**; "
            f"≥ 40 % of paraphrases hit (issue 12) — **{'met' if d['hit_rate'] >= 0.4 else 'not met'}**. "
            "MRPC's “paraphrase” means “the same news story”: many Quality-1 pairs differ in numbers, dates "
            "or names, which the guard refuses on purpose (a cached answer for “3-bed” is wrong for “4-bed”); "
            "see `guard.md` for the guard's calibration and the whole recall/false-hit curve.",
        ]
        ex = d.get("false_hit_examples") or []
        if ex:
            lines += ["", f"False hits ({len(ex)}; first 10):", ""]
            lines.append(markdown_table(
                ["sim.", "sentence #1 (stored)", "sentence #2 (served its answer)"],
                [[f"{e['similarity']:.3f}" if e.get("similarity") is not None else "–", e["s1"], e["s2"]]
                 for e in ex[:10]], align=["r", "l", "l"]))
        lat_rows = [(name, d.get(key)) for name, key in (
            ("#1, a miss (upstream call + store)", "latency_first_miss"),
            ("#2 served from cache", "latency_second_hit"), ("#2 a miss", "latency_second_miss"))]
        lat_rows = [(n, s) for n, s in lat_rows if s]
        if lat_rows:
            lines += ["", f"Latency under {d['in_flight']} pairs in flight (not the one-in-flight figures):", ""]
            lines.append(markdown_table(["request", "n", "p50", "p95", "p99"],
                                        [[n, f"{s['n']:,}", fmt_us(s["p50"]), fmt_us(s["p95"]), fmt_us(s["p99"])]
                                         for n, s in lat_rows], align=["l", "r", "r", "r", "r"]))
    q = report.partition
    lines += ["", "## One partition: MRPC report half, every sentence in one user's cache", ""]
    if not q or q.get("skipped"):
        lines.append(f"skipped: {q['skipped']}" if q and q.get("skipped") else "not run")
    else:
        lo, hi = q["right_hit_rate_ci95"]
        blo, bhi = q["wrong_share_bound_ci95"]
        lines += [
            f"{q['stored']:,} distinct sentences #1 of {q['pairs']:,} report-half pairs stored in ONE partition, "
            "then each sentence #2 asked there. Each hit is classified by the sentence whose answer it served: "
            "the asked sentence itself (up to case, spacing, punctuation) is right; the pair's own #1 is right "
            "for a paraphrase and wrong for a non-paraphrase (MRPC's label); another pair's sentence has no "
            "label, and counts as wrong in the bound.",
            "",
            markdown_table(
                ["paraphrases asked", "served right", "hits", "right", "wrong (labelled)", "unlabelled",
                 "wrong share, unlabelled counted wrong"],
                [[f"{q.get('paraphrases', 0):,}",
                  f"{q.get('paraphrases_right', 0):,} = {fmt_pct(q['right_hit_rate'])} ({fmt_pct(lo)}–{fmt_pct(hi)})",
                  f"{q['hits']:,}", f"{q.get('right', 0):,}", f"{q.get('wrong', 0):,}", f"{q.get('unlabelled', 0):,}",
                  f"{fmt_pct(q['wrong_share_bound'], 2)} ({fmt_pct(blo, 2)}–{fmt_pct(bhi, 2)})"]],
                align=["r"] * 7),
        ]
        for kind in ("wrong", "unlabelled"):
            ex = (q.get("examples") or {}).get(kind) or []
            if ex:
                lines += ["", f"{kind.capitalize()} hits (first few): " + "; ".join(
                    f"“{e['asked']}” served the answer for “{(e['served_for'] or ['?'])[0]}” "
                    f"(similarity {e['similarity']})" for e in ex)]
    a = report.accounting
    if a:
        t, dr = a["llm_stats_totals"], a["llm_stats_during_run"]
        keys = ("requests", "hits_exact", "hits_semantic", "misses", "uncached", "upstream_calls",
                "input_tokens", "output_tokens", "cost_usd", "saved_usd")
        lines += ["", "## Accounting", "",
                  markdown_table(["llm.stats", "during this run", "total at the end"],
                                 [[k, _num(dr.get(k)), _num(t.get(k))] for k in keys]
                                 + [["hit_rate", "", _num(t.get("hit_rate"))]],
                                 align=["l", "r", "r"]),
                  "",
                  f"Simulator `/stats` requests during the run: **{a['simulator_requests_during_run']:,}** "
                  f"(total {a['simulator_requests_total']:,}); misses the bench saw: {a['misses_seen_by_bench']:,}. "
                  "Cost and savings use the broker's price table on the simulator's token counts."]
    lines += notes_section(report.results)
    if f:
        libs = ", ".join(f"{k} {v}" for k, v in f.get("libraries", {}).items())
        lines += ["", "## Machine", "", markdown_table(["fact", "value"], [
            ["date (UTC)", f.get("date", "?")], ["cores", f.get("cores", "?")], ["CPU", f.get("cpu", "?")],
            ["Python", f.get("python", "?")], ["nats-server", f.get("nats_server", "?")],
            ["Redis-compatible server", f.get("redis_server", "?")],
            ["PostgreSQL / pgvector", f"{f.get('postgres', '?')} / {f.get('pgvector', '?')}"],
            ["embedder", f.get("embedder_model", f.get("embedder", "?"))],
            ["semantic guard", f.get("guard_model", "?")],
            ["libraries", libs], ["stack", o.get("stack", "?")],
            ["load average (1/5/15 min)", f"{f.get('load_average_at_start', '?')} at start, "
                                          f"{f.get('load_average_at_end', '?')} at the end"],
            ["git", f.get("git", "?")]], align=["l", "l"]),
            "", "Everything ran on this one machine over loopback: client, NATS, Redis, Postgres, the "
            "simulator and every service as its own process share its cores."]
    return "\n".join(lines) + "\n"


def _num(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.2f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def plot(report: LlmReport, path: Path) -> bool:
    """Left: hit latency next to its baselines; right: the dev-pair rates. False when nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows: list[tuple[str, Summary, bool]] = []
    by_key = {r.key: r for r in report.results if not r.skipped and r.summary is not None}
    b = report.baselines
    for key, label in (("nats_rt", "bare NATS round trip"), ("framework_floor", "framework floor")):
        if key in b:
            rows.append((label, b[key], False))
    if "llm_exact" in by_key:
        rows.append(("exact hit", by_key["llm_exact"].summary, True))
    if "inproc_exact" in b:
        rows.append(("exact: broker work\nin-process", b["inproc_exact"], False))
    if "llm_semantic" in by_key:
        rows.append(("semantic hit", by_key["llm_semantic"].summary, True))
    if "inproc_semantic" in b:
        rows.append(("semantic: broker work\nin-process", b["inproc_semantic"], False))
    if "embed" in b:
        rows.append(("embed one sentence", b["embed"], False))
    d = report.dev if report.dev and not report.dev.get("skipped") else None
    if not rows and not d:
        return False
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 1.8 + 0.55 * max(len(rows), 4)),
                                  gridspec_kw={"width_ratios": [2.2, 1]})
    colors = {"p50": "#1f77b4", "p95": "#ff7f0e", "p99": "#d62728"}
    if rows:
        values = []
        bar = 0.26
        for i, (label, s, ours) in enumerate(rows):
            for j, p in enumerate(("p50", "p95", "p99")):
                v = getattr(s, p)
                values.append(v)
                ax.barh(i - bar + j * bar, v, height=bar * 0.9, color=colors[p], alpha=1.0 if ours else 0.4,
                        hatch=None if ours else "//", edgecolor=colors[p], label=p if i == 0 else None)
                ax.text(v * 1.04, i - bar + j * bar, fmt_us(v), va="center", fontsize=7)
        ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(min(values) * 0.6, max(values) * 2.5)
        ax.axvline(1000, color="#555", lw=0.8, ls=":")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_us(v)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("latency, one in flight (log) — solid: llm.complete hits; hatched: baselines/parts")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(axis="x", which="both", alpha=0.25)
    else:
        ax.axis("off")
    if d:
        names = ["paraphrase\nhit rate", "false-hit\nrate", "precision"]
        vals = [d["hit_rate"], d["false_hit_rate"], d["precision"]]
        vals = [0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in vals]
        bars = ax2.bar(names, [100 * v for v in vals], color=["#2ca02c", "#d62728", "#1f77b4"])
        for rect, v in zip(bars, vals):
            ax2.text(rect.get_x() + rect.get_width() / 2, max(100 * v, 1) + 1.5, fmt_pct(v, 2 if v < 0.1 else 1),
                     ha="center", fontsize=8)
        ax2.plot([-0.4, 0.4], [40, 40], color="#2ca02c", ls="--", lw=1)
        ax2.text(0, 42, "target ≥ 40 %", ha="center", fontsize=7, color="#2ca02c")
        ax2.plot([0.6, 1.4], [1, 1], color="#d62728", ls="--", lw=1)
        ax2.text(1, max(100 * vals[1], 1) + 7, "target ≤ 1 %", ha="center", fontsize=7, color="#d62728")
        ax2.set_ylim(0, 105)
        ax2.set_ylabel("%")
        ax2.set_title(f"MRPC, {d['pairs']:,} pairs through the broker", fontsize=9)
        ax2.tick_params(axis="x", labelsize=8)
    else:
        ax2.axis("off")
        ax2.text(0.5, 0.5, "dev pairs: skipped", ha="center", va="center", fontsize=9)
    f = report.facts
    fig.suptitle(f"tiermem llm-broker — {f.get('cores', '?')} cores, {f.get('date', '')[:10]}"
                 f"{' (quick)' if report.options.get('quick') else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def console_lines(report: LlmReport) -> list[str]:
    out = []
    for r in report.results:
        if r.skipped:
            out.append(f"  {r.title}: skipped: {r.skipped}")
        elif r.summary is not None:
            s = r.summary
            out.append(f"  {r.title}: p50 {fmt_us(s.p50)} p95 {fmt_us(s.p95)} p99 {fmt_us(s.p99)}"
                       + (f" ({fmt_ratio(r.ratio_p50)} {_versus(r)} p50)" if r.ratio_p50 else ""))
        else:
            out.append(f"  {r.title}")
        for t in r.targets:
            out.append(f"      {'PASS' if t.passed else 'FAIL'}  {t.text} ({t.observed})")
    return out


def _versus(r: Result) -> str:
    return "raw request" if r.key == "llm_client_overhead" else "bare round trip"


def counts_as_failure(r: Result) -> bool:
    """A failed target or a skipped measurement, except the optional dev data being absent."""
    if r.skipped:
        return not (r.key in ("llm_dev", "llm_partition") and r.skipped.startswith(NO_DEV_DATA))
    return any(not t.passed for t in r.targets)
