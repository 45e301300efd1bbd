"""`python -m bench.dialogue_qa GIT_DIR`: derive the L3 search dev set from public persona chats.

Run once by hand against a snapshot of github.com/google-research-datasets/
Synthetic-Persona-Chat (its validation and test CSVs, CC BY 4.0); writes
bench/data/dialogue_qa/ so that `python -m bench.search_evidence` reproduces
without the source. See bench/data/dialogue_qa/README.md for what it is.

The rules below were fixed before any search method was run on the result:

* **Histories.** Conversations are ordered by sha1 of their id and cut into
  histories of `SESSIONS` conversations each: one tiermem user, one
  conversation per session (a day apart). "User 1" is the lead (role
  `user`), "User 2" the bot (role `assistant`); the other sessions are the
  haystack, as in LongMemEval, which pads evidence sessions with unrelated
  chats.
* **Questions.** One per persona fact of User 1 (the profile the chat was
  generated from): the fact in second person ("I" -> "you", "my" -> "your",
  ...) with its last content word, the answer, replaced by "what", e.g.
  "I have a turtle named timothy." -> "you have a turtle named what?".
  Facts with fewer than two other content words are skipped (too vague).
* **Evidence.** The User 1 turns of that conversation that hold the answer:
  they contain the answer's stem and at least half of the fact's other
  content stems. A fact that no turn states this way gets no question (the
  chat did not bring it up, or only in words this rule cannot see: the set
  leans towards lexically visible evidence, which favours full text; said in
  the README).
* **Split.** By history: sha1("dialogue-qa-split:" + user) first hex digit
  < 8 is `dev` (tune here), else `report` (state results here).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "dialogue_qa"
SOURCES = {"valid": "data/Synthetic-Persona-Chat_valid.csv", "test": "data/Synthetic-Persona-Chat_test.csv"}
SESSIONS = 30  # conversations per history (~700 turns, ~1,400 with the tests' padding)

STOP = frozenset("""a an the of to in on at for from by with and or but so if as is are was were be been
being am i me my mine myself you your yours we our us they them their he she his her it its this that
these those there here what which who whom how when where why do does did doing done have has had having
not no nor too very can could will would shall should may might must just also really all any some more
most much many lot lots like love one get got go going im i'm ive i've dont don't""".split())
_WORD = re.compile(r"[a-z0-9']+")
_SWAP = {"i": "you", "i'm": "you're", "im": "you're", "i've": "you've", "i'd": "you'd", "i'll": "you'll",
         "me": "you", "my": "your", "mine": "yours", "myself": "yourself", "am": "are", "was": "were"}


def stem(word: str) -> str:
    """A crude suffix strip, enough to match "dogs"/"dog", "dancing"/"dance"."""
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def content(text: str) -> list[str]:
    """Content words of `text`, lowercased, in order."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOP and len(w) > 1]


def question(fact: str) -> tuple[str, str] | None:
    """(question, answer word) for a persona fact, or None when too vague."""
    words = _WORD.findall(fact.lower())
    keys = [i for i, w in enumerate(words) if w not in STOP and len(w) > 1]
    if len(keys) < 3:
        return None
    last = keys[-1]
    out = [_SWAP.get(w, w) for w in words[:last]] + ["what"]
    return " ".join(out) + "?", words[last]


def evidence(fact: str, answer: str, turns: list[tuple[str, str]]) -> list[int]:
    """Indexes of the User 1 turns that state `fact` (see module doc)."""
    want = {stem(w) for w in content(fact)} - {stem(answer)}
    hits = []
    for i, (speaker, text) in enumerate(turns):
        if speaker != "User 1":
            continue
        have = {stem(w) for w in content(text)}
        if stem(answer) in have and len(want & have) * 2 >= len(want):
            hits.append(i)
    return hits


def parse(conversation: str) -> list[tuple[str, str]]:
    turns: list[tuple[str, str]] = []
    for line in conversation.splitlines():
        line = line.strip()
        m = re.match(r"^(User [12]):\s*(.*)$", line)
        if m:
            turns.append((m.group(1), m.group(2).strip()))
        elif line and turns:
            turns[-1] = (turns[-1][0], turns[-1][1] + " " + line)
    return [t for t in turns if t[1]]


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def build(git_dir: str) -> tuple[list[dict], list[dict]]:
    convs = []
    for split, path in SOURCES.items():
        raw = subprocess.run(["git", "--git-dir", git_dir, "show", f"HEAD:{path}"],
                             check=True, capture_output=True, text=True).stdout
        for i, row in enumerate(csv.DictReader(io.StringIO(raw))):
            turns = parse(row["Best Generated Conversation"])
            if len(turns) < 4:
                continue
            convs.append({"id": f"{split}-{i}",
                          "persona": [p.strip() for p in row["user 1 personas"].splitlines() if p.strip()],
                          "turns": turns})
    convs.sort(key=lambda c: _sha(c["id"]))
    histories, questions = [], []
    for h in range(len(convs) // SESSIONS):
        user = f"spc-{h:03d}"
        split = "dev" if int(_sha("dialogue-qa-split:" + user)[0], 16) < 8 else "report"
        sessions = convs[h * SESSIONS : (h + 1) * SESSIONS]
        histories.append({"user": user, "split": split,
                          "sessions": [{"id": c["id"], "turns": c["turns"]} for c in sessions]})
        for s, conv in enumerate(sessions):
            for fact in conv["persona"]:
                qa = question(fact)
                if qa is None:
                    continue
                hits = evidence(fact, qa[1], conv["turns"])
                if hits:
                    questions.append({"user": user, "split": split, "session": s, "fact": fact,
                                      "question": qa[0], "answer": qa[1], "evidence": hits})
    return histories, questions


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    histories, questions = build(argv[0])
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "histories.jsonl", "w", encoding="utf-8") as f:
        for h in histories:
            f.write(json.dumps(h, ensure_ascii=False) + "\n")
    with open(OUT / "questions.jsonl", "w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")
    for split in ("dev", "report"):
        n_h = sum(1 for h in histories if h["split"] == split)
        n_q = sum(1 for q in questions if q["split"] == split)
        n_t = sum(len(s["turns"]) for h in histories if h["split"] == split for s in h["sessions"])
        print(f"{split}: {n_h} histories, {n_t} turns, {n_q} questions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
