"""The wire contract: one msgspec Struct per request and reply, codecs built once.

Public bodies follow ../shared/handbook/DESIGN.md exactly. Wire types never
forbid unknown fields (that would break rolling upgrades); new fields are
appended with defaults. Shape and type rules live here as msgspec constraints,
so a bad body is rejected while decoding with a message naming the field;
limits that depend on settings (text size) are checked by `check_append`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import msgspec

from shared.errors import BadRequest, PayloadTooLarge
from shared.ids import ID_PATTERN

Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
MsgId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Role = Literal["user", "assistant", "system"]
Op = Literal["recent", "search", "context"]
MAX_N = 1000
MAX_K = 100
MAX_QUERY_CHARS = 4096
MAX_BUDGET_TOKENS = 200_000
DEFAULT_BUDGET_TOKENS = 2000


class Message(msgspec.Struct):
    """One stored message as tiers return it (`score` only for search)."""

    seq: int
    msg_id: str
    role: str
    bot_id: str
    text: str
    ts: str
    score: float | None = None


# --- memory.append -----------------------------------------------------------


class AppendRequest(msgspec.Struct):
    user_id: Id
    bot_id: Id
    role: Role
    text: str
    msg_id: MsgId
    ts: datetime | None = None


class AppendReply(msgspec.Struct):
    user_id: str
    seq: int
    duplicate: bool


class LogEntry(msgspec.Struct):
    """What the durable stream holds for one message (its seq is the stream's)."""

    user_id: str
    bot_id: str
    role: str
    text: str
    msg_id: str
    ts: str

    def at(self, seq: int) -> Message:
        return Message(seq=seq, msg_id=self.msg_id, role=self.role,
                       bot_id=self.bot_id, text=self.text, ts=self.ts)


def check_append(req: AppendRequest, max_text_bytes: int) -> LogEntry:
    """Validate what msgspec cannot, and build the log entry to publish."""
    size = len(req.text.encode("utf-8", "surrogatepass"))
    if size > max_text_bytes:
        raise PayloadTooLarge(f"text is {size} bytes; the limit is {max_text_bytes}")
    if not req.text.strip():
        raise BadRequest("text must not be empty")
    _reject_surrogates(req.text, "text")
    if "\x00" in req.text:
        raise BadRequest("text must not contain NUL characters")
    _reject_surrogates(req.msg_id, "msg_id")
    return LogEntry(user_id=req.user_id, bot_id=req.bot_id, role=req.role,
                    text=req.text, msg_id=req.msg_id, ts=format_ts(req.ts))


def format_ts(ts: datetime | None) -> str:
    """RFC 3339 in UTC with a `Z`; naive times are taken as UTC; none means now."""
    if ts is None:
        ts = datetime.now(timezone.utc)
    elif ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return ts.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _reject_surrogates(value: str, field: str) -> None:
    # JSON `\ud800` escapes decode to lone surrogates, which are not UTF-8.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{field} is not valid UTF-8 (lone surrogate)") from None


# --- memory.get / memory.l2.get / memory.l3.get ------------------------------


class GetRequest(msgspec.Struct):
    user_id: Id
    op: Op = "recent"
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] = 10
    min_seq: Annotated[int, msgspec.Meta(ge=0)] | None = None
    query: str | None = None
    k: Annotated[int, msgspec.Meta(ge=1, le=MAX_K)] = 5
    # op "context" only: the token budget of the whole context, and (tier to tier) the first
    # seq of the recent window, below which L3 looks for relevant messages and the summary
    budget_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_BUDGET_TOKENS)] = DEFAULT_BUDGET_TOKENS
    before_seq: Annotated[int, msgspec.Meta(ge=0)] | None = None


def check_get(req: GetRequest) -> GetRequest:
    if req.op == "search" or (req.op == "context" and req.query is not None):
        if req.query is None or not req.query.strip():
            raise BadRequest(f"{req.op} needs a non-empty `query`" if req.op == "search"
                             else "`query`, when given, must not be empty")
        if len(req.query) > MAX_QUERY_CHARS:
            raise BadRequest(f"query is longer than {MAX_QUERY_CHARS} characters")
        _reject_surrogates(req.query, "query")
    return req


class GetReply(msgspec.Struct):
    user_id: str
    tier: str
    seq: int
    messages: list[Message]


class L2Reply(msgspec.Struct):
    """`GetReply` as L2 sends it: the messages are the JSON Redis holds, spliced
    in as is (decoding and re-encoding 50 of them cost ~23 µs a read). Same
    bytes on the wire as `GetReply`: a reader decodes it as one."""

    user_id: str
    tier: str
    seq: int
    messages: list[msgspec.Raw]


# --- memory.get op "context" --------------------------------------------------


class Summary(msgspec.Struct):
    """A rolling summary of a user's messages `from_seq`..`upto_seq` (made through llm.complete)."""

    text: str
    from_seq: int
    upto_seq: int
    tokens: int


class ContextParts(msgspec.Struct):
    """L3's part of a context (op "context" on memory.l3.get): what lies below `before_seq`."""

    user_id: str
    seq: int  # L3's floor for this user: the parts are complete up to here
    summary: Summary | None
    relevant: list[Message]


class ContextReply(msgspec.Struct):
    """What a bot puts in its prompt, within `budget_tokens` (estimated, `shared.tokens`).

    `messages` is the recent window (oldest first, contiguous, the newest
    included; `seq` is as for `recent`, so `min_seq` holds), `relevant` older
    messages that match the query (best first), `summary` the rolling summary
    of older history. `covers` says which seqs each part stands for and
    `missing` which parts could not be had (a tier down, nothing summarised
    yet): a bot never waits for a summary being written.
    """

    user_id: str
    tier: str
    seq: int
    messages: list[Message]
    relevant: list[Message]
    summary: Summary | None
    tokens: int
    budget_tokens: int
    covers: dict[str, list[int]]
    missing: list[str]


def fit_reply(reply: msgspec.Struct, op: str, max_payload: int) -> msgspec.Raw:
    """`reply` (a `GetReply`, or any struct with `messages`) as JSON, or 413 if it cannot be sent.

    NATS refuses a message larger than the server's `max_payload` (1 MiB by
    default): the reply would never leave (a timeout for the caller, or a 500),
    while n=1000 of 64 KiB texts is 64 MiB. Every tier encodes its answer here
    before replying; the refusal says how many messages do fit, counted on this
    very reply: the newest for `recent`, the best for `search`.
    """
    body = encode(reply)
    if len(body) <= max_payload:
        return msgspec.Raw(body)
    sizes = [len(encode(m)) for m in reply.messages]
    fits = fitting(len(body), sizes, newest_last=op != "search", max_payload=max_payload)
    field = "k" if op == "search" else "n"
    advice = (f"ask for fewer messages ({field}<={fits})" if fits else
              "even one message does not fit")
    raise PayloadTooLarge(f"reply of {len(body)} bytes exceeds max_payload {max_payload}; {advice}")


def fitting(total: int, sizes: list[int], *, newest_last: bool, max_payload: int) -> int:
    """How many of the messages (encoded `sizes`, in reply order) fit in `max_payload`.

    A smaller `recent` keeps the newest (the end of the list), a smaller
    `search` the best (the start); the rest of the reply (`total` minus the
    messages and their commas) stays.
    """
    used = total - sum(sizes) - max(len(sizes) - 1, 0)
    count = 0
    for size in reversed(sizes) if newest_last else sizes:
        used += size + (1 if count else 0)
        if used > max_payload:
            break
        count += 1
    return count


# --- memory.forget -----------------------------------------------------------


class ForgetRequest(msgspec.Struct):
    user_id: Id


class ForgetReply(msgspec.Struct):
    user_id: str
    deleted: int


class L3ForgetRequest(msgspec.Struct):
    """Internal: drop a user's rows up to the log position the purge covered."""

    user_id: Id
    upto_seq: int


class ForgetJob(msgspec.Struct):
    """Internal: a pending forget as the work-queue stream `FORGET` holds it
    (`memory.forgetjob.<user>`); a job recorded by one gateway version is run by
    the next, so it evolves like every wire type."""

    user_id: str
    upto_seq: int  # the log position the forget covers: later appends are kept
    recorded_at: float  # unix seconds
    not_before: float  # the consumer leaves it to the request that recorded it until then


# --- memory.forget.status (admin) --------------------------------------------
# The request is a `ForgetRequest`.


class ForgetStatus(msgspec.Struct):
    user_id: str
    pending: bool
    since: float | None = None  # when the oldest pending job was recorded (unix seconds)
    upto_seq: int | None = None


# --- memory.changed.<user> (internal broadcast) ------------------------------


class Changed(msgspec.Struct):
    """L2 applied `message` (op=append) or dropped the user (op=forget).

    `prev_seq` is the user's previous newest seq as L2 had applied it: a
    listener whose own newest seq differs has missed something and must drop
    its window instead of appending. `count` is the user's message count.
    """

    op: Literal["append", "forget"]
    user_id: str
    seq: int
    prev_seq: int
    count: int
    message: Message | None = None


# --- errors ------------------------------------------------------------------


class ErrorDetail(msgspec.Struct):
    code: int
    message: str


class ErrorReply(msgspec.Struct):
    error: ErrorDetail


encode = msgspec.json.Encoder().encode


def decoder(kind: type) -> msgspec.json.Decoder:
    """One decoder per type, built once at import time by whoever needs it."""
    return msgspec.json.Decoder(kind)


# --- llm.complete ------------------------------------------------------------

MAX_MODEL_CHARS = 128
STREAM_SUBJECT = r"^_INBOX[A-Za-z0-9_-]*\.[A-Za-z0-9_.-]+$"  # a reply inbox, no wildcards
STREAM_HEADER = "Tiermem-Stream"  # marks a streamed event among a request's replies
# The caller's API key, on `llm.complete.keyed` and `llm.count_tokens` only: a header, never
# a body field, so it is in no struct that is logged, cached, or published for audit.
UPSTREAM_KEY_HEADER = "Tiermem-Upstream-Key"
Task = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]


class TextBlock(msgspec.Struct):
    text: str
    type: Literal["text"] = "text"


# One content block of the Messages API (text, image, document, tool_use,
# tool_result, thinking, ...) as the caller sent it: passed upstream unchanged,
# and keyed whole (`policy`), so no field of it is lost on the way.
Block = dict[str, Any]
_PURE_TEXT = frozenset({"type", "text", "cache_control"})


class ChatMessage(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    def plain(self) -> str:
        """The text the message carries (its text blocks joined; other blocks have none)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(b["text"] for b in self.content
                       if b.get("type") == "text" and isinstance(b.get("text"), str))

    def only_text(self) -> bool:
        """Nothing but text: `plain()` is all the model reads of it (cache_control changes
        what is billed, never the answer)."""
        return isinstance(self.content, str) or all(
            b.get("type") == "text" and b.keys() <= _PURE_TEXT for b in self.content)

    def key(self) -> str | list:
        """What of this message goes into the cache key: its text, or, when it carries
        anything else (an image, a tool call or result), every block minus cache_control."""
        if self.only_text():
            return self.plain()
        return [without_cache_control(b) for b in self.content]


def without_cache_control(block: Block) -> Block:
    return {k: v for k, v in block.items() if k != "cache_control"}


class CacheOptions(msgspec.Struct):
    volatility: str = "static"
    mode: Literal["semantic", "exact", "off"] = "semantic"
    scope: Literal["user", "global"] = "user"
    # Additions (the HTTP drop-in's `tiermem-*` headers map onto these):
    namespace: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{0,64}$")] = ""  # a tenant: its own partitions
    max_age_s: Annotated[float, msgspec.Meta(ge=0)] | None = None  # an older entry is no hit
    refresh: bool = False  # skip the lookup: ask the model, store its answer
    store: bool = True  # False: look up, but never store this request's answer


class CompleteRequest(msgspec.Struct, kw_only=True):
    task: Task
    # Required for scope "user" (checked in __post_init__), and for a volatility class
    # the user's messages invalidate (`policy.check_request`); optional otherwise.
    user_id: Id | None = None
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_MODEL_CHARS)]
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    system: str | list[Block] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=128_000)] = 1024
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=1)] | None = None
    stop_sequences: list[str] | None = None
    tools: list[dict] | None = None
    cache: CacheOptions = msgspec.field(default_factory=CacheOptions)
    bot_id: Id | None = None
    # Additions: the rest of the Messages API request, passed upstream unchanged.
    tool_choice: dict | None = None
    thinking: dict | None = None
    metadata: dict | None = None  # e.g. {"user_id": ...}; not in the key (the answer ignores it)
    betas: list[str] | None = None  # the `anthropic-beta` header
    anthropic_version: str | None = None  # the `anthropic-version` header, if not the SDK's
    # Any other top-level field of the API request: passed upstream, never cached
    # (nothing says whether it changes the answer); counted as uncacheable.
    extra: dict[str, Any] | None = None
    # Stream a miss through as the model writes it (the HTTP drop-in's `stream: true`):
    # the broker publishes each Messages API event, as the API sent it, to this subject
    # (with the header `Tiermem-Stream: miss`, or `bypass` for an answer the cache stood
    # aside for) before its reply. Usually the request's own reply subject, so events
    # and reply arrive in order on one subscription.
    stream_to: Annotated[str, msgspec.Meta(pattern=STREAM_SUBJECT)] | None = None

    def __post_init__(self) -> None:
        if self.user_id is None and self.cache.scope == "user":
            raise ValueError("user_id is required for scope 'user' (only scope 'global' may omit it)")

    def system_text(self) -> str:
        if self.system is None or isinstance(self.system, str):
            return self.system or ""
        return "".join(b["text"] for b in self.system
                       if b.get("type") == "text" and isinstance(b.get("text"), str))

    def system_key(self) -> str | list:
        """The system prompt as the cache key sees it: its text, or its blocks (minus
        cache_control) when they carry more than text."""
        if self.system is None or isinstance(self.system, str) or all(
                b.get("type") == "text" and b.keys() <= _PURE_TEXT for b in self.system):
            return self.system_text()
        return [without_cache_control(b) for b in self.system]

    def plain_text(self) -> bool:
        """Only text in and no tools: the requests semantic matching is for."""
        return (not self.tools and self.tool_choice is None and self.thinking is None
                and all(m.only_text() for m in self.messages))

    def prefilled(self) -> bool:
        """The last turn is the assistant's: the answer continues it, so only its exact key fits."""
        return self.messages[-1].role == "assistant"


def check_complete(req: CompleteRequest, max_prompt_chars: int) -> CompleteRequest:
    """Rules the Messages API enforces, checked before anything costs money.

    As the API does, consecutive turns of one role are accepted (the model
    reads them as one) and a last assistant turn is a prefill the answer
    continues; it may not end in whitespace."""
    if req.messages[0].role != "user":
        raise BadRequest(f"the first message must be from the user; messages[0] is {req.messages[0].role!r}")
    for i, msg in enumerate(req.messages):
        if isinstance(msg.content, list):
            for j, block in enumerate(msg.content):
                if not isinstance(block.get("type"), str):
                    raise BadRequest(f"messages[{i}].content[{j}] needs a string `type`")
                if block["type"] == "text" and not isinstance(block.get("text"), str):
                    raise BadRequest(f"messages[{i}].content[{j}].text must be a string")
        if not msg.plain().strip() and msg.only_text():
            raise BadRequest(f"messages[{i}] has no text")
    last = req.messages[-1]
    if last.role == "assistant" and last.only_text() and last.plain() != last.plain().rstrip():
        raise BadRequest("a final assistant message (a prefill) must not end with whitespace")
    if isinstance(req.system, list):
        for j, block in enumerate(req.system):
            if block.get("type") != "text" or not isinstance(block.get("text"), str):
                raise BadRequest(f"system[{j}] must be a text block")
    texts = [req.system_text(), *(m.plain() for m in req.messages), *(req.stop_sequences or [])]
    for text in texts:
        _reject_surrogates(text, "prompt")
    # Everything the model reads counts: tools, and blocks other than text, as the
    # characters of their JSON (an image's base64 too: it travels on the bus).
    other = [b for m in req.messages if not m.only_text() for b in m.content
             if b.get("type") != "text"]
    size = (sum(map(len, texts)) + (_json_chars(req.tools, "tools") if req.tools else 0)
            + (_json_chars(other, "content") if other else 0))
    if size > max_prompt_chars:
        raise PayloadTooLarge(f"prompt is {size} characters (system, messages, tools and "
                              f"stop_sequences); the limit is {max_prompt_chars}")
    return req


def _json_chars(value, field: str) -> int:
    try:
        return len(encode(value).decode())
    except UnicodeEncodeError:
        raise BadRequest(f"{field} is not valid UTF-8 (lone surrogate)") from None


class Usage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class CacheInfo(msgspec.Struct):
    status: Literal["hit", "miss", "off"]
    match: Literal["exact", "semantic"] | None = None
    similarity: float | None = None
    age_s: float | None = None
    entry_id: str | None = None  # the entry that answered, or that this answer was stored as
    # Why the cache stood aside (status "off"): "mode_off" (asked), "refresh" (forced), or
    # what made the request one the cache cannot key safely (`policy.uncacheable`).
    reason: str | None = None
    stored: bool | None = None  # a miss: was its answer cached (complete, and allowed)?


class CompleteReply(msgspec.Struct):
    text: str
    content: list[TextBlock]  # the text blocks (`message` has every block)
    model: str
    stop_reason: str | None
    usage: Usage
    cost_usd: float
    saved_usd: float
    cache: CacheInfo
    # The model's Message object as the API returned it (every content block, id,
    # stop_sequence, usage): what the HTTP drop-in answers with, verbatim. None for
    # entries cached before it was kept.
    message: dict[str, Any] | None = None
    # A hit of a request with `stream_to`: the events its miss streamed, to replay as
    # they were (None: the miss was not streamed; rebuild them from `message`).
    events: list[dict[str, Any]] | None = None


class CountTokensRequest(msgspec.Struct, kw_only=True):
    """Internal, llm-gateway -> llm-broker: the Messages API's count_tokens, asked upstream
    by the broker (the one holder of the API key and the one upstream path)."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_MODEL_CHARS)]
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    system: str | list[Block] | None = None
    tools: list[dict] | None = None
    tool_choice: dict | None = None
    thinking: dict | None = None
    betas: list[str] | None = None
    anthropic_version: str | None = None
    extra: dict[str, Any] | None = None


class CountTokensReply(msgspec.Struct):
    input_tokens: int


# --- llm.stats ---------------------------------------------------------------


class LLMStatsRequest(msgspec.Struct):
    pass


class LLMStatsReply(msgspec.Struct):
    """The llm-broker's running totals, summed over every replica."""

    requests: int = 0
    hits_exact: int = 0
    hits_semantic: int = 0
    misses: int = 0
    uncached: int = 0
    upstream_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0
    saved_usd: float = 0.0
    hit_rate: float = 0.0


# --- llm.admin.* (admin identity only; the llm-gateway serves them as /admin/...) ---

EntryId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Partition = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]  # `policy.partition_key`
Namespace = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]


class AdminEntryRequest(msgspec.Struct):
    """`llm.admin.lookup` and `llm.admin.delete`: one entry, by the id a reply's
    `cache.entry_id` (the gateway's `tiermem-entry` header) named."""

    entry_id: EntryId


class AdminEntry(msgspec.Struct, kw_only=True):
    """One cached answer as an operator sees it. `ttl_left_s` is negative once it
    expired (the row waits for the sweeper); `tiers` says where it is: `exact`
    (Redis, under the key epoch in force) and/or `semantic` (Postgres)."""

    entry_id: str
    partition: str
    user_id: str
    namespace: str
    task: str
    model: str
    volatility: str
    query: str  # the latest user message it answered
    text: str
    stop_reason: str | None
    usage: Usage
    cost_usd: float
    created_at: float
    age_s: float
    expires_at: float
    ttl_left_s: float
    fresh: bool
    tiers: list[str]


class AdminDeleteReply(msgspec.Struct):
    entry_id: str
    deleted: bool  # False: neither tier held it


class AdminFlushRequest(msgspec.Struct):
    """`llm.admin.flush`: exactly one of a partition (`policy.partition_key`, as
    `llm.admin.explain` or a lookup shows it), a namespace (`cache.namespace`,
    the gateway's `tiermem-namespace`) or a user (every entry their requests made)."""

    partition: Partition | None = None
    namespace: Namespace | None = None
    user_id: Id | None = None


class AdminFlushReply(msgspec.Struct):
    deleted: int  # entries dropped (the larger tier's count)
    partition: str | None = None
    namespace: str | None = None
    user_id: str | None = None


class GuardVerdict(msgspec.Struct):
    serve: bool
    reason: str
    score: float


class AdminCandidate(msgspec.Struct, kw_only=True):
    """A semantic neighbour of the request in its partition, as the broker judged it:
    the guard's verdict at the partition's threshold, then (if the guard would serve
    it) why it still may not be served (`refused`: too_old, user_spoke, events_lost,
    ...; None: it would be served)."""

    entry_id: str
    query: str
    similarity: float
    guard: GuardVerdict
    refused: str | None = None


class AdminExplainReply(msgspec.Struct, kw_only=True):
    """`llm.admin.explain` (the request is an `llm.complete` body): what the broker
    would do with it now, and why, without calling the model or storing anything.

    `decision`: `hit_exact`, `hit_semantic`, `miss` (the model would be asked; its
    answer stored if `would_store` and the model finishes it) or `bypass` (the cache
    stands aside: `reason` is mode_off or what makes the request unkeyable). Refresh
    requests are misses with reason `refresh`."""

    decision: Literal["hit_exact", "hit_semantic", "miss", "bypass"]
    reason: str | None = None
    partition: str | None = None
    exact_key: str | None = None
    exact: AdminEntry | None = None  # the fresh exact entry under that key, if any
    exact_refused: str | None = None  # why it would not be served (too_old, user_spoke, ...)
    semantic: bool = False  # was the semantic tier consulted (mode semantic, text only)
    threshold: float | None = None  # the partition's current guard threshold
    candidates: list[AdminCandidate] = []  # best first
    entry_id: str | None = None  # the entry that would answer (a hit)
    would_store: bool = False


# --- audit.served.* (internal) and audit.stats (public) ----------------------


class ServedMemory(msgspec.Struct, kw_only=True):
    """What one tier answered to one `memory.get`: enough to judge it later.

    `at` is when the tier answered (unix seconds, its clock); `seq` the reply's
    seq; `seqs` the seqs of the messages it returned, in reply order. `l1_id`
    names the sidecar that answered (tier l1). `trace_id`/`span_id` link the
    audit to the lookup it audits.
    """

    tier: str
    user_id: str
    op: str
    n: int
    min_seq: int | None
    seq: int
    seqs: list[int]
    at: float
    l1_id: str = ""
    trace_id: str = ""
    span_id: str = ""


class ToolCall(msgspec.Struct):
    """A tool call an answer made (a `tool_use` block without its id, which differs
    between two calls that are the same)."""

    name: str
    input: Any


def tool_calls(message: dict | None) -> list[ToolCall] | None:
    """The tool calls of a Message, in order (None: no Message to read them from)."""
    if message is None:
        return None
    return [ToolCall(name=b.get("name", ""), input=b.get("input"))
            for b in message.get("content") or () if b.get("type") == "tool_use"]


class ServedLLM(msgspec.Struct, kw_only=True):
    """One llm-broker hit: the request as asked, the entry that answered it.

    `text` is the answer's text only: an answer that calls tools is judged by its
    calls too (`tool_calls`; None from a broker that did not send them, or an entry
    cached before whole messages were kept)."""

    entry_id: str
    partition: str
    match: str  # exact | semantic
    similarity: float
    age_s: float
    saved_usd: float
    text: str  # the answer served
    request: CompleteRequest
    at: float
    trace_id: str = ""
    span_id: str = ""
    # semantic hits: the guard's score and the partition's threshold it passed (the
    # broker's false-hit bound weighs each verdict by them, services/llm_broker/bound.py)
    score: float | None = None
    threshold: float | None = None
    tool_calls: list[ToolCall] | None = None


class ServedBatch(msgspec.Struct, kw_only=True):
    """Records are sent in batches: one NATS message per flush, not per request."""

    source: str  # the publishing service, e.g. "memory-l1"
    memory: list[ServedMemory] = []
    llm: list[ServedLLM] = []
    dropped: int = 0  # records the publisher shed since its last batch (queue full)


class EvictRequest(msgspec.Struct):
    """Internal: drop a user's window from a memory tier (the auditor found it stale)."""

    user_id: Id
    reason: str = ""


class EvictReply(msgspec.Struct):
    user_id: str
    evicted: bool


class PartitionBound(msgspec.Struct, kw_only=True):
    """One partition's false-hit bound as the llm-broker keeps it: its threshold and
    the audited semantic hits counted at that threshold (since it last moved)."""

    threshold: float
    level: int = 0  # steps above the guard's fitted threshold
    checks: int = 0
    wrong: int = 0
    false_hit_rate: float = 0.0  # wrong / checks
    upper_bound: float = 1.0  # its Wilson upper bound, one-sided 95 %
    max_false_hit_rate: float = 0.01  # the bound the threshold is kept to
    moves: int = 0  # times the threshold moved (tightened or loosened)


class LLMVerdict(msgspec.Struct):
    """Internal, auditor -> llm-broker: an audited hit was right or wrong."""

    entry_id: str
    partition: str
    match: str
    wrong: bool
    score: float | None = None  # the served record's (semantic hits)
    threshold: float | None = None  # the threshold the hit was served at


class LLMVerdictReply(msgspec.Struct):
    evicted: bool
    threshold: float | None = None  # the partition's semantic threshold after the verdict
    bound: PartitionBound | None = None  # the partition's false-hit bound after it


class AuditStatsRequest(msgspec.Struct):
    pass


class Freshness(msgspec.Struct):
    """Memory audits of one tier."""

    served: int = 0  # records received (before sampling)
    checked: int = 0
    stale: int = 0
    inconclusive: int = 0  # e.g. the user was forgotten after the read
    evicted: int = 0
    stale_rate: float = 0.0


class Accuracy(msgspec.Struct):
    """LLM hit audits of one volatility class or task."""

    served: int = 0
    checked: int = 0
    wrong: int = 0
    evicted: int = 0
    false_hit_rate: float = 0.0
    upper_bound: float = 1.0  # Wilson upper bound of false_hit_rate, one-sided 95 % (1.0 if unchecked)


class AuditStatsReply(msgspec.Struct):
    since: str  # ISO time the counts start (the window they cover ends now)
    window_s: float
    memory: dict[str, Freshness]  # by tier: l1, l2, l3
    llm_by_volatility: dict[str, Accuracy]
    llm_by_task: dict[str, Accuracy]
    audit_spend_usd: float = 0.0
    saved_usd: float = 0.0  # what the audited hits' cache saved (the budget's base)
    budget_fraction: float = 0.0
    skipped_over_budget: int = 0
    records_dropped: int = 0
    # The false-hit bound (the broker's `max_false_hit_rate`; None before any LLM verdict),
    # audits by match (exact, semantic: the bound is on semantic hits), and the partitions
    # whose threshold the bound moved most (at most PARTITIONS_REPORTED, tightest first).
    max_false_hit_rate: float | None = None
    llm_by_match: dict[str, Accuracy] = {}
    partitions: dict[str, PartitionBound] = {}
    partitions_audited: int = 0  # partitions with a semantic verdict
    partitions_tightened: int = 0  # of those, above the fitted threshold now
