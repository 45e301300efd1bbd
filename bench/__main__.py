"""`python -m bench [--quick] [--only memory|llm|gateway|security|guard|scale|all] [--out bench/results]`: run the benchmarks, write the reports.

`memory` is the memory tiers (bench/memory.py, `memory.md`), `llm` the
llm-broker (bench/llm.py, `llm.md`), `gateway` a hit through the llm-gateway's
HTTP API (bench/gateway.py, `gateway.md`), `security` the cost of auth and TLS on
the bus (bench/security.py, `security.md`: its own three nats-servers, no
stack); `all` runs memory, llm then gateway on one stack, then security once that
stack is down, then `guard`: the semantic cache's guard measured on the
report halves of public paraphrase/STS sets (bench/guard_calibration.py,
`guard.md`; measure only, the shipped model is left alone; no stack).
`scale` (not part of `all`: it starts its own servers and gateways, twice) is the
l2-gateway's scale-out curve with 1, 2 and 4 replicas on Redis single and
cluster (bench/scale.py, `scale.md`).
`summary.md` (+ `summary.png`) puts every measurement in one
table with its baseline and ratio (an area not run keeps its last figures).
Every NATS connection presents an identity: the bench's own client and its
echo processes the stack's admin (`NATS_ADMIN_*` in its stack.env; the bench
calls internal subjects), its extra memory-l1 sidecars the memory-l1 role.
Starts its own stack (servers and services as separate processes, in a
temp state folder, the LLM simulator with a 5 ms median latency unless
`SIMULATOR_LATENCY_*` say otherwise) unless `--stack-env` points at a running
one, and stops what it started on success, failure, Ctrl-C or SIGTERM. Exit
code: 0 when every target passed, 1 when a target failed or a measurement was
skipped, 2 when the run itself failed, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import uvloop

from bench import gateway as gateway_mod
from bench import llm as llm_mod
from bench import report as report_mod
from bench import security as security_mod
from bench import summary as summary_mod
from bench.memory import Bench, Options, Stack

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="10k messages over 100 users, 1,000 dev pairs and fewer samples (a few minutes)")
    p.add_argument("--only", choices=("memory", "llm", "gateway", "security", "guard", "scale", "all"), default="all",
                   help="which benchmark to run (default all: memory, llm, then gateway, on one stack; then "
                        "security, then guard)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument("--stack-env", type=Path,
                   help="use the running stack described by this stack.env instead of starting one")
    p.add_argument("--keep", action="store_true", help="leave the stack it started running")
    p.add_argument("--messages", type=int, help="messages to load (default 100,000; quick 10,000)")
    p.add_argument("--users", type=int, help="users to spread them over (default 1,000; quick 100)")
    p.add_argument("--in-flight", type=int, help="appends in flight during the load (default 128)")
    p.add_argument("--samples", type=int, help="samples per fast latency measurement (default 5,000)")
    args = p.parse_args(argv)
    opts = Options.make(args.quick, stack_env=args.stack_env, keep=args.keep or None, messages=args.messages,
                        users=args.users, in_flight=args.in_flight, samples=args.samples)
    if opts.stack_env and not opts.stack_env.is_file():
        p.error(f"--stack-env {opts.stack_env}: no such file (is the stack up?)")

    if args.only == "guard":
        return _guard()
    t0 = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {line}", flush=True)

    if args.only == "scale":
        return _scale(args.quick, args.out, say)

    # The simulator stands in for Claude; its default latency (0.8 s median) would only make
    # the bench's misses slow. Only read when the bench starts the stack.
    os.environ.setdefault("SIMULATOR_LATENCY_MEDIAN_S", "0.005")
    os.environ.setdefault("SIMULATOR_LATENCY_P95_S", "0.01")
    # LLM hit audits re-ask the simulator (so its call count would no longer equal the
    # broker's misses) and evict entries the hit-latency step reads back; the memory
    # bench's "Auditing overhead" step measures what auditing costs the serving path.
    os.environ.setdefault("AUDIT_LLM_BUDGET", "0")
    # The same for L3's rolling summaries: each is an llm.complete the llm bench did not send.
    # The context step puts a summary row of its own instead (bench/memory.py).
    os.environ.setdefault("SUMMARY_BLOCK", "0")
    try:
        rep, llm_rep, gw_rep, sec_rep = uvloop.run(_run(opts, say, args.only))
    except KeyboardInterrupt:
        say("interrupted; everything the bench started has been stopped")
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line, then the exit code
        say(f"bench failed: {type(exc).__name__}: {exc}")
        return 2
    paths, bad = [], False
    print()
    if rep is not None:
        paths += report_mod.write(rep, args.out)
        bad |= _console(rep.results)
    if llm_rep is not None:
        paths += llm_mod.write(llm_rep, args.out)
        for line in llm_mod.console_lines(llm_rep):
            print(line)
        bad |= any(llm_mod.counts_as_failure(r) for r in llm_rep.results)
    if gw_rep is not None:
        paths += gateway_mod.write(gw_rep, args.out)
        for line in llm_mod.console_lines(gw_rep):
            print(line)
        bad |= any(llm_mod.counts_as_failure(r) for r in gw_rep.results)
    if sec_rep is not None:
        paths += security_mod.write(sec_rep, args.out)
        bad |= _console(sec_rep.results)
    reports = (("memory", rep), ("llm", llm_rep), ("gateway", gw_rep), ("security", sec_rep))
    parts = [(area, r.results) for area, r in reports if r is not None]
    if parts:
        paths += summary_mod.write(parts, next(r for _, r in reports if r is not None).started, args.out)
    print()
    for path in paths:
        print(f"wrote {path}")
    if args.only == "all":
        bad |= _guard() != 0
    return 1 if bad else 0


def _guard() -> int:
    """The guard's calibration, measure only (the shipped guard_model.json is left alone)."""
    from bench import guard_calibration

    return guard_calibration.main(["--no-write-model"])


def _scale(quick: bool, out: Path, say) -> int:
    """The scale-out curve (its own servers; no stack). 1 when no configuration met its objective."""
    from bench import scale

    try:
        data = uvloop.run(scale.run(quick, say))
    except KeyboardInterrupt:
        say("interrupted; everything the bench started has been stopped")
        return 130
    for path in scale.write(data, out):
        print(f"wrote {path}")
    return 0 if any(p["passed"] for p in data["points"]) else 1


def _console(results) -> bool:
    """Print each result and target; True when one was skipped or failed."""
    for r in results:
        print("  " + report_mod.result_line(r))
        for t in r.targets:
            print(f"      {'PASS' if t.passed else 'FAIL'}  {t.text} ({t.observed})")
    return any(r.skipped or any(not t.passed for t in r.targets) for r in results)


async def _run(opts: Options, say, only: str = "memory"):
    """(memory report, llm report, gateway report, security report), None for an area not run."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # SIGTERM cleans up like Ctrl-C
    try:
        if only == "memory":
            return await Bench(opts, say).run(), None, None, None
        if only == "security":
            return None, None, None, await security_mod.run(opts, say)
        rep, llm_rep, gw_rep = await _with_llm(opts, say, only)
        if only in ("llm", "gateway"):
            return rep, llm_rep, gw_rep, None
        say("auth and TLS cost")
        return rep, llm_rep, gw_rep, await security_mod.run(opts, say)
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None


async def _with_llm(opts: Options, say, only: str):
    """One stack for the areas `only` names (memory, llm and gateway for `all`): started here (or
    borrowed); the memory bench borrows it via its stack.env."""
    stack = Stack(opts, say)
    rep = llm_rep = gw_rep = None
    try:
        await stack.start()
        if only == "all":
            borrowed = dataclasses.replace(opts, stack_env=stack.root / "stack.env") if stack.root else opts
            rep = await Bench(borrowed, say).run()
            rep.options = opts
            stack.keep_logs |= any(r.skipped.startswith("failed") for r in rep.results)
        if only in ("llm", "all"):
            say("llm-broker benchmark")
            llm_rep = await llm_mod.LlmBench(opts, stack.env, say, stack_problem=stack.problem).run()
            stack.keep_logs |= any(r.skipped.startswith("failed") for r in llm_rep.results)
        if only in ("gateway", "all"):
            say("llm-gateway benchmark")
            gw_rep = await gateway_mod.GatewayBench(opts, stack.env, say, stack_problem=stack.problem).run()
            stack.keep_logs |= any(r.skipped.startswith("failed") for r in gw_rep.results)
    except BaseException:
        stack.keep_logs = True
        raise
    finally:
        await asyncio.shield(asyncio.to_thread(stack.stop))
    return rep, llm_rep, gw_rep


if __name__ == "__main__":
    sys.exit(main())
