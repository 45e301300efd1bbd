"""k8s/: every service is someone of its own on the bus, in Redis and in Postgres.

Read from the rendered overlays: each container that talks to NATS takes its
identity (NATS_USER/NATS_PASSWORD) from its role's own Secret, each service
using Redis or Postgres likewise (REDIS_USERNAME/REDIS_PASSWORD, PGUSER/
PGPASSWORD), and no two services share one. The servers in the cluster know
exactly those identities, with passwords from the same Secrets: the NATS
users carry the permissions of shared/permissions.py (compared here, so the two
cannot drift), Redis has one ACL user per service and its default user off,
CloudNativePG one role per service.

Then against real servers: nats-server loads the rendered config (and refuses
to start without a password), the Redis ACL rules of the manifest let each
service's own Redis code run and refuse everything else, and the Postgres
bootstrap SQL of the manifest lets each service migrate its own schema as its
own role and touch nothing of the other's. TLS wiring is checked where an
overlay turns it on.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import uuid
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pytest

from shared import permissions
from devstack.servers import nats_server_binary
from tests.test_k8s_manifests import (
    OVERLAYS, REPO, SERVICES, _load, env_of, objects, pod_containers, workloads,
)

ROLE_OF_MODULE = {module: name for name, (module, _) in SERVICES.items()} | {
    "services.agent_worker": permissions.WORKER,
}
PG_ROLES = {"l3-semantic-indexer": "l3_semantic_indexer", "llm-broker": "llm_broker"}


RENDER = _load(REPO / "deploy" / "render_nats_auth.py")  # identities, their Secrets and variables


def tiermem_containers(overlay: str):
    """(deployment, container, role) for every container running one of our modules."""
    for name, deployment in objects(overlay, "Deployment").items():
        for c in pod_containers(deployment):
            command = c.get("command", [])
            if command[:2] == ["python", "-m"]:
                yield name, c, ROLE_OF_MODULE.get(command[2])


def secret_pair(env: dict, user_var: str, password_var: str) -> str:
    """The one Secret both variables come from (keys username, password)."""
    user, password = env.get(user_var), env.get(password_var)
    assert user and password, (user_var, password_var)
    assert user["secretKeyRef"]["key"] == "username" and password["secretKeyRef"]["key"] == "password"
    assert user["secretKeyRef"]["name"] == password["secretKeyRef"]["name"]
    return user["secretKeyRef"]["name"]


def server_env_secrets(container: dict) -> dict[str, str]:
    """A server container's variables that come from a Secret's password: name -> Secret."""
    return {v["name"]: v["valueFrom"]["secretKeyRef"]["name"] for v in container.get("env", [])
            if v.get("valueFrom", {}).get("secretKeyRef", {}).get("key") == "password"}


def with_component(name: str) -> list[str]:
    return [o for o in OVERLAYS if any(w == name for w in workloads(o))]


# --------------------------------------------------------------------------- who each service is


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_on_the_bus_has_its_roles_own_nats_identity_from_a_secret(overlay):
    secret_of_role: dict[str, set[str]] = {}
    seen = []
    for name, c, role in tiermem_containers(overlay):
        env = env_of(c, overlay)
        if role is None:  # the LLM simulator: HTTP only, and no way onto the bus
            assert not {"NATS_USER", "NATS_PASSWORD", "NATS_CREDS"} & set(env), name
            labels = objects(overlay, "Deployment")[name]["spec"]["template"]["metadata"]["labels"]
            assert "tiermem.io/nats-client" not in labels, name
            continue
        secret = secret_pair(env, "NATS_USER", "NATS_PASSWORD")
        assert secret == RENDER.secret_name(role), (name, c["name"], secret)
        secret_of_role.setdefault(role, set()).add(secret)
        seen.append(role)
    assert set(seen) >= set(SERVICES)
    if "agent-worker" in objects(overlay, "Deployment"):
        assert {permissions.WORKER, permissions.MEMORY_L1} <= set(seen)  # the worker and its sidecar
    # one Secret per role, none shared between roles
    assert all(len(s) == 1 for s in secret_of_role.values())
    flat = [s for secrets in secret_of_role.values() for s in secrets]
    assert len(flat) == len(set(flat))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_has_its_own_redis_and_postgres_identity_where_it_uses_them(overlay):
    redis, postgres = {}, {}
    for name, (_, needs) in SERVICES.items():
        c = objects(overlay, "Deployment")[name]["spec"]["template"]["spec"]["containers"][0]
        env = env_of(c, overlay)
        if "redis" in needs:
            redis[name] = secret_pair(env, "REDIS_USERNAME", "REDIS_PASSWORD")
            assert redis[name] == f"tiermem-redis-{name}"
        else:
            assert not {"REDIS_USERNAME", "REDIS_PASSWORD"} & set(env), name
        if "postgres" in needs:
            postgres[name] = secret_pair(env, "PGUSER", "PGPASSWORD")
            assert postgres[name] == f"tiermem-postgres-{name}"
        else:
            assert not {"PGUSER", "PGPASSWORD"} & set(env), name
    assert set(redis) == {"l2-gateway", "llm-broker", "freshness-auditor"}
    assert set(postgres) == set(PG_ROLES)
    assert len(set(redis.values())) == len(redis) and len(set(postgres.values())) == len(postgres)


def test_dev_identities_are_marked_placeholders_and_name_the_servers_users():
    """Dev generates every identity's Secret with a value that says it is no secret;
    its username is the user the server knows (NATS role, Redis ACL user, Postgres role)."""
    secrets = objects("dev", "Secret")

    def read(name: str) -> tuple[str, str]:
        s = secrets[name]
        assert s["type"] == "kubernetes.io/basic-auth", name
        return tuple(base64.b64decode(s["data"][k]).decode() for k in ("username", "password"))

    for identity in RENDER.IDENTITIES:
        user, password = read(RENDER.secret_name(identity))
        assert user == identity and "dev-only-not-a-secret" in password
    for user in redis_users("dev"):
        if user != "default":
            name, password = read(f"tiermem-redis-{user}")
            assert name == user and "dev-only-not-a-secret" in password
    for service, role in PG_ROLES.items():
        name, password = read(f"tiermem-postgres-{service}")
        assert name == role and "dev-only-not-a-secret" in password


# --------------------------------------------------------------------------- NATS


def nats_users(overlay: str) -> list[dict]:
    """The users of the rendered NATS config (auth.conf), passwords kept as `$VARIABLE`."""
    config, = (o for name, o in objects(overlay, "ConfigMap").items() if name.startswith("nats-config"))
    assert "include ./auth.conf" in config["data"]["nats.conf"]
    text = "\n".join(line for line in config["data"]["auth.conf"].splitlines() if not line.startswith("#"))
    body = re.sub(r": \$([A-Z][A-Z0-9_]*)", r': "$\1"', text.removeprefix("authorization: "))
    return json.loads(body)["users"]


@pytest.mark.parametrize("overlay", with_component("nats"))
def test_nats_users_have_exactly_the_permissions_of_shared_permissions(overlay):
    users = {u["user"]: u for u in nats_users(overlay)}
    assert set(users) == set(permissions.ROLES)
    for name, role in permissions.ROLES.items():
        user = users[name]
        if name == permissions.ADMIN:
            assert "permissions" not in user  # everything
            continue
        perms = user["permissions"]
        assert perms["publish"] == {"allow": list(role.publish)}, name
        assert perms["subscribe"] == {"allow": list(role.subscribe)}, name
        assert perms.get("allow_responses", False) is role.serves, name


@pytest.mark.parametrize("overlay", with_component("nats"))
def test_nats_server_takes_each_password_from_the_secret_its_identity_reads(overlay):
    nats, = objects(overlay, "StatefulSet")["nats"]["spec"]["template"]["spec"]["containers"]
    from_secrets = server_env_secrets(nats)
    for user in nats_users(overlay):
        var = user["password"].removeprefix("$")
        assert from_secrets[var] == RENDER.secret_name(user["user"]), user["user"]
    # and every identity a pod uses is a user of this server
    used = {role for _, _, role in tiermem_containers(overlay) if role}
    assert used <= {u["user"] for u in nats_users(overlay)}


def test_nats_auth_files_are_current_with_shared_permissions():
    assert RENDER.AUTH_CONF.read_text() == RENDER.auth_conf(), "run: .venv/bin/python deploy/render_nats_auth.py"
    assert RENDER.AUTH_ENV.read_text() == RENDER.auth_env(), "run: .venv/bin/python deploy/render_nats_auth.py"


def test_nats_server_loads_the_rendered_config_and_will_not_start_without_a_password(tmp_path):
    config, = (o for name, o in objects("dev", "ConfigMap").items() if name.startswith("nats-config"))
    for file, text in config["data"].items():
        (tmp_path / file).write_text(text)
    passwords = {RENDER.password_var(i): f"pw{i.replace('-', '')}" for i in RENDER.IDENTITIES}
    env = {"POD_NAME": "nats-0", **passwords}

    def check(env: dict) -> subprocess.CompletedProcess:
        return subprocess.run([str(nats_server_binary()), "-t", "-c", str(tmp_path / "nats.conf")],
                              env=env, capture_output=True, text=True, timeout=30)

    ok = check(env)
    assert ok.returncode == 0, ok.stderr
    missing = check({k: v for k, v in env.items() if k != RENDER.password_var(permissions.WORKER)})
    assert missing.returncode != 0 and RENDER.password_var(permissions.WORKER) in missing.stderr


# --------------------------------------------------------------------------- Redis


def redis_users(overlay: str) -> dict[str, list[str]]:
    """The ACL users on the Redis server's command line: user -> its rules."""
    c, = objects(overlay, "Deployment")["redis"]["spec"]["template"]["spec"]["containers"]
    users: dict[str, list[str]] = {}
    args = c["args"]
    for i, arg in enumerate(args):
        if arg == "--user":
            rest = args[i + 1:]
            end = next((j for j, a in enumerate(rest) if a.startswith("--")), len(rest))
            users[rest[0]] = rest[1:end]
    return users


@pytest.mark.parametrize("overlay", with_component("redis"))
def test_redis_has_one_acl_user_per_service_and_no_default_user(overlay):
    users = redis_users(overlay)
    assert users["default"][0] == "off" and "-@all" in users["default"]
    services = {name for name, (_, needs) in SERVICES.items() if "redis" in needs}
    assert set(users) == {"default", "admin", *services}
    c, = objects(overlay, "Deployment")["redis"]["spec"]["template"]["spec"]["containers"]
    from_secrets = server_env_secrets(c)
    for user, rules in users.items():
        if user == "default":
            continue
        password, = [r for r in rules if r.startswith(">")]
        var = re.fullmatch(r">\$\(([A-Z0-9_]+)\)", password).group(1)
        assert from_secrets[var] == f"tiermem-redis-{user}", user
        if user != "admin":  # a service: its own keys only, no Pub/Sub, nothing dangerous
            assert "resetchannels" in rules and rules[-1] == "-@dangerous", user
            assert [r for r in rules if r.startswith("~")] == [f"~{PREFIXES[user]}*"], user


PREFIXES = {"l2-gateway": "tm:", "llm-broker": "llm:", "freshness-auditor": "audit:"}


async def test_redis_acl_lets_each_service_run_its_own_redis_code_and_nothing_else(redis_url, clean_redis):
    """The manifest's rules, applied to a real valkey; each service's own code runs as its user."""
    import redis.asyncio as aioredis
    from redis.exceptions import NoPermissionError

    from services.freshness_auditor.tally import Tally
    from services.l2_gateway.fence import Fence
    from services.l2_gateway.redis_window import RedisWindow
    from services.llm_broker import stats
    from services.llm_broker.cache import ResponseCache
    from services.llm_broker.thresholds import Thresholds
    from shared import lastseq
    from shared.contract import Message

    admin = aioredis.from_url(redis_url)
    users = {u: rules for u, rules in redis_users("dev").items() if u in PREFIXES}
    suffix = uuid.uuid4().hex[:8]  # this server is shared by the session: users of our own
    clients = {}
    try:
        for user, rules in users.items():
            rules = [">pw" if r.startswith(">") else r for r in rules]
            await admin.execute_command("ACL", "SETUSER", f"{user}-{suffix}", "reset", *rules)
            parts = urlsplit(redis_url)
            url = urlunsplit(parts._replace(netloc=f"{user}-{suffix}:pw@{parts.hostname}:{parts.port}"))
            clients[user] = aioredis.from_url(url)

        # l2-gateway: its window scripts (loaded by SHA), the epoch and its lock, a sweep's
        # and a reset's scan and delete
        window = RedisWindow(clients["l2-gateway"], 10, 60.0, Fence())
        assert await window.take_lock("t")
        window.fence.adopt(await window.new_epoch(1, 1))
        msg = Message(seq=1, msg_id="m1", role="user", bot_id="b", text="hi", ts="2026-01-01T00:00:00Z")
        at = window.fence.seen
        assert (await window.apply_batch([("u1", msg, 10)], 1, at, "t", fresh=True))[1:] == (0, 1)
        assert (await window.read("u1", 5)).last == 1
        # ... and the user's message seq it wrote, which the llm-broker may read, not write
        assert await clients["llm-broker"].get(lastseq.key("u1")) == b"1"
        with pytest.raises(NoPermissionError):
            await clients["llm-broker"].set(lastseq.key("u1"), 0)
        # ... and the L2 state, read with every exact lookup (which makes `llm:epoch`), not written
        cache = ResponseCache(clients["llm-broker"], None, "m")
        entry, fence = await cache.lookup("k", "u1", 1.0)
        assert entry is None and fence.user_seqs == {"u1": 1} and fence.untrusted == ""
        assert cache.view.seen.epoch == window.fence.epoch and cache.view.token
        with pytest.raises(NoPermissionError):
            await clients["llm-broker"].hset(lastseq.STATE, "applied", 0)
        # ... and the log position due (the gateway's), below which L2's user seqs may lag
        await window.note_due(5)
        assert (await cache.lookup("k", "u1", 1.0))[1].untrusted == "behind_log"
        with pytest.raises(NoPermissionError):
            await clients["llm-broker"].set(lastseq.DUE, 0)
        await window.forget("u1", 1)
        await window.sweep("another-epoch")
        await window.release_lock("t")
        async for key in clients["l2-gateway"].scan_iter(match="tm:*"):
            await clients["l2-gateway"].delete(key)
        # llm-broker: its totals and thresholds
        totals = stats.Totals()
        totals.add("miss", None, 0.01, 0.0)
        await totals.flush(clients["llm-broker"])
        assert (await stats.read(clients["llm-broker"])) is not None
        thresholds = Thresholds(clients["llm-broker"], 0.9)
        await thresholds.load()
        assert (await thresholds.record("p", wrong=True, tighten=True)).move == "tightened"
        await thresholds.load()  # both hashes in one snapshot: a script, not MULTI
        assert thresholds.get("p") > 0.9
        # freshness-auditor: its tally
        tally = Tally(clients["freshness-auditor"], 0.05)
        tally.memory("l1", "checked")
        await tally.flush()
        await tally.read()

        for user, client in clients.items():
            for other, prefix in PREFIXES.items():
                if other != user:
                    with pytest.raises(NoPermissionError):
                        await client.get(f"{prefix}x")
            for command in (("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("SCRIPT", "FLUSH"),
                            ("PUBLISH", "c", "m")):
                with pytest.raises(NoPermissionError):
                    await client.execute_command(*command)
    finally:
        for client in clients.values():
            await client.aclose()
        for user in users:
            await admin.execute_command("ACL", "DELUSER", f"{user}-{suffix}")
        await admin.aclose()


# --------------------------------------------------------------------------- Postgres


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if objects(o, "Cluster")])
def test_cloudnativepg_makes_one_role_per_service_with_its_secret(overlay):
    cluster, = objects(overlay, "Cluster").values()
    roles = {r["name"]: r for r in cluster["spec"]["managed"]["roles"]}
    assert set(roles) == set(PG_ROLES.values())
    for service, role in PG_ROLES.items():
        r = roles[role]
        assert r["login"] is True and r["ensure"] == "present"
        assert not {"superuser", "createdb", "createrole", "replication", "bypassrls"} & \
            {k for k, v in r.items() if v is True}
        assert r["passwordSecret"]["name"] == f"tiermem-postgres-{service}"


async def test_postgres_bootstrap_lets_each_service_migrate_its_own_schema_and_nothing_else(database_url):
    """The manifest's bootstrap SQL on a real Postgres, in a database of its own;
    then each service migrates as its own role, and cannot touch the other's tables."""
    import asyncpg

    from services.l3_semantic_indexer import store
    from services.llm_broker import cache

    cluster = objects("dev", "Cluster")["tiermem-postgres"]
    sql = cluster["spec"]["bootstrap"]["initdb"]["postInitApplicationSQL"]
    db = f"k8s_roles_{uuid.uuid4().hex[:8]}"
    parts = urlsplit(database_url)
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    await admin.execute(f"CREATE DATABASE {db}")
    roles = list(PG_ROLES.values())
    try:
        here = await asyncpg.connect(urlunsplit(parts._replace(path=f"/{db}")))
        try:
            for statement in sql:
                await here.execute(statement.replace("DATABASE tiermem ", f"DATABASE {db} "))
            for role in roles:  # what CloudNativePG's managed.roles adds
                await here.execute(f"ALTER ROLE {role} LOGIN PASSWORD 'pw'")
        finally:
            await here.close()

        def dsn(role: str) -> str:
            return urlunsplit(parts._replace(netloc=f"{role}:pw@{parts.hostname}:{parts.port}", path=f"/{db}"))

        l3 = await store.create_pool(dsn("l3_semantic_indexer"), model_id="k8s-test", dim=4)
        broker = await asyncpg.connect(dsn("llm_broker"))
        try:
            await cache.pg.migrate(broker, schema="llm", directory=cache.MIGRATIONS)
            await l3.execute("SELECT l3.forget('u1', 5)")
            await broker.execute("DELETE FROM llm.entries WHERE user_id = 'u1'")
            for conn, forbidden in ((l3, "SELECT count(*) FROM llm.entries"),
                                    (broker, "SELECT count(*) FROM l3.messages"),
                                    (broker, "SELECT l3.forget('u1', 5)"),
                                    (l3, "CREATE SCHEMA other"),
                                    (broker, "CREATE TABLE public.other (x int)")):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(forbidden)
        finally:
            await broker.close()
            await l3.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        for role in roles:
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


# --------------------------------------------------------------------------- TLS


def _mounted(workload: dict, container: dict, path: str) -> dict:
    """The Secret volume `path` (a file) is mounted from, checked to project certificates only."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    mounts = [m for m in container.get("volumeMounts", [])
              if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{container['name']}: nothing mounted at {path}"
    deepest = max(mounts, key=lambda m: len(m["mountPath"]))
    return volumes[deepest["name"]]["secret"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_postgres_clients_verify_the_server_with_a_mounted_ca(overlay):
    for name in PG_ROLES:
        deployment = objects(overlay, "Deployment")[name]
        c = deployment["spec"]["template"]["spec"]["containers"][0]
        url = env_of(c, overlay)["DATABASE_URL"]
        if isinstance(url, dict):  # managed: the URL is the operator's (documented: verify-full)
            assert url["secretKeyRef"]["name"] == "tiermem-postgres"
            continue
        query = parse_qs(urlsplit(url).query)
        assert query["sslmode"] == ["verify-full"]
        secret = _mounted(deployment, c, query["sslrootcert"][0])
        assert secret == {"secretName": "tiermem-postgres-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if objects(o, "Certificate")])
def test_tls_component_wires_nats_and_redis_servers_and_every_client(overlay):
    env_of_settings = objects(overlay, "ConfigMap")["tiermem-settings"]["data"]
    ca = env_of_settings["NATS_TLS_CA"]
    assert env_of_settings["NATS_URL"].startswith("tls://")
    redis = urlsplit(env_of_settings["REDIS_URL"])
    assert redis.scheme == "rediss" and parse_qs(redis.query)["ssl_ca_certs"] == [ca]
    for name, c, role in tiermem_containers(overlay):
        if role is not None:
            secret = _mounted(objects(overlay, "Deployment")[name], c, ca)
            assert secret["items"] == [{"key": "ca.crt", "path": "ca.crt"}], (name, c["name"])
    certificates = {o["spec"]["secretName"]: o for o in objects(overlay, "Certificate").values()}
    # NATS serves TLS with a mounted certificate of its name
    nats_set = objects(overlay, "StatefulSet")["nats"]
    nats, = nats_set["spec"]["template"]["spec"]["containers"]
    flags = dict(a.split("=", 1) for a in nats["args"] if "=" in a)
    assert "--tls" in nats["args"]
    for flag in ("--tlscert", "--tlskey"):
        secret = _mounted(nats_set, nats, flags[flag])["secretName"]
        assert "nats" in certificates[secret]["spec"]["dnsNames"]
    # Redis serves TLS only, on the port the Service and the clients use
    redis_deploy = objects(overlay, "Deployment")["redis"]
    server, = redis_deploy["spec"]["template"]["spec"]["containers"]
    args = server["args"]
    last = {flag: args[len(args) - 1 - args[::-1].index(flag) + 1] for flag in
            ("--port", "--tls-port", "--tls-cert-file", "--tls-key-file")}
    assert last["--port"] == "0" and last["--tls-port"] == str(redis.port)
    for flag in ("--tls-cert-file", "--tls-key-file"):
        secret = _mounted(redis_deploy, server, last[flag])["secretName"]
        assert "redis" in certificates[secret]["spec"]["dnsNames"]
    assert "--tls" in server["readinessProbe"]["exec"]["command"][2]
