"""`python -m services.agent_worker`: run the lead fleet (settings: services/agent_worker/worker.py)."""

import asyncio
import signal
import sys

import uvloop

from services.agent_worker.worker import WorkerSettings, run


async def _main() -> int:
    settings = WorkerSettings.from_env()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await run(settings, stop)


if __name__ == "__main__":
    sys.exit(uvloop.run(_main()))
