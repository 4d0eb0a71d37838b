"""Checking what users pass to the inference API: images, boxes, labels, texts. Every problem is an `InputError`
whose message says what to change."""
from __future__ import annotations

import collections
import io
import os
import pathlib
from typing import Any, Union

import jax
import numpy as np
from PIL import Image

from harmoclip_jax.ops import boxes as box_ops

ImageInput = Union[str, os.PathLike, bytes, np.ndarray, Image.Image]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BOX_FORMATS = ("xyxy", "xywh", "cxcywh")
# Boxes may overshoot the image by this many pixels (rounding in annotation tools); they are clipped.
BOX_TOLERANCE_PX = 0.5


class InputError(ValueError):
    """Bad input to the inference API (image, boxes, labels, texts, checkpoint path); the message says the fix."""


# --------------------------------------------------------------------------------------------- image input


def read_image(image: ImageInput, where: str = "image") -> tuple[Any, tuple[int, int]]:
    """Checks one image input and returns (what `pipeline.decode_image` takes, (width, height)).

    Files and bytes stay encoded, so they are decoded exactly like training records (JPEG draft mode included);
    PIL images and numpy arrays become uint8 (H, W, 3) arrays.
    """
    if isinstance(image, (str, os.PathLike)):
        path = pathlib.Path(image).expanduser()
        if not path.is_file():
            raise InputError(f"{where}: image file {str(path)!r} does not exist" +
                             (" (it is a directory; pass the image files, or a folder to retrieve())"
                              if path.is_dir() else ""))
        data = path.read_bytes()
        return data, _encoded_size(data, f"{where} ({path})")
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        return data, _encoded_size(data, where)
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
        return array, (array.shape[1], array.shape[0])
    if isinstance(image, (np.ndarray, jax.Array)):
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise InputError(f"{where}: numpy images must be uint8 (0-255), got dtype {array.dtype}; convert float "
                             "images in [0, 1] with (image * 255).round().astype(np.uint8)")
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
            raise InputError(f"{where}: numpy images must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
        if array.shape[0] < 1 or array.shape[1] < 1:
            raise InputError(f"{where}: empty image of shape {array.shape}")
        if array.ndim == 3 and array.shape[-1] == 4:
            array = np.asarray(Image.fromarray(array).convert("RGB"))
        return array, (array.shape[1], array.shape[0])
    raise InputError(f"{where}: expected a file path, encoded bytes, a PIL image or a uint8 numpy array, got "
                     f"{type(image).__name__}")


def _encoded_size(data: bytes, where: str) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as picture:
            picture.verify()  # catches truncated / corrupt files before they reach the decoder in a batch
        with Image.open(io.BytesIO(data)) as picture:
            return picture.size
    except Exception as error:  # noqa: BLE001 - every PIL failure means the same to the caller
        raise InputError(f"{where}: cannot read the image ({type(error).__name__}: {error}); supported formats are "
                         "those of Pillow (JPEG, PNG, BMP, GIF, WebP, TIFF, ...)") from error


def load_pil_image(image: ImageInput) -> Image.Image:
    """Any image input as an RGB PIL image (for drawing)."""
    payload, _ = read_image(image)
    if isinstance(payload, bytes):
        return Image.open(io.BytesIO(payload)).convert("RGB")
    return Image.fromarray(payload).convert("RGB")


def list_images(folder: str | os.PathLike) -> list[pathlib.Path]:
    """The image files (by extension, sorted by name) directly inside `folder`."""
    folder = pathlib.Path(folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"{str(folder)!r} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"folder {str(folder)!r} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def image_list(images) -> tuple[list[ImageInput], list[str]]:
    """A folder path or a sequence of image inputs -> (inputs, display names)."""
    if isinstance(images, (str, os.PathLike)) and pathlib.Path(images).expanduser().is_dir():
        files = list_images(images)
        return list(files), [str(f) for f in files]
    if isinstance(images, (str, os.PathLike, bytes, np.ndarray, Image.Image)) and not (
            isinstance(images, np.ndarray) and images.ndim == 4):
        images = [images]
    images = list(images)
    if not images:
        raise InputError("no images given")
    names = [str(x) if isinstance(x, (str, os.PathLike)) else f"#{i}" for i, x in enumerate(images)]
    return images, names


# -------------------------------------------------------------------------------------------------- boxes


def check_boxes(boxes, image_size: tuple[int, int], box_format: str = "xyxy", where: str = "boxes") -> np.ndarray:
    """Validates pixel boxes of an image of `image_size` = (width, height); returns (T, 4) float32 xyxy, clipped.

    Raises `InputError` for a wrong shape, non-finite values, empty or inverted boxes, boxes smaller than a pixel
    (normalised coordinates, usually) and boxes outside the image by more than `BOX_TOLERANCE_PX`.
    """
    if box_format not in BOX_FORMATS:
        raise InputError(f"box_format={box_format!r}; use one of {BOX_FORMATS}")
    try:
        array = np.asarray(boxes, np.float64)
    except (TypeError, ValueError) as error:
        raise InputError(f"{where}: boxes must be numbers shaped (T, 4), got {boxes!r}") from error
    if array.ndim != 2 or array.shape[-1] != 4:
        hint = " (one box: [[x1, y1, x2, y2]])" if array.shape == (4,) else ""
        raise InputError(f"{where}: boxes must have shape (T, 4) ({box_format} pixels), got {array.shape}{hint}")
    if len(array) == 0:
        raise InputError(f"{where}: no boxes given; pass at least one {box_format} pixel box")
    xyxy = {"xyxy": lambda b: b, "xywh": box_ops.xywh_to_xyxy, "cxcywh": box_ops.cxcywh_to_xyxy}[box_format](array)
    width, height = image_size
    faults = box_ops.box_faults(xyxy, (height, width), tolerance=BOX_TOLERANCE_PX, min_size=1.0)
    non_finite = np.flatnonzero(faults == box_ops.NON_FINITE)
    bad = int(non_finite[0]) if len(non_finite) else (int(np.flatnonzero(faults)[0]) if faults.any() else None)
    if bad is not None:
        given, fault = array[bad].tolist(), int(faults[bad])
        raise InputError(f"{where}: box {bad} {given} " + {
            box_ops.NON_FINITE: "has a non-finite coordinate",
            box_ops.EMPTY: f"has x2 <= x1 or y2 <= y1 as {box_format}. Boxes are pixel (x1, y1, x2, y2) corners by "
                           "default; for (x, y, width, height) pass box_format='xywh' (CLI: --box_format=xywh)",
            box_ops.TOO_SMALL: f"is smaller than one pixel of the {width}x{height} image. Boxes are in pixels; "
                               "multiply normalised [0, 1] coordinates by the image width and height",
            box_ops.OUTSIDE: f"({box_format}) lies outside the image, which is {width} wide and {height} high (x in "
                             f"[0, {width}], y in [0, {height}]); boxes must be pixels of the image as given, before "
                             "any resizing",
        }[fault])
    return box_ops.clip_boxes(xyxy, (height, width)).astype(np.float32)


def model_input_boxes(boxes_xyxy: np.ndarray, image_size: tuple[int, int], model_size: int) -> np.ndarray:
    """Pixel xyxy boxes of a (width, height) image -> pixels of the squashed model_size x model_size input (the
    same normalised-box-times-S rule the pipeline applies to dataset boxes)."""
    width, height = image_size
    normalised = box_ops.pixels_to_normalized(boxes_xyxy, (height, width))
    return box_ops.normalized_to_pixels(normalised, (model_size, model_size)).astype(np.float32)


def parse_boxes(text: str) -> np.ndarray:
    """`"x1,y1,x2,y2;x1,y1,x2,y2"` -> (T, 4) float array (the CLI's --boxes)."""
    rows = [r for r in text.replace("\n", ";").split(";") if r.strip()]
    if not rows:
        raise InputError(f"--boxes {text!r} has no box; write boxes as 'x1,y1,x2,y2;x1,y1,x2,y2'")
    out = []
    for i, row in enumerate(rows):
        parts = [p for p in row.replace(" ", ",").split(",") if p]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise InputError(f"--boxes: box {i} {row.strip()!r} is not four numbers; write boxes as "
                             "'x1,y1,x2,y2;x1,y1,x2,y2'") from None
        if len(values) != 4:
            raise InputError(f"--boxes: box {i} {row.strip()!r} has {len(values)} numbers, expected 4 "
                             "(x1,y1,x2,y2); separate boxes with ';'")
        out.append(values)
    return np.asarray(out, np.float64)


def check_texts(texts, what: str = "texts") -> list[str]:
    """A non-empty list of non-empty strings (a single string is refused: it is a sequence of characters)."""
    if isinstance(texts, (str, bytes)):
        raise InputError(f"{what} must be a list of strings, got the single string {texts!r}; e.g. ['cat', 'dog']")
    texts = [str(x) for x in texts]
    if not texts:
        raise InputError(f"{what} is empty; give at least one")
    empty = [i for i, x in enumerate(texts) if not x.strip()]
    if empty:
        raise InputError(f"{what}: entry {empty[0]} is empty")
    return texts


def check_labels(labels) -> list[str]:
    """Candidate class labels: `check_texts`, and distinct (a repeated label would split its probability)."""
    labels = check_texts(labels, "labels")
    dupes = [x for x, n in collections.Counter(labels).items() if n > 1]
    if dupes:
        raise InputError(f"labels: {dupes[0]!r} appears more than once; labels must be distinct")
    return labels


def check_templates(templates) -> tuple[str, ...]:
    templates = tuple(check_texts(templates, "templates"))
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise InputError(f"templates: {bad[0]!r} must contain '{{}}' exactly once (where the label goes), "
                         "e.g. 'a photo of a {}.'")
    return templates
