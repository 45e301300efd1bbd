"""Embedders behind an HTTP API: Voyage AI and any OpenAI-compatible
`/v1/embeddings` endpoint (OpenAI, Azure-style gateways, vLLM, Ollama,
llama.cpp server, LiteLLM, ...).

Both speak the same shape:

    POST {base_url}/embeddings   Authorization: Bearer <key>
    {"model": "...", "input": ["text", ...], ...}
    -> {"data": [{"index": 0, "embedding": [floats]}, ...], "model": ..., "usage": ...}

Requests are split into batches (by count and by characters), sent with a
few in flight, retried on 408/429/5xx/network errors with backoff (honouring
Retry-After), and the replies checked (count, index, dimension) before they
are normalised. Errors map to `EmbeddingRequestError` (4xx: fix the
settings) or `EmbeddingServiceError` (retryable); the API key never appears
in a message or repr.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any, Sequence

import httpx
import numpy as np

from shared.embeddings import (
    EmbeddingError,
    EmbeddingRequestError,
    EmbeddingServiceError,
    l2_normalize,
)

#: default output sizes of well-known models (others need EMBEDDER_DIM)
KNOWN_DIMS: dict[str, int] = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
    "voyage-3.5": 1024,
    "voyage-3.5-lite": 1024,
    "voyage-3-large": 1024,
    "voyage-3": 1024,
    "voyage-3-lite": 512,
    "voyage-code-3": 1024,
    "voyage-finance-2": 1024,
    "voyage-law-2": 1024,
    "voyage-multilingual-2": 1024,
    "voyage-4": 1024,
    "voyage-4-lite": 1024,
    "voyage-4-large": 1024,
}

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class _HTTPEmbedder:
    provider = "http"
    #: most texts per request (Voyage allows 1000, OpenAI 2048)
    max_batch = 128
    #: most characters per request (keeps well under the token limits)
    max_batch_chars = 200_000
    #: each text is cut to this many characters (None: send whole; the
    #: provider truncates)
    max_chars: int | None = None

    def __init__(
        self,
        *,
        model: str,
        base_url: str,
        api_key: str = "",
        dimensions: int | None = None,
        timeout: float = 30.0,
        max_retries: int = 2,
        concurrency: int = 4,
        batch_size: int | None = None,
        max_batch_chars: int | None = None,
        max_chars: int | None = None,
        model_id: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff_s: float = 0.25,
    ) -> None:
        if not model:
            raise ValueError(f"{self.provider}: EMBEDDER_MODEL is empty")
        dim = dimensions or KNOWN_DIMS.get(model)
        if not dim:
            raise ValueError(
                f"{self.provider}: output size of model {model!r} is unknown; set EMBEDDER_DIM"
            )
        self.model = model
        self.dim = int(dim)
        self.dimensions = dimensions  # sent to the API only when configured
        # the vector space: same model and size -> comparable vectors
        self.model_id = model_id or f"{self.provider}:{model}:{self.dim}"
        self.url = base_url.rstrip("/") + "/embeddings"
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        if batch_size:
            self.max_batch = batch_size
        if max_batch_chars:
            self.max_batch_chars = max_batch_chars
        if max_chars:
            self.max_chars = max_chars
        self._limit = asyncio.Semaphore(max(1, concurrency))
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_id={self.model_id!r}, url={self.url!r})"

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- provider specifics -------------------------------------------------

    def _payload(self, batch: list[str], input_type: str | None) -> dict[str, Any]:
        raise NotImplementedError

    # -- the rest is shared -------------------------------------------------

    async def embed(self, texts: Sequence[str], *, input_type: str | None = None) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo = [i for i, t in enumerate(texts) if t and not t.isspace()]
        if not todo:
            return out
        if self.max_chars:
            cut = self.max_chars
            texts = [t if len(t) <= cut else t[:cut] for t in texts]
        batches: list[list[int]] = []
        current: list[int] = []
        chars = 0
        for i in todo:
            size = len(texts[i])
            if current and (len(current) >= self.max_batch or chars + size > self.max_batch_chars):
                batches.append(current)
                current, chars = [], 0
            current.append(i)
            chars += size
        batches.append(current)
        if len(batches) == 1:
            results = [await self._post([texts[i] for i in batches[0]], input_type)]
        else:
            tasks = [asyncio.ensure_future(self._post([texts[i] for i in b], input_type)) for b in batches]
            try:
                results = await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:  # one failed: do not leave the others running
                    task.cancel()
                raise
        for idx, vectors in zip(batches, results):
            out[idx] = vectors
        return l2_normalize(out)

    async def _post(self, batch: list[str], input_type: str | None) -> np.ndarray:
        payload = self._payload(batch, input_type)
        attempt = 0
        while True:
            try:
                async with self._limit:
                    response = await self._client.post(self.url, json=payload)
                if response.status_code == 200:
                    return self._parse(response, len(batch))
                error: EmbeddingError = _status_error(self.provider, response)
                retry_after = _retry_after(response)
            except httpx.TimeoutException as exc:
                error, retry_after = EmbeddingServiceError(f"{self.provider}: timed out: {exc!r}"), None
            except httpx.TransportError as exc:
                error, retry_after = EmbeddingServiceError(f"{self.provider}: {exc!r}"), None
            if not error.retryable or attempt >= self.max_retries:
                raise error
            delay = retry_after if retry_after is not None else self.backoff_s * 2**attempt
            await asyncio.sleep(min(delay, 10.0) * (0.8 + 0.4 * random.random()))
            attempt += 1

    def _parse(self, response: httpx.Response, n: int) -> np.ndarray:
        try:
            data = response.json()["data"]
            if len(data) != n:
                raise ValueError(f"{len(data)} embeddings for {n} inputs")
            data = sorted(data, key=lambda d: d.get("index", 0))
            vectors = np.array([d["embedding"] for d in data], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbeddingServiceError(f"{self.provider}: malformed reply: {exc}", status=200) from None
        if vectors.shape != (n, self.dim):
            raise EmbeddingRequestError(
                f"{self.provider}: got vectors of shape {vectors.shape[1:]}, "
                f"expected {self.dim}: check EMBEDDER_DIM for model {self.model!r}",
                status=200,
            )
        return vectors


def _status_error(provider: str, response: httpx.Response) -> EmbeddingError:
    status = response.status_code
    detail = _error_detail(response)
    message = f"{provider}: HTTP {status}: {detail}" if detail else f"{provider}: HTTP {status}"
    if status in RETRYABLE_STATUS or status >= 500:
        return EmbeddingServiceError(message, status=status)
    return EmbeddingRequestError(message, status=status)


def _error_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300].strip()
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body))
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)[:300]
    return str(body)[:300]


def _retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None


class OpenAIEmbedder(_HTTPEmbedder):
    """Any OpenAI-compatible `POST {base_url}/embeddings`.

    `dimensions` (EMBEDDER_DIM) is sent only when set, for models that can
    shorten their output (text-embedding-3-*); otherwise it just tells the
    size of an unknown model. Texts are cut to 24,000 characters (~6k
    tokens; OpenAI rejects inputs over 8,192 tokens).
    """

    provider = "openai"
    max_batch = 256
    max_chars = 24_000

    def _payload(self, batch: list[str], input_type: str | None) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": self.model, "input": batch, "encoding_format": "float"}
        if self.dimensions:
            payload["dimensions"] = self.dimensions
        return payload


class VoyageEmbedder(_HTTPEmbedder):
    """Voyage AI `POST https://api.voyageai.com/v1/embeddings`.

    Sends `input_type` ("query" for search queries, "document" for stored
    messages: Voyage prepends a retrieval prompt) and `truncation: true`
    (over-long texts are cut by the API instead of failing). `dimensions`
    becomes `output_dimension` (256/512/1024/2048 on voyage-3.5 and later).
    """

    provider = "voyage"
    max_batch = 128

    def __init__(self, *, api_key: str = "", **kwargs: Any) -> None:
        if not api_key:
            raise ValueError("voyage: no API key; set VOYAGE_API_KEY or EMBEDDER_API_KEY")
        super().__init__(api_key=api_key, **kwargs)

    def _payload(self, batch: list[str], input_type: str | None) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": self.model, "input": batch, "truncation": True}
        if input_type in ("query", "document"):
            payload["input_type"] = input_type
        if self.dimensions:
            payload["output_dimension"] = self.dimensions
        return payload
