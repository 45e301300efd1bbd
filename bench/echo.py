"""Trivial NATS and HTTP responders in their own process, for the bare baselines.

    python -m bench.echo NATS_URL SUBJECT            plain subscription, replies with the request body
    python -m bench.echo --service NATS_URL SUBJECT  the same through `shared.service.run_service`:
                                                     decode a GetRequest, reply an empty GetReply
    python -m bench.echo --http PORT BODY            aiohttp.web on 127.0.0.1:PORT: every POST is
                                                     answered 200 with the JSON text BODY

The first is the bare request/reply round trip. The second is the floor of
our service framework (nats.micro, a task, decode, metrics, encode; a span
only when spans are exported) with no work inside, which splits a tier's overhead into "framework" and "the tier's
own work". The third is the bare HTTP round trip the llm-gateway is compared
with: the same server library, no work inside. All print `ready` once the server has the subscription and exit
on SIGTERM/SIGINT (and, started by the bench, when the bench dies).

Identity: `NATS_USER` / `NATS_PASSWORD` (and `NATS_TLS_*`) of the environment,
as for a service; the bench passes the stack's admin (the subjects are the
bench's own), or for the auth-cost step the memory-l1 role (whose subjects
and `allow_responses` are what an L1 answer goes through).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import uvloop

from shared import bus


def stop_on_signals() -> asyncio.Event:
    """An event SIGTERM or SIGINT sets: each server here runs until then."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve(url: str, subject: str) -> None:
    nc = await bus.connect(url, bus.BusAuth.from_env(os.environ), name="bench-echo", allow_reconnect=False)

    async def echo(msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(subject, cb=echo)
    await nc.flush()
    print("ready", flush=True)
    stop = stop_on_signals()
    await stop.wait()
    await nc.drain()


async def serve_framework(url: str, subject: str) -> None:
    from shared.contract import GetReply, GetRequest
    from shared.service import run_service
    from shared.settings import Settings

    async def build(rt) -> None:
        async def get(req: GetRequest) -> GetReply:
            return GetReply(user_id=req.user_id, tier="echo", seq=0, messages=[])

        rt.endpoint("get", subject, GetRequest, get)

    ready = asyncio.Event()
    stop = stop_on_signals()
    identity = {k: v for k, v in os.environ.items() if k.startswith("NATS_")}
    settings = Settings.from_env({**identity, "NATS_URL": url, "LOG_LEVEL": "warning"})
    task = asyncio.create_task(run_service("bench-echo", "bench: framework floor", build,
                                           settings=settings, stop=stop, ready=ready))
    await ready.wait()
    print("ready", flush=True)
    await task


async def serve_http(port: str, body: str) -> None:
    from aiohttp import web

    payload = body.encode()

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=payload, content_type="application/json")

    app = web.Application()
    app.router.add_post("/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(port)).start()
    print("ready", flush=True)
    stop = stop_on_signals()
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--http"]:
        if len(args) != 3:
            raise SystemExit("usage: python -m bench.echo --http PORT BODY")
        uvloop.run(serve_http(*args[1:]))
        sys.exit(0)
    framework = bool(args) and args[0] == "--service"
    if framework:
        args = args[1:]
    if len(args) != 2:
        raise SystemExit("usage: python -m bench.echo [--service] NATS_URL SUBJECT")
    uvloop.run((serve_framework if framework else serve)(*args))
