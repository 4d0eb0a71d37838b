"""Encoded image -> model input pixels: the one preprocessing of training, evaluation and inference.

PIL and numpy only (no grain, TFDS, jax): input workers and the accelerator suite's process pool import it alone.
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
from PIL import Image

from harmoclip_jax.models.normalization import OPENAI_CLIP, normalize_pixels


def decode_image(image: Any, size: int, mean: Sequence[float] = OPENAI_CLIP[0],
                 std: Sequence[float] = OPENAI_CLIP[1], dtype: str = "float32") -> np.ndarray:
    """Encoded bytes (or a uint8 HWC array) -> (size, size, 3), squashed: float32 normalised with the per-channel
    `mean` / `std` of [0, 1] pixels (a model's `Backbone.image_mean` / `image_std`), or with `dtype="uint8"` the raw
    pixels, which the device normalises (`ModelGlue.model_images`): 4x fewer bytes to make, batch and transfer."""
    if isinstance(image, np.ndarray):
        picture = Image.fromarray(image)
    else:
        picture = Image.open(io.BytesIO(image))
        picture.draft("RGB", (size, size))  # JPEG: decode at a reduced DCT scale that still covers size x size
    picture = picture.convert("RGB")
    if picture.size != (size, size):
        picture = picture.resize((size, size), Image.BICUBIC)
    pixels = np.asarray(picture, dtype=np.uint8)
    if dtype == "uint8":
        return pixels
    if dtype != "float32":
        raise ValueError(f"image dtype {dtype!r}: use 'float32' (normalised here) or 'uint8' (on the device)")
    return normalize_pixels(pixels, mean, std)
