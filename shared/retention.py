"""Retention: how old and how many of a user's messages each tier keeps. Pure, no I/O.

Why: the `MEMORY` stream had no limits and `discard=new`, so once its storage
was full every append failed, and L3 and the LLM cache only ever grew. One
policy, read from Settings (`RETAIN_MAX_AGE_S`, `RETAIN_MAX_PER_USER`,
`LOG_MAX_BYTES`; 0 = no limit), now says what each tier keeps, and each tier
applies it:

- **the log** (the `MEMORY` stream, `shared.stream.apply_retention`): messages
  younger than `max_age_s` (`max_age`), each user's newest `max_per_user`
  (`max_msgs_per_subject`: the subject is per user), at most `log_max_bytes`
  in all. Age and count drop the oldest messages on their own, so the stream
  is full only when `log_max_bytes` is reached with everything still within
  retention; then an append is refused with 507 (the stream keeps
  `discard=new`: acknowledged history is never dropped to make room) and
  alerts fire before and when it happens (deploy/alerts).
- **L2 (Redis) and L1**: windows of a user's newest `window(size)` messages,
  so never more than the count limit, and a window answers for all of a user's
  messages once it holds `held(count)` of them. They are caches of the newest messages: one older
  than `max_age_s` stays in an active user's window until newer ones push it
  out (idle users' windows expire).
- **L3 (Postgres)**: the sweeper (`services.l3_semantic_indexer.sweeper`)
  deletes, every `RETAIN_SWEEP_S`, the rows the log dropped: by age, those
  below the log's first seq (age drops the log's oldest messages first), and
  those beyond a user's newest `max_per_user`.
- **the LLM cache**: an entry lives its volatility class's TTL, capped at
  `max_age_s` (`cache_ttl`). The shipped TTLs (at most 24 h) are far shorter
  than any sensible `max_age_s`, so this rarely bites; the broker deletes
  expired `llm.entries` rows.
"""

from __future__ import annotations

import msgspec

from shared.settings import Settings


class Retention(msgspec.Struct, frozen=True, kw_only=True):
    max_age_s: float = 0.0  # 0: forever
    max_per_user: int = 0  # 0: unlimited
    log_max_bytes: int = 0  # 0: no cap of the stream's own (JetStream's storage limits still apply)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Retention":
        return cls(max_age_s=max(settings.retain_max_age_s, 0.0),
                   max_per_user=max(settings.retain_max_per_user, 0),
                   log_max_bytes=max(settings.log_max_bytes, 0))

    def drops_anything(self) -> bool:
        """Does any message ever leave by age or count (is there anything to sweep)?"""
        return bool(self.max_age_s or self.max_per_user)

    def window(self, size: int) -> int:
        """How many of a user's newest messages a cache window of `size` keeps."""
        return min(size, self.max_per_user) if self.max_per_user else size

    def held(self, count: int) -> int:
        """How many of a user's `count` messages appended (and not forgotten) the log still holds at
        most (by count; age may have dropped more)."""
        return min(count, self.max_per_user) if self.max_per_user else count

    def cache_ttl(self, ttl_s: float) -> float:
        """How long an LLM cache entry of a class with `ttl_s` lives."""
        return min(ttl_s, self.max_age_s) if self.max_age_s else ttl_s

    def stream_limits(self) -> dict[str, float | int]:
        """The `MEMORY` stream's limits, in nats-py `StreamConfig` fields and units (seconds;
        JetStream's "unlimited": 0 for `max_age`, -1 for the others)."""
        return {"max_age": self.max_age_s,
                "max_msgs_per_subject": self.max_per_user or -1,
                "max_bytes": self.log_max_bytes or -1}
