"""The durable message log: JetStream stream `MEMORY`, one subject per user.

Both the l2-gateway (writer) and the l3-semantic-indexer (durable consumer)
call `ensure_stream` at start-up, so either may start first. The stream is the
source of truth: an append is acknowledged only after the stream stored it.
Message ids (`Nats-Msg-Id` = the client's `msg_id`) are deduplicated by the
stream within its duplicate window.
"""

from __future__ import annotations

import msgspec
from nats.aio.client import Client as NATS
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
