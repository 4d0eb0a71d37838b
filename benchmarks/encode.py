"""Images/s of jitted `encode_image` vs transformers' PyTorch CLIPModel.get_image_features, same weights, one run.

    python benchmarks/encode.py                       # ViT-B/16, batch 8, float32, CPU
    python benchmarks/encode.py --variant ViT-L/14 --batch 4 --iters 5

Prints one JSON object per case (see benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from harmoclip_jax.testing.machine import cpu_description  # noqa: E402
from flax import nnx  # noqa: E402


def _time(fn, sync, iters: int) -> float:
    """Seconds per call: `iters` calls queued back to back (as a training/inference loop would), then one sync;
    median of 3 such windows after a warm-up."""
    sync(fn())
    windows = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn()
        sync(out)
        windows.append((time.perf_counter() - start) / iters)
    return float(np.median(windows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="ViT-B/16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--dtype", default="float32",
                        help="compute dtype of both sides (PyTorch: autocast for bfloat16)")
    parser.add_argument("--no_reference", action="store_true", help="skip PyTorch (e.g. on a GPU box without it)")
    args = parser.parse_args()

    from harmoclip_jax.models import convert
    from harmoclip_jax.models.variants import get_config

    config = get_config(args.variant, dtype=args.dtype)
    size = config.vision.image_size
    images = np.random.default_rng(0).standard_normal((args.batch, size, size, 3)).astype(np.float32)

    ref_model = None
    if not args.no_reference:
        import torch

        from harmoclip_jax.testing import reference

        ref_model = reference.hf_clip_model(args.variant, seed=0)  # ours gets the same weights
        params = convert.state_dict_to_params({k: v.numpy() for k, v in ref_model.state_dict().items()},
                                              get_config(args.variant), "hf")
        model = convert.model_from_params(config, params)
    else:
        from harmoclip_jax.models.clip import CLIP

        model = CLIP(config)

    # Ours first, so the two frameworks' GPU allocators do not compete while ours compiles and autotunes.
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda state, x: nnx.merge(graphdef, state).encode_image(x))
    x = jax.device_put(jnp.asarray(images))
    ours_seconds = _time(lambda: encode(state, x), lambda out: out.block_until_ready(), args.iters)

    ref_seconds = None
    if ref_model is not None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        ref_model = ref_model.to(device)
        pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

        def run_reference():
            with torch.no_grad(), autocast:
                return ref_model.get_image_features(pixel_values=pixels)

        sync = (lambda out: torch.cuda.synchronize()) if device == "cuda" else (lambda out: None)
        ref_seconds = _time(run_reference, sync, args.iters)

    ours = args.batch / ours_seconds
    ref = args.batch / ref_seconds if ref_seconds else None
    print(json.dumps({
        "cpu": cpu_description(),
        "bench": "encode_image",
        "case": {"variant": args.variant, "batch": args.batch, "dtype": args.dtype,
                 "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()},
        "unit": "images/s",
        "ours": round(ours, 3),
        "reference": round(ref, 3) if ref else None,
        "reference_name": f"transformers CLIPModel.get_image_features (PyTorch {torch.__version__}, no_grad)" if ref else None,
        "speedup": round(ours / ref, 3) if ref else None,
    }))


if __name__ == "__main__":
    main()
