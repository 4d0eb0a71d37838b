"""RoIAlign in pure jax.numpy, with exact torchvision semantics, in separable form.

Bilinear interpolation factorises over the two spatial axes: a sample at (y, x) reads
``sum_{h,w} a_y(h) a_x(w) F[h, w]``, where ``a_y`` is a length-H vector with at most two non-zeros.
torchvision's out-of-map rule (a sample with y < -1, y > H, x < -1 or x > W contributes zero) is a
product of a y-test and an x-test, and its divisor ``grid_h * grid_w`` is a product too. So the whole
RoIAlign of one box is

    out[ph, pw, c] = sum_{h, w} Ay[ph, h] * Ax[pw, w] * F[h, w, c]

with ``Ay[ph, :]`` = the mean over the bin's y-samples of their 1-D interpolation vectors (zeroed for
samples outside the map). Both matrices are built with comparisons against ``arange(H)``, so the op
has no gather in the forward pass and no scatter in the backward pass: it is matmuls all the way, and
its gradient is the transposed einsum.

torchvision's adaptive sampling (``sampling_ratio <= 0``: ``ceil(roi_h / out_h)`` samples per bin
along y, likewise along x) is data dependent. We evaluate a static number of candidate samples per
bin per axis, ``max_samples_per_bin``, and mask the ones past the box's own count. The default bound
covers every box that lies inside the map (its roi side is at most the map side), plus one for
floating-point slack. A box that needs more samples than the bound (larger than the map) is sampled
with exactly ``max_samples_per_bin`` evenly spaced points per bin along that axis, i.e. the sample
grid is clamped: the result is then an approximation of torchvision's (a coarser average over the
same bin), never NaN.

Boxes get no gradient (as in torchvision): they are wrapped in ``stop_gradient``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

__all__ = ["roi_align", "default_max_samples_per_bin"]


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(f"roi_align: {name} must be a positive int or a pair of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def default_max_samples_per_bin(grid_size: tuple[int, int], output_size: tuple[int, int]) -> tuple[int, int]:
    """Static per-axis bound on adaptive samples per bin that covers every box inside the map.

    A box inside an (H, W) map has roi height <= H, so it needs ceil(H / out_h) samples per bin;
    the +1 absorbs float rounding of ``box * spatial_scale`` (e.g. 224 * (1/14) = 16.000002).
    """
    (height, width), (out_h, out_w) = grid_size, output_size
    return math.ceil(height / out_h) + 1, math.ceil(width / out_w) + 1


def _exact_div(numerator, denominator):
    """IEEE division, as torchvision's kernel does it.

    XLA's simplifier rewrites ``x / broadcast(d)`` (and ``x / const``) into ``x * (1 / d)``, which
    is off by an ulp: enough to flip ``ceil(14 / 7)`` to 3 or move a sample at exactly y = H out of
    the map. The barrier hides the broadcast so a true divide is emitted.
    """
    shape = jnp.broadcast_shapes(jnp.shape(numerator), jnp.shape(denominator))
    denominator = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(denominator, jnp.float32), shape))
    return jnp.broadcast_to(numerator, shape) / denominator


def _axis_weights(start, size, out_bins: int, length: int, sampling_ratio: int, max_samples: int):
    """Averaged 1-D interpolation matrices along one axis.

    Args:
      start, size: (...,) float32 roi start and extent on the grid (after offset and clamping).
      out_bins: number of output bins on this axis.
      length: grid length on this axis (H or W).
      sampling_ratio: > 0 for a fixed sample count, <= 0 for torchvision's adaptive count.
      max_samples: static number of candidate samples per bin (adaptive mode only).

    Returns:
      (..., out_bins, length) float32: row p is (1/n) * sum over the bin's n samples of their
      interpolation vectors; samples outside [-1, length] contribute zero.
    """
    bin_size = _exact_div(size, float(out_bins))
    if sampling_ratio > 0:
        grid = jnp.full_like(size, float(sampling_ratio))
        num_candidates = sampling_ratio
    else:
        # torchvision: (int) ceil(roi / out); a negative or zero count means no samples.
        grid = jnp.clip(jnp.ceil(bin_size), 0.0, float(max_samples))
        num_candidates = max_samples
    safe_grid = jnp.maximum(grid, 1.0)[..., None, None]

    bins = jnp.arange(out_bins, dtype=jnp.float32)[:, None]  # (P, 1)
    samples = jnp.arange(num_candidates, dtype=jnp.float32)[None, :]  # (1, S)
    start_, bin_ = start[..., None, None], bin_size[..., None, None]
    # Same operation order as torchvision's kernel, so float32 coordinates agree bit for bit.
    coord = start_ + bins * bin_ + _exact_div((samples + 0.5) * bin_, safe_grid)  # (..., P, S)

    used = (samples < grid[..., None, None]) & (coord >= -1.0) & (coord <= float(length))
    coord = jnp.maximum(coord, 0.0)
    low = jnp.floor(coord)
    at_edge = low >= length - 1
    low = jnp.where(at_edge, float(length - 1), low)
    high = jnp.where(at_edge, low, low + 1.0)
    frac = jnp.where(at_edge, 0.0, coord - low)

    cells = jnp.arange(length, dtype=jnp.float32)  # (L,)
    interp = (1.0 - frac)[..., None] * (cells == low[..., None]) + frac[..., None] * (cells == high[..., None])
    interp = jnp.where(used[..., None], interp, 0.0)  # (..., P, S, L)
    return interp.sum(axis=-2) / safe_grid  # (..., P, L)


def _roi_align_chunk(features, boxes, output_size, spatial_scale, sampling_ratio, aligned, max_samples, precision):
    _, height, width, _ = features.shape
    out_h, out_w = output_size
    offset = 0.5 if aligned else 0.0
    boxes = boxes.astype(jnp.float32)
    start_x = boxes[..., 0] * spatial_scale - offset
    start_y = boxes[..., 1] * spatial_scale - offset
    end_x = boxes[..., 2] * spatial_scale - offset
    end_y = boxes[..., 3] * spatial_scale - offset
    roi_w, roi_h = end_x - start_x, end_y - start_y
    if not aligned:  # torchvision's legacy mode forces rois of at least one cell
        roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)

    weights_y = _axis_weights(start_y, roi_h, out_h, height, sampling_ratio, max_samples[0])  # (B,T,oh,H)
    weights_x = _axis_weights(start_x, roi_w, out_w, width, sampling_ratio, max_samples[1])  # (B,T,ow,W)
    # The outer product of the two 1-D matrices is each bin's full weight map over the grid; one
    # batched matmul (T*oh*ow, H*W) x (H*W, C) then pools every box, and its transpose is the
    # backward pass. Measured on CPU (benchmarks/RESULTS.md): faster than contracting one axis at a
    # time, and flattening (H, W) into one contraction axis halves the backward (no layout copy).
    batch, num_boxes = boxes.shape[:2]
    channels = features.shape[-1]
    if _two_matmuls_are_cheaper(output_size, (height, width), channels):
        # Large outputs (e.g. crops resized to the model input): contract x, then y. The one-matmul form below
        # would build a (oh*ow, H*W) weight matrix per box, 17 GB for 256 crops of 64 x 64 px.
        along_x = jnp.einsum("btqw,bhwc->bthqc", weights_x.astype(features.dtype), features, precision=precision,
                             preferred_element_type=jnp.float32)
        pooled = jnp.einsum("btph,bthqc->btpqc", weights_y, along_x, precision=precision,
                            preferred_element_type=jnp.float32)
        return pooled.astype(features.dtype)
    weights = weights_y[:, :, :, None, :, None] * weights_x[:, :, None, :, None, :]  # (B,T,oh,ow,H,W)
    weights = weights.reshape(batch, num_boxes * out_h * out_w, height * width)
    pooled = jnp.einsum(
        "bnk,bkc->bnc",
        weights.astype(features.dtype),
        features.reshape(batch, height * width, -1),
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    return pooled.reshape(batch, num_boxes, out_h, out_w, -1).astype(features.dtype)


def _two_matmuls_are_cheaper(output_size, grid_size, channels: int) -> bool:
    """Whether contracting one axis at a time costs far fewer flops per box than one (oh*ow, H*W) matmul.

    Region pooling (1x1 to 7x7 bins on a 14x14 grid) stays on the single matmul, measured fastest there;
    crops (output as large as the image) take two."""
    (out_h, out_w), (height, width) = output_size, grid_size
    one = out_h * out_w * height * width * (channels + 1)  # weight product + matmul
    two = out_w * width * height * channels + out_h * height * out_w * channels
    return one > 8 * two


def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    output_size: int | Sequence[int] = (1, 1),
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
    *,
    max_samples_per_bin: int | Sequence[int] | None = None,
    box_chunk_size: int | None = None,
    precision=None,
) -> jax.Array:
    """RoIAlign with torchvision semantics, channels-last and batched per image.

    Args:
      features: (B, H, W, C) feature grid, float32 or bfloat16.
      boxes: (B, T, 4) boxes per image, xyxy in input coordinates; ``boxes * spatial_scale`` is in
        grid cells (cell centres at 0.5, 1.5, ... when ``aligned``).
      output_size: (out_h, out_w) bins per box, or an int for a square output.
      spatial_scale: factor from box coordinates to grid coordinates (1 / patch_size for pixel boxes).
      sampling_ratio: > 0: that many samples per bin along each axis. <= 0 (torchvision's -1):
        ceil(roi_h / out_h) x ceil(roi_w / out_w) samples per bin, per box (what FineCLIP uses).
      aligned: shift boxes by -0.5 cell (torchvision ``aligned=True``). With False, rois are at
        least one cell on each side (torchvision's legacy behaviour).
      max_samples_per_bin: static bound (int or (y, x)) on adaptive samples per bin. Default:
        ``default_max_samples_per_bin``, which covers every box inside the map. Boxes needing more
        are sampled with this many evenly spaced points per bin (an approximation; see module doc).
        Ignored when ``sampling_ratio > 0``.
      box_chunk_size: if set and smaller than T, boxes are processed in chunks of this size with
        ``jax.lax.map`` to bound the memory of the interpolation weights and the output.
      precision: passed to the einsum (e.g. ``jax.lax.Precision.HIGHEST`` on accelerators whose
        default float32 matmul is reduced precision).

    Returns:
      (B, T, out_h, out_w, C) pooled features in the dtype of ``features`` (accumulated in float32;
      for bfloat16 features the interpolation weights are rounded to bfloat16 too).
      Zero-area boxes and boxes entirely outside the map give zeros, as in torchvision.
    """
    features = jnp.asarray(features)
    boxes = jnp.asarray(boxes)
    if features.ndim != 4:
        raise ValueError(f"roi_align: features must be (B, H, W, C) channels-last, got shape {features.shape}")
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"roi_align: boxes must be (B, T, 4) xyxy, got shape {boxes.shape}")
    if boxes.shape[0] != features.shape[0]:
        raise ValueError(
            f"roi_align: features batch {features.shape[0]} != boxes batch {boxes.shape[0]}; "
            "boxes[b] are the boxes of image b"
        )
    if not jnp.issubdtype(features.dtype, jnp.floating):
        raise ValueError(f"roi_align: features must be floating point, got {features.dtype}")
    if not isinstance(sampling_ratio, int):
        raise ValueError(f"roi_align: sampling_ratio must be an int (-1 for adaptive), got {sampling_ratio!r}")
    output_size = _pair(output_size, "output_size")
    grid_size = features.shape[1:3]
    if max_samples_per_bin is None:
        max_samples = default_max_samples_per_bin(grid_size, output_size)
    else:
        max_samples = _pair(max_samples_per_bin, "max_samples_per_bin")

    boxes = jax.lax.stop_gradient(boxes)
    pool = lambda chunk: _roi_align_chunk(  # noqa: E731
        features, chunk, output_size, float(spatial_scale), sampling_ratio, bool(aligned), max_samples, precision
    )
    num_boxes = boxes.shape[1]
    if box_chunk_size is None or box_chunk_size >= num_boxes:
        return pool(boxes)
    if box_chunk_size <= 0:
        raise ValueError(f"roi_align: box_chunk_size must be positive, got {box_chunk_size}")

    num_chunks = -(-num_boxes // box_chunk_size)
    padded = jnp.pad(boxes, ((0, 0), (0, num_chunks * box_chunk_size - num_boxes), (0, 0)))
    chunks = padded.reshape(boxes.shape[0], num_chunks, box_chunk_size, 4).swapaxes(0, 1)
    pooled = jax.lax.map(pool, chunks)  # (n, B, chunk, oh, ow, C)
    pooled = pooled.swapaxes(0, 1).reshape(boxes.shape[0], num_chunks * box_chunk_size, *pooled.shape[3:])
    return pooled[:, :num_boxes]
