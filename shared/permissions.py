"""Who may publish and subscribe to what on the bus: one identity per role.

Why: every NATS client used to be able to read or forget any user, delete the
stream or forge internal events. The server now refuses every subject a role
is not listed for here; this table is the only place those lists are written.
`devstack.nats.start_nats` renders it into the local server's config, the
Kubernetes NATS component carries the same lists (a test compares them), and
the tests check every allowed and a forbidden subject of each role against a
real server.

Replies. A service answers requests through `allow_responses` (it may publish
to the reply subject of a request it received, once), so no role needs a
blanket `_INBOX.>` publish right. Each service role receives its own replies
on an inbox prefix of its own (`_INBOX_<role>`, set by `inbox_prefix` when it
connects): a worker, which must be allowed `_INBOX.>` because any NATS client
in any language uses that prefix by default, therefore cannot read the
replies meant for the services (JetStream acks, other tiers' answers).

JetStream. Only the roles that touch the `MEMORY` stream get JetStream API
subjects, each only the calls it makes, all scoped to that stream; nobody but
admin may delete it.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared import subjects

S = subjects
STREAM = S.STREAM
DEAD = S.DEAD_LETTER_STREAM
STATE = f"KV_{S.STATE_BUCKET}"
FORGET = S.FORGET_STREAM
_DISCOVERY = ("$SRV.PING", "$SRV.PING.>", "$SRV.INFO", "$SRV.INFO.>", "$SRV.STATS", "$SRV.STATS.>")
_SERVE = ("$SRV.>",)  # a service answers the service API (nats.micro subscribes to $SRV.*)


@dataclass(frozen=True)
class Role:
    name: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    @property
    def inbox_prefix(self) -> str:
        return default_inbox(self.name)

    @property
    def serves(self) -> bool:
        """A role that answers requests (and so needs `allow_responses`)."""
        return "$SRV.>" in self.subscribe


def default_inbox(role: str) -> str:
    """The reply-inbox prefix a client of `role` uses (`_INBOX` for workers and admin)."""
    return "_INBOX" if role in (WORKER, ADMIN) else f"_INBOX_{role}"


def _inbox(role: str) -> str:
    return f"{default_inbox(role)}.>"


def _stream_reader(consumer: str = "*") -> tuple[str, ...]:
    """An ordered (ephemeral) or named consumer on MEMORY, direct gets, stream info."""
    return (f"$JS.API.STREAM.INFO.{STREAM}",
            f"$JS.API.DIRECT.GET.{STREAM}", f"$JS.API.DIRECT.GET.{STREAM}.>",
            f"$JS.API.STREAM.MSG.GET.{STREAM}",
            f"$JS.API.CONSUMER.CREATE.{STREAM}", f"$JS.API.CONSUMER.CREATE.{STREAM}.>",
            f"$JS.API.CONSUMER.INFO.{STREAM}.{consumer}",
            f"$JS.API.CONSUMER.DELETE.{STREAM}.{consumer}",
            f"$JS.FC.{STREAM}.>")


WORKER = "agent-worker"
ADMIN = "admin"
MEMORY_L1 = "memory-l1"
L2_GATEWAY = "l2-gateway"
L3_INDEXER = "l3-semantic-indexer"
LLM_BROKER = "llm-broker"
LLM_GATEWAY = "llm-gateway"
AUDITOR = "freshness-auditor"

ROLES: dict[str, Role] = {r.name: r for r in (
    Role(WORKER,
         publish=(S.MEMORY_APPEND, S.MEMORY_GET, f"{S.MEMORY_GET}.*", S.MEMORY_FORGET,
                  S.LLM_COMPLETE, S.LLM_STATS, S.AUDIT_STATS, *_DISCOVERY),
         subscribe=(_inbox(WORKER),)),
    Role(MEMORY_L1,
         publish=(S.MEMORY_L2_GET, S.audit_served(MEMORY_L1), f"$JS.API.STREAM.INFO.{STREAM}"),
         subscribe=(S.MEMORY_GET, f"{S.MEMORY_GET}.*", S.CHANGED_ALL, S.MEMORY_L1_EVICT,
                    *_SERVE, _inbox(MEMORY_L1))),
    Role(L2_GATEWAY,
         publish=(S.LOG_ALL, S.CHANGED_ALL, S.FORGOTTEN_ALL, S.MEMORY_L3_GET, S.MEMORY_L3_FORGET,
                  S.audit_served(L2_GATEWAY), f"{S.DEAD_LETTER_PREFIX}.{L2_GATEWAY}",
                  *_stream_reader(),
                  f"$JS.API.STREAM.CREATE.{STREAM}", f"$JS.API.STREAM.PURGE.{STREAM}",
                  f"$JS.API.STREAM.UPDATE.{STREAM}",  # retention limits (shared.stream.apply_retention)
                  f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.*",  # the applier's pull consumer
                  f"$JS.API.STREAM.INFO.{DEAD}", f"$JS.API.STREAM.CREATE.{DEAD}",
                  # the marker of the MEMORY stream it owns (services.l2_gateway.log_guard)
                  f"$JS.API.STREAM.INFO.{STATE}", f"$JS.API.STREAM.CREATE.{STATE}",
                  f"$JS.API.DIRECT.GET.{STATE}.>", f"$KV.{S.STATE_BUCKET}.>",
                  f"$JS.ACK.{STREAM}.>",
                  # durable forget jobs (services.l2_gateway.forget)
                  S.LLM_FORGET, f"{S.FORGET_JOB_PREFIX}.*",
                  f"$JS.API.STREAM.INFO.{FORGET}", f"$JS.API.STREAM.CREATE.{FORGET}",
                  f"$JS.API.STREAM.MSG.DELETE.{FORGET}", f"$JS.API.DIRECT.GET.{FORGET}",
                  f"$JS.API.CONSUMER.CREATE.{FORGET}.{S.FORGET_CONSUMER}.>",
                  f"$JS.API.CONSUMER.INFO.{FORGET}.{S.FORGET_CONSUMER}",
                  f"$JS.API.CONSUMER.MSG.NEXT.{FORGET}.{S.FORGET_CONSUMER}",
                  f"$JS.ACK.{FORGET}.{S.FORGET_CONSUMER}.>"),
         subscribe=(S.MEMORY_APPEND, S.MEMORY_FORGET, S.MEMORY_FORGET_STATUS, S.MEMORY_L2_GET,
                    S.MEMORY_L2_EVICT, *_SERVE, _inbox(L2_GATEWAY))),
    Role(L3_INDEXER,
         publish=(S.audit_served(L3_INDEXER), f"{S.DEAD_LETTER_PREFIX}.{L3_INDEXER}",
                  *_stream_reader(S.L3_CONSUMER),
                  f"$JS.API.STREAM.INFO.{DEAD}", f"$JS.API.STREAM.CREATE.{DEAD}",
                  f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.{S.L3_CONSUMER}",
                  f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{S.L3_CONSUMER}",
                  f"$JS.ACK.{STREAM}.{S.L3_CONSUMER}.>",
                  S.LLM_COMPLETE),  # rolling summaries (services.l3_semantic_indexer.summaries)
         subscribe=(S.MEMORY_L3_GET, S.MEMORY_L3_FORGET, *_SERVE, _inbox(L3_INDEXER))),
    Role(LLM_BROKER,
         # the gateway's inbox: a streamed miss's events (CompleteRequest.stream_to)
         publish=(S.audit_served(LLM_BROKER), _inbox(LLM_GATEWAY)),
         subscribe=(S.LLM_COMPLETE, S.LLM_COMPLETE_KEYED, S.LLM_STATS, S.LLM_VERDICT,
                    S.LLM_FORGET, S.CHANGED_ALL,
                    S.LLM_COUNT_TOKENS, *S.LLM_ADMIN, *_SERVE, _inbox(LLM_BROKER))),
    # The HTTP drop-in: asks the broker, nothing else (it holds no state). It may ask the
    # admin subjects (`llm.admin.*`) because it serves them over HTTP as `/admin/...`, to
    # holders of GATEWAY_ADMIN_TOKEN only (none set: the routes answer 404). Whoever runs
    # the gateway thereby lets that token look up, delete and flush LLM cache entries.
    # Only it may publish `llm.complete.keyed`: the one way to hand the broker an API key.
    Role(LLM_GATEWAY,
         publish=(S.LLM_COMPLETE, S.LLM_COMPLETE_KEYED, S.LLM_COUNT_TOKENS, *S.LLM_ADMIN),
         subscribe=(*_SERVE, _inbox(LLM_GATEWAY))),
    Role(AUDITOR,
         publish=(S.MEMORY_L1_EVICT, S.MEMORY_L2_EVICT, S.LLM_VERDICT, *_stream_reader()),
         subscribe=(S.AUDIT_SERVED_ALL, S.FORGOTTEN_ALL, S.AUDIT_STATS,
                    *_SERVE, _inbox(AUDITOR))),
    Role(ADMIN, publish=(">",), subscribe=(">",)),
)}

SERVICE_ROLES = (MEMORY_L1, L2_GATEWAY, L3_INDEXER, LLM_BROKER, LLM_GATEWAY, AUDITOR)


def role(name: str) -> Role:
    try:
        return ROLES[name]
    except KeyError:
        raise ValueError(f"unknown NATS role {name!r}; known: {sorted(ROLES)}") from None


def nats_users(passwords: dict[str, str]) -> list[dict]:
    """The `authorization.users` list of a nats-server config for these roles (role -> password)."""
    return [user_entry(name, password=password) for name, password in passwords.items()]


def user_entry(name: str, *, password: str | None = None, nkey: str | None = None) -> dict:
    """One `authorization.users` entry: role `name` with a password, or an nkey (its public key).

    Roles that answer requests get `allow_responses` (one reply per request,
    within the default expiry); admin gets everything.
    """
    r = role(name)
    entry: dict = {"nkey": nkey} if nkey else {"user": name, "password": password}
    if name != ADMIN:
        perms: dict = {"publish": {"allow": list(r.publish)}, "subscribe": {"allow": list(r.subscribe)}}
        if r.serves:
            perms["allow_responses"] = True
        entry["permissions"] = perms
    return entry
