"""SMS real-estate conversations, generated from templates (nothing downloaded).

Each lead is a persona (the home they texted about, the area, budget, how keen
they are); their messages are drawn from stage-appropriate templates with
several wordings each, the way real leads text: short, repetitive, often the
same question in other words ("still available?", "is this still on the
market?"). The same seed gives the same conversations.
"""

from __future__ import annotations

import random
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


def listings_text() -> str:
    """The reply bot's context: the listings it sells (a long, stable system prompt)."""
    rng = random.Random(7)
    lines = []
    for area in AREAS:
        for street in STREETS[:6]:
            kind, _ = rng.choice(KINDS)
            price = rng.randrange(250, 950, 5)
            lines.append(f"- {kind} on {street}, {area}: ${price}k, {rng.randrange(900, 3600, 50)} sq ft, "
                         f"built {rng.randrange(1955, 2024)}, HOA ${rng.choice((0, 0, 150, 250, 400))}/month, "
                         f"{rng.choice(('garage', 'street parking', 'carport', '2-car garage'))}, "
                         f"{rng.choice(('fenced yard', 'no yard', 'large lot', 'balcony'))}.")
    return "\n".join(lines)
