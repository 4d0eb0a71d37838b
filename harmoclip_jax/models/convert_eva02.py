"""EVA02-CLIP checkpoint import/export: open_clip (timm trunk) and original EVA-CLIP state dicts <-> our EVA02CLIP.

Two source layouts, told apart by their keys:
  * "open_clip": open_clip's `EVA02-*` models, the image tower being a timm `Eva` under `visual.trunk.` (separate
    q/k/v projections with q and v biases in q_proj/v_proj, `attn.norm`, `mlp.fc1_g/fc1_x/norm/fc2`);
  * "eva_clip": the original EVA-CLIP release (`visual.blocks.N.attn.q_bias`, `inner_attn_ln`, `mlp.w1/w2/w3`,
    `ffn_ln`, `visual.head`; its RoPE buffers, `visual.rope.*` and `visual.blocks.N.attn.rope.*`, are recomputed, so
    ignored).
Both carry the same OpenAI-layout text tower under `text.`. Every parameter is mapped by one explicit table used in
both directions, every shape is asserted, and a mismatch raises `CheckpointMismatchError` listing the missing,
unexpected and mis-shaped keys. Another image size resizes the position embedding as timm does (bicubic,
antialiased) and the RoPE tables follow the new grid by construction.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable, Mapping

import numpy as np
from flax import traverse_util

from harmoclip_jax.models import glue
from harmoclip_jax.models.convert import (CheckpointMismatchError, _linear_t, _ln, _patch_conv, _read_tensors, _Rule,
                                          _same, check_fit, resize_position_embedding)
from harmoclip_jax.models.eva02 import BACKBONE, EVA02CLIP, EVA02Config, get_config

PathLike = str | os.PathLike
LAYOUTS = ("open_clip", "eva_clip")

# Buffers that checkpoints carry but that are not parameters (recomputed by our model).
_IGNORED_SOURCE_KEYS = ("attn_mask", "position_ids")


def _fused_kernel(q, k, v):  # three torch Linear weights (out, in) <-> our (in, 3 * out) kernel
    return lambda ours: _Rule(ours, (q, k, v), lambda a, b, c: np.concatenate([a.T, b.T, c.T], axis=1),
                              lambda w: tuple(x.T for x in np.split(w, 3, axis=1)))


def _squeeze(key, ndim):  # timm's (1, 1, D) class token / (1, N, D) positions <-> our (D,) / (N, D)
    return lambda ours: _Rule(ours, (key,), lambda a: a.reshape(a.shape[-ndim:]),
                              lambda a: (a.reshape((1,) * (3 - ndim) + a.shape),))


def _linear(prefix):
    return {"kernel": _linear_t(f"{prefix}.weight"), "bias": _same(f"{prefix}.bias")}


def _name_table(config: EVA02Config, layout: str) -> list[_Rule]:
    """All parameters of a model of `config`, mapped to the keys of a `layout` checkpoint."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown EVA02-CLIP checkpoint layout {layout!r}; use one of {LAYOUTS}")
    v = "visual.trunk" if layout == "open_clip" else "visual"
    # Our block sub-path -> source names, per layout: (open_clip, eva_clip).
    names = {"sub_ln": ("attn.norm", "attn.inner_attn_ln"), "gate": ("mlp.fc1_g", "mlp.w1"),
             "up": ("mlp.fc1_x", "mlp.w2"), "mlp_ln": ("mlp.norm", "mlp.ffn_ln"), "down": ("mlp.fc2", "mlp.w3"),
             "q_bias": ("attn.q_proj.bias", "attn.q_bias"), "v_bias": ("attn.v_proj.bias", "attn.v_bias")}
    n = {key: pair[LAYOUTS.index(layout)] for key, pair in names.items()}
    table: dict[tuple, Callable] = {
        ("logit_scale",): _same("logit_scale"),
        ("visual", "patch_embed"): _patch_conv(f"{v}.patch_embed.proj.weight"),
        ("visual", "patch_bias"): _same(f"{v}.patch_embed.proj.bias"),
        ("visual", "cls_token"): _squeeze(f"{v}.cls_token", 1),
        ("visual", "pos_embed"): _squeeze(f"{v}.pos_embed", 2),
        ("text", "token_embedding"): _same("text.token_embedding.weight"),
        ("text", "positional_embedding"): _same("text.positional_embedding"),
        ("text", "text_projection"): _same("text.text_projection"),
    }
    groups: dict[tuple, dict] = {("visual", "norm"): _ln(f"{v}.norm"), ("visual", "head"): _linear(f"{v}.head"),
                                 ("text", "ln_final"): _ln("text.ln_final")}
    for i in range(config.vision.layers):
        p, ours = f"{v}.blocks.{i}", ("visual", "blocks", i)
        table[(*ours, "attn", "qkv", "kernel")] = _fused_kernel(*(f"{p}.attn.{x}_proj.weight" for x in "qkv"))
        table[(*ours, "attn", "q_bias")] = _same(f"{p}.{n['q_bias']}")
        table[(*ours, "attn", "v_bias")] = _same(f"{p}.{n['v_bias']}")
        groups.update({
            (*ours, "norm1"): _ln(f"{p}.norm1"), (*ours, "norm2"): _ln(f"{p}.norm2"),
            (*ours, "attn", "norm"): _ln(f"{p}.{n['sub_ln']}"), (*ours, "attn", "proj"): _linear(f"{p}.attn.proj"),
            (*ours, "mlp", "fc1_g"): _linear(f"{p}.{n['gate']}"), (*ours, "mlp", "fc1_x"): _linear(f"{p}.{n['up']}"),
            (*ours, "mlp", "norm"): _ln(f"{p}.{n['mlp_ln']}"), (*ours, "mlp", "fc2"): _linear(f"{p}.{n['down']}"),
        })
    for i in range(config.text.layers):
        p, ours = f"text.transformer.resblocks.{i}", ("text", "transformer", "blocks", i)
        groups.update({
            (*ours, "ln_1"): _ln(f"{p}.ln_1"), (*ours, "ln_2"): _ln(f"{p}.ln_2"),
            (*ours, "attn", "qkv"): {"kernel": _linear_t(f"{p}.attn.in_proj_weight"),
                                     "bias": _same(f"{p}.attn.in_proj_bias")},
            (*ours, "attn", "out"): _linear(f"{p}.attn.out_proj"),
            (*ours, "mlp", "fc1"): _linear(f"{p}.mlp.c_fc"), (*ours, "mlp", "fc2"): _linear(f"{p}.mlp.c_proj"),
        })
    for prefix, leaves in groups.items():
        for leaf, make in leaves.items():
            table[(*prefix, leaf)] = make
    return [make(ours) for ours, make in table.items()]


def detect_layout(state_dict: Mapping[str, np.ndarray], source: str = "checkpoint") -> str:
    """'open_clip' (timm trunk under visual.trunk.) or 'eva_clip' (original release), from the keys."""
    if "visual.trunk.pos_embed" in state_dict:
        return "open_clip"
    if "visual.pos_embed" in state_dict and "visual.blocks.0.attn.q_bias" in state_dict:
        return "eva_clip"
    sample = ", ".join(sorted(state_dict)[:5])
    raise CheckpointMismatchError(f"{source} is not an EVA02-CLIP state dict: it has neither open_clip's "
                                  "visual.trunk.pos_embed nor EVA-CLIP's visual.pos_embed + "
                                  f"visual.blocks.0.attn.q_bias (first keys: {sample})")


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], config: EVA02Config, layout: str | None = None,
                         source: str = "checkpoint") -> dict[tuple, np.ndarray]:
    """Maps a torch-layout state dict (numpy arrays) onto our flat param dict, checking every key and shape."""
    layout = layout or detect_layout(state_dict, source)
    expected = glue.param_shapes(BACKBONE, config)
    rules = _name_table(config, layout)
    assert set(expected) == {r.ours for r in rules}, "internal: name table does not cover the model"
    missing, wrong_shape, params, used = [], [], {}, set()
    for rule in rules:
        absent = [k for k in rule.theirs if k not in state_dict]
        used.update(k for k in rule.theirs if k in state_dict)  # q/v of a fused kernel missing k are not "unexpected"
        if absent:
            missing.extend(absent)
            continue
        try:
            value = np.asarray(rule.to_ours(*(np.asarray(state_dict[k]) for k in rule.theirs)), np.float32)
        except ValueError:  # e.g. q/k/v projections of different shapes cannot be fused
            value = None
        if value is None or value.shape != expected[rule.ours]:
            got = ", ".join(f"{k} {tuple(np.shape(state_dict[k]))}" for k in rule.theirs)
            wrong_shape.append(f"{'/'.join(map(str, rule.ours))}: expected {expected[rule.ours]}, checkpoint has {got}")
            continue
        params[rule.ours] = value
    # RoPE tables (EVA-CLIP stores them at visual.rope and, shared, in every block's attn.rope): recomputed.
    rope_buffer = lambda k: k.startswith("visual.") and "rope" in k.split(".")  # noqa: E731
    unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(_IGNORED_SOURCE_KEYS)
                        and not rope_buffer(k))
    check_fit(f"{source} ({layout} layout) does not fit an EVA02-CLIP of this architecture (vision {config.vision}, "
              f"text {config.text}, embed_dim {config.embed_dim}):", missing=missing, unexpected=unexpected,
              wrong_shape=wrong_shape,
              hint="Check the variant (EVA02-B/16, EVA02-L/14@336, ...) matches the checkpoint.")
    return params


def params_to_state_dict(model: EVA02CLIP, layout: str = "open_clip") -> dict[str, np.ndarray]:
    """Our model's parameters as a torch-layout state dict of float32 numpy arrays."""
    flat = traverse_util.flatten_dict(glue.params_of(model))
    out = {}
    for rule in _name_table(model.config, layout):
        for key, value in zip(rule.theirs, rule.to_theirs(np.asarray(flat[rule.ours], np.float32))):
            out[key] = np.array(value, dtype=np.float32, order="C")
    return out


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: EVA02Config, *,
                           checkpoint_image_size: int | None = None, antialias: bool = True,
                           source: str = "checkpoint") -> dict[tuple, np.ndarray]:
    """Params of a `config` model from a state dict trained at `checkpoint_image_size` (default: config's): the
    position embedding is resized to the config's grid like timm's `resample_abs_pos_embed` (bicubic,
    align_corners=False, antialias=True by default)."""
    size = checkpoint_image_size or config.vision.image_size
    at_source = dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=size))
    params = state_dict_to_params(state_dict, at_source, source=source)
    if size != config.vision.image_size:
        key = ("visual", "pos_embed")
        params[key] = resize_position_embedding(params[key], config.vision.grid_size, antialias)
    return params


def load_open_clip(path: PathLike, variant: str | EVA02Config, *, checkpoint_image_size: int | None = None,
                   antialias: bool = True, **overrides) -> EVA02CLIP:
    """Loads an open_clip `EVA02-*` or original EVA-CLIP state dict (`.pt`, `.bin`, `.safetensors`) into a
    `variant` model. The checkpoint's image size defaults to the variant's; another `image_size` override resizes
    the position embedding (timm's antialiased bicubic) and recomputes RoPE for the new grid."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"EVA02-CLIP checkpoint {path} does not exist")
    base = get_config(variant)
    config = get_config(base, **overrides)
    params = params_from_state_dict(_read_tensors(path), config, antialias=antialias, source=str(path),
                                    checkpoint_image_size=checkpoint_image_size or base.vision.image_size)
    return glue.model_from_params(BACKBONE, config, params)


def save_open_clip(model: EVA02CLIP, path: PathLike) -> pathlib.Path:
    """Writes `model` as an open_clip-layout `.safetensors` state dict (`open_clip.create_model("EVA02-B-16")`
    loads it with strict=True)."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    save_file(params_to_state_dict(model, "open_clip"), str(path))
    return path
