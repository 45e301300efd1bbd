"""The raw building blocks, measured bare on the same servers in the same run.

    nats_rt         nats-py request/reply to `bench.echo`, a plain responder in another process
    redis_lrange10  LRANGE key 0 9 on a 10-element list (redis.asyncio + hiredis)
    pg_pk           asyncpg primary-key lookup on a small scratch table (prepared)
    pg_newest500    asyncpg newest 500 rows of one key by index (same table)
    js_publish      JetStream publish to a scratch stream (file storage), acked, with a msg id

`Bare` keeps all of them ready for the whole run, so a measurement can
interleave its baseline with itself (`interleaved`): on a small shared box
the load changes from second to second, and a baseline measured a minute
earlier would flatter or punish the figure it is compared with. Every piece
of scratch data has the run id in its name and is removed at the end, so
pointing the bench at shared servers leaves them as they were.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from shared.bus import BusAuth
from shared.permissions import ADMIN

ECHO_SUBJECT = "bench.echo"
FRAMEWORK_SUBJECT = "bench.framework"

Call = Callable[[int], Awaitable[object]]
Check = Callable[[object], None]

LABELS = {
    "nats_rt": "NATS request/reply to another process (echo)",
    "redis_lrange10": "Redis LRANGE 0 9 (10 items, hiredis)",
    "pg_pk": "Postgres primary-key lookup (asyncpg, prepared)",
    "pg_newest500": "Postgres newest 500 rows by index (asyncpg, prepared)",
    "js_publish": "JetStream publish, acked, one in flight",
    "framework_floor": "shared.service endpoint that does nothing (another process)",
}


# --------------------------------------------------------------------------- timing loops


def _quiet_gc() -> None:
    # The bench holds the whole load plan in memory; frozen objects are not
    # scanned by the collector, so its pauses do not land in anyone's tail.
    gc.collect()
    gc.freeze()


async def sample(call: Call, n: int, warmup: int, check: Check | None = None) -> list[float]:
    """`call(i)` `warmup` times untimed, then `n` times one at a time; durations in seconds.

    `check(result)` runs outside the timed region (decode, tier check).
    """
    for i in range(warmup):
        await call(i)
    _quiet_gc()
    out = []
    clock = time.perf_counter
    for i in range(n):
        t0 = clock()
        result = await call(i)
        out.append(clock() - t0)
        if check is not None:
            check(result)
    return out


async def interleaved(calls: dict[str, tuple[Call, Check | None]], n: int, warmup: int,
                      block: int = 50) -> dict[str, list[float]]:
    """Like `sample` for several calls at once, alternating blocks of `block` of each.

    Each call sees indexes 0..n-1 in order (so its checks can count), and all
    of them share the same minutes of the box's life.
    """
    for call, _ in calls.values():
        for i in range(warmup):
            await call(i)
    _quiet_gc()
    out: dict[str, list[float]] = {k: [] for k in calls}
    clock = time.perf_counter
    for start in range(0, n, block):
        for key, (call, check) in calls.items():
            samples = out[key]
            for i in range(start, min(start + block, n)):
                t0 = clock()
                result = await call(i)
                samples.append(clock() - t0)
                if check is not None:
                    check(result)
    return out


@dataclass
class Concurrent:
    """Result of a bounded-concurrency run."""

    count: int
    errors: int
    elapsed_s: float
    latencies: list[float] = field(default_factory=list)
    first_error: str = ""

    @property
    def rate(self) -> float:
        return (self.count - self.errors) / self.elapsed_s if self.elapsed_s > 0 else 0.0


async def run_concurrent(call: Call, total: int, in_flight: int,
                         progress: Callable[[int], None] | None = None) -> Concurrent:
    """`total` calls with at most `in_flight` at once; an exception counts as an error."""
    result = Concurrent(count=total, errors=0, elapsed_s=0.0)
    next_i = 0
    done = 0
    clock = time.perf_counter

    async def worker() -> None:
        nonlocal next_i, done
        while next_i < total:
            i = next_i
            next_i += 1
            t0 = clock()
            try:
                await call(i)
            except Exception as exc:  # noqa: BLE001 - counted and reported, not fatal
                result.errors += 1
                if not result.first_error:
                    result.first_error = f"{type(exc).__name__}: {exc}"[:300]
            result.latencies.append(clock() - t0)
            done += 1
            if progress is not None and done % 10_000 == 0:
                progress(done)

    _quiet_gc()
    t0 = clock()
    await asyncio.gather(*(worker() for _ in range(min(in_flight, total))))
    result.elapsed_s = clock() - t0
    return result


# --------------------------------------------------------------------------- the building blocks


class Bare:
    """Every bare building block, set up once; `calls` holds the ones that work.

    A block that cannot be set up is left out and its reason kept in
    `problems`, so the measurements that need it say so instead of crashing.
    """

    PG_USERS = 20
    PG_ROWS_PER_USER = 600

    def __init__(self, nc, env: dict[str, str], run: str) -> None:
        self.nc = nc
        self.env = env
        self.identity = auth_env(BusAuth.from_env(env, ADMIN))  # the echo processes' (the stack's admin)
        self.run = run
        self.calls: dict[str, tuple[Call, Check | None]] = {}
        self.problems: dict[str, str] = {}
        self._echo: asyncio.subprocess.Process | None = None
        self._framework: asyncio.subprocess.Process | None = None
        self._redis = None
        self._redis_key = f"bench:{run}:list"
        self._pg = None
        self._schema = f"bench_{run}"
        self._stream = f"BENCH_{run.upper()}"
        self._stream_prefix = f"bench.{run}.log"
        self._js_count = 0

    async def start(self, echo_payload: bytes, list_items: list[bytes]) -> None:
        self.echo_payload = echo_payload
        for key, setup in (("nats_rt", self._start_echo), ("framework_floor", self._start_framework),
                           ("redis_lrange10", lambda: self._start_redis(list_items)),
                           ("pg_pk", self._start_pg), ("js_publish", self._start_js)):
            try:
                await setup()
            except Exception as exc:  # noqa: BLE001 - kept as the reason the block is missing
                self.problems[key] = f"{type(exc).__name__}: {exc}"[:300]
                if key == "pg_pk":
                    self.problems["pg_newest500"] = self.problems[key]

    async def stop(self) -> None:
        """Remove every piece of scratch data and stop the echo process; never raises."""
        for proc in (self._echo, self._framework):
            if proc is not None:
                await stop_child(proc)
        self._echo = self._framework = None
        if self._redis is not None:
            try:
                await self._redis.delete(self._redis_key)
            except Exception:  # noqa: BLE001, S110
                pass
            await self._redis.aclose()
            self._redis = None
        if self._pg is not None:
            try:
                await self._pg.execute(f"DROP SCHEMA IF EXISTS {self._schema} CASCADE")
            except Exception:  # noqa: BLE001, S110
                pass
            await self._pg.close()
            self._pg = None
        if "js_publish" in self.calls and not self.nc.is_closed:
            try:
                await self.nc.jetstream().delete_stream(self._stream)
            except Exception:  # noqa: BLE001, S110
                pass

    # -- NATS echo in another process

    async def _start_echo(self) -> None:
        self._echo = await spawn_echo([self.env["NATS_URL"], ECHO_SUBJECT], self.identity)
        nc, payload = self.nc, self.echo_payload

        async def rt(_i: int):
            return await nc.request(ECHO_SUBJECT, payload, timeout=5)

        self.calls["nats_rt"] = (rt, None)

    async def _start_framework(self) -> None:
        self._framework = await spawn_echo(["--service", self.env["NATS_URL"], FRAMEWORK_SUBJECT],
                                           self.identity)
        nc, payload = self.nc, self.echo_payload

        async def floor(_i: int):
            return await nc.request(FRAMEWORK_SUBJECT, payload, timeout=5)

        def check(msg) -> None:
            if (msg.headers or {}).get("Nats-Service-Error-Code"):
                raise AssertionError(f"framework echo failed: {msg.data[:200]!r}")

        self.calls["framework_floor"] = (floor, check)

    # -- Redis

    async def _start_redis(self, items: list[bytes]) -> None:
        import redis.asyncio as redis

        self._redis = client = redis.from_url(self.env["REDIS_URL"])
        key = self._redis_key
        await client.delete(key)
        await client.rpush(key, *items[:10])

        async def lrange(_i: int):
            return await client.lrange(key, 0, 9)

        def check(result) -> None:
            if len(result) != 10:
                raise AssertionError(f"LRANGE returned {len(result)} items")

        self.calls["redis_lrange10"] = (lrange, check)

    # -- Postgres

    async def _start_pg(self) -> None:
        import asyncpg

        self._pg = conn = await asyncpg.connect(self.env["DATABASE_URL"])
        s = self._schema
        await conn.execute(f"CREATE SCHEMA {s}")
        await conn.execute(
            f"CREATE TABLE {s}.messages (user_id text NOT NULL, seq bigint NOT NULL, msg_id text NOT NULL,"
            f" role text NOT NULL, bot_id text NOT NULL, text text NOT NULL,"
            f" ts timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (user_id, seq))")
        rows = [(f"u{u}", q, f"m{u}-{q}", "user", "bench", f"message {q} of user {u}: " + "x" * 80)
                for u in range(self.PG_USERS) for q in range(1, self.PG_ROWS_PER_USER + 1)]
        await conn.copy_records_to_table("messages", schema_name=s, records=rows,
                                         columns=["user_id", "seq", "msg_id", "role", "bot_id", "text"])
        await conn.execute(f"ANALYZE {s}.messages")
        cols = "seq, msg_id, role, bot_id, text, ts"
        pk = await conn.prepare(f"SELECT {cols} FROM {s}.messages WHERE user_id = $1 AND seq = $2")
        newest = await conn.prepare(
            f"SELECT {cols} FROM {s}.messages WHERE user_id = $1 ORDER BY seq DESC LIMIT 500")
        users, per = self.PG_USERS, self.PG_ROWS_PER_USER

        async def pk_lookup(i: int):
            return await pk.fetchrow(f"u{i % users}", 1 + (i * 7) % per)

        def pk_check(row) -> None:
            if row is None:
                raise AssertionError("primary-key lookup found nothing")

        async def newest500(i: int):
            return await newest.fetch(f"u{i % users}")

        def newest_check(rows) -> None:
            if len(rows) != 500:
                raise AssertionError(f"newest-500 returned {len(rows)} rows")

        self.calls["pg_pk"] = (pk_lookup, pk_check)
        self.calls["pg_newest500"] = (newest500, newest_check)

    # -- JetStream

    async def _start_js(self) -> None:
        from nats.js.api import StorageType, StreamConfig

        js = self.nc.jetstream()
        await js.add_stream(StreamConfig(name=self._stream, subjects=[f"{self._stream_prefix}.*"],
                                         storage=StorageType.FILE, duplicate_window=7200))
        prefix, run = self._stream_prefix, self.run
        body = self.echo_payload

        async def publish(i: int, data: bytes = body):
            self._js_count += 1
            n = self._js_count
            return await js.publish(f"{prefix}.u{n % 1000}", data, headers={"Nats-Msg-Id": f"{run}-{n}"},
                                    timeout=10)

        self.publish = publish
        self.calls["js_publish"] = (publish, None)

    async def js_rate(self, bodies: list[bytes], in_flight: int) -> Concurrent:
        """Acked publishes of `bodies` with `in_flight` at once: the bare write rate."""
        publish = self.publish

        async def call(i: int):
            return await publish(i, bodies[i])

        return await run_concurrent(call, len(bodies), in_flight)


async def spawn_echo(args: list[str], identity: dict[str, str]) -> asyncio.subprocess.Process:
    """`python -m bench.echo *args` connecting as `identity` (`auth_env`); returns once it is subscribed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.echo", *args, stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, env={**os.environ, **identity}, preexec_fn=die_with_parent)
    said = []

    async def wait_ready() -> None:
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError(f"bench.echo {' '.join(args[:1])} exited: {b''.join(said)[-300:]!r}")
            if line.strip() == b"ready":
                return
            said.append(line)

    try:
        await asyncio.wait_for(wait_ready(), 20)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    # Keep draining its output so a chatty child never blocks on a full pipe.
    task = asyncio.get_running_loop().create_task(_drain(proc.stdout))
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return proc


async def stop_child(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after 5 s: a child the bench started is gone when this returns."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


def auth_env(auth: BusAuth) -> dict[str, str]:
    """The environment that makes a process the bench starts (an echo, a sidecar) connect as `auth`:
    it replaces whatever identity the bench's own environment names."""
    return {"NATS_USER": auth.user, "NATS_PASSWORD": auth.password, "NATS_CREDS": auth.creds,
            "NATS_NKEY_SEED": auth.nkey_seed, "NATS_TLS_CA": auth.tls_ca,
            "NATS_TLS_CERT": auth.tls_cert, "NATS_TLS_KEY": auth.tls_key}


_BACKGROUND: set[asyncio.Task] = set()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


def die_with_parent() -> None:
    """`preexec_fn` of the processes the bench starts: the kernel stops them when the bench dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG


def hiredis_in_use() -> bool:
    from redis.utils import HIREDIS_AVAILABLE

    return bool(HIREDIS_AVAILABLE)
