"""The L2 tier's data in Redis: the newest messages of every user.

Per user and epoch (keys hash-tagged by user so Redis Cluster keeps them in one
slot): `tm:{u}:<epoch>:m` a sorted set of encoded messages scored by seq,
trimmed to the window; `tm:{u}:<epoch>:h` a hash with `last` (newest seq
applied), `count` (messages applied), `bytes` (their size as the log stores
them: what the per-user quota counts), `floor` (everything at or below it was
forgotten) and `partial` (the window was started by a message that may not be
the user's first: see below). Both expire after `L2_IDLE_TTL_S` without an
append or a read.
`shared.lastseq.key(u)`: the seq of the user's newest own message (role
"user"), set by the same script, for the llm-broker's invalidation check (it
outlives epochs: a replay from the log sets it again). It only ever goes up:
an append whose apply is late (the append's bounded wait for the applier ran
out) sets it itself before replying (`note_user_seq`), so an acknowledged
message of the user is known to the broker even before it is in the window.

Global, in one slot (`{g}`): `tm:{g}:state`, the current epoch and the log
position up to which *every* message of the stream has been applied in it
(what lets L2 prove read-your-writes, `min_seq`), and `tm:{g}:lock`, held by
the gateway that replays the log into a new epoch (`fence` says why).

Writes only come from the appliers, in stream order, through `APPLY`, whose
guard (seq above `last` and `floor`) makes replays and several appliers
harmless, and `ADVANCE`, which moves the position only in the epoch the
applier works in and only forwards: it refuses when the state is gone or of
another epoch, and deletes a state that went back behind what the applier saw
(a rollback), so that nobody trusts it. On one Redis a batch's APPLYs and its
ADVANCE go in one pipeline (one connection runs them in order); on a Redis
Cluster the ADVANCE is sent once every APPLY answered (the nodes of a cluster
pipeline run in parallel, and the position must never pass a window write).

Redis Cluster: every script touches the keys of one hash tag only (one
user's `{u}`, or the global `{g}`), so none is refused as CROSSSLOT. A read
(`read`) is one round trip: a pipeline of the state (`HMGET`, slot `{g}`) and
`READ`, the user's window alone (slot `{u}`). The state is no longer read in
the same script as the window, so the two are judged as follows:

- the epoch: the window keys are named by the epoch the caller passes (the
  one this process knows); the state read beside them says whether that
  epoch is still current (else the read is done again with the newer epoch's
  keys, or passes down while Redis is lost, replayed or rolled back: `fence`).
  An epoch change between the two reads cannot make the window wrong: the old
  epoch's keys keep what was applied to them until swept (a swept window reads
  as not held), and a forget that started before the new epoch drops both.
- the position that proves completeness (`applied`, for `min_seq`): only a
  position observed *before* the window was read proves anything about it (the
  applier advances only after the batch's windows are written). On one Redis
  the pipeline runs the state first on one connection, so the state just read
  proves it (a restart or failover in between would break the connection). On
  a cluster the two run in parallel on two nodes, so the snapshot uses the
  position this process had observed when it sent the read (`Fence.seen`,
  refreshed by every read and every batch its applier advances; the state just
  read is at least as new, or the fence calls it a rollback): at most one
  read or one batch behind, which only sends more `min_seq` reads down to L3.
- what it does not prove on a cluster: a failover of the *user's* master to a
  lagging replica rolls that user's window back without touching `{g}`, which
  no read of the state can see (on one Redis, the state goes back with it and
  the fence notices). Clusters should use `WAIT`-acknowledged replicas or
  accept that window; the local cluster (devstack) has no replicas.

Before the cluster split, `READ` read the state and the window in one script
(one atomic snapshot); the pipeline keeps the round trip count and the reply
size, and adds one command and redis-py's pipeline machinery: the read's p50
went from ~220 us to ~270 us on one Redis (1.20-1.25x, docs/capacity.md).

Idle users: a user without keys is not known to L2, whatever the reason (never
seen, expired, Redis lost), so a read of such a user is a miss, never "no
messages". An append for a user without keys starts a window marked `partial`
(it holds everything from that message on, not necessarily before), except
while the log is replayed into a new epoch from its first message; the
applier then rebuilds the window from the log (`REBUILD` clears the mark).

Scripts are called by SHA (`EVALSHA`), alone or in pipelines: redis-py's
registered scripts send `SCRIPT EXISTS` before every pipeline, a second round
trip on every read and every applied batch. Here a script is loaded only when
Redis answers NOSCRIPT (after a restart or `SCRIPT FLUSH`), and the call re-run.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from hashlib import sha1

import msgspec
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from shared import lastseq
from shared.contract import Message
from shared.lastseq import STATE, STATE_FIELDS as _STATE_FIELDS

from .fence import LOST, Fence, Seen, State

LOCK = "tm:{g}:lock"

# KEYS: the user's window (m, h) in the epoch, the user's last own-message seq (shared.lastseq).
# ARGV: seq, message, window, stored bytes, idle ttl (ms), fresh (1: a replay from seq 1), role.
# Returns {applied, previous last, count, started a partial window, the user's bytes}; bytes
# -1 while the window is partial (its count starts at its first message, not the user's).
APPLY = """
local h = redis.call('HMGET', KEYS[2], 'last', 'floor', 'count', 'bytes', 'partial')
local last = tonumber(h[1] or '0')
local floor = tonumber(h[2] or '0')
local seq = tonumber(ARGV[1])
if seq <= last or seq <= floor then
  local size = -1
  if h[1] and not h[5] then size = tonumber(h[4] or '0') end
  return {0, last, tonumber(h[3] or '0'), 0, size}
end
local partial = 0
if (not h[1]) and ARGV[6] == '0' then partial = 1 end
redis.call('ZADD', KEYS[1], seq, ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[3]) + 1))
local count = redis.call('HINCRBY', KEYS[2], 'count', 1)
local size = redis.call('HINCRBY', KEYS[2], 'bytes', tonumber(ARGV[4]))
redis.call('HSET', KEYS[2], 'last', seq)
if partial == 1 then redis.call('HSET', KEYS[2], 'partial', 1) end
if partial == 1 or h[5] then size = -1 end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
if ARGV[7] == 'user' then
  if seq > tonumber(redis.call('GET', KEYS[3]) or '0') then redis.call('SET', KEYS[3], seq) end
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
return {1, last, count, partial, size}
"""

# Raise a seq key, never lower it: KEYS[1], ARGV seq, ttl (ms). The user's newest
# own-message seq (`shared.lastseq.key(u)`: an append whose apply is late writes it
# before APPLY does), and the log position known long enough (`shared.lastseq.DUE`).
RAISE = """
if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# Move the epoch's position forward. ARGV: epoch, upto, the highest position the
# caller saw, lock token, lock ttl (ms). Returns {code, applied}: 0 done, 1 no
# state (lost), 2 another epoch, 3 rolled back (the state is deleted: trusted by none).
# A replay's leader renews its lock here, and ends the replay once it reached its target.
ADVANCE = """
local s = redis.call('HMGET', KEYS[1], 'epoch', 'applied', 'rebuilding')
if not s[1] then return {1, 0} end
if s[1] ~= ARGV[1] then return {2, 0} end
local applied = tonumber(s[2])
if applied < tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
  return {3, applied}
end
if tonumber(ARGV[2]) > applied then
  applied = tonumber(ARGV[2])
  redis.call('HSET', KEYS[1], 'applied', applied)
end
if s[3] then
  local mine = redis.call('GET', KEYS[2]) == ARGV[4]
  if applied >= tonumber(s[3]) then
    redis.call('HDEL', KEYS[1], 'rebuilding')
    if mine then redis.call('DEL', KEYS[2]) end
  elseif mine then
    redis.call('PEXPIRE', KEYS[2], ARGV[5])
  end
end
return {0, applied}
"""

# A new epoch replaces whatever state there is: applied 0, replaying up to ARGV[3].
NEW_EPOCH = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'gen', ARGV[2], 'applied', 0)
if tonumber(ARGV[3]) > 0 then redis.call('HSET', KEYS[1], 'rebuilding', ARGV[3]) end
return 1
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# The user's window in the epoch the caller knows (KEYS: m, h; one slot). ARGV: n,
# idle ttl (ms). Returns {-1}: Redis holds no window for this user (never seen, idle
# and expired, lost, or of an epoch swept since); else {last, count, floor, partial, messages}.
READ = """
local h = redis.call('HMGET', KEYS[2], 'last', 'count', 'floor', 'partial')
if not h[1] then return {-1} end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local msgs = redis.call('ZRANGE', KEYS[1], -tonumber(ARGV[1]), -1)
return {h[1], h[2] or '0', h[3] or '0', h[4] or '0', msgs}
"""

# Idempotent (a forget job may run again after new appends): a floor at or past
# `upto` means this forget is in already, and what was applied since must stay.
FORGET = """
local floor = tonumber(redis.call('HGET', KEYS[2], 'floor') or '0')
if floor >= tonumber(ARGV[1]) then return floor end
floor = tonumber(ARGV[1])
redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'floor', floor, 'last', 0, 'count', 0, 'bytes', 0)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return floor
"""

# Replace one user's window with what the log holds (the auditor found it stale,
# or the window was started partial). Refused (0) if a newer message was applied
# meanwhile, or the user was forgotten after the log was read: the read is older.
REBUILD = """
local h = redis.call('HMGET', KEYS[2], 'last', 'floor')
local newest = tonumber(ARGV[1])
if tonumber(h[1] or '0') > newest then return 0 end
if newest > 0 and newest <= tonumber(h[2] or '0') then return 0 end
redis.call('DEL', KEYS[1])
for i = 6, #ARGV, 2 do redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[3]) + 1))
redis.call('HSET', KEYS[2], 'last', ARGV[1], 'count', ARGV[2], 'bytes', ARGV[4])
redis.call('HDEL', KEYS[2], 'partial')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
"""

_encode = msgspec.json.Encoder().encode
DUE_TTL_MS = 60_000  # gateways refresh it while appends come in; gone, it proves nothing

KNOWN_USERS = 100_000  # users whose bytes `known_bytes` remembers (~10 MB at most)

# ADVANCE's codes
ADVANCED, NO_STATE, OTHER_EPOCH, WENT_BACK = 0, 1, 2, 3


def keys(user_id: str, epoch: str) -> list[str]:
    return [f"tm:{{{user_id}}}:{epoch}:m", f"tm:{{{user_id}}}:{epoch}:h"]


class Snapshot(msgspec.Struct):
    """One user's window as read in one step, between two reads of the state."""

    applied: int  # every log message <= applied is in Redis
    last: int
    count: int
    floor: int
    partial: bool  # the window may lack the user's messages before its oldest one
    # Each message's JSON as the applier stored it (an encoded `Message`),
    # oldest first: replies splice it in rather than decode and re-encode.
    messages: list[msgspec.Raw]

    def complete_through(self) -> int:
        """The highest seq up to which this window is known to hold all of the user's messages."""
        return max(self.applied, self.floor)


class _Script:
    """A Lua script called by its SHA1 (`EVALSHA`)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = sha1(source.encode()).hexdigest()

    def queue(self, pipe: Pipeline, keys: list[str], *args) -> None:
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


class RedisWindow:
    def __init__(self, redis: Redis, window: int, idle_ttl_s: float, fence: Fence,
                 lock_ttl_s: float = 10.0) -> None:
        self.redis = redis
        # One Redis runs a pipeline in order on one connection; a cluster's nodes run
        # their parts in parallel (see the module's docstring for what that changes).
        self.ordered = not isinstance(redis, RedisCluster)
        self.window = window
        self.fence = fence
        self.ttl_ms = max(1, int(idle_ttl_s * 1000))
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self._apply = _Script(APPLY)
        self._advance = _Script(ADVANCE)
        self._new_epoch = _Script(NEW_EPOCH)
        self._release = _Script(RELEASE)
        self._read = _Script(READ)
        self._forget = _Script(FORGET)
        self._rebuild = _Script(REBUILD)
        self._raise = _Script(RAISE)
        # Each user's `bytes` as this process's own script calls last left them (see
        # `known_bytes`), oldest first; bounded by KNOWN_USERS.
        self._bytes: dict[str, int] = {}
        self._scripts = (self._apply, self._advance, self._new_epoch, self._release, self._read,
                         self._forget, self._rebuild, self._raise)

    async def load_scripts(self) -> None:
        """Load every script, APPLY before ADVANCE: a pipeline that finds ADVANCE loaded
        (by this or another gateway) finds APPLY too, so a batch is never advanced over
        without being applied. Done before the first use: gateways starting together
        would otherwise re-run batches that were half applied while another one loaded
        the scripts, and lose which windows they started."""
        for script in self._scripts:
            await self.redis.script_load(script.source)

    async def _run(self, build: Callable[[Pipeline], None]) -> list:
        """Run the commands `build` queues, in one round trip; load the scripts if Redis lost them.

        A re-run is safe: reads change nothing, and applying is guarded by seq.
        """
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            build(pipe)
            try:
                return await pipe.execute()
            except NoScriptError:
                if attempt:
                    raise
                await self.load_scripts()
        raise AssertionError("unreachable")

    async def _call(self, script: _Script, keys: list[str], *args):
        """One script call on its own (no pipeline: cheaper), loading it if Redis lost it."""
        try:
            return await self.redis.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.redis.script_load(script.source)
            return await self.redis.evalsha(script.sha, len(keys), *keys, *args)

    # --- the epoch ------------------------------------------------------------

    async def state(self) -> State | None:
        return State.parse(await self.redis.hmget(STATE, _STATE_FIELDS))

    async def take_lock(self, token: str) -> bool:
        return bool(await self.redis.set(LOCK, token, nx=True, px=self.lock_ttl_ms))

    async def release_lock(self, token: str) -> None:
        await self._call(self._release, [LOCK], token)

    async def new_epoch(self, gen: int, replay_to: int) -> State:
        """Replace the state with a new, empty epoch (the caller holds the lock and replays
        the log into it up to `replay_to`)."""
        epoch = f"{gen}-{uuid.uuid4().hex[:8]}"
        self._bytes.clear()
        await self._call(self._new_epoch, [STATE], epoch, gen, replay_to)
        return State(epoch, gen, 0, replay_to)

    async def apply_batch(self, items: list[tuple[str, Message, int]], upto_seq: int,
                          at: Seen, token: str, fresh: bool) -> tuple[list, int, int]:
        """Apply messages `(user_id, message, stored bytes)`, in stream order, in the
        epoch `at` (the one the applier joined, and the highest position it saw there),
        and advance its position to `upto_seq` (the batch's last seq, which may be a
        message that was dead-lettered rather than applied).

        Returns one `(applied, prev_seq, count, partial)` per item, ADVANCE's code
        and the position. `fresh`: the epoch is being replayed from the log's
        first message, so a user without keys is new, not expired.
        """
        epoch, seen = at.epoch, at.applied
        fresh_arg = 1 if fresh else 0

        def build_applies(pipe: Pipeline) -> None:
            for user_id, msg, size in items:
                self._apply.queue(pipe, [*keys(user_id, epoch), lastseq.key(user_id)], msg.seq,
                                  _encode(msg), self.window, size, self.ttl_ms, fresh_arg, msg.role)

        advance = ([STATE, LOCK], epoch, upto_seq, seen, token, self.lock_ttl_ms)
        if self.ordered:
            def build(pipe: Pipeline) -> None:
                build_applies(pipe)
                self._advance.queue(pipe, *advance)

            results = await self._run(build)
        else:  # the position may only move once every window write answered
            results = [*(await self._run(build_applies) if items else []),
                       await self._call(self._advance, *advance)]
        code, applied = results[-1]
        applies = results[:-1]
        if code == ADVANCED:
            for (user_id, _, _), res in zip(items, applies):
                self._know(user_id, int(res[4]))
        else:  # the writes went to a dead epoch
            self._bytes.clear()
        return applies, int(code), int(applied)

    async def note_user_seq(self, user_id: str, seq: int) -> bool:
        """Record that the user's own message `seq` is acknowledged, ahead of the applier
        (never lowering what is there); True if it raised the record."""
        return bool(await self._call(self._raise, [lastseq.key(user_id)], seq, self.ttl_ms))

    async def note_due(self, seq: int) -> None:
        """Record that the log has held `seq` for half the grace (`shared.lastseq.DUE`)."""
        await self._call(self._raise, [lastseq.DUE], seq, DUE_TTL_MS)

    # --- reads ------------------------------------------------------------------

    async def read(self, user_id: str, n: int) -> Snapshot | str:
        """The user's newest `n` messages and what proves them complete, as one snapshot,
        or why Redis cannot answer for this user (a reason to pass the read down).

        One round trip: the state and `READ` of the window of the epoch this process
        knows (module docstring: why that proves what the atomic script proved). A
        state of a newer epoch is read again with that epoch's keys.
        """
        for _ in range(2):
            seen = self.fence.seen
            if seen.epoch is None:  # this process has not seen a state yet
                why = self.fence.judge(await self.state(), seen)
                if why:
                    return why
                seen = self.fence.seen
            epoch = seen.epoch

            def build(pipe: Pipeline) -> None:
                pipe.hmget(STATE, _STATE_FIELDS)
                self._read.queue(pipe, keys(user_id, epoch), n, self.ttl_ms)

            raw_state, reply = await self._run(build)
            state = State.parse(raw_state)
            why = self.fence.judge(state, seen)
            if why:
                return why
            if state.epoch != epoch:
                continue  # a newer epoch than the keys read: read its keys
            if len(reply) == 1:
                return "not_held"
            last, count, floor, partial, raw = reply
            applied = state.applied if self.ordered else seen.applied
            return Snapshot(applied, int(last), int(count), int(floor), partial == b"1",
                            [msgspec.Raw(m) for m in raw])
        return LOST

    def known_bytes(self, user_id: str) -> int | None:
        """The user's `bytes` as this process's applier last wrote or found them in Redis
        (None: not known, or the window is partial). Every applier applies the whole log,
        so this lags Redis only by what other gateways applied ahead of this one, and
        after their forgets and repairs (which leave it too high until the user's next
        message is applied here). The quota uses it only far below the limit."""
        return self._bytes.get(user_id)

    def _know(self, user_id: str, size: int) -> None:
        known = self._bytes
        known.pop(user_id, None)
        if size >= 0:
            known[user_id] = size
            if len(known) > KNOWN_USERS:
                del known[next(iter(known))]

    async def stored_bytes(self, user_ids: list[str]) -> list[int]:
        """Each user's bytes in the log as applied so far (0 for a user Redis does not know)."""
        epoch = self.fence.epoch
        if epoch is None:
            return [0] * len(user_ids)
        pipe = self.redis.pipeline(transaction=False)
        for user_id in user_ids:
            pipe.hget(keys(user_id, epoch)[1], "bytes")
        return [int(v or 0) for v in await pipe.execute()]

    # --- repairs, forget, clean-up ---------------------------------------------

    async def rebuild(self, epoch: str, user_id: str, messages: list[Message], count: int,
                      size: int) -> bool:
        """Make the user's window in `epoch` the newest `messages` of the log (`count` in all,
        `size` bytes)."""
        last = messages[-1].seq if messages else 0
        pairs = [part for m in messages[-self.window:] for part in (m.seq, _encode(m))]
        done = bool(await self._call(self._rebuild, keys(user_id, epoch), last, count,
                                     self.window, size, self.ttl_ms, *pairs))
        self._know(user_id, size if done and epoch == self.fence.epoch else -1)
        return done

    async def forget(self, user_id: str, upto_seq: int) -> None:
        """Drop the user's window in the current epoch, again if a new epoch began meanwhile
        (its replay may have read the log before the purge). No state: nothing to drop, the
        epoch that replaces it is replayed from the purged log."""
        self._know(user_id, -1)
        state = await self.state()
        while state is not None:
            await self._call(self._forget, keys(user_id, state.epoch), upto_seq, self.ttl_ms)
            now = await self.state()
            if now is None or now.epoch == state.epoch:
                return
            state = now

    async def sweep(self, epoch: str) -> int:
        """Delete the windows of every other epoch (and of the layout before epochs):
        stale copies no reader uses, which may hold users forgotten since."""
        gone = 0
        async for key in self.redis.scan_iter(match="tm:*", count=1000):
            name = key.decode()
            parts = name.rsplit(":", 2)
            stale_window = len(parts) == 3 and parts[2] in ("m", "h") and parts[1] != epoch
            if stale_window or name == "tm:applied":
                gone += await self.redis.delete(key)
        return gone

    async def wipe(self) -> None:
        """Drop every tiermem key: the applier then rebuilds clean windows from seq 1."""
        self._bytes.clear()
        async for key in self.redis.scan_iter(match="tm:*", count=1000):
            await self.redis.delete(key)
