"""Every NATS subject and stream name in one place: this is the architecture.

Public (other teams' clients use these; see the design's contract):

    memory.append            -> l2-gateway   durable write
    memory.forget            -> l2-gateway   remove a user everywhere
    memory.get               -> memory-l1    queue group of sidecars
    memory.get.<l1-id>       -> memory-l1    one particular sidecar
    memory.l2.get            -> l2-gateway   Redis tier
    memory.l3.get            -> l3-semantic-indexer   Postgres + pgvector
    llm.complete             -> llm-broker
    llm.stats                -> llm-broker   running totals: calls, hits, tokens, cost, savings
    audit.stats              -> freshness-auditor  stale and false-hit rates

HTTP (not NATS): llm-gateway serves the Anthropic Messages API (`POST /v1/messages`,
`/v1/messages/count_tokens`) and turns each request into `llm.complete`.

Internal:

    memory.log.<user>        JetStream stream MEMORY: the durable log
    memory.changed.<user>    broadcast after L2 applied a message or a forget
    memory.forgotten.<user>  broadcast after a forget (the same event), for whoever needs only those
    memory.l3.forget         l2-gateway -> l3-semantic-indexer during forget
    llm.forget               l2-gateway -> llm-broker during forget (its reply confirms it)
    llm.count_tokens         llm-gateway -> llm-broker: the Messages API's count_tokens, upstream
    memory.forgetjob.<user>  JetStream work-queue stream FORGET: forgets not yet confirmed everywhere
    memory.forget.status     -> l2-gateway (admin)  is a forget of this user still pending?
    audit.served.<source>    tiers and llm-broker -> freshness-auditor, batches of served records
    memory.l1.evict          freshness-auditor -> every memory-l1: drop a user's window
    memory.l2.evict          freshness-auditor -> l2-gateway: drop a user's Redis window
    llm.verdict              freshness-auditor -> llm-broker: an audited hit was right/wrong
    llm.admin.lookup         -> llm-broker (admin, llm-gateway)  one cached entry by id
    llm.admin.delete         -> llm-broker (admin, llm-gateway)  drop one entry from both tiers
    llm.admin.flush          -> llm-broker (admin, llm-gateway)  drop a partition, namespace or user
    llm.admin.explain        -> llm-broker (admin, llm-gateway)  what a request would get, and why
    memory.deadletter.<svc>  JetStream stream MEMORY_DEAD: log messages a consumer could not use
    $KV.tiermem_state.<key>  JetStream KV bucket tiermem_state: which MEMORY stream the gateway owns

Who may publish and subscribe to each subject: `shared.permissions`.
"""

from __future__ import annotations

from shared.ids import to_token

MEMORY_APPEND = "memory.append"
MEMORY_FORGET = "memory.forget"
MEMORY_GET = "memory.get"
MEMORY_L2_GET = "memory.l2.get"
MEMORY_L3_GET = "memory.l3.get"
MEMORY_L3_FORGET = "memory.l3.forget"
MEMORY_FORGET_STATUS = "memory.forget.status"
LLM_FORGET = "llm.forget"
LLM_COMPLETE = "llm.complete"
# Internal, llm-gateway -> llm-broker: `llm.complete` with the caller's API key in the
# `Tiermem-Upstream-Key` header (GATEWAY_UPSTREAM_KEY=caller). A subject of its own so
# that the bus's permissions, not the broker, decide who may hand the broker a key.
LLM_COMPLETE_KEYED = "llm.complete.keyed"
LLM_COUNT_TOKENS = "llm.count_tokens"
LLM_STATS = "llm.stats"
AUDIT_STATS = "audit.stats"
AUDIT_SERVED_PREFIX = "audit.served"
AUDIT_SERVED_ALL = f"{AUDIT_SERVED_PREFIX}.*"
MEMORY_L1_EVICT = "memory.l1.evict"
MEMORY_L2_EVICT = "memory.l2.evict"
LLM_VERDICT = "llm.verdict"
LLM_ADMIN_LOOKUP = "llm.admin.lookup"
LLM_ADMIN_DELETE = "llm.admin.delete"
LLM_ADMIN_FLUSH = "llm.admin.flush"
LLM_ADMIN_EXPLAIN = "llm.admin.explain"
LLM_ADMIN = (LLM_ADMIN_LOOKUP, LLM_ADMIN_DELETE, LLM_ADMIN_FLUSH, LLM_ADMIN_EXPLAIN)

STREAM = "MEMORY"
LOG_PREFIX = "memory.log"
LOG_ALL = f"{LOG_PREFIX}.*"
CHANGED_PREFIX = "memory.changed"
CHANGED_ALL = f"{CHANGED_PREFIX}.*"
FORGOTTEN_PREFIX = "memory.forgotten"
FORGOTTEN_ALL = f"{FORGOTTEN_PREFIX}.*"
DEAD_LETTER_STREAM = "MEMORY_DEAD"
DEAD_LETTER_PREFIX = "memory.deadletter"
FORGET_STREAM = "FORGET"
FORGET_JOB_PREFIX = "memory.forgetjob"
STATE_BUCKET = "tiermem_state"  # KV bucket (stream KV_tiermem_state) of the l2-gateway

# Durable JetStream consumer of the indexer; shared by all its replicas.
L3_CONSUMER = "l3-semantic-indexer"
# Durable JetStream consumer of the forget jobs; shared by all gateway replicas.
FORGET_CONSUMER = "l2-gateway-forget"


def audit_served(source: str) -> str:
    return f"{AUDIT_SERVED_PREFIX}.{source}"


def memory_get_direct(l1_id: str) -> str:
    return f"{MEMORY_GET}.{l1_id}"


def log_subject(user_id: str) -> str:
    return f"{LOG_PREFIX}.{to_token(user_id)}"


def changed_subject(user_id: str) -> str:
    return f"{CHANGED_PREFIX}.{to_token(user_id)}"


def forgotten_subject(user_id: str) -> str:
    return f"{FORGOTTEN_PREFIX}.{to_token(user_id)}"
