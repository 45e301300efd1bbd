"""An app written against the `anthropic` SDK, unchanged, pointed at tiermem's llm-gateway.

    ANTHROPIC_BASE_URL=$TIERMEM_ANTHROPIC_BASE_URL python examples/anthropic_sdk_app.py [QUESTION]

(`just example [QUESTION]` does this against the stack `just up` started.)
Nothing in the code knows about tiermem: `anthropic.Anthropic()` reads
`ANTHROPIC_BASE_URL` and `ANTHROPIC_API_KEY` from the environment as it
always does. The app asks the same question twice with streaming and prints
the text as it arrives; the only tiermem-specific line is the print of the
`tiermem-cache` response header, to show what the cache did: `miss` the
first time (the answer streams through from the model and is stored), `hit`
the second (the stored event stream is replayed). A question the stack
has already answered shows `hit` both times.
"""

from __future__ import annotations

import sys

import anthropic

MODEL = "claude-haiku-4-5"
QUESTION = "In two sentences: what should I check before buying a house with an old roof?"


def ask(client: anthropic.Anthropic, question: str) -> tuple[str, str]:
    """Stream one answer to stdout; (the `tiermem-cache` header, the whole text)."""
    with client.messages.stream(model=MODEL, max_tokens=300,
                                messages=[{"role": "user", "content": question}]) as stream:
        cache = stream.response.headers.get("tiermem-cache", "absent (not a tiermem gateway?)")
        print(f"tiermem-cache: {cache}", flush=True)
        for text in stream.text_stream:
            print(text, end="", flush=True)
        print("\n", flush=True)
        return cache, stream.get_final_text()


def main(argv: list[str]) -> int:
    question = " ".join(argv) or QUESTION
    client = anthropic.Anthropic()  # ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY from the environment
    print(f"asking twice: {question}\n", flush=True)
    answers = []
    for n in (1, 2):
        print(f"--- ask {n}", flush=True)
        answers.append(ask(client, question))
    same = answers[0][1] == answers[1][1]
    print(f"caches: {answers[0][0]} then {answers[1][0]}; same text both times: {'yes' if same else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
