"""grain input pipelines: TFDS ArrayRecord records (`features.py` schema) -> fixed-shape numpy batches.

Train (`make_train_iterator`): one global order for every process count. The whole split is shuffled per epoch
(seeded) and repeated; position i of that stream is one example (per-example transform). Global batch k is the
examples at positions [k*B, (k+1)*B) (B = per-process batch x process count) and process p of P takes the rows
[p*B/P, (p+1)*B/P) of it. The iterator's state is one number, the global position of the next batch
(`{"position": i}`, the same on every process), so a run written by N processes (or workers) resumes on M
continuing the same global stream; `position=` starts a new iterator there in O(1). One batch holds

    image        (B, S, S, 3) float32   squashed to S x S, normalised with the model's `image_mean`/`image_std`
                                        (uint8 raw pixels with `image_dtype="uint8"`: the device normalises them;
                                        (B, C, C, 3) uint8 pictures on a canvas with `resize_canvas` = C)
    image_hw     (B, 2) int32           only with `resize_canvas`: each picture's height and width on its canvas
    text         (B, 77) int32          one global caption, drawn per (seed, epoch, record)
    boxes        (B, T, 4) float32      xyxy in pixels of the S x S image; zeros where padded
    box_mask     (B, T) bool            True for real regions (a random subset of at most T)
    region_text  (B, T, 77) int32       region captions (zeros where padded)
    lexeme       (B, T, 77) int32       region lexemes (zeros where padded)
    lexeme_id    (B, T) int32           `lexeme_id(lexeme)`: equal strings -> equal ids; -1 where none
    lexeme_span  (B, T, 2) int32        only with `lexeme_spans` set (token-level LRC): [start, end) of the lexeme's
                                        tokens in that row of `region_text` ("region_text") or in `text` ("text");
                                        -1 where the lexeme is not found there or the region is padded
    label        (B, T) int32           class index, -1 where none
    index        (B,) int32             record index in the split
    num_bad_records (B,) int32          bad records repaired or skipped to produce each example (diagnostics)

Eval (`make_eval_iterator`): every record of the process's shard exactly once, in order, the last batch padded;
all processes yield the same number of batches (collectives stay in step). One batch holds `image`,
`captions (B, K, 77)` with `caption_mask (B, K)` (the first K captions; K=5 as in COCO/Flickr retrieval),
`boxes`/`box_mask`/`label` with all regions (at most `eval_max_regions`), `mask (B,)` (False on padding) and
`index (B,)` (-1 on padding). Two flags that evaluators set through their eval data config (so other evals pay
nothing; they are not fields of `default_data_config`, and an absent one takes its default):
`eval_segmentation=True` (default False) adds `segmentation (B, S, S) uint8`, the record's class mask squashed to
S x S like the image but with NEAREST resampling, `features.SEGMENTATION_IGNORE` (255) where no class applies, where
the record has no mask and on padding; `eval_regions=False` (default True) leaves the regions out (boxes zero,
`box_mask` False, `label` -1, not checked, no `eval_max_regions` limit).

The train iterator (`TrainIterator`) has `get_state()` / `set_state()` (JSON: `{"position": i}`); a restored
iterator continues with exactly the batches the original would have produced. Call `close()` when done
(multiprocess workers; a process killed without cleanup, kill -9, loses its workers within a second too:
`_exit_with_parent`). The eval iterators are grain `DatasetIterator`s.

Bad records: train repairs what it can (drops boxes that are non-finite, outside the image beyond float rounding or
of zero area, and empty captions) and skips what it cannot (undecodable image, no usable caption), logs each, and
raises `BadRecordsError` once more than `max_bad_fraction` of the records read (after `bad_check_after` records)
were bad (counted per process since the iterator was built). How a skipped record leaves the stream: with one
process and no workers it is dropped and the later examples move up (the stream is bit for bit the one of earlier
versions; the position counts the records read); with several processes or with workers it is replaced by the next
usable record in the global order (`ReplaceBadRecords`), which every process computes alone, so the global
batches are the same for any process or worker count. With clean data the two agree; with bad records a resume
between one process without workers and any other setup continues from the right position but under the other
rule. Eval raises `BadRecordError` naming the record at the first problem.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import math
import os
import threading
import time
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np
from PIL import Image

from harmoclip_jax.data import registry
from harmoclip_jax.data.features import SEGMENTATION_IGNORE, no_segmentation
from harmoclip_jax.data.images import decode_image, decode_to_canvas
from harmoclip_jax.models.normalization import OPENAI_CLIP
from harmoclip_jax.ops import boxes as box_ops

log = logging.getLogger(__name__)

# Record features the train transform never reads: left undecoded in the train source.
TRAIN_UNREAD_FEATURES = ("segmentation",)
# Boxes may overshoot [0, 1] by float rounding; beyond this they are broken.
_BOX_TOLERANCE = 1e-3
# Why a box is dropped (train) or rejected (eval), by `ops.boxes.box_faults` code.
_BOX_PROBLEMS = {
    box_ops.NON_FINITE: "has a non-finite coordinate",
    box_ops.EMPTY: "has zero or negative area",
    box_ops.OUTSIDE: "outside the image (normalised xyxy)",
}


class BadRecordError(ValueError):
    """A record that an eval pipeline cannot use (eval never silently drops or repairs records)."""


class BadRecordsError(RuntimeError):
    """Too many bad records in a training stream."""


def default_data_config() -> ml_collections.ConfigDict:
    """The data section of an experiment config (see module docstring for the batch layout)."""
    config = ml_collections.ConfigDict()
    config.dataset = "scenes/default"  # TFDS name[/config]; scenes is generated on first use
    config.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data dir; None = TFDS default
    config.train_split = "train"
    config.eval_split = "val"
    # In experiments the model decides these five (`config_lib.data_config`); here the defaults of OpenAI CLIP.
    config.image_size = 224  # S: images are squashed to S x S (as FineCLIP)
    config.context_length = 77
    config.image_mean, config.image_std = OPENAI_CLIP  # of [0, 1] RGB pixels
    config.tokenizer = "clip"  # a harmoclip_jax.tokenizer.TOKENIZERS name
    # Host batches' images: "float32" normalised on the host, or "uint8" raw pixels normalised on the device (4x
    # less to make, batch and transfer; what an accelerator's input rate needs). The same numbers either way.
    config.image_dtype = "float32"
    # 0: training images are squashed to S x S on the host. C > 0 (with image_dtype "uint8"): they leave as the
    # JPEG-draft-decoded picture on a C x C canvas plus `image_hw`, and the train step squashes them on the device
    # (`ops/resize.py`, PIL's bicubic; the host's most expensive step after the decode). C must hold the drafted
    # pictures (larger ones are squashed on the host; a larger canvas costs host time to fill and batch): 320 for
    # 640x480 JPEGs at S = 224 (drafted to 320x240), 640 for any COCO image.
    config.resize_canvas = 0
    config.max_regions = 8  # T: regions per training image (random subset, padded with box_mask)
    # Token-level LRC (`config_lib.data_config` sets it from config.loss.lrc_text / lrc_token_source): "" no spans,
    # "region_text" / "text": emit `lexeme_span`, the lexeme's token positions in that batch key's rows.
    config.lexeme_spans = ""
    config.eval_max_regions = 16  # regions per eval image; a record with more is an error, never truncated
    config.eval_captions = 5  # K: captions per eval image (COCO/Flickr: 5)
    config.batch_size = 32  # per process
    config.eval_batch_size = 32  # per process
    config.num_epochs = ml_collections.config_dict.placeholder(int)  # None = repeat forever
    config.num_workers = 0  # grain multiprocess workers (0 = in the main process)
    config.worker_buffer_size = 2  # batches each worker prepares ahead
    config.read_threads = 2  # threads per process that run the per-example transform
    config.read_buffer_size = 64  # examples prefetched by those threads
    config.seed = 0
    config.max_bad_fraction = 0.01  # train stops once more than this fraction of records read was bad
    config.bad_check_after = 100  # ... counted after at least this many records
    return config


# ------------------------------------------------------------------------------------------------ helpers


def lexeme_id(text: str | bytes) -> int:
    """A stable non-negative 31-bit id of a lexeme (case and surrounding space ignored); -1 for ''.

    A hash rather than a dataset table, so ids agree across datasets, processes and runs.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    text = " ".join(text.lower().split())
    if not text:
        return -1
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=4).digest(), "little") & 0x7FFFFFFF


class _TokenCache:
    """Tokenizes strings, remembering recent ones: lexemes and region captions repeat a lot."""

    def __init__(self, tokenizer: str, context_length: int, max_entries: int = 200_000):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_entries = max_entries
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        from harmoclip_jax.tokenizer import get_tokenizer  # imported lazily: workers import this module first

        missing = sorted({t for t in texts if t not in self._cache})
        if missing:
            if len(self._cache) + len(missing) > self.max_entries:
                self._cache.clear()
            for text, tokens in zip(missing, get_tokenizer(self.tokenizer)(missing, self.context_length)):
                self._cache[text] = tokens
        out = np.zeros((len(texts), self.context_length), np.int32)
        for row, text in enumerate(texts):
            out[row] = self._cache[text]
        return out


_TOKEN_CACHES: dict[tuple[str, int], _TokenCache] = {}


@functools.lru_cache(maxsize=100_000)
def _content_ids(text: str, tokenizer: str) -> tuple[int, ...]:
    """Token ids of `text` alone without start/end tokens (the tokenizer's `encode`)."""
    from harmoclip_jax.tokenizer import get_tokenizer

    return tuple(get_tokenizer(tokenizer).encode(text)) if text.strip() else ()


def find_span(row: np.ndarray, ids: Sequence[int]) -> tuple[int, int]:
    """[start, end) of the first occurrence of the id sequence `ids` in the token row `row`; (-1, -1) if absent or
    empty. The lexeme's ids are those of the lexeme tokenized alone: CLIP's BPE lowercases and encodes word by word,
    and SigLIP's SentencePiece splits on whitespace (a word's first piece carries the word-start mark either way), so
    a lexeme that occurs verbatim (up to case, spacing and, for SigLIP, punctuation) in the text is found. A lexeme
    that is not a substring of the text (lemmatised, reordered) or that lies beyond the truncated context is not."""
    ids = np.asarray(ids, row.dtype)
    k = len(ids)
    if not k or k > len(row):
        return -1, -1
    hits = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(row, k) == ids, axis=1))
    return (int(hits[0]), int(hits[0]) + k) if len(hits) else (-1, -1)


def _tokenize(texts: Sequence[str], tokenizer: str, context_length: int) -> np.ndarray:
    key = (tokenizer, context_length)
    if key not in _TOKEN_CACHES:
        _TOKEN_CACHES[key] = _TokenCache(tokenizer, context_length)
    return _TOKEN_CACHES[key](texts)


def _to_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """How records become inputs of one model: its input size S, pixel normalisation, tokenizer and text context
    (the `config_lib.data_config` fields the model decides)."""

    image_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    tokenizer: str
    context_length: int
    image_dtype: str = "float32"  # "uint8": raw pixels, normalised on the device
    resize_canvas: int = 0  # > 0: training images leave on a canvas this size, squashed on the device

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "ModelInputs":
        return cls(image_size=config.image_size, image_mean=tuple(config.image_mean),
                   image_std=tuple(config.image_std), tokenizer=config.tokenizer, context_length=config.context_length,
                   image_dtype=config.get("image_dtype", "float32"), resize_canvas=config.get("resize_canvas", 0))

    def image(self, image: Any) -> np.ndarray:
        return decode_image(image, self.image_size, self.image_mean, self.image_std, self.image_dtype)

    def train_image(self, image: Any) -> dict[str, np.ndarray]:
        """A training example's image entries: `image` as `image()` makes it, or with `resize_canvas` the picture on
        its canvas plus `image_hw` (the device finishes the resize: `ops.resize.resize_from_canvas`)."""
        if not self.resize_canvas:
            return {"image": self.image(image)}
        canvas, hw = decode_to_canvas(image, self.image_size, self.resize_canvas)
        return {"image": canvas, "image_hw": hw}

    def tokens(self, texts: Sequence[str]) -> np.ndarray:
        return _tokenize(texts, self.tokenizer, self.context_length)


def _check_boxes(boxes: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Per normalised xyxy box: usable (`ops.boxes.box_faults`)? Returns (ok mask, problem per box or '')."""
    faults = box_ops.box_faults(boxes, (1.0, 1.0), tolerance=_BOX_TOLERANCE)
    problems = [f"box {np.round(box, 4).tolist()} {_BOX_PROBLEMS[int(fault)]}" if fault else ""
                for fault, box in zip(faults, boxes)]
    return faults == box_ops.OK, problems


def _regions(record: dict) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
    regions = record.get("regions") or {}
    boxes = np.asarray(regions.get("box", []), np.float32).reshape(-1, 4)
    n = len(boxes)
    captions = [_to_str(c) for c in regions.get("caption", [""] * n)]
    lexemes = [_to_str(c) for c in regions.get("lexeme", [""] * n)]
    labels = np.asarray(regions.get("label", [-1] * n), np.int64).reshape(-1)
    if not (len(captions) == len(lexemes) == len(labels) == n):
        raise ValueError(f"regions have {n} boxes, {len(captions)} captions, {len(lexemes)} lexemes and "
                         f"{len(labels)} labels; they must match")
    return boxes, captions, lexemes, labels


def resize_segmentation(mask: np.ndarray, size: int) -> np.ndarray:
    """A uint8 (H, W) class mask squashed to (size, size) with NEAREST resampling (labels are never blended); an
    empty (0, 0) mask (record without one) becomes all `SEGMENTATION_IGNORE`."""
    mask = np.asarray(mask, np.uint8)
    if mask.size == 0:
        return np.full((size, size), SEGMENTATION_IGNORE, np.uint8)
    if mask.shape == (size, size):
        return mask.copy()
    return np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST), np.uint8)


def _image_size(image: Any) -> tuple[int, int]:
    """(height, width) of an encoded image (header only) or an HWC array."""
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    width, height = Image.open(io.BytesIO(image)).size
    return int(height), int(width)


def _describe(record: dict, index: int) -> str:
    name = _to_str(record.get("file_name", b"")) or "?"
    return f"record {index} (image_id={record.get('image_id', '?')}, file_name={name!r})"


# ---------------------------------------------------------------------------------------- train transform


class TrainTransform:
    """(stream position, (record index, record)) -> a training example, or a skip marker for a bad record.

    Randomness (caption choice, region subset) is a pure function of (seed, epoch, record index), so the stream
    does not depend on worker count or thread timing. Module-level class: multiprocess workers unpickle it.
    """

    def __init__(self, *, inputs: ModelInputs, max_regions: int, seed: int, epoch_length: int,
                 lexeme_spans: str = ""):
        if lexeme_spans not in ("", "region_text", "text"):
            raise ValueError(f"lexeme_spans={lexeme_spans!r}; use '', 'region_text' or 'text'")
        self.inputs = inputs
        self.max_regions = max_regions
        self.seed = seed
        self.epoch_length = epoch_length
        self.lexeme_spans = lexeme_spans

    def __call__(self, position: int, indexed_record: tuple[int, dict]) -> dict:
        record_index, record = indexed_record
        epoch = position // self.epoch_length
        rng = np.random.default_rng([self.seed, epoch, record_index])
        problems: list[str] = []
        try:
            image = self.inputs.train_image(record["image"])
        except Exception as error:  # noqa: BLE001 - any decoder failure means the same: unusable image
            return _skip(record, record_index, [f"undecodable image ({type(error).__name__}: {error})"])
        captions = [_to_str(c) for c in record.get("captions", [])]
        usable = [c for c in captions if c.strip()]
        if len(usable) < len(captions):
            problems.append(f"{len(captions) - len(usable)} empty caption(s)")
        if not usable:
            return _skip(record, record_index, problems or ["no captions"])
        try:
            boxes, region_captions, lexemes, labels = _regions(record)
        except ValueError as error:
            return _skip(record, record_index, [str(error)])
        ok, box_problems = _check_boxes(boxes)
        problems += [p for p in box_problems if p]
        keep = np.flatnonzero(ok)
        if len(keep) > self.max_regions:
            keep = np.sort(rng.choice(keep, size=self.max_regions, replace=False))
        caption = usable[int(rng.integers(len(usable)))]

        t, s = self.max_regions, self.inputs.image_size
        pixel_boxes = np.clip(boxes[keep], 0.0, 1.0) * np.float32(s)
        out_boxes = np.zeros((t, 4), np.float32)
        out_boxes[: len(keep)] = pixel_boxes
        box_mask = np.zeros((t,), bool)
        box_mask[: len(keep)] = True
        kept_captions = [region_captions[i] for i in keep]
        kept_lexemes = [lexemes[i] for i in keep]
        tokens = self.inputs.tokens([caption] + kept_captions + kept_lexemes)
        region_text = np.zeros((t, self.inputs.context_length), np.int32)
        lexeme = np.zeros((t, self.inputs.context_length), np.int32)
        region_text[: len(keep)] = tokens[1: 1 + len(keep)]
        lexeme[: len(keep)] = tokens[1 + len(keep):]
        lexeme_ids = np.full((t,), -1, np.int32)
        lexeme_ids[: len(keep)] = [lexeme_id(x) for x in kept_lexemes]
        out_labels = np.full((t,), -1, np.int32)
        out_labels[: len(keep)] = labels[keep]
        spans = {}
        if self.lexeme_spans:
            spans["lexeme_span"] = np.full((t, 2), -1, np.int32)
            for j, text in enumerate(kept_lexemes):
                row = region_text[j] if self.lexeme_spans == "region_text" else tokens[0]
                spans["lexeme_span"][j] = find_span(row, _content_ids(text, self.inputs.tokenizer))
        return {
            **image,
            "text": tokens[0],
            "boxes": out_boxes,
            "box_mask": box_mask,
            "region_text": region_text,
            "lexeme": lexeme,
            "lexeme_id": lexeme_ids,
            **spans,
            "label": out_labels,
            "index": np.int32(record_index),
            "_problems": (_describe(record, record_index), tuple(problems)),
        }


def _skip(record: dict, record_index: int, problems: list[str]) -> dict:
    return {"_skip": True, "_problems": (_describe(record, record_index), tuple(problems))}


class AttachIndex:
    """Pairs a record with its index in the split. Applied right after the source; grain passes indices of later
    epochs unreduced (index + epoch * length), hence the modulo."""

    def __init__(self, num_records: int):
        self.num_records = num_records

    def __call__(self, index: int, record: dict) -> tuple[int, dict]:
        return index % self.num_records, record


def check_bad_fraction(bad: int, seen: int, max_bad_fraction: float, check_after: int, latest: str = "") -> None:
    """Raises `BadRecordsError` once more than `max_bad_fraction` of the `seen` training records (counted after
    `check_after` records) were bad; `latest` names the last bad record in the message."""
    if seen >= check_after and bad > max_bad_fraction * seen:
        raise BadRecordsError(
            f"{bad} of the {seen} training records read so far were bad (more than max_bad_fraction="
            f"{max_bad_fraction}){f'; the latest: {latest}' if latest else ''}. Fix or rebuild the dataset, or raise "
            "config.data.max_bad_fraction.")


class _SkipBadRecordsIterator(grain.DatasetIterator):
    """Drops skip markers, counts and logs bad records, and stops the stream when there are too many."""

    def __init__(self, parent: grain.DatasetIterator, max_bad_fraction: float, check_after: int):
        super().__init__(parent)
        self._max_bad_fraction = max_bad_fraction
        self._check_after = check_after
        self._seen = 0
        self._bad = 0

    def __next__(self) -> dict:
        bad_here = bad_here_skipped = 0
        while True:
            example = next(self._parent)
            where, problems = example.pop("_problems")
            self._seen += 1
            if problems:
                self._bad += 1
                bad_here += 1
                action = "skipped" if example.get("_skip") else "repaired"
                log.warning("bad training %s, %s: %s", where, action, "; ".join(problems))
                check_bad_fraction(self._bad, self._seen, self._max_bad_fraction, self._check_after,
                                   latest=f"{where}: {'; '.join(problems)}")
            if example.get("_skip"):
                bad_here_skipped += 1
                continue
            example["num_bad_records"] = np.int32(bad_here)
            example["_records_read"] = np.int32(bad_here_skipped + 1)
            return example

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "seen": self._seen, "bad": self._bad}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._seen, self._bad = int(state["seen"]), int(state["bad"])


class SkipBadRecords(grain.IterDataset):
    """IterDataset wrapper of `_SkipBadRecordsIterator` (see there)."""

    def __init__(self, parent: grain.IterDataset, max_bad_fraction: float, check_after: int):
        super().__init__(parent)
        self._max_bad_fraction = max_bad_fraction
        self._check_after = check_after

    def __iter__(self) -> _SkipBadRecordsIterator:
        return _SkipBadRecordsIterator(self._parent.__iter__(), self._max_bad_fraction, self._check_after)


# ------------------------------------------------------------------------------------------ eval transform


class EvalTransform:
    """Position in the padded shard -> an eval example (padding beyond the shard). Strict: raises on bad data."""

    def __init__(self, *, source: Sequence, record_indices: np.ndarray, inputs: ModelInputs, max_regions: int,
                 num_captions: int, split_name: str, segmentation: bool = False, regions: bool = True):
        self.segmentation = segmentation
        self.regions = regions
        self.source = source
        self.record_indices = record_indices
        self.inputs = inputs
        self.max_regions = max_regions
        self.num_captions = num_captions
        self.split_name = split_name

    def __call__(self, position: int) -> dict:
        s, t, k = self.inputs.image_size, self.max_regions, self.num_captions
        example = {
            "image": np.zeros((s, s, 3), self.inputs.image_dtype),
            "captions": np.zeros((k, self.inputs.context_length), np.int32),
            "caption_mask": np.zeros((k,), bool),
            "boxes": np.zeros((t, 4), np.float32),
            "box_mask": np.zeros((t,), bool),
            "label": np.full((t,), -1, np.int32),
            "mask": np.bool_(False),
            "index": np.int32(-1),
        }
        if self.segmentation:
            example["segmentation"] = np.full((s, s), SEGMENTATION_IGNORE, np.uint8)
        if position >= len(self.record_indices):
            return example
        record_index = int(self.record_indices[position])
        record = self.source[record_index]

        def fail(problem: str) -> BadRecordError:
            return BadRecordError(f"{self.split_name} {_describe(record, record_index)}: {problem}. Eval does not "
                                  "skip or repair records: fix the dataset (or evaluate on another split).")

        try:
            example["image"] = self.inputs.image(record["image"])
        except Exception as error:  # noqa: BLE001
            raise fail(f"undecodable image ({type(error).__name__}: {error})") from error
        captions = [_to_str(c) for c in record.get("captions", [])][:k]
        if any(not c.strip() for c in captions):
            raise fail(f"empty caption among {captions!r}")
        if captions:
            example["captions"][: len(captions)] = self.inputs.tokens(captions)
            example["caption_mask"][: len(captions)] = True
        if self.segmentation:
            mask = np.asarray(record.get("segmentation", no_segmentation()))
            if mask.size:
                if mask.ndim != 2 or mask.shape != _image_size(record["image"]):
                    raise fail(f"segmentation mask of shape {mask.shape} for an image of (height, width) "
                               f"{_image_size(record['image'])}; the mask must be at the image's own resolution")
            example["segmentation"] = resize_segmentation(mask, s)
        if self.regions:
            try:
                boxes, _, _, labels = _regions(record)
            except ValueError as error:
                raise fail(str(error)) from error
            ok, problems = _check_boxes(boxes)
            if not ok.all():
                raise fail("; ".join(p for p in problems if p))
            if len(boxes) > t:
                raise fail(f"{len(boxes)} regions but eval_max_regions={t} (eval never drops regions); raise "
                           "config.data.eval_max_regions")
            n = len(boxes)
            example["boxes"][:n] = np.clip(boxes, 0.0, 1.0) * np.float32(s)
            example["box_mask"][:n] = True
            example["label"][:n] = labels
        example["mask"] = np.bool_(True)
        example["index"] = np.int32(record_index)
        return example


# --------------------------------------------------------------------------------------------- builders


def open_source(dataset: str, split: str, data_dir: str | None = None, *,
                undecoded: Sequence[str] = ()) -> Sequence[dict]:
    """Random-access TFDS source of `dataset` ("name[/config]") with images left encoded (decoded by us), and the
    features named in `undecoded` too, left in their stored form (training never reads `segmentation`: a zlib
    mask at image resolution where a record has one).

    Generated datasets (scenes) are built into `data_dir` on first use; the real datasets (COCO, Flickr30k) must
    have been prepared with `python -m harmoclip_jax.data.prepare` (docs/datasets.md). Any other TFDS builder
    registered by then (e.g. by a test) is opened too.
    """
    import tensorflow_datasets as tfds

    registry.register(dataset)
    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise FileNotFoundError(f"unknown dataset {dataset!r}; the datasets of harmoclip_jax/data/registry.py are "
                                f"{sorted(registry.DATASETS)}") from error
    if not builder.is_prepared():
        entry = registry.lookup(dataset)
        if entry is None or not entry.generated:
            raise FileNotFoundError(
                f"dataset {dataset!r} is not prepared under {builder.data_dir}: build it with "
                f"`{registry.prepare_command(dataset, data_dir)}` (docs/datasets.md) or point config.data.data_dir "
                f"at it (data_dir={data_dir!r}; None means the TFDS default, $TFDS_DATA_DIR)")
        builder.download_and_prepare()  # generated procedurally; nothing is downloaded
    return builder_source(builder, split, undecoded=undecoded)


def builder_source(builder, split: str, *, undecoded: Sequence[str] = ()) -> Sequence[dict]:
    """The random-access source of a prepared TFDS `builder`'s `split`: images and the `undecoded` features left
    in their stored form (`open_source`)."""
    import tensorflow_datasets as tfds

    skipped = [name for name in undecoded if name in builder.info.features]  # absent: nothing to skip
    decoders = {name: tfds.decode.SkipDecoding() for name in ["image", *skipped]}
    return builder.as_data_source(split=split, decoders=decoders)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    return process_index, process_count


def _mark_flags_parsed() -> None:
    # grain's multiprocess workers read absl flags; outside `app.run` they are unparsed and grain raises.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# How often a grain worker checks that the process that started it is still alive.
_PARENT_POLL_S = 0.5


def _exit_with_parent(parent_pid: int, worker_index: int = 0, worker_count: int = 1) -> None:
    """grain `worker_init_fn`: end this worker within `_PARENT_POLL_S` of the death of `parent_pid` (the process
    that built the pipeline). Without it a trainer killed with SIGKILL (no cleanup runs) leaves its workers blocked
    forever on a full output queue. A daemon thread polls `os.getppid()`: on POSIX a child whose parent dies is
    re-parented (to init or a subreaper), so the pid changes. Not `prctl(PR_SET_PDEATHSIG)`: that fires when the
    *thread* that forked the worker exits, and grain starts workers from helper threads that may end while the
    trainer lives. On Windows processes are not re-parented, so this is a harmless no-op there."""
    del worker_index, worker_count

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)  # the parent is gone: nobody reads what this worker makes; no cleanup to wait for

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _finish(ds: grain.IterDataset, config: ml_collections.ConfigDict) -> grain.IterDataset:
    if config.num_workers > 0:
        _mark_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers,
                                                         per_worker_buffer_size=config.worker_buffer_size),
                            worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
    return ds


def _global_examples(config: ml_collections.ConfigDict, source: Sequence[dict], seed: int) -> grain.MapDataset:
    """The global training stream: position i -> the example (or skip marker) at position i of the seeded
    per-epoch shuffle of the whole split. The same for every process count."""
    ds = grain.MapDataset.source(source).map_with_index(AttachIndex(len(source)))
    ds = ds.seed(seed).shuffle().repeat(config.num_epochs)
    return ds.map_with_index(TrainTransform(inputs=ModelInputs.from_config(config), max_regions=config.max_regions,
                                            seed=seed, epoch_length=len(source),
                                            lexeme_spans=config.get("lexeme_spans", "")))


class ReplaceBadRecords:
    """Local position j -> the example for row j % b of this process's slice of global batch j // b: global
    position `start + (j // b) * B + p * b + j % b`. A record that must be skipped is replaced by the next usable
    one in the global order (or the previous one past the end of a finite stream), so every process count sees
    the same global batches. Module-level class: multiprocess workers unpickle it."""

    def __init__(self, examples: grain.MapDataset, *, start: int, local_batch: int, global_batch: int,
                 offset: int, num_records: int):
        self.examples, self.num_records = examples, num_records
        self.start, self.local_batch, self.global_batch, self.offset = start, local_batch, global_batch, offset

    def __call__(self, j: int) -> dict:
        position = self.start + (j // self.local_batch) * self.global_batch + self.offset + j % self.local_batch
        skipped, step = 0, 1
        candidate = position
        while True:
            example = self.examples[candidate]
            where, problems = example.pop("_problems")
            if problems:
                action = "skipped" if example.get("_skip") else "repaired"
                log.warning("bad training %s, %s: %s", where, action, "; ".join(problems))
            if not example.get("_skip"):
                example["num_bad_records"] = np.int32(skipped + bool(problems))
                example["_records_read"] = np.int32(skipped + 1)
                return example
            skipped += 1
            candidate += step
            if candidate >= len(self.examples):  # finite stream: look backwards from the bad record
                step, candidate = -1, position - 1
            if candidate < 0 or skipped > self.num_records:
                raise BadRecordsError(f"no usable training record among {skipped} consecutive ones around global "
                                      f"position {position}; fix or rebuild the dataset")


class TrainIterator:
    """The training batches of this process from global example position `position` on.

    Its state is that one number (`get_state() == {"position": ...}`, JSON-able, the same on every process):
    `set_state` rebuilds the pipeline at that position (O(1): grain MapDataset indexing), whatever process count
    or worker count wrote it. Two modes (see module docstring): "skip" (one process, no workers: bad records are
    dropped from the stream exactly as before) and "replace" (otherwise: batches are formed from global
    positions before any worker or thread sees them).
    """

    def __init__(self, config: ml_collections.ConfigDict, source: Sequence[dict], seed: int, process_index: int,
                 process_count: int, position: int = 0):
        self._config, self._source, self._seed = config, source, seed
        self._process_index, self._process_count = process_index, process_count
        self.global_batch = config.batch_size * process_count
        self.mode = "skip" if process_count == 1 and config.num_workers == 0 else "replace"
        self._examples = _global_examples(config, source, seed)
        self._iterator = None
        self._seen = self._bad = 0
        self.set_state({"position": position})

    def _dataset(self, position: int) -> grain.IterDataset:
        config = self._config
        if self.mode == "skip":
            ds = self._examples[position:].to_iter_dataset(grain.ReadOptions(
                num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer_size))
            ds = SkipBadRecords(ds, config.max_bad_fraction, config.bad_check_after)
            return ds.batch(config.batch_size, drop_remainder=True)
        b = config.batch_size
        batches = (len(self._examples) - position) // self.global_batch
        ds = grain.MapDataset.range(batches * b).map(ReplaceBadRecords(
            self._examples, start=position, local_batch=b, global_batch=self.global_batch,
            offset=self._process_index * b, num_records=len(self._source)))
        ds = ds.batch(b, drop_remainder=True)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                  prefetch_buffer_size=max(1, config.read_buffer_size // b)))
        return _finish(ds, config)

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict:
        batch = next(self._iterator)
        if self.mode == "skip":
            self.position += int(batch.pop("_records_read").sum())
            return batch
        self.position += self.global_batch
        read = batch.pop("_records_read")
        self._seen += int(read.sum())
        self._bad += int(batch["num_bad_records"].sum())
        check_bad_fraction(self._bad, self._seen, self._config.max_bad_fraction, self._config.bad_check_after)
        return batch

    def get_state(self) -> dict:
        return {"position": int(self.position)}

    def set_state(self, state: dict) -> None:
        self.close()
        self.position = int(state["position"])
        self._iterator = iter(self._dataset(self.position))

    def close(self) -> None:
        closer = getattr(self._iterator, "close", None)
        if closer is not None:
            closer()


def make_train_iterator(config: ml_collections.ConfigDict, *, data_dir: str | None = None, seed: int | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        source: Sequence[dict] | None = None, position: int = 0) -> TrainIterator:
    """This process's training batches (see module docstring) from global example `position` on; `source`
    overrides the TFDS one. Checkpoint it with get/set_state (one number: the global position)."""
    process_index, process_count = _process(process_index, process_count)
    seed = config.seed if seed is None else seed
    if source is None:
        source = open_source(config.dataset, config.train_split, data_dir or config.data_dir,
                             undecoded=TRAIN_UNREAD_FEATURES)
    if len(source) < config.batch_size * process_count:
        raise ValueError(f"the training split has {len(source)} records, fewer than one global batch "
                         f"(batch_size={config.batch_size} per process x {process_count} processes)")
    return TrainIterator(config, source, seed, process_index, process_count, position)


def make_eval_dataset(config: ml_collections.ConfigDict, *, split: str | None = None, data_dir: str | None = None,
                      process_index: int | None = None, process_count: int | None = None,
                      source: Sequence[dict] | None = None) -> grain.IterDataset:
    """The eval `grain.IterDataset` of this process: each record of its shard once, the last batch padded."""
    process_index, process_count = _process(process_index, process_count)
    split = split or config.eval_split
    if source is None:
        source = open_source(config.dataset, split, data_dir or config.data_dir)
    record_indices = np.arange(len(source))[process_index::process_count]
    batches = num_eval_batches(config, len(source), process_count)
    transform = EvalTransform(source=source, record_indices=record_indices, inputs=ModelInputs.from_config(config),
                              max_regions=config.eval_max_regions, num_captions=config.eval_captions,
                              split_name=f"{config.dataset}:{split}",
                              segmentation=bool(config.get("eval_segmentation", False)),
                              regions=bool(config.get("eval_regions", True)))
    ds = grain.MapDataset.range(batches * config.eval_batch_size).map(transform)
    ds = ds.batch(config.eval_batch_size, drop_remainder=True)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                              prefetch_buffer_size=max(1, config.read_buffer_size
                                                                       // config.eval_batch_size)))
    return _finish(ds, config)


def make_eval_iterator(config: ml_collections.ConfigDict, **kwargs) -> grain.DatasetIterator:
    """An iterator over eval batches; arguments as `make_eval_dataset`."""
    return iter(make_eval_dataset(config, **kwargs))


def num_eval_batches(config: ml_collections.ConfigDict, num_records: int, process_count: int) -> int:
    """Batches every process yields for an eval split of `num_records` records (sized by the largest shard, so
    all processes run the same number of eval steps)."""
    return math.ceil(math.ceil(num_records / process_count) / config.eval_batch_size)
