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

Served by aiohttp.web (the one HTTP stack of the project: the LLM simulator
and the HTTP gateway use it too); GET and HEAD only, keep-alive; nothing else
is served, and no access log (Prometheus scrapes every few seconds).
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Awaitable, Callable

import msgspec
import structlog
from aiohttp import web
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder, gzip_accepted

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


class HealthServer:
    """Serves `Health` and the metrics registry on one port."""

    def __init__(self, health: Health, registry=REGISTRY) -> None:
        self.health = health
        self.registry = registry
        self._was_ready: bool | None = None
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (`port` 0 picks a free one)."""
        app = web.Application()
        app.router.add_get("/livez", self._livez)  # add_get answers HEAD too; other methods get 405
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=100)
        await site.start()
        return self._runner.addresses[0][1]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # stops listening, ends open connections
            self._runner = None

    async def _livez(self, _request: web.Request) -> web.Response:
        return web.Response(body=b"ok\n", content_type="text/plain")

    async def _readyz(self, _request: web.Request) -> web.Response:
        ready, body = await self.health.readiness()
        if ready != self._was_ready:  # log changes, not every probe
            self._was_ready = ready
            (log.info if ready else log.warning)("readiness_changed", **body)
        return web.Response(status=200 if ready else 503, body=msgspec.json.encode(body) + b"\n",
                            content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        body, headers = await asyncio.to_thread(self._render, request.headers.get("Accept", ""),
                                                request.headers.get("Accept-Encoding", ""))
        return web.Response(body=body, headers=headers)

    def _render(self, accept: str, accept_encoding: str) -> tuple[bytes, dict[str, str]]:
        encoder, content_type = choose_encoder(accept)
        body = encoder(self.registry)
        headers = {"Content-Type": content_type}
        if gzip_accepted(accept_encoding):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return body, headers
