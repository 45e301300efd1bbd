"""Which Redis state this process may trust: the epoch fence of the L2 tier (pure policy).

The state's key and its parsing are in `shared.lastseq` (the llm-broker reads
it too, to know when the user-seq keys cannot be trusted).

Redis can lose its data (restarted empty, FLUSHALL) or go back in time (a
failover to a replica that lagged, a restore from an older snapshot), and
several gateways write to it. Every window key carries the *epoch* it was
built in (`tm:{user}:<epoch>:m`), and the global state hash `tm:{g}:state`
names the current epoch, its generation (`gen`, one more than the epoch it
replaced), the log position applied in it (`applied`) and, while one
gateway replays the log into a new epoch, the position the replay must reach
(`rebuilding`). So:

- a wipe loses the state: nobody trusts Redis until one gateway, holding the
  lock `tm:{g}:lock`, has made a new epoch and replayed the log into it; the
  others' writes, made before they noticed, went to the old epoch's keys,
  which no reader looks at;
- a rollback brings back an older `applied` (or an older epoch, of a lower
  `gen`) than this process has already seen: the state is not trusted either
  and is replaced by a new epoch, since a snapshot also holds windows of users
  forgotten after it was taken.

`Fence` keeps what this process has seen (the epoch, its `gen`, the highest
`applied`) and judges each state read from Redis; the applier and the read
path share one. It cannot see a rollback that happened while no gateway was
running (nothing remembers a newer state then).
"""

from __future__ import annotations

from shared.lastseq import Seen, State

__all__ = ["LOST", "REBUILDING", "ROLLED_BACK", "Fence", "Seen", "State"]

# Why a state cannot be trusted; also the reasons a read passes down to L3.
LOST = "redis_lost"  # no state: Redis lost its data, or it was never initialised
REBUILDING = "rebuilding"  # a gateway is replaying the log into a new epoch
ROLLED_BACK = "rolled_back"  # older than a state this process has seen


class Fence:
    """This process's view of the newest L2 state, shared by its applier and readers."""

    def __init__(self) -> None:
        self.seen = Seen()

    @property
    def epoch(self) -> str | None:
        return self.seen.epoch

    def judge(self, state: State | None, before: Seen) -> str:
        """Why `state`, read after `before` was taken, may not be trusted ('' if it may);
        remembers a newer epoch and position."""
        if state is None:
            return LOST
        if state.behind(before.epoch, before.gen, before.applied):
            return ROLLED_BACK
        self.saw(state)
        return REBUILDING if state.replaying else ""

    def saw(self, state: State) -> None:
        """Remember `state` if it is newer than what was seen (never go back)."""
        self.seen = self.seen.after(state)

    def adopt(self, state: State) -> None:
        """Take `state` as the current epoch (a new epoch this process made or joins)."""
        self.seen = Seen.of(state)

    def next_gen(self, state: State | None) -> int:
        """The generation of an epoch that replaces `state`: above every one seen."""
        return max(self.seen.gen, state.gen if state else 0) + 1
