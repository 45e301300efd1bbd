"""The semantic cache's guard (services/llm_broker/guard.py): pure unit and
property tests, no I/O. Cosines for the chat pairs come from the default
embedder (wordllama, weights shipped in its wheel), as in production.

The pairs below are hand-written for these tests (the calibration in
bench/guard_calibration.py uses different ones), so the rates asserted here
are a check on text the guard was not tuned on. Measured at the shipped
default threshold: 7 of 22 paraphrases served, 22 of 22 look-alikes refused.
Most refused paraphrases swap a word for a synonym in a short question
("house"/"home", "viewing"/"showing"); wordllama scores those no higher than
a swap of topic ("garage"/"pool"), so the guard refuses both
(bench/results/guard.md).
"""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from services.llm_broker import guard
from services.llm_broker.guard import MAX_THRESHOLD, Verdict, decide, tightened, veto
from shared.embeddings import make_embedder

# Lead messages and their paraphrases (same question, same answer).
PARAPHRASES = [
    ("Is the house still available?", "Is that home still on the market?"),
    ("What's the asking price?", "How much are they asking for it?"),
    ("Can I schedule a viewing this weekend?", "Could I book a showing this weekend?"),
    ("Does the house have a garage?", "Is there a garage with the house?"),
    ("How many bedrooms does it have?", "How many bedrooms are there?"),
    ("Are pets allowed?", "Is it pet friendly?"),
    ("I'm interested in the property on Main St.", "I am interested in the Main St property."),
    ("Can you send me more photos?", "Could you send me some more pictures?"),
    ("What are the HOA fees?", "How much is the HOA fee?"),
    ("Is the price negotiable?", "Is there any room to negotiate on the price?"),
    ("When was the house built?", "What year was the house built?"),
    ("I'd like to see the house tomorrow.", "I would like to view the house tomorrow."),
    ("Do you offer financing?", "Is financing available?"),
    ("What's the square footage?", "How many square feet is it?"),
    ("Is the neighborhood safe?", "Is it a safe neighborhood?"),
    ("Can you call me back later?", "Could you give me a call later?"),
    ("Is parking included?", "Does it come with parking?"),
    ("How close is it to the school?", "How far is it from the school?"),
    ("Are utilities included in the rent?", "Does the rent include utilities?"),
    ("What time works for you?", "When works best for you?"),
    ("Thanks, I'll think about it.", "Thank you, let me think about it."),
    ("Is the 3-bed still available?", "Is the 3-bedroom still available?"),
]

# Look-alikes: most words shared, a different question (a cached answer would be wrong).
LOOKALIKES = [
    ("What is the 30-year mortgage rate?", "What is the 15-year mortgage rate?"),
    ("How do I enable 2FA?", "How do I disable 2FA?"),
    ("Is the 3-bed still available?", "Is the 4-bed still available?"),
    ("Is the house on Main St still available?", "Is the house on Oak Ave still available?"),
    ("Does the house have a garage?", "Does the house have a pool?"),
    ("Is the price negotiable?", "Is the price not negotiable?"),
    ("Can I schedule a viewing on Monday?", "Can I schedule a viewing on Tuesday?"),
    ("I want to buy a house.", "I want to sell a house."),
    ("Are pets allowed?", "Are pets not allowed?"),
    ("What is the price of the condo?", "What is the price of the townhouse?"),
    ("My budget is $400k.", "My budget is $500k."),
    ("Is the house still available?", "Is the house still under contract?"),
    ("Call me in the morning.", "Call me in the evening."),
    ("Can you increase my offer?", "Can you decrease my offer?"),
    ("I'd like to add a bathroom.", "I'd like to remove a bathroom."),
    ("Is the interest rate fixed?", "Is the interest rate variable?"),
    ("Please email me at john@example.com", "Please email me at jane@example.com"),
    ("I can afford three thousand a month.", "I can afford four thousand a month."),
    ("Is the basement finished?", "Is the basement unfinished?"),
    ("Is there a school nearby?", "Is there a hospital nearby?"),
    ("Do you accept my offer?", "Do you reject my offer?"),
    ("The showing is before noon.", "The showing is after noon."),
]


@pytest.fixture(scope="module")
async def chat_cosines():
    """(model_id, paraphrase cosines, look-alike cosines) from the default embedder."""
    embedder = make_embedder("wordllama")
    try:
        out = []
        for pairs in (PARAPHRASES, LOOKALIKES):
            v = await embedder.embed([t for pair in pairs for t in pair])
            out.append(np.einsum("ij,ij->i", v[0::2], v[1::2]).tolist())
        return embedder.model_id, out[0], out[1]
    finally:
        await embedder.aclose()


# ---------------------------------------------------------------- the named hard negatives


@pytest.mark.parametrize(
    ("query", "candidate", "reason"),
    [
        ("What is the 30-year mortgage rate?", "What is the 15-year mortgage rate?", "numbers_differ"),
        ("How do I enable 2FA?", "How do I disable 2FA?", "antonym"),
        ("Is the 3-bed still available?", "Is the 4-bed still available?", "numbers_differ"),
        ("Is the three-bed still available?", "Is the 4-bed still available?", "numbers_differ"),
        ("My budget is $400k.", "My budget is $500,000.", "numbers_differ"),
        ("Is the price negotiable?", "Isn't the price negotiable?", "negation_differs"),
        ("I can come", "I can't come", "negation_differs"),
        ("i dont want it", "i want it", "negation_differs"),
        ("Is the house on Main St still available?", "Is the house on Oak Ave still available?",
         "entities_differ"),
        ("Please email john@example.com", "Please email jane@example.com", "entities_differ"),
        ("Shares rose 5%", "Shares fell 5%", "antonym"),
        ("Can we meet on monday?", "Can we meet on tuesday?", "antonym"),
        ("When is the showing?", "Where is the showing?", "antonym"),
        ("Is the basement finished?", "Is the basement unfinished?", "antonym"),
        ("Is the house on the market?", "Is the house off the market?", "antonym"),
        ("Market update for single-family homes in Oak Park",
         "Market update for condo homes in Oak Park", "antonym"),
        ("Is the condo on Main St still available?", "Is the townhouse on Main St still available?",
         "antonym"),
        ("Can we meet this week?", "Can we meet next week?", "antonym"),
        ("Can you send the details?", "Did you send the details?", "antonym"),
        ("Should I sell now?", "Should I sell later?", "antonym"),
        ("When can I move in?", "When can I move out?", "antonym"),
    ],
)
def test_named_look_alikes_are_refused_whatever_the_cosine(query, candidate, reason):
    for q, c in ((query, candidate), (candidate, query)):
        verdict = decide(q, c, 0.999)
        assert verdict == Verdict(False, reason, 0.0), (q, c)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("My budget is $400k.", "My budget is $400,000."),
        ("My budget is $400k.", "My budget is four hundred thousand dollars."),
        ("Three bedrooms, please.", "3 bedrooms, please."),
        ("Is the 3-bed still available?", "Is the three-bed still available?"),
        ("On the third floor", "On the 3rd floor"),
        ("Rates rose 4.4%", "Rates rose 4.4 percent"),
        ("Twenty-five people", "25 people"),
        ("It costs $1.5m", "It costs 1,500,000 dollars"),
        ("No, it is not sold.", "It is not sold."),
        ("I can't come", "I cannot come"),
        ("I don't want it", "I do not want it"),
        ("Is that one still available?", "Is the house still available?"),  # "one" is a pronoun here
        ("Amrozi accused his brother.", "He said Amrozi accused his brother."),  # sentence-initial name
    ],
)
def test_equal_facts_written_differently_pass_the_vetoes(a, b):
    assert veto(a, b) is None
    assert veto(b, a) is None


# ---------------------------------------------------------------- hand-made chat pairs at the default


async def test_most_look_alikes_are_refused_at_the_default_threshold(chat_cosines):
    space, _, cosines = chat_cosines
    verdicts = [decide(q, c, cos, space=space) for (q, c), cos in zip(LOOKALIKES, cosines)]
    served = [(pair, v) for pair, v in zip(LOOKALIKES, verdicts) if v.serve]
    assert len(served) <= 0.05 * len(LOOKALIKES), served


async def test_paraphrases_are_served_at_the_measured_rate(chat_cosines):
    """Measured 7/22 (32 %) with wordllama at the default threshold, which is
    set for MRPC's look-alikes; the bound leaves room for one pair to move when
    the model is re-fitted. Below it, they are served more often while the
    look-alikes stay refused (the rules refuse those, not the threshold)."""
    space, cosines, _ = chat_cosines
    verdicts = [decide(q, c, cos, space=space) for (q, c), cos in zip(PARAPHRASES, cosines)]
    served = sum(v.serve for v in verdicts)
    assert served >= 6, [(p, v) for p, v in zip(PARAPHRASES, verdicts)]
    looser = sum(decide(q, c, cos, threshold=0.5, space=space).serve for (q, c), cos in zip(PARAPHRASES, cosines))
    assert looser > served
    assert all(v.reason in {"ok", "content_differs", "below_threshold", "antonym"} for v in verdicts)


async def test_the_guard_beats_a_bare_cosine_threshold_on_chat(chat_cosines):
    """At the bare-cosine threshold that matches the guard's false-hit rate on
    MRPC, a bare threshold serves fewer paraphrases and more look-alikes."""
    space, para, looks = chat_cosines
    bare = 0.9385  # bench/results/guard.md: the bare threshold for <= 0.6 % false hits (fit half)
    guard_served = sum(decide(q, c, cos, space=space).serve for (q, c), cos in zip(PARAPHRASES, para))
    guard_wrong = sum(decide(q, c, cos, space=space).serve for (q, c), cos in zip(LOOKALIKES, looks))
    assert guard_served > sum(c >= bare for c in para)
    assert guard_wrong <= sum(c >= bare for c in looks)


def test_a_lower_threshold_serves_more_and_a_higher_one_less():
    q, c, cos = "Does the house have a garage?", "Is there a garage with the house?", 0.95
    score = decide(q, c, cos).score
    assert 0.0 < score < 1.0
    assert decide(q, c, cos, threshold=score).serve
    assert not decide(q, c, cos, threshold=min(1.0, score + 1e-9)).serve
    assert decide(q, c, cos, threshold=score).reason == "ok"
    assert decide(q, c, cos, threshold=1.0).reason == "below_threshold"


@pytest.mark.parametrize(
    ("q", "c"),
    [
        ("Is the kitchen renovated?", "Is the bathroom renovated?"),  # a swap
        ("Is the house available?", "Is the house available for rent?"),  # an addition
    ],
)
def test_a_content_word_difference_needs_the_embedder_to_vouch_for_it(q, c):
    floor = guard._MODELS[guard._DEFAULT_SPACE].substitution_min_cosine
    assert decide(q, c, floor - 0.01).reason == "content_differs"
    assert decide(q, c, floor - 0.01, threshold=0.0).reason == "content_differs"  # not a threshold matter
    assert decide(q, c, floor).reason in {"ok", "below_threshold"}


# ---------------------------------------------------------------- the model and the hook


def test_the_shipped_model_loads_for_the_default_embedder():
    assert guard.MODEL_PATH.exists()
    assert "wordllama-l2-supercat-256" in guard._MODELS
    assert guard._DEFAULT_SPACE == "wordllama-l2-supercat-256"
    assert 0.5 < guard.DEFAULT_THRESHOLD < 1.0
    assert guard.default_threshold("no-such-embedder") == guard.DEFAULT_THRESHOLD
    model = guard._MODELS[guard._DEFAULT_SPACE]
    assert len(model.weights) == len(guard.FEATURES)
    assert 0.0 < model.substitution_min_cosine < 1.0


def test_a_missing_model_file_falls_back_to_a_strict_rule(tmp_path):
    with pytest.warns(RuntimeWarning, match="fallback"):
        models, default = guard._load_models(tmp_path / "missing.json")
    model = models[default]
    assert model.score(guard.features("a b c", "a b c d", 0.94)) < model.threshold
    assert model.score(guard.features("a b c", "a b c d", 0.96)) > model.threshold
    assert model.substitution_min_cosine > 1.0  # every content-word swap is refused


def test_tightened_raises_only_on_evidence_and_never_lowers():
    t = guard.DEFAULT_THRESHOLD
    assert tightened(t, 0, 0) == t
    assert tightened(t, 0, 10_000) == t
    assert tightened(t, 1, 1000) == t  # 0.1 % wrong: within target
    assert tightened(t, 5, 100) > t  # 5 % wrong: clearly above 1 %
    assert tightened(t, 50, 100) > tightened(t, 5, 100)
    assert tightened(t, 100, 100) <= MAX_THRESHOLD
    assert tightened(0.999, 100, 100) == MAX_THRESHOLD
    # a partition whose answers keep coming back wrong converges to the cap
    x = 0.5
    for _ in range(50):
        x = tightened(x, 10, 20)
    assert x == pytest.approx(MAX_THRESHOLD)
    with pytest.raises(ValueError):
        tightened(t, 3, 2)
    with pytest.raises(ValueError):
        tightened(t, -1, 2)


@given(st.floats(0.0, 1.0), st.integers(0, 500), st.integers(0, 500), st.integers(0, 500))
def test_tightened_is_monotone_and_bounded(t, wrong, more_wrong, extra_checks):
    checks = wrong + more_wrong + extra_checks
    lo, hi = tightened(t, wrong, checks), tightened(t, wrong + more_wrong, checks)
    assert min(t, MAX_THRESHOLD) <= lo <= hi <= MAX_THRESHOLD


# ---------------------------------------------------------------- properties

WORDS = st.sampled_from(
    "the house home price is still available can i see it tomorrow garage pool offer "
    "rent monthly fee how much what when does have a with for my your please call me "
    "Main Street condo bedroom bath listing agent".split()
)


@given(st.text(max_size=300))
@example("")
@example("   ")
@example("\x00\ud7ff\U0010ffff")
def test_the_same_text_is_always_served(q):
    assert decide(q, q, 1.0) == Verdict(True, "identical", 1.0)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(WORDS, st.integers(0, 10**7).map(str)), min_size=1, max_size=25),
    st.data(),
)
def test_changing_any_number_makes_it_refuse(parts, data):
    positions = [i for i, p in enumerate(parts) if p.isdigit()]
    assume(positions)
    i = data.draw(st.sampled_from(positions))
    new = data.draw(st.integers(0, 10**7).filter(lambda n: n != int(parts[i])))
    changed = parts.copy()
    changed[i] = str(new)
    q, c = " ".join(parts), " ".join(changed)
    for cosine in (1.0, 0.5):
        assert decide(q, c, cosine) == Verdict(False, "numbers_differ", 0.0)
        assert decide(c, q, cosine) == Verdict(False, "numbers_differ", 0.0)


@settings(max_examples=300)
@given(st.lists(WORDS, min_size=1, max_size=15), st.sampled_from(["not", "never", "no", "n't"]),
       st.data())
def test_adding_a_negation_makes_it_refuse(parts, negator, data):
    i = data.draw(st.integers(0, len(parts)))
    negated = parts[:i] + (["does", "n't"] if negator == "n't" else [negator]) + parts[i:]
    q = " ".join(parts)
    c = " ".join(negated).replace(" n't", "n't")
    assert decide(q, c, 1.0) == Verdict(False, "negation_differs", 0.0)
    assert decide(c, q, 1.0) == Verdict(False, "negation_differs", 0.0)


@settings(max_examples=300)
@given(st.text(max_size=120), st.text(max_size=120), st.floats(-1.0, 1.0))
def test_verdicts_are_symmetric(a, b, cosine):
    assert decide(a, b, cosine) == decide(b, a, cosine)
    assert veto(a, b) == veto(b, a)


@settings(max_examples=300)
@given(
    st.lists(st.one_of(WORDS, st.integers(0, 999).map(str), st.sampled_from(["not", "no"])), max_size=20),
    st.lists(st.one_of(WORDS, st.integers(0, 999).map(str), st.sampled_from(["not", "no"])), max_size=20),
    st.floats(0.0, 1.0),
)
def test_number_and_negation_vetoes_are_symmetric(pa, pb, cosine):
    a, b = " ".join(pa), " ".join(pb)
    ra, rb = decide(a, b, cosine).reason, decide(b, a, cosine).reason
    assert (ra == "numbers_differ") == (rb == "numbers_differ")
    assert (ra == "negation_differs") == (rb == "negation_differs")


@settings(max_examples=500)
@given(
    st.text(max_size=400),
    st.text(max_size=400),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5)),
    st.one_of(st.none(), st.floats(0.0, 1.0)),
)
@example("Ⅻ ½ ２０ ١٢٣ 𝟙𝟚 ⁴ 3.5.6 1,2,3 $ % k m", "12 0.5 20 123 12 4", 0.9, None)
@example("'''’’ n't n’t ‘ — … @ # ## @@", "’s 's can’t", 0.9, None)
@example("İstanbul ǅ ß ﬁ", "istanbul dž ss fi", 0.9, 0.5)
@example("9" * 400, "9" * 399 + "8", 0.9, None)
def test_never_raises_on_any_text(q, c, cosine, threshold):
    v = decide(q, c, cosine, threshold=threshold)
    assert isinstance(v, Verdict) and isinstance(v.serve, bool)
    assert re.fullmatch(r"[a-z_]+", v.reason)
    assert 0.0 <= v.score <= 1.0 and not math.isnan(v.score)
    assert v.serve == (v.reason in {"ok", "identical"})


def test_a_check_is_cheap():
    """Well under a millisecond of CPU per check for chat-length text never seen
    before (~0.1 ms measured), analysis included. This thread's CPU time, not wall
    time or the process's: the box is shared, and in the full suite other threads
    of this process (services run in-process by other tests) burn CPU too."""
    pairs = [(f"Is the {i}-bed on Main St still available for {w}?", f"Is that {i}-bed still available, {w}?")
             for i in range(50) for w in ("me", "us", "them", "my wife")]
    started = time.thread_time()
    for q, c in pairs:
        decide(q, c, 0.9)
    per_check = (time.thread_time() - started) / len(pairs)
    assert per_check < 1e-3, f"{per_check * 1e6:.0f} µs per check"
