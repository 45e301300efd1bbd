"""LangChain's chat-message history over tiermem's memory (`pip install langchain-core`).

    history = TiermemChatMessageHistory("lead-42", bot_id="sales-1", client=tiermem.Client())
    chain = RunnableWithMessageHistory(llm_chain, lambda session_id: history, ...)

Messages go through `memory.append` (durable once added), are read back with
`memory.get` (the newest `window`, served by whichever tier holds them), and
`clear()` is `memory.forget`. Reads ask for at least the seq of this
history's own last append, so a message just added is always in the next
read (read-your-writes), whichever sidecar or replica answers.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from shared.contract import Message
from tiermem.client import AsyncClient, Client

_ROLES = {"human": "user", "ai": "assistant", "system": "system"}
_TYPES = {"user": HumanMessage, "assistant": AIMessage, "system": SystemMessage}


class TiermemChatMessageHistory(BaseChatMessageHistory):
    """One user's conversation as LangChain messages; give `client`, `async_client` or both."""

    def __init__(self, user_id: str, *, bot_id: str, client: Client | None = None,
                 async_client: AsyncClient | None = None, window: int = 100) -> None:
        if client is None and async_client is None:
            raise ValueError("give a tiermem.Client, a tiermem.AsyncClient or both")
        self.user_id = user_id
        self.bot_id = bot_id
        self.client = client
        self.async_client = async_client
        self.window = window
        self._last_seq: int | None = None

    # -- sync

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        reply = self._sync().recent(self.user_id, self.window, min_seq=self._last_seq)
        return [to_langchain(m) for m in reply.messages]

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        client = self._sync()
        for m in messages:
            role, text, msg_id = to_tiermem(m)
            self._appended(client.append(self.user_id, self.bot_id, role, text, msg_id=msg_id).seq)

    def clear(self) -> None:
        self._sync().forget(self.user_id)
        self._last_seq = None

    # -- async

    async def aget_messages(self) -> list[BaseMessage]:
        reply = await self._async().recent(self.user_id, self.window, min_seq=self._last_seq)
        return [to_langchain(m) for m in reply.messages]

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        client = self._async()
        for m in messages:
            role, text, msg_id = to_tiermem(m)
            self._appended((await client.append(self.user_id, self.bot_id, role, text, msg_id=msg_id)).seq)

    async def aclear(self) -> None:
        await self._async().forget(self.user_id)
        self._last_seq = None

    # --

    def _appended(self, seq: int) -> None:
        self._last_seq = seq if self._last_seq is None else max(self._last_seq, seq)

    def _sync(self) -> Client:
        if self.client is None:
            raise RuntimeError("this history has only an AsyncClient: use the a* methods")
        return self.client

    def _async(self) -> AsyncClient:
        if self.async_client is None:
            raise RuntimeError("this history has only a Client: use the sync methods")
        return self.async_client


def to_tiermem(message: BaseMessage) -> tuple[str, str, str]:
    """(role, text, msg_id); the msg_id is LangChain's id when it has one, so adding it again is a duplicate."""
    role = _ROLES.get(message.type)
    if role is None:
        raise ValueError(f"tiermem stores user, assistant and system messages, not {message.type!r}")
    text = message.content if isinstance(message.content, str) else str(message.text)  # text blocks joined
    return role, text, message.id or uuid.uuid4().hex


def to_langchain(m: Message) -> BaseMessage:
    return _TYPES[m.role](content=m.text, id=m.msg_id)
