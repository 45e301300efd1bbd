"""The connection handling both of the project's small HTTP/1.1 servers share.

`shared.health` (metrics and probes) and the LLM simulator speak HTTP through
h11 over asyncio streams. This base listens, keeps the task of every open
connection so that `close` can end them, and treats a client that goes away
or speaks broken HTTP as the end of that connection; subclasses implement
`_serve` (one connection's request loop).
"""

from __future__ import annotations

import asyncio

import h11


class StreamServer:
    # What ends a connection quietly: nothing is left to answer.
    closing_errors: tuple[type[BaseException], ...] = (ConnectionError, h11.ProtocolError)

    def __init__(self) -> None:
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()

    async def listen(self, host: str, port: int, backlog: int = 100) -> tuple[str, int]:
        """Start listening; returns the bound (host, port) (`port` 0 picks a free one)."""
        self._server = await asyncio.start_server(self._on_connect, host, port, backlog=backlog)
        bound_host, bound_port = self._server.sockets[0].getsockname()[:2]
        return bound_host, bound_port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        except self.closing_errors:
            pass
        finally:
            self._conns.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError
