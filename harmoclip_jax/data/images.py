"""Encoded image -> model input pixels: the one preprocessing of training, evaluation and inference.

PIL, numpy and simplejpeg only (no grain, TFDS, jax): input workers and the accelerator suite's process pool import
it alone. `decode_to_canvas` is the same preprocessing with its last step (the bicubic squash) left to the device
(`ops/resize.py`; `config.data.resize_canvas`).

JPEGs in YCbCr or grayscale decode through simplejpeg (libjpeg-turbo without PIL's image objects) at the DCT scale
PIL's `draft` picks: the same pixels, bit for bit (tests/test_pipeline.py), ~15 % less decode time per 640x480 JPEG
(0.4-0.6 ms of ~3 on a 2-core AMD EPYC; decode is half the input pipeline's budget at accelerator rate). Anything
else (PNG, CMYK JPEGs, simplejpeg missing or refusing a file) takes PIL's path.
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
from PIL import Image

try:
    import simplejpeg
except ImportError:  # a listed requirement; without it PIL decodes everything, to the same pixels
    simplejpeg = None

from harmoclip_jax.models.normalization import OPENAI_CLIP, normalize_pixels


def decode_image(image: Any, size: int, mean: Sequence[float] = OPENAI_CLIP[0],
                 std: Sequence[float] = OPENAI_CLIP[1], dtype: str = "float32") -> np.ndarray:
    """Encoded bytes (or a uint8 HWC array) -> (size, size, 3), squashed: float32 normalised with the per-channel
    `mean` / `std` of [0, 1] pixels (a model's `Backbone.image_mean` / `image_std`), or with `dtype="uint8"` the raw
    pixels, which the device normalises (`ModelGlue.model_images`): 4x fewer bytes to make, batch and transfer."""
    pixels = decode_drafted(image, size)
    if pixels.shape[:2] != (size, size):
        pixels = _squash(pixels, size)
    if dtype == "uint8":
        return pixels
    if dtype != "float32":
        raise ValueError(f"image dtype {dtype!r}: use 'float32' (normalised here) or 'uint8' (on the device)")
    return normalize_pixels(pixels, mean, std)


def decode_drafted(image: Any, size: int) -> np.ndarray:
    """Encoded bytes (or a uint8 HWC array) -> (H, W, 3) uint8 RGB; a JPEG decoded at the smallest power-of-two DCT
    scale that still covers size x size (PIL's `draft`)."""
    if isinstance(image, np.ndarray):
        return np.asarray(Image.fromarray(image).convert("RGB"))
    pixels = _decode_jpeg_turbo(image, size) if simplejpeg is not None else None
    return pixels if pixels is not None else decode_drafted_pil(image, size)


def decode_drafted_pil(image: bytes, size: int) -> np.ndarray:
    """`decode_drafted` through PIL alone: any format PIL reads."""
    picture = Image.open(io.BytesIO(image))
    picture.draft("RGB", (size, size))  # JPEG: decode at a reduced DCT scale that still covers size x size
    return np.asarray(picture.convert("RGB"))


def _decode_jpeg_turbo(data: bytes, size: int) -> np.ndarray | None:
    """A YCbCr or grayscale JPEG through simplejpeg, at PIL's draft scale; None where PIL must decide."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or bytes(data[:2]) != b"\xff\xd8":
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray"):  # CMYK/YCCK: PIL's conversion differs by a level
            return None
        # PIL's draft: the largest of 8, 4, 2, 1 not above min(width // size, height // size); output ceil(x / s).
        ratio = min(width // size, height // size)
        scale = next((s for s in (8, 4, 2) if ratio >= s), 1)
        want = (-(-height // scale), -(-width // scale))
        pixels = simplejpeg.decode_jpeg(data, "RGB", fastdct=False, fastupsample=False, min_height=want[0],
                                        min_width=want[1])
    except ValueError:  # corrupt or unusual: PIL raises its own error, or reads it
        return None
    return pixels if pixels.shape[:2] == want else None


def _squash(pixels: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, PIL's bicubic (the squash `ops/resize.py` reproduces on device)."""
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BICUBIC))


def decode_to_canvas(image: Any, size: int, canvas: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoded bytes (or a uint8 HWC array) -> ((canvas, canvas, 3) uint8 zeros with the decoded picture at the
    top-left, its (height, width) int32), for `ops.resize.resize_from_canvas(..., size)` on the device: together
    the same pixels as `decode_image(image, size, dtype="uint8")`. A picture larger than the canvas (after the
    JPEG draft) is squashed to size x size here instead (its height and width are then size)."""
    pixels = decode_drafted(image, size)
    if pixels.shape[0] > canvas or pixels.shape[1] > canvas:
        pixels = _squash(pixels, size)
    height, width = pixels.shape[:2]
    out = np.zeros((canvas, canvas, 3), np.uint8)
    out[:height, :width] = pixels
    return out, np.asarray([height, width], np.int32)
