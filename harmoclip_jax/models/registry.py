"""The registry of backbone families (`config.model.family`). A family in the package is one line here."""
from __future__ import annotations

import json
import os
import pathlib

from harmoclip_jax.models import clip, eva02, siglip
from harmoclip_jax.models.backbone import Backbone

_BACKBONES: dict[str, Backbone] = {
    "clip": clip.BACKBONE,
    "eva02_clip": eva02.BACKBONE,
    "siglip": siglip.BACKBONE,
}


def register(backbone: Backbone, *, replace: bool = False) -> Backbone:
    """Adds a family defined outside the package (a notebook, a test); returns it."""
    if backbone.family in _BACKBONES and not replace and _BACKBONES[backbone.family] is not backbone:
        raise ValueError(f"backbone family {backbone.family!r} is already registered; pass replace=True")
    _BACKBONES[backbone.family] = backbone
    return backbone


def get(family: str) -> Backbone:
    if family not in _BACKBONES:
        raise ValueError(f"unknown backbone family {family!r} (config.model.family); registered: "
                         f"{', '.join(sorted(_BACKBONES))}")
    return _BACKBONES[family]


def of_model(model) -> Backbone:
    """The family record of a model instance."""
    for backbone in _BACKBONES.values():
        if type(model) is backbone.model_class:
            return backbone
    raise ValueError(f"{type(model).__name__} is not the model class of a registered backbone family "
                     f"({', '.join(sorted(_BACKBONES))}); register it with harmoclip_jax.models.registry.register")


def for_variant(variant: str) -> Backbone:
    """The one family whose variant table names `variant` (e.g. "ViT-B/16" -> clip, "EVA02-B-16" -> eva02_clip)."""
    matches, errors = [], []
    for backbone in _BACKBONES.values():
        try:
            backbone.get_config(variant)
        except (ValueError, KeyError, TypeError) as error:
            errors.append(f"{backbone.family}: {error}")
            continue
        matches.append(backbone)
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"variant {variant!r} names a variant of several families "
                         f"({', '.join(b.family for b in matches)}); give the family")
    raise ValueError(f"variant {variant!r} is not a variant of any registered family; " + "; ".join(errors))


def for_hf_dir(path: str | os.PathLike) -> Backbone:
    """The family of a Hugging Face model directory, from the `model_type` in its config.json."""
    config_file = pathlib.Path(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: it has no config.json")
    model_type = json.loads(config_file.read_text()).get("model_type")
    for backbone in _BACKBONES.values():
        if backbone.hf_model_type and backbone.hf_model_type == model_type:
            return backbone
    known = sorted(b.hf_model_type for b in _BACKBONES.values() if b.hf_model_type)
    raise ValueError(f"{config_file} has model_type={model_type!r}; the registered families convert {known}")
