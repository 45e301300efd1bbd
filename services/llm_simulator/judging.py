"""Answer an entailment judge's request from content: "does A entail B, does B entail A?". No I/O.

Why: the freshness-auditor can ask the model whether a served answer and a
fresh one say the same (`AUDIT_JUDGE=llm`). Unless the simulator answers
that question, the LLM judge has no end-to-end test, and a canned "yes yes"
would pass every wrong hit. So the simulator judges as it answers: by the
facts. It reads each statement with the same fact extraction it uses on a
question (`answers.subject_of`: figures, names, listed options, negation),
sentence by sentence (with the days and clock times it states: in an
answer they are claims, a showing's slot), and says A entails B ("yes") only when every figure,
name and option B states is stated in A and both have the same polarity
(a negated claim and a plain one contradict). Wording is not a fact: two
answers that restate the same facts in other sentences entail each other.

Which requests it answers: a system prompt that asks whether statements
*entail* each other and to reply in yes/no words, and a last user turn
shaped "A: <statement>" blank line "B: <statement>" (the shape the auditor's
`shared.llm_judge.judge_request` sends; a test keeps the two in step). The reply
is two words, "yes"/"no", A-entails-B first.

What it does not do: it sees facts as tokens (a figure is its text, a name
its capitalised words), not meaning: "$450,000" and "$450k" are different
figures to it, and a claim made without any figure, name or option ("it is
lovely") is wording. A capitalised word that opens a sentence counts as a
name only where the statements write it capitalised mid-sentence too.
"""

from __future__ import annotations

import re

from services.llm_simulator.answers import _CLOCK, _WEEKDAYS, Subject, _plain, subject_of

_ASKS = re.compile(r"\bentails?\b", re.IGNORECASE)
_YES_NO = re.compile(r"\byes\b.*\bno\b|\bno\b.*\byes\b", re.IGNORECASE | re.DOTALL)
_PAIR = re.compile(r"\AA:[ \t]*(?P<a>.*?)\n\s*\nB:[ \t]*(?P<b>.*)\Z", re.DOTALL)
_SENTENCES = re.compile(r"(?<=[.!?])\s+")


def statements(system: str, question: str) -> tuple[str, str] | None:
    """(A, B) when the request is an entailment judge's; None for any other request."""
    if not (_ASKS.search(system) and _YES_NO.search(system)):
        return None
    m = _PAIR.match(question.strip())
    return (m["a"].strip(), m["b"].strip()) if m else None


def facts(statement: str, context: str) -> Subject:
    """Every figure, name and option the statement states, and whether any sentence is negated."""
    figures: set[str] = set()
    names: set[str] = set()
    options: set[str] = set()
    negated = False
    for sentence in _SENTENCES.split(statement.strip()):
        s = subject_of(sentence, context)
        # a question's day and time are its slot, not its subject; an answer's are claims
        figures.update(w.lower() for w in (t.strip(".,!?;:()") for t in sentence.split())
                       if _CLOCK.match(w) or _plain(w).rstrip("s") in _WEEKDAYS)
        figures.update(f.lower().rstrip(".,") for f in s.figures)
        names.update(n.lower() for n in s.names)
        options.update(s.options)
        negated = negated or s.negated
    return Subject(tuple(sorted(figures)), tuple(sorted(names)), tuple(sorted(options)), negated)


def entails(premise: Subject, hypothesis: Subject) -> bool:
    """Everything the hypothesis states is stated in the premise, with the same polarity."""
    return (set(hypothesis.figures) <= set(premise.figures)
            and set(hypothesis.names) <= set(premise.names)
            and set(hypothesis.options) <= set(premise.options)
            and hypothesis.negated == premise.negated)


def judge(a: str, b: str) -> str:
    """'yes no'-style reply: does A entail B, then does B entail A."""
    context = f"{a}\n{b}"  # names and options are told apart on both statements together
    fa, fb = facts(a, context), facts(b, context)
    return " ".join("yes" if ok else "no" for ok in (entails(fa, fb), entails(fb, fa)))
