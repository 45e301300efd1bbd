"""SMS real-estate conversations, generated from templates (nothing downloaded).

Each lead is a persona (the home they texted about, the area, budget, how keen
they are); their messages are drawn from stage-appropriate templates with
several wordings each, the way real leads text: short, repetitive, often the
same question in other words ("still available?", "is this still on the
market?"). The same seed gives the same conversations.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

AREAS = ("Riverside", "Oak Park", "Downtown", "Lakeview", "Maple Heights", "Westfield",
         "Harbor Point", "Cedar Grove")
STREETS = ("Main St", "Maple Ave", "Oak Dr", "Harbor Rd", "Elm St", "Cedar Ln", "Lake Blvd",
           "Park Ave", "Hill St", "River Rd", "Pine Ct", "Sunset Dr")
KINDS = (("3-bed house", "single-family"), ("2-bed condo", "condo"), ("4-bed house", "single-family"),
         ("townhome", "townhome"), ("1-bed condo", "condo"), ("5-bed house", "single-family"))
FIRST_NAMES = ("Maria", "Tom", "Aisha", "Kevin", "Lena", "Carlos", "Priya", "Jake", "Sofia", "Dan",
               "Grace", "Omar", "Emily", "Ravi", "Hannah", "Luis")
DAYS = ("Saturday", "Sunday", "Friday", "Tuesday", "Thursday")
TIMES = ("10am", "11am", "1pm", "3pm", "5pm", "6pm")

# Stage -> wordings. {home}, {area}, {budget}, {day}, {time}, {pre}, {kind} are filled per lead.
LEAD_LINES: dict[str, tuple[str, ...]] = {
    "opener": (
        "Hi, is the {home} still available?",
        "Hey is {home} still on the market?",
        "Hello! Saw the listing for {home}. Still available?",
        "Is this still available? The {kind} on {street}",
        "hi there, still have the {kind} on {street}?",
    ),
    "pricing": (
        "What's the asking price?",
        "How much are they asking for it?",
        "Is the price negotiable?",
        "What are the HOA fees on that one?",
        "Our budget is around ${budget}k, is that realistic?",
        "We can spend up to ${budget}k. Would they take an offer?",
        "How much are property taxes there?",
    ),
    "details": (
        "Does it have a garage?",
        "Is the backyard fenced? We have a dog",
        "How old is the roof?",
        "Are pets allowed?",
        "How are the schools nearby?",
        "Is there parking for two cars?",
        "Any issues from the inspection?",
        "How big is the lot?",
    ),
    "market": (
        "How's the market in {area} right now?",
        "Are prices going up in {area}?",
        "How fast are homes selling in {area}?",
        "Is it a good time to buy in {area}?",
    ),
    "financing": (
        "We're pre-approved for ${pre}k",
        "What kind of down payment would I need?",
        "Do you work with any lenders?",
        "What are mortgage rates like right now?",
        "Can I use an FHA loan for this one?",
        "What would the monthly payment be roughly?",
    ),
    "viewing": (
        "Can we see it this weekend?",
        "Could we schedule a showing {day}?",
        "I'd like to take a look in person. {day} at {time}?",
        "Can I come by {day} around {time}?",
        "Is there an open house this week?",
    ),
    "smalltalk": (
        "Thanks!",
        "Ok sounds good",
        "Let me talk to my husband and get back to you",
        "Great, thank you",
        "Perfect",
        "Sorry, busy day. Still interested though",
        "Just looking for now, no rush",
    ),
    "out": (
        "No thanks, we already found a place",
        "Not interested anymore, please stop texting",
        "We changed our mind, thanks anyway",
    ),
}

# What a lead is likely to say next, by how keen they are.
NEXT_STAGE: dict[str, dict[str, float]] = {
    "hot": {"pricing": 3, "viewing": 4, "financing": 3, "details": 2, "market": 1.5, "smalltalk": 1, "out": 0.05},
    "warm": {"pricing": 3, "viewing": 1.5, "financing": 1.5, "details": 3, "market": 2, "smalltalk": 2, "out": 0.2},
    "cold": {"pricing": 2, "viewing": 0.3, "financing": 0.5, "details": 2, "market": 2, "smalltalk": 3, "out": 0.6},
}

# What the bot said in the imported history (before the demo starts, no LLM involved).
BOT_LINES = (
    "Hi {name}! Yes, the {home} is still available. Want me to send the details?",
    "It's listed at ${price}k and the seller is open to offers.",
    "Happy to set up a showing. Does {day} at {time} work?",
    "The HOA is about $250 a month and covers water and trash.",
    "I can connect you with a lender who can pre-approve you in a day or two.",
    "Homes in {area} are selling in about three weeks on average right now.",
    "Great question, let me check with the listing agent and get back to you.",
    "Just checking in, are you still looking in {area}?",
)

SEARCH_QUERIES = (
    "what did they say about financing",
    "did they mention a budget or price range",
    "when did they want to see the house",
    "do they have pets",
    "what did they ask about schools",
    "are they pre-approved for a mortgage",
    "did they ask about HOA fees",
)


@dataclass(frozen=True)
class Persona:
    name: str
    home: str  # "3-bed house on Maple Ave"
    kind: str
    street: str
    area: str
    property_type: str  # for the market question: single-family, condo, townhome
    budget: int  # thousands
    pre: int  # pre-approved for, thousands
    heat: str  # hot | warm | cold

    def fill(self, template: str, rng: random.Random) -> str:
        return template.format(home=self.home, kind=self.kind, street=self.street, area=self.area,
                               budget=self.budget, pre=self.pre, name=self.name,
                               day=rng.choice(DAYS), time=rng.choice(TIMES),
                               price=self.budget + rng.choice((-20, 0, 15, 30)))


def persona(rng: random.Random) -> Persona:
    kind, ptype = rng.choice(KINDS)
    street = rng.choice(STREETS)
    budget = rng.randrange(250, 900, 25)
    return Persona(name=rng.choice(FIRST_NAMES), home=f"{kind} on {street}", kind=kind, street=street,
                   area=rng.choice(AREAS), property_type=ptype, budget=budget,
                   pre=budget + rng.choice((0, 25, 50)),
                   heat=rng.choices(("hot", "warm", "cold"), (0.25, 0.45, 0.30))[0])


def lead_message(p: Persona, stage: str, rng: random.Random) -> str:
    return p.fill(rng.choice(LEAD_LINES[stage]), rng)


def next_stage(p: Persona, rng: random.Random) -> str:
    weights = NEXT_STAGE[p.heat]
    return rng.choices(list(weights), list(weights.values()))[0]


def bot_message(p: Persona, rng: random.Random) -> str:
    return p.fill(rng.choice(BOT_LINES), rng)


# --------------------------------------------------------------------------- the bots' prompts
#
# What a production fleet sends with every call: a team playbook, the listing sheet, the scoring
# and labelling guides with worked examples, the lead's CRM record. All of it is generated here
# from fixed seeds, so it is the same text on every call (the stable system prompts are what the
# llm-broker marks for the model's prompt cache) and in every run.
#
# The local simulator picks its task from words of the system prompt (services/llm_simulator/
# rules.py): the reply prompts must not name scoring or intents; the score guide must not
# name the lead buckets; the labelling guide must not name scoring. tests/test_demo.py checks it.

FEATURES = ("updated kitchen with quartz counters", "new roof (2021)", "original hardwood floors",
            "finished basement", "primary suite on the main floor", "open floor plan",
            "south-facing living room", "new HVAC (2022)", "walk-in pantry", "vaulted ceilings",
            "gas fireplace", "in-unit laundry", "covered patio", "solar panels (owned)",
            "EV charger in the garage", "fresh interior paint", "home office with built-ins")
SCHOOLS = ("Lincoln Elementary", "Jefferson Middle", "Roosevelt High", "Hillcrest Elementary",
           "Bayview Middle", "Central High", "Oakwood Elementary")
SHOWINGS = ("lockbox, 1 hour notice", "tenant occupied, 24 hours notice",
            "vacant, show any time 9am-8pm", "by appointment with the listing agent")
SOURCES = ("Zillow inquiry", "Realtor.com inquiry", "website form", "open house sign-in",
           "yard sign text", "Facebook ad", "referral from a past client")
AGENTS = ("Dana Whitfield", "Marcus Lee", "Jenna Ortiz", "Sam Patel")
HOUSEHOLDS = ("couple", "single", "family with two kids", "family with a baby on the way", "retired couple")
MOVING_FROM = ("a rental", "out of state", "a smaller home nearby", "a condo downtown")
AGENT_NOTES = ("prefers texts to calls", "asked about schools on the first call",
               "works nights, text in the afternoon", "relocating for a job in May",
               "wants a yard for the dog", "first-time buyer, nervous about the process")


@functools.lru_cache(maxsize=1)
def listings() -> tuple[dict, ...]:
    """The brokerage's active listings: 8 areas x 6 streets, fixed (read-only)."""
    rng = random.Random(7)
    out = []
    for area in AREAS:
        for street in STREETS[:6]:
            kind, ptype = rng.choice(KINDS)
            out.append({
                "home": f"{kind} on {street}", "area": area, "type": ptype,
                "number": rng.randrange(100, 9900), "price": rng.randrange(250, 950, 5),
                "sqft": rng.randrange(900, 3600, 50), "built": rng.randrange(1955, 2024),
                "hoa": rng.choice((0, 0, 150, 250, 400)), "tax": rng.randrange(3200, 14800, 100),
                "parking": rng.choice(("garage", "street parking", "carport", "2-car garage")),
                "outside": rng.choice(("fenced yard", "no yard", "large lot", "balcony")),
                "features": rng.sample(FEATURES, 3), "school": rng.choice(SCHOOLS),
                "pets": rng.choice(("pets welcome", "cats and small dogs", "no restrictions")),
                "showing": rng.choice(SHOWINGS),
                "agent": rng.choice(AGENTS), "listed_days": rng.randrange(2, 70),
            })
    return tuple(out)


def listings_text() -> str:
    """The listing sheet every bot quotes from (long and stable)."""
    lines = []
    for x in listings():
        lines.append(
            f"- {x['number']} {x['home']}, {x['area']} ({x['type']}): asking ${x['price']}k, "
            f"{x['sqft']} sq ft, built {x['built']}, HOA ${x['hoa']}/month, property tax about "
            f"${x['tax']:,}/year, {x['parking']}, {x['outside']}. Highlights: {'; '.join(x['features'])}. "
            f"Schools: {x['school']}. Pets: {x['pets']}. Showings: {x['showing']}. "
            f"Listing agent {x['agent']}, listed {x['listed_days']} days ago.")
    return "\n".join(lines)


PLAYBOOK = """\
Sunrise Realty SMS playbook (applies to every bot that texts a lead).

Voice. Friendly, plain, brief. One idea per text. No emojis, no exclamation marks in a row, no
ALL CAPS. Use the lead's first name at most once per conversation day. Sign texts as "- Sunrise
Realty" only in the first text of a day.

Length. Under 300 characters. If a full answer needs more, answer the main question and offer to
send the details by email.

Facts. Quote prices, fees, taxes, square footage, parking and schools only from the listing sheet
below. Never guess a number. If the sheet does not say, answer: "Let me check with the listing
agent and get back to you today." Never promise a price reduction, an accepted offer, a rate or a
loan approval. Never comment on the neighbourhood's people, safety, religion or demographics (fair
housing): talk about the home, the commute, the schools named on the sheet and amenities only.

Next step. Every text that answers a question proposes one concrete next step: a showing (weekday
evenings 5-8pm or weekends 10am-4pm), a call with one of our partner lenders (Harbor Mortgage,
First Cedar Credit Union), sending the disclosure packet, or a short call with the listing agent.

Consent. Text only leads who opted in. Stop at once and for good when a lead asks to stop, says
they are not interested, found a place or asks to be removed: confirm in one text, then nothing.
No texts before 8am or after 9pm in the lead's time zone. At most two unanswered texts in a row;
after that, wait for the lead.

Handing over. Hand the conversation to the human agent named on the listing when the lead wants to
make an offer, asks about contract terms, asks a legal or tax question, is upset, or asks for a
person. Say: "I'll have [agent] call you today." and tag the lead for the agent.

Objections, and what works:
- "Just looking": fine; offer to send new listings that match, ask what they would need to see.
- "Too expensive": compare with the other homes on the sheet in the same area and price band.
- "Need to talk to my partner": offer a showing time that works for both, or a video walkthrough.
- "Not pre-approved": offer a 15-minute call with a partner lender; no pressure.
- "Bad timing": ask when to check back and respect it.
- "Already working with an agent": thank them and stop.
"""

ROLE_PROMPTS = {
    "qualifier": (
        "You are Sunrise Realty's qualifier bot. You answer every text a lead sends about a listing, "
        "and you find out, over the conversation, the four things the sales team needs: which home "
        "or area they want, their budget, how they will finance it, and their timeline. Answer the "
        "question they asked first; then, if one of the four is still unknown, ask about one of "
        "them, never more than one per text."),
    "nurture": (
        "You are Sunrise Realty's follow-up bot. You keep in touch with leads who have gone quiet, "
        "without pestering them: a short, useful check-in that gives them a reason to answer (a "
        "price change on the sheet, a similar home, an open house, a question they left open). "
        "Never repeat a check-in the lead has not answered; never send two in one day."),
    "scheduler": (
        "You are Sunrise Realty's showing scheduler. When a lead is ready to see a home you propose "
        "concrete times (weekday evenings 5-8pm, weekends 10am-4pm) that respect the listing's "
        "showing instructions on the sheet, confirm what the lead accepted, and remind them the day "
        "before. Offer at most two time slots per text."),
}


def reply_system(role: str) -> str:
    """A texting bot's system prompt: its role, the team playbook, the listing sheet. Stable."""
    return (f"{ROLE_PROMPTS[role]}\n\n{PLAYBOOK}\nListing sheet (active listings):\n{listings_text()}")


def _example_leads(seed: int, count: int) -> list[tuple[Persona, list[tuple[str, str]]]]:
    """Short made-up conversations for the guides' worked examples: (persona, [(stage, text)])."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        p = persona(rng)
        stages = ["opener"] + [next_stage(p, rng) for _ in range(rng.randint(1, 4))]
        if "out" in stages:
            stages = stages[: stages.index("out") + 1]
        out.append((p, [(s, lead_message(p, s, rng)) for s in stages]))
    return out


_POINTS = {"opener": 5, "pricing": 10, "details": 0, "market": 0, "financing": 15, "viewing": 25,
           "smalltalk": 0, "out": -50}


def score_guide() -> str:
    """The team's lead-scoring guide with worked examples (the same for every bot)."""
    head = """\
You score real-estate leads for the Sunrise Realty sales team. Read the lead's own text messages
(not ours) and give one score from 0 (not buying) to 100 (ready to buy now). Every bot of the team
uses this score to decide what to do next, so apply the guide exactly and the same way every time:
the same messages must always get the same score. Answer with the number only, no words.

Start at 30. Add each signal once, however often the lead repeats it:
- +20 budget: the lead names a budget, a price range, an amount ($450k, 450k, up to 500) or says
  what they can afford or spend.
- +25 financing in place: pre-approved, pre-qualified, cash buyer, paying cash.
- +20 wants to see a home: a showing, a tour, an open house, "can we see it", "come by".
- +15 soon: today, tomorrow, this or next week or weekend, a weekday, within days, ready to move.
- +5 asks whether a home is still available.
- +5 asks about loans, rates, down payment or monthly payments.
- -50 not interested: asked us to stop, found another place, changed their mind.
- -15 far off: just looking, no rush, next year, in a few months, not ready yet, maybe later.
Clamp to 0..100. Ignore politeness, spelling and how long the messages are. Do not reward a lead
for questions about the neighbourhood or the house itself: they are curious, not committed. Our own
texts never change the score.

Worked examples (lead's texts, then the score):
"""
    lines = [head]
    for i, (p, said) in enumerate(_example_leads(11, 68), 1):
        points = 30 + sum(_POINTS[s] - 15 * bool(re.search(r"no rush|just looking", t)) for s, t in said)
        texts = " | ".join(t for _, t in said)
        lines.append(f"{i}. {texts}\n   -> {max(0, min(100, points))}")
    return "\n".join(lines)


INTENT_LABELS = {
    "availability": "asks whether a home is still for sale, under contract or gone",
    "pricing": "asks about price, fees, taxes, offers, or states a budget",
    "schedule_viewing": "wants to see a home: a showing, tour, open house, a time to come by",
    "financing": "asks about loans, lenders, rates, pre-approval, down payment, monthly payment",
    "not_interested": "asks us to stop, found another home, changed their mind, is not looking",
    "other": "anything else: thanks, small talk, questions about the home or the area",
}
_STAGE_LABEL = {"opener": "availability", "pricing": "pricing", "viewing": "schedule_viewing",
                "financing": "financing", "out": "not_interested", "details": "other",
                "market": "other", "smalltalk": "other"}


def intent_guide() -> str:
    """The team's intent labelling guide with labelled examples (the same for every bot)."""
    lines = ["Classify the lead's intent from their latest text. Answer with one label, nothing else: "
             + ", ".join(INTENT_LABELS) + ".", "",
             "What each label means:"]
    lines += [f"- {k}: {v}" for k, v in INTENT_LABELS.items()]
    lines += ["", "When a text fits several labels, the first in this order wins: not_interested, "
              "schedule_viewing, financing, pricing, availability, other. Label the latest text only; "
              "earlier texts do not count. Typos, slang and missing punctuation do not change the label.",
              "", "Labelled examples:"]
    seen = set()
    for _, said in _example_leads(23, 100):
        for stage, text in said:
            if text not in seen:
                seen.add(text)
                lines.append(f'"{text}" -> {_STAGE_LABEL[stage]}')
    return "\n".join(lines)


def market_brief() -> str:
    """The analyst's brief for market-context questions (shared by the whole fleet)."""
    return (
        "You are a real-estate market analyst for Sunrise Realty. In two sentences, give the current "
        "market context an agent needs before talking to a buyer: median list price, days on market, "
        "inventory trend. Cover the area and kind of home asked about only. Use the brokerage's MLS "
        "figures of the last 30 days; say 'about' for rounded figures and never project future prices. "
        "Areas we cover: " + ", ".join(AREAS) + ". Kinds of home: single-family, condo, townhome.\n\n"
        "House style for market notes:\n"
        "- Lead with the median list price, then days on market, then the inventory trend.\n"
        "- Compare with the same period last year only when the MLS figures give it.\n"
        "- No advice on whether to buy now; agents give advice, the note gives facts.\n"
        "- Plain numbers: $512,000 not 512K; 23 days not three weeks.\n"
        "- If the figures are thin (fewer than five sales in the area and kind), say so.\n")


def profile_text(p: Persona, user_id: str, index: int) -> str:
    """The lead's CRM record, sent with every text a bot writes (lead-specific, so in the messages,
    after the stable system prompt): who they are, what they asked for, and the homes on our sheet
    that fit (the bots suggest those)."""
    rng = random.Random(f"profile:{index}")
    sheet = listings()
    same = [x for x in sheet if x["area"] == p.area]
    fits = sorted(same, key=lambda x: (x["type"] != p.property_type, abs(x["price"] - p.budget)))[:3]
    asked = next((x for x in same if x["home"] == p.home), None)
    lines = [
        "CRM record of the lead (context for you; do not quote it back):",
        f"- id {user_id}; first name {p.name}; contact by SMS, opted in {rng.randrange(2, 58)} days ago "
        f"via {rng.choice(SOURCES)}; time zone America/Chicago; prefers texts "
        f"{rng.choice(('after 5pm', 'at lunchtime', 'on weekends', 'any time'))}",
        f"- asked about: {p.home}, {p.area}"
        + (f" (on our sheet: #{asked['number']}, asking ${asked['price']}k)" if asked else
           " (not on our sheet any more: suggest the similar homes below)"),
        f"- looking for: {p.property_type} in {p.area}; "
        f"household {rng.choice(HOUSEHOLDS)}; moving from {rng.choice(MOVING_FROM)}",
        f"- assigned agent {rng.choice(AGENTS)}; pipeline stage "
        f"{rng.choice(('new', 'engaged', 'nurturing', 'touring'))}; source campaign "
        f"{rng.choice(('spring-buyers', 'first-time-buyers', 'relocation', 'open-house-follow-up'))}",
        f"- agent notes: {rng.choice(AGENT_NOTES)}",
        f"- website activity, last 14 days: {rng.randrange(1, 30)} listing views, "
        f"{rng.randrange(0, 6)} saved homes, opened {rng.randrange(0, 5)} of our emails",
        "- homes on our sheet that fit (suggest these, with their facts from the sheet):",
    ]
    for x in fits:
        lines.append(f"  - #{x['number']} {x['home']}, {x['area']}: ${x['price']}k, {x['sqft']} sq ft, "
                     f"{x['parking']}, {x['outside']}; {'; '.join(x['features'])}; showings {x['showing']}")
    return "\n".join(lines)
