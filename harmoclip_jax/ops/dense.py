"""Dense scores: every patch feature against text embeddings, upsampled to pixels.

The one implementation of MaskCLIP-style zero-shot scoring, used on the device by the segmentation evaluator and on
the host by the Predictor's similarity and label maps. Functions take numpy or jax arrays and compute with the
module of their input (jit-safe with jax).

Upsampling is bilinear with half-pixel centres and clamped edges, i.e. PyTorch's `interpolate(mode="bilinear",
align_corners=False)`, written as two interpolation matrices (`maps_out = Wy @ maps @ Wx^T` per channel): the
output can have any height and width (an image's own size and aspect ratio), and it stays a matmul on every
platform.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np  # tracers are jax.Arrays too


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out_size, in_size) float32: row o holds the weights of output pixel o over the input pixels (half-pixel
    centres, edges clamped; no antialiasing when downsampling, as PyTorch's default)."""
    src = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo).astype(np.float32)
    weights = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, lo), 1 - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights


def unit(features, eps: float = 1e-12):
    """L2-normalises the last axis (float32); zero vectors stay zero."""
    xp = _xp(features)
    features = features.astype(xp.float32)
    return features / xp.maximum(xp.linalg.norm(features, axis=-1, keepdims=True), eps)


def patch_cosine(dense, texts):
    """(..., h, w, E) patch features, (T, E) unit text embeddings -> (..., h, w, T) cosine similarities."""
    xp = _xp(dense)
    texts = texts.astype(xp.float32)
    if xp is jnp:
        return jnp.einsum("...e,te->...t", unit(dense), texts, precision=jax.lax.Precision.HIGHEST)
    return unit(dense) @ texts.T


def upsample(maps, out_hw: tuple[int, int]):
    """(..., h, w, C) -> (..., H, W, C) bilinear (see module doc); `out_hw` = (H, W)."""
    h, w = maps.shape[-3:-1]
    if (h, w) == tuple(out_hw):
        return maps
    wy, wx = bilinear_matrix(out_hw[0], h), bilinear_matrix(out_hw[1], w)
    if _xp(maps) is jnp:
        hp = jax.lax.Precision.HIGHEST
        rows = jnp.einsum("yh,...hwc->...ywc", wy, maps, precision=hp)
        return jnp.einsum("xw,...ywc->...yxc", wx, rows, precision=hp)
    rows = np.einsum("yh,...hwc->...ywc", wy, maps.astype(np.float32))
    return np.einsum("xw,...ywc->...yxc", wx, rows)


def predict_classes(dense, classes, out_hw: tuple[int, int]):
    """(..., h, w, E) dense features, (C, E) unit class embeddings -> (..., H, W) int32 argmax class per pixel of
    the upsampled cosine logits."""
    xp = _xp(dense)
    return xp.argmax(upsample(patch_cosine(dense, classes), out_hw), axis=-1).astype(xp.int32)
