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
    if req.user_id is None and volatility.invalidate_on_user_message:
        raise BadRequest(f"volatility class {req.cache.volatility!r} is dropped when the user "
                         f"speaks, so it needs a user_id (metadata.user_id over HTTP)")
    whole = req.task in config.request_tasks and req.cache.mode != "semantic"
    if req.cache.scope == "global" and not whole:
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


def partition_key(req: CompleteRequest, key_id: str | None = None) -> str:
    """Everything but the latest user message, and who may share the answer.

    `check_request` admits a global request only without earlier turns (but for
    `request_tasks` in exact mode, whose turns are all in the key), so a global key
    depends on the shared set-up alone (see Scopes above).

    The fields added with the full Messages shape (tool_choice, thinking, betas,
    anthropic_version, namespace) enter the digest only when set, and messages and
    system enter it as text while they are text: a request of the original shape
    keys as it always did (entries stored before the upgrade still hit).

    `key_id` (`upstream_key_id`): the request is answered with the caller's own API
    key (the gateway's GATEWAY_UPSTREAM_KEY=caller), and only requests made with the
    same key share its entries, whatever the scope. Two reasons: a hit is served
    without asking the API, so a key the API would refuse (revoked, mistyped, made up)
    would otherwise read every answer other keys paid for; and one key is one account,
    whose model access, data and bill are its own."""
    earlier = [(m.role, m.key()) for m in req.messages[:-1]]
    fields = {
        "model": req.model, "system": req.system_key(), "tools": req.tools,
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
        "max_tokens": req.max_tokens, "stop": req.stop_sequences, "task": req.task,
        "volatility": req.cache.volatility,
        "scope": req.user_id if req.cache.scope == "user" else "*global*",
        "earlier": _digest(earlier),
    }
    for name in ADDED_KEY_FIELDS:
        value = getattr(req, name)
        if value is not None:
            fields[name] = value
    if req.cache.namespace:
        fields["namespace"] = req.cache.namespace
    if key_id is not None:
        fields["upstream_key"] = key_id
    return _digest(fields)


def upstream_key_id(api_key: str) -> str:
    """What of a caller's API key the cache may hold: a one-way digest (hashed again into
    the partition, never stored or logged itself), so equal keys share and others do not."""
    return hashlib.sha256(b"tiermem-upstream-key\0" + api_key.encode()).hexdigest()[:32]


# Request fields that change the answer, added after the original contract.
ADDED_KEY_FIELDS = ("tool_choice", "thinking", "betas", "anthropic_version")


def latest_user_text(req: CompleteRequest) -> str:
    return req.messages[-1].plain()


def exact_key(partition: str, req: CompleteRequest) -> str:
    return f"{partition}:{_digest(req.messages[-1].key())}"


# Content blocks whose every byte is in the request: keyed whole, they key safely.
KEYABLE_BLOCKS = frozenset({"text", "image", "document", "tool_use", "tool_result", "thinking",
                            "redacted_thinking", "search_result"})
# Tools the API runs itself: the answer depends on what they find, not only on the request.
SERVER_TOOLS = ("web_search", "web_fetch", "code_execution", "mcp")


def uncacheable(req: CompleteRequest) -> str | None:
    """Why the request's answer depends on more than its bytes (None: it does not),
    so that no key can say when it may be served again. A metric label: one of
    `unknown_field`, `url_source`, `unknown_block`, `server_tool`."""
    if req.extra:
        return "unknown_field"  # nothing says whether it changes the answer
    for tool in req.tools or ():
        kind = tool.get("type")
        if isinstance(kind, str) and kind.startswith(SERVER_TOOLS):
            return "server_tool"
    for msg in req.messages:
        if isinstance(msg.content, str):
            continue
        for block in msg.content:
            reason = _block_reason(block)
            if reason:
                return reason
    return None


def _block_reason(block: dict) -> str | None:
    if block.get("type") not in KEYABLE_BLOCKS:
        return "unknown_block"
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "url":
        return "url_source"  # what the URL serves may change under the same key
    nested = block.get("content")
    if isinstance(nested, list):  # a tool result's own blocks
        for inner in nested:
            if isinstance(inner, dict) and (reason := _block_reason(inner)):
                return reason
    return None


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
    # The model's Message as the API returned it (every block, id, stop_sequence):
    # a hit answers with it (the HTTP drop-in replays it). None in older entries.
    message: dict | None = None
    # The events a streamed miss sent, as the API sent them: a streamed hit replays them.
    events: list[dict] | None = None
    # The request's `cache.namespace` (a tenant), so an operator can flush it
    # (`llm.admin.flush`): the partition hashes it away. '' in older entries.
    namespace: str = ""

    def fresh(self, now: float) -> bool:
        return now < self.expires_at

    def age(self, now: float) -> float:
        return max(0.0, now - self.created_at)


def new_entry(req: CompleteRequest, partition: str, text: str, stop_reason: str | None,
              usage: Usage, cost: float, volatility: Volatility, now: float,
              user_seq: int = 0, message: dict | None = None) -> Entry:
    return Entry(id=exact_key(partition, req), partition=partition, user_id=req.user_id or "",
                 task=req.task, model=req.model, volatility=req.cache.volatility,
                 query=latest_user_text(req), text=text, stop_reason=stop_reason, usage=usage,
                 cost_usd=cost, created_at=now, expires_at=now + volatility.ttl_s,
                 user_seq=user_seq, message=message, namespace=req.cache.namespace)


# Answers the model finished. One cut off by `max_tokens` is partial, and one
# that stopped on `tool_use` waits for a tool result: served again, either would
# hand every later caller an unfinished answer as if it were the model's reply.
# A `tool_use` stop is the whole answer, though, to a request whose tools are in
# its key (`with_tools`): the caller runs the tool and asks again, in a new request.
COMPLETE_STOPS = frozenset({"end_turn", "stop_sequence"})


def cacheable(stop_reason: str | None, with_tools: bool = False) -> bool:
    return stop_reason in COMPLETE_STOPS or (with_tools and stop_reason == "tool_use")


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
