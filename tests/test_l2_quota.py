"""The per-user quota's fast path (services/l2_gateway/quota.py) and the byte counts it
trusts (`RedisWindow.known_bytes`, fed by what APPLY, REBUILD and FORGET leave in Redis)."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from services.l2_gateway.fence import Fence
from services.l2_gateway.quota import Quota
from services.l2_gateway.redis_window import RedisWindow, keys
from shared.contract import Message
from shared.errors import PayloadTooLarge


class FakeWindow:
    """What Quota asks of RedisWindow; counts the Redis reads."""

    def __init__(self, known: dict[str, int], stored: dict[str, int]) -> None:
        self.known = known
        self.stored = stored
        self.reads: list[list[str]] = []
        self.gate: asyncio.Event | None = None  # set: reads wait for it

    def known_bytes(self, user_id: str) -> int | None:
        return self.known.get(user_id)

    async def stored_bytes(self, user_ids: list[str]) -> list[int]:
        self.reads.append(list(user_ids))
        if self.gate is not None:
            await self.gate.wait()
        return [self.stored.get(u, 0) for u in user_ids]


async def test_a_user_far_below_the_limit_is_admitted_without_a_redis_read():
    window = FakeWindow(known={"u": 100}, stored={"u": 100})
    quota = Quota(window, limit=1000)
    await quota.admit("u", 300)  # 400 <= half of 1000
    assert window.reads == [] and quota.reserved == {"u": 300}
    await quota.admit("u", 150)  # 100 + 300 reserved + 150 = 550: past half, read
    assert window.reads == [["u"]] and quota.reserved == {"u": 450}
    quota.release("u", 300)
    quota.release("u", 150)
    assert quota.reserved == {}


async def test_unknown_users_and_appends_near_the_limit_take_the_exact_path():
    window = FakeWindow(known={"near": 450}, stored={"near": 900, "new": 0})
    quota = Quota(window, limit=1000)
    await quota.admit("new", 10)
    assert window.reads == [["new"]]
    # known says 450 (it lags Redis): the exact path sees 900 and refuses
    with pytest.raises(PayloadTooLarge):
        await quota.admit("near", 200)
    assert window.reads[-1] == ["near"] and "near" not in quota.reserved


async def test_the_fast_path_does_not_overtake_appends_queued_for_a_read():
    window = FakeWindow(known={"fast": 0}, stored={})
    window.gate = asyncio.Event()
    quota = Quota(window, limit=1000)
    order: list[str] = []

    async def admit(user: str) -> None:
        await quota.admit(user, 10)
        order.append(user)

    slow = asyncio.create_task(admit("unknown"))
    await asyncio.sleep(0)  # its read is in flight
    fast = asyncio.create_task(admit("fast"))
    await asyncio.sleep(0.01)
    assert order == []  # waits behind the read rather than going first
    window.gate.set()
    await asyncio.gather(slow, fast)
    assert order == ["unknown", "fast"]


def _msg(seq: int) -> Message:
    return Message(seq=seq, msg_id=f"m{seq}", role="user", bot_id="b", text="hi",
                   ts="2026-01-01T00:00:00Z")


async def test_known_bytes_follow_what_redis_holds(clean_redis):
    redis = Redis.from_url(clean_redis)
    try:
        window = RedisWindow(redis, 10, 60.0, Fence())
        assert await window.take_lock("t")
        window.fence.adopt(await window.new_epoch(1, 0))
        epoch = window.fence.epoch
        await window.apply_batch([("u1", _msg(1), 100), ("u1", _msg(2), 50)], 2,
                                 window.fence.seen, "t", fresh=True)
        assert window.known_bytes("u1") == 150
        assert await redis.hget(keys("u1", epoch)[1], "bytes") == b"150"
        # applied by another gateway already: APPLY refuses, and reports what Redis holds
        other = RedisWindow(redis, 10, 60.0, Fence())
        other.fence.adopt(window.fence.seen)
        await other.apply_batch([("u1", _msg(2), 50)], 2, other.fence.seen, "t", fresh=True)
        assert other.known_bytes("u1") == 150
        # a window started partial counts from its first message only: not known
        await window.apply_batch([("u2", _msg(3), 70)], 3, window.fence.seen, "t", fresh=False)
        assert window.known_bytes("u2") is None
        assert await window.rebuild(epoch, "u2", [_msg(3)], 4, 280)
        assert window.known_bytes("u2") == 280
        await window.forget("u1", 2)
        assert window.known_bytes("u1") is None
        assert await redis.hget(keys("u1", epoch)[1], "bytes") == b"0"
    finally:
        await redis.aclose()
