"""Box helpers: format conversions, unit changes, clipping, the validity rule, crop enlargement.

Every function works on NumPy arrays (returns NumPy, for data pipelines) and on JAX arrays (returns
JAX, traceable under jit/vmap): the array module is picked from the input. Boxes are (..., 4) with
the last axis in the named format; ``image_size`` is always (height, width).

Formats: ``xyxy`` = (x1, y1, x2, y2) corners; ``xywh`` = (x1, y1, width, height);
``cxcywh`` = (centre x, centre y, width, height).
Units: pixels of the model-input image; normalised = pixels / (width, height) in [0, 1].
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

__all__ = [
    "xywh_to_xyxy",
    "xyxy_to_cxcywh",
    "cxcywh_to_xyxy",
    "pixels_to_normalized",
    "normalized_to_pixels",
    "clip_boxes",
    "box_faults",
    "OK",
    "NON_FINITE",
    "EMPTY",
    "TOO_SMALL",
    "OUTSIDE",
    "enlarge_boxes",
]

# Why a box is unusable (`box_faults`), in the order the rules are checked: a box gets the first that applies.
OK, NON_FINITE, EMPTY, TOO_SMALL, OUTSIDE = range(5)


def _xp(boxes):
    return np if isinstance(boxes, (np.ndarray, np.generic, list, tuple)) else jnp


def _check(boxes, fn: str):
    xp = _xp(boxes)
    boxes = xp.asarray(boxes)
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{fn}: boxes must have a last axis of size 4, got shape {boxes.shape}")
    return xp, boxes


def _split(boxes):
    return boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]


def _size_pair(image_size, fn: str):
    if len(image_size) != 2:
        raise ValueError(f"{fn}: image_size must be (height, width), got {image_size!r}")
    return image_size[0], image_size[1]


def xywh_to_xyxy(boxes):
    """(x1, y1, w, h) -> (x1, y1, x2, y2)."""
    xp, boxes = _check(boxes, "xywh_to_xyxy")
    x1, y1, w, h = _split(boxes)
    return xp.stack([x1, y1, x1 + w, y1 + h], axis=-1)


def xyxy_to_cxcywh(boxes):
    """(x1, y1, x2, y2) -> (cx, cy, w, h)."""
    xp, boxes = _check(boxes, "xyxy_to_cxcywh")
    x1, y1, x2, y2 = _split(boxes)
    return xp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def cxcywh_to_xyxy(boxes):
    """(cx, cy, w, h) -> (x1, y1, x2, y2)."""
    xp, boxes = _check(boxes, "cxcywh_to_xyxy")
    cx, cy, w, h = _split(boxes)
    return xp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def _scale_xy(boxes, sx, sy, fn):
    xp, boxes = _check(boxes, fn)
    return boxes * xp.asarray([sx, sy, sx, sy], dtype=boxes.dtype if xp.issubdtype(boxes.dtype, xp.floating) else None)


def pixels_to_normalized(boxes, image_size):
    """xyxy pixel boxes -> [0, 1] coordinates relative to an image of ``image_size`` = (h, w)."""
    height, width = _size_pair(image_size, "pixels_to_normalized")
    return _scale_xy(boxes, 1.0 / width, 1.0 / height, "pixels_to_normalized")


def normalized_to_pixels(boxes, image_size):
    """[0, 1] xyxy boxes -> pixels of an image of ``image_size`` = (h, w)."""
    height, width = _size_pair(image_size, "normalized_to_pixels")
    return _scale_xy(boxes, width, height, "normalized_to_pixels")


def clip_boxes(boxes, image_size):
    """Clip xyxy boxes to [0, width] x [0, height]."""
    height, width = _size_pair(image_size, "clip_boxes")
    xp, boxes = _check(boxes, "clip_boxes")
    x1, y1, x2, y2 = _split(boxes)
    return xp.stack(
        [xp.clip(x1, 0, width), xp.clip(y1, 0, height), xp.clip(x2, 0, width), xp.clip(y2, 0, height)], axis=-1
    )


def box_faults(boxes, image_size, *, tolerance: float = 0.0, min_size: float = 0.0):
    """The validity rule of xyxy boxes: per box, the first rule it breaks, as an int code.

    ``OK`` (0): usable. ``NON_FINITE``: a coordinate is NaN or infinite. ``EMPTY``: x2 <= x1 or y2 <= y1.
    ``TOO_SMALL``: width or height below ``min_size``. ``OUTSIDE``: beyond [0, width] x [0, height] of
    ``image_size`` = (h, w) by more than ``tolerance`` (in the boxes' units: (1, 1) for normalised boxes).
    """
    xp, boxes = _check(boxes, "box_faults")
    height, width = _size_pair(image_size, "box_faults")
    x1, y1, x2, y2 = _split(boxes)
    with np.errstate(invalid="ignore"):  # inf - inf: such boxes are NON_FINITE already
        small = (x2 - x1 < min_size) | (y2 - y1 < min_size)
    outside = (x1 < -tolerance) | (y1 < -tolerance) | (x2 > width + tolerance) | (y2 > height + tolerance)
    rules = [~xp.isfinite(boxes).all(axis=-1), (x2 <= x1) | (y2 <= y1), small, outside]
    return xp.select(rules, [NON_FINITE, EMPTY, TOO_SMALL, OUTSIDE], OK)


def enlarge_boxes(boxes, scale: float = 1.5, image_size=None):
    """Scale xyxy boxes about their centres (FineCLIP/CLIPSelf crop boxes use 1.5x).

    With ``image_size`` = (h, w) the result is clipped to the image, so the crop is the part of the
    enlarged box that exists.
    """
    xp, boxes = _check(boxes, "enlarge_boxes")
    if scale <= 0:
        raise ValueError(f"enlarge_boxes: scale must be positive, got {scale}")
    cx, cy, w, h = _split(xyxy_to_cxcywh(boxes))
    enlarged = cxcywh_to_xyxy(xp.stack([cx, cy, w * scale, h * scale], axis=-1))
    return enlarged if image_size is None else clip_boxes(enlarged, image_size)
