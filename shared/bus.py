"""Connecting to NATS with an identity: one place that turns settings into `nats.connect` options.

Why: the bus refuses clients without credentials, and every process (the
services, the reference worker, the demo, the benchmarks, the stack tooling,
the tests) must present one the same way. `NATS_URL` never carries
credentials; they come from their own settings so a logged URL leaks nothing.

Identity, first match wins:
- `NATS_CREDS`: a `.creds` file (JWT + nkey seed, for operator/account setups);
- `NATS_NKEY_SEED`: a file holding an nkey seed;
- `NATS_USER` + `NATS_PASSWORD`.

Tools that act for a role rather than as a service (the reference worker, the
demo, operators) read `NATS_WORKER_USER` / `NATS_WORKER_PASSWORD` or
`NATS_ADMIN_USER` / `NATS_ADMIN_PASSWORD`, which `just up` writes into
`.tiermem/stack.env`, unless `NATS_USER` etc. are set.

`NATS_URL` may name several servers of a cluster, comma-separated; the
client connects to any and fails over to the others.

TLS is on when the URL is `tls://` or `NATS_TLS_CA` is set: the server is
verified against that CA (the system's CAs without one); `NATS_TLS_CERT` and
`NATS_TLS_KEY` add a client certificate for servers that ask for one.

The inbox prefix: a service receives its replies under `_INBOX_<service>`
(see `shared.permissions`), so no other identity can subscribe to them.
"""

from __future__ import annotations

import ssl
from typing import Mapping

import msgspec
import nats
from nats.aio.client import Client as NATS

from shared.permissions import ADMIN, WORKER, default_inbox

_ENV_PREFIX = {None: "NATS_", WORKER: "NATS_WORKER_", ADMIN: "NATS_ADMIN_"}


class BusAuth(msgspec.Struct, frozen=True, kw_only=True):
    """Credentials and TLS files for one NATS connection (empty: anonymous, plain TCP)."""

    user: str = ""
    password: str = ""
    creds: str = ""
    nkey_seed: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    def __repr__(self) -> str:
        return f"BusAuth(user={self.user!r}, creds={self.creds!r}, tls_ca={self.tls_ca!r})"

    @classmethod
    def from_env(cls, env: Mapping[str, str], role: str | None = None) -> "BusAuth":
        """Credentials from environment-style variables: `NATS_*`, or for `role`
        "agent-worker"/"admin" `NATS_WORKER_*` / `NATS_ADMIN_*` when no `NATS_USER`/creds are set."""
        own = {k: env.get(f"NATS_{k.upper()}", "") for k in ("user", "password", "creds", "nkey_seed")}
        if role is not None and not (own["user"] or own["creds"] or own["nkey_seed"]):
            prefix = _ENV_PREFIX[role]
            own = {"user": env.get(f"{prefix}USER", ""), "password": env.get(f"{prefix}PASSWORD", "")}
        tls = {k: env.get(f"NATS_{k.upper()}", "") for k in ("tls_ca", "tls_cert", "tls_key")}
        return cls(**own, **tls)

    @classmethod
    def of(cls, settings) -> "BusAuth":
        """From a service's `Settings` (its `nats_*` fields)."""
        return cls(user=settings.nats_user, password=settings.nats_password, creds=settings.nats_creds,
                   nkey_seed=settings.nats_nkey_seed, tls_ca=settings.nats_tls_ca,
                   tls_cert=settings.nats_tls_cert, tls_key=settings.nats_tls_key)


def connect_options(url: str, auth: BusAuth, *, inbox_prefix: str = "_INBOX") -> dict:
    """Keyword arguments for `nats.connect` (without the servers)."""
    opts: dict = {"inbox_prefix": inbox_prefix}
    if auth.creds:
        opts["user_credentials"] = auth.creds
    elif auth.nkey_seed:
        opts["nkeys_seed"] = auth.nkey_seed
    elif auth.user:
        opts["user"], opts["password"] = auth.user, auth.password
    if auth.tls_ca or auth.tls_cert or url.startswith("tls://"):
        context = ssl.create_default_context(cafile=auth.tls_ca or None)
        if auth.tls_cert:
            context.load_cert_chain(auth.tls_cert, auth.tls_key or None)
        opts["tls"] = context
    return opts


def servers_of(url: str) -> list[str]:
    """`NATS_URL` may list several servers of one cluster, comma-separated (as the nats CLI takes
    them); nats-py wants a list, and would parse the whole string as one URL."""
    return [u.strip() for u in url.split(",") if u.strip()]


class BusAuthError(ConnectionRefusedError):
    """The server refused our credentials: retrying cannot help, so start-up fails at once."""


async def connect(url: str, auth: BusAuth, *, role: str | None = None, **kwargs) -> NATS:
    """`nats.connect` with `auth`, receiving replies under the inbox prefix of `role` (a service's name).

    nats-py retries a refused first connection for as long as reconnects are
    allowed (forever for services); an authorization failure then hangs
    start-up silently. Here it raises `BusAuthError` at once instead.
    """
    opts = connect_options(url, auth, inbox_prefix=default_inbox(role) if role else "_INBOX")
    report = kwargs.pop("error_cb", None)
    connected = False

    async def on_error(exc: Exception) -> None:
        if not connected and "authorization violation" in str(exc).lower():
            who = auth.user or auth.creds or auth.nkey_seed or "no credentials"
            raise BusAuthError(f"NATS at {url} refused {who!r}: authorization violation "
                               "(check NATS_USER/NATS_PASSWORD, NATS_CREDS or NATS_NKEY_SEED)")
        if report is not None:
            await report(exc)

    nc = await nats.connect(servers_of(url), **opts, error_cb=on_error, **kwargs)
    connected = True
    return nc


async def connect_as(env: Mapping[str, str], role: str, **kwargs) -> NATS:
    """A tool's connection: `NATS_URL` from `env`, credentials for `role` ("agent-worker" or "admin")."""
    url = env.get("NATS_URL")
    if not url:
        raise SystemExit("NATS_URL is not set: run `just up` or point NATS_URL at a server")
    return await connect(url, BusAuth.from_env(env, role), **kwargs)
