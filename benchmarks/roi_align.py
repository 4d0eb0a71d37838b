"""RoIAlign benchmark: our separable einsum op vs a straightforward gather-based bilinear RoIAlign.

Both implement torchvision semantics (sampling_ratio=-1, aligned=True, the same static bound on
samples per bin); the script checks they agree before timing. Prints one JSON object per case.

  python benchmarks/roi_align.py [--iters 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from harmoclip_jax import losses  # noqa: E402
from harmoclip_jax.ops.roi_align import default_max_samples_per_bin, roi_align  # noqa: E402
from harmoclip_jax.testing.machine import cpu_description  # noqa: E402


def gather_roi_align(features, boxes, output_size, spatial_scale, max_samples):
    """Textbook RoIAlign: per sample point, gather the 4 neighbouring cells and blend them.

    sampling_ratio=-1 (adaptive, masked up to ``max_samples`` per axis), aligned=True.
    """
    batch, height, width, _ = features.shape
    out_h, out_w = output_size
    s_h, s_w = max_samples
    b = boxes.astype(jnp.float32) * spatial_scale - 0.5
    x1, y1, x2, y2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    roi_w, roi_h = x2 - x1, y2 - y1
    grid_h = jnp.clip(jnp.ceil(roi_h / out_h), 0, s_h)
    grid_w = jnp.clip(jnp.ceil(roi_w / out_w), 0, s_w)

    def coords(start, size, grid, out, s):
        p = jnp.arange(out, dtype=jnp.float32)[:, None]
        i = jnp.arange(s, dtype=jnp.float32)[None, :]
        g = jnp.maximum(grid, 1.0)[..., None, None]
        c = start[..., None, None] + p * (size / out)[..., None, None] + (i + 0.5) * (size / out)[..., None, None] / g
        used = i < grid[..., None, None]
        return c, used  # (B, T, out, s)

    ys, used_y = coords(y1, roi_h, grid_h, out_h, s_h)
    xs, used_x = coords(x1, roi_w, grid_w, out_w, s_w)
    y = ys[:, :, :, :, None, None]  # (B,T,oh,sh,1,1)
    x = xs[:, :, None, None, :, :]  # (B,T,1,1,ow,sw)
    y, x = jnp.broadcast_arrays(y, x)  # (B,T,oh,sh,ow,sw)
    inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
    used = used_y[:, :, :, :, None, None] & used_x[:, :, None, None, :, :] & inside
    y, x = jnp.maximum(y, 0.0), jnp.maximum(x, 0.0)
    y0, x0 = jnp.minimum(jnp.floor(y), height - 1), jnp.minimum(jnp.floor(x), width - 1)
    y = jnp.where(y0 >= height - 1, y0, y)
    x = jnp.where(x0 >= width - 1, x0, x)
    y1i, x1i = jnp.minimum(y0 + 1, height - 1), jnp.minimum(x0 + 1, width - 1)
    ly, lx = y - y0, x - x0
    bidx = jnp.arange(batch)[:, None, None, None, None, None]
    y0, x0, y1i, x1i = (v.astype(jnp.int32) for v in (y0, x0, y1i, x1i))
    value = (
        ((1 - ly) * (1 - lx))[..., None] * features[bidx, y0, x0]
        + ((1 - ly) * lx)[..., None] * features[bidx, y0, x1i]
        + (ly * (1 - lx))[..., None] * features[bidx, y1i, x0]
        + (ly * lx)[..., None] * features[bidx, y1i, x1i]
    )  # (B,T,oh,sh,ow,sw,C)
    value = jnp.where(used[..., None], value, 0.0).sum(axis=(3, 5))
    count = jnp.maximum(grid_h * grid_w, 1.0)[:, :, None, None, None]
    return value / count


def random_boxes(rng, batch, num_boxes, image=224.0):
    centre = rng.uniform(0, image, size=(batch, num_boxes, 2))
    size = rng.uniform(16, image, size=(batch, num_boxes, 2))
    return np.clip(np.concatenate([centre - size / 2, centre + size / 2], -1), 0, image).astype(np.float32)


def timeit(fn, *args, iters):
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def pool_cases(iters, batch, num_boxes, grid, channels):
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.normal(size=(batch, grid, grid, channels)).astype(np.float32))
    bxs = jnp.asarray(random_boxes(rng, batch, num_boxes))
    for out in (1, 7):
        bound = default_max_samples_per_bin((grid, grid), (out, out))
        ours = lambda f, b: roi_align(f, b, (out, out), 1 / 16, -1, True)  # noqa: E731
        ref = lambda f, b: gather_roi_align(f, b, (out, out), 1 / 16, bound)  # noqa: E731
        diff = float(jnp.max(jnp.abs(jax.jit(ours)(feats, bxs) - jax.jit(ref)(feats, bxs))))
        assert diff < 1e-4, f"implementations disagree by {diff}"
        cot = jnp.asarray(rng.normal(size=(batch, num_boxes, out, out, channels)).astype(np.float32))
        for mode in ("forward", "forward+backward"):
            if mode == "forward":
                f_ours, f_ref = jax.jit(ours), jax.jit(ref)
            else:
                # value_and_grad: the forward output is needed, so XLA cannot drop the forward
                # matmul (for a linear op, a bare grad only needs the transposed one).
                f_ours = jax.jit(jax.value_and_grad(lambda f, b: jnp.sum(ours(f, b) * cot)))
                f_ref = jax.jit(jax.value_and_grad(lambda f, b: jnp.sum(ref(f, b) * cot)))
            t_ours, t_ref = timeit(f_ours, feats, bxs, iters=iters), timeit(f_ref, feats, bxs, iters=iters)
            n = batch * num_boxes
            print(json.dumps({
                "cpu": cpu_description(),
                "bench": "roi_align",
                "case": {"B": batch, "grid": f"{grid}x{grid}x{channels}", "T": num_boxes, "output": f"{out}x{out}",
                         "sampling_ratio": -1, "aligned": True, "mode": mode, "max_abs_diff": diff,
                         "backend": jax.default_backend()},
                "unit": "boxes/s", "ours": n / t_ours, "reference": n / t_ref,
                "reference_name": "gather-based bilinear RoIAlign in JAX (same semantics)",
                "speedup": t_ref / t_ours,
            }), flush=True)


def region_loss_case(iters, batch=8, num_boxes=20, grid=14, channels=512):
    """RoIAlign (1x1) + LRC + GR-a, forward+backward w.r.t. the dense features and the scale."""
    rng = np.random.default_rng(1)
    feats = jnp.asarray(rng.normal(size=(batch, grid, grid, channels)).astype(np.float32))
    bxs = jnp.asarray(random_boxes(rng, batch, num_boxes))
    lexeme = jnp.asarray(rng.normal(size=(batch, num_boxes, channels)).astype(np.float32))
    caption = jnp.asarray(rng.normal(size=(batch, num_boxes, channels)).astype(np.float32))
    mask = jnp.asarray(rng.random((batch, num_boxes)) < 0.8)
    ids = jnp.asarray(rng.integers(0, 50, (batch, num_boxes)).astype(np.int32))
    bound = default_max_samples_per_bin((grid, grid), (1, 1))
    pools = {
        "ours": lambda f, b: roi_align(f, b, (1, 1), 1 / 16, -1, True),
        "reference": lambda f, b: gather_roi_align(f, b, (1, 1), 1 / 16, bound),
    }
    timings = {}
    for name, pool in pools.items():
        def step(f, scale, pool=pool):
            region = pool(f, bxs)[:, :, 0, 0]
            lrc = losses.lexeme_region_contrastive_loss(region, lexeme, mask, ids, scale)
            gr = losses.region_caption_loss(region, caption, mask, scale)
            return lrc + gr

        timings[name] = timeit(jax.jit(jax.value_and_grad(step, argnums=(0, 1))), feats, jnp.float32(math.log(1 / 0.07)), iters=iters)
    print(json.dumps({
        "cpu": cpu_description(),
        "bench": "roi_align",
        "case": {"B": batch, "grid": f"{grid}x{grid}x{channels}", "T": num_boxes, "output": "1x1",
                 "what": "roi_align + LRC + GR-a, forward+backward", "ours_ms": 1e3 * timings["ours"],
                 "reference_ms": 1e3 * timings["reference"], "backend": jax.default_backend()},
        "unit": "steps/s", "ours": 1 / timings["ours"], "reference": 1 / timings["reference"],
        "reference_name": "same losses on gather-based RoIAlign",
        "speedup": timings["reference"] / timings["ours"],
    }), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 iteration (smoke test)")
    args = parser.parse_args()
    if args.quick:
        pool_cases(1, batch=2, num_boxes=4, grid=14, channels=16)
        region_loss_case(1, batch=2, num_boxes=4, channels=16)
    else:
        pool_cases(args.iters, batch=32, num_boxes=20, grid=14, channels=768)
        region_loss_case(args.iters)


if __name__ == "__main__":
    main()
