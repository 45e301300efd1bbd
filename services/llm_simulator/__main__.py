"""Run the LLM simulator: `python -m services.llm_simulator [--port P] [...]`."""

from __future__ import annotations

import argparse
import asyncio
import signal

from services.llm_simulator.app import SimulatorSettings, run
from shared.telemetry import configure_logging


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m services.llm_simulator",
        description="Local Anthropic-compatible Messages API simulator (not the real API). "
                    "Flags override the SIMULATOR_* environment variables.")
    parser.add_argument("--host", help="listen address (SIMULATOR_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="0 picks a free port (SIMULATOR_PORT, default 0)")
    parser.add_argument("--seed", type=int, help="RNG seed for latency and faults (SIMULATOR_SEED)")
    parser.add_argument("--latency-median", type=float, dest="latency_median_s",
                        help="median latency in s (SIMULATOR_LATENCY_MEDIAN_S, default 0.8)")
    parser.add_argument("--latency-p95", type=float, dest="latency_p95_s",
                        help="p95 latency in s (SIMULATOR_LATENCY_P95_S, default 1.5)")
    parser.add_argument("--cache-min-tokens", type=int, dest="cache_min_tokens",
                        help="shortest cacheable prompt prefix (SIMULATOR_CACHE_MIN_TOKENS, default 1024)")
    parser.add_argument("--faults", help='fault rules as JSON, e.g. \'{"status": 529, "rate": 0.05}\' '
                                         "(SIMULATOR_FAULTS)")
    parser.add_argument("--log-level", dest="log_level", help="SIMULATOR_LOG_LEVEL or LOG_LEVEL")
    args = parser.parse_args()
    settings = SimulatorSettings.from_env(**vars(args))
    configure_logging("llm-simulator", settings.log_level)
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but the simulator runs without it
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(settings))


async def _serve(settings: SimulatorSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(settings, stop)


if __name__ == "__main__":
    main()
