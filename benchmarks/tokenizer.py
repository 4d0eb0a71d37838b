"""Tokenizer throughput: harmoclip_jax.tokenizer vs open_clip's SimpleTokenizer, same captions, one run.

    python benchmarks/tokenizer.py [--captions 10000] [--repeats 3]

Captions are synthetic, caption-like (6-20 words, Zipf-distributed over the BPE vocabulary's whole
words, capitalised, some punctuation/HTML entities), so that neither side lives on a tiny word cache.
Prints one JSON object per case; speedup = ours / reference (captions/s, best of --repeats).
"""
import argparse
import gzip
import importlib.util
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harmoclip_jax import tokenizer as tok  # noqa: E402
from harmoclip_jax.testing.reference import open_clip_file_module  # noqa: E402
from harmoclip_jax.testing.machine import cpu_description  # noqa: E402

OPEN_CLIP_DIR = importlib.util.find_spec("open_clip").submodule_search_locations[0]


def load_open_clip_tokenizer():
    """open_clip.tokenizer by file path (`import open_clip` needs torchvision, broken here)."""
    return open_clip_file_module("tokenizer")


def bpe_merges():
    lines = gzip.open(os.path.join(OPEN_CLIP_DIR, "bpe_simple_vocab_16e6.txt.gz")).read()
    return [tuple(m.split()) for m in lines.decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]]


def make_captions(n, seed=0):
    words = sorted({"".join(m)[:-4] for m in bpe_merges() if "".join(m).endswith("</w>")})
    words = [w for w in words if w.isalpha() and w.isascii()]
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.zipf(1.3, size=(n, 20)), len(words)) - 1
    order = rng.permutation(len(words))  # which words are frequent: arbitrary but fixed
    captions = []
    for i in range(n):
        length = rng.integers(6, 21)
        text = " ".join(words[order[r]] for r in ranks[i, :length]).capitalize()
        if i % 7 == 0:
            text += " &amp; more"
        captions.append(text + rng.choice([".", "", "!", " ."]))
    return captions


def write_hf_dir(directory, open_clip_tokenizer):
    merges = bpe_merges()
    byte_chars = list(open_clip_tokenizer.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({v: i for i, v in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in merges))


def captions_per_second(fn, captions, repeats):
    fn(captions[:100])  # warm up (lazy construction, first-call costs)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(captions)
        best = min(best, time.perf_counter() - start)
    return len(captions) / best, np.asarray(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    captions = make_captions(args.captions)
    open_clip_tokenizer = load_open_clip_tokenizer()
    # A fresh SimpleTokenizer per repeat would measure its cold word cache; real training reuses
    # one instance, so the reference keeps its cache warm across repeats like ours does.
    reference_fn = lambda texts: open_clip_tokenizer.tokenize(texts, context_length=77).numpy()  # noqa: E731
    reference_rate, reference_ids = captions_per_second(reference_fn, captions, args.repeats)

    with tempfile.TemporaryDirectory() as hf_dir:
        write_hf_dir(hf_dir, open_clip_tokenizer)
        cases = {"default (instant-clip-tokenizer)": tok.tokenize,
                 "hf_dir (transformers CLIPTokenizer)": tok.Tokenizer.from_hf_dir(hf_dir)}
        for backend, fn in cases.items():
            rate, ids = captions_per_second(fn, captions, args.repeats)
            if not np.array_equal(ids, reference_ids):
                raise SystemExit(f"{backend}: ids differ from open_clip; benchmark is void")
            print(json.dumps({
                "cpu": cpu_description(),
                "bench": "tokenizer",
                "case": {"backend": backend, "captions": len(captions), "context_length": 77},
                "unit": "captions/s",
                "ours": round(rate, 1),
                "reference": round(reference_rate, 1),
                "reference_name": "open_clip 3.3.0 SimpleTokenizer (tokenize)",
                "speedup": round(rate / reference_rate, 2),
            }))


if __name__ == "__main__":
    main()
