"""The durable message log: JetStream stream `MEMORY`, one subject per user.

Both the l2-gateway (writer) and the l3-semantic-indexer (durable consumer)
call `ensure_stream` at start-up, so either may start first. The stream is the
source of truth: an append is acknowledged only after the stream stored it.
Each stream created here carries a random incarnation id in its metadata, so
the gateway can tell the stream it has always written to from an empty one
created in its place (`services.l2_gateway.log_guard`).

Message ids are per user: `Nats-Msg-Id` is a hash of (user_id, msg_id), which
the stream deduplicates within its duplicate window (`store` also stores a
message again whose earlier copy was forgotten).

Log messages a consumer cannot use go, with why, to the dead-letter stream
`MEMORY_DEAD` (`dead_letter`), rather than stopping the consumer.

Retention (`shared.retention`): the gateway sets the stream's age, per-user
count and byte limits at start-up (`apply_retention`), on a new stream as on
one whose policy changed. The stream keeps `discard=new`: when the byte limit
is reached an append is refused (`PublishError.full`), never old history
dropped to make room.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timezone

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig,
    StreamInfo,
)
from nats.js.errors import BadRequestError, NotFoundError

from shared import subjects
from shared.contract import LogEntry
from shared.retention import Retention

log = structlog.get_logger()

DUPLICATE_WINDOW_S = 2 * 3600
INCARNATION = "tiermem_incarnation"  # stream metadata key: which MEMORY this is
DEAD_LETTER_MAX_AGE_S = 14 * 86400
DEAD_LETTER_MAX_BYTES = 1 << 30


async def ensure_stream(js: JetStreamContext, replicas: int = 1) -> StreamInfo:
    """The MEMORY stream's info; created (with a fresh incarnation id) if there is none."""
    try:
        return await js.stream_info(subjects.STREAM)
    except NotFoundError:
        return await create_stream(js, replicas)


async def create_stream(js: JetStreamContext, replicas: int = 1) -> StreamInfo:
    """Create MEMORY; if another replica just did, its stream is the one returned."""
    config = StreamConfig(
        name=subjects.STREAM,
        subjects=[subjects.LOG_ALL],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,  # never silently drop acknowledged history
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
        allow_direct=True,
        metadata={INCARNATION: uuid.uuid4().hex},
    )
    try:
        return await js.add_stream(config)
    except BadRequestError:  # "stream name already in use": a replica won the race
        return await js.stream_info(subjects.STREAM)


async def wait_for_stream(js: JetStreamContext, poll_s: float = 0.5) -> StreamInfo:
    """The MEMORY stream's info once it exists. For consumers: only the l2-gateway creates the
    stream, so a consumer never recreates a log that was lost (the gateway fails closed then)."""
    logged = False
    while True:
        try:
            return await js.stream_info(subjects.STREAM)
        except NotFoundError:
            if not logged:
                log.info("waiting_for_memory_stream", note="the l2-gateway creates it")
                logged = True
            await asyncio.sleep(poll_s)


def limits(policy: Retention) -> dict[str, float | int]:
    """The MEMORY stream's limit fields under `policy`. The duplicate window cannot be longer
    than `max_age` (JetStream refuses it), and need not be: a retry of a message that aged
    out of the log would find nothing to be a duplicate of."""
    wanted = policy.stream_limits()
    age = wanted["max_age"]
    return {**wanted, "duplicate_window": min(DUPLICATE_WINDOW_S, age) if age else DUPLICATE_WINDOW_S}


def limit_changes(config: StreamConfig, wanted: dict[str, float | int]) -> dict[str, tuple]:
    """{field: (now, wanted)} for each limit of `config` that differs from `wanted`."""
    return {f: (getattr(config, f), v) for f, v in wanted.items() if getattr(config, f) != v}


async def apply_retention(js: JetStreamContext, policy: Retention) -> dict[str, tuple]:
    """Give MEMORY the limits of `policy` if it has others; returns what changed.

    Only the limits change: the metadata (the incarnation id the gateway's
    guard knows the stream by) and everything else are sent back as they are.
    Lowering `max_bytes` below what the stream holds deletes nothing
    (`discard=new`): appends are refused until age or count shrink it.
    """
    info = await js.stream_info(subjects.STREAM)
    changes = limit_changes(info.config, limits(policy))
    if changes:
        info = await js.update_stream(replace(info.config, **{f: v for f, (_, v) in changes.items()}))
        log.warning("memory_stream_limits_changed",
                    **{f: f"{old} -> {new}" for f, (old, new) in changes.items()})
        if 0 < info.config.max_bytes < info.state.bytes:
            log.error("memory_stream_over_its_byte_limit", bytes=info.state.bytes,
                      max_bytes=info.config.max_bytes,
                      note="appends are refused until retention drops enough old messages")
    return changes


def incarnation(info: StreamInfo) -> str:
    """Which MEMORY stream this is: the id it was created with (kept by backup and
    restore, which restore the config), or its creation time for a stream made
    before ids existed."""
    meta = info.config.metadata or {}
    return meta.get(INCARNATION) or f"created-{info.created.isoformat() if info.created else '?'}"


async def ensure_dead_letter_stream(js: JetStreamContext, replicas: int = 1) -> None:
    """`MEMORY_DEAD` keeps what consumers dead-lettered for two weeks (at most 1 GiB, oldest
    dropped first): long enough for an operator to look, bounded because poison can be large."""
    try:
        await js.stream_info(subjects.DEAD_LETTER_STREAM)
    except NotFoundError:
        await js.add_stream(StreamConfig(
            name=subjects.DEAD_LETTER_STREAM, subjects=[f"{subjects.DEAD_LETTER_PREFIX}.>"],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
            discard=DiscardPolicy.OLD, max_age=DEAD_LETTER_MAX_AGE_S,
            max_bytes=DEAD_LETTER_MAX_BYTES, num_replicas=replicas))


async def dead_letter(request: Callable[..., Awaitable[Msg]], consumer: str, subject: str,
                      seq: int, payload: bytes, reason: str, timeout: float) -> PubAck:
    """Keep a log message `consumer` could not use on `memory.deadletter.<consumer>`, with
    where it came from and why in headers; re-sending the same seq is deduplicated."""
    headers = {"Nats-Msg-Id": f"{consumer}:{seq}", "Tiermem-Subject": subject,
               "Tiermem-Seq": str(seq), "Tiermem-Reason": reason[:500]}
    return await _publish(request, f"{subjects.DEAD_LETTER_PREFIX}.{consumer}", payload,
                          headers, timeout)


async def last_seq(js: JetStreamContext) -> int:
    info = await js.stream_info(subjects.STREAM)
    return info.state.last_seq


class _PurgeReply(msgspec.Struct):
    success: bool = False
    purged: int = 0


async def purge_user(nc: NATS, user_id: str, below_seq: int) -> int:
    """Remove the user's messages with seq < `below_seq`; returns how many.

    nats-py's `purge_stream` drops the count the server reports, so this calls
    the JetStream API directly.
    """
    body = msgspec.json.encode({"filter": subjects.log_subject(user_id), "seq": below_seq})
    msg = await nc.request(f"$JS.API.STREAM.PURGE.{subjects.STREAM}", body, timeout=5)
    reply = msgspec.json.decode(msg.data, type=_PurgeReply)
    if not reply.success:
        raise RuntimeError(f"stream purge failed: {msg.data[:200]!r}")
    return reply.purged


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


# How JetStream (measured on nats-server 2.15) refuses a message because a limit of a `discard=new`
# stream is reached: err_code 10077 (JSStreamStoreFailedF, code 503), the limit in the text.
STORE_FAILED = 10077
_LIMIT_REACHED = ("maximum bytes exceeded", "maximum messages exceeded")


class PublishError(Exception):
    """The stream did not store the message (no stream, stream full, bad reply); `refusal`
    is the stream's own error, when it answered with one."""

    def __init__(self, message: str, refusal: _ApiError | None = None) -> None:
        super().__init__(message)
        self.refusal = refusal

    @property
    def full(self) -> bool:
        """Refused because the stream is full (a limit reached), not for a passing reason."""
        r = self.refusal
        return r is not None and r.err_code == STORE_FAILED and r.description in _LIMIT_REACHED


class PubAck(msgspec.Struct):
    """The stream's ack: `{"stream": "MEMORY", "seq": 7, "duplicate": true}` or `{"error": {...}}`."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_pub_ack = msgspec.json.Decoder(PubAck)


def dedupe_id(user_id: str, msg_id: str, salt: int = 0) -> str:
    """The `Nats-Msg-Id` of a user's `msg_id`: unique per user, not per stream.

    A hash keeps it short and free of characters headers dislike; user ids
    cannot hold a newline, so the input is unambiguous. `salt` is the seq of a
    forgotten copy (see `store`).
    """
    key = f"{user_id}\n{msg_id}" if not salt else f"{user_id}\n{msg_id}\n{salt}"
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


async def store(request: Callable[..., Awaitable[Msg]], user_id: str, msg_id: str,
                payload: bytes, timeout: float) -> PubAck:
    """Store a user's message once per (user, msg_id), as long as the log holds it.

    The stream remembers ids for its duplicate window even after `memory.forget`
    purged the message, and would answer a re-append "duplicate" of a seq that
    holds nothing. So a duplicate's seq is checked (one direct get; duplicates
    are rare): if it was purged, the message is published again under an id
    salted by that seq, which a retry of the re-append computes the same way and
    so still deduplicates. Forgotten again, the chain takes one more hop; it ends
    because each hop lands on a later seq.
    """
    subject = subjects.log_subject(user_id)
    salt = 0
    while True:
        ack = await publish(request, subject, payload, dedupe_id(user_id, msg_id, salt), timeout)
        if not ack.duplicate or await holds(request, ack.seq, subject, timeout):
            return ack
        salt = ack.seq


async def holds(request: Callable[..., Awaitable[Msg]], seq: int, subject: str,
                timeout: float) -> bool:
    """Does the stream still hold a message on `subject` at `seq` (not purged)?"""
    msg = await request(f"$JS.API.DIRECT.GET.{subjects.STREAM}", msgspec.json.encode({"seq": seq}),
                        timeout=timeout)
    headers = msg.headers or {}
    status = headers.get("Status")
    if status == "404":
        return False
    if status:
        raise PublishError(f"direct get of seq {seq} failed: {status} {headers.get('Description', '')}")
    return headers.get("Nats-Subject") == subject


async def publish(request: Callable[..., Awaitable[Msg]], subject: str, payload: bytes,
                  msg_id: str, timeout: float) -> PubAck:
    """Store one message in the stream (deduplicated on `msg_id`) and return its ack.

    The same request `js.publish` makes, with the ack decoded by msgspec instead
    of `json.loads` into a dataclass: it is on every append's path. `request` is
    `nc.request` or `Runtime.request_msg`. Raises PublishError, or nats'
    TimeoutError when the stream did not answer.
    """
    return await _publish(request, subject, payload, {"Nats-Msg-Id": msg_id}, timeout)


async def _publish(request: Callable[..., Awaitable[Msg]], subject: str, payload: bytes,
                   headers: dict[str, str], timeout: float) -> PubAck:
    try:
        msg = await request(subject, payload, headers=headers, timeout=timeout)
    except NoRespondersError:
        raise PublishError(f"no stream listens on {subject}") from None
    try:
        ack = _pub_ack.decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise PublishError(f"unexpected reply from the stream: {msg.data[:200]!r}") from None
    if ack.error is not None:
        raise PublishError(f"the stream refused the message: {ack.error.code} "
                           f"{ack.error.description} (err_code {ack.error.err_code})", ack.error)
    if ack.seq <= 0:
        raise PublishError(f"the stream's ack has no sequence: {msg.data[:200]!r}")
    return ack


class Logged(msgspec.Struct):
    """One message as the stream holds it, with when the stream stored it."""

    seq: int
    stored_at: float  # unix seconds, the NATS server's clock
    entry: LogEntry


_log_entry = msgspec.json.Decoder(LogEntry)
DIRECT_BATCH = 1000


async def user_log(nc: NATS, user_id: str, from_seq: int = 1,
                   timeout: float = 5.0) -> list[Logged]:
    """The user's messages in the stream from `from_seq` on, oldest first.

    Used to repair one user's L2 window and by the auditor to check what a
    tier served, so it must be cheap: one batched direct get (nats-server
    2.11+; the stream's per-subject index finds the user's messages however
    many other users there are), ~2 ms for 40 messages where an ordered
    consumer took ~5 ms. Older servers answer a batch with a single message;
    then an ephemeral ordered consumer reads the log instead. Messages the
    applier would dead-letter are left out.
    """
    subject = subjects.log_subject(user_id)
    out: list[Logged] = []
    seq = max(from_seq, 1)
    while True:
        page, more = await _direct_batch(nc, subject, seq, timeout)
        if page is None:
            return await _ordered_read(nc.jetstream(), subject, from_seq, timeout)
        out.extend(page)
        if not more or not page:
            return out
        seq = page[-1].seq + 1


async def _direct_batch(nc: NATS, subject: str, from_seq: int,
                        timeout: float) -> tuple[list[Logged] | None, bool]:
    """One page of a batched direct get: (messages, more to read); (None, _) if unsupported."""
    queue: asyncio.Queue[Msg] = asyncio.Queue()
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=queue.put)
    body = msgspec.json.encode({"seq": from_seq, "next_by_subj": subject, "batch": DIRECT_BATCH})
    page: list[Logged] = []
    try:
        await nc.publish(f"$JS.API.DIRECT.GET.{subjects.STREAM}", body, reply=inbox)
        while True:
            msg = await asyncio.wait_for(queue.get(), timeout)
            headers = msg.headers or {}
            status = headers.get("Status")
            if status == "404":
                return page, False  # nothing (more) for this subject
            if status == "204":  # end of batch
                return page, headers.get("Nats-Num-Pending", "0") != "0"
            if status:
                raise RuntimeError(f"direct get failed: {status} {headers}")
            if "Nats-Num-Pending" not in headers:
                return None, False  # a server without batched direct get
            entry = _usable(subject, msg.data)
            if entry is not None:
                page.append(Logged(int(headers["Nats-Sequence"]), _unix(headers["Nats-Time-Stamp"]),
                                   entry))
    finally:
        await sub.unsubscribe()


def _usable(subject: str, data: bytes) -> LogEntry | None:
    """The log entry, or None for one a consumer dead-letters (not JSON of an entry, or
    of another user than the subject's): readers of the log skip what was never applied."""
    try:
        entry = _log_entry.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return entry if subjects.log_subject(entry.user_id) == subject else None


def _unix(stamp: str) -> float:
    """`2026-11-26T12:36:38.341500286Z` (nanoseconds) as unix seconds."""
    whole, _, frac = stamp.rstrip("Z").partition(".")
    base = datetime.fromisoformat(whole).replace(tzinfo=timezone.utc).timestamp()
    return base + (float(f"0.{frac}") if frac else 0.0)


async def _ordered_read(js: JetStreamContext, subject: str, from_seq: int,
                        timeout: float) -> list[Logged]:
    try:
        last = (await js.get_last_msg(subjects.STREAM, subject)).seq
    except NotFoundError:
        return []
    if last is None or last < from_seq:
        return []
    sub = await js.subscribe(subject, stream=subjects.STREAM, ordered_consumer=True, config=ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(from_seq, 1)))
    out: list[Logged] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=timeout)
            meta = msg.metadata
            seq = meta.sequence.stream
            entry = _usable(subject, msg.data)
            if entry is not None:
                out.append(Logged(seq, meta.timestamp.timestamp(), entry))
            if seq >= last or meta.num_pending == 0:
                return out
    finally:
        await sub.unsubscribe()
