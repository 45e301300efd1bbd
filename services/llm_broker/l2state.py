"""When the broker may trust what Redis says about users, and which exact tier it reads (pure).

A hit of an invalidating class is checked against the seq of the user's
newest message that the l2-gateway keeps in Redis (`shared.lastseq`), and
exact entries live in Redis. Redis can lose its data (restarted empty,
FLUSHALL) or go back in time (a restore from an older snapshot, a failover to
a replica that lagged). Then the user-seq keys are missing until the gateway
replays the log, or hold older values; `llm:distrust_before` is gone or
older; and a rollback brings back exact entries that were invalidated, or
whose user was forgotten, after the snapshot. The gateway's state hash
(`shared.lastseq.STATE`; `services/l2_gateway/fence.py`) tells which: the
broker reads it in the round trip of every exact lookup, with `llm:epoch`,
and `View.judge` decides:

- The user-seq check is *untrusted* while the state is missing (after one was
  seen by this broker, or when `llm:epoch` says one existed), while the log is
  being replayed into a new epoch, or while it is older than the newest state
  this broker saw (lower `gen`, same epoch at a lower `applied`, another epoch
  of the same `gen`). Every hit of an invalidating class, exact or semantic,
  is then a miss.
- The user-seq check is untrusted as well while the state's `applied` is
  below `shared.lastseq.DUE` (`behind_log`): the applier lags messages that
  the log has held for half the audit grace, whose user seqs may be missing.
- The exact tier lives under a *key epoch*, `llm:x:<token>:<key>`. `llm:epoch`
  holds the token, the L2 epoch it was made in (its *binding*) and what its
  maker had seen of the L2 state. A value missing, bound to another L2 epoch
  than the current one (Redis wiped, the gateway made a new epoch), or
  restored by a rollback that this broker sees (its maker had not seen the
  state this broker saw) is replaced by a new token: every exact entry of
  the old one is ignored at once (Redis's TTL collects them), and the
  replacement also moves `llm:distrust_before` to now, so invalidating
  entries in Postgres built before it are refused too. Every broker uses
  whatever token `llm:epoch` holds; replacing is a compare-and-set, so
  brokers that notice together make one new token, not one each.

Without a gateway (the broker's own tests, a deployment without L2) there is
never a state: `llm:epoch` is bound to no epoch and the check is trusted as it
always was. What cannot be seen: a broker that starts after Redis was wiped,
before a gateway made the new state, has no memory of a state (the same
limit as the gateway's own fence); entries built with a known user seq are
still refused then (`policy.stale`: the record was lost), and the gateway's
new epoch is seen at its first lookup after.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import msgspec

from shared.lastseq import Seen, State

# Why the user-seq check cannot be trusted (also metric label values); as the gateway's fence.
LOST = "redis_lost"
REBUILDING = "rebuilding"
ROLLED_BACK = "rolled_back"
BEHIND_LOG = "behind_log"
# Why the exact tier's key epoch was replaced (the distrust's cause).
EPOCH_CHANGED = "l2_epoch_changed"
WENT_BACK = "l2_rolled_back"


def behind_log(state: State | None, due: int | None) -> str:
    """`BEHIND_LOG` if the state applied less of the log than it held half a grace ago."""
    return BEHIND_LOG if state is not None and due is not None and state.applied < due else ""


class KeyEpoch(msgspec.Struct, frozen=True):
    """The value of `llm:epoch`: `token/bound/maker epoch/maker gen/maker applied`."""

    token: str
    bound: str  # the L2 epoch current when it was made ('': there was no state)
    maker: Seen  # the newest state its maker had seen

    def encode(self) -> str:
        m = self.maker
        return f"{self.token}/{self.bound}/{m.epoch or ''}/{m.gen}/{m.applied}"

    @classmethod
    def parse(cls, raw: bytes | str | None) -> KeyEpoch | None:
        """None for a missing or malformed value (either is replaced)."""
        if raw is None:
            return None
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        parts = text.split("/")
        if len(parts) != 5 or not parts[0]:
            return None
        token, bound, epoch, gen, applied = parts
        try:
            return cls(token, bound, Seen(epoch or None, int(gen), int(applied)))
        except ValueError:
            return None


class Judgement(msgspec.Struct, frozen=True):
    untrusted: str  # why the user-seq check cannot be trusted ('': it can)
    token: str | None  # the key epoch to read under (None: none; install `replace` if given)
    replace: KeyEpoch | None = None  # the new `llm:epoch` value, set if it still is what was read
    cause: str = ""  # why it is replaced
    distrust: bool = False  # with the replacement, refuse invalidating entries created before now


class View:
    """This broker's memory of the L2 state, and the key epoch it uses; one per process."""

    def __init__(self, new_token: Callable[[], str] = lambda: secrets.token_hex(4)) -> None:
        self.seen = Seen()
        self.token: str | None = None  # the key epoch in use (None: not read yet)
        self.raw: bytes | str | None = None  # the `llm:epoch` value it came from
        self._new_token = new_token
        self._last: bytes | str | None = None  # the last `llm:epoch` value parsed, and its parse
        self._parsed: KeyEpoch | None = None

    def judge(self, state: State | None, raw_epoch: bytes | str | None,
              before: Seen | None = None) -> Judgement:
        """Judge one read of the state and `llm:epoch` (taken together) against `before`,
        what this broker had seen when it sent the read (default: now); remembers a
        newer state."""
        before = self.seen if before is None else before
        newest = self.seen
        value = self._parse(raw_epoch)
        why = self._trust(state, value, before)
        if why != ROLLED_BACK and newest.epoch != before.epoch and (
                state is None or state.behind(newest.epoch, newest.gen, 0)):
            # A concurrent read, sent later, came back first with a newer epoch: this one
            # is merely late. Nothing to replace on its word; its entry is not used.
            return Judgement(why, None)
        current = state.epoch if state is not None else ""
        if value is None or value.bound != current:
            cause = EPOCH_CHANGED
        elif why == ROLLED_BACK and not value.maker.covers(before):
            cause = WENT_BACK  # restored with the snapshot: it may hold forgotten users' entries
        else:
            return Judgement(why, value.token)
        # No distrust only where no L2 state was ever known (a broker without a gateway).
        involved = bool(current or (value is not None and value.bound) or self.seen.epoch)
        return Judgement(why, None, KeyEpoch(self._new_token(), current, self.seen), cause,
                         involved)

    def adopt(self, raw_epoch: bytes | str | None) -> str | None:
        """Use the key epoch `llm:epoch` holds (after a replacement, whoever won it)."""
        value = self._parse(raw_epoch)
        self.raw = raw_epoch if value is not None else None
        self.token = value.token if value is not None else None
        return self.token

    def _trust(self, state: State | None, value: KeyEpoch | None, before: Seen) -> str:
        if state is None:
            known = self.seen.epoch is not None or (value is not None and value.bound != "")
            return LOST if known else ""
        if state.behind(before.epoch, before.gen, before.applied):
            return ROLLED_BACK
        self.seen = self.seen.after(state)  # may be newer than `before` (a concurrent read)
        return REBUILDING if state.replaying else ""

    def _parse(self, raw: bytes | str | None) -> KeyEpoch | None:
        if raw != self._last or self._parsed is None:
            self._last, self._parsed = raw, KeyEpoch.parse(raw)
        return self._parsed
