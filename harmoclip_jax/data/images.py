"""Encoded image -> model input pixels: the one preprocessing of training, evaluation and inference.

PIL and numpy only (no grain, TFDS, jax): input workers and the accelerator suite's process pool import it alone.
`decode_to_canvas` is the same preprocessing with its last step (the bicubic squash) left to the device
(`ops/resize.py`; `config.data.resize_canvas`).
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
    picture = _open_drafted(image, size)
    if picture.size != (size, size):
        picture = picture.resize((size, size), Image.BICUBIC)
    pixels = np.asarray(picture, dtype=np.uint8)
    if dtype == "uint8":
        return pixels
    if dtype != "float32":
        raise ValueError(f"image dtype {dtype!r}: use 'float32' (normalised here) or 'uint8' (on the device)")
    return normalize_pixels(pixels, mean, std)


def _open_drafted(image: Any, size: int) -> Image.Image:
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    picture = Image.open(io.BytesIO(image))
    picture.draft("RGB", (size, size))  # JPEG: decode at a reduced DCT scale that still covers size x size
    return picture.convert("RGB")


def decode_to_canvas(image: Any, size: int, canvas: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoded bytes (or a uint8 HWC array) -> ((canvas, canvas, 3) uint8 zeros with the decoded picture at the
    top-left, its (height, width) int32), for `ops.resize.resize_from_canvas(..., size)` on the device: together
    the same pixels as `decode_image(image, size, dtype="uint8")`. A picture larger than the canvas (after the
    JPEG draft) is squashed to size x size here instead (its height and width are then size)."""
    picture = _open_drafted(image, size)
    if picture.width > canvas or picture.height > canvas:
        picture = picture.resize((size, size), Image.BICUBIC)
    out = np.zeros((canvas, canvas, 3), np.uint8)
    out[: picture.height, : picture.width] = np.asarray(picture, dtype=np.uint8)
    return out, np.asarray([picture.height, picture.width], np.int32)
