"""`python -m chaos` (`just chaos`): run the fault suite, write bench/results/chaos.md, exit 1 on any loss.

Bounded: `--trials` per fault, `--faults` to pick some, `--deadline` for the
whole run (trials that would start after it are skipped and the report says
so). Loopback only: every server is started here, on 127.0.0.1, in a
temporary folder removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from chaos import faults as fault_table, report
from chaos.harness import Harness
from chaos.runner import Stores, check_stores, run_trial
from chaos.truth import Truth
from chaos.workload import Workload
from shared import bus, permissions, subjects

REPO = Path(__file__).resolve().parents[1]
SHORT = "kill:l2-gateway,stop:memory-l1,llm-529,poison"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="trials per fault (default 20)")
    p.add_argument("--faults", default="", help="comma-separated fault names (default: all; see --list)")
    p.add_argument("--short", action="store_true", help=f"1 trial each of {SHORT} (what `just test` runs)")
    p.add_argument("--cluster", action="store_true", help="3-node NATS cluster, stream R3; adds kill:nats1")
    p.add_argument("--deadline", type=float, default=5400.0, help="seconds for the whole run (default 5400)")
    p.add_argument("--users", type=int, default=12, help="workload users (default 12)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where chaos.md goes")
    p.add_argument("--keep", action="store_true", help="keep the temporary state folder (logs)")
    p.add_argument("--list", action="store_true", help="list the faults and exit")
    args = p.parse_args(argv)
    if args.short:
        args.trials, args.faults = 1, args.faults or SHORT
    return args


async def run(args: argparse.Namespace, harness: Harness, selected: list) -> tuple[list, dict]:
    env = harness.env
    url = env["NATS_URL"]
    opts = dict(reconnect_time_wait=0.2, max_reconnect_attempts=-1, connect_timeout=5)
    worker = await bus.connect(url, bus.BusAuth(user=permissions.WORKER,
                                                password=harness.passwords[permissions.WORKER]), **opts)
    admin = await bus.connect(url, bus.BusAuth(user=permissions.ADMIN,
                                               password=harness.passwords[permissions.ADMIN]), **opts)
    truth, stores = Truth(), Stores()
    users = [f"lead-{i}" for i in range(args.users)]
    ctx = fault_table.Context(harness, admin, env["ANTHROPIC_BASE_URL"], users)
    w = Workload(worker, truth, users)
    stop = asyncio.Event()
    load = asyncio.create_task(w.run(stop))
    results, deadline_hit, replicas = [], False, None
    started = time.monotonic()
    try:
        await asyncio.sleep(2.0)  # warm: every user has messages, windows and cached intents
        replicas = (await admin.jetstream().stream_info(subjects.STREAM)).config.num_replicas
        for trial in range(args.trials):
            for f in selected:
                if time.monotonic() - started > args.deadline:
                    deadline_hit = True
                    break
                r = await run_trial(ctx, w, truth, stores, f, trial, f"{len(results)}")
                results.append(r)
                print(f"{f.name:<24} trial {trial + 1}: lost {r.acked_lost} dup {r.duplicates} "
                      f"stale {r.stale_served} forgotten {r.forgotten_served} llm {r.stale_llm_hits} "
                      f"recovery {r.recovery_s if r.recovery_s is None else round(r.recovery_s, 2)} s "
                      f"{'; '.join(r.notes)}", flush=True)
            if deadline_hit:
                break
        stop.set()
        await asyncio.wait_for(load, timeout=15)
        lost, dups, notes = await check_stores(ctx, truth, stores, 30.0)  # anything lost late
        if results and (lost or dups):
            results[-1].acked_lost += lost
            results[-1].duplicates += dups
            results[-1].notes += [f"final check: {n}" for n in notes]
    finally:
        stop.set()
        load.cancel()
        await worker.close()
        await admin.close()
    checked = {"acked_appends": sum(map(len, truth.acks.values())), "reads": len(truth.reads),
               "llm_hits": sum(c.status == "hit" for c in truth.llm), "requests": len(truth.calls)}
    return results, {"deadline_hit": deadline_hit, "checked": checked, "stream_replicas": replicas}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    table = fault_table.catalogue(cluster=args.cluster)
    if args.list:
        print("\n".join(table))
        return 0
    names = [n.strip() for n in args.faults.split(",") if n.strip()] or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"unknown fault(s) {unknown}; known: {', '.join(table)}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="tiermem-chaos-"))
    harness = Harness(root, cluster=args.cluster)
    t0 = time.monotonic()
    try:
        harness.start()  # `stack.up` runs its own event loop
        results, extra = asyncio.run(run(args, harness, [table[n] for n in names]))
    finally:
        harness.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"state and logs kept in {root}")
    mode = "cluster" if args.cluster else "single"
    options = {"trials": args.trials, "faults": names, "users": args.users, "wall_s": time.monotonic() - t0, **extra}
    paths = report.write(results, args.out, mode, options)
    summary = report.rows(results)
    print(report.table(summary))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if report.failed(summary) else 0


if __name__ == "__main__":
    sys.exit(main())
