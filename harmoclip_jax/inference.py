"""Inference with a trained or converted model: label image regions, embed images / texts / regions, retrieve.

    from harmoclip_jax.inference import Predictor

    predictor = Predictor.from_checkpoint("workdirs/demo")       # a training workdir, params export or HF dir
    result = predictor.classify_regions("photo.jpg", [[10, 20, 200, 240]], ["cat", "dog"])
    print(result.top_k[0].labels, result.top_k[0].scores)

Inputs are file paths, encoded bytes, PIL images or uint8 numpy arrays of any size; boxes are pixel xyxy of that
image. Preprocessing is the training pipeline's own (`pipeline.decode_image`: squash to the model's S x S, bicubic,
CLIP normalisation; files take the same JPEG decode path as training records), boxes are rescaled with the shared
box helpers, region embeddings are the trainer's (`train.region_embeddings`: RoIAlign over `encode_dense`) and
class embeddings the box-classification evaluator's prompt ensemble. EXIF orientation is not applied (training
does not apply it either), so boxes refer to the stored pixel grid.

Every model call is jitted on fixed shapes: images go in batches of `batch_size` (the last one padded), boxes per
image are padded up to a multiple of `box_bucket`, texts go in batches of `text_batch_size`. Repeated calls
therefore reuse the compiled functions (`Predictor.trace_counts` counts compilations per function).
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import os
import pathlib
from typing import Any, Sequence, Union

import jax
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from harmoclip_jax import checkpoint as ckpt_lib
from harmoclip_jax.data import pipeline
from harmoclip_jax.evaluators.box_classification import DEFAULT_TEMPLATES, class_embeddings
from harmoclip_jax.evaluators.common import l2_normalize
from harmoclip_jax.models.clip import CLIP
from harmoclip_jax.ops import boxes as box_ops

ImageInput = Union[str, os.PathLike, bytes, np.ndarray, Image.Image]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BOX_FORMATS = ("xyxy", "xywh", "cxcywh")
# Boxes may overshoot the image by this many pixels (rounding in annotation tools); they are clipped.
BOX_TOLERANCE_PX = 0.5
WORKDIR_CONFIG = "config.json"
WORKDIR_PARAMS = "params"
WORKDIR_CHECKPOINTS = "checkpoints"


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


def _image_list(images) -> tuple[list[ImageInput], list[str]]:
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
    if not np.all(np.isfinite(array)):
        bad = int(np.flatnonzero(~np.isfinite(array).all(1))[0])
        raise InputError(f"{where}: box {bad} {array[bad].tolist()} has a non-finite coordinate")
    xyxy = {"xyxy": lambda b: b, "xywh": box_ops.xywh_to_xyxy, "cxcywh": box_ops.cxcywh_to_xyxy}[box_format](array)
    width, height = image_size
    for i, (x1, y1, x2, y2) in enumerate(xyxy):
        given = array[i].tolist()
        if x2 <= x1 or y2 <= y1:
            raise InputError(
                f"{where}: box {i} {given} has x2 <= x1 or y2 <= y1 as {box_format}. Boxes are pixel "
                f"(x1, y1, x2, y2) corners by default; for (x, y, width, height) pass box_format='xywh' "
                f"(CLI: --box_format=xywh)")
        if x2 - x1 < 1 or y2 - y1 < 1:
            raise InputError(
                f"{where}: box {i} {given} is smaller than one pixel of the {width}x{height} image. Boxes are in "
                "pixels; multiply normalised [0, 1] coordinates by the image width and height")
        tol = BOX_TOLERANCE_PX
        if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
            raise InputError(
                f"{where}: box {i} {given} ({box_format}) lies outside the image, which is {width} wide and "
                f"{height} high (x in [0, {width}], y in [0, {height}]); boxes must be pixels of the image as "
                "given, before any resizing")
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


def _check_labels(labels, what: str = "labels") -> list[str]:
    if isinstance(labels, (str, bytes)):
        raise InputError(f"{what} must be a list of strings, got the single string {labels!r}; e.g. ['cat', 'dog']")
    labels = [str(x) for x in labels]
    if not labels:
        raise InputError(f"{what} is empty; give at least one candidate label")
    empty = [i for i, x in enumerate(labels) if not x.strip()]
    if empty:
        raise InputError(f"{what}: entry {empty[0]} is empty")
    dupes = [x for x, n in collections.Counter(labels).items() if n > 1]
    if dupes and what == "labels":
        raise InputError(f"labels: {dupes[0]!r} appears more than once; labels must be distinct")
    return labels


def _check_templates(templates) -> tuple[str, ...]:
    templates = tuple(_check_labels(templates, "templates"))
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise InputError(f"templates: {bad[0]!r} must contain '{{}}' exactly once (where the label goes), "
                         "e.g. 'a photo of a {}.'")
    return templates


# ------------------------------------------------------------------------------------------------- results


@dataclasses.dataclass
class RegionPrediction:
    """The top labels of one box: `labels[k]` with probability `scores[k]` (softmax over all candidate labels)."""

    box: list[float]  # pixel xyxy of the input image
    labels: list[str]
    scores: list[float]

    def to_dict(self) -> dict:
        return {"box": [round(v, 2) for v in self.box],
                "top": [{"label": l, "score": round(s, 4)} for l, s in zip(self.labels, self.scores)]}


@dataclasses.dataclass
class RegionClassification:
    """`classify_regions` output. probs[t, c] = softmax_c(exp(logit_scale) * cosine[t, c])."""

    labels: list[str]  # the C candidate labels
    boxes: np.ndarray  # (T, 4) pixel xyxy of the input image (clipped)
    image_size: tuple[int, int]  # (width, height) of the input image
    cosine: np.ndarray  # (T, C) cosine similarity of region and label embeddings
    probs: np.ndarray  # (T, C)
    top_k: list[RegionPrediction]

    def to_dict(self) -> dict:
        return {"image_size": list(self.image_size), "labels": self.labels,
                "regions": [p.to_dict() for p in self.top_k]}


@dataclasses.dataclass
class RetrievalResult:
    """`retrieve` output: for query q, `ranking[q]` indexes `images` best first, with `scores[q]` (cosine)."""

    queries: list[str]
    images: list[str]  # paths, or '#i' for in-memory images
    cosine: np.ndarray  # (Q, N)
    ranking: np.ndarray  # (Q, k)

    def top(self, query: int) -> list[tuple[str, float]]:
        return [(self.images[j], float(self.cosine[query, j])) for j in self.ranking[query]]

    def to_dict(self) -> dict:
        return {"queries": [{"query": q, "top": [{"image": n, "score": round(s, 4)} for n, s in self.top(i)]}
                            for i, q in enumerate(self.queries)]}


# ----------------------------------------------------------------------------------------------- predictor


def default_region_config() -> ml_collections.ConfigDict:
    """RoIAlign settings of region embeddings when the checkpoint has no training config (the trainer's defaults)."""
    from harmoclip_jax import config_lib

    return ml_collections.ConfigDict(config_lib.base_config().region.to_dict())


class Predictor:
    """A CLIP model (a `harmoclip_jax.models.clip.CLIP`) wrapped for inference on one device. See module doc.

    Args:
      model: the model; its config fixes the input size and the text context.
      region: the training config's `region` section (RoIAlign `output_size`, `sampling_ratio`); default: the
        trainer's defaults.
      templates: prompt templates of `classify_regions` (default: the box-classification evaluator's ensemble).
      batch_size / text_batch_size / box_bucket: the fixed shapes every call is padded to (see module doc).
      source: where the model came from (shown in reports).
    """

    def __init__(self, model: CLIP, *, region: ml_collections.ConfigDict | dict | None = None,
                 templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 8, text_batch_size: int = 64,
                 box_bucket: int = 8, source: str = ""):
        from harmoclip_jax.train import region_embeddings

        for name, value in (("batch_size", batch_size), ("text_batch_size", text_batch_size),
                            ("box_bucket", box_bucket)):
            if int(value) < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        self.model = model
        self.config = model.config
        self.region = ml_collections.ConfigDict(dict(region) if region is not None else default_region_config())
        self.templates = _check_templates(templates)
        self.batch_size, self.text_batch_size, self.box_bucket = int(batch_size), int(text_batch_size), int(box_bucket)
        self.source = source
        self.trace_counts: collections.Counter[str] = collections.Counter()
        self._class_cache: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()

        device = jax.devices()[0]
        graphdef, state = nnx.split(model)
        self._state = jax.device_put(state, device)
        self.logit_scale = float(np.exp(np.asarray(jax.device_get(model.logit_scale[...]))))
        patch = self.config.vision.patch_size
        region_config = self.region
        counts = self.trace_counts

        def encode_images(state, images):
            counts["images"] += 1  # runs once per trace, i.e. per compilation
            return nnx.merge(graphdef, state).encode_image(images)

        def encode_texts(state, tokens):
            counts["texts"] += 1
            return nnx.merge(graphdef, state).encode_text(tokens)

        def encode_regions(state, images, boxes):
            counts["regions"] += 1
            dense = nnx.merge(graphdef, state).encode_dense(images)
            return region_embeddings(dense, boxes, region_config, patch)

        self._encode_images = jax.jit(encode_images)
        self._encode_texts = jax.jit(encode_texts)
        self._encode_regions = jax.jit(encode_regions)

    # ---------------------------------------------------------------------------------------- constructors

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, step: int | None = None, dtype: str | None = None,
                        **kwargs) -> "Predictor":
        """Loads a model from what `path` holds (auto-detected):

        - a training workdir (`config.json` + `checkpoints/` and/or `params/`): the params of training checkpoint
          `step` (default: the latest, which is the newest state), else the `params/` export;
        - a params checkpoint (`clip_config.json` + `params/`: `workdir/params`, `python -m harmoclip_jax.convert`);
        - a Hugging Face CLIPModel directory (`config.json` with `vision_config` + weights), converted on load.

        `dtype="bfloat16"` sets the compute dtype (GPU); other kwargs go to `Predictor`.
        """
        path = pathlib.Path(path).expanduser().absolute()
        overrides = {"dtype": dtype} if dtype else {}
        if not path.exists():
            raise InputError(f"checkpoint {str(path)!r} does not exist")
        if path.is_file():
            raise InputError(f"checkpoint {str(path)!r} is a file; for an open_clip / OpenAI state dict use "
                             "Predictor.from_open_clip(path, variant) (CLI: --open_clip FILE --variant ViT-B/16)")
        if ckpt_lib.is_params_checkpoint(path):
            region = _workdir_region(path.parent)
            return cls(ckpt_lib.load_params(path, **overrides), region=region, source=f"params checkpoint {path}",
                       **kwargs)
        if (path / WORKDIR_CONFIG).exists() and _is_hf_config(path / WORKDIR_CONFIG):
            return cls.from_hf(path, dtype=dtype, **kwargs)
        if (path / WORKDIR_CONFIG).exists() and ((path / WORKDIR_CHECKPOINTS).is_dir()
                                                 or ckpt_lib.is_params_checkpoint(path / WORKDIR_PARAMS)):
            model, source = _load_workdir(path, step, overrides)
            return cls(model, region=_workdir_region(path), source=source, **kwargs)
        raise InputError(
            f"{str(path)!r} is not a checkpoint this loader knows: expected a training workdir (config.json + "
            "checkpoints/ or params/, from `python -m harmoclip_jax.main`), a params checkpoint (clip_config.json + "
            "params/, from training or `python -m harmoclip_jax.convert`) or a Hugging Face CLIPModel directory "
            "(config.json + model.safetensors)")

    @classmethod
    def from_hf(cls, path: str | os.PathLike, *, dtype: str | None = None, **kwargs) -> "Predictor":
        """Converts a Hugging Face `CLIPModel` directory on load (`models.convert.load_hf_clip`)."""
        from harmoclip_jax.models import convert

        overrides = {"dtype": dtype} if dtype else {}
        try:
            model = convert.load_hf_clip(path, **overrides)
        except FileNotFoundError as error:
            raise InputError(str(error)) from error
        return cls(model, source=f"Hugging Face CLIPModel {path}", **kwargs)

    @classmethod
    def from_open_clip(cls, path: str | os.PathLike, variant: str, *, image_size: int | None = None,
                       dtype: str | None = None, **kwargs) -> "Predictor":
        """Converts an open_clip / OpenAI state dict file of architecture `variant` (e.g. "ViT-B/16") on load;
        `image_size` resizes the position embedding (bicubic)."""
        from harmoclip_jax.models import convert

        overrides = {k: v for k, v in (("image_size", image_size), ("dtype", dtype)) if v}
        try:
            model = convert.load_open_clip(path, variant, **overrides)
        except FileNotFoundError as error:
            raise InputError(str(error)) from error
        return cls(model, source=f"open_clip state dict {path} ({variant})", **kwargs)

    # ------------------------------------------------------------------------------------------- basics

    @property
    def image_size(self) -> int:
        """S: images are squashed to S x S pixels."""
        return self.config.vision.image_size

    def preprocess(self, image: ImageInput, where: str = "image") -> tuple[np.ndarray, tuple[int, int]]:
        """One image -> ((S, S, 3) float32 model input, (width, height) of the original)."""
        payload, size = read_image(image, where)
        try:
            return pipeline.decode_image(payload, self.image_size), size
        except Exception as error:  # noqa: BLE001 - a decoder failure after a successful header check
            raise InputError(f"{where}: cannot decode the image ({type(error).__name__}: {error})") from error

    def _image_batches(self, inputs: Sequence[ImageInput], names: Sequence[str]):
        """Yields (n real images, (batch_size, S, S, 3) padded batch, sizes) over `inputs`."""
        s = self.image_size
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            batch = np.zeros((self.batch_size, s, s, 3), np.float32)
            sizes = []
            for row, image in enumerate(chunk):
                batch[row], size = self.preprocess(image, f"image {names[start + row]}")
                sizes.append(size)
            yield len(chunk), batch, sizes

    # ------------------------------------------------------------------------------------------- embeddings

    def embed_images(self, images, *, normalize: bool = True) -> np.ndarray:
        """(N, E) global image embeddings of a list of images (or a folder of image files)."""
        inputs, names = _image_list(images)
        out = []
        for n, batch, _ in self._image_batches(inputs, names):
            out.append(np.asarray(self._encode_images(self._state, batch))[:n])
        embeddings = np.concatenate(out)
        return l2_normalize(embeddings) if normalize else embeddings

    def embed_texts(self, texts: Sequence[str], *, normalize: bool = True) -> np.ndarray:
        """(N, E) text embeddings (texts tokenized with the CLIP BPE at the model's context length)."""
        from harmoclip_jax.tokenizer import tokenize

        texts = _check_labels(texts, "texts")
        tokens = tokenize(texts, context_length=self.config.text.context_length)
        embeddings = self._embed_tokens(tokens)
        return l2_normalize(embeddings) if normalize else embeddings

    def _embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        out = []
        n = self.text_batch_size
        for start in range(0, len(tokens), n):
            chunk = tokens[start:start + n]
            padded = np.zeros((n, tokens.shape[1]), np.int32)
            padded[: len(chunk)] = chunk
            out.append(np.asarray(self._encode_texts(self._state, padded))[: len(chunk)])
        return np.concatenate(out)

    def embed_regions(self, image, boxes, *, box_format: str = "xyxy", normalize: bool = True):
        """Region embeddings (RoIAlign over the patch features, as in training and box-classification eval).

        One image and its (T, 4) pixel boxes -> (T, E); a list of images and a list of per-image boxes -> a list
        of (T_i, E) arrays (batched across images).
        """
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        per_image = [boxes] if single else list(boxes)
        if len(images) != len(per_image):
            raise InputError(f"embed_regions: {len(images)} images but {len(per_image)} box lists")
        if not images:
            raise InputError("embed_regions: no images given")
        s = self.image_size
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(images)))
            batch = np.zeros((self.batch_size, s, s, 3), np.float32)
            model_boxes = []
            for row, i in enumerate(chunk):
                where = "image" if single else f"image {i}"
                batch[row], size = self.preprocess(images[i], where)
                xyxy = check_boxes(per_image[i], size, box_format, where=f"boxes of {where}")
                model_boxes.append(model_input_boxes(xyxy, size, s))
            slots = self.box_bucket * math.ceil(max(len(b) for b in model_boxes) / self.box_bucket)
            # Padding boxes cover one patch (a real, cheap box) and are dropped below.
            p = self.config.vision.patch_size
            padded = np.tile(np.asarray([0, 0, p, p], np.float32), (self.batch_size, slots, 1))
            for row, b in enumerate(model_boxes):
                padded[row, : len(b)] = b
            regions = np.asarray(self._encode_regions(self._state, batch, padded))
            out.extend(regions[row, : len(b)] for row, b in enumerate(model_boxes))
        if normalize:
            out = [l2_normalize(r) for r in out]
        return out[0] if single else out

    def class_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """(C, E) normalised prompt-ensemble embeddings of `labels` (the box-classification evaluator's), cached."""
        labels = _check_labels(labels)
        templates = self.templates if templates is None else _check_templates(templates)
        key = (tuple(labels), templates)
        if key not in self._class_cache:
            embed = lambda _, tokens: self._embed_tokens(np.asarray(tokens))  # noqa: E731
            self._class_cache[key] = class_embeddings(embed, None, labels, templates,
                                                      self.config.text.context_length, multiple=1)
            while len(self._class_cache) > 16:
                self._class_cache.popitem(last=False)
        return self._class_cache[key]

    # ---------------------------------------------------------------------------------------------- tasks

    def classify_regions(self, image: ImageInput, boxes, labels: Sequence[str], *,
                         templates: Sequence[str] | None = None, top_k: int = 5,
                         box_format: str = "xyxy") -> RegionClassification:
        """Scores every box of `image` against every label; returns probabilities and the top-k labels per box.

        `boxes` are (T, 4) pixels of `image` as given (xyxy by default, or `box_format` "xywh" / "cxcywh").
        Labels are embedded with the prompt `templates` (default: this predictor's) and averaged per label.
        """
        labels = _check_labels(labels)
        if int(top_k) < 1:
            raise InputError(f"top_k={top_k} must be >= 1")
        payload, size = read_image(image)
        xyxy = check_boxes(boxes, size, box_format)
        classes = self.class_embeddings(labels, templates)
        regions = self.embed_regions(payload, xyxy)
        cosine = regions @ classes.T
        logits = self.logit_scale * cosine
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        k = min(int(top_k), len(labels))
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        top = [RegionPrediction(box=xyxy[t].tolist(), labels=[labels[c] for c in order[t]],
                                scores=[float(probs[t, c]) for c in order[t]]) for t in range(len(xyxy))]
        return RegionClassification(labels=labels, boxes=xyxy, image_size=size, cosine=cosine, probs=probs,
                                    top_k=top)

    def retrieve(self, query_texts: Sequence[str], images, *, top_k: int = 5) -> RetrievalResult:
        """Text-to-image retrieval: ranks `images` (a list, or a folder of image files) for every query by the
        cosine similarity of the global embeddings."""
        queries = _check_labels(query_texts, "query_texts")
        if int(top_k) < 1:
            raise InputError(f"top_k={top_k} must be >= 1")
        inputs, names = _image_list(images)
        cosine = self.embed_texts(queries) @ self.embed_images(inputs).T
        ranking = np.argsort(-cosine, axis=-1, kind="stable")[:, : min(int(top_k), len(inputs))]
        return RetrievalResult(queries=queries, images=names, cosine=cosine, ranking=ranking)


# ------------------------------------------------------------------------------------------ workdir loading


def _is_hf_config(config_file: pathlib.Path) -> bool:
    try:
        return "vision_config" in json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False


def _workdir_region(workdir: pathlib.Path) -> ml_collections.ConfigDict | None:
    """The `region` section of a training workdir's config.json (None if `workdir` is not one)."""
    config_file = workdir / WORKDIR_CONFIG
    if not config_file.exists() or _is_hf_config(config_file):
        return None
    region = json.loads(config_file.read_text()).get("region")
    if not region:
        return None
    merged = default_region_config()
    merged.update({k: v for k, v in region.items() if k in merged})
    return merged


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """The finished training-checkpoint steps in `workdir/checkpoints` (unfinished writes are temp dirs)."""
    directory = pathlib.Path(workdir) / WORKDIR_CHECKPOINTS
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / ckpt_lib.STATE_ITEM).is_dir())


def _load_workdir(workdir: pathlib.Path, step: int | None, overrides: dict) -> tuple[CLIP, str]:
    steps = checkpoint_steps(workdir)
    if step is None and not steps:
        return ckpt_lib.load_params(workdir / WORKDIR_PARAMS, **overrides), f"params export {workdir / 'params'}"
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise InputError(f"workdir {workdir} has no training checkpoint at step {step}; it has steps {steps}")
    import orbax.checkpoint as ocp

    from harmoclip_jax.models.clip import abstract_model
    from harmoclip_jax.models.variants import get_config
    from harmoclip_jax.train import model_config

    config = ml_collections.ConfigDict(json.loads((workdir / WORKDIR_CONFIG).read_text()))
    clip_config = get_config(model_config(config), **overrides)
    abstract = nnx.to_pure_dict(nnx.state(abstract_model(clip_config), nnx.Param))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)}
    # Only the params of the training state are read (optimizer state, rng and teacher stay on disk).
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    with ocp.PyTreeCheckpointer() as checkpointer:
        params = checkpointer.restore(workdir / WORKDIR_CHECKPOINTS / str(step) / ckpt_lib.STATE_ITEM, args=args)
    model = nnx.eval_shape(lambda: CLIP(clip_config, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, params["params"])
    nnx.update(model, state)
    return model, f"workdir {workdir}, training checkpoint step {step}"


# ------------------------------------------------------------------------------------------------- drawing


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _label_place(box, w, h, line, size, placed, boxes) -> tuple[float, float]:
    """Where a w x h label of `box` goes: above or below it (left- or right-aligned) or inside its top, whichever
    covers the least of the earlier labels (weighted 10x) and of all boxes."""
    x1, y1, x2, y2 = box
    width, height = size
    candidates = [(x, y) for y in (y1 - h, y2) for x in (x1, x2 - w)] + [(x1 + line, y1 + line)]
    candidates = [(min(max(0.0, x), width - w), min(max(0.0, y), height - h)) for x, y in candidates]

    def cost(place):
        rect = (*place, place[0] + w, place[1] + h)
        return 10 * sum(_overlap(rect, r) for r in placed) + sum(_overlap(rect, b) for b in boxes)

    return min(candidates, key=cost)

_PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4",
            "#469990", "#9a6324", "#800000")


def draw_regions(image: ImageInput, result: RegionClassification, *, min_side: int = 512,
                 show: int = 1) -> Image.Image:
    """The image with every box and its top `show` labels and scores drawn on it (upscaled so that its longer side
    is at least `min_side` pixels, so labels stay readable on small images)."""
    from PIL import ImageDraw, ImageFont

    picture = load_pil_image(image)
    scale = max(1.0, min_side / max(picture.size))
    if scale > 1:
        picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.BICUBIC)
    draw = ImageDraw.Draw(picture)
    font_size = max(12, round(max(picture.size) / 26))
    font = ImageFont.load_default(size=font_size)
    line = max(2, round(font_size / 6))
    placed: list[tuple[float, float, float, float]] = []
    boxes = [tuple(v * scale for v in p.box) for p in result.top_k]
    for t, prediction in enumerate(result.top_k):
        colour = _PALETTE[t % len(_PALETTE)]
        x1, y1, x2, y2 = (v * scale for v in prediction.box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
        text = "\n".join(f"{label} {score:.2f}" for label, score in
                         list(zip(prediction.labels, prediction.scores))[:show])
        left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
        w, h = right - left + 6, bottom - top + 6
        tx, ty = _label_place((x1, y1, x2, y2), w, h, line, picture.size, placed, boxes)
        placed.append((tx, ty, tx + w, ty + h))
        draw.rectangle([tx, ty, tx + w, ty + h], fill=colour)
        draw.multiline_text((tx + 3 - left, ty + 3 - top), text, fill="white", font=font, stroke_width=1,
                            stroke_fill="black")
    return picture
