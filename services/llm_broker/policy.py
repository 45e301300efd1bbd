"""Cache policy of the llm-broker: pure functions, no I/O.

Keys have hard partitions. Everything that changes what the model would say
(model, system prompt, tools, sampling parameters, max_tokens, stop
sequences, task, the earlier turns) and who may see the answer (scope: the
user, or global) goes into the partition hash; semantic matching happens only
inside one partition, on the latest user message. The exact key is the
partition plus the latest user message verbatim.

TTLs are absolute: `expires_at` is fixed when the entry is stored.

Scopes. `cache.scope: "user"` (the default) partitions by `user_id`: only the
same user's requests can hit an entry. `cache.scope: "global"` drops the user
from the partition, so one user's answer is served to others; it is accepted
only for tasks the configuration lists in `global_tasks` (market context,
static facts: answers that depend on nothing about the user), and only for a
request that carries no conversation: exactly one message, the question.
Sending a global request marks its set-up (model, system, tools, sampling,
stop sequences) and that question as shareable; earlier turns cannot be so
marked, because they are the user's conversation. A global request with
earlier turns is refused (400), not keyed on its shareable parts: the model
would still read the turns, and an answer shaped by one user's conversation
would then be served to every user who asks the same question. Dropping the
turns before the call would answer a question the caller did not ask. So a global entry's keys
(`partition_key`, `exact_key`) depend only on what the caller marked
shareable, never on `user_id` or a conversation. The entry still records who
created it, so that user's forget removes it (its `query` is their words).

Bounds, checked before anything is cached or sent upstream (`check_request`):
the model must be one of `models` and `max_tokens` at most the configured cap
(400); at most `max_messages` messages (413). The prompt's size, tools and
stop sequences included, is `shared.contract.check_complete`'s (413).
"""

from __future__ import annotations

import hashlib

import msgspec

from shared.contract import CompleteRequest, Usage
from shared.errors import BadRequest, PayloadTooLarge
from shared.llm_config import Config, Volatility

def check_request(config: Config, req: CompleteRequest) -> Volatility:
    """The configured bounds and the scope rule (see the module docstring); the volatility class."""
    if req.model not in config.models:
        raise BadRequest(f"model {req.model!r} is not allowed; allowed: {', '.join(config.models)}")
    if req.max_tokens > config.max_tokens:
        raise BadRequest(f"max_tokens is {req.max_tokens}; the limit is {config.max_tokens}")
    if len(req.messages) > config.max_messages:
        raise PayloadTooLarge(f"{len(req.messages)} messages; the limit is {config.max_messages}")
    volatility = config.volatility_of(req.cache.volatility)
    if req.cache.scope == "global":
        if req.task not in config.global_tasks:
            allowed = ", ".join(config.global_tasks) or "none"
            raise BadRequest(
                f"scope 'global' shares one user's answer with every user, so it is allowed only "
                f"for tasks listed in the broker's `global_tasks` (now: {allowed}); task "
                f"{req.task!r} is not. Use scope 'user', or add the task to `global_tasks` in "
                f"the broker's config (LLM_CONFIG) if its answers depend on nothing about the user")
        if len(req.messages) > 1:
            raise BadRequest(
                "scope 'global' takes exactly one message, the question: earlier turns are the "
                "user's conversation, and a shared answer must not carry it to other users. "
                "Send a conversation with scope 'user'")
    return volatility


_canon = msgspec.json.Encoder(order="sorted")


def _digest(value) -> str:
    return hashlib.sha256(_canon.encode(value)).hexdigest()[:32]


def partition_key(req: CompleteRequest) -> str:
    """Everything but the latest user message, and who may share the answer.

    `check_request` admits a global request only without earlier turns, so a
    global key depends on the shared set-up alone (see Scopes above)."""
    earlier = [(m.role, m.plain()) for m in req.messages[:-1]]
    return _digest({
        "model": req.model, "system": req.system_text(), "tools": req.tools,
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
        "max_tokens": req.max_tokens, "stop": req.stop_sequences, "task": req.task,
        "volatility": req.cache.volatility,
        "scope": req.user_id if req.cache.scope == "user" else "*global*",
        "earlier": _digest(earlier),
    })


def latest_user_text(req: CompleteRequest) -> str:
    return req.messages[-1].plain()


def exact_key(partition: str, req: CompleteRequest) -> str:
    return f"{partition}:{_digest(latest_user_text(req))}"


class Entry(msgspec.Struct):
    """A cached response and what it takes to judge it later."""

    id: str  # the exact key
    partition: str
    user_id: str
    task: str
    model: str
    volatility: str
    query: str
    text: str
    stop_reason: str | None
    usage: Usage
    cost_usd: float
    created_at: float
    expires_at: float
    # The seq of the user's newest own message when the request came in (0:
    # none known); see `stale`. Entries stored before this field read as 0.
    user_seq: int = 0

    def fresh(self, now: float) -> bool:
        return now < self.expires_at

    def age(self, now: float) -> float:
        return max(0.0, now - self.created_at)


def new_entry(req: CompleteRequest, partition: str, text: str, stop_reason: str | None,
              usage: Usage, cost: float, volatility: Volatility, now: float,
              user_seq: int = 0) -> Entry:
    return Entry(id=exact_key(partition, req), partition=partition, user_id=req.user_id,
                 task=req.task, model=req.model, volatility=req.cache.volatility,
                 query=latest_user_text(req), text=text, stop_reason=stop_reason, usage=usage,
                 cost_usd=cost, created_at=now, expires_at=now + volatility.ttl_s,
                 user_seq=user_seq)


# Answers the model finished. One cut off by `max_tokens` is partial, and one
# that stopped on `tool_use` waits for a tool result: served again, either would
# hand every later caller an unfinished answer as if it were the model's reply.
COMPLETE_STOPS = frozenset({"end_turn", "stop_sequence"})


def cacheable(stop_reason: str | None) -> bool:
    return stop_reason in COMPLETE_STOPS


def stale(entry: Entry, user_seq: int | None, distrust_before: float) -> str | None:
    """Why an entry of a class the user's messages invalidate may not be served (None: it may).

    `memory.changed` drops such entries when the user speaks, but core NATS
    loses events without telling the subscriber who missed them (across a
    reconnect, past a slow consumer's limit, while every broker is down). So a
    hit is also checked against what a lost event cannot take away:
    `distrust_before`, when this broker last found events may have been lost
    (entries created earlier are not trusted); and `user_seq`, the seq of the
    user's newest own message as the l2-gateway recorded it (None: no record).
    An entry built when the user's newest message was older is stale; no record
    at all, where the entry was built knowing one, means Redis lost it.
    """
    if entry.created_at < distrust_before:
        return "events_lost"
    if user_seq is None:
        return "user_seq_lost" if entry.user_seq else None
    return "user_spoke" if user_seq > entry.user_seq else None
