"""`memory.changed` events waiting to be applied to the cache, folded per user.

The events subscription's callback only folds an event in here (no I/O), so
it keeps up with any event rate, and a worker applies whatever has piled up
as one batch (`Broker.apply_changes`). Folding loses nothing: a user who
spoke five times needs one invalidation, a forget covers everything, and a
batch that failed goes back in to be retried.

What is held stays bounded: past `limit` users who spoke, they are all let
go and replaced by a distrust of every invalidating entry created before now
(`policy.stale`), which covers each of them and more. Forgets are rare and
nothing else covers them, so they are always kept.
"""

from __future__ import annotations

import asyncio

import msgspec

from shared.contract import Changed

LIMIT = 10_000  # users who spoke, held at most
BATCH = 500  # users applied per batch


class Batch(msgspec.Struct):
    spoke: set[str]
    forgot: set[str]
    distrust_since: float  # > 0: tell every broker (cache.distrust) first


class Pending:
    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self._spoke: set[str] = set()
        self._forgot: set[str] = set()
        self._distrust_since = 0.0
        self.ready = asyncio.Event()  # something is waiting

    def add(self, event: Changed, now: float) -> bool:
        """Fold one event in; False if it made the backlog overflow into a distrust."""
        if event.op == "forget":
            self._forgot.add(event.user_id)
            self.ready.set()
            return True
        if event.message is not None and event.message.role == "user":
            return self._spoke_add(event.user_id, now)
        return True  # the bot spoke: nothing to do

    def distrust(self, since: float) -> None:
        self._distrust_since = max(self._distrust_since, since)
        self.ready.set()

    def take(self, most: int = BATCH) -> Batch:
        """Up to `most` users of each kind, and the distrust to record; the rest stays."""
        batch = Batch(_pop(self._spoke, most), _pop(self._forgot, most), self._distrust_since)
        self._distrust_since = 0.0
        if not (self._spoke or self._forgot):
            self.ready.clear()
        return batch

    def put_back(self, batch: Batch, now: float) -> None:
        """A batch that failed: fold it in again, to be retried."""
        if batch.distrust_since:
            self.distrust(batch.distrust_since)
        if batch.forgot:
            self._forgot |= batch.forgot
            self.ready.set()
        for user_id in batch.spoke:
            if not self._spoke_add(user_id, now):
                break

    def _spoke_add(self, user_id: str, now: float) -> bool:
        if user_id not in self._spoke and len(self._spoke) >= self.limit:
            self._spoke.clear()
            self.distrust(now)
            return False
        self._spoke.add(user_id)
        self.ready.set()
        return True


def _pop(users: set[str], most: int) -> set[str]:
    if len(users) <= most:
        taken = set(users)
        users.clear()
        return taken
    return {users.pop() for _ in range(most)}
