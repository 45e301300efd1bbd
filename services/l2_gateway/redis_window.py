"""The L2 tier's data in Redis: the newest messages of every user.

Per user (keys hash-tagged by user so Redis Cluster keeps them in one slot):
`tm:{u}:m` a sorted set of encoded messages scored by seq, trimmed to the
window; `tm:{u}:h` a hash with `last` (newest seq applied), `count`
(messages applied) and `floor` (everything at or below it was forgotten).
`tm:applied` is the log position up to which *every* message of the stream
has been applied: it is what lets L2 prove read-your-writes (`min_seq`).

Writes only come from the applier, in stream order, through `APPLY`, whose
guard (seq above `last` and `floor`) makes replays and several appliers
harmless. Reads go through one script so a reply is one consistent snapshot.
"""

from __future__ import annotations

import msgspec
from redis.asyncio import Redis

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
redis.call('HSET', KEYS[2], 'last', seq)
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

READ = """
local h = redis.call('HMGET', KEYS[2], 'last', 'count', 'floor')
local msgs = redis.call('ZRANGE', KEYS[1], -tonumber(ARGV[1]), -1)
return {h[1] or '0', h[2] or '0', h[3] or '0', msgs}
"""

FORGET = """
redis.call('DEL', KEYS[1])
local floor = tonumber(redis.call('HGET', KEYS[2], 'floor') or '0')
if tonumber(ARGV[1]) > floor then floor = tonumber(ARGV[1]) end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'floor', floor, 'last', 0, 'count', 0)
return floor
"""

_message = msgspec.json.Decoder(Message)
_encode = msgspec.json.Encoder().encode


def keys(user_id: str) -> list[str]:
    return [f"tm:{{{user_id}}}:m", f"tm:{{{user_id}}}:h"]


class Snapshot(msgspec.Struct):
    """One user's window as read in one step, with the global position read before it."""

    applied: int  # every log message <= applied is in Redis
    last: int
    count: int
    floor: int
    messages: list[Message]

    def complete_through(self) -> int:
        """The highest seq up to which this window is known to hold all of the user's messages."""
        return max(self.applied, self.last, self.floor)


class RedisWindow:
    def __init__(self, redis: Redis, window: int) -> None:
        self.redis = redis
        self.window = window
        self._apply = redis.register_script(APPLY)
        self._advance = redis.register_script(ADVANCE)
        self._read = redis.register_script(READ)
        self._forget = redis.register_script(FORGET)

    async def apply_batch(self, items: list[tuple[str, Message]]) -> tuple[list, bytes | None]:
        """Apply messages (in stream order) and advance the global position.

        Returns one `(applied, prev_seq, count)` per item, and what the global
        position was before (None means Redis lost its data: replay needed).
        """
        pipe = self.redis.pipeline(transaction=False)
        for user_id, msg in items:
            await self._apply(keys=keys(user_id), args=[msg.seq, _encode(msg), self.window],
                              client=pipe)
        await self._advance(keys=[APPLIED], args=[items[-1][1].seq], client=pipe)
        results = await pipe.execute()
        return results[:-1], results[-1]

    async def position(self) -> int | None:
        raw = await self.redis.get(APPLIED)
        return None if raw is None else int(raw)

    async def read(self, user_id: str, n: int) -> Snapshot:
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(APPLIED)  # first: the window read after it holds at least this much
        await self._read(keys=keys(user_id), args=[n], client=pipe)
        applied, (last, count, floor, raw) = await pipe.execute()
        if applied is None:
            raise Unavailable("L2 has not been initialised from the log yet")
        return Snapshot(int(applied), int(last), int(count), int(floor),
                        [_message.decode(m) for m in raw])

    async def forget(self, user_id: str, upto_seq: int) -> None:
        await self._forget(keys=keys(user_id), args=[upto_seq])
