"""The durable log's byte limit, as the l2-gateway meets it.

Why: with `discard=new` a full `MEMORY` stream refuses every append. That
must say so (507, what to do) and be seen coming: the stream's usage is
sampled into gauges (`tiermem_log_bytes`, `tiermem_log_max_bytes`) that the
alert `TiermemLogNearlyFull` watches, and each refusal counts in
`tiermem_log_full_total` (alert `TiermemLogFull`). Retention by age and count
(`shared.retention`) shrinks the stream on its own, so it is full only when
`LOG_MAX_BYTES` is reached with everything still within retention.
"""

from __future__ import annotations

import asyncio

import structlog
from nats.errors import Error as NatsError, TimeoutError as NatsTimeout
from nats.js import JetStreamContext

from shared import metrics, subjects
from shared.errors import StorageFull

log = structlog.get_logger()
USAGE_EVERY_S = 5.0  # one stream info per gateway: cheap, and well within an alert's `for`


async def watch_usage(js: JetStreamContext, every_s: float = USAGE_EVERY_S) -> None:
    while True:
        try:
            info = await js.stream_info(subjects.STREAM)
        except (NatsError, NatsTimeout, asyncio.TimeoutError) as exc:
            log.debug("log_usage_not_sampled", error=str(exc) or repr(exc))  # the guard reports losses
        else:
            metrics.log_bytes.set(info.state.bytes)
            metrics.log_max_bytes.set(max(info.config.max_bytes, 0))
        await asyncio.sleep(every_s)


def log_full(why: str) -> StorageFull:
    """The error of an append the full stream refused (`why`: the stream's words), counted."""
    metrics.log_full.inc()
    log.error("memory_log_full", why=why)
    return StorageFull(
        f"the durable log {subjects.STREAM} is full ({why}): nothing was stored. Everything in it is "
        "still within retention; an operator must raise LOG_MAX_BYTES (and JetStream's storage) or "
        "shorten retention (RETAIN_MAX_AGE_S, RETAIN_MAX_PER_USER). Retry later with the same msg_id: "
        "it is deduplicated")
