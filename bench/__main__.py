"""`python -m bench [--quick] [--out bench/results]`: run the memory benchmark, write the report.

Starts its own stack (servers and services as separate processes, in a temp
state folder) unless `--stack-env` points at a running one, and stops what
it started on success, failure, Ctrl-C or SIGTERM. Exit code: 0 when every
target passed, 1 when a target failed or a measurement was skipped, 2 when
the run itself failed, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

import uvloop

from bench import report as report_mod
from bench.memory import Bench, Options

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="10k messages over 100 users and fewer samples (about a minute)")
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

    t0 = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {line}", flush=True)

    try:
        rep = uvloop.run(_run(opts, say))
    except KeyboardInterrupt:
        say("interrupted; everything the bench started has been stopped")
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line, then the exit code
        say(f"bench failed: {type(exc).__name__}: {exc}")
        return 2
    paths = report_mod.write(rep, args.out)
    print()
    for r in rep.results:
        print("  " + report_mod.result_line(r))
        for t in r.targets:
            print(f"      {'PASS' if t.passed else 'FAIL'}  {t.text} ({t.observed})")
    print()
    for path in paths:
        print(f"wrote {path}")
    failed = any(not t.passed for r in rep.results for t in r.targets)
    skipped = any(r.skipped for r in rep.results)
    return 1 if failed or skipped else 0


async def _run(opts: Options, say):
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # SIGTERM cleans up like Ctrl-C
    try:
        return await Bench(opts, say).run()
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None


if __name__ == "__main__":
    sys.exit(main())
