"""The L2 tier's data in Redis: the newest messages of every user.

Per user (keys hash-tagged by user so Redis Cluster keeps them in one slot):
`tm:{u}:m` a sorted set of encoded messages scored by seq, trimmed to the
window; `tm:{u}:h` a hash with `last` (newest seq applied), `count`
(messages applied), `bytes` (their size as the log stores them: what the
per-user quota counts) and `floor` (everything at or below it was forgotten).
`tm:applied` is the log position up to which *every* message of the stream
has been applied: it is what lets L2 prove read-your-writes (`min_seq`).
`shared.lastseq.key(u)`: the seq of the user's newest own message (role
"user"), set by the same script, for the llm-broker's invalidation check.

Writes only come from the applier, in stream order, through `APPLY`, whose
guard (seq above `last` and `floor`) makes replays and several appliers
harmless. Reads go through one script so a reply is one consistent snapshot.

Scripts are called by SHA (`EVALSHA`), alone or in pipelines: redis-py's
registered scripts send `SCRIPT EXISTS` before every pipeline, a second round
trip on every read and every applied batch. Here a script is loaded only when
Redis answers NOSCRIPT (after a restart or `SCRIPT FLUSH`), and the call re-run.
"""

from __future__ import annotations

from collections.abc import Callable
from hashlib import sha1

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from shared import lastseq
from shared.contract import Message
from shared.errors import Unavailable

APPLIED = "tm:applied"

APPLY = """
local last = tonumber(redis.call('HGET', KEYS[2], 'last') or '0')
local floor = tonumber(redis.call('HGET', KEYS[2], 'floor') or '0')
local seq = tonumber(ARGV[1])
if seq <= last or seq <= floor then
  return {0, last, tonumber(redis.call('HGET', KEYS[2], 'count') or '0')}
end
redis.call('ZADD', KEYS[1], seq, ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[3]) + 1))
local count = redis.call('HINCRBY', KEYS[2], 'count', 1)
redis.call('HINCRBY', KEYS[2], 'bytes', tonumber(ARGV[4]))
redis.call('HSET', KEYS[2], 'last', seq)
if ARGV[5] == 'user' then redis.call('SET', KEYS[3], seq) end
return {1, last, count}
"""

# Advance the global position; returns the previous one (false: Redis lost it).
ADVANCE = """
local prev = redis.call('GET', KEYS[1])
if (not prev) or tonumber(prev) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return prev
"""

# `last` -1: Redis holds no state for this user (never seen, or Redis lost it).
READ = """
local h = redis.call('HMGET', KEYS[2], 'last', 'count', 'floor')
local msgs = redis.call('ZRANGE', KEYS[1], -tonumber(ARGV[1]), -1)
return {h[1] or '-1', h[2] or '0', h[3] or '0', msgs}
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
return floor
"""

# Replace one user's window with what the log holds (the auditor found it stale).
# Refused (0) if a newer message was applied meanwhile: the caller's read is older.
REBUILD = """
local last = tonumber(redis.call('HGET', KEYS[2], 'last') or '0')
if last > tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
for i = 5, #ARGV, 2 do redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[3]) + 1))
redis.call('HSET', KEYS[2], 'last', ARGV[1], 'count', ARGV[2], 'bytes', ARGV[4])
return 1
"""

_encode = msgspec.json.Encoder().encode


def keys(user_id: str) -> list[str]:
    return [f"tm:{{{user_id}}}:m", f"tm:{{{user_id}}}:h"]


class Snapshot(msgspec.Struct):
    """One user's window as read in one step, with the global position read before it."""

    applied: int  # every log message <= applied is in Redis (0: not read, not needed)
    last: int
    count: int
    floor: int
    # Each message's JSON as the applier stored it (an encoded `Message`),
    # oldest first: replies splice it in rather than decode and re-encode.
    messages: list[msgspec.Raw]

    def complete_through(self) -> int:
        """The highest seq up to which this window is known to hold all of the user's messages."""
        return max(self.applied, self.last, self.floor)


class _Script:
    """A Lua script called by its SHA1 (`EVALSHA`)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = sha1(source.encode()).hexdigest()

    def queue(self, pipe: Pipeline, keys: list[str], *args) -> None:
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


class RedisWindow:
    def __init__(self, redis: Redis, window: int) -> None:
        self.redis = redis
        self.window = window
        self._apply = _Script(APPLY)
        self._advance = _Script(ADVANCE)
        self._read = _Script(READ)
        self._forget = _Script(FORGET)
        self._rebuild = _Script(REBUILD)
        self._scripts = (self._apply, self._advance, self._read, self._forget, self._rebuild)

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
                for script in self._scripts:
                    await self.redis.script_load(script.source)
        raise AssertionError("unreachable")

    async def _call(self, script: _Script, keys: list[str], *args):
        """One script call on its own (no pipeline: cheaper), loading it if Redis lost it."""
        try:
            return await self.redis.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.redis.script_load(script.source)
            return await self.redis.evalsha(script.sha, len(keys), *keys, *args)

    async def apply_batch(self, items: list[tuple[str, Message, int]],
                          upto_seq: int) -> tuple[list, bytes | None]:
        """Apply messages `(user_id, message, stored bytes)`, in stream order, and
        advance the global position to `upto_seq` (the batch's last seq, which may
        be a message that was dead-lettered rather than applied).

        Returns one `(applied, prev_seq, count)` per item, and what the global
        position was before (None means Redis lost its data: replay needed).
        """
        def build(pipe: Pipeline) -> None:
            for user_id, msg, size in items:
                self._apply.queue(pipe, [*keys(user_id), lastseq.key(user_id)], msg.seq,
                                  _encode(msg), self.window, size, msg.role)
            self._advance.queue(pipe, [APPLIED], upto_seq)

        results = await self._run(build)
        return results[:-1], results[-1]

    async def position(self) -> int | None:
        raw = await self.redis.get(APPLIED)
        return None if raw is None else int(raw)

    async def read(self, user_id: str, n: int, min_seq: int | None = None) -> Snapshot:
        """The user's newest `n` messages and what proves them complete, as one snapshot.

        Usually one command: when Redis holds the user's state and it is already
        as new as `min_seq`, the window alone proves it holds everything up to
        `min_seq` (the applier goes in log order: all before the user's last
        applied message is applied too). Otherwise the global position is read
        too, first, in the same round trip (the window read after it holds at
        least that much), which also tells a new user from a Redis that lost
        its data.
        """
        last, count, floor, raw = await self._call(self._read, keys(user_id), n)
        last, floor = int(last), int(floor)
        if last >= 0 and (min_seq is None or max(last, floor) >= min_seq):
            return Snapshot(0, last, int(count), floor, [msgspec.Raw(m) for m in raw])

        def build(pipe: Pipeline) -> None:
            pipe.get(APPLIED)
            self._read.queue(pipe, keys(user_id), n)

        applied, (last, count, floor, raw) = await self._run(build)
        if applied is None:
            raise Unavailable("L2 has not been initialised from the log yet")
        return Snapshot(int(applied), max(int(last), 0), int(count), int(floor),
                        [msgspec.Raw(m) for m in raw])

    async def rebuild(self, user_id: str, messages: list[Message], count: int, size: int) -> bool:
        """Make the user's window the newest `messages` of the log (`count` in all, `size` bytes)."""
        last = messages[-1].seq if messages else 0
        pairs = [part for m in messages[-self.window:] for part in (m.seq, _encode(m))]
        return bool(await self._call(self._rebuild, keys(user_id), last, count, self.window, size,
                                     *pairs))

    async def stored_bytes(self, user_ids: list[str]) -> list[int]:
        """Each user's bytes in the log as applied so far (0 for a user Redis does not know)."""
        pipe = self.redis.pipeline(transaction=False)
        for user_id in user_ids:
            pipe.hget(keys(user_id)[1], "bytes")
        return [int(v or 0) for v in await pipe.execute()]

    async def wipe(self) -> None:
        """Drop every tiermem key: the applier then rebuilds clean windows from seq 1."""
        async for key in self.redis.scan_iter(match="tm:*", count=1000):
            await self.redis.delete(key)

    async def forget(self, user_id: str, upto_seq: int) -> None:
        await self._call(self._forget, keys(user_id), upto_seq)
