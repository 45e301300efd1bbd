"""The semantic cache's guard: may the answer cached for `candidate` be served for `query`?

Why a guard at all: embeddings score look-alikes as near-duplicates ("30-year
vs 15-year" differs in one token), and on public paraphrase sets a bare
cosine threshold that serves 80 % of the paraphrases also serves a third or
more of the negatives (bench/results/guard.md). Serving the answer to a
question that only *looks* the same is a wrong answer, which costs more than
a miss.

`decide` is pure, deterministic and cheap: ~0.1-0.3 ms for two unseen texts,
less when both were seen before (the text analysis is cached, since one
query meets several candidates). In order:

0. The same words in the same order (case, spacing, punctuation aside):
   served, score 1.0, whatever the cosine (embedders are case-sensitive).
1. Hard vetoes, general rules of English that change the answer whatever
   the cosine: `numbers_differ` ("3" vs "4", "$40k" vs "$50,000", "third"
   vs "4th"), `negation_differs` ("is" vs "is not"), `antonym` (both texts
   pick different options of a closed class of general English: weekdays,
   months, seasons, compass directions, interrogatives; or a word and its
   negated form, "locked" / "unlocked"), `entities_differ` (each text names
   something the other does not: two capitalised names, two emails).
   No list here was written from the demo, from test pairs or from the
   benchmark sets (issue 12).
2. `content_differs`: a content word of one text is missing from the other
   and the cosine is below the embedder's `substitution_min_cosine` (the
   floor is chosen on public data, fit halves only).
3. The verifier: a logistic regression over the cosine, general lexical
   features and one word-alignment feature (`align_min`: the worst-aligned
   content word's best cosine in the other text, from wordllama's static
   word vectors, `wordvec`) (`FEATURES`), fitted with sign constraints on the fit halves of
   public paraphrase/STS sets (MRPC train, STS headlines, SICK) by
   `python -m bench.guard_calibration` and shipped in `guard_model.json`.
   Serve if score >= threshold (`below_threshold` otherwise).

The threshold is an argument so that the broker can keep one per cache
partition and move it with the freshness auditor's verdicts there
(`bound.py`, in the spirit of vCache's per-prompt thresholds).

Cosines of different embedders live on different scales: pass the embedder's
`model_id` as `space` to use the model fitted for it. An embedder without a
fitted model falls back to the default model (fitted for wordllama); expect
the auditor to tighten its partitions.

Known blind spots (cheap features cannot see them; the auditor has to):
swapped roles with the same words ("did the buyer call the seller" vs "did
the seller call the buyer", only `order_differs` hints at it), co-hyponyms
that static word vectors place close together ("car"/"truck" align nearly as
well as "car"/"automobile": no offline lexicon on PyPI ships WordNet's data),
and the crude stemmer's merges.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
import warnings
from dataclasses import dataclass
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal, InvalidOperation
from difflib import SequenceMatcher
from functools import lru_cache
from pathlib import Path

from . import wordvec

__all__ = [
    "Verdict",
    "decide",
    "veto",
    "features",
    "default_threshold",
    "reload_models",
    "DEFAULT_THRESHOLD",
    "FEATURES",
    "MAX_THRESHOLD",
]

MODEL_PATH = Path(__file__).with_name("guard_model.json")
FALLBACK = "fallback"  # the model used when guard_model.json is missing or stale
MAX_THRESHOLD = 0.999  # the top of the bound's grid; a threshold of 1.0 would mean "never serve"


@dataclass(frozen=True, slots=True)
class Verdict:
    """`serve`: may the cached answer be served. `reason`: why, a short stable
    label fit for a metric label (`ok`, `identical`, a veto's name, or
    `below_threshold`). `score`: the match score in [0, 1] compared with the
    threshold; 0.0 when a rule refused before scoring."""

    serve: bool
    reason: str
    score: float


# --------------------------------------------------------------------------
# Word lists: small and curated on purpose. Each entry is a rule a reviewer
# can check, not a statistical model.

STOPWORDS = frozenset(
    """a about above again against am an and any are as at be because been being between both
    but by can could did do does doing during each for from further had has have having he
    her here hers herself him himself his how i if in into is it its itself just let me my
    myself of once only or other our ours ourselves out own same she should so such than that
    the their theirs them themselves then there these they those through to too until very
    was we were what when where which while who whom why will with would you your yours
    yourself yourselves also may might must shall s t d ll m re ve us get got please thanks
    thank hi hello hey ok okay yes yeah oh well really said say says like one im youre ive
    id on off up down over under again this some all any more most much many
    percent percentage pct dollar dollars usd bucks
    """.split()
)
# Stopwords carry no content for the overlap features; the words among them that
# change meaning (on/off, this/next, more/less, when/where ...) are checked by
# the vetoes, which look at every word.

NEGATORS = frozenset(
    """not no never none nobody nothing neither nor nowhere without cannot n't
    dont doesnt didnt cant wont isnt arent wasnt werent shouldnt wouldnt couldnt havent hasnt
    hadnt aint""".split()
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
SCALE_WORDS = frozenset(w for w in SCALES if len(w) > 2 and w != "grand")  # usable without digits
DIGIT_SUFFIXES = frozenset("st nd rd th s".split())  # 1st, 2nd, 1990s

# Closed sets of mutually exclusive options, "|" between options, spaces
# between the words of one option. A pair is refused when both texts pick
# from a set and their picks do not overlap ("Monday" vs "Tuesday").
# Only closed classes of general English are listed: calendar words,
# compass directions and the interrogatives. No domain words and nothing
# written from the demo's vocabulary or from test or benchmark pairs (issue
# 12): which open-class words differ in meaning is the learned score's job,
# fitted on public data (bench/guard_calibration.py). No package on PyPI
# ships WordNet's antonym data for offline use (`wn` and nltk download it at
# run time), so no lexicon-derived sets either.
OPTIONS: tuple[str, ...] = (
    "monday | tuesday | wednesday | thursday | friday | saturday | sunday",
    "january | february | march | april | june | july | august | september | october"
    " | november | december",
    "today tonight | tomorrow | yesterday",
    "spring | summer | autumn | winter",
    "north northern | south southern | east eastern | west western",
    "when | where | who whom | why",
)
NOT_INFLECTIONS = frozenset("news wests easts".split())
NEGATING_PREFIXES = ("un", "dis", "non", "in", "im", "il", "ir")

# Lower-cased words that are capitalised without naming anything.
NOT_ENTITIES = frozenset(
    "i mr mrs ms dr st mt jr sr ok okay hi hello hey thanks dear sir madam yes no".split()
)
ABBREVIATIONS = frozenset(
    "mr mrs ms dr st mt jr sr vs etc inc corp co ltd no ave blvd rd jan feb mar apr jun jul "
    "aug sep sept oct nov dec".split()
)
CLITICS = frozenset("s m re ll ve d".split())  # "house's", "I'm", "we're" ...


# --------------------------------------------------------------------------
# Text analysis, cached: the query is checked against several candidates.

_CONTRACTIONS = (
    (re.compile(r"\bcan['’]t\b", re.I), "can not"),
    (re.compile(r"\bwon['’]t\b", re.I), "will not"),
    (re.compile(r"\bshan['’]t\b", re.I), "shall not"),
    (re.compile(r"\bain['’]t\b", re.I), "is not"),
    (re.compile(r"\bcannot\b", re.I), "can not"),
    (re.compile(r"n['’]t\b", re.I), " not"),
)
_URL = re.compile(r"(?:https?://|www\.)\S", re.I)
_HAS_DIGIT = re.compile(r"\d")
_HAS_ALPHA = re.compile(r"[^\W\d_]")
_SUB = re.compile(r"\d[\d,]*(?:\.\d+)?|[^\W\d_]+(?:['’][^\W\d_]+)*")
_NUMBER_UNIT = re.compile(r"[$€£]?\d[\d,]*(?:\.\d+)?(?:[-/]?[^\W\d_]+)?%?")
_INITIALS = re.compile(r"(?:\w\.)+\w?")
_PIECES = re.compile(r"[^\w@]+")
_OPENERS = "\"'“‘([{«"
_CLOSERS = "\"'”’)]}»,;:"
_STRIP = _OPENERS + _CLOSERS + ".!?"
_CLOSERS_OPENERS = _CLOSERS + _OPENERS


@dataclass(frozen=True, slots=True)
class _Text:
    words: frozenset[str]                    # every lower-cased word and its stem
    content: frozenset[str]                  # stems of content words
    numbers: tuple[str, ...]                 # canonical numeric values, sorted, repeats kept
    negations: int
    entities: frozenset[str]                 # lower-cased names, emails, urls, ids
    options: tuple[tuple[int, frozenset[int]], ...]  # (option set, options picked)
    seq: tuple[str, ...]                     # the lower-cased words in order
    trigrams: frozenset[str]                 # character 3-grams: spelling variants
    vocab: tuple[str, ...]                   # the distinct lower-cased words, in order
    content_at: tuple[int, ...]              # positions in `vocab` of the content words


@lru_cache(maxsize=16384)
def stem(word: str) -> str:
    """A crude suffix stripper. Both texts go through it, so it only has to be
    consistent ("enabled", "enables", "enabling", "enable" -> "enabl"). It
    leaves "-ly" alone: "yearly" must not become "year", nor "early" "ear"."""
    w = word.lower().replace("’", "'").strip("'")
    if len(w) <= 3:
        return w
    if w.endswith("ies") and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith("sses"):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    for suffix in ("ing", "ed"):  # not "ly": "yearly" is not "year", "early" not "ear"
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


def _inflections(word: str) -> set[str]:
    """The regular forms of a listed word: enable -> enables, enabled, enabling;
    stop -> stopped, stopping. Matching surface forms (not stems) keeps
    "news" from meaning "new". Two-letter words ("on", "up") get none: "ones"
    is not "on"."""
    if len(word) <= 2:
        return {word}
    forms = {word, word + "s", word + "es", word + "ed", word + "ing", word + "d"}
    if word.endswith("e"):
        forms |= {word[:-1] + "ing", word[:-1] + "ed"}
    if word.endswith("y") and len(word) > 3:
        forms |= {word[:-1] + "ies", word[:-1] + "ied"}
    if len(word) >= 3 and word[-1] not in "aeiouwxy" and word[-2] in "aeiou" and word[-3] not in "aeiou":
        forms |= {word + word[-1] + "ed", word + word[-1] + "ing"}
    return forms - NOT_INFLECTIONS


def _option_index() -> dict[str, tuple[tuple[int, int], ...]]:
    """word form -> ((option set, option), ...)."""
    index: dict[str, set[tuple[int, int]]] = {}
    for g, line in enumerate(OPTIONS):
        for o, option in enumerate(line.split("|")):
            for w in option.split():
                for form in _inflections(w):
                    index.setdefault(form, set()).add((g, o))
    return {k: tuple(sorted(v)) for k, v in index.items()}


_OPTION_INDEX = _option_index()
_STOP_STEMS = frozenset(stem(w) for w in STOPWORDS) | STOPWORDS


def _words(text: str) -> tuple[list[str], list[bool], set[str], int]:
    """Lower-cased words, whether each is glued to the previous one ("400k",
    "3-bed"), the entities, and the negation count."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    if "'" in text or "’" in text or "nnot" in text.lower():
        for pattern, repl in _CONTRACTIONS:
            text = pattern.sub(repl, text)
    words: list[str] = []
    attached: list[bool] = []
    entities: set[str] = set()
    negations = 0
    initial = True  # the next token starts a sentence: its capital says nothing
    for raw in text.split():
        core = raw.strip(_STRIP)
        if not core:
            initial = initial or raw[-1] in "!?."
            continue
        starts_sentence = initial or raw[0] in _OPENERS
        last = raw.rstrip(_CLOSERS_OPENERS)[-1:]
        low = core.lower()
        initial = last in "!?" or (
            last == "." and low not in ABBREVIATIONS and not _INITIALS.fullmatch(core)
        )
        if "@" in core or core[0] == "#" or _URL.match(core):
            entities.add(low)  # email, handle, url, "#123"
        elif _HAS_DIGIT.search(core) and _HAS_ALPHA.search(core) and not _NUMBER_UNIT.fullmatch(core):
            entities.add(low)  # an id: "lead-42", "A1B2", "MP3"
        elif not starts_sentence and core[0].isupper():
            name = _strip_clitic(low)
            if name not in NOT_ENTITIES:
                entities.add(name)
        subs = _SUB.findall(low)
        if not subs:
            continue
        if starts_sentence and subs[0] == "no" and raw[-1] == ",":
            negations -= 1  # "No, it is not sold" says what "It is not sold" says
        words.append(_strip_clitic(subs[0]))
        attached.append(False)
        for sub in subs[1:]:
            words.append(_strip_clitic(sub))
            attached.append(True)
    negations += sum(1 for w in words if w in NEGATORS)
    return words, attached, entities, negations


def _strip_clitic(word: str) -> str:
    if "'" not in word and "’" not in word:
        return word
    base, apostrophe, rest = word.replace("’", "'").partition("'")
    if not apostrophe:
        return word
    return base if rest in CLITICS else base + rest  # "o'neill" -> "oneill"


@lru_cache(maxsize=8192)
def _analyse(text: str) -> _Text:
    words, attached, entities, negations = _words(text)
    stems = [stem(w) for w in words]
    content = frozenset(s for w, s in zip(words, stems) if _is_content(w, s))
    vocab = tuple(dict.fromkeys(words))
    picked: dict[int, set[int]] = {}
    for key in set(words):
        for g, o in _OPTION_INDEX.get(key, ()):
            picked.setdefault(g, set()).add(o)
    flat = " ".join(words)
    trigrams = {flat[i:i + 3] for i in range(len(flat) - 2)}
    return _Text(
        words=frozenset(words) | frozenset(stems),
        content=content,
        numbers=tuple(sorted(_numbers(words, attached))),
        negations=negations,
        entities=frozenset(e for e in entities if e),
        options=tuple((g, frozenset(o)) for g, o in sorted(picked.items())),
        seq=tuple(words),
        trigrams=frozenset(trigrams),
        vocab=vocab,
        content_at=tuple(i for i, w in enumerate(vocab) if _is_content(w, stem(w))),
    )


def _is_content(word: str, stemmed: str) -> bool:
    return (len(word) > 1 and not word[0].isdigit() and word not in STOPWORDS
            and stemmed not in _STOP_STEMS and word not in NEGATORS and word not in UNITS
            and word not in SCALES and word not in ORDINALS and word not in DIGIT_SUFFIXES)


def _numbers(words: list[str], attached: list[bool]) -> list[str]:
    """Every number in the text as a canonical value: "3", "three", "3rd",
    "third" -> 3; "$400k", "400 thousand", "400,000" -> 400000; "4.4%" -> 4.4."""
    found: list[str] = []
    i, n = 0, len(words)
    while i < n:
        w = words[i]
        value: Decimal | None
        if w[0].isdigit():
            value = _parse_digits(w)
            i += 1
            if i < n and attached[i] and words[i] in DIGIT_SUFFIXES:
                i += 1
        elif w in ORDINALS:
            value, i = Decimal(ORDINALS[w]), i + 1
        elif w in UNITS or w in SCALE_WORDS:
            value, i = _number_words(words, attached, i)
            if value is None:
                continue
        else:
            i += 1
            continue
        while value is not None and i < n and words[i] in SCALES and (attached[i] or words[i] in SCALE_WORDS):
            value = _EXACT.multiply(value, Decimal(SCALES[words[i]]))
            i += 1
        if value is not None:
            found.append(_canon_number(value))
    return found


def _number_words(words: list[str], attached: list[bool], i: int) -> tuple[Decimal | None, int]:
    """Read "twenty five", "one hundred and five", "three thousand" from i."""
    start, total, current, count, n = i, 0, 0, 0, len(words)
    while i < n:
        w = words[i]
        if w in UNITS:
            current += UNITS[w]
        elif w in ORDINALS:
            current += ORDINALS[w]
        elif w == "hundred":
            current = (current or 1) * 100
        elif w in SCALE_WORDS:
            total += (current or 1) * SCALES[w]
            current = 0
        elif not (w == "and" and count and i + 1 < n and words[i + 1] in UNITS):
            break
        count += 1
        i += 1
    if count == 1 and words[start] == "one" and not (
        attached[start] or (start + 1 < n and attached[start + 1])
    ):
        return None, i  # a lone "one" is a pronoun, not a number
    return Decimal(total + current), i


_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)  # scaling never rounds


def _parse_digits(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def _canon_number(value: Decimal) -> str:
    """Exact, so that "1.50" equals "1.5" and two 400-digit numbers still differ."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


# --------------------------------------------------------------------------
# Rules.


def _different_options(a: _Text, b: _Text) -> bool:
    """Both texts pick from one closed set, and not the same option; or a word
    and its negated form ("finished" / "unfinished", "like" / "dislike")."""
    theirs = dict(b.options)
    for g, mine in a.options:
        other = theirs.get(g)
        if other is not None and mine.isdisjoint(other):
            return True
    for x in a.content - b.content:
        for y in b.content - a.content:
            long, short = (x, y) if len(x) > len(y) else (y, x)
            if len(short) >= 3 and long.endswith(short) and long[: len(long) - len(short)] in NEGATING_PREFIXES:
                return True
    return False


def _unmatched_entities(a: _Text, b: _Text) -> int:
    """How many entities of `a` the text `b` does not mention. An entity is
    mentioned when each of its pieces appears in `b` in any case and position
    ("DVD-CCA" ~ "DVD CCA", "U.S." ~ "US"), or shares its first five letters
    with a word of `b` ("Iraq" ~ "Iraqi", "Mexico" ~ "Mexican")."""
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
    if _different_options(a, b):
        return "antonym"
    if _unmatched_entities(a, b) and _unmatched_entities(b, a):
        return "entities_differ"  # a name only one side has is an unmatched content word
    return None


def veto(query: str, candidate: str) -> str | None:
    """The hard veto's reason, or None: the rules no cosine can overrule."""
    return _veto(_analyse(query or ""), _analyse(candidate or ""))


# --------------------------------------------------------------------------
# Score.

FEATURES = (
    "cosine",            # embedding cosine of the two texts
    "unmatched_max",     # log1p(content words of one text that the other lacks), the larger side
    "unmatched_min",     # the same, the smaller side
    "length_ratio",      # (shorter + 4) / (longer + 4) in words: one text says more
    "trigram_jaccard",   # character 3-grams in common: spelling variants, inflections
    "sequence_ratio",    # difflib ratio over the word sequences: shared runs of words
    "content_jaccard",   # content words in common over content words in either
    "order_differs",     # 1 when both have the same content words in another order
    "align_min",         # the worst-aligned content word: its best word-vector cosine in the other text
)
# Every feature is general (no word list); the weights are fitted on the fit
# halves of public paraphrase/STS sets (bench/guard_calibration.py), with a
# sign constraint each (more similarity never lowers the score).


def _features(a: _Text, b: _Text, cosine: float) -> tuple[float, ...]:
    ua, ub = len(a.content - b.content), len(b.content - a.content)
    n_a, n_b = len(a.seq), len(b.seq)  # difflib's ratio depends on argument order: sort them
    union = len(a.trigrams | b.trigrams)
    content_union = len(a.content | b.content)
    order = 0.0
    if a.content == b.content and a.content:
        order = float(_content_order(a) != _content_order(b))
    return (
        cosine,
        math.log1p(max(ua, ub)),
        math.log1p(min(ua, ub)),
        (min(n_a, n_b) + 4) / (max(n_a, n_b) + 4),
        len(a.trigrams & b.trigrams) / union if union else 1.0,
        SequenceMatcher(None, *sorted((a.seq, b.seq)), autojunk=False).ratio() if n_a + n_b else 1.0,
        len(a.content & b.content) / content_union if content_union else 1.0,
        order,
        _align_min(a, b),
    )


def _align_min(a: _Text, b: _Text) -> float:
    """Each content word of either text against its best match among all the
    words of the other (cosine of static wordllama word vectors, `wordvec`);
    the lowest of these. A substitution ("teachers" / "priests") stays low
    however long the sentences around it are, which the sentence cosine does
    not; a synonym or an inflection scores near 1. 1.0 when neither text has
    a content word, 0.0 when only one has words. Without the token table:
    1.0 for a word the other text contains (or its stem), else 0.0."""
    if not a.content_at and not b.content_at:
        return 1.0
    if not a.vocab or not b.vocab:
        return 0.0
    va, vb = wordvec.vectors(a.vocab), wordvec.vectors(b.vocab)
    if va is None or vb is None:
        return float(all(w in b.words or stem(w) in b.words for w in (a.vocab[i] for i in a.content_at))
                     and all(w in a.words or stem(w) in a.words for w in (b.vocab[i] for i in b.content_at)))
    sims = va @ vb.T
    worst = 1.0
    if a.content_at:
        worst = min(worst, float(sims[list(a.content_at)].max(axis=1).min()))
    if b.content_at:
        worst = min(worst, float(sims[:, list(b.content_at)].max(axis=0).min()))
    return min(max(worst, 0.0), 1.0)


def _content_order(t: _Text) -> tuple[str, ...]:
    """The content stems in the order of their first use: "flights from Paris
    to Rome" and "flights from Rome to Paris" share words, not order."""
    seen: dict[str, None] = {}
    for w in t.seq:
        s = stem(w)
        if s in t.content:
            seen.setdefault(s, None)
    return tuple(seen)


def features(query: str, candidate: str, cosine: float) -> tuple[float, ...]:
    """The score's inputs, in `FEATURES` order (the calibration fits on these)."""
    return _features(_analyse(query or ""), _analyse(candidate or ""), float(cosine))


def same_words(query: str, candidate: str) -> bool:
    """The same words in the same order: only case, spacing or punctuation differ."""
    return _analyse(query or "").seq == _analyse(candidate or "").seq


def content_differs(query: str, candidate: str) -> bool:
    """Does either text have a content word the other lacks?"""
    return _analyse(query or "").content != _analyse(candidate or "").content


@dataclass(frozen=True, slots=True)
class _Model:
    weights: tuple[float, ...]
    bias: float
    threshold: float
    substitution_min_cosine: float

    def score(self, x: tuple[float, ...]) -> float:
        z = self.bias + sum(w * v for w, v in zip(self.weights, x))
        if z >= 0:
            return 1.0 / (1.0 + math.exp(-z))
        e = math.exp(z)
        return e / (1.0 + e)


def _load_models(path: Path = MODEL_PATH) -> tuple[dict[str, _Model], str]:
    """The fitted models by embedder model_id, and the default's id.

    Without a usable file (not fitted yet, or fitted on other features) the
    score is a steep function of the cosine alone that crosses 0.5 at cosine
    0.95 and every content-word difference is refused: strict, so the guard still
    refuses rather than guesses, and says so with a warning."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        models = {}
        for space, m in raw["models"].items():
            if list(m["features"]) != list(FEATURES):
                raise ValueError(f"model {space!r} was fitted on other features")
            models[space] = _Model(tuple(float(w) for w in m["weights"]), float(m["bias"]),
                                   float(m["threshold"]), float(m["substitution_min_cosine"]))
        return models, raw["default"] if raw["default"] in models else next(iter(models))
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as exc:
        warnings.warn(f"guard: no usable model in {path} ({exc}); using the strict cosine-only "
                      "fallback; run python -m bench.guard_calibration", RuntimeWarning, stacklevel=2)
        weights = tuple(40.0 if f == "cosine" else 0.0 for f in FEATURES)
        return {FALLBACK: _Model(weights, -38.0, 0.5, 1.01)}, FALLBACK


_MODELS, _DEFAULT_SPACE = _load_models()
DEFAULT_THRESHOLD: float = _MODELS[_DEFAULT_SPACE].threshold


def reload_models(path: Path = MODEL_PATH) -> None:
    """Load the models again (after the calibration rewrote the file)."""
    global _MODELS, _DEFAULT_SPACE, DEFAULT_THRESHOLD
    _MODELS, _DEFAULT_SPACE = _load_models(path)
    DEFAULT_THRESHOLD = _MODELS[_DEFAULT_SPACE].threshold


def _model(space: str | None) -> _Model:
    return _MODELS.get(space or _DEFAULT_SPACE) or _MODELS[_DEFAULT_SPACE]


def default_threshold(space: str | None = None) -> float:
    """The fitted threshold for embedder `space` (the default model's if unknown)."""
    return _model(space).threshold


def decide(query: str, candidate: str, cosine: float, *, threshold: float | None = None,
           space: str | None = None) -> Verdict:
    """May the answer cached for `candidate` be served for `query`?

    `cosine`: their embedding similarity. `threshold`: the partition's current
    threshold on the score (None: the fitted default for `space`). `space`:
    the embedder's model_id (None or unknown: the default model). Symmetric in
    its two texts; never raises on any text.
    """
    if query == candidate:
        return Verdict(True, "identical", 1.0)  # an exact repeat: nothing to check
    try:
        a, b = _analyse(query or ""), _analyse(candidate or "")
    except Exception:  # noqa: BLE001 - a guard that crashes would drop the request: refuse instead
        return Verdict(False, "unparsable", 0.0)
    if a.seq == b.seq:
        return Verdict(True, "ok", 1.0)  # the same words: only case, spacing or punctuation differ
    reason = _veto(a, b)
    if reason is not None:
        return Verdict(False, reason, 0.0)
    try:
        c = float(cosine)
    except (TypeError, ValueError):
        c = math.nan
    if not math.isfinite(c):
        return Verdict(False, "below_threshold", 0.0)
    model = _model(space)
    if c < model.substitution_min_cosine and a.content != b.content:
        return Verdict(False, "content_differs", 0.0)
    score = model.score(_features(a, b, c))
    limit = model.threshold if threshold is None else threshold
    if score >= limit:
        return Verdict(True, "ok", score)
    return Verdict(False, "below_threshold", score)
