"""The test client's truth log and the checks made against it (pure: no I/O).

Why a truth log: a fault suite must judge the system by what it promised to
the client, not by what the system says about itself. The workload records
every acknowledged append (user, msg_id, seq, when), every read (what it
asked, when, what came back), every forget (when its reply came) and every
LLM call (hit or miss, `cache.age_s`). After a trial the durable log and L3
are read back and each check below compares them with this record. Times are
wall-clock seconds (`time.time()`): the broker's `age_s` is wall-clock too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from bench.stats import percentile


@dataclass(frozen=True)
class Ack:
    user: str
    msg_id: str
    seq: int
    role: str
    t: float  # when the ack arrived
    # When the (successful) request was sent: the message became durable, and known to
    # the tiers, somewhere between this and `t`; the client cannot tell where.
    t_sent: float | None = None


@dataclass(frozen=True)
class Read:
    user: str
    n: int
    min_seq: int | None
    t_sent: float
    t_reply: float
    tier: str
    seqs: tuple[int, ...]
    msg_ids: tuple[str, ...]
    search: bool = False


@dataclass(frozen=True)
class Forget:
    user: str
    t_sent: float
    t_reply: float


@dataclass(frozen=True)
class LLMCall:
    user: str
    task: str
    t_sent: float
    t_reply: float
    status: str  # hit / miss / off
    age_s: float | None
    stop_reason: str | None


@dataclass(frozen=True)
class Call:
    """Any request of the workload, for latency and recovery: ok is False on an error or a timeout."""

    kind: str
    t_sent: float
    t_reply: float
    ok: bool


@dataclass
class Truth:
    acks: dict[str, list[Ack]] = field(default_factory=dict)
    reads: list[Read] = field(default_factory=list)
    forgets: dict[str, Forget] = field(default_factory=dict)
    llm: list[LLMCall] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)

    def ack(self, a: Ack) -> None:
        self.acks.setdefault(a.user, []).append(a)

    def acked(self, users=None, before: float = float("inf")) -> set[tuple[str, str]]:
        """(user, msg_id) of every append acknowledged before `before` and not taken back by a forget."""
        out = set()
        for user, acks in self.acks.items():
            if users is not None and user not in users:
                continue
            gone = self.forgets.get(user)
            out.update((user, a.msg_id) for a in acks
                       if a.t < before and (gone is None or a.t > gone.t_reply))
        return out


# --------------------------------------------------------------------------- checks


def lost(truth: Truth, stored: dict[str, list[tuple[int, str]]], users,
         before: float = float("inf")) -> set[tuple[str, str]]:
    """Appends of `users` acknowledged before `before` (when the store was read: later ones may
    not be in that snapshot yet) missing from a store ({user: [(seq, msg_id)]})."""
    have = {(u, m) for u, rows in stored.items() for _, m in rows}
    return truth.acked(users, before) - have


def duplicates(stored: dict[str, list[tuple[int, str]]]) -> int:
    """Extra copies in a store: one msg_id of a user at several seqs, or twice at one."""
    extra = 0
    for rows in stored.values():
        extra += sum(c - 1 for c in Counter(m for _, m in rows).values() if c > 1)
    return extra


def stale_reads(truth: Truth, grace_s: float, *, since: float = 0.0, until: float = float("inf"),
                poison: frozenset[str] = frozenset()) -> list[tuple[Read, str]]:
    """Reads (sent in [since, until)) that break the freshness promise, with why.

    A `recent` reply of n must hold every acknowledged message of the user with
    seq <= min_seq, and every one acknowledged more than `grace_s` before the
    read was sent, unless n newer messages in the reply push it out of the
    window. Nobody's reply may hold a message the suite poisoned the log with.
    Forgotten users are judged by `forgotten_served` instead.
    """
    bad = []
    for r in truth.reads:
        if not since <= r.t_sent < until:
            continue
        if poison & set(r.msg_ids):
            bad.append((r, "served a poison message"))
            continue
        if r.search or r.user in truth.forgets:
            continue
        got = set(r.msg_ids)
        newer = sorted(r.seqs)
        for a in truth.acks.get(r.user, ()):
            required = (r.min_seq is not None and a.seq <= r.min_seq) or a.t < r.t_sent - grace_s
            if not required or a.msg_id in got:
                continue
            pushed_out = sum(1 for s in newer if s > a.seq) >= r.n
            if not pushed_out:
                why = "min_seq" if r.min_seq is not None and a.seq <= r.min_seq else "grace"
                bad.append((r, f"missing {a.msg_id} (seq {a.seq}, {why}) from {r.tier}"))
                break
    return bad


def forgotten_served(truth: Truth, *, since: float = 0.0, until: float = float("inf")) -> list[str]:
    """Data of a forgotten user served after the forget's reply: reads holding a message
    acknowledged before the forget, LLM hits on an entry stored before it."""
    bad = []
    for r in truth.reads:
        f = truth.forgets.get(r.user)
        if f is None or not since <= r.t_sent < until or r.t_sent <= f.t_reply:
            continue
        old = {a.msg_id for a in truth.acks.get(r.user, ()) if a.t <= f.t_reply}
        if old & set(r.msg_ids):
            bad.append(f"{r.user}: {r.tier} served {len(old & set(r.msg_ids))} forgotten message(s)")
    for c in truth.llm:
        f = truth.forgets.get(c.user)
        if f is None or c.status != "hit" or c.age_s is None or not since <= c.t_sent < until:
            continue
        if c.t_sent > f.t_reply and c.t_reply - c.age_s < f.t_reply:
            bad.append(f"{c.user}: LLM hit on an entry {c.age_s:.2f} s old, from before the forget")
    return bad


def stale_llm_hits(truth: Truth, invalidating: set[str], grace_s: float, *, since: float = 0.0,
                   until: float = float("inf")) -> list[str]:
    """Hits of an invalidating class on an entry older than the user's latest message (acknowledged
    more than `grace_s` before the request), and hits on answers cut short (stop_reason max_tokens)."""
    bad = []
    for c in truth.llm:
        if c.status != "hit" or not since <= c.t_sent < until:
            continue
        if c.stop_reason == "max_tokens":
            bad.append(f"{c.user}: {c.task} hit on an answer cut short (max_tokens)")
            continue
        if c.task not in invalidating or c.age_s is None:
            continue
        said = [a for a in truth.acks.get(c.user, ()) if a.role == "user" and a.t < c.t_sent - grace_s]
        if not said:
            continue
        latest = max(said, key=lambda a: a.t)
        # Stale only if stored before the message was even sent: an entry stored between
        # the send and the ack's arrival may have been built after the gateway recorded it
        # (the broker serves no other), and the client cannot tell which.
        known = latest.t if latest.t_sent is None else latest.t_sent
        stored = c.t_reply - c.age_s
        if stored < known:
            bad.append(f"{c.user}: {c.task} hit stored {known - stored:.2f} s before the user's latest message")
    return bad


def recovery_s(calls: list[Call], healed: float, until: float) -> float | None:
    """Seconds from the fault's end until the workload's requests succeed again: the reply time
    of the last failed request sent after `healed` (0 if none failed); None if nothing sent after
    `healed` succeeded before `until`."""
    after = [c for c in calls if healed <= c.t_sent < until]
    if not any(c.ok for c in after):
        return None
    failed = [c.t_reply for c in after if not c.ok]
    return max(0.0, max(failed) - healed) if failed else 0.0


def p95_timeline(calls: list[Call], start: float, end: float, step: float = 0.5) -> list[tuple[float, float | None, int]]:
    """(seconds after `start`, p95 latency in ms of the successful calls sent in the bucket, errors)."""
    out = []
    t = start
    while t < end:
        bucket = [c for c in calls if t <= c.t_sent < t + step]
        lat = [(c.t_reply - c.t_sent) * 1000 for c in bucket if c.ok]
        p95 = percentile(lat, 95) if lat else None
        out.append((round(t - start, 3), p95, sum(1 for c in bucket if not c.ok)))
        t += step
    return out
