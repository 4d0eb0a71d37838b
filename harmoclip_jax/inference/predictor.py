"""Inference with a trained or converted model: label image regions, embed images / texts / regions, retrieve.

    from harmoclip_jax.inference import Predictor

    predictor = Predictor.from_checkpoint("workdirs/demo")       # a training workdir, params export or HF dir
    result = predictor.classify_regions("photo.jpg", [[10, 20, 200, 240]], ["cat", "dog"])
    print(result.top_k[0].labels, result.top_k[0].scores)

Inputs are file paths, encoded bytes, PIL images or uint8 numpy arrays of any size; boxes are pixel xyxy of that
image. Preprocessing is the training pipeline's own (`pipeline.decode_image`: squash to the model's S x S, bicubic,
the model's normalisation; files take the same JPEG decode path as training records), boxes are rescaled with the
shared box helpers, region embeddings are training's (`ops.regions.region_embeddings`: RoIAlign over
`encode_dense`) and class embeddings the box-classification evaluator's prompt ensemble. EXIF orientation is not
applied (training does not apply it either), so boxes refer to the stored pixel grid.

Every model call is jitted on fixed shapes: images go in batches of `batch_size` (the last one padded), boxes per
image are padded up to a multiple of `box_bucket`, texts go in batches of `text_batch_size`. Repeated calls
therefore reuse the compiled functions (`Predictor.trace_counts` counts compilations per function).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import pathlib
from typing import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from harmoclip_jax import checkpoint as ckpt_lib
from harmoclip_jax import workdir as workdir_lib
from harmoclip_jax.data import images as image_lib
from harmoclip_jax.data import pipeline
from harmoclip_jax.evaluators.box_classification import DEFAULT_TEMPLATES, class_embeddings
from harmoclip_jax.evaluators.common import l2_normalize
from harmoclip_jax.inference.inputs import (ImageInput, InputError, check_boxes, check_labels, check_templates,
                                            check_texts, image_list, model_input_boxes, read_image)
from harmoclip_jax.models import registry
from harmoclip_jax.models.backbone import ImageTextModel, image_text_logits, probabilities
from harmoclip_jax.ops import dense as dense_ops
from harmoclip_jax.ops.regions import region_embeddings
from harmoclip_jax.tokenizer import get_tokenizer


# ------------------------------------------------------------------------------------------------- results


@dataclasses.dataclass
class RegionPrediction:
    """The top labels of one box: `labels[k]` with probability `scores[k]` (the model family's probabilities:
    softmax over the candidate labels for CLIP)."""

    box: list[float]  # pixel xyxy of the input image
    labels: list[str]
    scores: list[float]

    def to_dict(self) -> dict:
        return {"box": [round(v, 2) for v in self.box],
                "top": [{"label": l, "score": round(s, 4)} for l, s in zip(self.labels, self.scores)]}


@dataclasses.dataclass
class RegionClassification:
    """`classify_regions` output. probs[t, c]: the family's probabilities of logits exp(logit_scale) * cosine[t, c]
    (+ logit_bias): softmax over c for CLIP."""

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


@dataclasses.dataclass
class SimilarityMaps:
    """`similarity_maps` output: one map per text at the input image's own size.

    cosine[t, y, x]: cosine similarity of the patch features around pixel (x, y) and the embedding of texts[t]
    (the patch grid's scores, bilinearly upsampled). probs[t, y, x]: the family's probabilities of the logits
    exp(logit_scale) * cosine (+ logit_bias) at that pixel: softmax over the given texts for CLIP ("which of these
    texts is here"; with one text it is 1 everywhere), an independent sigmoid per text for SigLIP.
    """

    texts: list[str]
    image_size: tuple[int, int]  # (width, height) of the input image
    cosine: np.ndarray  # (T, H, W) float32
    probs: np.ndarray  # (T, H, W) float32
    grid: tuple[int, int]  # (rows, columns) of patch features the maps come from
    windows: int  # model passes (1, or the sliding windows at `resolution`)

    def peak(self, t: int) -> tuple[int, int]:
        """(x, y) pixel of the highest cosine of texts[t]."""
        y, x = np.unravel_index(int(np.argmax(self.cosine[t])), self.cosine[t].shape)
        return int(x), int(y)

    def to_dict(self) -> dict:
        return {"image_size": list(self.image_size), "grid": list(self.grid), "windows": self.windows,
                "maps": [{"text": text, "max": round(float(self.cosine[t].max()), 4),
                          "mean": round(float(self.cosine[t].mean()), 4), "peak_xy": list(self.peak(t))}
                         for t, text in enumerate(self.texts)]}


@dataclasses.dataclass
class Segmentation:
    """`segment` output: label_map[y, x] indexes `labels` (-1: background, below the `background` threshold);
    score[y, x] is the family's probability of that pixel's best label (see `SimilarityMaps.probs`)."""

    labels: list[str]
    image_size: tuple[int, int]  # (width, height) of the input image
    label_map: np.ndarray  # (H, W) int32
    score: np.ndarray  # (H, W) float32
    background: float | None
    grid: tuple[int, int]
    windows: int

    def areas(self) -> dict[str, float]:
        """Fraction of the image's pixels per label (and 'background' when thresholded), largest first."""
        counts = np.bincount(self.label_map.reshape(-1) + 1, minlength=len(self.labels) + 1) / self.label_map.size
        names = ["background", *self.labels]
        return {names[i]: float(counts[i]) for i in np.argsort(-counts, kind="stable") if counts[i] > 0}

    def to_dict(self) -> dict:
        return {"image_size": list(self.image_size), "labels": self.labels, "background": self.background,
                "grid": list(self.grid), "windows": self.windows,
                "areas": [{"label": k, "fraction": round(v, 4)} for k, v in self.areas().items()]}


# ----------------------------------------------------------------------------------------------- predictor


def default_region_config() -> ml_collections.ConfigDict:
    """RoIAlign settings of region embeddings when the checkpoint has no training config (the trainer's defaults)."""
    from harmoclip_jax import config_lib

    return config_lib.base_config().region


class Predictor:
    """An image-text model of any registered family (`models.registry`) wrapped for inference on one device.
    See the package doc.

    Args:
      model: the model; its config fixes the input size and the text context.
      region: the training config's `region` section (RoIAlign `output_size`, `sampling_ratio`); default: the
        trainer's defaults.
      templates: prompt templates of `classify_regions` (default: the box-classification evaluator's ensemble).
      batch_size / text_batch_size / box_bucket: the fixed shapes every call is padded to (see module doc).
      source: where the model came from (shown in reports).
    """

    def __init__(self, model: ImageTextModel, *, region: ml_collections.ConfigDict | dict | None = None,
                 templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 8, text_batch_size: int = 64,
                 box_bucket: int = 8, source: str = "", tokenizer: str | None = None):
        for name, value in (("batch_size", batch_size), ("text_batch_size", text_batch_size),
                            ("box_bucket", box_bucket)):
            if int(value) < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        self.model = model
        self.config = model.config
        self.backbone = registry.of_model(model)
        self.tokenizer = tokenizer or self.backbone.tokenizer  # a get_tokenizer name ("siglip:<spiece.model>")
        self.region = ml_collections.ConfigDict(dict(region) if region is not None else default_region_config())
        self.templates = check_templates(templates)
        self.batch_size, self.text_batch_size, self.box_bucket = int(batch_size), int(text_batch_size), int(box_bucket)
        self.source = source
        self.trace_counts: collections.Counter[str] = collections.Counter()
        self._class_cache: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()

        self._device = jax.devices()[0]
        graphdef, state = nnx.split(model)
        self._state = jax.device_put(state, self._device)
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
            return region_embeddings(dense, boxes, stride=patch, output_size=region_config.output_size,
                                     sampling_ratio=region_config.sampling_ratio)

        def encode_patches(state, images):
            counts["patches"] += 1
            return dense_ops.unit(nnx.merge(graphdef, state).encode_dense(images))

        # Every call runs on the weights' device under a one-device mesh: a caller's mesh context (the trainer's,
        # drawing its eval picture) would otherwise be jit's context mesh, incompatible with the weights' device.
        one_device = jax.sharding.Mesh(np.asarray([self._device]), ("device",))

        def on_device(fn):
            def call(state, *arrays):
                with jax.set_mesh(one_device):
                    return fn(state, *(jax.device_put(a, self._device) for a in arrays))
            return call

        self._encode_images = on_device(jax.jit(encode_images))
        self._encode_patches = on_device(jax.jit(encode_patches))
        self._encode_texts = on_device(jax.jit(encode_texts))
        self._encode_regions = on_device(jax.jit(encode_regions))

    def set_weights(self, model: ImageTextModel) -> None:
        """Swaps in the weights of `model`, a model of the same architecture, keeping the compiled functions (a
        training run draws its eval picture with its current weights this way)."""
        graphdef, state = nnx.split(model)
        if jax.tree.structure(state) != jax.tree.structure(self._state):
            raise ValueError("set_weights: the model's parameters do not match this predictor's architecture")
        self._state = jax.device_put(state, self._device)
        self.model = model
        self._class_cache.clear()  # label embeddings of the old weights

    # ---------------------------------------------------------------------------------------- constructors

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, step: int | None = None, dtype: str | None = None,
                        **kwargs) -> "Predictor":
        """Loads a model from what `path` holds (auto-detected):

        - a training workdir (`config.json` + `checkpoints/` and/or `params/`): the params of training checkpoint
          `step` (default: the latest, which is the newest state), else the `params/` export;
        - a params checkpoint (`model.json` + `params/`: `workdir/params`, `python -m harmoclip_jax.convert`);
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
            model = ckpt_lib.load_params(path, **overrides)
            kwargs.setdefault("tokenizer", registry.of_model(model).tokenizer_in(path))
            return cls(model, region=workdir_lib.region_config(path.parent), source=f"params checkpoint {path}",
                       **kwargs)
        if ckpt_lib.is_workdir(path):
            try:
                model, source = ckpt_lib.load_workdir_model(path, step, **overrides)
            except FileNotFoundError as error:
                raise InputError(str(error)) from error
            from harmoclip_jax import config_lib

            run_config = workdir_lib.read_config(path)
            if run_config is not None and "model" in run_config:  # the run's tokenizer (its SentencePiece file)
                kwargs.setdefault("tokenizer", config_lib.tokenizer_name(run_config))
            return cls(model, region=workdir_lib.region_config(path), source=source, **kwargs)
        if (path / workdir_lib.CONFIG).exists():
            return cls.from_hf(path, dtype=dtype, **kwargs)
        raise InputError(
            f"{str(path)!r} is not a checkpoint this loader knows: expected a training workdir (config.json + "
            "checkpoints/ or params/, from `python -m harmoclip_jax.main`), a params checkpoint (model.json + "
            "params/, from training or `python -m harmoclip_jax.convert`) or a Hugging Face CLIPModel directory "
            "(config.json + model.safetensors)")

    @classmethod
    def from_hf(cls, path: str | os.PathLike, *, dtype: str | None = None, **kwargs) -> "Predictor":
        """Converts a Hugging Face model directory on load, with the converter of the family whose `hf_model_type`
        its config.json names (`CLIPModel`: `models.convert.load_hf_clip`)."""
        overrides = {"dtype": dtype} if dtype else {}
        try:
            backbone = registry.for_hf_dir(path)
            model = backbone.load_hf(path, **overrides)
        except (FileNotFoundError, ValueError) as error:
            raise InputError(str(error)) from error
        kwargs.setdefault("tokenizer", backbone.tokenizer_in(path))  # SigLIP: the directory's spiece.model
        return cls(model, source=f"Hugging Face {backbone.hf_architecture} {path}", **kwargs)

    @classmethod
    def from_open_clip(cls, path: str | os.PathLike, variant: str, *, family: str | None = None,
                       image_size: int | None = None, dtype: str | None = None, **kwargs) -> "Predictor":
        """Converts an open_clip / OpenAI state dict file of architecture `variant` (e.g. "ViT-B/16", "EVA02-B-16")
        of backbone `family` (default: the family whose variant table names `variant`) on load; `image_size`
        resizes the position embedding (bicubic)."""
        overrides = {k: v for k, v in (("image_size", image_size), ("dtype", dtype)) if v}
        try:
            backbone = registry.get(family) if family else registry.for_variant(variant)
            model = backbone.load_open_clip(path, variant, **overrides)
        except (FileNotFoundError, ValueError) as error:
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
            return pipeline.decode_image(payload, self.image_size, self.backbone.image_mean,
                                         self.backbone.image_std), size
        except Exception as error:  # noqa: BLE001 - a decoder failure after a successful header check
            raise InputError(f"{where}: cannot decode the image ({type(error).__name__}: {error})") from error

    def _image_batches(self, inputs: Sequence[ImageInput], names: Sequence[str]):
        """Yields (n real images, (batch_size, S, S, 3) padded batch, sizes) over `inputs`."""
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            pixels, sizes = [], []
            for row, image in enumerate(chunk):
                x, size = self.preprocess(image, f"image {names[start + row]}")
                pixels.append(x)
                sizes.append(size)
            yield len(chunk), self._batch_of(pixels), sizes

    # ------------------------------------------------------------------------------------------- embeddings

    def encode_images(self, images, *, normalize: bool = True) -> np.ndarray:
        """(N, E) global image embeddings of a list of images (or a folder of image files)."""
        inputs, names = image_list(images)
        out = []
        for n, batch, _ in self._image_batches(inputs, names):
            out.append(np.asarray(self._encode_images(self._state, batch))[:n])
        embeddings = np.concatenate(out)
        return l2_normalize(embeddings) if normalize else embeddings

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids for this model: its family's tokenizer at its text context length."""
        return get_tokenizer(self.tokenizer)(list(texts), self.config.text.context_length)

    def encode_texts(self, texts: Sequence[str], *, normalize: bool = True) -> np.ndarray:
        """(N, E) text embeddings (tokenized with the model family's tokenizer at the model's context length)."""
        texts = check_texts(texts, "texts")
        embeddings = self._encode_tokens(self.tokenize(texts))
        return l2_normalize(embeddings) if normalize else embeddings

    def _encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        out = []
        n = self.text_batch_size
        for start in range(0, len(tokens), n):
            chunk = tokens[start:start + n]
            padded = np.zeros((n, tokens.shape[1]), np.int32)
            padded[: len(chunk)] = chunk
            out.append(np.asarray(self._encode_texts(self._state, padded))[: len(chunk)])
        return np.concatenate(out)

    def encode_regions(self, images, boxes, *, box_format: str = "xyxy", normalize: bool = True
                       ) -> list[np.ndarray]:
        """Region embeddings (RoIAlign over the patch features, as in training and box-classification eval):
        a list with one (T_i, E) array per image, batched across images.

        `images` is a list of images with `boxes` a list of per-image (T_i, 4) pixel boxes, or one image with its
        (T, 4) boxes (a list of one array comes back).
        """
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        per_image = [boxes] if single else list(boxes)
        if len(images) != len(per_image):
            raise InputError(f"encode_regions: {len(images)} images but {len(per_image)} box lists")
        if not images:
            raise InputError("encode_regions: no images given")
        s = self.image_size
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(images)))
            pixels, model_boxes = [], []
            for i in chunk:
                where = "image" if single else f"image {i}"
                x, size = self.preprocess(images[i], where)
                pixels.append(x)
                xyxy = check_boxes(per_image[i], size, box_format, where=f"boxes of {where}")
                model_boxes.append(model_input_boxes(xyxy, size, s))
            slots = self.box_bucket * math.ceil(max(len(b) for b in model_boxes) / self.box_bucket)
            # Padding boxes cover one patch (a real, cheap box) and are dropped below.
            p = self.config.vision.patch_size
            padded = np.tile(np.asarray([0, 0, p, p], np.float32), (self.batch_size, slots, 1))
            for row, b in enumerate(model_boxes):
                padded[row, : len(b)] = b
            regions = np.asarray(self._encode_regions(self._state, self._batch_of(pixels), padded))
            out.extend(regions[row, : len(b)] for row, b in enumerate(model_boxes))
        return [l2_normalize(r) for r in out] if normalize else out

    def class_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """(C, E) normalised prompt-ensemble embeddings of `labels` (the box-classification evaluator's), cached."""
        labels = check_labels(labels)
        templates = self.templates if templates is None else check_templates(templates)
        key = (tuple(labels), templates)
        if key not in self._class_cache:
            encode = lambda _, tokens: self._encode_tokens(np.asarray(tokens))  # noqa: E731
            self._class_cache[key] = class_embeddings(encode, None, labels, templates, self.tokenize, multiple=1)
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
        labels = check_labels(labels)
        if int(top_k) < 1:
            raise InputError(f"top_k={top_k} must be >= 1")
        payload, size = read_image(image)
        xyxy = check_boxes(boxes, size, box_format)
        classes = self.class_embeddings(labels, templates)
        regions = self.encode_regions(payload, xyxy)[0]
        cosine = regions @ classes.T
        probs = probabilities(image_text_logits(self.model, cosine), self.backbone.probabilities)
        k = min(int(top_k), len(labels))
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        top = [RegionPrediction(box=xyxy[t].tolist(), labels=[labels[c] for c in order[t]],
                                scores=[float(probs[t, c]) for c in order[t]]) for t in range(len(xyxy))]
        return RegionClassification(labels=labels, boxes=xyxy, image_size=size, cosine=cosine, probs=probs,
                                    top_k=top)

    def retrieve(self, query_texts: Sequence[str], images, *, top_k: int = 5) -> RetrievalResult:
        """Text-to-image retrieval: ranks `images` (a list, or a folder of image files) for every query by the
        cosine similarity of the global embeddings."""
        queries = check_texts(query_texts, "query_texts")
        if int(top_k) < 1:
            raise InputError(f"top_k={top_k} must be >= 1")
        inputs, names = image_list(images)
        cosine = self.encode_texts(queries) @ self.encode_images(inputs).T
        ranking = np.argsort(-cosine, axis=-1, kind="stable")[:, : min(int(top_k), len(inputs))]
        return RetrievalResult(queries=queries, images=names, cosine=cosine, ranking=ranking)

    # -------------------------------------------------------------------------------------------- dense maps

    def patch_features(self, image: ImageInput, *, resolution: int | None = None, stride: int | None = None
                       ) -> tuple[np.ndarray, tuple[int, int], int]:
        """Unit-norm patch features of one image in the joint space: ((rows, cols, E), (width, height), passes).

        Without `resolution` the image is squashed to S x S as in training (one pass; the grid covers the whole
        image, so its aspect ratio comes back when maps are upsampled to the image's size). With `resolution` the
        image is resized (bicubic, aspect kept) so that its shorter side is about `resolution` pixels (each side a
        multiple of the patch size, at least S) and S x S windows slide over it every `stride` pixels (default:
        about 2/3 of S, a multiple of the patch size; mmseg's and CLIPSelf's sliding evaluation): every window is
        a pass at the model's own input size, where its position embeddings were trained, and a patch seen by
        several windows averages their unit features, so scores are the windows' mean cosine.
        """
        payload, size = read_image(image)
        if resolution is None:
            pixels, _ = self.preprocess(payload)
            return np.asarray(self._encode_patches(self._state, self._batch_of([pixels])))[0], size, 1
        s, p = self.image_size, self.config.vision.patch_size
        if int(resolution) < 1:
            raise InputError(f"resolution={resolution} must be a positive number of pixels")
        stride = p * max(1, (2 * s // 3) // p) if stride is None else int(stride)
        if stride < p or stride % p or stride > s:
            raise InputError(f"stride={stride} must be a multiple of the patch size {p} between {p} and the model's "
                             f"input size {s}")
        scale = int(resolution) / min(size)
        width, height = (max(s, p * round(side * scale / p)) for side in size)
        pixels = image_lib.decode_drafted(payload, max(width, height))
        from PIL import Image

        pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.BICUBIC))
        pixels = image_lib.normalize_pixels(pixels, self.backbone.image_mean, self.backbone.image_std)
        starts = lambda n: sorted({*range(0, n - s + 1, stride), n - s})  # noqa: E731 - the last window at the edge
        corners = [(y, x) for y in starts(height) for x in starts(width)]
        total, seen = 0.0, np.zeros((height // p, width // p, 1), np.float32)
        for begin in range(0, len(corners), self.batch_size):
            chunk = corners[begin:begin + self.batch_size]
            features = np.asarray(self._encode_patches(self._state, self._batch_of(
                [pixels[y:y + s, x:x + s] for y, x in chunk])))
            if isinstance(total, float):
                total = np.zeros((*seen.shape[:2], features.shape[-1]), np.float32)
            for (y, x), f in zip(chunk, features):
                total[y // p:(y + s) // p, x // p:(x + s) // p] += f
                seen[y // p:(y + s) // p, x // p:(x + s) // p] += 1
        return total / seen, size, len(corners)

    def _batch_of(self, pixels: list[np.ndarray]) -> np.ndarray:
        """Model inputs padded to the fixed batch size (no recompilation across calls)."""
        batch = np.zeros((self.batch_size, self.image_size, self.image_size, 3), np.float32)
        batch[: len(pixels)] = pixels
        return batch

    def _pixel_maps(self, features: np.ndarray, embeddings: np.ndarray, size: tuple[int, int]
                    ) -> tuple[np.ndarray, np.ndarray]:
        """(T, H, W) cosine and family probabilities at the image's (width, height) = `size`."""
        cosine = dense_ops.upsample(dense_ops.patch_cosine(features, embeddings), (size[1], size[0]))
        probs = probabilities(image_text_logits(self.model, cosine), self.backbone.probabilities)
        return np.moveaxis(cosine, -1, 0), np.moveaxis(probs.astype(np.float32), -1, 0)

    def similarity_maps(self, image: ImageInput, texts: Sequence[str], *, resolution: int | None = None,
                        stride: int | None = None) -> SimilarityMaps:
        """Where each text lights up: the cosine of every patch feature with each text's embedding (the text as
        given, no prompt templates), upsampled to the image's own size and aspect ratio. `resolution` / `stride`:
        sliding-window inference for large images (`patch_features`)."""
        texts = check_texts(texts, "texts")
        features, size, windows = self.patch_features(image, resolution=resolution, stride=stride)
        cosine, probs = self._pixel_maps(features, self.encode_texts(texts), size)
        return SimilarityMaps(texts=texts, image_size=size, cosine=cosine, probs=probs, grid=features.shape[:2],
                              windows=windows)

    def segment(self, image: ImageInput, labels: Sequence[str], *, templates: Sequence[str] | None = None,
                background: float | None = None, resolution: int | None = None,
                stride: int | None = None) -> Segmentation:
        """Zero-shot semantic segmentation: each pixel gets the label whose prompt-ensemble embedding (as in
        `classify_regions`) is most similar to its upsampled patch scores; the segmentation evaluator's method
        (`ops.dense`), at the image's own size. With `background` (a probability in (0, 1)), pixels whose best
        label's probability is below it are background (-1): for CLIP a softmax over the given labels, so it
        marks pixels where no label clearly wins; for SigLIP an absolute sigmoid score."""
        labels = check_labels(labels)
        if background is not None and not 0.0 < float(background) < 1.0:
            raise InputError(f"background={background} must be a probability in (0, 1), or None for no background")
        features, size, windows = self.patch_features(image, resolution=resolution, stride=stride)
        cosine, probs = self._pixel_maps(features, self.class_embeddings(labels, templates), size)
        label_map = cosine.argmax(0).astype(np.int32)
        score = np.take_along_axis(probs, label_map[None], 0)[0]
        if background is not None:
            label_map = np.where(score < float(background), -1, label_map)
        return Segmentation(labels=labels, image_size=size, label_map=label_map, score=score,
                            background=None if background is None else float(background), grid=features.shape[:2],
                            windows=windows)
