"""The bus is locked: every role may use exactly its subjects, strangers may not connect.

Each check asks the real NATS server started by the fixtures (users and
permissions rendered from `shared.permissions`): an allowed publish or
subscription draws no error, a forbidden one draws the server's
"permissions violation". The forbidden lists are written here from the
issue's threat list (what an agent worker must not do), not derived from the
table under test, so a wrong table fails.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from devstack import servers
from shared import bus, permissions, subjects
from tests.helpers import IDENTITIES, auth, client, eventually, never_within

pytestmark = pytest.mark.usefixtures("locked")


@pytest.fixture(scope="module")
def locked(nats_url):
    if nats_url not in IDENTITIES:
        pytest.skip("NATS given by NATS_URL: its users are the operator's")


def concrete(pattern: str) -> str:
    """A subject that `pattern` matches."""
    return ".".join("x" if t == "*" else "x.y" if t == ">" else t for t in pattern.split("."))


class Violations:
    """A connection as one role that collects the server's permission errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    async def on_error(self, exc: Exception) -> None:
        self.errors.append(str(exc))

    def of(self, kind: str, subject: str) -> list[str]:
        # nats-py lower-cases the server's -ERR text, subject included
        wanted = f'permissions violation for {kind} to "{subject}"'.lower()
        return [e for e in self.errors if wanted in e.lower()]


@contextlib.asynccontextmanager
async def connected(url: str, role: str):
    seen = Violations()
    async with client(url, role, role=role, error_cb=seen.on_error, allow_reconnect=False) as nc:
        yield nc, seen


async def refused(nc, check) -> None:
    """Wait until `check()` sees the refusals: the server sends them before the PONG of a
    flush, and the error callback runs soon after."""
    await nc.flush()
    await eventually(check, timeout=5, what="the refusals")


async def not_refused(nc, seen: Violations) -> None:
    """Prove nothing sent was refused: after the flush, no error arrives for a while."""
    await nc.flush()
    await never_within(0.2, lambda: seen.errors, what="a permission error")


# The agent worker's forbidden ground, from issue 10: internal events, the log, JetStream, evictions.
WORKER_MUST_NOT_PUBLISH = [
    "memory.changed.lead-1", "memory.forgotten.lead-1", "memory.log.lead-1", "memory.l1.evict",
    "memory.l2.evict", "memory.l3.forget", "memory.l3.get", "memory.l2.get", "llm.verdict",
    "audit.served.l2-gateway", "$JS.API.STREAM.DELETE.MEMORY", "$JS.API.STREAM.PURGE.MEMORY",
    "$JS.API.STREAM.INFO.MEMORY", "memory.deadletter.l2-gateway",
    # a forget is asked for through memory.forget only: not the jobs, not a tier's own forget
    "llm.forget", "memory.forgetjob.lead-1", "memory.forget.status", "$JS.API.STREAM.PURGE.FORGET",
    # the operators' LLM cache operations (issue 14): admin's, and the gateway's /admin routes'
    "llm.admin.lookup", "llm.admin.delete", "llm.admin.flush", "llm.admin.explain",
    # a caller's API key reaches the broker only from the gateway, which checked it
    "llm.complete.keyed", "llm.count_tokens",
]
WORKER_MUST_NOT_SUBSCRIBE = [
    "memory.changed.*", "memory.forgotten.*", "memory.log.>", "memory.l1.evict", "memory.l3.forget",
    "llm.verdict", "audit.served.*", "$JS.API.>", "memory.append", "llm.complete", ">",
    "_INBOX_l2-gateway.>", "_INBOX_memory-l1.>",
]


async def test_a_client_without_credentials_or_with_a_wrong_password_is_refused(nats_url):
    for credentials in (bus.BusAuth(), bus.BusAuth(user=permissions.WORKER, password="guess")):
        with pytest.raises(bus.BusAuthError, match="authorization violation"):
            await bus.connect(nats_url, credentials, connect_timeout=2, max_reconnect_attempts=-1)


async def test_the_worker_may_use_the_public_contract(nats_url):
    public = [subjects.MEMORY_APPEND, subjects.MEMORY_GET, subjects.memory_get_direct("pod-1"),
              subjects.MEMORY_FORGET, subjects.LLM_COMPLETE, subjects.LLM_STATS, subjects.AUDIT_STATS,
              "$SRV.PING", "$SRV.INFO.l2-gateway"]
    async with connected(nats_url, permissions.WORKER) as (nc, seen):
        await nc.subscribe(nc.new_inbox())
        for subject in public:
            await nc.publish(subject, b"{}")
        await not_refused(nc, seen)
    assert seen.errors == []


async def test_the_worker_cannot_forge_internal_events_or_touch_the_stream(nats_url):
    async with connected(nats_url, permissions.WORKER) as (nc, seen):
        for subject in WORKER_MUST_NOT_PUBLISH:
            await nc.publish(subject, b"{}")
        await refused(nc, lambda: all(seen.of("publish", s) for s in WORKER_MUST_NOT_PUBLISH))
    missing = [s for s in WORKER_MUST_NOT_PUBLISH if not seen.of("publish", s)]
    assert missing == []


@pytest.mark.parametrize("subject", WORKER_MUST_NOT_SUBSCRIBE)
async def test_the_worker_cannot_listen_to_internal_subjects(nats_url, subject):
    async with connected(nats_url, permissions.WORKER) as (nc, seen):
        await nc.subscribe(subject)
        await refused(nc, lambda: seen.of("subscription", subject))
    assert seen.of("subscription", subject)


async def test_a_forged_change_event_from_a_worker_reaches_nobody(nats_url):
    async with client(nats_url) as admin, connected(nats_url, permissions.WORKER) as (worker, seen):
        heard = await admin.subscribe(subjects.CHANGED_ALL)
        await admin.flush()
        forged = b'{"user_id": "lead-1", "kind": "append", "seq": 999999999}'
        await worker.publish(subjects.changed_subject("lead-1"), forged)
        await worker.publish(subjects.MEMORY_L1_EVICT, b'{"user_id": "lead-1"}')
        await refused(worker, lambda: seen.of("publish", subjects.changed_subject("lead-1")))
        with pytest.raises(asyncio.TimeoutError):
            await heard.next_msg(timeout=0.2)
    assert seen.of("publish", subjects.changed_subject("lead-1"))


@pytest.mark.parametrize("name", sorted(set(permissions.ROLES) - {permissions.ADMIN}))
async def test_each_role_may_use_every_subject_of_its_allow_list(nats_url, name):
    role = permissions.role(name)
    async with connected(nats_url, name) as (nc, seen):
        for pattern in role.subscribe:
            await nc.subscribe(pattern)
        for pattern in role.publish:
            await nc.publish(concrete(pattern), b"{}")
        await not_refused(nc, seen)
    assert seen.errors == []


# What no service role may do, whatever its job: delete the log, read another role's replies,
# answer a subject it does not own.
@pytest.mark.parametrize("name", permissions.SERVICE_ROLES)
async def test_no_service_role_may_delete_the_stream_or_read_another_roles_replies(nats_url, name):
    other = next(r for r in permissions.SERVICE_ROLES if r != name)
    async with connected(nats_url, name) as (nc, seen):
        await nc.publish(f"$JS.API.STREAM.DELETE.{subjects.STREAM}", b"")
        await nc.subscribe(f"{permissions.default_inbox(other)}.>")
        await nc.subscribe("_INBOX.>")
        await refused(nc, lambda: seen.of("publish", f"$JS.API.STREAM.DELETE.{subjects.STREAM}")
                      and seen.of("subscription", f"{permissions.default_inbox(other)}.>")
                      and seen.of("subscription", "_INBOX.>"))
    assert seen.of("publish", f"$JS.API.STREAM.DELETE.{subjects.STREAM}")
    assert seen.of("subscription", f"{permissions.default_inbox(other)}.>")
    assert seen.of("subscription", "_INBOX.>")


FORBIDDEN_TO = {  # role -> subjects it must not publish, from each service's job (not from the table)
    permissions.MEMORY_L1: [subjects.MEMORY_APPEND, "memory.log.lead-1", subjects.MEMORY_L3_FORGET,
                            subjects.LLM_VERDICT, "memory.changed.lead-1", subjects.LLM_FORGET],
    permissions.L3_INDEXER: ["memory.changed.lead-1", "memory.log.lead-1", subjects.MEMORY_L1_EVICT,
                             f"$JS.API.STREAM.PURGE.{subjects.STREAM}"],
    permissions.LLM_BROKER: ["memory.changed.lead-1", subjects.MEMORY_FORGET, "memory.log.lead-1",
                             f"$JS.API.STREAM.INFO.{subjects.STREAM}"],
    permissions.AUDITOR: ["memory.changed.lead-1", "memory.log.lead-1", subjects.LLM_COMPLETE,
                          f"$JS.API.STREAM.PURGE.{subjects.STREAM}"],
    permissions.L2_GATEWAY: [subjects.LLM_VERDICT, subjects.MEMORY_L1_EVICT, "audit.served.llm-broker",
                             f"$JS.API.STREAM.DELETE.{subjects.FORGET_STREAM}"],
}


# The operators' LLM cache operations: admin's, and the llm-gateway's (it serves them over
# HTTP behind its admin token); no other service's job needs them.
for _role in FORBIDDEN_TO:
    FORBIDDEN_TO[_role] += [subjects.LLM_ADMIN_DELETE, subjects.LLM_ADMIN_FLUSH]


@pytest.mark.parametrize("name", sorted(FORBIDDEN_TO))
async def test_each_service_role_is_refused_outside_its_job(nats_url, name):
    async with connected(nats_url, name) as (nc, seen):
        for subject in FORBIDDEN_TO[name]:
            await nc.publish(subject, b"{}")
        await refused(nc, lambda: all(seen.of("publish", s) for s in FORBIDDEN_TO[name]))
    assert [s for s in FORBIDDEN_TO[name] if not seen.of("publish", s)] == []


async def test_a_service_may_prove_its_identity_with_an_nkey_seed(tmp_path):
    """NATS_NKEY_SEED: the server knows only the public key; permissions follow the role as with a password."""
    import nacl.utils
    import nkeys

    seed = nkeys.encode_seed(nacl.utils.random(32), nkeys.PREFIX_BYTE_USER)
    (tmp_path / "l1.nk").write_bytes(seed)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    server = servers.start_nats(tmp_path / "nats", die_with_parent=True,
                                users=[permissions.user_entry(permissions.MEMORY_L1, nkey=public)])
    try:
        seen = Violations()
        nc = await bus.connect(server.url, bus.BusAuth(nkey_seed=str(tmp_path / "l1.nk")),
                               role=permissions.MEMORY_L1, error_cb=seen.on_error, allow_reconnect=False)
        try:
            await nc.subscribe(subjects.MEMORY_GET)
            await nc.publish(subjects.MEMORY_APPEND, b"{}")
            await refused(nc, lambda: seen.of("publish", subjects.MEMORY_APPEND))
        finally:
            await nc.close()
        assert seen.errors and seen.of("publish", subjects.MEMORY_APPEND) == seen.errors
        with pytest.raises(bus.BusAuthError):
            await bus.connect(server.url, bus.BusAuth(), connect_timeout=2)
    finally:
        server.stop()
