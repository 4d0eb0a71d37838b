"""Text embeddings of a FROZEN text tower, computed once per distinct text and kept on disk.

With the text tower frozen, a region caption or lexeme always maps to the same embedding, and datasets repeat
them a lot (scenes: a few hundred region captions; COCO: every caption is seen once per epoch). The trainer looks
every token row of a batch up here (host side), encodes only the rows never seen before (on a local device, in
fixed-size chunks so one compilation serves all), and feeds embeddings instead of tokens to the train step.

The cache file is keyed by a fingerprint of the text-tower parameters, so a cache made with other weights is
never used; it is saved with every checkpoint (`save()`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


def fingerprint(arrays: dict[str, np.ndarray]) -> str:
    """A short hash of named arrays (the text tower's parameters)."""
    digest = hashlib.blake2b(digest_size=8)
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(name.encode())
        digest.update(str(value.dtype).encode())
        digest.update(np.asarray(value.shape, np.int64).tobytes())
        digest.update(value.tobytes())
    return digest.hexdigest()


class TextEmbeddingCache:
    """Maps token rows (L,) int32 -> embeddings (E,) float32, encoding unseen rows with `encode`.

    `encode(tokens (chunk, L) int32) -> (chunk, E)` must be deterministic (the frozen tower).
    """

    def __init__(self, encode: Callable[[np.ndarray], np.ndarray], path: str | os.PathLike | None, *,
                 chunk: int = 256):
        self.encode = encode
        self.path = pathlib.Path(path) if path else None
        self.chunk = chunk
        self._index: dict[bytes, int] = {}
        self._rows: list[np.ndarray] = []
        self._saved = 0
        self.hits = 0
        self.misses = 0
        if self.path is not None and self.path.exists():
            with np.load(self.path) as data:
                tokens, embeds = data["tokens"], data["embeddings"]
                lengths = data["lengths"] if "lengths" in data else np.full(len(tokens), tokens.shape[-1])
            for row, length, embed in zip(tokens, lengths, embeds):
                self._index[row[:length].tobytes()] = len(self._rows)
                self._rows.append(embed)
            self._saved = len(self._rows)
            log.info("text cache: loaded %d embeddings from %s", len(self._rows), self.path)

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, tokens: np.ndarray) -> np.ndarray:
        """(..., L) int32 -> (..., E) float32."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        flat = tokens.reshape(-1, tokens.shape[-1])
        keys = [row.tobytes() for row in flat]
        missing = list(dict.fromkeys(k for k in keys if k not in self._index))
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        for start in range(0, len(missing), self.chunk):
            part = missing[start:start + self.chunk]
            rows = np.stack([np.frombuffer(k, np.int32) for k in part])
            padded = np.concatenate([rows, np.repeat(rows[:1], self.chunk - len(rows), axis=0)])
            embeds = np.asarray(self.encode(padded), np.float32)[: len(part)]
            for key, embed in zip(part, embeds):
                self._index[key] = len(self._rows)
                self._rows.append(embed)
        out = np.stack([self._rows[self._index[k]] for k in keys])
        return out.reshape(*tokens.shape[:-1], out.shape[-1])

    def save(self) -> None:
        """Writes the cache (atomically) if it has grown since the last save."""
        if self.path is None or len(self._rows) == self._saved:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Rows of different lengths (captions; region texts cut to config.region.text_length) share one file:
        # zero-padded to the longest, with each row's own length.
        rows = [np.frombuffer(k, np.int32) for k in self._index]
        lengths = np.array([len(r) for r in rows], np.int32)
        tokens = np.zeros((len(rows), lengths.max()), np.int32)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = row
        embeds = np.stack(self._rows)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, tokens=tokens, lengths=lengths, embeddings=embeds)
        os.replace(tmp, self.path)
        self._saved = len(self._rows)
