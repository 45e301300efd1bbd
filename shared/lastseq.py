"""What the l2-gateway keeps in Redis that the llm-broker checks its hits against.

`key(user)`: the seq of each user's newest own message (role "user"). The
l2-gateway writes it in the same script that applies the message to the
user's window (only ever upwards: an append whose apply is late sets it
first); the llm-broker reads it on every hit of a class that a user's
message invalidates, so an answer built before the user's latest message is
refused even when the `memory.changed` event that should have dropped it
never arrived. The key is under the gateway's `tm:` prefix (its Redis ACL user
writes it; the broker's may only read it) and carries the user's hash tag (one
Redis Cluster slot with the user's window, which the applying script needs).

`STATE`: the L2 tier's global state hash (`services/l2_gateway/fence.py` says
what its fields mean). The broker reads it with every exact lookup: while it
is missing, being replayed or older than a state seen before (Redis wiped or
rolled back), the user-seq keys cannot be trusted (`services/llm_broker/l2state.py`).

`DUE`: the highest log seq that has been in the log for half the audit grace
(`shared.log_head`), as the gateways know it from their acks and the stream,
raised (never lowered) by each of them at most every `DUE_EVERY_S`. While
the state's `applied` is below it, the applier lags acknowledged messages
for longer than the grace allows, so the user-seq keys may lack them: the
broker then distrusts them too (`behind_log`), as L2 passes its reads down.
"""

from __future__ import annotations

import msgspec

STATE = "tm:{g}:state"
STATE_FIELDS = ("epoch", "gen", "applied", "rebuilding")
DUE = "tm:{g}:due"
DUE_EVERY_S = 0.05


def key(user_id: str) -> str:
    return f"tm:{{{user_id}}}:user_seq"


class State(msgspec.Struct, frozen=True):
    """One read of `STATE`: the epoch, its generation, the log position applied in it,
    and, while the log is replayed into it, the position the replay must reach."""

    epoch: str
    gen: int
    applied: int
    rebuilding: int = 0  # the position a replay must reach before the epoch is trusted

    @classmethod
    def parse(cls, raw: list) -> State | None:
        """From `HMGET STATE *STATE_FIELDS` (None: there is no state)."""
        epoch, gen, applied, rebuilding = raw
        if epoch is None or gen is None or applied is None:
            return None
        as_str = epoch.decode() if isinstance(epoch, bytes) else epoch
        return cls(as_str, int(gen), int(applied), int(rebuilding or 0))

    def behind(self, epoch: str | None, gen: int, applied: int) -> bool:
        """Is this state older than one seen before (epoch, gen, highest applied in it)?
        A lower generation, the same epoch at a lower position, or another epoch of the
        same generation (the one seen was replaced without a newer one): Redis went back."""
        if self.gen < gen or (self.epoch == epoch and self.applied < applied):
            return True
        return epoch is not None and self.epoch != epoch and self.gen == gen

    @property
    def replaying(self) -> bool:
        return self.applied < self.rebuilding


class Seen(msgspec.Struct, frozen=True):
    """The newest L2 state a process saw: its epoch, generation and highest `applied`.
    A reply can only be judged against what was seen when it was asked for (a newer
    state seen while the reply was on its way proves nothing)."""

    epoch: str | None = None
    gen: int = 0
    applied: int = 0  # the highest `applied` seen in `epoch`

    @classmethod
    def of(cls, state: State) -> Seen:
        return cls(state.epoch, state.gen, state.applied)

    def after(self, state: State) -> Seen:
        """What was seen once `state` is seen too: the newer of the two, never going back."""
        if state.gen > self.gen:
            return Seen.of(state)
        if state.epoch == self.epoch and state.applied > self.applied:
            return Seen(self.epoch, self.gen, state.applied)
        return self

    def covers(self, other: Seen) -> bool:
        """Had whoever saw `self` seen a state at least as new as `other`?"""
        if self.gen != other.gen:
            return self.gen > other.gen
        return self.epoch == other.epoch and self.applied >= other.applied
