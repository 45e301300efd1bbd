"""`python -m bench --only scale [--quick]`: the l2-gateway's scale-out curve, written to
`scale.md`, `scale.json` and `scale.png`.

For Redis single and Redis Cluster (three masters, `devstack.redis`), it runs
1, 2, then 4 l2-gateway processes (`python -m services.l2_gateway`, separate
processes on loopback, one NATS queue group) and drives `memory.append` and
`memory.l2.get` at a ladder of offered rates, open loop: each request is sent
at its scheduled time whatever the replies do, and its latency is counted from
that time, so a generator or service that falls behind shows as latency
instead of hiding it (no coordinated omission). A point passes when at most
`ERRORS_ALLOWED` of its requests failed, it carried >= 95 % of the offered
rate, and its p99 met the objective (`P99_GET_MS`, `P99_APPEND_MS`); the
curve is the highest rate that passed. The ladder stops at the first point
that misses by far (saturated), so each configuration costs seconds.

Why the l2-gateway alone: it is the stateless service on both measured paths
(appends: validate, JetStream, apply to Redis; L2 gets: one Redis round trip)
and the one whose Redis use changes with cluster mode. memory-l1 answers from
its own process (it scales with the workers, not in a queue group of its own),
L3 and the broker are not on these paths.

Every process (servers, gateways, the generator) shares the box: CPU seconds
per point are read from /proc for each, so the report can say which one ran
out. Servers are the packaged ones (`devstack.servers`), in a temp folder,
stopped at the end; NATS fsyncs every JetStream write as `devstack up` does.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec

from bench import report as report_mod
from bench.baselines import die_with_parent
from bench.stats import markdown_table, percentile
from devstack import servers
from devstack.stack import NATS_SYNC_INTERVAL
from shared import bus, permissions, subjects
from shared.settings import REPO_ROOT

NAME = "scale"
REPLICAS = (1, 2, 4)
P99_GET_MS = 10.0
P99_APPEND_MS = 20.0
ERRORS_ALLOWED = 0.001  # share of failed requests a passing point may have
USERS = 200
MAX_OUTSTANDING = 4000  # requests in flight at most; a send past it counts as failed (saturated)
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Plan:
    rates: dict[str, tuple[int, ...]]  # op -> offered rates to try, ascending
    seconds: float  # per point

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls({"append": (100, 250, 500, 1000, 2000, 3000), "get": (100, 250, 500, 1000, 2000, 4000)},
                       2.0)
        return cls({"append": (50, 100, 250, 500, 1000, 1500, 2000, 3000, 4000),
                    "get": (50, 100, 250, 500, 1000, 2000, 3000, 4000, 6000, 8000)}, 4.0)


@dataclass
class Point:
    redis: str
    replicas: int
    op: str
    offered: int
    sent: int
    ok: int
    errors: int
    achieved: float  # successful replies per second
    p50_ms: float
    p99_ms: float
    passed: bool
    cpu: dict[str, float] = field(default_factory=dict)  # process group -> CPU share of one core
    box_busy: float = 0.0  # cores busy on the whole box during the point (everyone's, /proc/stat)
    load1: float = 0.0  # the box's 1-minute load average at the end of the point
    first_error: str = ""


def objective_ms(op: str) -> float:
    return P99_GET_MS if op == "get" else P99_APPEND_MS


def judge(op: str, offered: int, sent: int, errors: int, achieved: float, p99_ms: float) -> bool:
    """Did a point meet the objective? (pure)"""
    return (sent > 0 and errors <= ERRORS_ALLOWED * sent and achieved >= 0.95 * offered
            and p99_ms <= objective_ms(op))


def capacity(points: list[Point], redis: str, replicas: int, op: str) -> float:
    """The highest rate carried within the objective (0: none passed). (pure)"""
    return max((p.achieved for p in points
                if (p.redis, p.replicas, p.op) == (redis, replicas, op) and p.passed), default=0.0)


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def _box_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot (/proc/stat's first line)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class Box:
    """Servers and gateways of one Redis mode, in a temp folder."""

    def __init__(self, root: Path, redis: str) -> None:
        self.root, self.redis_mode = root, redis
        self.passwords = {name: secrets.token_urlsafe(16) for name in permissions.ROLES}
        self.nats = servers.start_nats(root / "nats", users=permissions.nats_users(self.passwords),
                                       sync_interval=NATS_SYNC_INTERVAL, die_with_parent=True)
        if redis == "cluster":
            self.cluster = servers.start_redis_cluster(root / "redis", die_with_parent=True)
            self.redis_pids = [n.pid for n in self.cluster.nodes]
            self.redis_url = self.cluster.url
        else:
            self.cluster = None
            self.single = servers.start_redis(root / "redis", die_with_parent=True)
            self.redis_pids = [self.single.pid]
            self.redis_url = self.single.url
        self.gateways: list[asyncio.subprocess.Process] = []

    def env(self) -> dict[str, str]:
        return {**os.environ, "NATS_URL": self.nats.url, "NATS_USER": permissions.L2_GATEWAY,
                "NATS_PASSWORD": self.passwords[permissions.L2_GATEWAY], "REDIS_URL": self.redis_url,
                "REDIS_CLUSTER": "1" if self.cluster else "0", "TIERMEM_STATE_DIR": str(self.root),
                "PII_HASH_KEY": "bench-scale-" + "k" * 16, "METRICS_PORT": "0", "LOG_LEVEL": "warning",
                "PYTHONUNBUFFERED": "1"}

    async def add_gateway(self) -> None:
        log = open(self.root / f"l2-gateway-{len(self.gateways)}.log", "ab")  # noqa: SIM115 - the child owns it
        self.gateways.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.l2_gateway", cwd=REPO_ROOT, env=self.env(),
            stdout=log, stderr=log, preexec_fn=die_with_parent))
        log.close()

    def pids(self) -> dict[str, list[int]]:
        return {"l2-gateway": [p.pid for p in self.gateways], "nats": [self.nats.pid], "redis": self.redis_pids,
                "generator": [os.getpid()]}

    async def stop(self) -> None:
        for proc in self.gateways:
            if proc.returncode is None:
                proc.terminate()
        for proc in self.gateways:
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
        if self.cluster:
            self.cluster.stop()
        else:
            self.single.stop()
        self.nats.stop()


async def _responders(nc, name: str, wait: float = 0.3) -> int:
    """How many instances of service `name` answer the NATS service API ping."""
    inbox = nc.new_inbox()
    seen: set[bytes] = set()

    async def got(msg):
        seen.add(msg.data)

    sub = await nc.subscribe(inbox, cb=got)
    await nc.publish(f"$SRV.PING.{name}", b"", reply=inbox)
    await asyncio.sleep(wait)
    await sub.unsubscribe()
    return len(seen)


async def _until_answering(nc, box: Box, want: int, timeout: float = 60.0) -> None:
    """Every gateway answers the service API ping, and appends are answered."""
    deadline = time.monotonic() + timeout
    while await _responders(nc, "l2-gateway") < want or not await _appends_answered(nc):
        dead = [p.returncode for p in box.gateways if p.returncode is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"{want} l2-gateways did not come up (exited: {dead}); logs in {box.root}")


async def _appends_answered(nc) -> bool:
    body = {"user_id": "warm-up", "bot_id": "bench", "role": "system", "text": "warm-up",
            "msg_id": secrets.token_hex(8)}
    try:
        msg = await nc.request(subjects.MEMORY_APPEND, msgspec.json.encode(body), timeout=2)
    except Exception:  # noqa: BLE001 - not subscribed yet, or still starting
        return False
    return not (msg.headers or {}).get("Nats-Service-Error-Code")


class Load:
    """Open-loop requests at a fixed rate on one connection; latency from the scheduled time."""

    def __init__(self, nc) -> None:
        self.nc = nc
        self.users = [f"scale-{i}" for i in range(USERS)]
        self.newest: dict[str, int] = {}  # user -> newest seq appended
        self.appended = 0

    def _append(self, i: int) -> tuple[str, bytes]:
        user = self.users[i % USERS]
        self.appended += 1
        return user, msgspec.json.encode({"user_id": user, "bot_id": "bench", "role": "user",
                                          "text": f"scale message {self.appended} of {user}",
                                          "msg_id": f"m-{self.appended}"})

    def _get(self, i: int) -> tuple[str, bytes]:
        user = self.users[i % USERS]
        return user, msgspec.json.encode({"user_id": user, "op": "recent", "n": 10,
                                          "min_seq": self.newest.get(user, 0) or None})

    async def run(self, op: str, rate: int, seconds: float) -> tuple[int, int, float, list[float], str]:
        """(sent, errors, elapsed, latencies of the successes, first error)."""
        subject = subjects.MEMORY_APPEND if op == "append" else subjects.MEMORY_L2_GET
        body = self._append if op == "append" else self._get
        total = int(rate * seconds)
        lat: list[float] = []
        errors, first_error = 0, ""
        pending: set[asyncio.Task] = set()
        clock = time.perf_counter
        loop = asyncio.get_running_loop()

        async def one(at: float, user: str, data: bytes) -> None:
            nonlocal errors, first_error
            try:
                msg = await self.nc.request(subject, data, timeout=5)
                if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
                    raise RuntimeError(msg.data[:200].decode(errors="replace"))
                if op == "append":
                    seq = msgspec.json.decode(msg.data)["seq"]
                    self.newest[user] = max(self.newest.get(user, 0), seq)
                elif b'"tier":"l2"' not in msg.data:
                    raise RuntimeError("passed down to L3")
                lat.append(clock() - at)
            except Exception as exc:  # noqa: BLE001 - counted; the point fails past ERRORS_ALLOWED
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"[:200]

        start = clock()
        for i in range(total):
            at = start + i / rate
            delay = at - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(pending) >= MAX_OUTSTANDING:
                errors += 1
                first_error = first_error or "generator: too many requests outstanding"
                continue
            task = loop.create_task(one(at, *body(i)))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=10)
        return total, errors, clock() - start, lat, first_error


async def _point(load: Load, box: Box, op: str, rate: int, seconds: float) -> Point:
    pids = box.pids()
    before = {k: sum(_cpu_ticks(p) for p in v) for k, v in pids.items()}
    busy0, total0 = _box_ticks()
    t0 = time.perf_counter()
    sent, errors, elapsed, lat, first_error = await load.run(op, rate, seconds)
    wall = time.perf_counter() - t0
    busy1, total1 = _box_ticks()
    box_busy = (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)
    cpu = {k: round((sum(_cpu_ticks(p) for p in pids[k]) - before[k]) / CLK_TCK / wall, 2) for k in pids}
    ok = len(lat)
    achieved = ok / elapsed if elapsed > 0 else 0.0
    p50 = percentile(lat, 50) * 1000 if lat else float("inf")
    p99 = percentile(lat, 99) * 1000 if lat else float("inf")
    return Point(box.redis_mode, len(box.gateways), op, rate, sent, ok, errors, round(achieved, 1),
                 round(p50, 2), round(p99, 2), judge(op, rate, sent, errors, achieved, p99), cpu,
                 round(box_busy, 2), round(os.getloadavg()[0], 1), first_error)


async def run(quick: bool, say) -> dict:
    plan = Plan.make(quick)
    points: list[Point] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    for mode in ("single", "cluster"):
        root = Path(tempfile.mkdtemp(prefix=f"tiermem-scale-{mode}-"))
        box = Box(root, mode)
        failed = True
        try:
            nc = await bus.connect(box.nats.url, bus.BusAuth(user=permissions.ADMIN,
                                                             password=box.passwords[permissions.ADMIN]))
            load = Load(nc)
            for replicas in REPLICAS:
                while len(box.gateways) < replicas:
                    await box.add_gateway()
                await _until_answering(nc, box, replicas)
                for op in ("append", "get"):
                    if op == "get" and not load.newest:
                        continue
                    for rate in plan.rates[op]:
                        p = await _point(load, box, op, rate, plan.seconds)
                        points.append(p)
                        say(f"redis {mode:<7} x{replicas} {op:<6} offered {rate:>5}/s: {p.achieved:>7.0f}/s "
                            f"p99 {p.p99_ms:7.2f} ms errors {p.errors} {'PASS' if p.passed else 'miss'} "
                            f"cpu {p.cpu} box {p.box_busy} load {p.load1} {p.first_error}")
                        if not p.passed and (p.achieved < 0.8 * rate or p.p99_ms > 5 * objective_ms(op)):
                            break  # saturated: higher rates only take longer to fail
            await nc.close()
            failed = False
        finally:
            await box.stop()
            if failed:
                say(f"failed: the servers' and gateways' logs are kept in {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)
    return {"started": started, "quick": quick, "seconds_per_point": plan.seconds, "users": USERS,
            "p99_get_ms": P99_GET_MS, "p99_append_ms": P99_APPEND_MS, "cores": os.cpu_count(),
            "load_average_after": os.getloadavg(), "points": [asdict(p) for p in points]}


def markdown(data: dict) -> str:
    points = [Point(**p) for p in data["points"]]
    rows = []
    for mode in ("single", "cluster"):
        for replicas in REPLICAS:
            row = [f"redis {mode}", replicas]
            for op in ("get", "append"):
                best = capacity(points, mode, replicas, op)
                at = [p for p in points if (p.redis, p.replicas, p.op) == (mode, replicas, op)]
                top = max(at, key=lambda p: p.achieved, default=None)
                row.append(f"{best:,.0f}" if best else "none")
                row.append(f"{top.achieved:,.0f} (p99 {top.p99_ms:.1f} ms)" if top else "-")
            row.append(_busiest(points, mode, replicas))
            row += [_cpu_per_request(points, mode, replicas, op) for op in ("get", "append")]
            rows.append(row)
    detail = [[f"redis {p.redis}", p.replicas, p.op, p.offered, f"{p.achieved:,.0f}", p.p50_ms, p.p99_ms,
               p.errors, "pass" if p.passed else "miss",
               ", ".join(f"{k} {v:.2f}" for k, v in p.cpu.items()), p.box_busy, p.load1] for p in points]
    return "\n".join([
        "# Scale-out: l2-gateway replicas, Redis single and cluster",
        "",
        f"Run {data['started']}{' (quick)' if data['quick'] else ''}: `python -m bench --only scale"
        f"{' --quick' if data['quick'] else ''}` (bench/scale.py says how). {data['cores']} cores, "
        "**shared with other sessions' work during the run**: absolute rates are low and noisy; compare "
        "rows of this run with each other, not with other runs.",
        "",
        f"Objective: p99 <= {data['p99_get_ms']:g} ms for `memory.l2.get` (recent 10 with `min_seq`, "
        f"answered by L2), p99 <= {data['p99_append_ms']:g} ms for `memory.append` (durable: "
        f"JetStream fsync, then applied to Redis), at most {ERRORS_ALLOWED:.1%} failed, >= 95 % of the "
        f"offered rate carried. Open loop, {data['seconds_per_point']:g} s a point, {data['users']} users; "
        "latency counted from each request's scheduled send time.",
        "",
        "## Capacity at the objective",
        "",
        markdown_table(["Redis", "gateways", "gets/s at p99 objective", "gets/s highest (its p99)",
                        "appends/s at p99 objective", "appends/s highest (its p99)",
                        "CPU at the highest get point (cores)", "CPU per get (ms)", "CPU per append (ms)"],
                       rows),
        "",
        "![scale](scale.png)",
        "",
        "## What limits it",
        "",
        *limits(points, data["cores"]),
        "",
        "## Every point",
        "",
        "CPU of ours: cores used during the point (CPU seconds / wall seconds) by each group of this "
        "bench's processes (`generator` is its own client); box busy: cores busy on the whole box, "
        "everyone's (/proc/stat); load avg: the 1-minute load average after the point.",
        "",
        markdown_table(["Redis", "gateways", "op", "offered/s", "carried/s", "p50 ms", "p99 ms", "errors",
                        "", "CPU of ours (cores)", "box busy (cores)", "load avg"], detail),
        "",
    ])


def cpu_per_request_ms(p: Point) -> float:
    """CPU milliseconds the servers and gateways spent per carried request at one point, the
    generator's excluded (pure). Includes their background work (log polling, pings), so at
    low rates it overstates the per-request cost."""
    ours = sum(v for k, v in p.cpu.items() if k != "generator")
    return ours / p.achieved * 1000 if p.achieved else float("inf")


def _cpu_per_request(points: list[Point], mode: str, replicas: int, op: str) -> str:
    at = [p for p in points if (p.redis, p.replicas, p.op) == (mode, replicas, op) and p.achieved]
    if not at:
        return "-"
    return f"{cpu_per_request_ms(max(at, key=lambda p: p.achieved)):.2f}"


def limits(points: list[Point], cores: int) -> list[str]:
    """The run's own evidence of what bound it: the box's load against our processes' CPU,
    and what the CPU cost per request would allow on cores of our own (pure)."""
    if not points:
        return ["No points."]
    busy = sorted(p.box_busy for p in points)
    load = sorted(p.load1 for p in points)
    ours = sorted(sum(v for k, v in p.cpu.items()) for p in points)
    lines = [
        f"- The box: {busy[len(busy) // 2]:.2f} of {cores} cores busy at the median point "
        f"({busy[0]:.2f}-{busy[-1]:.2f}), 1-minute load average {load[0]:g}-{load[-1]:g}. This bench's "
        f"processes (servers, gateways, generator; run at `nice 19` as the shared box requires) used "
        f"{ours[len(ours) // 2]:.2f} cores at the median point ({ours[0]:.2f}-{ours[-1]:.2f}): "
        "the rest was other work on the box.",
    ]
    starved = busy[len(busy) // 2] >= 0.9 * cores and ours[len(ours) // 2] <= 0.5 * cores
    lines.append(
        "- So a point's p99 was mostly time spent waiting for a core, not working: the box's cores "
        "were busy with other work while ours used a fraction of them. Adding replicas adds processes "
        "competing for the same cores; it cannot add capacity here, and the curve is flat or noisy "
        "for that reason, not for the design's." if starved else
        "- The box had cores to spare at the median point: where the curve flattens, compare the "
        "gateways' CPU with their count (a gateway near 1 core is the limit) and the servers' CPU.")
    for op in ("get", "append"):
        best = [p for p in points if p.op == op and p.achieved >= 200]
        if best:
            cost = min(cpu_per_request_ms(p) for p in best)
            lines.append(f"- CPU per {op} (servers + gateways, at points carrying >= 200/s): "
                         f"{cost:.2f} ms at best, so {cores} dedicated cores would carry at most "
                         f"~{cores / cost * 1000:,.0f} {op}s/s (an upper bound from CPU alone; the "
                         "generator needs cores too).")
    return lines


def _busiest(points: list[Point], mode: str, replicas: int) -> str:
    at = [p for p in points if (p.redis, p.replicas, p.op) == (mode, replicas, "get")]
    if not at:
        return "-"
    top = max(at, key=lambda p: p.achieved)
    total = sum(top.cpu.values())
    return f"{total:.2f} of {os.cpu_count()}: " + ", ".join(f"{k} {v:.2f}" for k, v in top.cpu.items())


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [Point(**p) for p in data["points"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, op in zip(axes, ("get", "append")):
        for mode, style in (("single", "o-"), ("cluster", "s--")):
            ax.plot(REPLICAS, [capacity(points, mode, r, op) for r in REPLICAS], style, label=f"Redis {mode}")
        ax.set_xticks(REPLICAS)
        ax.set_xlabel("l2-gateway replicas")
        ax.set_ylabel(f"{op}s/s at p99 <= {objective_ms(op):g} ms")
        ax.set_title(f"memory.{'l2.get' if op == 'get' else 'append'}")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Scale-out on {data['cores']} shared cores ({data['started']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(data: dict, out: Path) -> list[Path]:
    return report_mod.write_files(out, NAME, markdown=markdown(data), data=data, plot=lambda png: plot(data, png))
