"""`/livez`, `/readyz` and `/metrics` on the metrics port (shared/health.py), against real servers.

Kubernetes restarts a pod whose `/livez` fails and holds a rollout while
`/readyz` fails, so readiness must really ask NATS and the service's
Redis/Postgres, and say which one is down.
"""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from services.l2_gateway.service import build as l2_build
from devstack import servers
from tests.helpers import running


def build_with(checks: dict):
    """A service with no endpoints, only readiness checks (name -> factory(env) -> check)."""
    async def build(rt) -> None:
        for name, make in checks.items():
            check, close = await make(rt.settings)
            rt.ready_check(name, check)
            if close is not None:
                rt.on_close(close)
    return build


async def real_redis(settings):
    client = aioredis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    return client.ping, client.aclose


async def real_postgres(settings):
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    return (lambda: pool.fetchval("SELECT 1")), pool.close


async def dead_redis(_settings):
    # Nothing listens on a port we just freed: connection refused, fast.
    client = aioredis.from_url(f"redis://127.0.0.1:{servers.free_port()}/0",
                               socket_timeout=1, socket_connect_timeout=1)
    return client.ping, client.aclose


async def hanging(_settings):
    return (lambda: asyncio.sleep(60)), None


async def get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.get(f"http://127.0.0.1:{port}{path}")


async def test_ready_when_nats_redis_and_postgres_answer(server_env):
    port = servers.free_port()
    build = build_with({"redis": real_redis, "postgres": real_postgres})
    async with running("probe-ok", build, server_env, metrics_port=port):
        live = await get(port, "/livez")
        assert live.status_code == 200
        ready = await get(port, "/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready",
                                "checks": {"nats": "ok", "redis": "ok", "postgres": "ok"}}
        assert (await get(port, "/nope")).status_code == 404
    with pytest.raises(httpx.ConnectError):  # closed with the service
        await get(port, "/livez")


async def test_not_ready_names_the_dependency_that_does_not_answer(server_env):
    port = servers.free_port()
    build = build_with({"redis": dead_redis, "postgres": real_postgres})
    async with running("probe-dead-redis", build, server_env, metrics_port=port):
        assert (await get(port, "/livez")).status_code == 200  # alive, only not ready
        ready = await get(port, "/readyz")
        assert ready.status_code == 503
        body = ready.json()
        assert body["status"] == "not ready" and body["failing"] == ["redis"]
        assert body["checks"]["nats"] == "ok" and body["checks"]["postgres"] == "ok"
        assert "Error" in body["checks"]["redis"]


async def test_a_check_that_hangs_fails_within_the_timeout(server_env):
    port = servers.free_port()
    async with running("probe-hang", build_with({"slow": hanging}), server_env, metrics_port=port):
        started = asyncio.get_running_loop().time()
        ready = await get(port, "/readyz")
        assert asyncio.get_running_loop().time() - started < 5
        assert ready.status_code == 503
        assert ready.json()["failing"] == ["slow"]
        assert ready.json()["checks"]["slow"].startswith("no answer within")


async def test_not_ready_while_building_but_alive(server_env):
    port = servers.free_port()
    release = asyncio.Event()

    async def slow_build(rt) -> None:
        await release.wait()  # an embedding model loading, a migration running

    task = asyncio.create_task(_enter_and_wait(running("probe-slow-build", slow_build, server_env,
                                                       metrics_port=port), release))
    for _ in range(100):  # the server listens once NATS is connected, before build
        try:
            live = await get(port, "/livez")
            break
        except httpx.ConnectError:
            await asyncio.sleep(0.05)
    else:
        raise AssertionError("metrics port never opened during build")
    assert live.status_code == 200
    ready = await get(port, "/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "starting"
    release.set()
    assert await asyncio.wait_for(task, 30) == 200


async def _enter_and_wait(ctx, release: asyncio.Event) -> int:
    async with ctx as settings:
        return (await get(settings.metrics_port, "/readyz")).status_code


async def test_not_ready_when_nats_goes_away(tmp_path, redis_url, database_url):
    own_nats = servers.start_nats(tmp_path / "nats", die_with_parent=True)  # ours to stop
    env = {"NATS_URL": own_nats.url, "REDIS_URL": redis_url, "DATABASE_URL": database_url}
    port = servers.free_port()
    try:
        async with running("probe-nats", build_with({}), env, metrics_port=port):
            assert (await get(port, "/readyz")).status_code == 200
            own_nats.stop()
            for _ in range(50):
                ready = await get(port, "/readyz")
                if ready.status_code == 503:
                    break
                await asyncio.sleep(0.1)
            assert ready.status_code == 503
            assert ready.json()["failing"] == ["nats"]
            assert (await get(port, "/livez")).status_code == 200
    finally:
        own_nats.stop()


async def test_l2_gateway_registers_redis_and_its_stream_and_serves_metrics(clean_state):
    port = servers.free_port()
    async with running("l2-gateway", l2_build, clean_state, metrics_port=port):
        ready = await get(port, "/readyz")
        assert ready.status_code == 200, ready.text
        assert set(ready.json()["checks"]) == {"nats", "redis", "memory-stream"}
        scrape = await get(port, "/metrics")
        assert scrape.status_code == 200
        assert scrape.headers["content-type"].startswith("text/plain")
        assert "# TYPE tiermem_requests_total counter" in scrape.text
        async with httpx.AsyncClient(timeout=10) as http:  # what Prometheus itself asks for
            om = await http.get(f"http://127.0.0.1:{port}/metrics",
                                headers={"Accept": "application/openmetrics-text; version=1.0.0",
                                         "Accept-Encoding": "gzip"})
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.headers["content-encoding"] == "gzip"
        assert om.text.rstrip().endswith("# EOF")
