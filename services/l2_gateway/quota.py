"""The per-user quota on bytes in the log, checked before an append is published.

Why batched: an append used to publish first thing, so appends a client sent
back to back were stored in the order sent. A Redis read per append before
the publish, on a pool of connections, let later ones overtake earlier ones.
Here appends queue in arrival order, one pipelined read serves every append
waiting, and they are let through in that order, in one go: the publishes
leave in arrival order again, and under load one round trip serves many.

The count is the applier's (`bytes` in the user's Redis hash: rebuilt with
the windows, reset by forget) plus this replica's admitted appends not yet
applied (`reserved`, released when the append returns). It is exact for
appends through one replica while the applier keeps up; it can be exceeded by
appends in flight on other replicas and by ones not applied within
`APPEND_APPLY_WAIT_S`, each at most the largest message (`MAX_TEXT_BYTES`
plus ~200 bytes of envelope). With Redis down it is not checked (appends must
still succeed), and a Redis rebuilt from the log counts up from zero until
the applier has caught up.

Fast path: a user far below the limit (the bytes this replica's applier knows,
`RedisWindow.known_bytes`, plus what is reserved and the new message at most
`FAST_SHARE` of it) is admitted without the Redis read, when no append is
queued before it (so the order still holds). The read cost a round trip on
every append's path (~0.2 ms of ~2 ms at one in flight) and ~8 % of the
gateway's CPU at 128 in flight (bench/results/profile_l2.md). The applier's
count lags Redis by what other replicas applied ahead of it, which the other
half of the limit covers; where it is too high (another replica forgot or
repaired the user) it only sends the append down the exact path.

Retention (`shared.retention`) drops old messages from the log without
telling Redis, so with it on the count only grows: an append that would pass
the limit first has the user's count made again from what the log holds now
(`recount`: the applier rebuilds the window, bytes included), and is judged
against that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from redis.exceptions import RedisError

from shared.errors import PayloadTooLarge

from .redis_window import RedisWindow

log = structlog.get_logger()
FAST_SHARE = 0.5  # below this share of the limit an append skips the Redis read


class Quota:
    def __init__(self, window: RedisWindow, limit: int,
                 recount: Callable[[str], Awaitable[bool]] | None = None) -> None:
        self.window = window
        self.limit = limit
        self.recount = recount  # make a user's count again from the log (None: it is exact)
        self.reserved: dict[str, int] = {}
        self._waiting: list[tuple[str, int, asyncio.Future]] = []
        self._reader: asyncio.Task | None = None

    async def admit(self, user_id: str, size: int) -> None:
        """Reserve `size` bytes for the user, or raise PayloadTooLarge; then `release` them."""
        if self._reader is None:  # nothing queued ahead of this append
            known = self.window.known_bytes(user_id)
            reserved = self.reserved.get(user_id, 0)
            if known is not None and known + reserved + size <= self.limit * FAST_SHARE:
                self.reserved[user_id] = reserved + size
                return
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((user_id, size, fut))
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        await fut

    def release(self, user_id: str, size: int) -> None:
        left = self.reserved.pop(user_id) - size
        if left:
            self.reserved[user_id] = left

    async def _read(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    stored = await self.window.stored_bytes([user for user, _, _ in batch])
                except (RedisError, OSError) as exc:
                    log.warning("quota_not_checked", error=str(exc), appends=len(batch))
                    stored = [None] * len(batch)
                for (user_id, size, fut), have in zip(batch, stored):
                    if fut.done():  # the append was cancelled
                        continue
                    total = (have or 0) + self.reserved.get(user_id, 0) + size
                    if have is not None and total > self.limit and self.recount is not None:
                        have = await self._recounted(user_id, have)
                        total = have + self.reserved.get(user_id, 0) + size
                    if have is not None and total > self.limit:
                        fut.set_exception(PayloadTooLarge(
                            f"this user's messages would take {total} bytes in the log; the limit "
                            f"is {self.limit} bytes per user (MAX_USER_BYTES); nothing was stored"))
                    else:
                        self.reserved[user_id] = self.reserved.get(user_id, 0) + size
                        fut.set_result(None)
        finally:
            self._reader = None

    async def _recounted(self, user_id: str, have: int) -> int:
        """The user's bytes once counted again from the log (`have` if that failed)."""
        try:
            if await self.recount(user_id):
                return (await self.window.stored_bytes([user_id]))[0]
        except (RedisError, OSError) as exc:
            log.warning("quota_not_recounted", error=str(exc))
        return have
