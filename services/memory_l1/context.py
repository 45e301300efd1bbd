"""Context assembly (memory.get op "context"): what a bot puts in its prompt, within a budget.

Pure policy: given the recent window (L1/L2), L3's parts (the rolling
summary of older history and the older messages matching the question) and
a token budget, pick what goes in, in this order of importance:

1. the newest `NEWEST` messages of the window (the turn being answered);
2. the summary (everything older, in a few hundred tokens);
3. the relevant older messages, best first (each only if it fits);
4. the rest of the window, newest first, stopping at the first that does
   not fit, so the window stays contiguous and `seq` keeps its meaning.

Token counts are `shared.tokens` estimates, which err high.
"""

from __future__ import annotations

from shared import tokens
from shared.contract import ContextParts, ContextReply, GetReply, Message

NEWEST = 2


def assemble(recent: GetReply, parts: ContextParts | None, budget: int, *,
             want_relevant: bool) -> ContextReply:
    left = budget
    window = recent.messages
    newest: list[Message] = []

    def take(m: Message) -> bool:
        nonlocal left
        cost = tokens.message_tokens(m.text)
        if cost > left:
            return False
        left -= cost
        return True

    for m in reversed(window[-NEWEST:]):
        if not take(m):
            break
        newest.append(m)
    full_newest = len(newest) == min(NEWEST, len(window))

    summary = parts.summary if parts is not None else None
    if summary is not None:
        cost = summary.tokens + tokens.MESSAGE_OVERHEAD
        if full_newest and cost <= left:
            left -= cost
        else:
            summary = None

    in_window = {m.seq for m in window}
    relevant = []
    if parts is not None and full_newest:
        relevant = [m for m in parts.relevant if m.seq not in in_window and take(m)]

    older: list[Message] = []
    if full_newest:
        for m in reversed(window[:-NEWEST]):
            if not take(m):
                break
            older.append(m)
    messages = [*reversed(older), *reversed(newest)]

    covers: dict[str, list[int]] = {}
    if messages:
        covers["messages"] = [messages[0].seq, messages[-1].seq]
    if summary is not None:
        covers["summary"] = [summary.from_seq, summary.upto_seq]
    if relevant:
        covers["relevant"] = sorted(m.seq for m in relevant)
    missing = []
    if parts is None or parts.summary is None:
        missing.append("summary")
    if want_relevant and parts is None:
        missing.append("relevant")
    return ContextReply(user_id=recent.user_id, tier=recent.tier, seq=recent.seq, messages=messages,
                        relevant=relevant, summary=summary, tokens=budget - left, budget_tokens=budget,
                        covers=covers, missing=missing)
