"""tiermem: memory and response cache for LLM agent fleets, as a Python client.

    import tiermem

    with tiermem.Client() as tm:                    # NATS_URL and credentials from the environment
        ack = tm.append("lead-42", "sales-1", "user", "Hi!", msg_id="m-1")
        print(tm.recent("lead-42", min_seq=ack.seq).messages)

`AsyncClient` has the same methods for asyncio. `tiermem.langchain` adapts
it to LangChain's chat-message history.
"""

from shared.contract import (AppendReply, CacheInfo, CompleteReply, CompleteRequest, ForgetReply, GetReply,
                             Message, Usage)
from shared.errors import BadRequest, PayloadTooLarge, StorageFull, TierError, Unavailable, UpstreamTimeout
from tiermem.client import AsyncClient, Client

__all__ = [
    "AsyncClient", "Client",
    "AppendReply", "CacheInfo", "CompleteReply", "CompleteRequest", "ForgetReply", "GetReply", "Message", "Usage",
    "TierError", "BadRequest", "PayloadTooLarge", "Unavailable", "UpstreamTimeout", "StorageFull",
]
