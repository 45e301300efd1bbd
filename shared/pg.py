"""Postgres plumbing shared by the services that own tables: migrations, connections.

Each component keeps its SQL in numbered files under its own folder and its
tables in its own schema (`l3`, `llm`, ...); `migrate` applies what is new,
under one database-wide advisory lock so replicas starting together are safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path
from typing import Union

import asyncpg
import structlog

log = structlog.get_logger()

Pool = Union[asyncpg.Pool, asyncpg.Connection]

#: advisory lock (namespace, key) that serialises every migration run of the
#: database (any component), so concurrent starts are safe
MIGRATE_LOCK = (1953064306, 0)  # 'tier'


@contextlib.asynccontextmanager
async def connection(target: Pool):
    if isinstance(target, asyncpg.Pool):
        async with target.acquire() as conn:
            yield conn
    else:
        yield target


def _migration_files(directory: Path) -> list[tuple[int, str, Path]]:
    files = []
    for path in sorted(directory.glob("*.sql")):
        head = path.name.split("_", 1)[0]
        if not head.isdigit():
            raise RuntimeError(f"migration file {path.name} must start with a number")
        files.append((int(head), path.name, path))
    versions = [v for v, _, _ in files]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration numbers in {directory}")
    return files


async def migrate(target: Pool, *, schema: str, directory: Path) -> list[str]:
    """Apply the numbered SQL files of `directory` that `schema.schema_migrations`
    does not list, in order; return the names applied (empty: nothing to do).

    The whole run is one transaction under a database-wide advisory lock, so
    concurrent starts wait for each other and then find nothing to do, and a
    failing file leaves nothing half-applied. Reusable by other components
    with their own schema and directory. `target`: a connection or a pool.
    """
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", schema):
        raise ValueError(f"bad schema name {schema!r}")
    files = _migration_files(directory)
    applied_now: list[str] = []
    async with connection(target) as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", *MIGRATE_LOCK)
        # Only when missing: CREATE SCHEMA IF NOT EXISTS needs CREATE on the
        # database even when the schema exists, which a service role that owns
        # a schema made for it (k8s/components/postgres-cnpg) does not have.
        if not await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema):
            await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {schema}.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, sha256 text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"]: r for r in await conn.fetch(
            f"SELECT version, name, sha256 FROM {schema}.schema_migrations")}
        for version, name, path in files:
            sql = path.read_text()
            digest = hashlib.sha256(sql.encode()).hexdigest()
            if version in done:
                if done[version]["sha256"] != digest:
                    log.warning("migration_changed_after_apply", schema=schema, migration=name)
                continue
            await conn.execute(sql)
            await conn.execute(
                f"INSERT INTO {schema}.schema_migrations (version, name, sha256) VALUES ($1, $2, $3)",
                version, name, digest,
            )
            applied_now.append(name)
    if applied_now:
        log.info("migrations_applied", schema=schema, applied=applied_now)
    return applied_now
