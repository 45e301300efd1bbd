"""Free-text answers: facts from the request's content, wording from its exact bytes. No I/O.

Why this shape: the broker's semantic cache serves one request's answer to
another, and the auditor re-asks to check it. That check only means something
when the simulator, like a model reading its prompt, gives questions that
differ in a fact answers that differ in that fact, and gives paraphrases
answers that agree in every fact but not in wording. So an answer is two
independent functions of the request:

- **Facts** follow from what the request states, never from lists of any
  application's words. The *subject* of the question is its figures (tokens
  with a digit: `2-bath`, `$450k`, `1998`), its names (capitalised words that
  are not just the start of a sentence, joined when adjacent: `Stone Bridge`,
  `14th Street`; a sentence-initial word counts when the request writes it
  capitalised mid-sentence elsewhere, or heads it before a colon), its *options* (single words the
  request lists after a colon, "kinds: a, b, c", anywhere in the system
  prompt or the conversation, and both words of an "a or b" in the question)
  and whether it is negated. Weekdays and clock times are when, not what:
  a showing slot, not the subject. A question without a subject takes the
  subject of the latest line of the user's earlier turns that has one (what
  "how much is it?" refers to). Measures the question asks for (price, days on market,
  rates, fees...: a general vocabulary of real-estate and loan questions)
  get a figure: the one the request states on a line that names the subject
  and states that measure (a listing sheet, a CRM record), else one drawn from a hash of the subject
  and the measure (a world in which each subject has one true figure). A
  question that names no measure and has no frame of its own (not a
  showing, not "is it available"), in a request whose system prompt tells
  the model what to give ("give: the price, the taxes, the fees"), gets those.
- **Wording** is drawn from a hash of the exact request (model, system,
  every turn): openers, sentence frames, the order of the facts, closers.
  Two paraphrases have different bytes, so they get (almost always)
  different wording for the same facts. The *same* request gets the same
  text, like a model at temperature 0 (what the demo's bots send): chosen so
  runs replay exactly and a streamed reply equals the non-streamed one. A
  hit on the same bytes is an exact hit; what an audit has to judge is a
  semantic hit, served for other bytes, and there the wording differs.

What it does not do: words outside the subject are wording, so "lofts in
Brookfield" and "homes in Brookfield" share the figures unless the request lists
lofts among its options; the answer still names what was asked.
"""

from __future__ import annotations

import calendar
import hashlib
import re
from dataclasses import dataclass

_STOPWORDS = frozenset("""
a about above after again all also am an and any are as at be been being both but by can could
did do does doing dont for from had has get got have having hello hey hi how i id if im in into is it its
ive just know let lets like many me more much my no not now of ok okay on or our out please so some still
than thank thanks that thats the their them then there these they this those to too up us very
want was we were what whats when where which who why will with would yes you your youre
hows wheres whos theres heres should right
""".split())
_NEGATION = re.compile(r"\b(?:not|no|never|without|isnt|arent|doesnt|dont|cant|wont|n't)\b")
_WEEKDAYS = tuple(d.lower() for d in calendar.day_name)
_CLOCK = re.compile(r"^\d{1,2}(?::\d\d)?\s?[ap]m$", re.IGNORECASE)


def _h(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest(), "big")


def _tokens(text: str) -> list[str]:
    return [t.strip(".,!?;:()[]{}\"'`") for t in text.split()]


def _plain(word: str) -> str:
    return re.sub(r"[^a-z0-9$-]", "", word.lower().replace("\u2019", "'").replace("'", ""))


def _stem(word: str) -> str:
    """Singular-ish form, so 'homes' matches an option 'home'."""
    w = _plain(word)
    if len(w) <= 3 or not w.endswith("s") or w.endswith("ss"):
        return w
    if w.endswith("ies"):
        return w[:-3] + "y"
    if re.search(r"(?:x|ch|sh|ss)es$", w):
        return w[:-2]
    return w[:-1]


# --------------------------------------------------------------------------- the subject


def options_in(text: str) -> set[str]:
    """Single words the text lists as alternatives after a colon ("kinds: a, b, c")."""
    found: set[str] = set()
    for clause in re.split(r"[.;!?\n()]", text):
        if ":" not in clause:
            continue
        items = [p.strip() for p in re.split(r",|\bor\b|\band\b", clause.rsplit(":", 1)[1])]
        single = [i for i in items if re.fullmatch(r"[A-Za-z][\w-]*", i)]
        if len(items) >= 3 and len(single) >= 2:
            found.update(_stem(i) for i in single if _plain(i) not in _STOPWORDS)
    return found


def alternatives_in(question: str) -> set[str]:
    """'a cottage or a loft': both words the question weighs against each other."""
    pairs = re.findall(r"\b([a-z][\w-]*) or (?:an? |the )?([a-z][\w-]*)", question.lower())
    return {_stem(w) for pair in pairs for w in pair if w not in _STOPWORDS}


def capitalised_mid_sentence(text: str) -> set[str]:
    out: set[str] = set()
    start = True
    for raw in text.split():
        word = raw.strip(".,!?;:()[]{}\"'`")
        if word[:1].isupper() and not start:
            out.add(word)
        start = raw[-1:] in ".!?:" or raw.endswith("\n")
    return out


@dataclass(frozen=True)
class Subject:
    figures: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    negated: bool = False

    @property
    def key(self) -> str:
        """Order- and case-free: two questions about the same things share it."""
        parts = sorted({*(f.lower() for f in self.figures), *(n.lower() for n in self.names), *self.options})
        return "|".join(parts) + ("|not" if self.negated else "")

    def __bool__(self) -> bool:
        return bool(self.figures or self.names or self.options)

    def words(self) -> list[str]:
        return [*self.options, *self.figures, *self.names]

    def phrase(self) -> str:
        """'the 2-bath loft in Brookfield'-like wording of the subject, in a fixed order."""
        things = " ".join([*self.figures, *self.options])
        names = " and ".join(self.names)
        if things and names:
            return f"{things} in {names}"
        return things or names


def subject_of(question: str, context: str) -> Subject:
    """The facts a question is about; `context` (all of the request) tells names and options apart."""
    options = options_in(context) | options_in(question) | alternatives_in(question)
    known_names = capitalised_mid_sentence(context)
    for head in re.findall(r"(?:^|[.!?]\s+)((?:[A-Z][\w'-]*\s+)*[A-Z][\w'-]*):", question):  # "Stone Bridge: ..."
        known_names.update(head.split())
    figures: list[str] = []
    names: list[str] = []
    opts: list[str] = []
    run: list[str] = []
    start = True

    def close_run() -> None:
        if run:
            name = " ".join(run)
            if name not in names:
                names.append(name)
            run.clear()

    for raw in question.split():
        word = raw.strip(".,!?;:()[]{}\"'`").removesuffix("'s").removesuffix("\u2019s")
        plain = _plain(word)
        if plain.rstrip("s") in _WEEKDAYS or _CLOCK.match(word):  # when, not what: a slot
            close_run()
            start = raw[-1:] in ".!?"
            continue
        ordinal = bool(re.fullmatch(r"\d+(?:st|nd|rd|th)", plain))  # "14th Street" is one name
        is_name = ordinal or (word[:1].isupper() and plain not in _STOPWORDS and not word.isupper()
                              and (not start or word in known_names)
                   and not re.search(r"\d", word))
        if is_name:
            run.append(word)
        else:
            close_run()
            if re.search(r"\d", word):
                if word not in figures:
                    figures.append(word)
            elif plain and plain not in _STOPWORDS and _stem(word) in options and _stem(word) not in opts:
                opts.append(_stem(word))
        if raw[-1:] in ",.!?;:":
            close_run()
        start = raw[-1:] in ".!?"
    close_run()
    negated = bool(_NEGATION.search(question.lower().replace("\u2019", "'").replace("n't", " n't")))
    return Subject(tuple(figures), tuple(names), tuple(opts), negated)


def topic_words(question: str, context: str = "", limit: int = 8) -> list[str]:
    """The question's own content words, in its order: what the answer restates.

    A word capitalised only because it opens a sentence ("Price of ...?") is
    restated in lower case, as a writer would mid-sentence; a name keeps its
    capitals (one the request writes capitalised mid-sentence, or a head
    before a colon, as `subject_of` tells them apart).
    """
    known = capitalised_mid_sentence(f"{context}\n{question}")
    for head in re.findall(r"(?:^|[.!?]\s+)((?:[A-Z][\w'-]*\s+)*[A-Z][\w'-]*):", question):
        known.update(head.split())
    out: list[str] = []
    start = True
    for raw in question.split():
        word = raw.strip(".,!?;:()[]{}\"'`")
        if start and word[:1].isupper() and not word.isupper() and word not in known:
            word = word.lower()
        start = raw[-1:] in ".!?" or raw.endswith("\n")
        if word and _plain(word) not in _STOPWORDS and word.lower() not in (w.lower() for w in out):
            out.append(word)
        if len(out) == limit:
            break
    return out


# --------------------------------------------------------------------------- measures


@dataclass(frozen=True)
class Measure:
    name: str
    asks: re.Pattern  # words that ask for it
    states: re.Pattern  # how a request states its value on a line
    low: int
    high: int
    step: int
    unit: str  # format with {v}


def _m(name, asks, states, low, high, step, unit) -> Measure:
    return Measure(name, re.compile(asks, re.IGNORECASE), re.compile(states, re.IGNORECASE), low, high, step, unit)


# General questions about a home and its loan; the value is stated on a line of the request or drawn.
MEASURES = (
    _m("price", r"\b(?:prices?|priced|cost|costs|asking|how much|worth|value|list price)\b",
       r"\$\s?\d[\d,]*(?:\.\d+)?\s?[kKmM]?\b", 150_000, 1_200_000, 5_000, "${v:,}"),
    _m("days on market", r"\b(?:days on (?:the )?market|how (?:fast|quickly|long)|selling|sell)\b",
       r"\b\d+ days(?= on (?:the )?market\b)", 5, 90, 1, "{v} days"),
    _m("inventory trend", r"\b(?:inventory|supply|trend|going (?:up|down)|rising|falling)\b",
       r"(?<=inventory )(?:rising|falling|flat)\b", 0, 2, 1, "{v}"),
    _m("interest rate", r"\b(?:rates?|interest|apr)\b", r"\b\d+(?:\.\d+)?\s?%", 550, 775, 5, "{v}% APR"),
    _m("monthly payment", r"\b(?:monthly|payments?)\b", r"\$\s?\d[\d,]*\s?(?:a|per|/)\s?mo", 1_200, 6_000, 10,
       "${v:,} a month"),
    _m("down payment", r"\bdown ?payment\b", r"\b\d+\s?% down\b", 3, 20, 1, "{v}% down"),
    _m("fees", r"\b(?:hoa|fees?|dues)\b", r"\$\s?\d[\d,]*\s?(?:a|per|/)\s?month", 50, 600, 5, "${v:,} a month in fees"),
    _m("taxes", r"\btax(?:es)?\b", r"\$\s?\d[\d,]*\s?(?:a|per|/)\s?year", 1_500, 15_000, 50, "${v:,} a year in taxes"),
    _m("size", r"\b(?:sq ?ft|square feet|size|how big|lot)\b", r"\b\d[\d,]*\s?sq ?ft\b", 500, 4_500, 10,
       "{v:,} sq ft"),
)
_TRENDS = ("rising", "flat", "falling")


def measures_asked(question: str, system: str) -> list[Measure]:
    """What the question asks for; failing that, what the system prompt tells the model to give."""
    asked = [m for m in MEASURES if m.asks.search(question)]
    if asked:
        return asked
    # "give ...: the price, the taxes, the fees": an instruction with a
    # list of what to cover, not a data line (those hold digits) nor a rule about quoting.
    listed = " ".join(c for c in re.split(r"[.;\n]", system) if c.count(",") >= 2 and not re.search(r"\d", c)
                      and _GIVE.search(c))
    return [m for m in MEASURES if m.asks.search(listed)]


_GIVE = re.compile(r"\b(?:give|cover|include|report|summari[sz]e)\b", re.IGNORECASE)


def evidence(subject: Subject, lines: list[str], states: re.Pattern | None = None) -> str:
    """The line of the request that names most of the subject (a listing, a CRM record) and, with
    `states`, states that measure; '' when none names enough of it. Ties: the later line."""
    words = [w.lower() for w in subject.words()]
    if not words:
        return ""
    best, score = "", 0
    for line in lines:
        low = line.lower()
        hits = sum(1 for w in words if w in low)
        if hits and hits >= score and (states is None or states.search(line)):
            best, score = line, hits
    return best if score >= max(1, len(words) // 2 + (len(words) > 1)) else ""


def figure(measure: Measure, subject: Subject, lines: list[str]) -> str:
    line = evidence(subject, lines, measure.states)
    stated = measure.states.search(line) if line else None
    if stated:
        return stated.group(0)
    span = (measure.high - measure.low) // measure.step + 1
    v = measure.low + _h(subject.key, measure.name) % span * measure.step
    if measure.name == "inventory trend":
        return measure.unit.format(v=_TRENDS[v])
    if measure.name == "interest rate":
        return measure.unit.format(v=f"{v / 100:.2f}")
    return measure.unit.format(v=v)


# --------------------------------------------------------------------------- wording


class Wording:
    """Choices drawn from the exact request's hash: same request, same text."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.n = 0

    def pick(self, options: tuple[str, ...]) -> str:
        self.n += 1
        return options[_h(str(self.seed), str(self.n)) % len(options)]

    def order(self, items: list[str]) -> list[str]:
        self.n += 1
        return sorted(items, key=lambda s: _h(str(self.seed), str(self.n), s))


_OPENERS = ("Thanks for reaching out.", "Great question.", "Happy to help.", "Thanks for your message.",
            "Good to hear from you.", "Sure thing.", "")
_CLOSERS = ("Anything else I can help with?", "Let me know what works for you.",
            "Would you like me to send more details?", "Talk soon.", "Just reply here with any questions.", "")
_FIGURE_FRAMES = ("{what}: {fig}.", "For {what}, {fig}.", "{fig} is {what}.", "On {what}, it comes to {fig}.")
_ABOUT = ("You asked about {topic}.", "About {topic}:", "Re {topic}:", "On your question about {topic}:")


def _named(subject: Subject, fallback: str) -> str:
    return subject.phrase() or fallback


def compose(question: str, system: str, earlier_user: list[str], others: list[str], intent: str,
            seed: int) -> str:
    """A reply to `question`. `earlier_user`: the user's earlier turns (what an unspecific question
    refers to); `others`: every other text of the request (where names, options and figures are stated)."""
    context = "\n".join([system, *others])
    subject = next((s for ln in reversed(question.splitlines()) if (s := subject_of(ln, context + "\n" + question))),
                   Subject())
    if not subject:  # "how much is it?": what the latest line of the user's that names something is about
        lines = [ln for text in earlier_user for ln in text.splitlines() if ln.strip()]
        subject = next((s for s in map(lambda ln: subject_of(ln, context), reversed(lines)) if s), subject)
    w = Wording(seed)
    lines = context.splitlines()
    line = evidence(subject, lines)
    what = _named(subject, "it")
    topic = " ".join(topic_words(question, context)) or "your question"

    if intent == "not_interested":
        return w.pick(("Understood, I will not reach out again.", "Got it, I won't contact you again.",
                       "Understood: no more messages from us.")) + " " + w.pick(
            ("Thanks for letting me know.", "All the best with your search.", "Take care."))

    facts: list[str] = []
    if intent == "availability":
        status = re.search(r"\b(under contract|pending|sold|off the market)\b", line, re.IGNORECASE)
        if status:
            facts.append(w.pick(("{what} is {s} now.", "Right now {what} is {s}.")).format(
                what=what, s=status.group(1).lower()))
        else:
            facts.append(w.pick(("Yes, {what} is still available.", "{what} is still available.",
                                 "Good news: {what} is still available.")).format(what=what))
    elif intent == "schedule_viewing":
        words = _tokens(question)
        day = next((t for t in words if t.lower().rstrip("s") in _WEEKDAYS), "")
        at = next((t for t in words if _CLOCK.match(t)), "")
        if day or at:
            slot = f"on {day} at {at}" if day and at else f"on {day}" if day else f"at {at}"
            facts.append(w.pick(("I can set up a showing of {what} {slot}.", "A showing of {what} {slot} works.",
                                 "Let's plan to see {what} {slot}.")).format(what=what, slot=slot))
        else:
            facts.append(w.pick(("Happy to show you {what}: which day and time suit you?",
                                 "What day and time would work for you to see {what}?")).format(what=what))
    for measure in measures_asked(question, system if intent == "other" else ""):
        fig = figure(measure, subject, lines)
        facts.append(w.pick(_FIGURE_FRAMES).format(
            what=f"the {measure.name} for {what}" if subject else f"the {measure.name}", fig=fig))
    if not facts:
        facts.append(w.pick(("Let me check on {what} and get back to you shortly.",
                             "I'll find out about {what} and follow up soon.")).format(
            what=what if subject else "that"))
    parts = [w.pick(_OPENERS), w.pick(_ABOUT).format(topic=topic), *w.order(facts), w.pick(_CLOSERS)]
    return _sentence_case(" ".join(p for p in parts if p))


def _sentence_case(text: str) -> str:
    return re.sub(r"(^|[.?!] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
