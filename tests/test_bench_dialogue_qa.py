"""The long-conversation QA set (bench/data/dialogue_qa) follows its fixed rules."""

from __future__ import annotations

import hashlib
import json

from bench import dialogue_qa
from bench.search_evidence import DATA, history_rows


def test_question_rule_holds_out_the_last_content_word():
    assert dialogue_qa.question("I volunteer at a soup kitchen.") == ("you volunteer at a soup what?", "kitchen")
    assert dialogue_qa.question("My favourite skater is rob dryden.") == \
        ("your favourite skater is rob what?", "dryden")
    assert dialogue_qa.question("I am tall.") is None  # too vague once the answer is gone


def test_evidence_rule_needs_the_answer_and_half_the_other_words():
    turns = [("User 2", "I volunteer at a soup kitchen too."),
             ("User 1", "I volunteer at a kitchen downtown, serving soup."),
             ("User 1", "The kitchen at home is small."),
             ("User 1", "I volunteer at the animal shelter.")]
    assert dialogue_qa.evidence("I volunteer at a soup kitchen.", "kitchen", turns) == [1]


def test_shipped_set_matches_its_rules_and_split():
    with open(DATA / "histories.jsonl", encoding="utf-8") as f:
        histories = {h["user"]: h for h in map(json.loads, f)}
    with open(DATA / "questions.jsonl", encoding="utf-8") as f:
        questions = [json.loads(line) for line in f]
    assert len(histories) == 65 and len(questions) == 1256
    for h in histories.values():
        split = "dev" if int(hashlib.sha1(f"dialogue-qa-split:{h['user']}".encode()).hexdigest()[0], 16) < 8 \
            else "report"
        assert h["split"] == split and len(h["sessions"]) == dialogue_qa.SESSIONS
    for q in questions:
        turns = histories[q["user"]]["sessions"][q["session"]]["turns"]
        assert (q["question"], q["answer"]) == dialogue_qa.question(q["fact"])
        assert q["evidence"] == dialogue_qa.evidence(q["fact"], q["answer"], [tuple(t) for t in turns])
        assert q["split"] == histories[q["user"]]["split"]


def test_histories_become_one_user_each_with_unique_ids_and_rising_seqs():
    with open(DATA / "histories.jsonl", encoding="utf-8") as f:
        h = json.loads(f.readline())
    rows = history_rows(h, 1)
    assert len({r.msg_id for r in rows}) == len(rows) == sum(len(s["turns"]) for s in h["sessions"])
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    assert {r.role for r in rows} == {"user", "assistant"}
