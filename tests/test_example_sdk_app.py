"""examples/anthropic_sdk_app.py: the unmodified `anthropic` SDK app, run as a user would run it.

The stack runs as `just up` runs it (every service its own process); the
script runs as its own process with only `ANTHROPIC_BASE_URL` (from the
stack's `TIERMEM_ANTHROPIC_BASE_URL`) and a key in its environment, and what
it prints is checked: the first streamed ask a miss, the second a hit, the
same text both times.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "anthropic_sdk_app.py"
ASK = re.compile(r"^--- ask (\d)\ntiermem-cache: (\S+)\n(.*?)\n\n(?=--- ask |caches: )", re.S | re.M)


def asks(output: str) -> list[tuple[str, str, str]]:
    """(ask number, tiermem-cache, streamed text) for each ask the script printed."""
    return ASK.findall(output)


def test_the_output_parser_reads_each_ask():
    text = "Hello there.\n\nA second paragraph."
    out = (f"asking twice: q\n\n--- ask 1\ntiermem-cache: miss\n{text}\n\n"
           f"--- ask 2\ntiermem-cache: hit\n{text}\n\ncaches: miss then hit; ...\n")
    assert asks(out) == [("1", "miss", text), ("2", "hit", text)]


@pytest.mark.e2e
async def test_the_example_app_streams_a_miss_then_a_hit_of_the_same_text(
        nats_url, redis_url, database_url, tmp_path):
    from shared.settings import load_stack_env
    from tests.conftest import reset_servers, stack_processes

    await reset_servers(nats_url, redis_url, database_url)
    env = {**os.environ, "NATS_URL": nats_url, "REDIS_URL": redis_url, "DATABASE_URL": database_url}
    env.pop("ANTHROPIC_API_KEY", None)
    env.pop("ANTHROPIC_BASE_URL", None)  # `up` starts the simulator for the broker
    with stack_processes(env, tmp_path):
        base = load_stack_env(tmp_path)["TIERMEM_ANTHROPIC_BASE_URL"]
        app_env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "TIERMEM_"))}
        app_env.update({"ANTHROPIC_BASE_URL": base, "ANTHROPIC_API_KEY": "any"})
        done = subprocess.run([sys.executable, str(SCRIPT), "Is the roof of the Elm Court cottage new?"],
                              env=app_env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    got = asks(done.stdout)
    assert [(n, cache) for n, cache, _ in got] == [("1", "miss"), ("2", "hit")], done.stdout
    assert got[0][2].strip() and got[0][2] == got[1][2], done.stdout
    assert "same text both times: yes" in done.stdout
