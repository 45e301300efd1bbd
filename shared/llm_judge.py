"""The LLM entailment judge: do two answers to one request say the same thing?

Two users of it, so it lives here: the freshness-auditor judges a cached
answer against a fresh one with it (`services/freshness_auditor`, which
re-exports these names), and the reference agent worker judges a reply
written from the assembled context against the same reply written from the
whole transcript (its quality check). One judge, one prompt, one rule.
"""

from __future__ import annotations

import re

from shared.contract import CacheOptions, ChatMessage, CompleteRequest

JUDGE_TASK = "audit_judge"
JUDGE_SYSTEM = (
    "You check whether two answers to the same request say the same thing. "
    "Statement A entails statement B when everything B claims follows from A. "
    "Reply with exactly two words, each yes or no: first whether A entails B, "
    "then whether B entails A. No other text.")
JUDGE_MAX_TOKENS = 8
_YES_NO = re.compile(r"\b(yes|no)\b", re.I)


def judge_request(served: str, fresh: str, *, model: str, user_id: str) -> CompleteRequest:
    """The entailment question as one model call (both directions in one reply)."""
    prompt = f"A: {served}\n\nB: {fresh}"
    return CompleteRequest(task=JUDGE_TASK, user_id=user_id, model=model, system=JUDGE_SYSTEM,
                           messages=[ChatMessage(role="user", content=prompt)],
                           max_tokens=JUDGE_MAX_TOKENS,
                           temperature=0.0, cache=CacheOptions(mode="off"))


def prompt_tokens(served: str, fresh: str) -> int:
    """A generous estimate of a judge call's prompt tokens (~4 characters a token), to book it."""
    return (len(JUDGE_SYSTEM) + len(served) + len(fresh)) // 3 + 16


def parse_judgement(text: str) -> tuple[float, float] | None:
    """(A entails B, B entails A) as 1.0/0.0; None unless the reply starts with two yes/no words."""
    words = _YES_NO.findall(text or "")
    if len(words) < 2 or _YES_NO.sub("", text).strip(" \t\n.,;:-") != "":
        return None
    return tuple(1.0 if w.lower() == "yes" else 0.0 for w in words[:2])  # type: ignore[return-value]


class LLMJudge:
    """Asks the model through `upstream` (an `Upstream`), the audited request's model;
    the caller books the call's cost against the audit budget."""

    name = "llm"
    threshold = 0.5  # support is 1.0 (yes) or 0.0 (no)

    def __init__(self, upstream) -> None:
        self.upstream = upstream

    async def ask(self, served: str, fresh: str, *, model: str):
        """(support or None if the reply was not two yes/no words, the call's usage)."""
        answer = await self.upstream.complete(
            judge_request(served, fresh, model=model, user_id="freshness-auditor"))
        return parse_judgement(answer.text), answer.usage

    async def aclose(self) -> None:
        return None


_space = re.compile(r"\s+")


def normalise_label(text: str) -> str:
    return _space.sub(" ", text).strip().strip(".!").casefold()


def answers_agree(served: str, fresh: str, *, label: bool,
                  support: tuple[float, float] | None = None,
                  threshold: float = 0.5) -> tuple[bool, str]:
    """Do two answers to one request say the same? Returns (agree, reason).

    `support`: for free text, (how much of the fresh answer the served one
    entails, how much of the served answer the fresh one entails), from an
    `entailment` judge; both must reach `threshold`. A wrong hit either
    misses something the right answer says or says something it does not.
    """
    if normalise_label(served) == normalise_label(fresh):
        return True, "same"
    if label:
        return False, "label_differs"
    if support is None:
        raise ValueError("free-text answers need the judge's support in both directions")
    fresh_in_served, served_in_fresh = support
    if fresh_in_served < threshold:
        return False, "misses_fresh_content"
    if served_in_fresh < threshold:
        return False, "adds_content"
    return True, "entails_both_ways"
