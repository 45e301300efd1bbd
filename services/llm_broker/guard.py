"""The semantic cache's guard: may a cached answer to `candidate` be served for `query`?

Why a guard at all: embeddings score look-alikes as near-duplicates ("30-year
vs 15-year mortgage rate" 0.92 with wordllama, "enable vs disable 2FA" 0.80),
and on MRPC a bare cosine threshold that hits 80 % of paraphrases also serves
about half of the look-alike negatives. Serving a cached answer to a question
that only *looks* the same is a wrong answer, which is worse than a miss.

So `decide` is a pure, cheap (tens of microseconds), deterministic check in two
stages:

1. Hard vetoes for differences that change the answer whatever the cosine:
   numbers ("3-bed" vs "4-bed", "$400k" vs "$500k", "three" vs "4"),
   negation ("is" vs "is not"), named entities and ids ("Main St" vs
   "Oak Ave", emails), opposite words ("enable" vs "disable", "rose" vs "fell").
2. A score: a tiny logistic regression (coefficients in `guard_model.json`,
   fitted on half of MRPC by `python -m bench.guard_calibration`) over the
   cosine and lexical-overlap features of the content words. Serve if
   score >= threshold.

The threshold is an argument so that the broker can keep one per cache
partition and raise it when the freshness auditor finds wrong hits there
(`tightened`, in the spirit of vCache's per-entry thresholds).

Cosines from different embedders are on different scales: pass the embedder's
`model_id` as `space` to use the model fitted for it. An embedder without a
fitted model falls back to the default one (fitted for wordllama); expect the
auditor to tighten its partitions.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import lru_cache
from pathlib import Path
from typing import Mapping

__all__ = [
    "Verdict",
    "decide",
    "veto",
    "features",
    "tightened",
    "DEFAULT_THRESHOLD",
    "FEATURES",
    "MAX_THRESHOLD",
]

MODEL_PATH = Path(__file__).with_name("guard_model.json")
MAX_THRESHOLD = 0.999  # `tightened` never goes above this; 1.0 would mean "never serve"


@dataclass(frozen=True, slots=True)
class Verdict:
    """`serve`: may the cached answer be served. `reason`: why (a short stable
    label, fit for a metric label). `score`: the match score in [0, 1] that was
    compared with the threshold (0.0 when a veto refused before scoring)."""

    serve: bool
    reason: str
    score: float


# --------------------------------------------------------------------------
# Word lists. Small and curated on purpose: each entry is a cheap rule that a
# reviewer can check, not a statistical model.

STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been
    being between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into
    is it its itself just let me my myself of once only or other our ours ourselves out own
    same she should so some such than that the their theirs them themselves then there
    these they this those through to too until very was we were what when where which while
    who whom why will with would you your yours yourself yourselves also may might must
    shall s t d ll m re ve us get got please thanks thank hi hello hey ok okay yes yeah
    oh well really said say says like one im youre dont on off up over under again
    percent percentage pct dollar dollars usd bucks
    """.split()
)
# Words that change meaning are checked by the vetoes, whether or not they are stopwords.

NEGATORS = frozenset(
    "not no never none nobody nothing neither nor nowhere without cannot n't".split()
)

# Number words. "one" alone is mostly a pronoun ("that one"), so it only counts
# inside a bigger number ("twenty one", "one hundred") or a compound ("one-bed").
UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
    "seventy": 70, "eighty": 80, "ninety": 90,
}
ORDINALS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
    "eighth": 8, "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12, "thirteenth": 13,
    "fourteenth": 14, "fifteenth": 15, "sixteenth": 16, "seventeenth": 17,
    "eighteenth": 18, "nineteenth": 19, "twentieth": 20, "thirtieth": 30, "fortieth": 40,
    "fiftieth": 50, "hundredth": 100,
}
SCALES = {
    "hundred": 100, "thousand": 1_000, "k": 1_000, "grand": 1_000, "million": 1_000_000,
    "m": 1_000_000, "mn": 1_000_000, "mm": 1_000_000, "mil": 1_000_000,
    "billion": 1_000_000_000, "bn": 1_000_000_000, "b": 1_000_000_000,
    "trillion": 1_000_000_000_000, "tn": 1_000_000_000_000,
}
DIGIT_SUFFIXES = frozenset("st nd rd th s".split())  # 1st, 2nd, 1990s

# Opposites. Each group is two sets of words with opposite meaning; a pair is
# refused when one text uses only one side and the other only the other side.
# Irregular forms are listed; regular ones are found through `stem`.
OPPOSITES: tuple[tuple[str, str], ...] = (
    ("enable activate", "disable deactivate"),
    ("increase raise rise rose risen gain climb jump up higher upward grow grew",
     "decrease lower reduce cut fall fell fallen drop decline down downward shrink shrank"),
    ("buy bought purchase buyer purchaser", "sell sold seller"),
    ("accept approve approval", "reject refuse deny denied decline rejection"),
    ("add", "remove delete"),
    ("on", "off"),
    ("before earlier", "after later"),
    ("more most", "less least fewer fewest"),
    ("open opened", "close closed shut"),
    ("start begin began begun", "stop end finish ended"),
    ("include included inclusive", "exclude excluded exclusive"),
    ("allow permit", "forbid prohibit ban block"),
    ("win won", "lose lost loss"),
    ("profit", "loss"),
    ("high", "low"),
    ("above over", "below under"),
    ("maximum max", "minimum min"),
    ("import", "export"),
    ("lend lent", "borrow"),
    ("deposit", "withdraw withdrawal"),
    ("debit", "credit"),
    ("true", "false"),
    ("pass passed", "fail failed"),
    ("success succeed", "failure fail"),
    ("subscribe", "unsubscribe"),
    ("lock", "unlock"),
    ("connect", "disconnect"),
    ("install", "uninstall"),
    ("upload", "download"),
    ("login signin", "logout signout"),
    ("hire hired", "fire fired"),
    ("love like", "hate dislike"),
    ("agree", "disagree"),
    ("public", "private"),
    ("inside indoor", "outside outdoor"),
    ("north", "south"),
    ("east", "west"),
    ("left", "right"),
    ("hot warm", "cold cool"),
    ("cheap cheaper cheapest", "expensive pricey"),
    ("new newer newest", "old older oldest used"),
    ("big bigger biggest large larger largest", "small smaller smallest tiny"),
    ("long longer", "short shorter"),
    ("fast faster quick quicker", "slow slower"),
    ("easy easier", "hard harder difficult"),
    ("good better best", "bad worse worst"),
    ("positive", "negative"),
    ("male men man", "female women woman"),
    ("morning", "afternoon evening night"),
    ("today tonight", "tomorrow yesterday"),
    ("daily", "weekly monthly yearly annual annually"),
    ("weekly", "monthly yearly annual annually"),
    ("monthly", "yearly annual annually"),
    ("rent renter tenant lease", "buy own owner purchase mortgage"),
    ("arrive arrival", "depart departure leave"),
    ("send sent", "receive received"),
    ("upgrade", "downgrade"),
    ("join", "leave quit"),
    ("enter", "exit"),
    ("show", "hide"),
    ("mute", "unmute"),
    ("encrypt", "decrypt"),
    ("ascending", "descending"),
    ("include", "exclude"),
    ("fixed", "variable adjustable"),
    ("furnished", "unfurnished"),
    ("finished", "unfinished"),
    ("always", "sometimes rarely seldom"),
    ("all every everyone everything", "some someone something"),
    ("first", "last"),
    ("min", "max"),
)
NEGATING_PREFIXES = ("un", "dis", "non", "in", "im", "il", "ir")

# Lower-cased words that are capitalised without naming anything.
NOT_ENTITIES = frozenset(
    "i i'm i'd i'll i've mr mrs ms dr st mt jr sr ok okay hi hello hey thanks dear sir "
    "madam yes no".split()
)
ABBREVIATIONS = frozenset(
    "mr mrs ms dr st mt jr sr vs etc inc corp co ltd no u.s u.k e.g i.e a.m p.m ave "
    "blvd rd jan feb mar apr jun jul aug sep sept oct nov dec".split()
)


# --------------------------------------------------------------------------
# Text analysis (cached: the query is checked against several candidates).

_CONTRACTIONS = (
    (re.compile(r"\bcan['’]t\b", re.I), "can not"),
    (re.compile(r"\bwon['’]t\b", re.I), "will not"),
    (re.compile(r"\bshan['’]t\b", re.I), "shall not"),
    (re.compile(r"\bain['’]t\b", re.I), "is not"),
    (re.compile(r"\bcannot\b", re.I), "can not"),
    (re.compile(r"n['’]t\b", re.I), " not"),
)
_RAW = re.compile(r"\S+")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_URL = re.compile(r"(?:https?://|www\.)\S+", re.I)
_SUB = re.compile(r"\d[\d,]*(?:\.\d+)?|[^\W\d_]+(?:['’][^\W\d_]+)*")
_NUMBER_UNIT = re.compile(r"^[$€£]?\d[\d,]*(?:\.\d+)?(?:[-/]?[^\W\d_]+)?%?$")
_PIECES = re.compile(r"[^\w@]+")
_OPENERS = "\"'“‘([{«"
_CLOSERS = "\"'”’)]}»,;:"


@dataclass(frozen=True, slots=True)
class _Text:
    words: frozenset[str]        # every lower-cased word (stems too), for presence checks
    content: frozenset[str]      # stems of content words (no stopwords, no numbers)
    numbers: frozenset[str]      # canonical numeric values
    negations: int
    entities: frozenset[str]     # lower-cased proper nouns, emails, urls, ids
    seq: tuple[str, ...]         # the lower-cased words in order
    bigrams: frozenset[tuple[str, str]]
    trigrams: frozenset[str]     # character 3-grams, for spelling variants


def _canon_number(value: float) -> str:
    if not math.isfinite(value):
        return "inf"
    text = f"{round(value, 6):.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _parse_digits(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


@lru_cache(maxsize=16384)
def stem(word: str) -> str:
    """A crude suffix stripper: both sides go through it, so it only has to be
    consistent ("enabled", "enables", "enabling", "enable" -> "enabl")."""
    w = word.lower().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    w = w.strip("'")
    if len(w) <= 3:
        return w
    if w.endswith("ies") and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith("sses"):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    for suffix in ("ingly", "edly", "ing", "ed", "ly"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            w = w[: -len(suffix)]
            if len(w) > 3 and w[-1] == w[-2] and w[-1] not in "lsz":
                w = w[:-1]  # stopped -> stop
            break
    if w.endswith("e") and len(w) > 3:
        w = w[:-1]
    if w.endswith("y") and len(w) > 3:
        w = w[:-1] + "i"
    return w


def _opposite_groups() -> tuple[tuple[frozenset[str], frozenset[str]], ...]:
    groups = []
    for left, right in OPPOSITES:
        a = frozenset(stem(w) for w in left.split()) | frozenset(left.split())
        b = frozenset(stem(w) for w in right.split()) | frozenset(right.split())
        groups.append((a - b, b - a))
    return tuple(groups)


_GROUPS = _opposite_groups()
_STOP_STEMS = frozenset(stem(w) for w in STOPWORDS) | STOPWORDS


@lru_cache(maxsize=8192)
def _analyse(text: str) -> _Text:
    text = unicodedata.normalize("NFKC", text)
    for pattern, repl in _CONTRACTIONS:
        text = pattern.sub(repl, text)

    words: list[str] = []        # lower-cased sub-tokens in order
    attached: list[bool] = []    # sub-token glued to the previous one ("400k", "3-bed")
    entities: set[str] = set()
    initial = True               # next raw token starts a sentence
    negations = 0

    for raw in _RAW.findall(text):
        core = raw.strip(_OPENERS + _CLOSERS + ".!?")
        starts_sentence = initial or (raw[:1] in _OPENERS)
        ends = raw.rstrip(_CLOSERS + _OPENERS)
        low_core = core.lower()
        initial = ends.endswith(("!", "?")) or (
            ends.endswith(".") and low_core not in ABBREVIATIONS and not re.fullmatch(r"(?:\w\.)+\w?", core)
        ) or raw.endswith(("\n",))
        if not core:
            continue
        if _EMAIL.fullmatch(core) or _URL.fullmatch(core) or core[0] in "@#":
            entities.add(low_core)
            subs = _SUB.findall(low_core)
            words.extend(subs)
            attached.extend([False] + [True] * (len(subs) - 1))
            continue
        has_digit = any(c.isdigit() for c in core)
        has_alpha = any(c.isalpha() for c in core)
        if has_digit and has_alpha and not _NUMBER_UNIT.match(core):
            entities.add(low_core)       # an id: "lead-42", "A1B2", "MP3"
        elif (
            not starts_sentence
            and core[0].isupper()
            and low_core not in NOT_ENTITIES
            and not low_core.startswith("i'")
        ):
            name = low_core[:-2] if low_core.endswith(("'s", "’s")) else low_core
            entities.add(name)
        subs = _SUB.findall(raw)
        if subs and subs[0].lower() == "no" and raw.endswith(",") and starts_sentence:
            negations -= 1               # "No, it is not sold" says the same as "It is not sold"
        for i, sub in enumerate(subs):
            words.append(sub.lower())
            attached.append(i > 0)

    numbers = _numbers(words, attached)
    negations += sum(1 for w in words if w in NEGATORS)
    content = frozenset(
        s for w in words
        if not w[0].isdigit() and w not in NEGATORS and w not in UNITS and w not in SCALES
        and w not in ORDINALS and w not in DIGIT_SUFFIXES
        and (s := stem(w)) not in _STOP_STEMS and w not in STOPWORDS and len(w) > 1
    )
    all_words = frozenset(words) | frozenset(stem(w) for w in words)
    flat = " ".join(words)
    return _Text(all_words, content, frozenset(numbers), negations,
                 frozenset(e for e in entities if e), tuple(words),
                 frozenset(zip(words, words[1:])),
                 frozenset(flat[i:i + 3] for i in range(len(flat) - 2)))


def _numbers(words: list[str], attached: list[bool]) -> set[str]:
    """Every number in the text as a canonical value: "3", "three", "3rd",
    "third" -> 3; "$400k", "400 thousand", "400,000" -> 400000; "4.4%" -> 4.4."""
    found: set[str] = set()
    i, n = 0, len(words)
    while i < n:
        w = words[i]
        value: float | None = None
        if w[0].isdigit():
            value = _parse_digits(w)
            i += 1
            if i < n and attached[i] and words[i] in DIGIT_SUFFIXES:
                i += 1
        elif w in ORDINALS:
            value, i = float(ORDINALS[w]), i + 1
        elif w in UNITS or (w in SCALES and len(w) > 2 and w != "grand"):
            value, i = _number_words(words, attached, i)
            if value is None:
                continue
        else:
            i += 1
            continue
        while value is not None and i < n and words[i] in SCALES and (attached[i] or len(words[i]) > 2):
            value *= SCALES[words[i]]
            i += 1
        if value is not None:
            found.add(_canon_number(value))
    return found


def _number_words(words: list[str], attached: list[bool], i: int) -> tuple[float | None, int]:
    """Read "twenty five", "one hundred and five", "three thousand" from i."""
    start, total, current, count = i, 0.0, 0.0, 0
    n = len(words)
    while i < n:
        w = words[i]
        if w in UNITS:
            current += UNITS[w]
        elif w in ORDINALS:
            current += ORDINALS[w]
        elif w == "hundred":
            current = (current or 1) * 100
        elif w in SCALES and len(w) > 2 and w != "grand":
            total += (current or 1) * SCALES[w]
            current = 0
        elif w == "and" and count and i + 1 < n and words[i + 1] in UNITS:
            pass
        else:
            break
        count += 1
        i += 1
    if count == 1 and words[start] == "one" and not (
        (start > 0 and attached[start]) or (start + 1 < n and attached[start + 1])
    ):
        return None, i                   # a lone "one" is a pronoun, not a number
    return total + current, i


# --------------------------------------------------------------------------
# Vetoes.


def _opposite(a: _Text, b: _Text) -> bool:
    for pos, neg in _GROUPS:
        a_pos, a_neg = bool(a.words & pos), bool(a.words & neg)
        b_pos, b_neg = bool(b.words & pos), bool(b.words & neg)
        if (a_pos and not a_neg and b_neg and not b_pos) or (a_neg and not a_pos and b_pos and not b_neg):
            return True
    only_a, only_b = a.content - b.content, b.content - a.content
    for x in only_a:
        for y in only_b:
            long, short = (x, y) if len(x) > len(y) else (y, x)
            if len(short) >= 3 and long.endswith(short) and long[: len(long) - len(short)] in NEGATING_PREFIXES:
                return True              # "finished" / "unfinished", "like" / "dislike"
    return False


def _unmatched_entities(a: _Text, b: _Text) -> int:
    """How many entities of `a` the text `b` does not mention. An entity counts
    as mentioned when each of its pieces appears in `b` in any case and
    position ("DVD-CCA" ~ "DVD CCA", "U.S." ~ "US"), or shares its first five
    letters with a word of `b` ("Iraq" ~ "Iraqi", "Mexico" ~ "Mexican")."""
    missing = 0
    for entity in a.entities:
        for piece in _PIECES.split(entity.replace(".", "")):
            if not piece or piece in b.words or stem(piece) in b.words:
                continue
            if len(piece) >= 5 and any(w.startswith(piece[:5]) for w in b.words):
                continue
            missing += 1
            break
    return missing


def _veto(a: _Text, b: _Text) -> str | None:
    if a.numbers != b.numbers:
        return "numbers_differ"
    if a.negations != b.negations:
        return "negation_differs"
    if _opposite(a, b):
        return "antonym"
    if _unmatched_entities(a, b) and _unmatched_entities(b, a):
        return "entities_differ"         # "Main St" vs "Oak Ave"; one-sided extras only lower the score
    return None


def veto(query: str, candidate: str) -> str | None:
    """The hard veto's reason, or None: the checks that no cosine can overrule."""
    return _veto(_analyse(query), _analyse(candidate))


# --------------------------------------------------------------------------
# Score.

FEATURES = (
    "cosine",            # embedding cosine of the two texts
    "jaccard",           # |A & B| / |A | B| over content-word stems
    "unmatched_max",     # log1p(content words of the wordier side missing from the other)
    "unmatched_min",     # the same for the other side
    "length_ratio",      # shorter / longer, in words
    "bigram_jaccard",    # word pairs in common: word order and phrasing
    "trigram_jaccard",   # character 3-grams in common: spelling variants, inflections
    "sequence_ratio",    # difflib ratio over the word sequences: shared runs of words
    "extra_entities",    # log1p(entities only one side names), e.g. "he said" vs "De Sole said"
)


def _jaccard(x: frozenset, y: frozenset) -> float:
    union = len(x | y)
    return len(x & y) / union if union else 1.0


def _features(a: _Text, b: _Text, cosine: float) -> tuple[float, ...]:
    ua, ub = len(a.content - b.content), len(b.content - a.content)
    n_a, n_b = len(a.seq), len(b.seq)
    return (
        cosine,
        _jaccard(a.content, b.content),
        math.log1p(max(ua, ub)),
        math.log1p(min(ua, ub)),
        min(n_a, n_b) / max(n_a, n_b, 1),
        _jaccard(a.bigrams, b.bigrams),
        _jaccard(a.trigrams, b.trigrams),
        SequenceMatcher(None, a.seq, b.seq, autojunk=False).ratio() if n_a + n_b else 1.0,
        math.log1p(_unmatched_entities(a, b) + _unmatched_entities(b, a)),
    )


def features(query: str, candidate: str, cosine: float) -> tuple[float, ...]:
    """The score's inputs, in `FEATURES` order (the calibration fits on these)."""
    return _features(_analyse(query), _analyse(candidate), float(cosine))


@dataclass(frozen=True, slots=True)
class _Model:
    weights: tuple[float, ...]
    bias: float
    threshold: float

    def score(self, x: tuple[float, ...]) -> float:
        z = self.bias + sum(w * v for w, v in zip(self.weights, x))
        if z >= 0:
            return 1.0 / (1.0 + math.exp(-z))
        e = math.exp(z)
        return e / (1.0 + e)


def _load_models(path: Path = MODEL_PATH) -> tuple[dict[str, _Model], str]:
    """The fitted models by embedder model_id, and the default's id.

    Without the file (not fitted yet) the score is a steep function of the
    bare cosine alone that passes 0.5 at cosine 0.95: strict, so the guard
    still refuses rather than guesses."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        weights = tuple(40.0 if f == "cosine" else 0.0 for f in FEATURES)
        return {"fallback": _Model(weights, -38.0, 0.5)}, "fallback"
    models = {}
    for space, m in raw["models"].items():
        if list(m["features"]) != list(FEATURES):
            raise ValueError(f"{path}: model {space!r} was fitted on other features; "
                             "re-run python -m bench.guard_calibration")
        models[space] = _Model(tuple(float(w) for w in m["weights"]), float(m["bias"]),
                               float(m["threshold"]))
    return models, raw["default"]


_MODELS, _DEFAULT_SPACE = _load_models()
DEFAULT_THRESHOLD: float = _MODELS[_DEFAULT_SPACE].threshold


def reload_models(path: Path = MODEL_PATH) -> None:
    """Load the models again (after the calibration rewrote the file)."""
    global _MODELS, _DEFAULT_SPACE, DEFAULT_THRESHOLD
    _MODELS, _DEFAULT_SPACE = _load_models(path)
    DEFAULT_THRESHOLD = _MODELS[_DEFAULT_SPACE].threshold


def default_threshold(space: str | None = None) -> float:
    """The fitted threshold for embedder `space` (the default model's if unknown)."""
    return _model(space).threshold


def _model(space: str | None) -> _Model:
    return _MODELS.get(space or _DEFAULT_SPACE) or _MODELS[_DEFAULT_SPACE]


def decide(query: str, candidate: str, cosine: float, *, threshold: float | None = None,
           space: str | None = None) -> Verdict:
    """May the answer cached for `candidate` be served for `query`?

    `cosine`: their embedding similarity. `threshold`: the partition's current
    threshold on the score (None: the fitted default for `space`). `space`:
    the embedder's model_id (None: the default model). Never raises on text.
    """
    try:
        a, b = _analyse(query or ""), _analyse(candidate or "")
    except Exception:  # noqa: BLE001 - a guard that crashes would fail open or drop the request
        return Verdict(False, "unparsable", 0.0)
    if query == candidate:
        return Verdict(True, "identical", 1.0)
    reason = _veto(a, b)
    if reason is not None:
        return Verdict(False, reason, 0.0)
    model = _model(space)
    c = float(cosine)
    if not math.isfinite(c):
        return Verdict(False, "below_threshold", 0.0)
    score = model.score(_features(a, b, c))
    limit = model.threshold if threshold is None else threshold
    if score >= limit:
        return Verdict(True, "ok", score)
    return Verdict(False, "below_threshold", score)


def tightened(threshold: float, wrong_hits: int, checks: int, *, target: float = 0.01,
              confidence_z: float = 1.2816) -> float:
    """The partition's next threshold after the auditor checked `checks` of its
    semantic hits and found `wrong_hits` wrong.

    Raises the threshold only when the wrong-hit rate is above `target` with
    some confidence (the Wilson lower bound at z=1.28, i.e. one-sided 90 %,
    exceeds it), and then shrinks the margin (1 - threshold) by target/bound,
    at most 4x per call: a few wrong hits in few checks raise it a little,
    many raise it a lot. Never lowers it (loosening is a separate, deliberate
    decision) and never goes above MAX_THRESHOLD.
    """
    if checks < 0 or wrong_hits < 0 or wrong_hits > checks:
        raise ValueError(f"need 0 <= wrong_hits <= checks, got {wrong_hits}/{checks}")
    t = min(max(float(threshold), 0.0), MAX_THRESHOLD)
    if checks == 0 or wrong_hits == 0:
        return t
    p, n, z = wrong_hits / checks, checks, confidence_z
    lower = (p + z * z / (2 * n) - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    if lower <= target:
        return t
    factor = max(target / lower, 0.25)
    return min(1.0 - (1.0 - t) * factor, MAX_THRESHOLD)


def model_info() -> Mapping[str, float | str]:
    """What the broker may log at start-up: the default space and threshold."""
    return {"space": _DEFAULT_SPACE, "threshold": DEFAULT_THRESHOLD}
