"""The backbone seam: what every image-text model family implements, and the registry that picks one by name.

A family (`config.model.family`: "clip", ...) is one module that defines an NNX model class and a `BACKBONE =
Backbone(...)` record; `models/registry.py` lists the package's families, and `register()` adds one from outside the
package (a notebook, a test). Everything else (trainer, evaluators, inference, checkpoints, the pipeline's
normalisation and tokenizer) asks the `Backbone` record or the model, never a family by name.

The model contract (`ImageTextModel`): parameters as `nnx.Param`s, with the image tower under the top-level key
`Backbone.image_tower` (a frozen copy of it is the self-distillation teacher), the text tower under
`Backbone.text_tower`, and the temperature as a scalar `logit_scale` (log of the scale); the config has
`vision.image_size`, `vision.patch_size` (the stride of the dense features), `text.context_length`, `dtype`,
`remat` and `to_dict()`.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Protocol

import jax
import numpy as np


class ImageTextModel(Protocol):
    """The methods and attributes the package uses. Embeddings are projected, not normalised."""

    config: Any
    logit_scale: Any  # nnx.Param, scalar: image-text logits are exp(logit_scale) * cosine (+ bias, sigmoid kinds)

    def encode_image(self, images: jax.Array) -> jax.Array:
        """(B, S, S, 3) normalised images -> (B, E)."""

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """(N, L <= context_length) int ids -> (N, E)."""

    def encode_dense(self, images: jax.Array, *, return_global: bool = False):
        """(B, S, S, 3) -> (B, h, w, E) features in the joint space, h = S / patch_size; with `return_global`,
        `(encode_image(images), dense)` from one pass."""

    # Optional (token-level LRC, `config.loss.lrc_text="tokens"`; config validation names families without it):
    # def encode_text_tokens(self, tokens: jax.Array) -> jax.Array:
    #     """(N, L) ids -> (N, L' >= L, E) projected, not normalised, per-token embeddings from one pass of the text
    #     tower (final LN + projection on every position; positions < L are the input's tokens, L' > L where the
    #     family pads rows, as SigLIP). The position `encode_text` pools equals `encode_text`."""


@dataclasses.dataclass(frozen=True)
class Backbone:
    """Everything the package needs to know about one model family.

    Attributes:
      family: the `config.model.family` name.
      model_class: `model_class(config, rngs=nnx.Rngs)` builds an `ImageTextModel`.
      get_config: `(variant name or config, **overrides) -> config`; overrides include `image_size`,
        `text_context_length`, `dtype`, `remat`, `attention_impl` (those `config.model` sets).
      config_from_dict: inverse of `config.to_dict()` (checkpoints store the dict).
      image_mean / image_std: per-channel RGB normalisation of [0, 1] pixels the model was trained with.
      tokenizer: name in `harmoclip_jax.tokenizer.TOKENIZERS`.
      tokenizer_file: the file in a checkpoint directory (Hugging Face or params checkpoint) that holds the
        tokenizer's model, for families whose tokenizer ships with the weights (SigLIP: "spiece.model"); the
        tokenizer of such a directory is "<tokenizer>:<that file>" (`tokenizer_in`).
      image_tower / text_tower: top-level parameter keys of the two towers.
      no_decay: regexes (full match on '/'-joined parameter paths) of parameters without weight decay, on top of
        every array with fewer than 2 dimensions.
      probabilities: how image-text logits become probabilities: "softmax" over candidates (CLIP).
      save_hf / save_open_clip: `(model, path) -> path`: a complete directory / state-dict file for the family's
        PyTorch home (None if there is none).
      load_hf / load_open_clip: `(path, ...) -> model` converters (None if there is none).
      hf_model_type / hf_architecture: the `model_type` of the family's Hugging Face config.json (picks the
        converter on load) and its transformers class.
    """

    family: str
    model_class: type
    get_config: Callable[..., Any]
    config_from_dict: Callable[[dict], Any]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    tokenizer: str = "clip"
    tokenizer_file: str | None = None
    image_tower: str = "visual"
    text_tower: str = "text"
    no_decay: tuple[str, ...] = ()
    probabilities: str = "softmax"
    save_hf: Callable | None = None
    save_open_clip: Callable | None = None
    load_hf: Callable | None = None
    load_open_clip: Callable | None = None
    hf_model_type: str | None = None
    hf_architecture: str | None = None

    @property
    def text_tower_regex(self) -> str:
        return f"{self.text_tower}/.*"

    def in_text_tower(self, path: str) -> bool:
        """Whether the '/'-joined parameter path belongs to the text tower."""
        return path.startswith(f"{self.text_tower}/")

    def tokenizer_in(self, directory) -> str:
        """The `tokenizer.get_tokenizer` name for a checkpoint directory: with its own tokenizer file if it has one."""
        import pathlib

        file = pathlib.Path(directory) / self.tokenizer_file if self.tokenizer_file else None
        return f"{self.tokenizer}:{file}" if file is not None and file.is_file() else self.tokenizer

    def config_for(self, model_config) -> Any:
        """The family config of an experiment's `config.model` section."""
        return self.get_config(model_config.variant, image_size=model_config.image_size,
                               text_context_length=model_config.context_length, dtype=model_config.dtype,
                               remat=model_config.remat, attention_impl=model_config.attention_impl)


def override_config(config: Any, overrides: dict[str, Any], family: str) -> Any:
    """`config` (a family config dataclass with `vision` and `text` sections) with `overrides` applied: a top-level
    field (`dtype`, ...), a vision field (`image_size`, ...) or a text field prefixed with `text_`
    (`text_context_length`, ...). `family` names the model in the error for an unknown field."""
    vision_fields = {f.name for f in dataclasses.fields(config.vision)}
    text_fields = {f.name for f in dataclasses.fields(config.text)}
    top_fields = {f.name for f in dataclasses.fields(config)} - {"vision", "text"}
    top, vision, text = {}, {}, {}
    for key, value in overrides.items():
        if key in top_fields:
            top[key] = value
        elif key in vision_fields:
            vision[key] = value
        elif key.startswith("text_") and key[5:] in text_fields:
            text[key[5:]] = value
        else:
            raise ValueError(f"unknown {family} config override {key!r}; top-level: {sorted(top_fields)}, vision: "
                             f"{sorted(vision_fields)}, text (prefix 'text_'): {sorted(text_fields)}")
    return dataclasses.replace(config, vision=dataclasses.replace(config.vision, **vision),
                               text=dataclasses.replace(config.text, **text), **top)


def lazy(module: str, name: str) -> Callable:
    """`module.name`, imported on first call (converters need readers a model module should not import)."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def probabilities(logits: np.ndarray, kind: str) -> np.ndarray:
    """Image-text logits (..., C) -> probabilities: softmax over the C candidates, or independent sigmoids."""
    logits = np.asarray(logits)
    if kind == "softmax":
        p = np.exp(logits - logits.max(-1, keepdims=True))
        return p / p.sum(-1, keepdims=True)
    if kind == "sigmoid":
        return 1 / (1 + np.exp(-logits))
    raise ValueError(f"unknown probability kind {kind!r}; use 'softmax' or 'sigmoid'")


def image_text_logits(model: ImageTextModel, cosine: np.ndarray) -> np.ndarray:
    """exp(logit_scale) * cosine (+ logit_bias where the model has one), in cosine's dtype."""
    logits = float(np.exp(np.asarray(jax.device_get(model.logit_scale[...])))) * np.asarray(cosine)
    bias = getattr(model, "logit_bias", None)
    return logits + float(np.asarray(jax.device_get(bias[...]))) if bias is not None else logits
