"""PIL's bicubic resize on the device: pictures on a fixed canvas (each its own size) -> (S, S) model images.

Why: on a CPU host, decoding a COCO-size JPEG and resizing it to 224 x 224 with PIL's bicubic cost about the whole
per-image budget an H200 leaves (4.8 ms per core at ~3,400 images/s); the resize is ~1.2-1.5 ms of it. With
`config.data.resize_canvas` the host ships each draft-decoded picture at the top-left of a zero canvas with its
(height, width), and this op finishes the squash to S x S inside the jitted step, as two batched matmuls.

Same numbers as the host: PIL's algorithm for 8-bit images (`ImagingResample`): separable, the horizontal pass
first, rounded and clipped to uint8 in between and at the end; Keys cubic with a = -0.5, its support widened by
the scale when downsampling (antialiasing); each output pixel's taps cut to PIL's window (its `(int)` truncations)
inside the picture and normalised to sum 1. PIL computes in fixed point, this in float32 (HIGHEST matmul
precision, so no TF32 on GPUs): outputs agree exactly except, rarely, by 1 where a value sits at a rounding edge.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_SUPPORT = 2.0  # bicubic
_A = -0.5


def _bicubic(x: jax.Array) -> jax.Array:
    x = jnp.abs(x)
    near = ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * _A
    return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def resample_weights(in_size: jax.Array, out_size: int, canvas: int) -> jax.Array:
    """(B,) input lengths -> (B, out_size, canvas) float32: row o holds the taps of output pixel o over the
    canvas positions (zero beyond each picture's length)."""
    in_size = in_size.astype(jnp.float32)[:, None, None]
    scale = in_size / out_size
    filter_scale = jnp.maximum(scale, 1.0)
    support = _SUPPORT * filter_scale
    center = (jnp.arange(out_size, dtype=jnp.float32)[None, :, None] + 0.5) * scale
    j = jnp.arange(canvas, dtype=jnp.float32)[None, None, :]
    lo = jnp.maximum(jnp.trunc(center - support + 0.5), 0.0)
    hi = jnp.minimum(jnp.trunc(center + support + 0.5), in_size)
    w = jnp.where((j >= lo) & (j < hi), _bicubic((j - center + 0.5) / filter_scale), 0.0)
    total = w.sum(-1, keepdims=True)
    return w / jnp.where(total == 0.0, 1.0, total)


def _to_levels(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def resize_from_canvas(canvas: jax.Array, hw: jax.Array, size: int) -> jax.Array:
    """(B, C, C, 3) pictures (each at the top-left, `hw` (B, 2) its height and width) -> (B, size, size, 3)
    float32 holding uint8 levels: each picture squashed to size x size as PIL's `resize(BICUBIC)` does."""
    c_h, c_w = canvas.shape[1:3]
    wx = resample_weights(hw[:, 1], size, c_w)
    wy = resample_weights(hw[:, 0], size, c_h)
    pixels = canvas.astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    rows = _to_levels(jnp.einsum("bxj,byjc->byxc", wx, pixels, precision=hp))
    return _to_levels(jnp.einsum("boy,byxc->boxc", wy, rows, precision=hp))
