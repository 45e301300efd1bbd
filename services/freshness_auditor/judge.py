"""The auditor's verdicts: pure functions over what was served and what is true.

Memory: a reply is *stale* when it lacks a message the log had stored at
least `grace_s` before the read (or any message with seq <= the request's
`min_seq`: read-your-writes is exact), among the newest `n` the user had at
that moment; or when it holds a message the log does not have (never
acknowledged, or forgotten before the read). Messages stored within
`grace_s` of the read may be missing: tiers learn of an append a few
milliseconds after its ack, and the clocks of two machines differ a little.
When the user was forgotten after the read, what the log lacks now proves
nothing: the verdict is *inconclusive*.

LLM: a hit is *right* when a fresh answer to the same request agrees with
the one served: the same label for label-like tasks (lead score, intent);
for free text, each answer entails the other, as an independent judge
(`entailment`: never the broker's guard) scores it in both directions. An
answer that calls tools is what it asks to be done: its calls must be the
fresh answer's (`calls_agree`: the same tools in the same order, with equal
inputs), whatever its text says, before its text is judged at all.
"""

from __future__ import annotations

import re

import msgspec

from shared.contract import ServedMemory, ToolCall
from shared.stream import Logged


class MemoryVerdict(msgspec.Struct):
    verdict: str  # fresh | stale | inconclusive
    missing: list[int] = []  # seqs the reply should have held
    unknown: list[int] = []  # seqs it held that the log does not


def log_start(rec: ServedMemory) -> int:
    """The first seq of the log the verdict needs: a full reply bounds it below."""
    if rec.op == "recent" and rec.seqs and len(rec.seqs) >= rec.n:
        return min(rec.seqs)
    return 1


def judge_memory(rec: ServedMemory, log: list[Logged], *, grace_s: float,
                 forgotten_at: float | None = None) -> MemoryVerdict:
    """`log`: the user's messages from `log_start(rec)` (or earlier) on, as the stream holds them now."""
    stored = {m.seq: m.stored_at for m in log}
    unknown = [s for s in rec.seqs if stored.get(s, float("inf")) > rec.at + grace_s]
    missing: list[int] = []
    if rec.op == "recent":
        held = set(rec.seqs)
        as_of = [m for m in log if m.stored_at <= rec.at][-rec.n:]
        min_seq = rec.min_seq or 0
        missing = [m.seq for m in as_of
                   if m.seq not in held and (m.stored_at <= rec.at - grace_s or m.seq <= min_seq)]
    if not (missing or unknown):
        return MemoryVerdict("fresh")
    if forgotten_at is not None and forgotten_at >= rec.at - grace_s:
        return MemoryVerdict("inconclusive", missing, unknown)
    return MemoryVerdict("stale", missing, unknown)


_space = re.compile(r"\s+")


def calls_agree(served: list[ToolCall], fresh: list[ToolCall]) -> bool:
    """Do two answers make the same tool calls? Names in order, inputs equal as JSON
    once normalised (`normalise_input`): get_weather(city="Paris") is not
    get_weather(city="London"), however alike the texts around them."""
    return (len(served) == len(fresh)
            and all(s.name == f.name and normalise_input(s.input) == normalise_input(f.input)
                    for s, f in zip(served, fresh)))


def normalise_input(value):
    """A tool input compared by meaning, not spelling: key order, whitespace and case
    of strings, and 1 vs 1.0 do not matter; every key, value and list order does."""
    if isinstance(value, dict):
        return {k: normalise_input(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise_input(v) for v in value]
    if isinstance(value, str):
        return _space.sub(" ", value).strip().casefold()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


class Budget:
    """Re-asking costs money: spend at most `fraction` of what the audited cache saved.

    `earn` adds every hit's saving; `reserve` admits an audit only if its
    estimated cost still fits, and books it at once (audits run concurrently);
    `settle` corrects the booking to what the call really cost.
    """

    def __init__(self, fraction: float) -> None:
        self.fraction = max(fraction, 0.0)
        self.saved = 0.0
        self.spent = 0.0

    def earn(self, saved_usd: float) -> None:
        self.saved += max(saved_usd, 0.0)

    def reserve(self, estimate_usd: float) -> bool:
        if self.spent + estimate_usd > self.fraction * self.saved + 1e-12:
            return False
        self.spent += estimate_usd
        return True

    def settle(self, estimate_usd: float, actual_usd: float) -> None:
        self.spent += actual_usd - estimate_usd
