"""Checkpoint import/export for the SigLIP family: Hugging Face `SiglipModel` directories and open_clip
`ViT-*-SigLIP` state dicts (timm vision trunk) <-> our NNX `SigLIP`.

One explicit table per layout (`_name_table`) lists every parameter: which of our params it fills, from which
source keys, and how to transform both ways. A rule may be many-to-many (HF's MAP head stores the probe's q and
the k/v projections fused in one `in_proj_weight`; we keep q and kv apart, as timm does). Every shape is asserted;
a mismatch raises `convert.CheckpointMismatchError` listing missing, unexpected and mis-shaped keys.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
from flax import traverse_util

from harmoclip_jax.models import glue
from harmoclip_jax.models.convert import _read_tensors, check_fit, resize_position_embedding
from harmoclip_jax.models.siglip import BACKBONE, SigLIP, SigLIPConfig, TextConfig, VisionConfig, get_config

PathLike = str | os.PathLike

# Buffers that checkpoints carry but that are not parameters.
_IGNORED_SOURCE_KEYS = ("position_ids", "attn_mask")
_HF_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


@dataclass(frozen=True)
class _Rule:
    ours: tuple[tuple, ...]  # paths in our flat params dict
    theirs: tuple[str, ...]  # source keys
    to_ours: Callable[..., tuple]  # (*theirs arrays) -> tuple of our arrays
    to_theirs: Callable[..., tuple]  # (*our arrays) -> tuple of their arrays


def _same(ours, key):
    return _Rule((ours,), (key,), lambda a: (a,), lambda a: (a,))


def _squeeze(ours, key, shape_theirs):
    """Leading singleton axes dropped: HF's (1,) scalars, the (1, 1, D) probe, timm's (1, N, D) positions."""
    return _Rule((ours,), (key,), lambda a: (a.reshape(a.shape[-2:] if a.ndim == 3 else ()),),
                 lambda a: (a.reshape(shape_theirs),))


def _linear(ours_prefix, key_prefix):
    """torch Linear (out, in) weight + bias <-> our kernel (in, out) + bias."""
    return [_Rule(((*ours_prefix, "kernel"),), (f"{key_prefix}.weight",), lambda w: (w.T,), lambda k: (k.T,)),
            _Rule(((*ours_prefix, "bias"),), (f"{key_prefix}.bias",), lambda b: (b,), lambda b: (b,))]


def _ln(ours_prefix, key_prefix):
    return [_Rule(((*ours_prefix, "scale"),), (f"{key_prefix}.weight",), lambda a: (a,), lambda a: (a,)),
            _Rule(((*ours_prefix, "bias"),), (f"{key_prefix}.bias",), lambda a: (a,), lambda a: (a,))]


def _qkv_separate(ours_prefix, q, k, v):
    """HF q_proj/k_proj/v_proj <-> our fused qkv."""
    return [
        _Rule(((*ours_prefix, "kernel"),), tuple(f"{x}.weight" for x in (q, k, v)),
              lambda a, b, c: (np.concatenate([a.T, b.T, c.T], axis=1),),
              lambda w: tuple(x.T for x in np.split(w, 3, axis=1))),
        _Rule(((*ours_prefix, "bias"),), tuple(f"{x}.bias" for x in (q, k, v)),
              lambda a, b, c: (np.concatenate([a, b, c]),), lambda w: tuple(np.split(w, 3))),
    ]


def _split_in_proj(head, key_prefix):
    """torch MultiheadAttention's fused in_proj (3D, D) <-> our head q (D, D) and kv (D, 2D)."""
    def to_ours(w):
        d = w.shape[-1] if w.ndim == 2 else w.shape[0] // 3
        return (w[:d].T, w[d:].T) if w.ndim == 2 else (w[:d], w[d:])

    def to_theirs(q, kv):
        return (np.concatenate([q.T, kv.T], axis=0),) if q.ndim == 2 else (np.concatenate([q, kv]),)

    return [_Rule(((*head, "q", leaf), (*head, "kv", leaf)), (f"{key_prefix}_{name}",), to_ours, to_theirs)
            for leaf, name in (("kernel", "weight"), ("bias", "bias"))]


def _patch(ours, key):  # torch conv OIHW <-> our HWIO patch kernel
    return _Rule((ours,), (key,), lambda w: (w.transpose(2, 3, 1, 0),), lambda w: (w.transpose(3, 2, 0, 1),))


def _name_table(config: SigLIPConfig, layout: str) -> list[_Rule]:
    """Every parameter of a `config` model mapped to the keys of a `layout` ('hf' or 'open_clip') checkpoint."""
    d = config.vision.width
    rules: list[_Rule] = []
    vb, tb = ("visual", "transformer", "blocks"), ("text", "transformer", "blocks")
    if layout == "hf":
        v, t = "vision_model", "text_model"
        rules += [_squeeze(("logit_scale",), "logit_scale", (1,)), _squeeze(("logit_bias",), "logit_bias", (1,)),
                  _patch(("visual", "patch_embed"), f"{v}.embeddings.patch_embedding.weight"),
                  _same(("visual", "patch_bias"), f"{v}.embeddings.patch_embedding.bias"),
                  _same(("visual", "positional_embedding"), f"{v}.embeddings.position_embedding.weight"),
                  _same(("text", "token_embedding"), f"{t}.embeddings.token_embedding.weight"),
                  _same(("text", "positional_embedding"), f"{t}.embeddings.position_embedding.weight"),
                  _squeeze(("visual", "head", "probe"), f"{v}.head.probe", (1, 1, d))]
        rules += _ln(("visual", "ln_post"), f"{v}.post_layernorm") + _ln(("text", "ln_final"), f"{t}.final_layer_norm")
        rules += _split_in_proj(("visual", "head"), f"{v}.head.attention.in_proj")
        rules += _linear(("visual", "head", "out"), f"{v}.head.attention.out_proj")
        rules += _ln(("visual", "head", "ln"), f"{v}.head.layernorm")
        rules += _linear(("visual", "head", "mlp", "fc1"), f"{v}.head.mlp.fc1")
        rules += _linear(("visual", "head", "mlp", "fc2"), f"{v}.head.mlp.fc2")
        rules += _linear(("text", "head"), f"{t}.head")
        for ours, prefix, n in ((vb, v, config.vision.layers), (tb, t, config.text.layers)):
            for i in range(n):
                p = f"{prefix}.encoder.layers.{i}"
                a = f"{p}.self_attn"
                rules += _ln((*ours, i, "ln_1"), f"{p}.layer_norm1") + _ln((*ours, i, "ln_2"), f"{p}.layer_norm2")
                rules += _qkv_separate((*ours, i, "attn", "qkv"), *(f"{a}.{x}_proj" for x in "qkv"))
                rules += _linear((*ours, i, "attn", "out"), f"{a}.out_proj")
                rules += _linear((*ours, i, "mlp", "fc1"), f"{p}.mlp.fc1") + _linear((*ours, i, "mlp", "fc2"),
                                                                                     f"{p}.mlp.fc2")
    elif layout == "open_clip":
        v = "visual.trunk"
        g2 = config.vision.grid_size ** 2
        rules += [_same(("logit_scale",), "logit_scale"), _same(("logit_bias",), "logit_bias"),
                  _patch(("visual", "patch_embed"), f"{v}.patch_embed.proj.weight"),
                  _same(("visual", "patch_bias"), f"{v}.patch_embed.proj.bias"),
                  _squeeze(("visual", "positional_embedding"), f"{v}.pos_embed", (1, g2, d)),
                  _squeeze(("visual", "head", "probe"), f"{v}.attn_pool.latent", (1, 1, d)),
                  _same(("text", "token_embedding"), "text.token_embedding.weight"),
                  _same(("text", "positional_embedding"), "text.positional_embedding")]
        rules += _ln(("visual", "ln_post"), f"{v}.norm") + _ln(("text", "ln_final"), "text.ln_final")
        for name, theirs in (("q", "q"), ("kv", "kv"), ("out", "proj"), (("mlp", "fc1"), "mlp.fc1"),
                             (("mlp", "fc2"), "mlp.fc2")):
            rules += _linear(("visual", "head", *((name,) if isinstance(name, str) else name)),
                             f"{v}.attn_pool.{theirs}")
        rules += _ln(("visual", "head", "ln"), f"{v}.attn_pool.norm")
        rules += _linear(("text", "head"), "text.text_projection")
        for i in range(config.vision.layers):
            p = f"{v}.blocks.{i}"
            rules += _ln((*vb, i, "ln_1"), f"{p}.norm1") + _ln((*vb, i, "ln_2"), f"{p}.norm2")
            rules += _linear((*vb, i, "attn", "qkv"), f"{p}.attn.qkv") + _linear((*vb, i, "attn", "out"),
                                                                                 f"{p}.attn.proj")
            rules += _linear((*vb, i, "mlp", "fc1"), f"{p}.mlp.fc1") + _linear((*vb, i, "mlp", "fc2"), f"{p}.mlp.fc2")
        for i in range(config.text.layers):
            p = f"text.transformer.resblocks.{i}"
            rules += _ln((*tb, i, "ln_1"), f"{p}.ln_1") + _ln((*tb, i, "ln_2"), f"{p}.ln_2")
            rules += [_Rule(((*tb, i, "attn", "qkv", "kernel"),), (f"{p}.attn.in_proj_weight",), lambda w: (w.T,),
                            lambda k: (k.T,)),
                      _Rule(((*tb, i, "attn", "qkv", "bias"),), (f"{p}.attn.in_proj_bias",), lambda b: (b,),
                            lambda b: (b,))]
            rules += _linear((*tb, i, "attn", "out"), f"{p}.attn.out_proj")
            rules += _linear((*tb, i, "mlp", "fc1"), f"{p}.mlp.c_fc") + _linear((*tb, i, "mlp", "fc2"),
                                                                                f"{p}.mlp.c_proj")
    else:
        raise ValueError(f"unknown SigLIP checkpoint layout {layout!r}; use 'hf' or 'open_clip'")
    return rules


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], config: SigLIPConfig, layout: str,
                         source: str = "checkpoint") -> dict[tuple, np.ndarray]:
    """Maps a torch-layout state dict (numpy arrays) onto our flat params dict, checking every key and shape."""
    expected = glue.param_shapes(BACKBONE, config)
    rules = _name_table(config, layout)
    covered = [p for r in rules for p in r.ours]
    assert sorted(covered) == sorted(expected), "internal: the SigLIP name table does not cover the model once"
    missing, wrong_shape, params, used = [], [], {}, set()
    for rule in rules:
        absent = [k for k in rule.theirs if k not in state_dict]
        if absent:
            missing.extend(absent)
            continue
        used.update(rule.theirs)
        values = rule.to_ours(*(np.asarray(state_dict[k], np.float32) for k in rule.theirs))
        for ours, value in zip(rule.ours, values):
            if tuple(value.shape) != expected[ours]:
                got = ", ".join(f"{k} {tuple(np.shape(state_dict[k]))}" for k in rule.theirs)
                wrong_shape.append(f"{'/'.join(map(str, ours))}: expected {expected[ours]}, checkpoint has {got}")
            else:
                params[ours] = np.asarray(value, np.float32)
    unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(_IGNORED_SOURCE_KEYS))
    check_fit(f"{source} does not fit a {layout} SigLIP of this architecture (vision {config.vision}, text "
              f"{config.text}):", missing=sorted(set(missing)), unexpected=unexpected, wrong_shape=wrong_shape,
              hint="Check the variant/config (layers, widths, patch size, image size) matches the checkpoint.")
    return params


def params_to_state_dict(model: SigLIP, layout: str) -> dict[str, np.ndarray]:
    """Our model's parameters as a torch-layout state dict of float32 numpy arrays."""
    flat = traverse_util.flatten_dict(glue.params_of(model))
    out = {}
    for rule in _name_table(model.config, layout):
        values = rule.to_theirs(*(np.asarray(flat[p], np.float32) for p in rule.ours))
        for key, value in zip(rule.theirs, values):
            out[key] = np.array(value, dtype=np.float32, order="C")
    return out


def _load(state_dict, config: SigLIPConfig, checkpoint_image_size: int, layout: str, source: str,
          antialias: bool) -> SigLIP:
    stored = get_config(config, image_size=checkpoint_image_size)
    params = state_dict_to_params(state_dict, stored, layout, source)
    if stored.vision.grid_size != config.vision.grid_size:
        # No class token: every row is the grid. antialias=False is HF's `interpolate_pos_encoding`, True timm's
        # `resample_abs_pos_embed` (open_clip).
        key = ("visual", "positional_embedding")
        params[key] = resize_position_embedding(params[key], config.vision.grid_size, antialias, prefix_tokens=0)
    return glue.model_from_params(BACKBONE, config, params)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face

_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
_HF_TEXT_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=64, vocab_size=32000, hidden_act="gelu_pytorch_tanh",
                         layer_norm_eps=1e-6, pad_token_id=1)


def config_from_hf(hf_config: Mapping, **overrides) -> SigLIPConfig:
    """Our SigLIPConfig from a HF SiglipModel `config.json` dict (transformers omits default values there)."""
    v = {**_HF_VISION_DEFAULTS, **hf_config.get("vision_config", {})}
    t = {**_HF_TEXT_DEFAULTS, **hf_config.get("text_config", {})}
    if not v.get("vision_use_head", True):
        raise ValueError("this SigLIP vision tower has no MAP head (vision_use_head=false); not supported")
    acts = {v["hidden_act"], t["hidden_act"]}
    if len(acts) != 1 or not acts <= set(_HF_ACTIVATIONS):
        raise ValueError(f"unsupported HF SigLIP activation(s) {sorted(acts)}; supported: {sorted(_HF_ACTIVATIONS)}")
    eps = {v["layer_norm_eps"], t["layer_norm_eps"]}
    if len(eps) != 1:
        raise ValueError(f"vision and text layer_norm_eps differ ({sorted(eps)}); not supported")
    config = SigLIPConfig(
        embed_dim=v["hidden_size"],
        vision=VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
                            layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
                            mlp_dim=v["intermediate_size"]),
        text=TextConfig(width=t["hidden_size"], layers=t["num_hidden_layers"], heads=t["num_attention_heads"],
                        mlp_dim=t["intermediate_size"], context_length=t["max_position_embeddings"],
                        vocab_size=t["vocab_size"], pad_id=t["pad_token_id"] if t["pad_token_id"] is not None else 1),
        layer_norm_eps=eps.pop(),
        activation=_HF_ACTIVATIONS[acts.pop()],
    )
    projection = t.get("projection_size") or t["hidden_size"]
    if projection != config.embed_dim:
        raise ValueError(f"text projection_size={projection} differs from the vision width {config.embed_dim}")
    return get_config(config, **overrides)


def load_hf_siglip(path: PathLike, *, antialias: bool = False, **overrides) -> SigLIP:
    """Loads a Hugging Face `SiglipModel` directory (config.json + model.safetensors or pytorch_model.bin).

    `image_size=...` resizes the position embedding like HF's `interpolate_pos_encoding` (bicubic)."""
    path = pathlib.Path(path)
    candidates = [path / "model.safetensors", path / "pytorch_model.bin"]
    weights = next((c for c in candidates if c.exists()), None)
    if not (path / "config.json").exists() or weights is None:
        raise FileNotFoundError(f"{path} is not a Hugging Face SiglipModel directory: expected config.json and one of "
                                f"{[c.name for c in candidates]}")
    hf_config = json.loads((path / "config.json").read_text())
    config = config_from_hf(hf_config, **overrides)
    size = {**_HF_VISION_DEFAULTS, **hf_config.get("vision_config", {})}["image_size"]
    return _load(_read_tensors(weights), config, size, "hf", str(weights), antialias)


def hf_config_dict(config: SigLIPConfig) -> dict:
    """The `config.json` of a transformers `SiglipModel` with our architecture."""
    v, t = config.vision, config.text
    act = {ours: theirs for theirs, ours in _HF_ACTIVATIONS.items()}[config.activation]
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "text_config": {"hidden_size": t.width, "intermediate_size": t.mlp_dim, "num_hidden_layers": t.layers,
                        "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
                        "vocab_size": t.vocab_size, "hidden_act": act, "layer_norm_eps": config.layer_norm_eps,
                        "projection_size": config.embed_dim, "pad_token_id": t.pad_id,
                        "model_type": "siglip_text_model"},
        "vision_config": {"hidden_size": v.width, "intermediate_size": v.mlp_dim, "num_hidden_layers": v.layers,
                          "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size,
                          "hidden_act": act, "layer_norm_eps": config.layer_norm_eps, "num_channels": 3,
                          "model_type": "siglip_vision_model"},
    }


def save_hf_siglip(model: SigLIP, path: PathLike, *, tokenizer_file: PathLike | None = None) -> pathlib.Path:
    """Writes `model` as a HF SiglipModel directory (`config.json` + `model.safetensors`), loadable by
    `transformers.SiglipModel.from_pretrained(path)` and `load_hf_siglip`, plus a `preprocessor_config.json`
    (resize to the model's size, scale to [0, 1], mean = std = 0.5: the pipeline's preprocessing). With
    `tokenizer_file` (the SentencePiece model the text tower was trained with) also the SiglipTokenizer files."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config_dict(model.config), indent=2))
    save_file(params_to_state_dict(model, "hf"), str(path / "model.safetensors"), metadata={"format": "pt"})
    size = model.config.vision.image_size
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(BACKBONE.image_mean), "image_std": list(BACKBONE.image_std)}, indent=2))
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, path / "spiece.model")
        (path / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "SiglipTokenizer", "model_max_length": model.config.text.context_length,
            "do_lower_case": True, "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}, indent=2))
    return path


# ----------------------------------------------------------------------------------------------------------------
# open_clip (timm trunk)


def load_open_clip_siglip(path: PathLike, variant: str | SigLIPConfig, *, checkpoint_image_size: int | None = None,
                          antialias: bool = True, **overrides) -> SigLIP:
    """Loads an open_clip `ViT-*-SigLIP*` state dict (`.pt`, `.bin`, `.safetensors`) into a `variant` model.

    open_clip's timm trunk and text tower compute erf-GELU (big_vision trained with tanh-GELU), so the model
    defaults to `activation="gelu"` to reproduce open_clip's outputs; pass `activation="gelu_tanh"` for
    big_vision's numerics. `image_size=...` resizes the position embedding (timm's antialiased bicubic)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"open_clip checkpoint {path} does not exist")
    base = get_config(variant)
    config = get_config(base, **{"activation": "gelu", **overrides})
    return _load(_read_tensors(path), config, checkpoint_image_size or base.vision.image_size, "open_clip", str(path),
                 antialias)


def save_open_clip_siglip(model: SigLIP, path: PathLike) -> pathlib.Path:
    """Writes `model` as an open_clip-layout `.safetensors` state dict."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    save_file(params_to_state_dict(model, "open_clip"), str(path))
    return path
