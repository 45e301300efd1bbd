"""The demo's knobs: environment variables, overridden by command-line flags.

| variable | flag | default | meaning |
|---|---|---|---|
| `DEMO_LEADS` | `--leads` | 500 | leads in the fleet |
| `DEMO_BOTS` | `--bots` | 3 | bots by role: qualifier, nurture, scheduler (more: a second of each, ...) |
| `DEMO_DAYS` | `--days` | 1 | simulated days (07:00 on day 1 to 23:00 on the last) |
| `DEMO_SPEED` | `--speed` | 240 | simulated seconds per wall second (240: the 16-hour day in 4 minutes) |
| `DEMO_WORKERS` | `--workers` | 3 | agent-worker processes, each reading through a memory-l1 sidecar of its own; a lead's events all go to worker `index % workers` (sticky routing, as a deployment routes a lead's webhooks to one pod) |
| `DEMO_MIX` | `--mix` | "" | call mix over `services/agent_worker/scenario.py` `Mix.DEFAULTS`, e.g. `search=0.1,market=0.8` |
| `DEMO_SEED` | `--seed` | 1 | the plan's random seed |
| `DEMO_DIR` | `--dir` | `.tiermem/demo` | state of the demo's own stack (wiped each run) and its outputs |
| `DEMO_REAL_LLM` | | 0 | with `ANTHROPIC_API_KEY` set the broker would call Claude (and spend money): set 1 to allow |

Why one day at 240x: the default fleet is the design's (500 leads, 3 bots, ~4,700
interactions a day at ~7.5k tokens each, see services/agent_worker/scenario.py and bot.py).
On the 2-core box the demo targets, the whole stack shares the cores; at 1440x that fleet
means several hundred LLM calls a wall second, the box saturates and cache-hit latency
becomes queueing behind the `anthropic` SDK's work for misses. At 240x it is ~50 LLM calls
a second with headroom, hit latency is the cache's own (a few ms), and the day takes 4
minutes (plus ~30 s of start-up and history import): the whole demo stays under 5 minutes.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from services.agent_worker import scenario

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DemoSettings:
    leads: int = scenario.LEADS
    bots: int = scenario.BOTS
    days: int = scenario.DAYS
    speed: float = scenario.SPEED
    workers: int = 3
    mix: str = ""
    seed: int = 1
    dir: Path = REPO / ".tiermem" / "demo"
    real_llm: bool = False
    up_timeout: float = 60.0

    @classmethod
    def load(cls, argv: list[str] | None = None, env: dict[str, str] | None = None) -> "DemoSettings":
        env = dict(os.environ if env is None else env)
        d = cls()
        p = argparse.ArgumentParser(prog="python -m demo", description="Run the lead fleet against a "
                                    "fresh tiermem stack; print the results table; write an HTML report.")
        p.add_argument("--leads", type=int, default=int(env.get("DEMO_LEADS", d.leads)))
        p.add_argument("--bots", type=int, default=int(env.get("DEMO_BOTS", d.bots)))
        p.add_argument("--days", type=int, default=int(env.get("DEMO_DAYS", d.days)))
        p.add_argument("--speed", type=float, default=float(env.get("DEMO_SPEED", d.speed)))
        p.add_argument("--workers", type=int, default=int(env.get("DEMO_WORKERS", d.workers)))
        p.add_argument("--mix", default=env.get("DEMO_MIX", d.mix))
        p.add_argument("--seed", type=int, default=int(env.get("DEMO_SEED", d.seed)))
        p.add_argument("--dir", type=Path, default=Path(env.get("DEMO_DIR") or d.dir))
        a = p.parse_args(argv)
        if min(a.leads, a.bots, a.days, a.workers) < 1 or a.speed <= 0:
            p.error("leads, bots, days and workers must be >= 1 and speed > 0")
        return cls(leads=a.leads, bots=a.bots, days=a.days, speed=a.speed, workers=min(a.workers, a.leads),
                   mix=a.mix, seed=a.seed, dir=a.dir.resolve(),
                   real_llm=env.get("DEMO_REAL_LLM") == "1",
                   up_timeout=float(env.get("TIERMEM_UP_TIMEOUT", d.up_timeout)))
