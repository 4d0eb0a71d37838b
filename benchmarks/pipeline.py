"""Training-input throughput of the grain pipeline on the scenes dataset, vs a plain Python loop.

Ours: `harmoclip_jax.data.pipeline.make_train_iterator` (shard, shuffle, decode, squash to 224, CLIP-normalise,
region subset, tokenize, batch) with 0 and 2 grain worker processes.
Reference: a single-threaded Python loop over the same `tfds.data_source` doing the same per-example work
(TFDS's own image decoding, PIL bicubic squash, normalise, tokenize the caption/region captions/lexemes, scale the
boxes) and `np.stack` into batches - what one writes without grain.

Prints one JSON object per case (the format of benchmarks/RESULTS.md). Usage:
    python benchmarks/pipeline.py [--data_dir DIR] [--batches 20] [--repeats 3] [--config default]
The scenes dataset is generated into DIR (default: the TFDS data dir) on first use (~20 s).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from harmoclip_jax.testing.machine import cpu_description  # noqa: E402


def _reference_batches(source, *, image_size: int, batch_size: int, max_regions: int, num_batches: int):
    from PIL import Image

    from harmoclip_jax.data.pipeline import lexeme_id
    from harmoclip_jax.models.normalization import OPENAI_CLIP
    from harmoclip_jax.tokenizer import tokenize

    rng = np.random.default_rng(0)
    order = rng.permutation(len(source))
    position = 0
    for _ in range(num_batches):
        examples = []
        for _ in range(batch_size):
            record = source[int(order[position % len(order)])]
            position += 1
            picture = Image.fromarray(record["image"]).resize((image_size, image_size), Image.BICUBIC)
            image = (np.asarray(picture, np.float32) / 255 - np.float32(OPENAI_CLIP[0])) / np.float32(OPENAI_CLIP[1])
            regions = record["regions"]
            n = min(len(regions["label"]), max_regions)
            texts = [rng.choice(record["captions"]).decode()] + [c.decode() for c in regions["caption"][:n]]
            texts += [c.decode() for c in regions["lexeme"][:n]]
            tokens = tokenize(texts)
            boxes = np.zeros((max_regions, 4), np.float32)
            boxes[:n] = np.stack(regions["box"][:n]) * image_size
            region_text = np.zeros((max_regions, 77), np.int32)
            region_text[:n] = tokens[1:1 + n]
            lexeme = np.zeros((max_regions, 77), np.int32)
            lexeme[:n] = tokens[1 + n:]
            ids = np.full((max_regions,), -1, np.int32)
            ids[:n] = [lexeme_id(x) for x in regions["lexeme"][:n]]
            examples.append({"image": image, "text": tokens[0], "boxes": boxes, "region_text": region_text,
                             "lexeme": lexeme, "lexeme_id": ids})
        yield {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def _rate(batches, num_batches: int, repeats: int) -> float:
    """Best of `repeats` windows of `num_batches` batches per second, after one warm-up batch (worker start-up
    excluded). Best-of because the machine is shared: slow windows measure the neighbours, not the pipeline."""
    next(batches)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(num_batches):
            next(batches)
        best = max(best, num_batches / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--config", default="default", help="scenes builder config")
    parser.add_argument("--batches", type=int, default=20, help="batches per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per case (best is reported)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()

    import tensorflow_datasets as tfds

    from harmoclip_jax.data import pipeline, scenes

    with contextlib.redirect_stdout(sys.stderr):  # TFDS announces the build on stdout; stdout is JSON lines only
        scenes.Scenes(config=args.config, data_dir=args.data_dir).download_and_prepare()
    dataset = f"scenes/{args.config}"
    config = pipeline.default_data_config()
    config.dataset = dataset
    config.image_size = args.image_size
    config.batch_size = args.batch_size

    source = tfds.data_source(dataset, split="train", data_dir=args.data_dir)
    reference = _rate(_reference_batches(source, image_size=args.image_size, batch_size=args.batch_size,
                                         max_regions=config.max_regions,
                                         num_batches=args.batches * args.repeats + 1),
                      args.batches, args.repeats)
    for workers in args.workers:
        config.num_workers = workers
        iterator = pipeline.make_train_iterator(config, data_dir=args.data_dir, process_index=0, process_count=1)
        try:
            ours = _rate(iterator, args.batches, args.repeats)
        finally:
            iterator.close()
        case = {"dataset": dataset, "image_size": args.image_size, "batch_size": args.batch_size,
                "max_regions": config.max_regions, "num_workers": workers, "read_threads": config.read_threads,
                "batches": args.batches, "repeats": args.repeats, "batches_per_s": round(ours, 3)}
        print(json.dumps({
            "cpu": cpu_description(),
            "bench": "pipeline",
            "case": case,
            "unit": "images/s",
            "ours": round(ours * args.batch_size, 1),
            "reference": round(reference * args.batch_size, 1),
            "reference_name": "plain single-threaded Python loop over tfds.data_source (TFDS decode, PIL squash, "
                              "normalise, tokenize, np.stack)",
            "speedup": round(ours / reference, 3),
        }), flush=True)


if __name__ == "__main__":
    main()
