"""The durable message log: JetStream stream `MEMORY`, one subject per user.

Both the l2-gateway (writer) and the l3-semantic-indexer (durable consumer)
call `ensure_stream` at start-up, so either may start first. The stream is the
source of truth: an append is acknowledged only after the stream stored it.
Message ids (`Nats-Msg-Id` = the client's `msg_id`) are deduplicated by the
stream within its duplicate window.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from shared import subjects

DUPLICATE_WINDOW_S = 2 * 3600


async def ensure_stream(js: JetStreamContext, replicas: int = 1) -> None:
    config = StreamConfig(
        name=subjects.STREAM,
        subjects=[subjects.LOG_ALL],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,  # never silently drop acknowledged history
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
        allow_direct=True,
    )
    try:
        await js.stream_info(subjects.STREAM)
    except NotFoundError:
        await js.add_stream(config)


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


class PublishError(Exception):
    """The stream did not store the message (no stream, stream full, bad reply)."""


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class PubAck(msgspec.Struct):
    """The stream's ack: `{"stream": "MEMORY", "seq": 7, "duplicate": true}` or `{"error": {...}}`."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_pub_ack = msgspec.json.Decoder(PubAck)


async def publish(request: Callable[..., Awaitable[Msg]], subject: str, payload: bytes,
                  msg_id: str, timeout: float) -> PubAck:
    """Store one message in the stream (deduplicated on `msg_id`) and return its ack.

    The same request `js.publish` makes, with the ack decoded by msgspec instead
    of `json.loads` into a dataclass: it is on every append's path. `request` is
    `nc.request` or `Runtime.request_msg`. Raises PublishError, or nats'
    TimeoutError when the stream did not answer.
    """
    try:
        msg = await request(subject, payload, headers={"Nats-Msg-Id": msg_id}, timeout=timeout)
    except NoRespondersError:
        raise PublishError(f"no stream listens on {subject}") from None
    try:
        ack = _pub_ack.decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise PublishError(f"unexpected reply from the stream: {msg.data[:200]!r}") from None
    if ack.error is not None:
        raise PublishError(f"the stream refused the message: {ack.error.code} "
                           f"{ack.error.description} (err_code {ack.error.err_code})")
    if ack.seq <= 0:
        raise PublishError(f"the stream's ack has no sequence: {msg.data[:200]!r}")
    return ack
