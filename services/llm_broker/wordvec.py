"""Static word vectors for the guard's word alignment, from wordllama's token table.

Why: a sentence cosine averages a substitution away ("teachers" vs "priests"
moves a 20-word mean a little); comparing each content word with its best
match in the other text does not. wordllama is a core dependency and its
table is a plain (32000, 256) array, so a word's vector is the sum of its
tokens' rows: no model run, a few µs a new word, cached. The table is the same
whichever embedder the broker uses for the cosine: the guard's alignment does
not depend on it.

Loaded once, on first use (~0.3 s); `load()` lets a service pay that at start.
Without the weights (a broken install) `vectors` returns None and the guard
aligns by exact words only, which can only lower its score (stricter).
"""

from __future__ import annotations

import threading
import warnings
from functools import lru_cache

import numpy as np

DIM = 256
_SPACE_TOKEN = 29871  # the Llama tokenizer's lone "▁" piece: carries nothing
_lock = threading.Lock()
_state: dict[str, object] = {}


def load() -> bool:
    """Load the tokenizer and token table if not yet tried; True if usable."""
    if "table" not in _state:
        with _lock:
            if "table" not in _state:
                try:
                    from shared.embeddings.local import load_wordllama

                    inference = load_wordllama(DIM)
                    tokenizer = inference.tokenizer
                    tokenizer.no_padding()
                    tokenizer.no_truncation()
                    _state["tokenizer"] = tokenizer
                    _state["table"] = np.ascontiguousarray(inference.embedding, dtype=np.float32)
                except Exception as exc:  # noqa: BLE001 - any failure: align by exact words
                    warnings.warn(f"guard: no wordllama token table ({exc}); aligning by exact "
                                  "words only", RuntimeWarning, stacklevel=2)
                    _state["table"] = None
    return _state["table"] is not None


_words: dict[str, np.ndarray] = {}  # word -> unit vector
MAX_WORDS = 16384  # ~16 MB; when full the cache starts over (a rare, cheap refill)


def _add(words: list[str]) -> None:
    """Look up new words: one gather of the table for all of them."""
    table = _state["table"]
    encode = _state["tokenizer"].encode  # one call a word: encode_batch's thread pool costs more here
    ids = [[i for i in encode(w, add_special_tokens=False).ids if i != _SPACE_TOKEN] for w in words]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    rows = table[np.clip(np.fromiter((i for x in ids for i in x), dtype=np.int64), 0, len(table) - 1)]
    sums = np.zeros((len(words), DIM), np.float32)
    has = lengths > 0
    if has.any():
        starts = np.r_[0, np.cumsum(lengths)[:-1]][has]
        sums[has] = np.add.reduceat(rows, starts, axis=0)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    sums /= np.where(norms > 0, norms, 1.0)
    _words.update(zip(words, sums))


@lru_cache(maxsize=2048)  # a text's matrix: one query meets several candidates
def vectors(words: tuple[str, ...]) -> np.ndarray | None:
    """Unit vectors, one row per word ((0, DIM) for none); None without the table."""
    if not load():
        return None
    if not words:
        return np.zeros((0, DIM), np.float32)
    new = [w for w in dict.fromkeys(words) if w not in _words]
    if new and len(_words) + len(new) > MAX_WORDS:
        _words.clear()
        new = list(dict.fromkeys(words))
    if new:
        _add(new)
    out = np.stack([_words[w] for w in words])
    out.flags.writeable = False
    return out
