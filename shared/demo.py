"""`python -m shared.demo`: a short scripted session against a running stack.

What it shows, with the latency of every call:
  two leads talk to a sales bot (`memory.append`), the first read of a lead
  is filled from L2 and the next one is an L1 hit, a read right after an
  append with `min_seq` includes that append (read-your-writes), a search by
  a paraphrase finds the right message, a re-sent `msg_id` is a duplicate
  with the original `seq`, and `memory.forget` removes a lead everywhere.

It finds the stack through `shared.settings` (the environment, then
`.tiermem/stack.env` written by `just up`) and exits with code 2 and a clear
message when the stack is not up. Lead ids are unique per run, so it can be
run again and again against the same stack.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from dataclasses import dataclass

import msgspec

from shared import subjects
from shared.service import ERROR_CODE_HEADER, ERROR_HEADER
from shared.settings import Settings

NEEDED = ("memory-l1", "l2-gateway")
OPTIONAL = ("l3-semantic-indexer",)  # without it, the search step is skipped


class StackDown(SystemExit):
    def __init__(self, why: str) -> None:
        super().__init__(f"demo: the stack is not up: {why}\n"
                         "start it with `just up` (python -m shared.stack up), or set NATS_URL")


@dataclass
class Step:
    what: str
    subject: str
    result: str
    tier: str = ""
    ms: float | None = None
    ok: bool = True


class Session:
    def __init__(self, nc) -> None:
        self.nc = nc
        self.steps: list[Step] = []

    async def call(self, subject: str, body: dict, timeout: float = 10.0) -> tuple[int, dict, float]:
        t0 = time.perf_counter()
        msg = await self.nc.request(subject, msgspec.json.encode(body), timeout=timeout)
        ms = (time.perf_counter() - t0) * 1000
        headers = msg.headers or {}
        code = int(headers.get(ERROR_CODE_HEADER, 200))
        reply = msgspec.json.decode(msg.data) if msg.data else {}
        if code != 200:
            reply = {"error": headers.get(ERROR_HEADER) or reply.get("error", {}).get("message", "")}
        return code, reply, ms

    def add(self, step: Step) -> None:
        self.steps.append(step)
        mark = "" if step.ok else "  <-- unexpected"
        ms = f"{step.ms:7.2f} ms" if step.ms is not None else "       -  "
        print(f"  {ms}  {step.what}: {step.result}{mark}", flush=True)


def _err(code: int, reply: dict) -> str:
    return f"error {code}: {reply.get('error', '')}"


def _texts(reply: dict) -> list[str]:
    return [m["text"] for m in reply.get("messages", [])]


async def _quiet(_exc: Exception) -> None:
    """nats-py prints a traceback per failed connect by default; `StackDown` says it once."""


async def _ping(nc, name: str) -> bool:
    try:
        msg = await nc.request(f"$SRV.PING.{name}", b"", timeout=1.0)
        return json.loads(msg.data).get("name") == name
    except Exception:  # noqa: BLE001 - no answer is the answer
        return False


async def run() -> int:
    import nats

    try:
        from shared.stack import load_env  # honours TIERMEM_STATE_DIR

        settings = Settings.from_env({**load_env(), **os.environ})
    except SystemExit as exc:
        raise StackDown(str(exc)) from None
    try:
        nc = await nats.connect(settings.nats_url, name="tiermem-demo", connect_timeout=2,
                                allow_reconnect=False, max_reconnect_attempts=1, error_cb=_quiet)
    except Exception as exc:  # noqa: BLE001
        raise StackDown(f"cannot reach NATS at {settings.nats_url} ({type(exc).__name__})") from None
    try:
        up = {name for name in NEEDED + OPTIONAL if await _ping(nc, name)}
        missing = [n for n in NEEDED if n not in up]
        if missing:
            raise StackDown(f"NATS answers at {settings.nats_url} but these services do not: {', '.join(missing)}")
        return await script(Session(nc), has_l3="l3-semantic-indexer" in up)
    finally:
        await nc.close()


async def script(s: Session, *, has_l3: bool) -> int:
    run = secrets.token_hex(3)
    maria, tom = f"lead-maria-{run}", f"+1555{int(run, 16) % 10_000_000:07d}"
    bot = "sales-1"
    conversation = [
        (maria, "user", "Hi, is the 3-bed on Main St still available?"),
        (maria, "assistant", "Yes it is! Would you like to see it this weekend?"),
        (tom, "user", "Do you have any condos downtown with parking?"),
        (maria, "user", "Maybe Saturday. Our budget is around $450k, is there room to negotiate?"),
        (tom, "assistant", "Two listings on 5th Ave come with a garage spot. Want the details?"),
        (maria, "assistant", "The seller is open to offers. I can book 10am Saturday."),
        (tom, "user", "Please send them, and the HOA fees too."),
    ]
    print(f"\ntiermem demo: leads {maria} and {tom} talk to bot {bot}\n", flush=True)
    seqs: dict[str, int] = {}
    first_id = ""
    for i, (user, role, text) in enumerate(conversation):
        msg_id = f"demo-{run}-{i}"
        first_id = first_id or msg_id
        code, reply, ms = await s.call(subjects.MEMORY_APPEND, {
            "user_id": user, "bot_id": bot, "role": role, "text": text, "msg_id": msg_id})
        ok = code == 200 and not reply.get("duplicate")
        seqs[user] = reply.get("seq", seqs.get(user, 0))
        s.add(Step(f"append {role} message of {user}", subjects.MEMORY_APPEND,
                   f"seq {reply.get('seq')}" if code == 200 else _err(code, reply),
                   ms=ms, ok=ok))

    for attempt in ("first read", "second read"):
        code, reply, ms = await s.call(subjects.MEMORY_GET, {"user_id": maria, "op": "recent", "n": 10})
        s.add(Step(f"recent n=10 of {maria}, {attempt}", subjects.MEMORY_GET,
                   f"{len(reply.get('messages', []))} messages" if code == 200 else _err(code, reply),
                   tier=reply.get("tier", ""), ms=ms, ok=code == 200))

    text = "Actually, could we make it Sunday afternoon instead?"
    code, reply, ms = await s.call(subjects.MEMORY_APPEND, {
        "user_id": maria, "bot_id": bot, "role": "user", "text": text, "msg_id": f"demo-{run}-late"})
    new_seq = reply.get("seq", 0)
    s.add(Step(f"append a new message of {maria}", subjects.MEMORY_APPEND,
               f"seq {new_seq}" if code == 200 else _err(code, reply), ms=ms, ok=code == 200))
    code, reply, ms = await s.call(subjects.MEMORY_GET, {"user_id": maria, "op": "recent", "n": 3,
                                                         "min_seq": new_seq})
    has_it = text in _texts(reply)
    s.add(Step(f"recent n=3 with min_seq={new_seq}, right after", subjects.MEMORY_GET,
               ("includes the new message" if has_it else "MISSING the new message") if code == 200
               else _err(code, reply), tier=reply.get("tier", ""), ms=ms, ok=code == 200 and has_it))

    query = "what price range did they say they can afford"
    if has_l3:
        code, reply, ms = await s.call(subjects.MEMORY_GET, {"user_id": maria, "op": "search", "query": query,
                                                             "k": 2, "min_seq": new_seq})
        top = _texts(reply)[:1]
        found = bool(top) and "$450k" in top[0]
        s.add(Step(f"search {query!r}, min_seq={new_seq}", subjects.MEMORY_GET,
                   (f"top: {top[0]!r} (score {reply['messages'][0].get('score'):.2f})" if top else "nothing found")
                   if code == 200 else _err(code, reply), tier=reply.get("tier", ""), ms=ms,
                   ok=code == 200 and found))
    else:
        s.add(Step(f"search {query!r}", subjects.MEMORY_GET, "skipped: l3-semantic-indexer is not running"))

    code, reply, ms = await s.call(subjects.MEMORY_APPEND, {
        "user_id": maria, "bot_id": bot, "role": "user", "text": conversation[0][2], "msg_id": first_id})
    dup = code == 200 and reply.get("duplicate") is True
    s.add(Step(f"re-send msg_id {first_id}", subjects.MEMORY_APPEND,
               f"duplicate={reply.get('duplicate')}, seq {reply.get('seq')} (the original)" if code == 200
               else _err(code, reply), ms=ms, ok=dup))

    # The llm-broker: the same intent question twice, then a rewording (exact, then semantic).
    for question in ("Is the Main St house still available?", "Is the Main St house still available?",
                     "is the main st house still available"):
        code, reply, ms = await s.call(subjects.LLM_COMPLETE, {
            "task": "intent", "user_id": maria, "model": "claude-haiku-4-5",
            "system": "Classify the lead's intent. Answer with one label.", "max_tokens": 50,
            "messages": [{"role": "user", "content": question}],
            "cache": {"volatility": "lead_intent", "mode": "semantic", "scope": "user"}}, timeout=30)
        cache = reply.get("cache", {})
        s.add(Step(f"llm.complete intent {question!r}", subjects.LLM_COMPLETE,
                   f"{reply.get('text')!r}, cache {cache.get('status')}"
                   f"{'/' + cache['match'] if cache.get('match') else ''}, cost ${reply.get('cost_usd'):.6f},"
                   f" saved ${reply.get('saved_usd'):.6f}" if code == 200 else _err(code, reply),
                   ms=ms, ok=code == 200))

    code, reply, ms = await s.call(subjects.MEMORY_FORGET, {"user_id": tom})
    s.add(Step(f"forget {tom}", subjects.MEMORY_FORGET,
               f"deleted {reply.get('deleted')}" if code == 200 else _err(code, reply),
               ms=ms, ok=code == 200))
    code, reply, ms = await s.call(subjects.MEMORY_GET, {"user_id": tom, "op": "recent", "n": 10})
    gone = code == 200 and not reply.get("messages")
    s.add(Step(f"recent n=10 of {tom} after forget", subjects.MEMORY_GET,
               f"{len(reply.get('messages', []))} messages" if code == 200 else _err(code, reply),
               tier=reply.get("tier", ""), ms=ms, ok=gone))

    _table(s.steps)
    bad = [st for st in s.steps if not st.ok]
    if bad:
        print(f"\n{len(bad)} step(s) did not go as expected: " + "; ".join(st.what for st in bad))
        return 1
    print("\nevery step went as expected")
    return 0


def _table(steps: list[Step]) -> None:
    rows = [("#", "step", "subject", "tier", "latency", "result")]
    for i, st in enumerate(steps, 1):
        rows.append((str(i), st.what, st.subject, st.tier or "-",
                     f"{st.ms:.2f} ms" if st.ms is not None else "-",
                     st.result + ("" if st.ok else "  (unexpected)")))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    print()
    for j, r in enumerate(rows):
        print("  ".join(v.rjust(w) if c in (0, 4) else v.ljust(w) for c, (v, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))


def main() -> int:
    import uvloop

    try:
        return uvloop.run(run())
    except StackDown as exc:
        print(exc.code, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
