"""The local servers and `devstack.stack` really work, and fail loudly without leaving processes behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from devstack import servers, stack
from shared import bus, permissions
from shared.settings import load_stack_env
from tests.helpers import auth

REPO = Path(__file__).resolve().parents[1]
URL_VARS = ("NATS_URL", "REDIS_URL", "DATABASE_URL", "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY")


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live (non-zombie) processes that mention `text` (a temp path, say)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and servers.process_alive(int(entry.name)):
            found.append(f"{entry.name}: {cmdline}")
    return found


def wait_no_process(text: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def live_children() -> set[int]:
    """Live (non-zombie) child processes of the test process: servers started in-process show up here."""
    me = str(os.getpid())
    kids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
            if ppid == me and state not in ("Z", "X"):
                kids.add(int(entry.name))
    return kids


def wait_no_new_children(before: set[int], timeout: float = 5.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while (new := live_children() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    return new


# --------------------------------------------------------------------------- the servers work


async def test_jetstream_acks_a_published_message(nats_url, clean_nats):
    nc = await bus.connect(nats_url, auth(nats_url, permissions.ADMIN))
    try:
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["t.>"])
        ack = await js.publish("t.lead-42", b"hello", headers={"Nats-Msg-Id": "m1"})
        assert (ack.stream, ack.seq, ack.duplicate) == ("T", 1, None)
        dup = await js.publish("t.lead-42", b"hello", headers={"Nats-Msg-Id": "m1"})
        assert (dup.seq, dup.duplicate) == (1, True)
        msg = await js.get_msg("T", 1)
        assert msg.data == b"hello"
    finally:
        await nc.close()


async def test_three_node_cluster_keeps_acking_r3_appends_through_a_node_restart(tmp_path):
    import asyncio
    import secrets

    passwords = {name: secrets.token_urlsafe(16) for name in permissions.ROLES}
    users = permissions.nats_users(passwords)
    specs = servers.nats_cluster(3)
    nodes = [servers.start_nats(tmp_path / f"node{i}", users=users, cluster=c, die_with_parent=True)
             for i, c in enumerate(specs)]
    url = ",".join(n.url for n in nodes)  # NATS_URL naming every node
    admin = bus.BusAuth(user=permissions.ADMIN, password=passwords[permissions.ADMIN])
    nc = await bus.connect(url, admin, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    try:
        js = nc.jetstream()
        for _ in range(100):  # the meta leader is elected once the routes are up
            try:
                await js.add_stream(name="T", subjects=["t.>"], num_replicas=3)
                break
            except Exception:
                await asyncio.sleep(0.2)
        acked = [(await js.publish("t.x", b"%d" % i)).seq for i in range(10)]
        peer_name = nodes[0].cmd[nodes[0].cmd.index("-n") + 1]
        nodes[0].stop()  # the first URL: the client most likely sits on it and must fail over
        for i in range(10, 20):
            for _ in range(100):
                try:
                    acked.append((await js.publish("t.x", b"%d" % i, timeout=1)).seq)
                    break
                except Exception:
                    await asyncio.sleep(0.1)
        nodes[0] = servers.start_nats(tmp_path / "node0", port=nodes[0].port, users=users, cluster=specs[0],
                                      die_with_parent=True)
        assert len(acked) == 20
        info = await js.stream_info("T")
        assert info.state.messages == 20 and info.config.num_replicas == 3
        assert nodes[0].cmd[nodes[0].cmd.index("-n") + 1] == peer_name  # the same JetStream peer
    finally:
        await nc.close()
        for n in nodes:
            n.stop()


async def test_redis_set_then_get(redis_url, clean_redis):
    import redis.asyncio as redis

    client = redis.from_url(redis_url)
    try:
        await client.set("k", "v")
        assert await client.get("k") == b"v"
        info = await client.info("server")
        assert "valkey_version" in info or "redis_version" in info
    finally:
        await client.aclose()


async def test_postgres_has_pgvector_cosine_search(database_url, clean_db):
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        await conn.execute("CREATE TABLE items (id int PRIMARY KEY, embedding vector(3))")
        await conn.execute("INSERT INTO items VALUES (1, '[1,0,0]'), (2, '[0,1,0]'), (3, '[0.9,0.1,0]')")
        rows = await conn.fetch("SELECT id, embedding <=> '[1,0,0]' AS d FROM items ORDER BY d LIMIT 2")
        assert [r["id"] for r in rows] == [1, 3]
        assert rows[0]["d"] == pytest.approx(0.0)
        assert await conn.fetchval("SELECT current_setting('server_version_num')::int") >= 180000
    finally:
        await conn.close()


async def test_reset_state_empties_every_server(nats_url, redis_url, database_url, reset_state):
    import asyncpg
    import nats
    import redis.asyncio as redis

    nc = await bus.connect(nats_url, auth(nats_url, permissions.ADMIN))
    r = redis.from_url(redis_url)
    try:
        await nc.jetstream().add_stream(name="R", subjects=["r.>"])
        await r.set("k", "v")
        conn = await asyncpg.connect(database_url)
        await conn.execute("CREATE TABLE IF NOT EXISTS leftover (id int)")
        # an open connection must not block the reset
        await reset_state()
        assert conn.is_closed() or not await _still_usable(conn)
        conn.terminate()
        assert await nc.jsm().streams_info() == []
        assert await r.dbsize() == 0
        conn = await asyncpg.connect(database_url)
        assert await conn.fetchval("SELECT to_regclass('leftover')") is None
        await conn.close()
    finally:
        await r.aclose()
        await nc.close()


async def _still_usable(conn) -> bool:
    try:
        await conn.fetchval("SELECT 1")
        return True
    except Exception:
        return False


def test_start_again_brings_the_same_server_back_with_its_port_and_options(tmp_path):
    """What the fault suite does after a kill: no per-server restart code, no option forgotten."""
    import asyncio

    import nats

    users = permissions.nats_users({role: "pw-" + role for role in permissions.ROLES})
    first = servers.start_nats(tmp_path / "n", users=users, die_with_parent=True)
    first.stop()
    again = first.start_again()
    try:
        assert again.port == first.port and again.pid != first.pid and again.alive()

        async def connect(**auth) -> None:
            nc = await nats.connect(again.url, allow_reconnect=False, connect_timeout=2, **auth)
            await nc.close()

        asyncio.run(connect(user=permissions.ADMIN, password="pw-" + permissions.ADMIN))
        with pytest.raises(Exception):  # the users came back too: no credentials, no entry
            asyncio.run(connect())
    finally:
        again.stop()


def test_settings_and_tools_read_the_stack_env_of_the_state_dir(tmp_path, monkeypatch):
    """One reader of stack.env: a service started by hand and the tools agree on TIERMEM_STATE_DIR."""
    from services.agent_worker.worker import WorkerSettings
    from shared.settings import Settings, state_dir

    (tmp_path / "stack.env").write_text("# written by up\nNATS_URL=nats://127.0.0.1:4999\n"
                                        "NATS_WORKER_USER=agent-worker\nNATS_WORKER_PASSWORD=pw\n")
    for var in ("NATS_URL", "NATS_USER", "NATS_PASSWORD", "NATS_CREDS", "NATS_NKEY_SEED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TIERMEM_STATE_DIR", str(tmp_path))
    assert state_dir() == tmp_path.resolve()
    assert load_stack_env() == load_stack_env(tmp_path) == load_stack_env(tmp_path / "stack.env") == {
        "NATS_URL": "nats://127.0.0.1:4999", "NATS_WORKER_USER": "agent-worker", "NATS_WORKER_PASSWORD": "pw"}
    assert Settings.from_env().nats_url == "nats://127.0.0.1:4999"
    assert WorkerSettings.from_env().nats_url == "nats://127.0.0.1:4999"
    assert load_stack_env(tmp_path / "gone") == {}  # the stack is down


def test_devstack_is_neither_installed_nor_imported_by_the_runtime():
    """The local-stack tooling stays out of the service image and out of what services import."""
    import re
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(re.fullmatch(pattern.replace("*", ".*"), "devstack") for pattern in include)
    allowed = [line[1:].strip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    assert "devstack" not in allowed
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert "devstack" not in dockerfile and "COPY . " not in dockerfile
    runtime = [*(REPO / "shared").rglob("*.py"), *(REPO / "services").rglob("*.py")]
    assert runtime
    importers = [str(p.relative_to(REPO)) for p in runtime
                 if re.search(r"^\s*(from|import)\s+devstack\b", p.read_text(), re.M)]
    assert importers == []


def test_postgres_keeps_data_across_restart(tmp_path):
    pg = servers.start_postgres(tmp_path / "pg", die_with_parent=True)
    try:
        servers.psql(servers.postgres_bin_dir(), pg.port, "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('x')",
                      db="tiermem")
    finally:
        pg.stop()
    assert not pg.alive()
    pg = servers.start_postgres(tmp_path / "pg", die_with_parent=True)
    try:
        assert servers.psql(servers.postgres_bin_dir(), pg.port, "SELECT v FROM kept", db="tiermem") == "x"
    finally:
        pg.stop()


# --------------------------------------------------------------------------- failures are loud and clean


@pytest.mark.parametrize("start", [servers.start_nats, servers.start_redis, servers.start_postgres],
                         ids=["nats", "redis", "postgres"])
def test_server_on_a_taken_port_fails_clearly_and_leaves_nothing(start, tmp_path):
    before = live_children()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(servers.ServerStartError) as err:
            start(tmp_path / "srv", port=port, timeout=15)
    message = str(err.value).lower()
    assert "address already in use" in message, message
    assert "log" in message
    assert wait_no_new_children(before) == set()


def test_missing_binary_fails_clearly(tmp_path):
    with pytest.raises(servers.ServerStartError, match="no executable at"):
        servers.start_nats(tmp_path, binary=tmp_path / "no-such-nats-server")


def test_binary_that_dies_at_start_shows_its_log(tmp_path):
    fake = tmp_path / "fake-server"
    fake.write_text("#!/bin/sh\necho 'fatal: cannot open the frobnicator' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(servers.ServerStartError) as err:
        servers.start_redis(tmp_path / "r", binary=fake, timeout=5)
    assert "exited with code 3" in str(err.value)
    assert "cannot open the frobnicator" in str(err.value)


def test_server_that_never_gets_ready_times_out_and_is_killed(tmp_path):
    fake = tmp_path / "sleepy-server"
    fake.write_text("#!/bin/sh\necho warming up\nexec sleep 300\n")
    fake.chmod(0o755)
    before = live_children()
    with pytest.raises(servers.ServerStartError, match=r"not ready after 1 s[\s\S]*warming up"):
        servers.start_nats(tmp_path / "n", binary=fake, timeout=1)
    assert wait_no_new_children(before) == set()


def test_test_servers_die_with_their_parent(tmp_path):
    code = textwrap.dedent(f"""
        from devstack import servers
        s = servers.start_redis({str(tmp_path / 'r')!r}, die_with_parent=True)
        print(s.pid, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 5
    while servers.process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not servers.process_alive(pid)


# --------------------------------------------------------------------------- devstack.stack


def _stack(args: list[str], state: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in URL_VARS}
    full_env.update(TIERMEM_STATE_DIR=str(state), **env)
    return subprocess.run([sys.executable, "-m", "devstack", *args], capture_output=True, text=True,
                          cwd=REPO, env=full_env, timeout=120)


def test_stack_up_writes_env_and_down_leaves_no_process(tmp_path, redis_url):
    state = tmp_path / "state"
    up = _stack(["up", "--no-services"], state, REDIS_URL=redis_url)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "using REDIS_URL" in up.stdout
        env = load_stack_env(state)
        assert env["REDIS_URL"] == redis_url
        assert env["NATS_URL"].startswith("nats://127.0.0.1:") and env["NATS_URL"] != "nats://127.0.0.1:4222"
        assert env["DATABASE_URL"].startswith("postgresql://postgres@127.0.0.1:")
        recorded = json.loads((state / "stack.json").read_text())["processes"]
        assert sorted(p["name"] for p in recorded) == ["llm-simulator", "nats", "postgres"]  # no supervisor
        assert all(servers.process_alive(p["pid"], p["start_time"]) for p in recorded)
        varz = httpx.get(env["NATS_MONITOR_URL"] + "/varz", timeout=5).json()
        assert varz["jetstream"]["config"]["sync_always"] is True  # an ack means on disk
        assert _stack(["status"], state).returncode == 0
    except BaseException:
        _stack(["down"], state)  # a failed assertion must not leave servers running
        raise

    down = _stack(["down"], state)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped nats" in down.stdout and "stopped postgres" in down.stdout
    assert not any(servers.process_alive(p["pid"]) for p in recorded)
    assert wait_no_process(str(state)) == []
    assert not (state / "stack.env").exists()
    again = _stack(["down"], state)
    assert again.returncode == 0 and "nothing to stop" in again.stdout
    assert _stack(["status"], state).returncode == 3


FAKE_SERVICE = """
import asyncio, os, signal
import nats
from nats.micro import add_service

async def main():
    nc = await nats.connect(os.environ["NATS_URL"], user=os.environ.get("NATS_USER"),
                            password=os.environ.get("NATS_PASSWORD"))
    svc = await add_service(nc, name="{name}", version="0.0.1", metadata={{"pid": str(os.getpid() + {pid_offset})}})
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("metrics on", os.environ["METRICS_PORT"], "db", os.environ["DATABASE_URL"], flush=True)
    await stop.wait()
    await svc.stop()
    await nc.drain()

asyncio.run(main())
"""


def _fake_services(tmp_path: Path, monkeypatch, bodies: dict[str, str]) -> list[str]:
    """Packages `fake_<n>` under tmp_path whose __main__ is the given code; SERVICES points at them.

    Each fake is a NATS role of its own (it may serve the service API), so a
    NATS server that `up` starts gives it an identity like a real service's.
    """
    pkgs = tmp_path / "pkgs"
    specs = []
    for name, body in bodies.items():
        monkeypatch.setitem(permissions.ROLES, name, permissions.Role(name, publish=(), subscribe=("$SRV.>",)))
        module = "fake_" + name.replace("-", "_") + "_" + uuid.uuid4().hex[:6]
        (pkgs / module).mkdir(parents=True)
        (pkgs / module / "__init__.py").write_text("")
        (pkgs / module / "__main__.py").write_text(body.replace("{pid_offset}", "0").format(name=name))
        specs.append(stack.ServiceSpec(name, module))
    monkeypatch.syspath_prepend(str(pkgs))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pkgs), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(stack, "SERVICES", tuple(specs))
    return [s.module for s in specs]


def _servers_from_env(monkeypatch, server_env: dict[str, str]) -> None:
    """`up` uses the test servers; services that are no role of the test server run as admin."""
    for k, v in server_env.items():
        monkeypatch.setenv(k, v)
    admin = auth(server_env["NATS_URL"], permissions.ADMIN)
    if admin.user:
        monkeypatch.setenv("NATS_USER", admin.user)
        monkeypatch.setenv("NATS_PASSWORD", admin.password)


def _in_thread(fn, *args, **kwargs):
    """devstack.stack uses asyncio.run: keep it off the test session's event loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def test_stack_up_waits_for_every_service_ping_then_down_stops_them(tmp_path, monkeypatch, server_env):
    _servers_from_env(monkeypatch, server_env)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "unused")  # no simulator: only the fakes start
    _fake_services(tmp_path, monkeypatch, {"fake-a": FAKE_SERVICE, "fake-b": FAKE_SERVICE})
    state = tmp_path / "state"

    env = _in_thread(stack.up, root=state, timeout=30)
    assert env["FAKE_A_METRICS_URL"].startswith("http://127.0.0.1:")
    recorded = json.loads((state / "stack.json").read_text())["processes"]
    assert [p["name"] for p in recorded] == ["fake-a", "fake-b", "supervisor"]  # servers came from the env
    assert "db " + server_env["DATABASE_URL"] in (state / "logs" / "fake-a.log").read_text()
    assert _in_thread(stack.status, root=state) == 0

    assert _in_thread(stack.down, root=state) == 3
    assert not any(servers.process_alive(p["pid"]) for p in recorded)


def test_stack_up_names_a_crashing_service_and_stops_everything(tmp_path, monkeypatch):
    for var in URL_VARS:
        monkeypatch.delenv(var, raising=False)
    crash = "import sys\nprint('config error: no such embedder', flush=True)\nsys.exit(2)\n"
    modules = _fake_services(tmp_path, monkeypatch, {"fake-ok": FAKE_SERVICE, "fake-crash": crash})
    state = tmp_path / "state"
    before = live_children()

    with pytest.raises(stack.StackError) as err:
        _in_thread(stack.up, root=state, timeout=30)
    assert "fake-crash exited with code 2" in str(err.value)
    assert "config error: no such embedder" in str(err.value)
    assert not (state / "stack.json").exists()
    assert wait_no_new_children(before) == set()
    assert wait_no_process(modules[0]) == []


def test_stack_up_times_out_on_a_silent_service_and_stops_it(tmp_path, monkeypatch, server_env):
    _servers_from_env(monkeypatch, server_env)
    silent = "import time\nprint('loading model...', flush=True)\ntime.sleep(300)\n"
    modules = _fake_services(tmp_path, monkeypatch, {"fake-silent": silent})
    state = tmp_path / "state"

    t = time.monotonic()
    with pytest.raises(stack.StackError, match=r"fake-silent did not answer \$SRV.PING.fake-silent within 1 s"
                                               r"[\s\S]*loading model"):
        _in_thread(stack.up, root=state, timeout=1)
    assert time.monotonic() - t < 15
    assert wait_no_process(modules[0]) == []


def test_stack_up_refuses_an_unreachable_url_and_stops_what_it_started(tmp_path):
    state = tmp_path / "state"
    up = _stack(["up", "--no-services"], state, DATABASE_URL="postgresql://postgres@127.0.0.1:1/tiermem")
    assert up.returncode == 1
    assert "DATABASE_URL=postgresql://postgres@127.0.0.1:1/tiermem is not reachable" in up.stderr
    assert "stopped nats" in up.stdout and "stopped redis" in up.stdout
    assert not (state / "stack.json").exists() and not (state / "stack.env").exists()
    assert wait_no_process(str(state)) == []


def test_stack_up_ignores_another_stacks_instance_of_the_same_service(tmp_path, monkeypatch, server_env):
    _servers_from_env(monkeypatch, server_env)
    impostor_code = FAKE_SERVICE.replace("{pid_offset}", "1").format(name="fake-shared")  # claims another pid
    impostor = subprocess.Popen([sys.executable, "-c", impostor_code], env={**os.environ, "METRICS_PORT": "0"}, cwd=REPO,
                                stdout=subprocess.PIPE, text=True)
    try:
        assert "metrics on" in impostor.stdout.readline()  # registered
        silent = "import time\ntime.sleep(300)\n"
        _fake_services(tmp_path, monkeypatch, {"fake-shared": silent})
        with pytest.raises(stack.StackError, match="fake-shared did not answer"):
            _in_thread(stack.up, root=tmp_path / "state", timeout=1.5)
    finally:
        impostor.terminate()
        impostor.wait(10)
        impostor.stdout.close()
