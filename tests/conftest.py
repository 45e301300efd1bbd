"""Real servers for tests: NATS+JetStream, Redis-compatible, Postgres+pgvector.

Why: service tests run against the real thing, not mocks (STYLE.md, habit 9).
Each server starts lazily, once per session, on a free loopback port under a
temp folder, and dies with the test process even if pytest is killed. Set
`NATS_URL` / `REDIS_URL` / `DATABASE_URL` to test against existing servers
instead; those are never flushed unless `TIERMEM_TESTS_MAY_FLUSH=1`.

Fixtures (session): `nats_url`, `redis_url`, `redis_cluster_url` (three masters), `database_url`, `server_env`
(the three as an env dict, for spawning service processes).

The NATS server runs locked, as in production: one user per role of
`shared.permissions`, passwords in `tests.helpers.IDENTITIES` (so
`helpers.client` and `helpers.running` connect as the right role) and in a
file named by `TIERMEM_NATS_IDENTITIES` (so `devstack up` against it gives
each service its own identity).
Fixtures (function): `clean_nats`, `clean_redis`, `clean_redis_cluster`, `clean_db`, `clean_state`
(all three, before the test), and `reset_state` (an async callable, to reset
in the middle of a test). Plain helpers for module-scoped fixtures:
`reset_servers(nats_url, redis_url, database_url)` (what `reset_state` does)
and `stack_processes(env, state)` (`python -m devstack up` ... `down`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from devstack import servers
from shared import bus, permissions
from tests import helpers

REPO = Path(__file__).resolve().parents[1]

_STARTED: dict[str, servers.Server] = {}  # name -> server this session started (ours to flush)


def may_flush(name: str) -> bool:
    """May tests wipe server `name` ("nats", "redis", "postgres")? Only ours, or with TIERMEM_TESTS_MAY_FLUSH=1."""
    return name in _STARTED or os.environ.get("TIERMEM_TESTS_MAY_FLUSH") == "1"


@pytest.fixture(scope="session")
def servers_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("servers")


def _server(name: str, folder: Path, **options):
    """The URL of server `name` of `devstack.servers.SERVERS`: the one its variable names, else ours."""
    spec = servers.server(name)
    given = os.environ.get(spec.url_var)
    if given:
        yield given
        return
    server = spec.start(folder / name, die_with_parent=True, **options)
    _STARTED[name] = server
    try:
        yield server.url
    finally:
        _STARTED.pop(name, None)
        server.stop()


@pytest.fixture(scope="session")
def nats_url(servers_dir):
    if os.environ.get("NATS_URL"):
        yield os.environ["NATS_URL"]  # its users, if any, are the operator's (NATS_USER...)
        return
    import json
    import secrets

    passwords = {name: secrets.token_urlsafe(16) for name in permissions.ROLES}
    identities = servers_dir / "nats-identities.json"
    identities.write_text(json.dumps(passwords))
    os.environ["TIERMEM_NATS_IDENTITIES"] = str(identities)
    for url in _server("nats", servers_dir, users=permissions.nats_users(passwords)):
        helpers.IDENTITIES[url] = passwords
        yield url
        helpers.IDENTITIES.pop(url, None)
    os.environ.pop("TIERMEM_NATS_IDENTITIES", None)


@pytest.fixture(scope="session")
def redis_url(servers_dir):
    yield from _server("redis", servers_dir)


@pytest.fixture(scope="session")
def redis_cluster_url(servers_dir):
    """A local Redis Cluster of three masters (`devstack.redis.start_redis_cluster`), ours to flush."""
    cluster = servers.start_redis_cluster(servers_dir / "redis-cluster", die_with_parent=True)
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture
async def clean_redis_cluster(redis_cluster_url):
    from redis.asyncio import RedisCluster

    client = RedisCluster.from_url(redis_cluster_url)
    try:
        await client.flushall(target_nodes=RedisCluster.PRIMARIES)
        await client.script_flush()  # every primary (redis-py sends SCRIPT FLUSH to all)
    finally:
        await client.aclose()
    return redis_cluster_url


@pytest.fixture(scope="session")
def database_url(servers_dir):
    yield from _server("postgres", servers_dir)


@pytest.fixture(scope="session")
def server_env(nats_url, redis_url, database_url) -> dict[str, str]:
    """Env vars that point a service process (or `devstack up`) at the test servers."""
    return {"NATS_URL": nats_url, "REDIS_URL": redis_url, "DATABASE_URL": database_url}


# --------------------------------------------------------------------------- isolation


def _skip_flush(name: str) -> bool:
    if may_flush(name):
        return False
    warnings.warn(f"not resetting {name}: it was given by URL (set TIERMEM_TESTS_MAY_FLUSH=1 to allow)",
                  stacklevel=3)
    return True


async def flush_redis(url: str) -> None:
    import redis.asyncio as redis

    client = redis.from_url(url)
    try:
        await client.flushall()
    finally:
        await client.aclose()


async def delete_jetstream(url: str) -> None:
    """Delete every stream (their consumers, KV buckets and object stores go with them)."""
    nc = await bus.connect(url, helpers.auth(url, permissions.ADMIN), connect_timeout=5,
                           allow_reconnect=False)
    try:
        jsm = nc.jsm()
        while streams := await jsm.streams_info():
            for info in streams:
                await jsm.delete_stream(info.config.name)
    finally:
        await nc.close()


async def recreate_database(url: str) -> None:
    """DROP DATABASE ... WITH (FORCE) + CREATE: a clean schema in ~100 ms, even with clients connected."""
    import asyncpg

    parts = urlsplit(url)
    dbname = parts.path.lstrip("/") or "postgres"
    if dbname == "postgres":
        raise RuntimeError("refusing to drop the 'postgres' database")
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    conn = await asyncpg.connect(admin_url)
    try:
        ident = '"' + dbname.replace('"', '""') + '"'
        await conn.execute(f"DROP DATABASE IF EXISTS {ident} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {ident}")
    finally:
        await conn.close()


@pytest.fixture
async def clean_nats(nats_url):
    if not _skip_flush("nats"):
        await delete_jetstream(nats_url)
    return nats_url


@pytest.fixture
async def clean_redis(redis_url):
    if not _skip_flush("redis"):
        await flush_redis(redis_url)
    return redis_url


@pytest.fixture
async def clean_db(database_url):
    if not _skip_flush("postgres"):
        await recreate_database(database_url)
    return database_url


@pytest.fixture
async def clean_state(clean_nats, clean_redis, clean_db) -> dict[str, str]:
    """Empty JetStream, Redis and database before the test; returns the env dict like `server_env`."""
    return {"NATS_URL": clean_nats, "REDIS_URL": clean_redis, "DATABASE_URL": clean_db}


@pytest.fixture
def reset_state(nats_url, redis_url, database_url):
    """`await reset_state()` empties all three servers mid-test (same rules as `clean_state`)."""

    async def reset() -> None:
        await reset_servers(nats_url, redis_url, database_url)

    return reset


async def reset_servers(nats_url: str, redis_url: str, database_url: str) -> None:
    """Empty JetStream, Redis and the database (each only if tests may flush it)."""
    if not _skip_flush("nats"):
        await delete_jetstream(nats_url)
    if not _skip_flush("redis"):
        await flush_redis(redis_url)
    if not _skip_flush("postgres"):
        await recreate_database(database_url)


@contextlib.contextmanager
def stack_processes(env: dict[str, str], state: Path):
    """Every service as its own process (`python -m devstack up` with `env`, state
    under `state`) until the block ends; `up` must succeed."""
    env = {**env, "TIERMEM_STATE_DIR": str(state)}
    run = lambda cmd: subprocess.run([sys.executable, "-m", "devstack", cmd], env=env,  # noqa: E731
                                     cwd=REPO, capture_output=True, text=True, timeout=240)
    started = run("up")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield env
    finally:
        run("down")


@pytest.fixture(scope="module")
def simulator(tmp_path_factory):
    """The Claude API simulator as its own process, with near-zero model latency; its URL."""
    env = {**os.environ, "SIMULATOR_LATENCY_MEDIAN_S": "0.002", "SIMULATOR_LATENCY_P95_S": "0.004"}
    sim = servers.start_simulator(tmp_path_factory.mktemp("sim"), env=env, die_with_parent=True)
    yield sim.url
    sim.stop()


@pytest.fixture
def spans():
    """Finished spans of this process, in memory (added to whatever provider is installed)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    yield exporter
    processor.shutdown()
