"""Where Redis keeps the seq of each user's newest own message (role "user").

The l2-gateway writes it in the same script that applies the message to the
user's window; the llm-broker reads it on every hit of a class that a user's
message invalidates, so an answer built before the user's latest message is
refused even when the `memory.changed` event that should have dropped it never
arrived. The key is under the gateway's `tm:` prefix (its Redis ACL user
writes it; the broker's may only read it) and carries the user's hash tag (one
Redis Cluster slot with the user's window, which the applying script needs).
"""

from __future__ import annotations


def key(user_id: str) -> str:
    return f"tm:{{{user_id}}}:user_seq"
