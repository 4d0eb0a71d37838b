"""Images/s of jitted `encode_image` vs the family's PyTorch home, same random weights, side by side in one run.

    python benchmarks/encode.py                       # CLIP ViT-B/16 vs transformers CLIPModel, batch 8, f32, CPU
    python benchmarks/encode.py --variant ViT-L/14 --batch 4 --iters 5
    python benchmarks/encode.py --family eva02_clip   # EVA02-B/16 vs open_clip EVA02-B-16 (timm trunk)
    python benchmarks/encode.py --family siglip       # SigLIP B/16 vs transformers SiglipModel

Our side loads the reference's weights through the family's own converter (the convert CLI's code path).

Prints one JSON object per case (see benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from harmoclip_jax.testing.machine import cpu_description  # noqa: E402


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


# family -> (default variant, reference name, builder). A builder gets (variant, tmpdir) and returns
# (our model loaded through the family's converter, the reference's image-encode function of NCHW pixels, its name).
def _clip_reference(variant, dtype, tmp):
    from harmoclip_jax.models import convert
    from harmoclip_jax.models.variants import get_config
    from harmoclip_jax.testing import reference

    ref = reference.hf_clip_model(variant, seed=0)
    params = convert.state_dict_to_params({k: v.numpy() for k, v in ref.state_dict().items()}, get_config(variant),
                                          "hf")
    ours = convert.model_from_params(get_config(variant, dtype=dtype), params)
    name = "transformers CLIPModel.get_image_features"
    return ours, ref, lambda pixels: ref.get_image_features(pixel_values=pixels), name


def _eva02_reference(variant, dtype, tmp):
    import torch

    from harmoclip_jax.models import registry
    from harmoclip_jax.testing import reference
    from harmoclip_jax.testing.torch_compat import ensure_torch_reference_stack

    ensure_torch_reference_stack()
    import open_clip

    ref = open_clip.create_model(variant.replace("/", "-"), pretrained=None)
    reference.randomize_(ref, seed=0)
    ref.eval()
    torch.save(ref.state_dict(), tmp / "eva02.pt")
    ours = registry.get("eva02_clip").load_open_clip(tmp / "eva02.pt", variant, dtype=dtype)
    return ours, ref, lambda pixels: ref.encode_image(pixels), "open_clip EVA02 encode_image (timm Eva trunk)"


def _siglip_reference(variant, dtype, tmp):
    from harmoclip_jax.models import registry
    from harmoclip_jax.testing import reference
    from harmoclip_jax.testing.torch_compat import ensure_torch_reference_stack

    ensure_torch_reference_stack()
    import transformers

    ref = transformers.SiglipModel(transformers.SiglipConfig())  # transformers' defaults are SigLIP B/16 at 224
    reference.randomize_(ref, seed=0)
    ref.eval().save_pretrained(tmp / "siglip")
    ours = registry.get("siglip").load_hf(tmp / "siglip", dtype=dtype)
    name = "transformers SiglipModel.get_image_features"
    return ours, ref, lambda pixels: ref.get_image_features(pixel_values=pixels), name


FAMILIES = {
    "clip": ("ViT-B/16", _clip_reference),
    "eva02_clip": ("EVA02-B/16", _eva02_reference),
    "siglip": ("SigLIP-B/16", _siglip_reference),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="clip", choices=sorted(FAMILIES))
    parser.add_argument("--variant", default=None, help="default: the family's B/16 (siglip: transformers' default)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--dtype", default="float32",
                        help="compute dtype of both sides (PyTorch: autocast for bfloat16)")
    parser.add_argument("--no_reference", action="store_true", help="skip PyTorch (e.g. on a GPU box without it)")
    args = parser.parse_args()
    default_variant, build_reference = FAMILIES[args.family]
    variant = args.variant or default_variant

    from harmoclip_jax.models import registry

    ref_model = ref_encode = ref_name = None
    if args.no_reference:
        backbone = registry.get(args.family)
        model = backbone.model_class(backbone.get_config(variant, dtype=args.dtype))
    else:
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            model, ref_model, ref_encode, ref_name = build_reference(variant, args.dtype, pathlib.Path(tmp))
    size = model.config.vision.image_size
    images = np.random.default_rng(0).standard_normal((args.batch, size, size, 3)).astype(np.float32)

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
                return ref_encode(pixels)

        sync = (lambda out: torch.cuda.synchronize()) if device == "cuda" else (lambda out: None)
        ref_seconds = _time(run_reference, sync, args.iters)

    ours = args.batch / ours_seconds
    ref = args.batch / ref_seconds if ref_seconds else None
    print(json.dumps({
        "cpu": cpu_description(),
        "bench": "encode_image",
        "case": {"family": args.family, "variant": variant, "batch": args.batch, "dtype": args.dtype,
                 "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()},
        "unit": "images/s",
        "ours": round(ours, 3),
        "reference": round(ref, 3) if ref else None,
        "reference_name": f"{ref_name} (PyTorch {torch.__version__}, no_grad)" if ref else None,
        "speedup": round(ours / ref, 3) if ref else None,
    }))


if __name__ == "__main__":
    main()
