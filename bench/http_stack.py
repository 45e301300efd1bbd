"""Per-request cost of the project's HTTP servers: the metrics port and the LLM simulator.

    python -m bench.http_stack [--tree LABEL=PATH ...] [--requests N] [--block B]

Why: the metrics/probe server (`shared.health`) and the simulator moved from
hand-written h11 servers to aiohttp.web; this says what that costs per
request. Each `--tree` is a source tree (default: this one) whose servers run
as their own processes on loopback: a metrics port serving the registry a
service has after `import shared.service`, and `python -m services.llm_simulator`
with no model latency. One httpx client per server (keep-alive, one request in
flight) asks in blocks of `--block`, the trees taking turns, so load from
other processes on the box falls on every tree alike. Prints a markdown table
of p50/p95/p99 in microseconds, and the server's own CPU time per request
(user + system, from /proc, the render thread of `/metrics` included): on a
loaded box the latencies carry everyone's queueing, the CPU time only ours.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.stats import fmt_us, markdown_table, summarize

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"

# A metrics port as a service opens it (shared.service.run_service): the same class, the same registry.
_METRICS_SERVER = """
import asyncio, sys
import uvloop
import shared.service  # noqa: F401 - registers the service metrics, as in a running service
from shared.health import Health, HealthServer

async def main():
    health = Health()
    health.phase = "up"
    server = HealthServer(health)
    port = await server.start("127.0.0.1", 0)
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.close()

uvloop.run(main())  # as shared.service.main runs a service
"""

MESSAGE = {"model": "claude-haiku-4-5", "max_tokens": 64,
           "messages": [{"role": "user", "content": "What is the capital of France?"}]}
API_HEADERS = {"x-api-key": "bench", "anthropic-version": "2023-06-01"}


def _start_metrics(tree: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", _METRICS_SERVER], cwd=tree, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(tree)})
    port = int(proc.stdout.readline())
    return proc, f"http://{HOST}:{port}"


def _start_simulator(tree: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.llm_simulator", "--port", str(port),
                                 "--latency-median", "0", "--log-level", "warning"], cwd=tree,
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(tree)})
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"simulator of {tree} did not start; log {log}")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# (name, server kind, method, path, body)
CASES = (
    ("metrics GET /metrics", "metrics", "GET", "/metrics", None),
    ("metrics GET /livez", "metrics", "GET", "/livez", None),
    ("simulator POST /v1/messages", "simulator", "POST", "/v1/messages", MESSAGE),
    ("simulator GET /health", "simulator", "GET", "/health", None),
)


def run(trees: dict[str, Path], requests: int, block: int, warmup: int = 200) -> list[list[str]]:
    procs: list[subprocess.Popen] = []
    urls: dict[tuple[str, str], str] = {}
    pids: dict[tuple[str, str], int] = {}
    try:
        for label, tree in trees.items():
            proc, urls[(label, "metrics")] = _start_metrics(tree)
            procs.append(proc)
            pids[(label, "metrics")] = proc.pid
            proc, urls[(label, "simulator")] = _start_simulator(tree, Path(f"/tmp/http-stack-sim-{label}.log"))
            procs.append(proc)
            pids[(label, "simulator")] = proc.pid
        clients = {key: httpx.Client(base_url=url, timeout=10) for key, url in urls.items()}
        rows = []
        for name, kind, method, path, body in CASES:
            samples: dict[str, list[float]] = {label: [] for label in trees}
            cpu: dict[str, float] = {label: 0.0 for label in trees}

            def once(label: str) -> float:
                client = clients[(label, kind)]
                t = time.perf_counter()
                r = client.request(method, path, json=body, headers=API_HEADERS if body else None)
                took = time.perf_counter() - t
                if r.status_code != 200:
                    raise RuntimeError(f"{label} {method} {path}: {r.status_code} {r.text[:200]}")
                return took

            for label in trees:
                for _ in range(warmup):
                    once(label)
            while len(samples[next(iter(trees))]) < requests:
                for label in trees:
                    before = _cpu_s(pids[(label, kind)])
                    samples[label].extend(once(label) for _ in range(block))
                    cpu[label] += _cpu_s(pids[(label, kind)]) - before
            for label in trees:
                s = summarize(samples[label])
                rows.append([name, label, s.n, fmt_us(s.p50), fmt_us(s.p95), fmt_us(s.p99),
                             fmt_us(cpu[label] / s.n * 1e6)])
        for client in clients.values():
            client.close()
        return rows
    finally:
        for proc in procs:
            if proc.stdin:
                proc.stdin.close()
            proc.terminate()
            proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.http_stack", description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH",
                   help="a source tree to measure (repeat to compare; default: this one)")
    p.add_argument("--requests", type=int, default=3000, help="requests per case and tree")
    p.add_argument("--block", type=int, default=100, help="requests in a row before the next tree's turn")
    args = p.parse_args(argv)
    trees = dict(t.split("=", 1) for t in args.tree) or {"this tree": str(REPO)}
    rows = run({k: Path(v).resolve() for k, v in trees.items()}, args.requests, args.block)
    print(markdown_table(["request", "server", "n", "p50", "p95", "p99", "server CPU / request"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
