"""The two tiers of the response cache, and invalidation.

Exact tier, Redis: `llm:x:<key epoch>:<exact key>` -> the entry (msgpack);
Redis's own expiry only collects garbage, freshness is always judged against
the entry's absolute `expires_at` by the caller's clock. The key epoch is the
token `llm:epoch` holds; it is replaced when Redis was wiped or rolled back
(`l2state`), which drops the whole exact tier at once. Semantic tier, Postgres:
`llm.entries`, nearest neighbours inside one partition; `sweep` deletes the
expired rows (nothing else would: a hit never reads them, and no TTL applies).

Per user, Redis keeps `llm:{u}:keys` (every exact key the user's requests
created) and `llm:{u}:inv` (when the user last spoke). Storing an answer that
was computed before the user's latest message is refused, so an in-flight
miss cannot re-insert what an invalidation just removed; for the invalidating
classes, likewise one computed before `llm:distrust_before` (when a broker
last found that change events may have been lost, `policy.stale`). An
entry is stored only under the key epoch in force (PUT checks `llm:epoch`).

Every exact lookup (`lookup`) reads, in one round trip, the entry, the
distrust time, the user's newest message seq, the L2 state and `llm:epoch`:
what `l2state.View` judges and `policy.stale` checks hits against.

What the stores raise when they are down, slow or refuse is `STORE_ERRORS`:
the broker turns it into a miss, or a 503 where nothing else can answer.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import asyncpg
import msgspec
import numpy as np
import structlog
from pgvector.asyncpg import register_vector
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import lastseq, pg
from shared.errors import Unavailable
from shared.lastseq import State

from . import l2state
from .policy import Entry

log = structlog.get_logger()
MIGRATIONS = Path(__file__).with_name("migrations")
GC_GRACE_S = 60
INV_TTL_S = 86400 * 2  # longer than any entry lives
DISTRUST = "llm:distrust_before"
EPOCH = "llm:epoch"  # the exact tier's key epoch (`l2state.KeyEpoch`)
NO_TOKEN = "-"  # read before any key epoch is known: nothing is stored under it
KEY_EPOCH_CHANGED = "not_cached_key_epoch_changed"

# Redis down or refusing; Postgres down, refusing, or past `command_timeout`
# (asyncpg raises TimeoutError, and InterfaceError for a connection it lost).
STORE_ERRORS = (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)



def stores_down(exc: Exception) -> Unavailable:
    """The 503 of an operation only the stores can answer (`llm.verdict`, `llm.stats`, admin)."""
    log.warning("cache_stores_unavailable", error=str(exc) or type(exc).__name__)
    return Unavailable("the LLM cache's stores (Redis, Postgres) are unavailable; retry shortly")


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Entry)

# Store only under the key epoch in force (ARGV[5], the `llm:epoch` value the
# key was made from; -1 otherwise), and if the entry was computed after the user's
# last invalidation (and, for an invalidating class, ARGV[4] = 1, after the last distrust).
# ARGV[6] = 0: an entry of no user (a global request without user_id) is indexed nowhere.
PUT = """
if (redis.call('GET', KEYS[5]) or '') ~= ARGV[5] then return -1 end
local inv = tonumber(redis.call('GET', KEYS[2]) or '0')
if ARGV[4] == '1' then
  local distrust = tonumber(redis.call('GET', KEYS[4]) or '0')
  if distrust > inv then inv = distrust end
end
if tonumber(ARGV[3]) < inv then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ARGV[6] == '1' then redis.call('SADD', KEYS[3], KEYS[1]) end
return 1
"""

# Users spoke: KEYS are their `inv` marks, then their key indexes; set the marks
# to ARGV[1] (expiring after ARGV[2] s) and return the indexes. One script call:
# a pipeline of a command per user costs ~10x more client time.
MARK_SPOKE = """
local n = #KEYS / 2
for i = 1, n do redis.call('SET', KEYS[i], ARGV[1], 'EX', ARGV[2]) end
local indexes = {}
for i = n + 1, #KEYS do indexes[#indexes + 1] = redis.call('SMEMBERS', KEYS[i]) end
return indexes
"""

# Replace the key epoch KEYS[1] if it still is ARGV[1] ('': missing) with ARGV[2],
# and then, if ARGV[3] is not '', move the distrust time KEYS[2] forward to it.
# Returns {1 if replaced, the value in force}.
REPLACE_EPOCH = """
local was = redis.call('GET', KEYS[1]) or ''
if was ~= ARGV[1] then return {0, was} end
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[3] ~= '' then
  local before = tonumber(redis.call('GET', KEYS[2]) or '0')
  if tonumber(ARGV[3]) > before then redis.call('SET', KEYS[2], ARGV[3]) end
end
return {1, ARGV[2]}
"""

# Move the distrust time forward, never back (brokers' clocks differ a little).
DISTRUST_SINCE = """
local was = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > was then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""


def _user_keys(user_id: str) -> tuple[str, str]:
    return f"llm:{{{user_id}}}:inv", f"llm:{{{user_id}}}:keys"


def _int(raw: bytes | None) -> int | None:
    return None if raw is None else int(raw)


def _text(raw: bytes | str | None) -> str:
    return "" if raw is None else raw.decode() if isinstance(raw, bytes) else raw


class Candidate(msgspec.Struct):
    entry: Entry
    similarity: float


class Fence(msgspec.Struct):
    """What a hit of an invalidating class is checked against (`policy.stale`), read with
    the exact lookup: the newest user-message seq of the users read so far, the distrust
    time, and why the user seqs cannot be trusted at all ('': they can; `l2state`)."""

    user_seqs: dict[str, int | None]
    distrust_before: float
    untrusted: str = ""
    distrusted: str = ""  # this lookup replaced the key epoch with a distrust, and why (`l2state`)


class ResponseCache:
    def __init__(self, redis: Redis, pool: asyncpg.Pool, model_id: str) -> None:
        self.redis = redis
        self.pool = pool
        self.model_id = model_id
        self._put = redis.register_script(PUT)
        self._distrust = redis.register_script(DISTRUST_SINCE)
        self._mark_spoke = redis.register_script(MARK_SPOKE)
        self._replace_epoch = redis.register_script(REPLACE_EPOCH)
        self.view = l2state.View()

    @classmethod
    async def open(cls, redis: Redis, dsn: str, model_id: str,
                   command_timeout: float) -> "ResponseCache":
        """Migrate, then a pool whose every statement gives up after `command_timeout`
        seconds: a stuck Postgres costs a request a miss, not its whole deadline."""
        conn = await asyncpg.connect(dsn)
        try:
            await pg.migrate(conn, schema="llm", directory=MIGRATIONS)
        finally:
            await conn.close()
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=10, init=register_vector,
                                         command_timeout=command_timeout)
        return cls(redis, pool, model_id)

    async def close(self) -> None:
        await self.pool.close()

    # --- exact ---------------------------------------------------------------

    def _xkey(self, key: str, token: str | None = None) -> str:
        return f"llm:x:{token or self.view.token or NO_TOKEN}:{key}"

    async def lookup(self, key: str, user_id: str | None,
                     now: float) -> tuple[Entry | None, Fence]:
        """The exact entry and, in the same round trip, the `Fence` its hits (and the semantic
        tier's, for `user_id`: an invalidating class) are checked against.

        Usually one round trip. A second one only when `llm:epoch` changed since the
        last lookup: to replace it (`l2state`: the entry read is of a dropped tier,
        and the distrust moves to `now`), or to read the entry under the new one.
        The state is judged against what was seen when the lookup was sent: a
        concurrent lookup may have seen a newer one since, which proves nothing.
        """
        view = self.view
        used, before = view.token or NO_TOKEN, view.seen
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self._xkey(key, used))
        pipe.get(DISTRUST)
        pipe.get(EPOCH)  # before the state: a key epoch bound to a newer state is never stale
        pipe.hmget(lastseq.STATE, lastseq.STATE_FIELDS)
        pipe.get(lastseq.DUE)
        if user_id is not None:
            pipe.get(lastseq.key(user_id))
        raw, distrust, epoch, state, due, *seq = await pipe.execute()
        parsed = State.parse(state)
        judged = view.judge(parsed, epoch, before)
        untrusted = judged.untrusted or l2state.behind_log(parsed, _int(due))
        distrust_before = float(distrust or 0)
        distrusted = ""
        if judged.replace is not None:
            raw = None  # an entry of the tier being dropped
            since = repr(now) if judged.distrust else ""
            won, epoch = await self._replace_epoch(
                keys=[EPOCH, DISTRUST], args=[_text(epoch), judged.replace.encode(), since])
            view.adopt(epoch)
            if judged.distrust:
                distrust_before = max(distrust_before, now)
            distrusted = judged.cause if won and judged.distrust else ""
        elif judged.token is None:
            raw = None  # a late read (`l2state.View.judge`)
        else:
            if epoch != view.raw:
                view.adopt(epoch)
            if judged.token != used:  # read under another key epoch: read again under this one
                raw = await self.redis.get(self._xkey(key, judged.token))
        fence = Fence({user_id: _int(seq[0])} if seq else {}, distrust_before,
                      untrusted, distrusted)
        return (None if raw is None else _dec.decode(raw)), fence

    async def user_seq(self, user_id: str) -> int | None:
        """The seq of the user's newest own message, as the l2-gateway recorded it."""
        return _int(await self.redis.get(lastseq.key(user_id)))

    # --- semantic ------------------------------------------------------------

    async def nearest(self, partition: str, vector: np.ndarray, now: float,
                      limit: int = 3) -> list[Candidate]:
        rows = await self.pool.fetch(
            "SELECT entry, 1 - (embedding <=> $2) AS similarity FROM llm.entries "
            "WHERE partition = $1 AND expires_at > $3 AND embedding_model = $4 "
            "ORDER BY embedding <=> $2 LIMIT $5",
            partition, vector, now, self.model_id, limit)
        return [Candidate(_dec.decode(r["entry"]), float(r["similarity"])) for r in rows]

    # --- writes --------------------------------------------------------------

    async def put(self, entry: Entry, vector: np.ndarray | None, computed_at: float,
                  invalidating: bool) -> str:
        """Store in both tiers unless the user spoke after `computed_at` (or, for an
        `invalidating` class, change events may have been lost since), or the key
        epoch changed since the lookup (Redis was wiped or rolled back meanwhile).
        Returns the outcome, as logged: `cached`, `not_cached_user_spoke` or
        `not_cached_key_epoch_changed`."""
        if self.view.token is None:
            return KEY_EPOCH_CHANGED  # no key epoch read yet (Redis was down for the lookup)
        inv, index = _user_keys(entry.user_id)
        ttl = int(entry.expires_at - entry.created_at) + GC_GRACE_S
        stored = await self._put(keys=[self._xkey(entry.id), inv, index, DISTRUST, EPOCH],
                                 args=[_enc.encode(entry), ttl, computed_at, int(invalidating),
                                       _text(self.view.raw), int(bool(entry.user_id))])
        if stored == -1:
            return KEY_EPOCH_CHANGED
        if stored and vector is not None:
            await self.pool.execute(
                "INSERT INTO llm.entries (id, partition, user_id, volatility, embedding_model,"
                " embedding, entry, expires_at, namespace) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9) "
                "ON CONFLICT (id) DO UPDATE SET embedding = EXCLUDED.embedding,"
                " entry = EXCLUDED.entry, expires_at = EXCLUDED.expires_at",
                entry.id, entry.partition, entry.user_id, entry.volatility, self.model_id,
                vector, _enc.encode(entry), entry.expires_at, entry.namespace)
        return "cached" if stored else "not_cached_user_spoke"

    async def evict_id(self, entry_id: str) -> bool:
        """Drop one entry from both tiers; True if either held it."""
        in_redis = await self.redis.delete(self._xkey(entry_id))
        in_pg = await self.pool.execute("DELETE FROM llm.entries WHERE id = $1", entry_id)
        return bool(in_redis) or in_pg != "DELETE 0"

    # --- operators (`llm.admin.*`, services/llm_broker/admin.py) -------------

    async def semantic_entry(self, entry_id: str) -> Entry | None:
        """The semantic tier's row of an entry (expired or not), if it has one."""
        raw = await self.pool.fetchval("SELECT entry FROM llm.entries WHERE id = $1", entry_id)
        return None if raw is None else _dec.decode(raw)

    async def flush_partition(self, partition: str) -> int:
        """Drop every entry of one partition, in both tiers (exact keys of every key
        epoch: a dropped epoch's keys are garbage anyway). The exact tier is found
        by SCAN (its keys start with the partition): an operator's tool, not a hot path."""
        in_redis = await self._delete_scanned(f"llm:x:*:{partition}:*")
        in_pg = await self.pool.execute("DELETE FROM llm.entries WHERE partition = $1", partition)
        return max(in_redis, int(in_pg.split()[-1]))

    async def flush_namespace(self, namespace: str) -> int:
        """Drop every entry of one namespace, in both tiers. Exact keys carry no
        namespace, so every exact entry is read (SCAN, in batches) to find them."""
        in_redis = await self._delete_scanned("llm:x:*", lambda e: e.namespace == namespace)
        in_pg = await self.pool.execute("DELETE FROM llm.entries WHERE namespace = $1", namespace)
        return max(in_redis, int(in_pg.split()[-1]))

    async def _delete_scanned(self, pattern: str, keep=None, batch: int = 500) -> int:
        """Delete the keys matching `pattern` (those whose entry `keep` accepts, if given)."""
        deleted = 0
        keys: list = []

        async def drop(keys: list) -> int:
            if keep is not None:
                values = await self.redis.mget(keys)
                keys = [k for k, v in zip(keys, values) if v is not None and keep(_dec.decode(v))]
            return await self.redis.delete(*keys) if keys else 0

        async for key in self.redis.scan_iter(match=pattern, count=batch):
            keys.append(key)
            if len(keys) >= batch:
                deleted += await drop(keys)
                keys = []
        if keys:
            deleted += await drop(keys)
        return deleted

    async def invalidate(self, user_ids: Collection[str], classes: list[str], now: float) -> int:
        """These users spoke: drop their entries of the invalidating classes.

        Four round trips however many users: their `inv` marks (so that an
        answer computed before them is not stored after the drop) and their
        key indexes; one DELETE in Postgres; the indexed entries; the deletes.
        Returns the entries dropped (the larger tier's count). Safe to repeat.
        """
        users = list(user_ids)
        marks = [_user_keys(u) for u in users]
        indexes = await self._mark_spoke(keys=[m[0] for m in marks] + [m[1] for m in marks],
                                         args=[repr(now), INV_TTL_S])
        in_pg = await self.pool.fetchval(
            "WITH gone AS (DELETE FROM llm.entries WHERE user_id = ANY($1) AND volatility = ANY($2)"
            " RETURNING 1) SELECT count(*) FROM gone", users, classes)
        keys = [k for index in indexes for k in index]
        values = dict(zip(keys, await self.redis.mget(keys))) if keys else {}
        pipe = self.redis.pipeline(transaction=False)
        dropped = 0
        for (_, index_key), index in zip(marks, indexes):
            doomed = [k for k in index
                      if values[k] is not None and _dec.decode(values[k]).volatility in classes]
            gone = [k for k in index if values[k] is None]  # expired: prune the index
            if doomed:
                pipe.delete(*doomed)
                dropped += len(doomed)
            if doomed or gone:
                pipe.srem(index_key, *doomed, *gone)
        if len(pipe):
            await pipe.execute()
        return max(dropped, in_pg)

    async def distrust(self, since: float) -> None:
        """Every broker refuses invalidating-class entries created before `since`."""
        await self._distrust(keys=[DISTRUST], args=[repr(since)])

    async def forget(self, user_id: str, now: float) -> int:
        """Drop every entry the user's requests created, in both tiers; an answer in
        flight (computed from the user's text before `now`) is not stored after it."""
        inv, index = _user_keys(user_id)
        await self.redis.set(inv, repr(now), ex=86400 * 2)
        keys = list(await self.redis.smembers(index))
        if keys:
            await self.redis.delete(*keys)
        await self.redis.delete(index)
        deleted = await self.pool.execute("DELETE FROM llm.entries WHERE user_id = $1", user_id)
        return max(len(keys), int(deleted.split()[-1]))

    async def sweep(self, now: float, batch: int) -> int:
        """Delete up to `batch` semantic rows that expired (with `GC_GRACE_S` for clock
        skew between replicas); rows another replica is deleting are skipped."""
        return await self.pool.fetchval(
            "WITH gone AS (DELETE FROM llm.entries WHERE id IN (SELECT id FROM llm.entries"
            " WHERE expires_at < $1 ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
            " RETURNING 1) SELECT count(*) FROM gone", now - GC_GRACE_S, batch)
