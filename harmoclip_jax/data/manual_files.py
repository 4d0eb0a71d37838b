"""Helpers shared by the builders of real datasets that read manually downloaded files (COCO, Flickr30k).

Nothing here downloads anything: the files are fetched by hand (docs/datasets.md) into a `manual_dir`, and these
helpers find them, fail with a message that names every missing file, turn COCO-style boxes into the
normalised xyxy boxes of the record schema (features.py) and write the records of the retrieval sets.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from harmoclip_jax.data.features import no_segmentation

logger = logging.getLogger("harmoclip_jax.data")

# FineCLIP's region size filter (training/data.py: min_size=8, max_size=1024 on the box area w*h).
MIN_BOX_SIZE = 8
MAX_BOX_SIZE = 1024
RETRIEVAL_CAPTIONS_PER_IMAGE = 5


class MissingDatasetFilesError(FileNotFoundError):
    """Manually downloaded files a builder needs are not where it looks for them."""


def manual_dir_of(dl_manager) -> Path:
    """The manual directory a TFDS download manager was given, without TFDS's 'does not exist' assertion.

    The builders check the directory themselves so that the error names the exact files they expect.
    """
    # `dl_manager.manual_dir` asserts before we could list the expected files, so read the configured path.
    path = getattr(dl_manager, "_manual_dir", None)
    if path is None:
        path = dl_manager.manual_dir
    return Path(os.fspath(path))


def require_files(root: Path, expected: Mapping[str, str], dataset: str, how_to_get: str) -> None:
    """Raise MissingDatasetFilesError listing every entry of `expected` (relative path -> what it is) not in root.

    Directories in `expected` end with "/" and must exist and be non-empty.
    """
    missing = []
    for relative, what in expected.items():
        path = root / relative.rstrip("/")
        if relative.endswith("/"):
            ok = path.is_dir() and any(path.iterdir())
        else:
            ok = path.is_file()
        if not ok:
            missing.append(f"  {path}{'/' if relative.endswith('/') else ''}   ({what})")
    if missing:
        raise MissingDatasetFilesError(
            f"{dataset}: missing manually downloaded files in manual_dir {root}:\n"
            + "\n".join(missing)
            + f"\n{how_to_get.strip()}\nSee docs/datasets.md for the full directory layout."
        )


def require_images(paths: list[Path], dataset: str, image_dir: Path) -> None:
    """Raise MissingDatasetFilesError if any image file is absent (names up to 5 and the count)."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = "\n".join(f"  {p}" for p in missing[:5])
        raise MissingDatasetFilesError(
            f"{dataset}: {len(missing)} of {len(paths)} images listed in the annotations are missing under "
            f"{image_dir}, e.g.:\n{shown}\nUnpack the complete image archive there (docs/datasets.md)."
        )


def load_json(path: Path):
    """json.load with a log line (COCO annotation files take seconds to parse)."""
    logger.info("reading %s", path)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def image_for_tfds(path: Path):
    """What to hand the TFDS Image feature: the file path (bytes stored as they are) when it decodes to RGB or
    grayscale, else an RGB PIL image (CMYK / palette / alpha JPEGs and PNGs would decode to 4 or 1 channels)."""
    with Image.open(path) as image:
        if image.mode in ("RGB", "L"):
            return os.fspath(path)
        return image.convert("RGB")


def passes_size_filter(w: float, h: float, min_size: float = MIN_BOX_SIZE, max_size: float = MAX_BOX_SIZE) -> bool:
    """FineCLIP's filter: keep a box unless its area w*h < min_size**2 or > max_size**2 (pixels)."""
    area = w * h
    return min_size**2 <= area <= max_size**2


def normalised_xyxy(x: float, y: float, w: float, h: float, width: int, height: int) -> np.ndarray | None:
    """COCO xywh pixels -> xyxy in [0, 1] of the original image, clipped to it; None if nothing is left."""
    x0, x1 = np.clip([x, x + w], 0.0, width)
    y0, y1 = np.clip([y, y + h], 0.0, height)
    if x1 <= x0 or y1 <= y0:
        return None
    return np.array([x0 / width, y0 / height, x1 / width, y1 / height], dtype=np.float32)


def empty_regions() -> dict:
    """The `regions` value of a record without regions."""
    return {
        "box": np.zeros((0, 4), np.float32),
        "caption": [],
        "lexeme": [],
        "label": np.zeros((0,), np.int64),
    }


def first_captions(captions: list[str], image: str, n: int = RETRIEVAL_CAPTIONS_PER_IMAGE) -> list[str]:
    """Exactly n captions for retrieval: the first n in file order (a few COCO val images have 6-7); fewer is an
    error, since the protocol's recall counts assume n captions per image."""
    if len(captions) < n:
        raise ValueError(f"{image}: retrieval needs {n} captions per image, the annotations give {len(captions)}")
    return captions[:n]


def retrieval_examples(items: list[tuple[int, Path, list[str]]]):
    """(key, record) of each retrieval item (image_id, image path, captions): the image and its captions, no
    regions (what a builder's `_generate_examples` yields)."""
    for image_id, path, captions in items:
        yield image_id, {
            "image": image_for_tfds(path),
            "image_id": image_id,
            "file_name": path.name,
            "captions": captions,
            "regions": empty_regions(),
            "segmentation": no_segmentation(),
        }
