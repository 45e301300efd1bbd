"""The metrics port: `/metrics`, `/livez` and `/readyz` for Prometheus and Kubernetes.

Why a server of our own on the service's event loop, not prometheus_client's
thread: readiness has to ask the service's own clients (its NATS connection,
Redis client, Postgres pool), and those live on that loop. It also makes
`/livez` mean something: it answers only while the loop turns, so a wedged
process gets restarted.

- `/livez`: 200 while the process and its event loop run.
- `/readyz`: runs every registered check at once, each bounded by `timeout_s`;
  200 when all pass, else 503 with a JSON body naming the failing ones
  (`{"status": "not ready", "failing": ["redis"], "checks": {...}}`); also 503
  while the service starts (before its endpoints are registered) and once it
  stops. Checks run only when `/readyz` is asked, one run at a time (probes
  that arrive during a run share its result): nothing touches the hot path.
- `/metrics`: the Prometheus exposition (text or OpenMetrics by `Accept`,
  gzip when asked), rendered in a thread so a scrape never blocks the loop.

HTTP/1.1 through h11, GET and HEAD only, keep-alive; nothing else is served.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Awaitable, Callable

import h11
import msgspec
import structlog
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder, gzip_accepted

from shared.http import StreamServer

log = structlog.get_logger()

Check = Callable[[], Awaitable[object]]
DEFAULT_TIMEOUT_S = 2.0  # below the readiness probe's timeoutSeconds (k8s/base: 3 s)


class Health:
    """Readiness checks by name, and the service's phase (starting, up, stopping)."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self.phase = "starting"  # "up" once endpoints are registered, "stopping" on shutdown
        self._checks: dict[str, Check] = {}
        self._run: asyncio.Task | None = None

    def add(self, name: str, check: Check) -> None:
        """`check()` passes unless it raises, times out or returns False."""
        self._checks[name] = check

    async def readiness(self) -> tuple[bool, dict]:
        """(ready, JSON body). Probes arriving while a run is going share it."""
        if self._run is None or self._run.done():
            self._run = asyncio.ensure_future(self._run_checks())
        results = await asyncio.shield(self._run)
        failing = sorted(name for name, outcome in results.items() if outcome != "ok")
        if self.phase != "up":
            return False, {"status": self.phase, "failing": failing, "checks": results}
        if failing:
            return False, {"status": "not ready", "failing": failing, "checks": results}
        return True, {"status": "ready", "checks": results}

    async def _run_checks(self) -> dict[str, str]:
        names = list(self._checks)
        outcomes = await asyncio.gather(*(self._one(self._checks[n]) for n in names))
        return dict(zip(names, outcomes))

    async def _one(self, check: Check) -> str:
        try:
            result = await asyncio.wait_for(check(), self.timeout_s)
        except asyncio.TimeoutError:
            return f"no answer within {self.timeout_s:g} s"
        except Exception as exc:  # the failure is the answer
            return f"{type(exc).__name__}: {exc}"[:300]
        return "failed" if result is False else "ok"


class HealthServer(StreamServer):
    """Serves `Health` and the metrics registry on one port."""

    def __init__(self, health: Health, registry=REGISTRY) -> None:
        super().__init__()
        self.health = health
        self.registry = registry
        self._was_ready: bool | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (`port` 0 picks a free one)."""
        return (await self.listen(host, port))[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))  # b"" is EOF
                continue
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed
            if isinstance(conn.next_event(), h11.EndOfMessage):
                status, headers, body = await self._answer(event)
            else:  # a request with a body: nothing here takes one
                status, headers, body = 405, [("allow", "GET, HEAD"), ("connection", "close")], b""
            headers.append(("content-length", str(len(body))))
            writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
            if event.method != b"HEAD":
                writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _answer(self, request: h11.Request) -> tuple[int, list[tuple[str, str]], bytes]:
        path = request.target.split(b"?", 1)[0]
        if request.method not in (b"GET", b"HEAD"):
            return 405, [("allow", "GET, HEAD")], b""
        if path == b"/livez":
            return 200, [("content-type", "text/plain")], b"ok\n"
        if path == b"/readyz":
            ready, body = await self.health.readiness()
            if ready != self._was_ready:  # log changes, not every probe
                self._was_ready = ready
                (log.info if ready else log.warning)("readiness_changed", **body)
            return (200 if ready else 503), [("content-type", "application/json")], \
                msgspec.json.encode(body) + b"\n"
        if path == b"/metrics":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
            return await asyncio.to_thread(self._metrics, headers.get("accept", ""),
                                           headers.get("accept-encoding", ""))
        return 404, [("content-type", "text/plain")], b"not found: /metrics, /livez, /readyz\n"

    def _metrics(self, accept: str, accept_encoding: str) -> tuple[int, list[tuple[str, str]], bytes]:
        encoder, content_type = choose_encoder(accept)
        body = encoder(self.registry)
        headers = [("content-type", content_type)]
        if gzip_accepted(accept_encoding):
            body = gzip.compress(body)
            headers.append(("content-encoding", "gzip"))
        return 200, headers, body
