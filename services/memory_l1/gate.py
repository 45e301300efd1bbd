"""Which change events the sidecar may believe: none whose seq lies beyond the log.

The gateway broadcasts `memory.changed.<user>` only for what the stream
stored, so an event whose seq is past the stream's last sequence is forged.
Applied, it would stick: the window would sit at that seq, every real event
after it would look old and every fill older, until the LRU let it go.

The sidecar learns the stream's last seq from the JetStream API, and asking
once per event would put a round trip on every event. So the last seq is
cached: an event at or below it passes at once. An event beyond it is held,
and so is every event after it (a window must see a user's events in order),
until a refresh of the cache that *began after the event arrived* has
answered: then it is applied if the log has reached its seq, refused if not.
One refresh runs at a time and judges every event held when it began, so
under load one request answers for a batch. No I/O here: the service runs
the refreshes.
"""

from __future__ import annotations

from collections import Counter, deque

from shared.contract import Changed


class SeqGate:
    def __init__(self) -> None:
        self.last = 0  # the stream's last seq, as the newest refresh read it
        self._held: deque[tuple[int, Changed]] = deque()  # (first refresh that may judge it, event)
        self._begun = 0  # refreshes begun
        self._users: Counter[str] = Counter()  # held events by user

    @property
    def waiting(self) -> bool:
        """Events are held: a refresh must run."""
        return bool(self._held)

    def holds(self, user_id: str) -> bool:
        """An event of this user is held (a read may want to wait for it)."""
        return user_id in self._users

    def admit(self, ev: Changed, matters: bool = True) -> bool:
        """True: apply `ev` now. False: it is held for the next refresh.

        `matters` False says applying `ev` would change nothing (a user this
        sidecar holds nothing of): it passes unless events are held before it,
        so a sidecar does not ask the stream about every user's events.
        """
        if not self._held and (ev.seq <= self.last or not matters):
            return True
        self._held.append((self._begun + 1, ev))
        self._users[ev.user_id] += 1
        return False

    def begin(self) -> int:
        """A refresh starts (after every event it is to judge arrived); its number."""
        self._begun += 1
        return self._begun

    def settle(self, number: int, last: int) -> tuple[list[Changed], list[Changed]]:
        """Refresh `number` read the stream's last seq `last`.

        Returns the held events to apply now, in arrival order, and those it
        refuses (beyond the log although they arrived before it began). Events
        after the first one it cannot judge stay held for the next refresh.
        """
        self.last = last
        apply: list[Changed] = []
        refused: list[Changed] = []
        held = self._held
        while held:
            judged_by, ev = held[0]
            if ev.seq <= last:
                apply.append(ev)
            elif judged_by <= number:
                refused.append(ev)
            else:
                break
            held.popleft()
            self._release(ev.user_id)
        return apply, refused

    def fail(self) -> int:
        """A refresh failed: nothing held can be judged. Drops them all; how many."""
        dropped = len(self._held)
        self._held.clear()
        self._users.clear()
        return dropped

    def _release(self, user_id: str) -> None:
        left = self._users[user_id] - 1
        if left:
            self._users[user_id] = left
        else:
            del self._users[user_id]
