"""The lexeme vocabulary for LRC with vocabulary negatives (`config.loss.lrc_negatives="vocab"`).

With in-batch negatives a region is contrasted with the lexemes of the other regions in the batch. With a
vocabulary (RegionCLIP's concept pool, built from the training data instead of a noun list) every region is
classified against every lexeme of the training split. The batch carries `lexeme_id` hashes
(`pipeline.lexeme_id`: equal strings, ignoring case and spacing, give equal ids); `LexemeVocab.index` turns them
into rows of the vocabulary, -1 for padding and for lexemes outside it (those regions then drop out of the loss).

The vocabulary keeps the `max_size` most frequent lexemes seen at least `min_count` times (ties by string, so it
is deterministic), and is saved as JSON next to the run so a resumed run uses the same rows.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
from typing import Iterable

import numpy as np

from harmoclip_jax.data.pipeline import lexeme_id


@dataclasses.dataclass(frozen=True)
class LexemeVocab:
    lexemes: tuple[str, ...]  # row order: most frequent first
    counts: tuple[int, ...]  # occurrences in the split it was built from
    source: str = ""  # "dataset:split", for the record

    def __post_init__(self):
        if len(self.lexemes) != len(self.counts):
            raise ValueError(f"{len(self.lexemes)} lexemes but {len(self.counts)} counts")
        ids = np.array([lexeme_id(x) for x in self.lexemes], np.int64)
        if len(set(ids.tolist())) != len(ids) or np.any(ids < 0):
            raise ValueError("a lexeme vocabulary needs distinct, non-empty lexemes (case and spacing ignored)")
        order = np.argsort(ids, kind="stable")
        object.__setattr__(self, "_sorted_ids", ids[order])
        object.__setattr__(self, "_rows", order.astype(np.int32))

    def __len__(self) -> int:
        return len(self.lexemes)

    def index(self, lexeme_ids: np.ndarray) -> np.ndarray:
        """Vocabulary rows of `lexeme_id` hashes (any shape); -1 for padding (-1) and unknown lexemes."""
        ids = np.asarray(lexeme_ids, np.int64)
        if not len(self):
            return np.full(ids.shape, -1, np.int32)
        pos = np.clip(np.searchsorted(self._sorted_ids, ids), 0, len(self) - 1)
        found = (self._sorted_ids[pos] == ids) & (ids >= 0)
        return np.where(found, self._rows[pos], -1).astype(np.int32)

    def save(self, path: str | os.PathLike) -> None:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"source": self.source, "lexemes": list(self.lexemes), "counts": list(self.counts)},
                                  indent=0))
        os.replace(tmp, path)  # never a half-written vocabulary for a resumed run to read

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LexemeVocab":
        data = json.loads(pathlib.Path(path).read_text())
        return cls(tuple(data["lexemes"]), tuple(int(c) for c in data["counts"]), data.get("source", ""))


def from_lexemes(lexemes: Iterable[str | bytes], max_size: int, min_count: int = 1, source: str = "") -> LexemeVocab:
    """Counts lexemes by identity (`lexeme_id`) and keeps the most frequent; each row is named by the identity's most
    common spelling."""
    if max_size <= 0 or min_count <= 0:
        raise ValueError(f"lexeme vocabulary: max_size={max_size} and min_count={min_count} must be positive")
    counts: collections.Counter = collections.Counter()
    spellings: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for text in lexemes:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        key = lexeme_id(text)
        if key < 0:
            continue
        counts[key] += 1
        spellings[key][" ".join(text.split())] += 1
    named = [(spellings[k].most_common(1)[0][0], n) for k, n in counts.items() if n >= min_count]
    named.sort(key=lambda item: (-item[1], item[0]))
    named = named[:max_size]
    return LexemeVocab(tuple(x for x, _ in named), tuple(n for _, n in named), source)


def build(dataset: str, split: str, data_dir: str | None, max_size: int, min_count: int = 1,
          progress: bool = False) -> LexemeVocab:
    """The vocabulary of the region lexemes in `dataset`'s `split` (images are not decoded)."""
    from harmoclip_jax.data import pipeline

    source = pipeline.open_source(dataset, split, data_dir)
    indices = range(len(source))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"lexeme vocabulary of {dataset}:{split}", unit="image", mininterval=2)

    def lexemes():
        for i in indices:
            regions = source[i].get("regions") or {}
            yield from regions.get("lexeme", [])

    vocab = from_lexemes(lexemes(), max_size, min_count, source=f"{dataset}:{split}")
    if not len(vocab):
        raise ValueError(f"{dataset}:{split} has no region lexemes (min_count={min_count}); "
                         "config.loss.lrc_negatives='vocab' needs them (prepare the dataset with lexemes, or use 'batch')")
    return vocab


def load_or_build(path: str | os.PathLike, dataset: str, split: str, data_dir: str | None, max_size: int,
                  min_count: int = 1, write: bool = True) -> LexemeVocab:
    """The saved vocabulary at `path` if there is one (a resumed run), else a new one (saved when `write`)."""
    path = pathlib.Path(path)
    if path.exists():
        return LexemeVocab.load(path)
    vocab = build(dataset, split, data_dir, max_size, min_count, progress=True)
    if write:
        vocab.save(path)
    return vocab
