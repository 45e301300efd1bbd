"""Label and reply rules of the simulator: plain functions over text. No I/O.

Why rules and not randomness: the broker's cache is only worth auditing if a
cached answer can be *wrong*. So label-like tasks are decided by rules over
the content (paraphrases get the same label, different requests can get
different ones) and free-text replies state the facts the request asked
about (a question about one home and one about another share an intent but
not a reply). Same request, same text.

Task, from the system prompt (all system text blocks, case-insensitive),
first match wins:

1. `lead_score` when it contains the word score/scores/scored/scoring.
   Rules over every user turn of the conversation (lines of a pasted
   transcript that start with `agent:`, `assistant:`, `bot:`, `realtor:` or
   `sales:` are skipped). Start at 30, add each signal once:
   budget +20 (budget, $ amounts, 450k, price range, afford, spend, up to N),
   pre-approved +25 (pre-approved, pre-qualified, cash buyer, paying cash),
   wants a viewing +20 (the `schedule_viewing` words below),
   timeline soon +15 (asap, soon, today, tomorrow, this/next week|weekend|month,
   a weekday name, within N days|weeks, ready to buy|move),
   asks availability +5, asks financing +5,
   not interested -50 (the `not_interested` words), far timeline -15
   (just looking/browsing, no rush, next year, few months/years, not ready yet,
   maybe later, someday). Clamp to 0..100. Bucket: >= 70 hot, >= 40 warm,
   else cold. Reply: the number (`"85"`); the bucket word when the system
   prompt mentions hot, warm or cold (`"hot"`); with "json" in the system
   prompt, `{"score": 85, "bucket": "hot"}`.
2. `intent` when it contains the word intent/intents. Rules over the latest
   user turn; first label whose words occur wins, in this order:
   `not_interested` (not interested, no thanks, stop texting/messaging/..., a
   bare "stop", unsubscribe, opt out, remove me, leave me alone, don't
   contact/text/call me, already bought/found, changed my mind, not looking
   anymore), `schedule_viewing` (tour, visit, viewing, showing, open house,
   view it/the/this, see it/inside/this/that, "see the ..." unless price/cost/
   fees/numbers/taxes follow, come by/see/look/over, stop/drop/swing by, look
   at it/the, take a look, check it out, in person, walk through,
   appointment, schedule), `financing` (mortgage, loan, lender, pre-approved,
   pre-qualified, interest rate, rates, financing, down payment, FHA, credit
   score, monthly payment, APR, closing costs), `pricing` (price, priced,
   pricing, cost, how much, budget, asking, afford, HOA, fees, taxes,
   cheaper, expensive, discount, negotiable, offer, going for, a $ amount),
   `availability` (available, availability, on the market, for sale, sold,
   under contract, pending, still there/up/open/listed, off the market,
   taken, gone, still have it/the), else `other`. Reply: the label (`"availability"`);
   with "json" in the system prompt, `{"intent": "availability"}`.
3. `free_text` otherwise: see `answers` (facts from the request's content,
   wording from a hash of its exact bytes); the intent above picks the kind of
   sentence (a showing slot, whether it is available, figures asked for).

The word rules are general English for home buying and its loans, written
without any application's lists of places, kinds of home or names (a test
holds the demo's lists against this package's source).
"""

from __future__ import annotations

import re

INTENTS = ("not_interested", "schedule_viewing", "financing", "pricing", "availability", "other")


def _norm(text: str) -> str:
    """Lower case, apostrophes dropped (don't -> dont), other punctuation to spaces."""
    t = text.lower().replace("\u2019", "'").replace("'", "")
    t = re.sub(r"[^a-z0-9$]+", " ", t)
    return f" {t.strip()} "


def _rx(*patterns: str) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


_WEEKDAY = r"\b(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)s?\b"
INTENT_RULES: tuple[tuple[str, re.Pattern], ...] = (
    ("not_interested", _rx(
        r"\bnot interested\b", r"\bno thanks?\b", r"\bno thank you\b", r"^ stop $",
        r"\bstop (?:texting|messaging|contacting|calling|sending|emailing|bothering)\b",
        r"\bunsubscribe\b", r"\bopt(?:ing)? out\b", r"\bremove me\b", r"\bleave me alone\b",
        r"\bdont (?:contact|text|message|call|email) me\b", r"\balready (?:bought|found|purchased)\b",
        r"\bchanged my mind\b", r"\bnot looking anymore\b", r"\bno longer (?:interested|looking)\b")),
    ("schedule_viewing", _rx(
        r"\btours?\b", r"\btouring\b", r"\bvisit(?:ing)?\b", r"\bviewings?\b", r"\bshowings?\b",
        r"\bopen house\b", r"\bview (?:it|the|this)\b", r"\bsee (?:it|inside|this|that)\b",
        r"\bsee the (?!price|cost|fees?|numbers|taxes)", r"\bcome (?:by|see|look|over)\b",
        r"\b(?:stop|drop|swing) by\b", r"\blook at (?:it|the)\b", r"\btake a look\b",
        r"\bcheck (?:it|the \w+) out\b", r"\bin person\b", r"\bwalk ?through\b",
        r"\bappointment\b", r"\bschedule\b")),
    ("financing", _rx(
        r"\bmortgages?\b", r"\bloans?\b", r"\blenders?\b", r"\bpre ?approv", r"\bpre ?qualif",
        r"\binterest rates?\b", r"\brates?\b", r"\bfinanc", r"\bdown ?payment\b", r"\bfha\b",
        r"\bcredit score\b", r"\bmonthly payments?\b", r"\bapr\b", r"\bclosing costs?\b")),
    ("pricing", _rx(
        r"\bprices?\b", r"\bpriced\b", r"\bpricing\b", r"\bcosts?\b", r"\bhow much\b", r"\bbudget\b",
        r"\basking\b", r"\bafford", r"\bhoa\b", r"\bfees?\b", r"\btaxes\b", r"\bcheaper\b",
        r"\bexpensive\b", r"\bdiscount\b", r"\bnegotiable\b", r"\boffer\b", r"\bgoing for\b",
        r"\$ ?\d")),
    ("availability", _rx(
        r"\bavailable\b", r"\bavailability\b", r"\bon the market\b", r"\bfor sale\b", r"\bsold\b",
        r"\bunder contract\b", r"\bpending\b", r"\bstill (?:there|up|open|listed)\b",
        r"\boff the market\b", r"\btaken\b", r"\bgone\b", r"\bstill have (?:it|the)\b")),
)
_RULE = dict(INTENT_RULES)

SCORE_BASE = 30
SCORE_SIGNALS: tuple[tuple[str, int, re.Pattern], ...] = (
    ("budget", 20, _rx(r"\bbudget\b", r"\$ ?\d", r"\b\d+ ?k\b", r"\b\d{3} 000\b", r"\bprice range\b",
                       r"\bafford", r"\bspend\b", r"\bup to \d")),
    ("pre_approved", 25, _rx(r"\bpre ?approv", r"\bpre ?qualif", r"\bcash buyer\b",
                             r"\bpaying (?:in )?cash\b", r"\ball cash\b", r"\bapproved for\b")),
    ("wants_viewing", 20, _RULE["schedule_viewing"]),
    ("timeline_soon", 15, _rx(r"\basap\b", r"\bsoon\b", r"\btoday\b", r"\btomorrow\b", r"\btonight\b",
                              r"\b(?:this|next) (?:week|weekend|month)\b", _WEEKDAY,
                              r"\bright away\b", r"\burgent", r"\bimmediately\b",
                              r"\bwithin (?:a|one|two|three|\d+) (?:days?|weeks?)\b",
                              r"\bready to (?:buy|move|make)\b")),
    ("asks_availability", 5, _RULE["availability"]),
    ("asks_financing", 5, _RULE["financing"]),
    ("not_interested", -50, _RULE["not_interested"]),
    ("far_timeline", -15, _rx(r"\bjust (?:looking|browsing)\b", r"\bno rush\b", r"\bnext year\b",
                              r"\bfew (?:months|years)\b", r"\bnot (?:ready|sure) yet\b",
                              r"\bmaybe later\b", r"\bsomeday\b", r"\bin a (?:year|couple of years)\b")),
)
_AGENT_LINE = re.compile(r"^\s*(?:agent|assistant|bot|realtor|sales)\s*:", re.IGNORECASE)


def classify_intent(text: str) -> str:
    norm = _norm(text)
    return next((label for label, rule in INTENT_RULES if rule.search(norm)), "other")


def lead_signals(user_texts: list[str]) -> list[str]:
    lines = [ln for t in user_texts for ln in t.splitlines() if not _AGENT_LINE.match(ln)]
    norm = _norm("\n".join(lines))
    return [name for name, _, rule in SCORE_SIGNALS if rule.search(norm)]


def score_lead(user_texts: list[str]) -> int:
    weights = {name: w for name, w, _ in SCORE_SIGNALS}
    total = SCORE_BASE + sum(weights[s] for s in lead_signals(user_texts))
    return max(0, min(100, total))


def bucket(score: int) -> str:
    return "hot" if score >= 70 else "warm" if score >= 40 else "cold"


def detect_task(system_text: str) -> str:
    low = system_text.lower()
    if re.search(r"\bscor(?:e|es|ed|ing)\b", low):
        return "lead_score"
    if re.search(r"\bintents?\b", low):
        return "intent"
    return "free_text"
