"""Settings: one frozen struct built from the environment once, at start-up.

Precedence: the process environment, then the local stack's `stack.env`
(written by `just up` into the state folder, `TIERMEM_STATE_DIR` or
`.tiermem/`, so a service started by hand finds the local stack), then the
defaults below. `load_stack_env` is the one reader of that file, for every
tool that needs the stack's URLs. Nothing reads the environment at import time. Secrets are
kept out of `repr` so a logged settings object never leaks them.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal, Mapping

import msgspec

REPO_ROOT = Path(__file__).resolve().parents[1]


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """The local stack's state folder: `TIERMEM_STATE_DIR`, else `.tiermem/` at the repo root."""
    env = os.environ if env is None else env
    return Path(env.get("TIERMEM_STATE_DIR") or REPO_ROOT / ".tiermem").resolve()


def load_stack_env(where: Path | str | None = None) -> dict[str, str]:
    """The `KEY=value` lines of a local stack's `stack.env` ({} when there is none: the stack is down).

    `where`: a state folder or a stack.env file; default `state_dir()`."""
    path = Path(where) if where is not None else state_dir()
    if path.is_dir() or where is None:
        path = path / "stack.env"
    out: dict[str, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        line = line.strip()
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            out[key.strip()] = value.strip()
    return out


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str
    # the service's identity on the bus (shared.bus): user/password, a .creds file or an nkey seed file
    nats_user: str = ""
    nats_password: str = ""
    nats_creds: str = ""
    nats_nkey_seed: str = ""
    nats_tls_ca: str = ""  # TLS to NATS: verify the server against this CA (also on for tls:// URLs)
    nats_tls_cert: str = ""  # client certificate and key, for servers that ask for one
    nats_tls_key: str = ""
    redis_url: str = ""
    redis_username: str = ""  # a Redis ACL user, when not in REDIS_URL (Kubernetes Secrets)
    redis_password: str = ""
    redis_cluster: bool = False  # REDIS_URL names one node of a Redis Cluster (shared.redis_client)
    database_url: str = ""
    metrics_port: int = 0  # 0: no metrics HTTP server
    metrics_host: str = "127.0.0.1"
    log_level: str = "info"
    trace_file: str = ""  # JSON lines of finished spans, for the demo's waterfall
    trace_db_spans: bool = False  # Redis/Postgres client spans under kept spans (shared.db_spans)
    pii_hash_key: str = ""  # keys user refs in logs and spans (shared.pii); empty: random
    pii_raw_ids: bool = False  # raw user ids in logs and spans, for local debugging (never texts)
    request_timeout_s: float = 5.0
    concurrency: int = 64  # requests in flight per endpoint and process

    max_text_bytes: int = 65536
    stream_replicas: int = 1
    append_apply_wait_s: float = 0.5  # how long an append waits for Redis before replying
    max_user_bytes: int = 64 << 20  # a user's stored bytes in the log; an append past it gets 413
    memory_stream_reinit: str = ""  # the lost MEMORY incarnation to replace with an empty stream
    # retention (shared.retention): what every tier keeps; 0 = no limit
    retain_max_age_s: float = 0.0  # a message older than this leaves the log, L3 and the LLM cache
    retain_max_per_user: int = 0  # a user's newest this many messages are kept, older ones leave
    log_max_bytes: int = 0  # the MEMORY stream's storage cap (0: only JetStream's own limits)
    retain_sweep_s: float = 60.0  # how often the l3-semantic-indexer deletes what retention dropped
    forget_retry_max_s: float = 60.0  # a pending forget job is retried at least this often

    l1_id: str = ""
    l1_window: int = 10
    l1_max_users: int = 50_000
    l1_max_bytes: int = 256 * 1024 * 1024  # text bytes all windows hold together
    l1_ttl_s: float = 300.0  # a window older than this (since it was filled) is a miss
    l2_window: int = 100
    l2_idle_ttl_s: float = 7 * 86400  # a user's Redis window expires after this long unused

    embedder: str = "wordllama"
    embedder_model: str = ""
    embedder_url: str = ""
    embedder_api_key: str = msgspec.field(default="")
    embedder_dim: int = 0
    l3_batch: int = 256
    l3_min_seq_wait_s: float = 2.0
    # rolling summaries for memory.get op "context" (services/l3_semantic_indexer/summaries.py):
    # each extends the last by `summary_block` messages once `summary_keep` newer ones exist
    # (those are served verbatim); 0 blocks: no summaries
    summary_block: int = 40
    summary_keep: int = 20
    summary_model: str = "claude-haiku-4-5"

    anthropic_base_url: str = ""  # the local simulator; empty with a key: Claude itself
    anthropic_api_key: str = ""
    llm_timeout_s: float = 60.0
    llm_max_retries: int = 2
    llm_max_concurrency: int = 32
    llm_config: str = ""  # TOML with volatility classes and prices (default: the broker's own)
    llm_max_prompt_chars: int = 400_000
    breaker_failures: int = 5
    breaker_cooldown_s: float = 10.0
    pg_command_timeout_s: float = 2.0  # a Postgres statement gives up after this (pools' command_timeout)
    llm_sweep_interval_s: float = 60.0  # how often expired `llm.entries` rows are deleted
    llm_sweep_batch: int = 1000  # rows per DELETE statement of that sweep

    # llm-gateway: the Messages API over HTTP (services/llm_gateway)
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 0  # 0: a free port (the stack picks one and names it in stack.env)
    gateway_api_keys: str = ""  # comma-separated keys callers must present; empty: any key
    gateway_max_body_bytes: int = 32 * 1024 * 1024  # the API's own limit; larger gets 413
    gateway_timeout_s: float = 300.0  # how long a request waits for the llm-broker
    # whose API key the model is called with: `gateway` (the broker's ANTHROPIC_API_KEY) or
    # `caller` (the key the HTTP caller presented, carried to the broker in a NATS header
    # on an internal subject; the cache is then split per key: docs in README, "API keys")
    gateway_upstream_key: Literal["gateway", "caller"] = "gateway"
    # the /admin/... routes (llm.admin.* over HTTP) answer only the `tiermem-admin-token`
    # header holding this; empty: they do not exist (404)
    gateway_admin_token: str = ""

    # freshness auditing: tiers and the broker publish what they served ...
    served_publish_rate: float = 1.0  # share of answers recorded (0: none)
    served_flush_s: float = 0.05  # batch interval of served records
    served_queue_max: int = 10_000  # records kept at most between flushes; more are shed
    # ... and the freshness-auditor checks a sample of them
    audit_sample_rate: float = 0.1  # share of memory records checked against the log
    audit_grace_s: float = 1.0  # a message stored this long before a read must be in it
    audit_llm_budget: float = 0.05  # re-ask spend cap, as a fraction of what audited hits saved
    audit_judge: str = "llm"  # free-text judge: llm (a budgeted model call) | embedding (MiniLM proxy, 67 % on MRPC)

    def __repr__(self) -> str:  # hide secrets, keep the rest readable
        shown = {f: getattr(self, f) for f in self.__struct_fields__}
        for secret in ("embedder_api_key", "anthropic_api_key", "nats_password", "pii_hash_key", "redis_password",
                       "gateway_api_keys", "gateway_admin_token"):
            if shown[secret]:
                shown[secret] = "***"
        for url in ("nats_url", "redis_url", "database_url"):
            shown[url] = _hide_password(shown[url])
        return f"Settings({shown})"

    def redis_auth(self) -> dict[str, str]:
        """`Redis.from_url` keywords for the ACL user of `REDIS_USERNAME` / `REDIS_PASSWORD` (none when unset:
        credentials in `REDIS_URL` win anyway)."""
        return {k: v for k, v in (("username", self.redis_username), ("password", self.redis_password)) if v}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "Settings":
        if env is None:
            merged = load_stack_env() | dict(os.environ)
        else:
            merged = dict(env)
        values: dict[str, object] = {}
        for field in cls.__struct_fields__:
            raw = merged.get(field.upper())
            if raw is None and field not in _UNPREFIXED:
                raw = merged.get(f"TIERMEM_{field.upper()}")
            if raw is not None:
                values[field] = raw
        values.update(overrides)
        if "nats_url" not in values:
            raise SystemExit("NATS_URL is not set: run `just up` or point NATS_URL at a server")
        values.setdefault("l1_id", _default_l1_id(merged))
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise SystemExit(f"bad setting: {exc}") from None


# Settings never read from their TIERMEM_-prefixed name: `TIERMEM_ANTHROPIC_BASE_URL`
# in stack.env is the llm-gateway's URL, for clients; the broker taking it as its
# upstream would send every miss back to itself.
_UNPREFIXED = frozenset({"anthropic_base_url"})


def _default_l1_id(env: Mapping[str, str]) -> str:
    # In Kubernetes the pod name identifies the sidecar its worker talks to.
    raw = env.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in raw)


def _hide_password(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url
