# tiermem tasks. `just` comes from PyPI: pip install rust-just
set shell := ["bash", "-euo", "pipefail", "-c"]
set positional-arguments

# list the recipes
default:
    @just --list

# create .venv (Python 3.11+) and install tiermem[dev] when pyproject.toml changed
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    pick_python() {
        for c in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
            [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 || continue
            if "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
                echo "$c"; return 0
            fi
        done
        echo "error: tiermem needs Python 3.11+ (set PYTHON=/path/to/python3.11)" >&2
        return 1
    }
    if ! .venv/bin/python -c '' >/dev/null 2>&1; then
        py=$(pick_python)
        echo "creating .venv with $py ($("$py" --version))"
        rm -rf .venv  # missing or broken (its interpreter is gone)
        "$py" -m venv .venv || {
            echo "error: '$py -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)" >&2
            exit 1
        }
    fi
    stamp=.venv/.tiermem-installed
    want=$(.venv/bin/python -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')
    if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
        echo "installing tiermem[dev] into .venv (pyproject.toml changed since the last install)"
        PIP_DISABLE_PIP_VERSION_CHECK=1 .venv/bin/python -m pip install -q -e '.[dev]'
        echo "$want" > "$stamp"
    fi

# run the tests (extra args go to pytest, e.g. `just test -k stack -x`)
test *args: setup
    .venv/bin/pytest -q "$@"

# run the long scenarios (marked `long`)
test-long *args: setup
    .venv/bin/pytest -q -m long "$@"

# start NATS, Redis, Postgres and every service (restarted when one dies); URLs in .tiermem/stack.env
up *args: setup
    .venv/bin/python -m devstack up "$@"

# stop what `just up` started
down:
    if [ -x .venv/bin/python ]; then .venv/bin/python -m devstack down; fi

# an unmodified `anthropic` SDK app (examples/anthropic_sdk_app.py) asks a question twice through the
# running stack's llm-gateway, streaming: tiermem-cache miss, then hit (`just example "my question"`)
example *args: setup
    #!/usr/bin/env bash
    set -euo pipefail
    env_file="${TIERMEM_STATE_DIR:-.tiermem}/stack.env"
    url=$(grep '^TIERMEM_ANTHROPIC_BASE_URL=' "$env_file" 2>/dev/null | cut -d= -f2- || true)
    if [ -z "$url" ]; then
        echo "error: no llm-gateway in $env_file (start the stack with \`just up\`)" >&2
        exit 1
    fi
    # the gateway never forwards the key (the broker calls upstream with its own): any value works
    # unless the stack sets GATEWAY_API_KEYS
    ANTHROPIC_BASE_URL="$url" ANTHROPIC_API_KEY="${ANTHROPIC_API_KEY:-local}" \
        .venv/bin/python examples/anthropic_sdk_app.py "$@"

# show what runs, with each service's restarts
status:
    -.venv/bin/python -m devstack status

# a fresh stack, the lead fleet, the results table and an HTML report; stops everything, also on Ctrl-C
demo *args: setup
    .venv/bin/python -m demo "$@"

# the fault suite: faults one at a time under load, bench/results/chaos.md; exits 1 on any loss
# (e.g. `just chaos --trials 2 --faults kill:redis,llm-429`, `just chaos --cluster`, `just chaos --list`)
chaos *args: setup
    .venv/bin/python -m chaos "$@"

# run the benchmarks (args go to `python -m bench`)
bench *args: setup
    .venv/bin/python -m bench "$@"
