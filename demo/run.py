"""`just demo`: a fresh stack, the lead fleet, the results table, an HTML report.

1. Start a stack of its own (servers under `DEMO_DIR/stack`, wiped first; or
   the servers named by `NATS_URL` / `REDIS_URL` / `DATABASE_URL`), every
   service with `TRACE_FILE` set, so sampled lookups leave their spans.
2. Append every lead's imported history, then start the agent workers
   (`python -m services.agent_worker`, `DEMO_WORKERS`, 3 by default) on one
   shared simulated clock, each with a memory-l1 sidecar of its own that it
   reads through (`L1_ID`), as in a pod; a lead's events all go to worker
   `index % workers` (sticky routing).
3. Progress on stderr until the workers finish their plan.
4. Ask the freshness-auditor for `audit.stats`, wait until the llm-broker
   is idle (L3 makes rolling summaries in the background) and read what it
   counted per task (`broker_tasks.py`), stop everything, print the table
   (computed from the workers' call logs and, for the summaries' calls, the
   broker's per-task counters; see demo/results.py) and write `report.html`
   and `results.json` to `DEMO_DIR/run`.

Simulated time runs `speed` times faster than the wall clock. Everything
in the stack that keeps time by the wall clock is scaled by the same factor,
so compression cannot inflate the savings: the llm-broker's TTLs (a scaled
copy of its config, via `LLM_CONFIG`) and the simulator's model latency
(`SIMULATOR_LATENCY_*`). What is counted (L1/L2 windows, invalidation on a
new message) does not depend on time.

Everything started is stopped at the end, on failure and on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from demo import broker_tasks, report, results
from demo.settings import REPO, DemoSettings
from services.agent_worker import scenario
from devstack import servers, stack

BROKER_CONFIG = REPO / "shared" / "llm_config.toml"
SIM_LATENCY_MEDIAN_S, SIM_LATENCY_P95_S = 0.8, 1.5  # the simulator's defaults: what a model call takes
TRACE_SHARE = "trace"


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why (and names the log to read)."""


def main(argv: list[str] | None = None) -> int:
    cfg = DemoSettings.load(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return Demo(cfg).run()
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted: everything it started is stopped", file=sys.stderr, flush=True)
        return 130


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


class Demo:
    def __init__(self, cfg: DemoSettings) -> None:
        self.cfg = cfg
        self.stack_dir = cfg.dir / "stack"
        self.run_dir = cfg.dir / "run"
        self.mix = scenario.Mix.parse(cfg.mix)
        self.workers: list[tuple[subprocess.Popen, Path]] = []
        self.sidecars: list[subprocess.Popen] = []
        self.run_id = f"r{int(time.time()) % 1_000_000:06d}"

    # --- the whole run -------------------------------------------------------

    def run(self) -> int:
        cfg = self.cfg
        if os.environ.get("ANTHROPIC_API_KEY") and not os.environ.get("ANTHROPIC_BASE_URL") and not cfg.real_llm:
            raise DemoError("ANTHROPIC_API_KEY is set: the llm-broker would call Claude for thousands of "
                            "requests and spend real money. Unset it to use the simulator, or set DEMO_REAL_LLM=1.")
        t_start = time.monotonic()
        self._fresh_dirs()
        self._scaled_environment()
        try:
            env = self._stack_up()
            before = _request(env, "llm.stats")
            tasks = [broker_tasks.scrape(env.get(stack.metrics_env_name("llm-broker"), ""))]
            self._seed(env)
            tasks.append(_settled(env)[0])  # the imported history's summaries made
            self._start_sidecars(env)
            self._start_workers(env)
            self._wait_for_workers()
            audit = _request(env, "audit.stats")
            end, after = _settled(env)
            tasks.append(end)
            made = broker_tasks.l3_summaries(env.get(stack.metrics_env_name("l3-semantic-indexer"), ""))
        finally:
            self._stop_workers()
            with stack.signals_ignored():
                print("stopping the stack", flush=True)
                stack.down(root=self.stack_dir)
        return self._results(audit, before, after, _task_windows(tasks, made), time.monotonic() - t_start)

    def _fresh_dirs(self) -> None:
        """A fresh state each run: nothing cached by an earlier run can inflate this one."""
        if (self.stack_dir / "stack.json").exists():
            stack.down(root=self.stack_dir)  # the leftovers of an interrupted run
        shutil.rmtree(self.stack_dir, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)

    def _scaled_environment(self) -> None:
        """What every process the stack starts inherits: spans, scaled TTLs and model latency, L1 size."""
        speed = self.cfg.speed
        os.environ.update({
            "TRACE_FILE": str(self.run_dir / "spans.jsonl"),
            "TRACE_DB_SPANS": "1",  # the waterfall shows each tier's Redis command and Postgres query
            "LLM_CONFIG": str(write_scaled_config(BROKER_CONFIG, self.run_dir / "llm-config.toml", speed)),
            "SIMULATOR_LATENCY_MEDIAN_S": f"{SIM_LATENCY_MEDIAN_S / speed:.9f}",
            "SIMULATOR_LATENCY_P95_S": f"{SIM_LATENCY_P95_S / speed:.9f}",
            "TIERMEM_STATE_DIR": str(self.stack_dir),
        })
        # Rolling summaries stay on (L3's default SUMMARY_BLOCK): the bots write their texts from
        # memory.get op=context, and the summaries' LLM calls are counted from the broker's
        # per-task metrics (broker_tasks.py) into the fleet's cost.

    def _stack_up(self) -> dict[str, str]:
        names = [s.name for s in stack.SERVICES if importlib.util.find_spec(f"{s.module}.__main__")]
        missing = [s.name for s in stack.SERVICES if s.name not in names]
        if missing:
            print(f"note: {', '.join(missing)} not written yet; starting without it", flush=True)
        try:
            return stack.up(services=names, timeout=self.cfg.up_timeout, root=self.stack_dir)
        except (stack.StackError, servers.ServerStartError) as exc:
            raise DemoError(f"the stack did not come up:\n{exc}") from None
        except OSError as exc:
            raise DemoError(f"the stack did not come up: {exc}") from None

    def _seed(self, env: dict[str, str]) -> None:
        """The leads' imported history, appended before the clock starts (one writer for all workers)."""
        from services.agent_worker.worker import seed_fleet

        plans = self._plans()
        t0 = time.monotonic()
        count, errors = asyncio.run(seed_fleet(env, plans))
        print(f"imported the history of {len(plans)} leads: {count:,} messages in "
              f"{time.monotonic() - t0:.1f} s", flush=True)
        if errors:
            raise DemoError(f"{errors} of {count} history appends failed; see {self.stack_dir / 'logs'}")

    def _plans(self) -> list[scenario.LeadPlan]:
        c = self.cfg
        return scenario.plan_fleet(c.leads, run=self.run_id, bots=c.bots, days=c.days, mix=self.mix, seed=c.seed)

    def _start_sidecars(self, env: dict[str, str]) -> None:
        """A memory-l1 sidecar per worker, as in a pod: the worker reads through its own (`L1_ID`)."""
        for i in range(self.cfg.workers):
            l1_env = {**stack.service_env("memory-l1", self.stack_dir, env, 0), "L1_ID": sidecar_id(i)}
            self.sidecars.append(servers.spawn(f"memory-l1-{i}", [sys.executable, "-m", "services.memory_l1"],
                                               log_path=self.run_dir / f"memory-l1-{i}.log", env=l1_env,
                                               cwd=REPO))
        if not asyncio.run(_answering(env, [sidecar_id(i) for i in range(self.cfg.workers)], self.cfg.up_timeout)):
            raise DemoError(f"the workers' memory-l1 sidecars did not come up; see {self.run_dir}/memory-l1-*.log")

    def _start_workers(self, env: dict[str, str]) -> None:
        c = self.cfg
        t0 = time.time() + 1.5  # workers import and connect meanwhile
        self.events = sum(len(p.events) for p in self._plans())
        self.t0 = t0
        for i in range(c.workers):
            calls = self.run_dir / f"calls-{i}.jsonl"
            worker_env = {**os.environ, **env, "WORKER_ID": f"worker-{i}", "L1_ID": sidecar_id(i),
                          "WORKER_LOG": str(calls),
                          "WORKER_SHARD": str(i), "WORKER_SHARDS": str(c.workers),
                          "DEMO_LEADS": str(c.leads), "DEMO_BOTS": str(c.bots), "DEMO_DAYS": str(c.days),
                          "DEMO_SPEED": repr(c.speed), "DEMO_MIX": c.mix, "DEMO_SEED": str(c.seed),
                          "DEMO_RUN": self.run_id, "DEMO_T0": repr(t0), "DEMO_SEED_HISTORY": "0",
                          "PYTHONUNBUFFERED": "1"}
            proc = servers.spawn(f"agent-worker-{i}", [sys.executable, "-m", "services.agent_worker"],
                                 log_path=self.run_dir / f"worker-{i}.log", env=worker_env, cwd=REPO)
            self.workers.append((proc, calls))
        wall = scenario.duration_s(c.days) / c.speed
        print(f"{c.workers} agent worker(s): {c.leads} leads, {c.bots} bots, {self.events:,} planned "
              f"interactions over {c.days} simulated day(s) in ~{wall:.0f} s (speed {c.speed:g}x)", flush=True)

    def _wait_for_workers(self) -> None:
        bar = Progress(self.events, self.t0, self.cfg.speed, scenario.duration_s(self.cfg.days))
        while True:
            codes = [proc.poll() for proc, _ in self.workers]
            bar.update([calls for _, calls in self.workers])
            failed = [(i, rc) for i, rc in enumerate(codes) if rc not in (None, 0)]
            if failed:
                i, rc = failed[0]
                log = self.run_dir / f"worker-{i}.log"
                raise DemoError(f"agent worker {i} exited with code {rc}; last lines of {log}:\n"
                                f"{servers.log_tail(log)}")
            if all(rc == 0 for rc in codes):
                bar.done()
                return
            time.sleep(0.25)

    def _stop_workers(self) -> None:
        for proc in self.sidecars:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in self.workers:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proc in self.sidecars:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # --- after the run -------------------------------------------------------

    def _results(self, audit: dict | None, before: dict | None, after: dict | None, tasks: dict | None,
                 wall_s: float) -> int:
        c = self.cfg
        prices = tomllib.loads((self.run_dir / "llm-config.toml").read_text())["prices"]
        records = results.read_logs([calls for _, calls in self.workers])
        summaries = None if tasks is None else tasks["run"].get("summary", broker_tasks.NONE)
        summary = results.summarize(records, prices=prices, days=c.days, leads=c.leads, summaries=summaries)
        summary["broker"] = _broker_delta(before, after)
        summary["broker_tasks"] = tasks
        if tasks is not None and summary["cost"] is not None:
            once = tasks["import"].get("summary", broker_tasks.NONE)
            summary["cost"]["summaries"]["import"] = {
                "requests": once["requests"],
                "cost_usd": sum(results.cost_usd(r, prices) for r in results.summary_records(once))}
        summary["audit"] = audit
        summary["settings"] = {"leads": c.leads, "bots": c.bots, "days": c.days, "speed": c.speed,
                               "workers": c.workers, "mix": dict(self.mix),
                               "seed": c.seed, "wall_s": round(wall_s, 1)}
        header = (f"tiermem demo: {c.leads} leads, {c.bots} bots, {c.days} simulated day(s) "
                  f"({summary['interactions']:,} interactions, {summary['calls']:,} calls, "
                  f"{summary['errors']} errors) in {wall_s / 60:.1f} min at {c.speed:g}x")
        table = results.format_table(summary, header=header, audit=audit)
        summary["table"] = table
        (self.run_dir / "results.json").write_text(json.dumps(summary, indent=2))
        html = report.write(self.run_dir / "report.html", records, summary,
                            spans_path=self.run_dir / "spans.jsonl", prices=prices)
        print("\n" + table + "\n")
        print(f"report  {html}\nresults {self.run_dir / 'results.json'}\ncall logs {self.run_dir}/calls-*.jsonl",
              flush=True)
        return 0


def write_scaled_config(source: Path, target: Path, speed: float) -> Path:
    """The broker's config, every key kept, with each volatility class's `ttl_s` divided by `speed`."""
    raw = tomllib.loads(source.read_text())
    for v in raw.get("volatility", {}).values():
        v["ttl_s"] = v["ttl_s"] / speed
    lines = [f"# {source} with TTLs scaled to simulated time (ttl_s / {speed:g})"]
    tables = {k: v for k, v in raw.items() if isinstance(v, dict)}
    lines += [f"{k} = {_toml(v)}" for k, v in raw.items() if k not in tables]
    for name, table in tables.items():
        for key, row in table.items():
            lines.append(f'\n[{name}."{key}"]' if isinstance(row, dict) else f"\n[{name}]")
            items = row.items() if isinstance(row, dict) else [(key, row)]
            lines += [f"{k} = {_toml(v)}" for k, v in items]
    target.write_text("\n".join(lines) + "\n")
    return target


def _toml(value) -> str:
    """TOML for the scalars and lists the broker's config holds (JSON spells them the same way)."""
    return json.dumps(value)


def _settled(env: dict[str, str], quiet_s: float = 1.0, timeout: float = 60.0) -> tuple[dict | None, dict | None]:
    """The broker's per-task counts once it has had no request for `quiet_s` (the summaries
    are made in the background, after the calls that caused them), and `llm.stats` read
    after that (the broker flushes it every 0.5 s), so the two agree on what they cover."""
    url = env.get(stack.metrics_env_name("llm-broker"), "")
    last = broker_tasks.scrape(url)
    deadline = time.monotonic() + timeout
    while last is not None and time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = broker_tasks.scrape(url)
        if now == last:
            break
        last = now
    return last, _request(env, "llm.stats")


def _task_windows(snapshots: list[dict | None], made: dict | None) -> dict | None:
    """The broker's per-task counts of the whole run (`total`), of the imported history
    (`import`: from the stack's start until the summaries of the seeded history were made)
    and of the fleet's run (`run`), with the l3-semantic-indexer's summaries made."""
    if any(s is None for s in snapshots):
        return None
    start, seeded, end = snapshots
    return {"total": broker_tasks.delta(end, start), "import": broker_tasks.delta(seeded, start),
            "run": broker_tasks.delta(end, seeded), "l3_summaries": made}


def _broker_delta(before: dict | None, after: dict | None) -> dict | None:
    if not after:
        return None
    before = before or {}
    return {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float)) and k != "hit_rate"}


def _request(env: dict[str, str], subject: str, timeout: float = 5.0) -> dict | None:
    """One request as the agent worker of `env`, or None when nobody answers (a service not running)."""
    from nats.errors import NoRespondersError, TimeoutError as NatsTimeout

    from shared.bus import connect_as
    from shared.permissions import WORKER

    async def ask() -> dict | None:
        nc = await connect_as(env, WORKER, connect_timeout=5, allow_reconnect=False)
        try:
            msg = await nc.request(subject, b"{}", timeout=timeout)
        except (NoRespondersError, NatsTimeout):
            return None
        finally:
            await nc.close()
        if (msg.headers or {}).get("Nats-Service-Error-Code"):
            return None
        return json.loads(msg.data)

    return asyncio.run(ask())


def sidecar_id(worker: int) -> str:
    return f"demo-w{worker}"


async def _answering(env: dict[str, str], l1_ids: list[str], timeout: float) -> bool:
    """True once every sidecar answers on its own subject (as admin: any user id will do)."""
    from shared.bus import connect_as
    from shared.permissions import ADMIN

    nc = await connect_as(env, ADMIN, connect_timeout=5, allow_reconnect=False)
    deadline = time.monotonic() + timeout
    try:
        for l1_id in l1_ids:
            while True:
                try:
                    await nc.request(f"memory.get.{l1_id}", b'{"user_id": "demo-warmup", "n": 1}', timeout=1)
                    break
                except Exception:  # noqa: BLE001 - not subscribed yet
                    if time.monotonic() > deadline:
                        return False
                    await asyncio.sleep(0.2)
    finally:
        await nc.close()
    return True


class Progress:
    """A progress bar on stderr from the workers' call logs (lines on a non-terminal)."""

    def __init__(self, total: int, t0: float, speed: float, duration: float) -> None:
        self.total, self.t0, self.speed, self.duration = max(total, 1), t0, speed, duration
        self.offsets: dict[Path, int] = {}
        self.done_count = 0
        self.tty = sys.stderr.isatty()
        self.last_line = -1

    def update(self, paths: list[Path]) -> None:
        for path in paths:
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets.get(path, 0))
                    chunk = f.read()
            except FileNotFoundError:
                continue
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self.offsets[path] = self.offsets.get(path, 0) + len(complete)
            self.done_count += complete.count(b'"kind":"interaction"')
        sim = max(0.0, (time.time() - self.t0) * self.speed)
        day, rest = divmod(min(sim, self.duration) + scenario.START_HOUR * 3600, scenario.DAY_S)
        frac = min(1.0, self.done_count / self.total)
        text = (f"[{'#' * int(frac * 30):<30}] {frac * 100:5.1f} %  day {int(day) + 1} "
                f"{int(rest // 3600):02d}:{int(rest % 3600 // 60):02d}  "
                f"{self.done_count:,}/{self.total:,} interactions")
        if self.tty:
            print("\r" + text, end="", file=sys.stderr, flush=True)
        elif int(frac * 10) != self.last_line:
            self.last_line = int(frac * 10)
            print(text, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)
