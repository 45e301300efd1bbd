"""The simulator does not flatter: facts from the request, wording from its bytes, no demo words.

The questions, places and kinds of home here were written for this file; none
comes from the demo (services/agent_worker) or from the simulator's source.
Facts of a reply are compared as the figures it states ($ amounts, day
counts, rates, trends) and the names it repeats.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from services.llm_simulator import responder

REPO = Path(__file__).resolve().parents[1]
MODEL = "claude-haiku-4-5"
# An analyst's brief of our own: what to cover, and the kinds of home it knows.
ANALYST = ("You are a housing analyst for Northgate Homes. In two sentences, give the area's figures: "
           "list price, days on market, inventory trend. Kinds of home: cottage, loft, bungalow, mansion.")
AGENT = "You are a helpful real-estate assistant. Answer the buyer's text briefly."
FIGURE = re.compile(r"\$[\d,]+k?|\b\d+ days\b|\b\d+\.\d+% APR|\b(?:rising|flat|falling)\b|[\d,]+ sq ft",
                    re.IGNORECASE)


def reply(question: str, system: str = ANALYST, model: str = MODEL, history: list[dict] | None = None) -> str:
    body = {"model": model, "max_tokens": 400, "system": system,
            "messages": [*(history or []), {"role": "user", "content": question}]}
    task, text = responder.generate(responder.parse_request(body))
    assert task == "free_text"
    return text


def facts(text: str) -> list[str]:
    return sorted(f.lower() for f in FIGURE.findall(text))


@pytest.mark.parametrize("a, b, fact_a, fact_b", [
    # a place
    ("What is the market like for lofts in Brookfield?", "What is the market like for lofts in Fairmont?",
     "Brookfield", "Fairmont"),
    # an option word the brief lists
    ("What is the market like for lofts in Brookfield?", "What is the market like for cottages in Brookfield?",
     "loft", "cottage"),
    # a number
    ("How much is the 2-bath bungalow on 14th Street?", "How much is the 3-bath bungalow on 14th Street?",
     "2-bath", "3-bath"),
    # a time the question names
    ("Could I tour the bungalow on Wednesday at 9am?", "Could I tour the bungalow on Wednesday at 4pm?",
     "9am", "4pm"),
])
def test_questions_that_differ_in_a_fact_get_answers_that_differ_in_it(a, b, fact_a, fact_b):
    ra, rb = reply(a), reply(b)
    assert ra != rb
    assert fact_a in ra and fact_b not in ra
    assert fact_b in rb and fact_a not in rb
    if "market" in a or "How much" in a:  # figures drawn for another subject are other figures
        assert facts(ra) != facts(rb)


PARAPHRASES = [
    ("What is the market like for lofts in Brookfield?", "How are loft sales doing in Brookfield these days?",
     "Give me a rundown on Brookfield lofts."),
    ("How much is the 2-bath bungalow on 14th Street?", "What's the price of the 2-bath bungalow on 14th Street?",
     "what would the 2-bath bungalow on 14th Street cost me"),
    ("Could I tour the mansion on Wednesday at 9am?", "Is a showing of the mansion possible Wednesday 9am?"),
    ("What is the market like for cottages in Stone Bridge?", "Stone Bridge: how is the cottage market?"),
]


@pytest.mark.parametrize("group", PARAPHRASES)
def test_paraphrases_get_the_same_facts_in_other_words(group):
    replies = [reply(q) for q in group]
    assert len(set(replies)) == len(replies), replies  # not byte-identical
    assert len({tuple(facts(r)) for r in replies}) == 1, replies  # the same figures
    names = re.findall(r"Brookfield|Stone Bridge|14th Street|Wednesday|9am", group[0])
    for r in replies:
        assert all(n in r for n in names), r


def test_a_figure_the_request_states_is_the_one_given():
    sheet = ("You are a helpful real-estate assistant.\nListings:\n"
             "- 2-bath bungalow on 14th Street, Fairmont: asking $612k, 1,480 sq ft\n"
             "- 3-bath bungalow on 14th Street, Fairmont: asking $689k, 1,900 sq ft")
    assert "$612k" in reply("How much is the 2-bath bungalow on 14th Street?", system=sheet)
    assert "$689k" in reply("What's the price of the 3-bath bungalow on 14th Street?", system=sheet)
    # "how big is it?" refers to what the buyer asked about before
    history = [{"role": "user", "content": "Is the 3-bath bungalow on 14th Street still available?"},
               {"role": "assistant", "content": "Yes it is."}]
    assert "1,900 sq ft" in reply("How big is it?", system=sheet, history=history)


def test_the_same_request_gets_the_same_text_and_another_model_other_words():
    q = "What is the market like for lofts in Brookfield?"
    assert reply(q) == reply(q)
    other = reply(q, model="claude-sonnet-4-5")
    assert other != reply(q) and facts(other) == facts(reply(q))


def test_labels_still_follow_the_leads_content():
    def label(text: str) -> str:
        body = {"model": MODEL, "max_tokens": 20, "system": "Classify the buyer's intent.",
                "messages": [{"role": "user", "content": text}]}
        return responder.generate(responder.parse_request(body))[1]

    assert label("Could I tour the mansion on Wednesday?") == label("I'd love to visit the loft") == "schedule_viewing"
    assert label("What's the price of the cottage?") == "pricing"


def test_the_task_is_what_the_first_system_block_asks_not_what_later_context_mentions():
    """A rolling summary or a record in later system blocks is context: its "credit
    score" or "intent" asks for no score or label."""
    summary = "Summary so far: the buyer's credit score is 720 and their intent is to buy soon."
    body = {"model": MODEL, "max_tokens": 200,
            "system": [{"type": "text", "text": AGENT, "cache_control": {"type": "ephemeral"}},
                       {"type": "text", "text": summary, "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "Is the loft on 14th Street still available?"}]}
    assert responder.generate(responder.parse_request(body))[0] == "free_text"
    body["system"] = [{"type": "text", "text": "Score the lead from 0 to 100."},
                      {"type": "text", "text": summary}]
    assert responder.generate(responder.parse_request(body))[0] == "lead_score"


# --------------------------------------------------------------------------- no demo vocabulary


def demo_vocabulary() -> set[str]:
    """The demo's own lists: places, streets, kinds of home, names, features... and its market asks.

    Names and kinds of home count whole, however short; of the other lists (features, sources,
    the leads' texts...) only entries of two words or more: "Thanks" or "couple" alone is English."""
    from services.agent_worker import bot, conversations as conv

    words: set[str] = {w for pair in conv.KINDS for w in pair}
    for name in ("AREAS", "STREETS", "FIRST_NAMES", "SCHOOLS", "AGENTS"):
        words.update(getattr(conv, name))
    phrases: list[str] = []
    for name in ("FEATURES", "SHOWINGS", "SOURCES", "HOUSEHOLDS", "MOVING_FROM", "AGENT_NOTES", "SEARCH_QUERIES"):
        phrases.extend(getattr(conv, name))
    phrases.extend(re.sub(r"\{\w+\}", "", t).strip(" ?!.") for lines in conv.LEAD_LINES.values() for t in lines)
    phrases.extend(re.split(r"\s*\{", ask)[0].strip() for ask in bot.MARKET_ASKS)  # "Market update for"
    words.update(p for p in phrases if len(p.split()) >= 2)
    return words


def simulator_source() -> dict[str, str]:
    return {p.name: p.read_text() for p in (REPO / "services" / "llm_simulator").glob("*.py")}


def test_no_word_of_the_demos_lists_is_in_the_simulator():
    vocab = demo_vocabulary()
    assert {"condo", "townhome", "Riverside", "Main St"} <= vocab  # the lists were read
    found = {(name, w) for name, src in simulator_source().items() for w in vocab
             if re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", src, re.IGNORECASE)}
    assert not found


def test_no_string_of_the_simulator_is_a_word_of_the_demos_market_asks():
    """The old simulator dropped exactly "market" and "current" from market questions."""
    from services.agent_worker import bot

    ask_words = {w.lower() for a in bot.MARKET_ASKS for w in re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", "", a))}
    for name, src in simulator_source().items():
        constants = {n.value.lower() for n in ast.walk(ast.parse(src))
                     if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not constants & ask_words, name
