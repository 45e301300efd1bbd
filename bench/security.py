"""The cost of auth and TLS on the bus: the same calls against an open, a locked and a TLS server.

Why: issue 10 locked the bus (a user per role with publish/subscribe
allow-lists, `shared.permissions`) and made TLS a setting. Both cost something
on every message: the server matches each publish and each delivery against
the sender's and the receiver's allow-lists, tracks the reply a responder may
send (`allow_responses`), and with TLS every hop is encrypted and decrypted.
This step measures what that costs a client, in one run, against three
nats-servers it starts on loopback for itself:

- open: no authorization, plain TCP (the bus before issue 10);
- locked: the users and permissions of `shared.permissions`, as `just up` runs it;
- locked + TLS: the same, with the server's certificate issued by a throwaway
  CA (made with the `openssl` CLI in a temp folder) that every client verifies
  (`NATS_TLS_CA`, as `shared.bus` does it).

On each, from the agent-worker identity (anonymous on the open server):

- bare round trip: request/reply to `bench.echo` in another process, running
  as the memory-l1 role on a subject of its own (`memory.get.<id>`), so its
  answer goes through `allow_responses` like a sidecar's;
- L1 hit: `memory.get.<l1 id>` recent n=5 to a real memory-l1 process (its own
  identity) whose windows were filled through a stand-in for `memory.l2.get`
  in this process (as l2-gateway; it answers the fills only, never a hit).

The six calls are interleaved in blocks of `BLOCK` (the box's load drifts:
short blocks spread a burst of other work over all six alike), and
each locked or TLS figure is reported as a ratio to the open server's. The
goal, from issue 10: auth costs an L1 hit at most 5 % (p50).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import msgspec

from bench import baselines
from bench.memory import (
    Options, Report, Result, Say, Target, TierCheck, load_average, machine_facts, sidecars,
)
from bench.report import notes_section, targets_table, to_dict, write_files
from bench.stats import announce, fmt_ratio, fmt_us, markdown_table, ratio, ratio_interval, summarize
from devstack import servers
from shared import bus, permissions
from shared.bus import BusAuth
from shared.contract import GetReply, GetRequest, Message, decoder
from shared.permissions import L2_GATEWAY, MEMORY_L1, WORKER

NAME = "security"
KINDS = ("open", "locked", "tls")
KIND_LABELS = {"open": "open (no auth)", "locked": "locked (users + permissions)",
               "tls": "locked + TLS"}
CALLS = {"rt": "bare NATS round trip (echo as memory-l1)", "l1": "L1 hit: memory.get.<id> recent n=5"}
AUTH_GOAL = 1.05  # issue 10: "expect ≤ 1.05× on L1 hits"
BLOCK = 10  # requests of one call before the next call's turn
_get_reply = decoder(GetReply)
USERS = 100  # windows each sidecar holds; the hits cycle over them
N = 5


# --------------------------------------------------------------------------- the rows (pure)


def results(samples: dict[str, list[float]]) -> list[Result]:
    """The report's rows from the six calls' durations in seconds (`rt_open`, `l1_tls`, ...):
    each locked and TLS figure against the open server's, the auth goal on the locked L1 hit."""
    rows = []
    for call, what in (("rt", "NATS round trip"), ("l1", "L1 hit")):
        base = samples[f"{call}_open"]
        open_ = summarize(base)
        for kind, cost in (("locked", "Auth"), ("tls", "Auth + TLS")):
            s = summarize(samples[f"{call}_{kind}"])
            r = Result(key=f"{NAME}_{call}_{kind}", title=f"{cost} cost: {what}, {KIND_LABELS[kind]}",
                       summary=s, baseline_label="the same call, open server (no auth)",
                       baseline=open_, ratio_p50=ratio(s.p50, open_.p50))
            lo, hi = ratio_interval(samples[f"{call}_{kind}"], base)
            r.notes.append("ratio to the open server p50 / p95 / p99: "
                           + " / ".join(fmt_ratio(ratio(getattr(s, p), getattr(open_, p)))
                                        for p in ("p50", "p95", "p99"))
                           + f"; p50 ratio 95 % bootstrap interval {lo:.3f}–{hi:.3f}×")
            if call == "l1" and kind == "locked":
                r.targets.append(Target(f"auth ≤ {AUTH_GOAL:.2f}× on L1 hits (p50, locked / open)",
                                        r.ratio_p50 <= AUTH_GOAL, f"{r.ratio_p50:.3f}×"))
            rows.append(r)
    return rows


# --------------------------------------------------------------------------- TLS material


@dataclass(frozen=True)
class Tls:
    ca: Path
    cert: Path
    key: Path


def make_tls(folder: Path) -> Tls:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it (the `openssl` CLI)."""
    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                       "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                       "extendedKeyUsage=serverAuth\n")
    for cmd in (["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
                 "-subj", "/CN=tiermem-bench-ca"],
                ["req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"],
                ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", "server.pem", "-extfile", "server.ext"]):
        done = subprocess.run(["openssl", *cmd], cwd=folder, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"openssl {cmd[0]} failed: {done.stderr.strip()[-300:]}")
    return Tls(folder / "ca.pem", folder / "server.pem", folder / "server.key")


# --------------------------------------------------------------------------- one server and its calls


@dataclass
class Bus:
    """One of the three servers, with the identity of each party on it."""

    kind: str
    url: str
    worker: BusAuth
    l1: BusAuth
    l2: BusAuth


def _stand_in_reply(req: GetRequest) -> bytes:
    """What the L2 stand-in answers a fill: the user's newest `n` of `n` messages."""
    msgs = [Message(seq=i, msg_id=f"m{i}", role="user", bot_id="bench", text=f"message {i} of the lead",
                    ts="2026-01-01T00:00:00Z") for i in range(1, req.n + 1)]
    return msgspec.json.encode(GetReply(user_id=req.user_id, tier="l2", seq=req.n, messages=msgs))


async def _serve_l2(stack: contextlib.AsyncExitStack, b: Bus) -> None:
    nc = await bus.connect(b.url, b.l2, role=L2_GATEWAY, name="bench-l2-stand-in")
    stack.push_async_callback(nc.close)
    decode = msgspec.json.Decoder(GetRequest).decode

    async def fill(msg) -> None:
        await msg.respond(_stand_in_reply(decode(msg.data)))

    await nc.subscribe("memory.l2.get", cb=fill)
    await nc.flush()


async def _calls(stack: contextlib.AsyncExitStack, b: Bus, bodies: list[bytes], checks: dict) -> dict:
    """The bare round trip and the L1 hit on server `b`, ready to time: name -> (call, check)."""
    nc = await bus.connect(b.url, b.worker, name="bench-worker", allow_reconnect=False, connect_timeout=5)
    stack.push_async_callback(nc.close)
    await _serve_l2(stack, b)
    as_l1 = {"NATS_URL": b.url, **baselines.auth_env(b.l1)}
    echo_subject = f"memory.get.bench-echo-{b.kind}-{os.getpid()}"
    echo = await baselines.spawn_echo([b.url, echo_subject], as_l1)
    stack.push_async_callback(baselines.stop_child, echo)
    ids = await stack.enter_async_context(sidecars(nc, as_l1, {f"sec-{b.kind}": {"LOG_LEVEL": "warning"}}))
    l1_subject = f"memory.get.{ids[f'sec-{b.kind}']}"
    for _ in range(2):  # the first read of each user fills its window from the stand-in
        for body in bodies:
            await nc.request(l1_subject, body, timeout=10)
    checks[b.kind] = check = TierCheck("l1", N)

    async def rt(i: int):
        return await nc.request(echo_subject, bodies[i % len(bodies)], timeout=5)

    async def l1(i: int):
        return await nc.request(l1_subject, bodies[i % len(bodies)], timeout=5)

    def check_reply(msg) -> None:  # raw on purpose: this bench compares buses, the request is the same
        check(_get_reply.decode(msg.data))

    return {f"rt_{b.kind}": (rt, None), f"l1_{b.kind}": (l1, check_reply)}


async def _refuses_anonymous(b: Bus) -> bool:
    """Does the server turn away a client without credentials? (What makes it "locked".)"""
    try:
        nc = await bus.connect(b.url, BusAuth(tls_ca=b.worker.tls_ca), allow_reconnect=False,
                               max_reconnect_attempts=0, connect_timeout=5)
    except bus.BusAuthError:
        return True
    await nc.close()
    return False


def _quiet_tls_close(record: logging.LogRecord) -> bool:
    """asyncio warns once per TLS connection nats-py closes (its pre-TLS stream protocol answers
    EOF with True); harmless, and 4 such lines would read like a failure in the bench's output."""
    return "eof_received() has no effect when using ssl" not in record.getMessage()


def _tls_facts(nc) -> str:
    """The negotiated protocol and cipher of a TLS connection (nats-py keeps its transport private)."""
    with contextlib.suppress(Exception):
        ssl_object = nc._transport._io_writer.get_extra_info("ssl_object")
        return f"{ssl_object.version()}, {ssl_object.cipher()[0]}"
    return "unknown"


# --------------------------------------------------------------------------- the run


async def run(opts: Options, say: Say) -> Report:
    """Start the three servers, measure, stop everything; a failure becomes a skipped row."""
    t0 = time.monotonic()
    report = Report(options=opts, started=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    folder = Path(tempfile.mkdtemp(prefix="tiermem-bench-security-"))
    logging.getLogger("asyncio").addFilter(_quiet_tls_close)
    try:
        await _measure(report, folder, say)
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - one skipped row that says why
        why = f"{type(exc).__name__}: {exc}".strip()[:400]
        report.results = [Result(key=NAME, title="Auth and TLS cost", skipped=f"failed: {why}")]
        announce(say, report.results[0])
        kept = Path(tempfile.mkdtemp(prefix="tiermem-bench-security-logs-"))
        for log in folder.glob("*/nats.log"):
            shutil.copy(log, kept / f"{log.parent.name}-nats.log")
        say(f"the servers' logs are kept in {kept}")
    finally:
        logging.getLogger("asyncio").removeFilter(_quiet_tls_close)
        shutil.rmtree(folder, ignore_errors=True)
        report.facts["load_average_at_end"] = load_average()
        report.duration_s = time.monotonic() - t0
    return report


async def _measure(report: Report, folder: Path, say: Say) -> None:
    o = report.options
    passwords = {name: secrets.token_urlsafe(24) for name in permissions.ROLES}
    users = permissions.nats_users(passwords)
    tls = make_tls(folder / "tls")
    ident = {r: BusAuth(user=r, password=passwords[r]) for r in (WORKER, MEMORY_L1, L2_GATEWAY)}
    with_ca = {r: BusAuth(user=a.user, password=a.password, tls_ca=str(tls.ca)) for r, a in ident.items()}
    started: list[servers.Server] = []
    try:
        # From this thread: die_with_parent ties each server's life to the thread that starts it.
        for kind, extra in (("open", {}), ("locked", {"users": users}),
                            ("tls", {"users": users, "tls": (str(tls.cert), str(tls.key))})):
            started.append(servers.start_nats(folder / kind, die_with_parent=True, **extra))
        say("auth and TLS cost: open, locked and locked + TLS nats-servers on "
            + ", ".join(s.url for s in started))
        anonymous = BusAuth()
        buses = [Bus("open", started[0].url, anonymous, anonymous, anonymous),
                 Bus("locked", started[1].url, *(ident[r] for r in (WORKER, MEMORY_L1, L2_GATEWAY))),
                 Bus("tls", started[2].url, *(with_ca[r] for r in (WORKER, MEMORY_L1, L2_GATEWAY)))]
        bodies = [msgspec.json.encode({"user_id": f"sec-lead-{i:03d}", "op": "recent", "n": N})
                  for i in range(USERS)]
        checks: dict[str, TierCheck] = {}
        async with contextlib.AsyncExitStack() as stack:
            calls = {}
            for b in buses:
                calls.update(await _calls(stack, b, bodies, checks))
            tls_nc = await bus.connect(buses[2].url, buses[2].worker, name="bench-facts")
            stack.push_async_callback(tls_nc.close)
            report.facts = await machine_facts(tls_nc, {})
            report.facts["tls"] = _tls_facts(tls_nc)
            report.facts["tls_certificate"] = "EC P-256, signed by a throwaway CA (openssl CLI)"
            report.facts["anonymous_refused"] = {b.kind: await _refuses_anonymous(b) for b in buses}
            report.facts["openssl"] = subprocess.run(["openssl", "version"], capture_output=True,
                                                     text=True).stdout.strip()
            say(f"  {len(calls)} calls interleaved in blocks of {BLOCK}, {o.samples:,} samples each "
                f"(+{o.warmup} warm-up)")
            out = await baselines.interleaved(calls, o.samples, o.warmup, block=BLOCK)
    finally:
        for server in started:
            server.stop()
    for key, samples in out.items():
        call, kind = key.split("_")
        report.baselines[key] = summarize(samples)
        report.baseline_labels[key] = f"{CALLS[call]}, {KIND_LABELS[kind]}"
    report.results = results(out)
    for r in report.results:
        if r.key.startswith(f"{NAME}_l1_"):
            check, base = checks[r.key.rsplit("_", 1)[1]], checks["open"]
            r.notes.extend(check.notes(o.samples))
            r.targets.append(Target("every reply from l1, here and on the open server",
                                    check.mismatches + base.mismatches == 0,
                                    f"{check.mismatches} + {base.mismatches} mismatches"))
    for r in report.results:
        announce(say, r, "open server")


# --------------------------------------------------------------------------- the report


MEANING = (
    "A ratio is the locked (or locked + TLS) server's figure divided by the open server's, "
    f"for the same call measured in the same minutes (interleaved in blocks of {BLOCK}). 1.00× means "
    "the lock costs nothing measurable. What a locked server adds per message is a lookup of the "
    "subject in the sender's publish allow-list and the receiver's subscribe allow-list (both "
    "cached per connection after the first hit), and for a reply the check that the responder "
    "may still answer that request (`allow_responses`): a few hash lookups, next to the "
    "syscalls, the parsing and the Python on either side that make up a round trip. TLS adds "
    "encrypting and decrypting every message on both hops (client to server to responder and "
    "back: four records per round trip) and larger writes; on loopback that is most of what it "
    "costs, since there is no network latency to hide it. The L1 hit ratio is smaller than the "
    "bare round trip's for the same absolute cost, because the sidecar's own work is in the "
    "denominator. The bootstrap interval in the notes covers sampling noise only: each server, "
    "echo and sidecar is a process of its own, and on a shared 2-core box where the scheduler "
    "puts them, and what else runs (see the load average below), moves a ratio by several "
    "percent from one run to the next: a verdict near 1.05× is worth a second run on a quiet box."
)


def markdown(report: Report) -> str:
    f, o = report.facts, report.options
    lines = [
        "# tiermem: the cost of auth and TLS on the bus",
        "",
        f"{'Quick' if o.quick else 'Full'} run of `python -m bench --only security"
        f"{' --quick' if o.quick else ''}`, started {report.started}, took {report.duration_s:.0f} s. "
        "Three nats-servers started for this step on loopback: open (no authorization), locked (the "
        "users and permissions of `shared.permissions`, as `just up` runs it) and locked + TLS "
        "(server certificate from a throwaway CA, verified by every client). On each, an "
        "agent-worker client calls a bare echo and a real memory-l1 sidecar (both running as the "
        f"memory-l1 role); the six calls are interleaved in blocks of {BLOCK} requests, one in flight.",
        "",
        "## Targets",
        "",
        targets_table(report.results),
    ]
    if report.baselines:
        lines += ["", "## Every call on every server", ""]
        rows = []
        for call in CALLS:
            open_ = report.baselines.get(f"{call}_open")
            for kind in KINDS:
                s = report.baselines.get(f"{call}_{kind}")
                if s is None:
                    continue
                rows.append([CALLS[call], KIND_LABELS[kind], f"{s.n:,}", fmt_us(s.p50), fmt_us(s.p95),
                             fmt_us(s.p99)] + [fmt_ratio(ratio(getattr(s, p), getattr(open_, p)))
                                               for p in ("p50", "p95", "p99")])
        lines.append(markdown_table(
            ["call", "server", "n", "p50", "p95", "p99", "÷ open p50", "÷ open p95", "÷ open p99"], rows,
            align=["l", "l", "r", "r", "r", "r", "r", "r", "r"]))
    lines += ["", "## What the ratios mean", "", MEANING]
    lines += notes_section(report.results)
    lines += ["", "## Machine", ""]
    lines.append(markdown_table(["fact", "value"], [
        ["date (UTC)", f.get("date", "?")],
        ["cores", f.get("cores", "?")],
        ["CPU", f.get("cpu", "?")],
        ["Python", f.get("python", "?")],
        ["nats-server", f.get("nats_server", "?")],
        ["nats-py", f.get("libraries", {}).get("nats-py", "?")],
        ["a client without credentials", "; ".join(
            f"{KIND_LABELS[k]}: {'refused' if refused else 'accepted'}"
            for k, refused in f.get("anonymous_refused", {}).items()) or "?"],
        ["TLS", f"{f.get('tls', '?')}; {f.get('tls_certificate', '?')}; {f.get('openssl', '?')}"],
        ["load average (1/5/15 min)", f"{f.get('load_average_at_start', '?')} at start, "
                                      f"{f.get('load_average_at_end', '?')} at the end"],
        ["git", f.get("git", "?")],
    ], align=["l", "l"]))
    lines.append("")
    return "\n".join(lines)


def write(report: Report, out: Path) -> list[Path]:
    return write_files(out, NAME, markdown=markdown(report), data=to_dict(report))

