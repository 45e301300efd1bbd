"""Realistic text for the benchmark: conversations to store and paraphrased queries.

When the development data set is present (`persuasionforgood/full_dialog.csv`,
real two-party chats; see /work/shared/data/README.md) its dialogues are
replayed as agent-lead conversations: persuader = bot (`assistant`),
persuadee = lead (`user`). The repository must not need that folder, so
without it a seeded generator writes sales-chat sentences instead. Either
way the corpus is deterministic for a given seed.

Queries for `op=search` are paraphrase-ish rewrites of a message the user
really has (synonyms swapped, filler dropped, question framing added), so a
search has a known right answer: the source message's `msg_id`.
"""

from __future__ import annotations

import csv
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIALOGS = Path("/work/shared/data/persuasionforgood/full_dialog.csv")


@dataclass(frozen=True)
class Turn:
    role: str  # "user" (the lead) or "assistant" (the bot)
    text: str


@dataclass(frozen=True)
class Corpus:
    dialogs: list[list[Turn]]
    source: str  # where the text came from, for the report

    def conversation(self, start: int, length: int) -> list[Turn]:
        """`length` turns: dialogue `start`, then the following ones, wrapping around."""
        out: list[Turn] = []
        i = start
        while len(out) < length:
            out.extend(self.dialogs[i % len(self.dialogs)])
            i += 1
        return out[:length]


def load(path: str | os.PathLike | None = None, *, seed: int = 42) -> Corpus:
    """The real dialogues when the file exists, generated ones otherwise."""
    p = Path(path or os.environ.get("TIERMEM_BENCH_DIALOGS") or DEFAULT_DIALOGS)
    if p.is_file():
        dialogs = _read_csv(p)
        if dialogs:
            return Corpus(dialogs, f"{p.name} ({len(dialogs)} real dialogues)")
    return Corpus(_generate(seed), "generated sales-chat sentences (development data not found)")


def _read_csv(path: Path) -> list[list[Turn]]:
    by_dialog: dict[str, list[Turn]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = (row.get("Unit") or "").strip()
            if not text:
                continue
            role = "user" if row.get("B4") == "1" else "assistant"
            by_dialog.setdefault(row.get("B2") or "", []).append(Turn(role, text))
    return [turns for turns in by_dialog.values() if turns]


_PLACES = ["Main St", "Oak Avenue", "the lake house", "Elm Court", "Harbor View", "the downtown loft"]
_THINGS = ["a 3-bed", "a 2-bed condo", "a townhouse", "a starter home", "a place with a yard"]
_LEAD = [
    "Is the {place} listing still available?",
    "We are looking for {thing} near good schools.",
    "Our budget is around {money} but we could stretch a little.",
    "Can we see {place} this {day}?",
    "I need to talk to my partner before we decide.",
    "What are the property taxes on {place}?",
    "We were pre-approved for a {years}-year mortgage last week.",
    "Honestly the commute from {place} worries me.",
    "Does {place} allow pets? We have two dogs.",
    "I'd rather not go above {money}.",
]
_BOT = [
    "Yes, {place} is still on the market as of this morning.",
    "I can set up a showing for {place} on {day}.",
    "Based on a budget of {money}, I have three options for you.",
    "The HOA fee at {place} is about {fee} a month.",
    "Would you like me to send comparable sales near {place}?",
    "Great question; the seller is open to offers on {place}.",
    "I'll check with the listing agent about pets at {place}.",
]
_DAYS = ["Saturday", "Sunday", "Monday evening", "Friday afternoon"]


def _generate(seed: int, dialogs: int = 400) -> list[list[Turn]]:
    rng = random.Random(seed)
    out = []
    for _ in range(dialogs):
        turns = []
        for t in range(rng.randint(12, 28)):
            tpl = rng.choice(_LEAD if t % 2 else _BOT)
            turns.append(Turn("user" if t % 2 else "assistant", tpl.format(
                place=rng.choice(_PLACES), thing=rng.choice(_THINGS), day=rng.choice(_DAYS),
                money=f"${rng.randint(25, 90) * 10}k", fee=f"${rng.randint(15, 60) * 10}",
                years=rng.choice([15, 20, 30]))))
        out.append(turns)
    return out


# --------------------------------------------------------------------------- paraphrases

_SYNONYMS = {
    "donate": "give", "donation": "contribution", "charity": "organization",
    "children": "kids", "kids": "children", "help": "support", "money": "funds",
    "think": "believe", "want": "would like", "good": "nice", "great": "wonderful",
    "today": "now", "really": "truly", "lot": "great deal", "maybe": "perhaps",
    "available": "still for sale", "budget": "price range", "house": "home",
    "listing": "property", "see": "visit", "worries": "concerns", "partner": "spouse",
    "mortgage": "home loan", "pets": "animals", "decide": "make a decision",
}
_FILLER = re.compile(r"\b(um+|uh+|oh|well|so|yes|yeah|haha|ok(ay)?|just|actually|really)\b[,.!]*\s*", re.I)
_FRAMES = ["what did they say about {}", "the part where {}", "{}", "something like: {}",
           "did the lead mention that {}"]


def paraphrase(text: str, rng: random.Random) -> str:
    """A reworded query for `text` (not the same string, same meaning)."""
    words = []
    raw = _FILLER.sub("", text).split()
    for w in raw:
        core = w.strip(".,!?;:").lower()
        if len(raw) > 6 and len(core) <= 3 and rng.random() < 0.3:
            continue  # drop some short words: a query is rarely the sentence verbatim
        words.append(_SYNONYMS.get(core, core) if rng.random() < 0.8 else core)
    body = " ".join(words) or text.lower()
    return rng.choice(_FRAMES).format(body)


def good_query_targets(turns: list[Turn], min_words: int = 6) -> Iterator[int]:
    """Indexes of turns worth searching for (long enough to mean something)."""
    for i, t in enumerate(turns):
        if len(t.text.split()) >= min_words:
            yield i
