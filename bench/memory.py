"""The memory benchmark: every tier as a client sees it, next to its bare building blocks.

Order of a run (each step reports "skipped: <why>" instead of crashing):

1. the stack: `python -m devstack up` in a temp state folder (every
   service as its own process), or an already running one (`--stack-env`);
2. machine facts and server versions;
3. baselines: bare NATS round trip to another process, bare LRANGE 10, bare
   Postgres primary-key and newest-n lookups, bare JetStream publish;
4. load: `messages` appends across `users` users with `in_flight` requests in
   flight (durable appends/s), then wait until the indexer has caught up;
5. reads, one request in flight: L1 hit (recent n=5), L2 hit (n=50), L3
   (n=500), search (op=search k=5 over everything loaded); every reply's
   `tier` is checked and mismatches counted;
6. append latency with one request in flight, against a bare JetStream publish;
7. auditing overhead: L1 hits from two extra sidecars, served records on and
   off, interleaved (the freshness-auditor runs throughout);
8. the client's own cost: an L1 hit through `tiermem.AsyncClient` against the
   raw request of the same pre-encoded body, interleaved.

tiermem's requests go through `tiermem.AsyncClient` (encode, trace context,
typed reply, errors as exceptions), as an application sends them; the bare
baselines stay raw NATS, Redis, Postgres and JetStream calls. Internal
subjects the client does not offer (`memory.l3.get` while waiting for the
indexer) are raw requests.

Users are named `bench<run>-lead-<i>` so a run against a shared stack never
mixes with anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from bench import baselines, corpus
from bench.stats import Summary, announce, fmt_us, ratio, summarize
from shared import bus, tokens
from shared.bus import BusAuth
from shared.contract import GetReply, decoder
from shared.permissions import ADMIN, MEMORY_L1
from shared.service import ERROR_CODE_HEADER, ERROR_HEADER
from shared.settings import load_stack_env
from tiermem import AsyncClient

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- options and results


@dataclass(frozen=True)
class Options:
    quick: bool = False
    users: int = 1000
    messages: int = 100_000
    long_users: int = 5  # users with `long_len` messages, for recent n=500
    long_len: int = 600
    in_flight: int = 128
    samples: int = 5000  # per latency measurement (L3 and search use fewer)
    heavy_samples: int = 2000
    warmup: int = 300
    index_timeout_s: float = 900.0
    stack_env: Path | None = None  # use a running stack instead of starting one
    keep: bool = False
    seed: int = 42

    @classmethod
    def make(cls, quick: bool, **overrides) -> Options:
        base = (dict(users=100, messages=10_000, long_users=2, samples=1000, heavy_samples=300,
                     warmup=100, index_timeout_s=300.0) if quick else {})
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(quick=quick, **base)


@dataclass
class Target:
    text: str
    passed: bool
    observed: str


@dataclass
class Result:
    """One row of the report: our figure, the baseline it is compared with, the targets."""

    key: str
    title: str
    kind: str = "latency"  # or "throughput"
    summary: Summary | None = None
    baseline_label: str = ""
    baseline: Summary | None = None  # composed baselines add percentiles of their parts
    ratio_p50: float | None = None
    rate: float | None = None  # throughput: per second
    baseline_rate: float | None = None
    targets: list[Target] = field(default_factory=list)
    skipped: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    options: Options
    facts: dict = field(default_factory=dict)
    baselines: dict[str, Summary] = field(default_factory=dict)
    baseline_labels: dict[str, str] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    started: str = ""
    duration_s: float = 0.0


Say = Callable[[str], None]


# --------------------------------------------------------------------------- the stack


SERVICES = ("memory-l1", "l2-gateway", "l3-semantic-indexer")


def _service_modules() -> dict[str, str]:
    from devstack import stack

    return {s.name: s.module for s in stack.SERVICES}


def _module_ready(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return bool(spec and spec.submodule_search_locations and any(
        (Path(p) / "__main__.py").exists() for p in spec.submodule_search_locations))


class Stack:
    """The stack under test: started by us in a temp folder (and stopped), or borrowed."""

    def __init__(self, opts: Options, say: Say) -> None:
        self.opts = opts
        self.say = say
        self.root: Path | None = None
        self.env: dict[str, str] = {}
        self.started_services: list[str] = []
        self.problem = ""  # why some services are not there
        self.keep_logs = False  # set when a step failed: the logs say why

    async def start(self) -> None:
        if self.opts.stack_env:
            self.env = load_stack_env(self.opts.stack_env)
            self.say(f"using the running stack of {self.opts.stack_env}")
            return
        modules = _service_modules()
        ready = [name for name, mod in modules.items() if _module_ready(mod)]
        missing = [name for name in modules if name not in ready]
        if missing:
            self.problem = f"not written yet: {', '.join(missing)}"
            self.say(f"services without __main__.py, not started: {', '.join(missing)}")
        self.root = Path(tempfile.mkdtemp(prefix="tiermem-bench-"))
        problems = [f"not written yet: {', '.join(missing)}"] if missing else []
        while True:
            self.say(f"starting the stack in {self.root} (services: {', '.join(ready) or 'none'})")
            ok, out = await self._up(ready)
            if ok:
                break
            failed = _failed_service(out, ready)
            if failed is None:
                raise RuntimeError(f"could not start the stack:\n{out[-2000:]}")
            problems.append(f"{failed} failed to start: {_last_error(out)}")
            self.say(f"{failed} failed to start ({_last_error(out)}); retrying without it")
            self.keep_logs = True
            ready = [s for s in ready if s != failed]
        self.problem = "; ".join(problems)
        self.started_services = ready
        self.env = load_stack_env(self.root)

    async def _up(self, services: list[str]) -> tuple[bool, str]:
        args = ["--services", ",".join(services)] if services else ["--no-services"]
        env = {**os.environ, "TIERMEM_STATE_DIR": str(self.root), "PYTHONUNBUFFERED": "1"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "devstack", "up", *args, "--timeout", "120",
            cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        lines = []
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            self.say(f"  stack: {line}")
        return await proc.wait() == 0, "\n".join(lines)

    def stop(self) -> None:
        if self.root is None:
            return
        if self.opts.keep:
            self.say(f"stack left running: TIERMEM_STATE_DIR={self.root} python -m devstack down")
            return
        self._down()
        if self.keep_logs and (self.root / "logs").is_dir():
            kept = Path(tempfile.mkdtemp(prefix="tiermem-bench-logs-"))
            shutil.copytree(self.root / "logs", kept, dirs_exist_ok=True)
            self.say(f"something failed: the services' logs are kept in {kept}")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def _down(self) -> None:
        from devstack import stack

        try:
            stack.down(root=self.root)
        except Exception as exc:  # noqa: BLE001 - report and go on cleaning
            self.say(f"stack down failed: {exc}")

    @property
    def logs(self) -> Path | None:
        return self.root / "logs" if self.root else None


@contextlib.asynccontextmanager
async def sidecars(nc, env: dict[str, str], extra: dict[str, dict[str, str]]):
    """Extra memory-l1 processes on the server of `env` (`NATS_URL` and the sidecar's identity),
    one per name of `extra` with those settings on top; yields name -> l1 id once each answers
    `nc` on its own subject."""
    procs, ids = [], {}
    try:
        for name, settings in extra.items():
            l1_id = f"bench-{name}-{os.getpid()}"
            ids[name] = l1_id
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.memory_l1", cwd=REPO_ROOT,
                env={**os.environ, **env, "L1_ID": l1_id, "METRICS_PORT": "0", **settings},
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                preexec_fn=baselines.die_with_parent))
        for proc, l1_id in zip(procs, ids.values()):
            for _ in range(200):
                if proc.returncode is not None:
                    break
                try:
                    await nc.request(f"memory.get.{l1_id}", b'{"user_id": "warm", "n": 1}', timeout=1)
                    break
                except Exception:  # noqa: BLE001 - not subscribed yet
                    await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"sidecar {l1_id} did not come up")
            if proc.returncode is not None:
                raise RuntimeError(f"sidecar {l1_id} exited with code {proc.returncode}")
        yield ids
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            await proc.wait()


def l1_identity(root: Path | None, env: dict[str, str]) -> BusAuth:
    """The memory-l1 role's credentials on the stack in `root` (its `nats-identities.json`),
    else the stack's admin (a stack whose users the bench does not know)."""
    from devstack import stack

    passwords = stack.identities(root) if root else {}
    if MEMORY_L1 in passwords:
        return BusAuth(user=MEMORY_L1, password=passwords[MEMORY_L1])
    return BusAuth.from_env(env, ADMIN)


def _failed_service(out: str, candidates: list[str]) -> str | None:
    """The service `stack up` blamed, if any."""
    for line in reversed(out.splitlines()):
        for name in candidates:
            if f"service {name} " in line:
                return name
    return None


def _last_error(out: str) -> str:
    """The most telling line of a failed `stack up`: the exception from the service's log."""
    lines = out.splitlines()
    for line in reversed(lines):
        text = line.strip()
        head = text.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Exit")) and " " not in head:
            return text[:300]
    for line in reversed(lines):
        if line.startswith(("error:", "up failed:")):
            return line.split(";", 1)[0][:300]
    return (lines or ["no output"])[-1][:300]


# --------------------------------------------------------------------------- client helpers


class ServiceError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code


_get_reply = decoder(GetReply)
_encode = msgspec.json.Encoder().encode


def decode(msg, reply_decoder):
    """The reply decoded with `reply_decoder` (a `shared.contract.decoder`), or the service's error."""
    code = (msg.headers or {}).get(ERROR_CODE_HEADER)
    if code:
        raise ServiceError(int(code), (msg.headers or {}).get(ERROR_HEADER, ""))
    return reply_decoder.decode(msg.data)


async def ping(nc, name: str) -> bool:
    try:
        msg = await nc.request(f"$SRV.PING.{name}", b"", timeout=1)
        return json.loads(msg.data).get("name") == name
    except Exception:  # noqa: BLE001 - not answering is the answer
        return False


class TierCheck:
    """Counts replies whose tier or size is not what the measurement is about."""

    def __init__(self, tier: str, size: int | None) -> None:
        self.tier, self.size = tier, size
        self.wrong_tier: dict[str, int] = {}
        self.wrong_size = 0

    def __call__(self, reply: GetReply) -> None:
        if reply.tier != self.tier:
            self.wrong_tier[reply.tier] = self.wrong_tier.get(reply.tier, 0) + 1
        if self.size is not None and len(reply.messages) != self.size:
            self.wrong_size += 1

    def notes(self, n: int) -> list[str]:
        bad = sum(self.wrong_tier.values())
        out = [f"tier check: {n - bad}/{n} replies from {self.tier}"
               + (f"; others: {self.wrong_tier}" if bad else "")]
        if self.wrong_size:
            out.append(f"{self.wrong_size} replies did not have {self.size} messages")
        return out

    @property
    def mismatches(self) -> int:
        return sum(self.wrong_tier.values())


# --------------------------------------------------------------------------- facts


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_average() -> str:
    """1/5/15-minute load: other work on the box shows up in the tails."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


async def machine_facts(nc, env: dict[str, str]) -> dict:
    facts = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git": _git_commit(),
        "embedder": os.environ.get("EMBEDDER", "wordllama (default)"),
        "libraries": {d: _version(d) for d in (
            "nats-py", "redis", "hiredis", "asyncpg", "uvloop", "msgspec", "wordllama", "numpy")},
        "hiredis_in_use": baselines.hiredis_in_use(),
        "load_average_at_start": load_average(),
    }
    v = nc.connected_server_version
    facts["nats_server"] = f"{v.major}.{v.minor}.{v.patch}"
    with contextlib.suppress(Exception):
        import redis.asyncio as redis

        r = redis.from_url(env["REDIS_URL"])
        try:
            info = await r.info("server")
            name = "valkey" if "valkey_version" in info else "redis"
            facts["redis_server"] = f"{name} {info.get('valkey_version') or info.get('redis_version')}"
        finally:
            await r.aclose()
    with contextlib.suppress(Exception):
        import asyncpg

        conn = await asyncpg.connect(env["DATABASE_URL"])
        try:
            facts["postgres"] = await conn.fetchval("SHOW server_version")
            facts["pgvector"] = (await conn.fetchval(
                "SELECT extversion FROM pg_extension WHERE extname = 'vector'")
                or await conn.fetchval("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'")
                or "not available")
        finally:
            await conn.close()
    return facts


# --------------------------------------------------------------------------- the plan of users and messages


@dataclass
class Plan:
    """Who says what: user ids, their conversations, and the append bodies in send order."""

    run: str
    users: list[str]
    convs: list[list[corpus.Turn]]
    long_users: list[int]  # indexes into users
    appends: list[dict]  # `AsyncClient.append` keywords, in send order
    bodies: list[bytes]  # the same, encoded (the bare JetStream baseline publishes these)
    owner: list[int]  # user index of each body

    @classmethod
    def build(cls, opts: Options, text: corpus.Corpus, run: str) -> Plan:
        n_long = min(opts.long_users, opts.users)
        rest_users = opts.users - n_long
        rest_msgs = max(0, opts.messages - n_long * opts.long_len)
        per, extra = divmod(rest_msgs, rest_users) if rest_users else (0, 0)
        lengths = [opts.long_len] * n_long + [per + (1 if i < extra else 0) for i in range(rest_users)]
        users = [f"bench{run}-lead-{i:05d}" for i in range(opts.users)]
        stride = max(1, len(text.dialogs) // max(1, opts.users))
        convs = [text.conversation(i * stride, n) for i, n in enumerate(lengths)]
        appends, owner = [], []
        # Round-robin by turn: like a fleet where every lead talks a little at a time.
        for t in range(max(lengths, default=0)):
            for u, conv in enumerate(convs):
                if t < len(conv):
                    appends.append({"user_id": users[u], "bot_id": "sales-1", "role": conv[t].role,
                                    "text": conv[t].text, "msg_id": f"{run}-{u}-{t}"})
                    owner.append(u)
        return cls(run, users, convs, list(range(n_long)), appends, [_encode(a) for a in appends], owner)

    @property
    def normal_users(self) -> list[int]:
        return [i for i in range(len(self.users)) if i not in set(self.long_users)]


# --------------------------------------------------------------------------- the run


class Bench:
    def __init__(self, opts: Options, say: Say) -> None:
        self.opts = opts
        self.say = say
        self.report = Report(options=opts)
        self.run_id = secrets.token_hex(3)
        self.nc = None
        self.tm: AsyncClient | None = None  # tiermem's requests, over `nc`
        self.bare: baselines.Bare | None = None
        self.env: dict[str, str] = {}
        self.up: set[str] = set()
        self.stack_problem = ""
        self.logs: Path | None = None
        self.state: Path | None = None  # the stack's state folder (its NATS identities), if known
        self.failed = False
        self.plan: Plan | None = None
        self.last_seq = 0
        self.rng = random.Random(opts.seed)

    # -- helpers

    def add(self, result: Result) -> Result:
        self.report.results.append(result)
        announce(self.say, result)
        return result

    def baseline(self, key: str, samples: list[float], label: str | None = None) -> Summary:
        s = summarize(samples)
        self.report.baselines[key] = s
        self.report.baseline_labels[key] = label or baselines.LABELS[key]
        self.say(f"baseline {self.report.baseline_labels[key]}: "
                 f"p50 {fmt_us(s.p50)}, p95 {fmt_us(s.p95)}, p99 {fmt_us(s.p99)}")
        return s

    def need(self, *services: str) -> str:
        """'' when every service answers, else why not."""
        missing = [s for s in services if s not in self.up]
        if not missing:
            return ""
        return f"{', '.join(missing)} not running" + (f" ({self.stack_problem})" if self.stack_problem else "")

    def _loaded_or(self, *services: str) -> str:
        return self.need(*services) or ("" if self.last_seq else "nothing was loaded")

    def bare_calls(self, *keys: str) -> dict:
        """The bare calls `keys`, or raise naming the one that is missing and why."""
        for k in keys:
            if k not in self.bare.calls:
                raise RuntimeError(f"baseline {k} unavailable: {self.bare.problems.get(k, 'not set up')}")
        return {k: self.bare.calls[k] for k in keys}

    async def step(self, title: str, coro_fn) -> None:
        """Run one step; an exception becomes a skipped row, not a crash."""
        try:
            await coro_fn()
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001
            self.failed = True
            why = f"{type(exc).__name__}: {exc}".strip()[:400]
            self.add(Result(key=title.lower().replace(" ", "_"), title=title, skipped=f"failed: {why}"))

    # -- main

    async def run(self) -> Report:
        t0 = time.monotonic()
        self.report.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        stack = Stack(self.opts, self.say)
        try:
            await stack.start()
            self.stack_problem = stack.problem
            self.logs = stack.logs
            self.env = stack.env
            self.state = stack.root or (self.opts.stack_env.parent if self.opts.stack_env else None)
            # Admin: the bench also calls internal subjects (memory.l2.get, memory.l3.get, $JS.API).
            self.nc = await bus.connect_as(self.env, ADMIN, name="bench", allow_reconnect=False,
                                           max_reconnect_attempts=1, connect_timeout=5,
                                           pending_size=64 * 1024 * 1024)
            self.tm = AsyncClient(self.nc, timeout=15)
            self.up = {s for s in SERVICES if await ping(self.nc, s)}
            self.say(f"services answering: {', '.join(sorted(self.up)) or 'none'}")
            self.report.facts = await machine_facts(self.nc, self.env)
            text = corpus.load(seed=self.opts.seed)
            self.report.facts["corpus"] = text.source
            self.plan = Plan.build(self.opts, text, self.run_id)
            self.bare = baselines.Bare(self.nc, self.env, self.run_id)
            await self.bare.start(_encode({"user_id": self.plan.users[0], "op": "recent", "n": 5}),
                                  self.plan.bodies[:10])
            for key, why in self.bare.problems.items():
                self.say(f"baseline {key} unavailable: {why}")

            await self.step("Baselines", self.measure_baselines)
            await self.step("Durable appends", self.load)
            await self.step("Indexer catch-up", self.wait_for_indexer)
            await self.step("L1 hit", self.l1_hit)
            await self.step("L2 hit", self.l2_hit)
            await self.step("L3 recent", self.l3_recent)
            await self.step("Search", self.search)
            await self.step("Context", self.context)
            await self.step("Append, one in flight", self.append_single)
            await self.step("Auditing overhead", self.audit_overhead)
            await self.step("Client overhead", self.client_overhead)
        finally:
            self.report.facts["load_average_at_end"] = load_average()
            stack.keep_logs |= self.failed or sys.exc_info()[0] is not None
            if self.bare is not None:
                with contextlib.suppress(Exception):
                    await self.bare.stop()
            if self.nc is not None:
                with contextlib.suppress(Exception):
                    await self.nc.close()
            await asyncio.shield(asyncio.to_thread(stack.stop))
            self.report.duration_s = time.monotonic() - t0
        return self.report

    # -- baselines, each on its own (the measurements below interleave theirs)

    async def measure_baselines(self) -> None:
        o = self.opts
        for key, (call, check) in self.bare.calls.items():
            n = o.heavy_samples if key in ("pg_newest500", "js_publish") else o.samples
            self.baseline(key, await baselines.sample(call, n, o.warmup, check))
        if "js_publish" in self.bare.calls:
            n_pub = min(len(self.plan.bodies), 50_000)
            many = await self.bare.js_rate(self.plan.bodies[:n_pub], o.in_flight)
            self.js_rate = many.rate
            self.baseline("js_publish_many", many.latencies,
                          f"JetStream publish, {o.in_flight} in flight ({many.rate:,.0f}/s over {n_pub:,})")
            if many.errors:
                self.say(f"  {many.errors} publish errors: {many.first_error}")

    # -- load

    async def load(self) -> None:
        o, plan = self.opts, self.plan
        result = Result(key="appends", title=f"Durable appends, {o.in_flight} in flight", kind="throughput")
        if why := self.need("l2-gateway"):
            result.skipped = why
            self.add(result)
            return
        max_seq = [0] * len(plan.users)
        dups = 0

        async def append(i: int) -> None:
            nonlocal dups
            reply = await self.tm.append(**plan.appends[i])
            dups += reply.duplicate
            u = plan.owner[i]
            if reply.seq > max_seq[u]:
                max_seq[u] = reply.seq

        self.say(f"loading {len(plan.bodies):,} messages for {len(plan.users):,} users "
                 f"({o.in_flight} in flight; corpus: {self.report.facts.get('corpus')})")
        self.load_started = time.monotonic()
        done = await baselines.run_concurrent(
            append, len(plan.bodies), o.in_flight, progress=lambda n: self.say(f"  {n:,} appended"))
        self.last_seq = max(max_seq, default=0)
        self.last_user = plan.users[max(range(len(max_seq)), key=max_seq.__getitem__)]
        result.summary = summarize(done.latencies)
        result.rate = done.rate
        base = getattr(self, "js_rate", None)
        result.baseline_rate = base
        result.baseline_label = f"bare JetStream publish, {o.in_flight} in flight"
        result.baseline = self.report.baselines.get("js_publish_many")
        result.ratio_p50 = ratio(result.summary.p50, result.baseline.p50) if result.baseline else None
        result.targets.append(Target("≥ 5,000 durable appends/s", done.rate >= 5000, f"{done.rate:,.0f}/s"))
        result.notes.append(f"{done.count:,} appends in {done.elapsed_s:.1f} s, {done.errors} errors, "
                            f"{dups} duplicates"
                            + ("; the indexer consumed the log at the same time"
                               if "l3-semantic-indexer" in self.up else "; no indexer was running"))
        if base:
            result.notes.append(f"{done.rate / base:.2f}× the bare JetStream publish rate ({base:,.0f}/s)")
        if done.errors:
            result.notes.append(f"first error: {done.first_error}")
        self.add(result)

    async def wait_for_indexer(self) -> None:
        result = Result(key="indexer", title="Indexer catch-up", kind="throughput")
        if why := self._loaded_or("l3-semantic-indexer"):
            result.skipped = why
            self.add(result)
            return
        body = _encode({"user_id": self.last_user, "op": "recent", "n": 1, "min_seq": self.last_seq})
        deadline = time.monotonic() + self.opts.index_timeout_s
        next_note = time.monotonic() + 5
        lag_at_end = None
        while True:
            try:
                decode(await self.nc.request("memory.l3.get", body, timeout=10), _get_reply)
                break
            except ServiceError as exc:  # 503 until it has caught up
                if exc.code != 503:
                    raise
            except Exception:  # noqa: BLE001, S110 - a timeout: still busy
                pass
            if lag_at_end is None:
                lag_at_end = await self._pending()
            if time.monotonic() > deadline:
                raise TimeoutError(f"L3 had not indexed seq {self.last_seq} after "
                                   f"{self.opts.index_timeout_s:.0f} s (pending {await self._pending()})")
            if time.monotonic() > next_note:
                if not await ping(self.nc, "l3-semantic-indexer"):
                    self.up.discard("l3-semantic-indexer")
                    self.stack_problem = "it stopped answering $SRV.PING while indexing the load"
                    raise RuntimeError("l3-semantic-indexer stopped answering (crashed?)"
                                       + (f"; see {self.logs}/l3-semantic-indexer.log" if self.logs else ""))
                self.say(f"  waiting for the indexer: {await self._pending()} messages pending")
                next_note = time.monotonic() + 5
            await asyncio.sleep(0.2)
        elapsed = time.monotonic() - self.load_started
        n = len(self.plan.bodies)
        result.rate = n / elapsed
        result.notes.append(f"all {n:,} messages searchable {elapsed:.1f} s after the load started "
                            f"({result.rate:,.0f} messages/s embedded and stored)"
                            + (f"; {lag_at_end} were pending when the load finished" if lag_at_end else ""))
        self.add(result)

    async def _pending(self):
        with contextlib.suppress(Exception):
            info = await self.nc.jetstream().consumer_info("MEMORY", "l3-semantic-indexer")
            return info.num_pending + info.num_ack_pending
        return "?"

    # -- reads: each interleaved with its own baseline

    async def _measure(self, r: Result, users: list[str], n_msgs: int, check, bare: tuple[str, ...], n: int,
                       warmup: int) -> tuple[Summary, dict[str, Summary]]:
        """`recent(user, n_msgs)` for `users` (cycled), interleaved with the bare calls `bare`."""
        async def ours(i: int):
            return await self.tm.recent(users[i % len(users)], n_msgs)

        calls = {"ours": (ours, check), **self.bare_calls(*bare)}
        out = await baselines.interleaved(calls, n, warmup)
        r.summary = summarize(out.pop("ours"))
        parts = {k: summarize(v) for k, v in out.items()}
        r.notes.append("baseline interleaved with the measurement in blocks of 50: "
                       + ", ".join(f"{baselines.LABELS[k]} p50 {fmt_us(s.p50)}" for k, s in parts.items()))
        return r.summary, parts

    def _tier_target(self, r: Result, check: TierCheck, n: int) -> None:
        r.notes.extend(check.notes(n))
        r.targets.append(Target(f"every reply from {check.tier}", check.mismatches == 0,
                                f"{check.mismatches} mismatches"))

    async def l1_hit(self) -> None:
        o = self.opts
        r = Result(key="l1_hit", title="L1 hit: memory.get recent n=5", baseline_label="bare NATS round trip")
        if why := self._loaded_or("memory-l1", "l2-gateway"):
            r.skipped = why
            self.add(r)
            return
        users = [self.plan.users[u] for u in self.plan.normal_users[:200]]
        for _ in range(2):  # read twice: the first may have to fill the sidecar's window
            for user in users:
                await self.tm.recent(user, 5)
        check = TierCheck("l1", 5)
        extra = ("framework_floor",) if "framework_floor" in self.bare.calls else ()
        s, parts = await self._measure(r, users, 5, check, ("nats_rt", *extra), o.samples, o.warmup)
        rt = r.baseline = parts["nats_rt"]
        if extra:
            floor = parts["framework_floor"]
            r.notes.append(f"of the {fmt_us(s.p50 - rt.p50)} L1 adds to a bare round trip at p50, "
                           f"{fmt_us(floor.p50 - rt.p50)} is the service framework with no work inside "
                           f"(its p50 {fmt_us(floor.p50)}, p99 {fmt_us(floor.p99)})")
        r.ratio_p50 = ratio(s.p50, rt.p50)
        r.targets.append(Target("p50 ≤ 1.2× bare NATS round trip", s.p50 <= 1.2 * rt.p50, f"{r.ratio_p50:.2f}×"))
        r.targets.append(Target("p99 ≤ 1 ms", s.p99 <= 1000, fmt_us(s.p99)))
        self._tier_target(r, check, o.samples)
        self.add(r)

    async def audit_overhead(self) -> None:
        """L1 hits from two extra sidecars, one recording what it serves for the
        freshness-auditor and one not, interleaved: what auditing costs a hit."""
        o = self.opts
        r = Result(key="audit_overhead", title="Auditing overhead: L1 hit, served records on vs off",
                   baseline_label="the same sidecar code with SERVED_PUBLISH_RATE=0")
        if why := self._loaded_or("memory-l1", "l2-gateway"):
            r.skipped = why
            self.add(r)
            return
        hot = self.plan.normal_users[:200]
        users = [self.plan.users[u] for u in hot]
        as_l1 = {**self.env, **baselines.auth_env(l1_identity(self.state, self.env))}
        async with sidecars(self.nc, as_l1, {"audit-on": {"SERVED_PUBLISH_RATE": "1.0"},
                                             "audit-off": {"SERVED_PUBLISH_RATE": "0"}}) as ids:
            clients = {name: AsyncClient(self.nc, sidecar=sidecar, timeout=10) for name, sidecar in ids.items()}
            for tm in clients.values():  # fill both sidecars' windows
                for user in users:
                    await tm.recent(user, 5)

            def direct(name: str):
                async def call(i: int):
                    return await clients[name].recent(users[i % len(users)], 5)
                return call

            on, off = TierCheck("l1", 5), TierCheck("l1", 5)
            out = await baselines.interleaved({"on": (direct("audit-on"), on),
                                               "off": (direct("audit-off"), off)},
                                              o.samples, o.warmup)
        r.summary, r.baseline = summarize(out["on"]), summarize(out["off"])
        r.ratio_p50 = ratio(r.summary.p50, r.baseline.p50)
        r.notes.append(f"auditing off p50 {fmt_us(r.baseline.p50)} p95 {fmt_us(r.baseline.p95)} "
                       f"p99 {fmt_us(r.baseline.p99)}; the freshness-auditor ran throughout, "
                       "checking its sample of the records")
        r.targets.append(Target("p50 with auditing within 5 % of auditing off",
                                r.ratio_p50 <= 1.05, f"{r.ratio_p50:.3f}×"))
        self._tier_target(r, on, o.samples)
        self.add(r)

    async def l2_hit(self) -> None:
        o = self.opts
        r = Result(key="l2_hit", title="L2 hit: memory.get recent n=50",
                   baseline_label="2× NATS round trip + LRANGE 10")
        if why := self._loaded_or("memory-l1", "l2-gateway"):
            r.skipped = why
            self.add(r)
            return
        users = [u for u in self.plan.normal_users if len(self.plan.convs[u]) >= 50][:500]
        if not users:
            r.skipped = "no user has 50 messages (raise --messages)"
            self.add(r)
            return
        check = TierCheck("l2", 50)
        s, parts = await self._measure(r, [self.plan.users[u] for u in users], 50, check,
                                       ("nats_rt", "redis_lrange10"), o.samples, o.warmup)
        r.baseline = _compose([(2, parts["nats_rt"]), (1, parts["redis_lrange10"])])
        r.ratio_p50 = ratio(s.p50, r.baseline.p50)
        r.targets.append(Target("p50 ≤ 1.2× (2× round trip + LRANGE)", s.p50 <= 1.2 * r.baseline.p50,
                                f"{r.ratio_p50:.2f}×"))
        self._tier_target(r, check, o.samples)
        r.notes.append("L1 holds 10 messages, so it passes n=50 to L2; the reply carries 50 messages "
                       "while the LRANGE baseline reads 10")
        self.add(r)

    async def l3_recent(self) -> None:
        o = self.opts
        r = Result(key="l3_recent", title="L3: memory.get recent n=500",
                   baseline_label="3× NATS round trip + Postgres newest 500")
        if why := self._loaded_or("memory-l1", "l2-gateway", "l3-semantic-indexer"):
            r.skipped = why
            self.add(r)
            return
        users = [u for u in self.plan.long_users if len(self.plan.convs[u]) >= 500]
        if not users:
            r.skipped = "no user has 500 messages"
            self.add(r)
            return
        check = TierCheck("l3", 500)
        s, parts = await self._measure(r, [self.plan.users[u] for u in users], 500, check,
                                       ("nats_rt", "pg_newest500"), o.heavy_samples, o.warmup // 2)
        r.baseline = _compose([(3, parts["nats_rt"]), (1, parts["pg_newest500"])])
        r.ratio_p50 = ratio(s.p50, r.baseline.p50)
        r.targets.append(Target("p95 < 50 ms (the design's L3 figure)", s.p95 < 50_000, fmt_us(s.p95)))
        self._tier_target(r, check, o.heavy_samples)
        self.add(r)

    async def search(self) -> None:
        o = self.opts
        n_msgs = len(self.plan.bodies)
        r = Result(key="search", title=f"Search: memory.get op=search k=5 ({n_msgs:,} stored)",
                   baseline_label="3× NATS round trip + embed + store.search in-process")
        if why := self._loaded_or("memory-l1", "l2-gateway", "l3-semantic-indexer"):
            r.skipped = why
            self.add(r)
            return
        n = o.heavy_samples
        queries = self._queries(min(2000, n))
        check = TierCheck("l3", None)
        hits = 0

        def check_and_score(reply: GetReply) -> None:
            nonlocal hits
            check(reply)
            target = queries[check_and_score.i % len(queries)][2]
            check_and_score.i += 1
            hits += any(m.text == target for m in reply.messages)

        check_and_score.i = 0  # checks run only on the timed calls, in order
        async with self._inproc_search(queries) as inproc:
            extra = {"inproc": inproc} if inproc else {}
            async def ours(i: int):
                u, q, _ = queries[i % len(queries)]
                return await self.tm.search(self.plan.users[u], q, 5)

            calls = {"ours": (ours, check_and_score), **self.bare_calls("nats_rt"), **extra}
            out = await baselines.interleaved(calls, n, o.warmup // 2)
        s = r.summary = summarize(out["ours"])
        rt = summarize(out["nats_rt"])
        if "inproc" in out:
            part = self.baseline("l3_search_inproc", out["inproc"],
                                 "embed + store.search in this process, no NATS (interleaved with search)")
            r.baseline = _compose([(3, rt), (1, part)])
            r.ratio_p50 = ratio(s.p50, r.baseline.p50)
        else:
            r.baseline_label = "3× NATS round trip (no in-process L3 baseline)"
            r.baseline = _compose([(3, rt)])
            r.ratio_p50 = ratio(s.p50, r.baseline.p50)
        r.targets.append(Target("p95 ≤ 15 ms including embedding", s.p95 <= 15_000, fmt_us(s.p95)))
        self._tier_target(r, check, n)
        per_user = sum(len(self.plan.convs[u]) for u, _, _ in queries) / len(queries)
        r.notes.append(f"quality: the reworded message was in the top 5 of the user's ~{per_user:.0f} messages "
                       f"for {hits}/{n} queries ({100 * hits / n:.0f} %); e.g. {queries[0][1]!r} "
                       f"for {queries[0][2]!r}")
        self.add(r)

    async def context(self) -> None:
        """memory.get op=context on one user with a long history (10,000 messages; quick 2,000)."""
        o = self.opts
        size = 2000 if o.quick else 10_000
        r = Result(key="context", title=f"Context: memory.get op=context, budget 2,000 ({size:,}-message user)",
                   baseline_label="3× NATS round trip + embed + store.search in-process")
        if why := self._loaded_or("memory-l1", "l2-gateway", "l3-semantic-indexer"):
            r.skipped = why
            self.add(r)
            return
        user = f"bench{self.run_id}-context"
        conv = self.plan.convs[self.plan.long_users[0] if self.plan.long_users else 0]
        texts = [conv[i % len(conv)].text for i in range(size)]
        seqs = [0] * size

        async def append(i: int) -> None:
            seqs[i] = (await self.tm.append(user, "sales-1", "user" if i % 2 == 0 else "assistant", texts[i],
                                            msg_id=f"ctx-{i}")).seq

        self.say(f"context: appending {size:,} messages for one user")
        await baselines.run_concurrent(append, size, o.in_flight)
        # L3 must hold them all before the reads mean anything.
        last = max(seqs)
        deadline = time.monotonic() + o.index_timeout_s
        while True:
            msg = await self.nc.request("memory.l3.get", _encode({"user_id": user, "n": 1, "min_seq": last}),
                                        timeout=15)
            if not (msg.headers or {}).get("Nats-Service-Error-Code"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"L3 did not index the context user up to seq {last}")
        summaries_on = await self._context_summary(user, sorted(seqs))
        queries = [q for _, q, _ in self._queries(200)]
        sizes: list[int] = []

        def check(reply) -> None:
            if reply.tokens > 2000 or reply.missing:
                raise AssertionError(f"bad context reply: {reply.tokens} tokens, missing {reply.missing}")
            sizes.append(reply.tokens)

        async with self._inproc_search([(0, q, "") for q in queries]) as inproc:
            extra = {"inproc": inproc} if inproc else {}

            async def ours(i: int):
                return await self.tm.context(user, 2000, query=queries[i % len(queries)], n=50, k=5)

            out = await baselines.interleaved({"ours": (ours, check), **self.bare_calls("nats_rt"), **extra},
                                              o.heavy_samples, o.warmup // 2)
        s = r.summary = summarize(out["ours"])
        parts = [(3, summarize(out["nats_rt"]))]
        if "inproc" in out:
            parts.append((1, summarize(out["inproc"])))
        else:
            r.baseline_label = "3× NATS round trip (no in-process L3 baseline)"
        r.baseline = _compose(parts)
        r.ratio_p50 = ratio(s.p50, r.baseline.p50)
        r.targets.append(Target("p95 ≤ 15 ms (the search target: a context is a window read + a search)",
                                s.p95 <= 15_000, fmt_us(s.p95)))
        r.notes.append(f"the window (n=50) from L1/L2, then L3's parts through the l2-gateway: the newest summary "
                       f"and a search (k=5) below the window; {len(sizes):,} replies, all within the budget "
                       f"(tokens p50 {sorted(sizes)[len(sizes) // 2] if sizes else 0:,})")
        r.notes.append(summaries_on)
        self.add(r)

    async def _context_summary(self, user: str, seqs: list[int]) -> str:
        """A summary for the context user, so reads carry one: the summarizer's own when it
        runs, else a row put in its place (the bench turns it off, see bench/__main__.py)."""
        dsn = self.env.get("DATABASE_URL")
        if not dsn:
            return "no DATABASE_URL: the reads carry no summary"
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            text = " ".join(f"The lead mentioned item {i}." for i in range(60))  # ~1.5k bytes, ~500 tokens
            await conn.fetchval("SELECT l3.put_summary($1, $2, $3, $4, $5)", user, seqs[0], seqs[-60],
                                text, tokens.estimate(text))
        finally:
            await conn.close()
        return ("the background summarizer is off in this bench (its LLM calls would upset the llm bench's "
                "call accounting); one summary row of ~500 tokens stands in for it, so each read fetches one")

    @contextlib.asynccontextmanager
    async def _inproc_search(self, queries):
        """embed + store.search in this process (what L3 itself does), or None if unavailable."""
        try:
            from services.l3_semantic_indexer import store
            from shared.embeddings import embedder_from_settings
            from shared.settings import Settings

            settings = Settings.from_env({**os.environ, **self.env})
            embedder = embedder_from_settings(settings)
            pool = await store.create_pool(self.env["DATABASE_URL"], model_id=embedder.model_id,
                                           dim=embedder.dim, min_size=1, max_size=1)
        except Exception as exc:  # noqa: BLE001 - the measurement goes on without it
            self.say(f"no in-process search baseline: {type(exc).__name__}: {exc}")
            yield None
            return
        users = self.plan.users

        async def call(i: int):
            u, q, _ = queries[i % len(queries)]
            vec = (await embedder.embed([q], input_type="query"))[0]
            return await store.search(pool, users[u], q, vec, 5, embedder.model_id)

        try:
            yield (call, None)
        finally:
            await pool.close()
            with contextlib.suppress(Exception):
                await embedder.aclose()

    def _queries(self, count: int) -> list[tuple[int, str, str]]:
        """(user index, paraphrased query, the text it should find)."""
        out = []
        users = self.plan.normal_users or list(range(len(self.plan.users)))
        for i in range(count):
            u = users[(i * 7919) % len(users)]
            conv = self.plan.convs[u]
            targets = list(corpus.good_query_targets(conv)) or list(range(len(conv)))
            t = conv[self.rng.choice(targets)].text
            out.append((u, corpus.paraphrase(t, self.rng), t))
        return out

    async def append_single(self) -> None:
        o = self.opts
        r = Result(key="append_one", title="Append, one in flight: memory.append",
                   baseline_label="bare JetStream publish, one in flight")
        if why := self.need("l2-gateway"):
            r.skipped = why
            self.add(r)
            return
        user = f"bench{self.run_id}-single"
        n = max(300, o.heavy_samples // 2)
        sent = 0

        async def ours(_i: int):
            nonlocal sent
            sent += 1
            return await self.tm.append(user, "sales-1", "user", f"single append number {sent}",
                                        msg_id=f"{self.run_id}-single-{sent}")

        out = await baselines.interleaved({"ours": (ours, None), **self.bare_calls("js_publish")},
                                          n, o.warmup // 2)
        s = r.summary = summarize(out["ours"])
        r.baseline = summarize(out["js_publish"])
        r.ratio_p50 = ratio(s.p50, r.baseline.p50)
        r.notes.append("memory.append replies after the stream's ack and (bounded) after L2 applied it, "
                       "so the next read hits L2; baseline interleaved in blocks of 50")
        self.add(r)


    async def client_overhead(self) -> None:
        """What `tiermem.AsyncClient` adds to a request: an L1 hit through it against the raw
        request of the same pre-encoded body on the same connection, interleaved. Its own
        row, so the rows above (all through the client) do not hide it in their ratios."""
        o = self.opts
        r = Result(key="client_overhead", title="Client overhead: L1 hit through tiermem.AsyncClient",
                   baseline_label="raw NATS request of the same memory.get (pre-encoded, reply not decoded)")
        if why := self._loaded_or("memory-l1", "l2-gateway"):
            r.skipped = why
            self.add(r)
            return
        users = [self.plan.users[u] for u in self.plan.normal_users[:200]]
        bodies = [_encode({"user_id": u, "op": "recent", "n": 5}) for u in users]

        async def raw(i: int):
            return await self.nc.request("memory.get", bodies[i % len(bodies)], timeout=10)

        async def client(i: int):
            return await self.tm.recent(users[i % len(users)], 5)

        check = TierCheck("l1", 5)
        out = await baselines.interleaved({"client": (client, check), "raw": (raw, None)}, o.samples, o.warmup)
        r.summary, r.baseline = summarize(out["client"]), summarize(out["raw"])
        r.ratio_p50 = ratio(r.summary.p50, r.baseline.p50)
        r.notes.append(f"the client adds {fmt_us(r.summary.p50 - r.baseline.p50)} at p50 (encode the body, "
                       f"inject the trace context, decode the typed reply); raw p95 {fmt_us(r.baseline.p95)}")
        self._tier_target(r, check, o.samples)
        self.add(r)


def _compose(parts: list[tuple[int, Summary]]) -> Summary:
    """A baseline made of sequential steps: percentiles added (an upper bound for p95/p99)."""
    def total(attr: str) -> float:
        return sum(k * getattr(s, attr) for k, s in parts)

    return Summary(n=min(s.n for _, s in parts), p50=total("p50"), p95=total("p95"), p99=total("p99"),
                   mean=total("mean"), min=total("min"), max=total("max"))
