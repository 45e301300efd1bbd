"""The local Anthropic-compatible simulator (`services.llm_simulator`), for runs without a key."""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

from devstack.process import HOST, Launch, Server, launch, restartable
from shared.settings import REPO_ROOT

__all__ = ["start_simulator"]


@restartable
def start_simulator(
    folder: Path | str,
    *,
    port: int | None = None,
    log_path: Path | str | None = None,
    timeout: float = 30.0,
    die_with_parent: bool = False,
    env: dict[str, str] | None = None,
) -> Server:
    """`python -m services.llm_simulator` on a free port; `env` replaces the environment (SIMULATOR_*)."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    log = Path(log_path) if log_path else folder / "llm-simulator.log"

    def build(p: int) -> Launch:
        return Launch(cmd=[sys.executable, "-m", "services.llm_simulator", "--port", str(p)],
                      probe=lambda _proc: _health_ok(p), url=f"http://{HOST}:{p}", env=env, cwd=REPO_ROOT)

    return launch("llm-simulator", build, port=port, log_path=log, data_dir=folder, stop_signal=signal.SIGTERM,
                  timeout=timeout, die_with_parent=die_with_parent)


def _health_ok(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return b" 200 " in s.recv(64)
    except OSError:
        return False
