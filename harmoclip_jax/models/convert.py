"""Checkpoint import/export: Hugging Face CLIPModel and open_clip/OpenAI state dicts <-> our NNX CLIP.

Every parameter is mapped explicitly by one table (`_name_table`) used in both directions; every shape is
asserted, and a mismatch raises `CheckpointMismatchError` listing the missing, unexpected and mis-shaped keys.
HF checkpoints are read with numpy only (safetensors, or a `pytorch_model.bin` through torch if installed).
"""
from __future__ import annotations

import json
import os
import pathlib
import zipfile
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from flax import traverse_util

from harmoclip_jax import tokenizer
from harmoclip_jax.models import glue
from harmoclip_jax.models.clip import BACKBONE, CLIP
from harmoclip_jax.models.normalization import OPENAI_CLIP
from harmoclip_jax.models.variants import CLIPConfig, TextConfig, VisionConfig, get_config

PathLike = str | os.PathLike

# Buffers that checkpoints carry but that are not parameters (recomputed by our model).
_IGNORED_SOURCE_KEYS = ("position_ids", "attn_mask", "input_resolution", "context_length", "vocab_size")


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not fit the model."""


def check_fit(header: str, *, missing: list, unexpected: list, wrong_shape: list, hint: str) -> None:
    """Raises one CheckpointMismatchError listing every missing / unexpected / mis-shaped key (20 of each at most)
    under `header`, with `hint` last; returns when all three lists are empty. Every family's converter reports
    through it."""
    if not (missing or unexpected or wrong_shape):
        return
    lines = [header]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"  {title} ({len(items)}): " + "; ".join(shown))
    lines.append(f"  {hint}")
    raise CheckpointMismatchError("\n".join(lines))


@dataclass(frozen=True)
class _Rule:
    ours: tuple  # path in our flat param dict
    theirs: tuple[str, ...]  # source keys this parameter is made from
    to_ours: Callable[..., np.ndarray]
    to_theirs: Callable[[np.ndarray], tuple[np.ndarray, ...]]


def _same(*keys):
    return lambda ours: _Rule(ours, keys, lambda a: a, lambda a: (a,))


def _linear_t(*keys):  # torch Linear (out, in) <-> our kernel (in, out)
    return lambda ours: _Rule(ours, keys, lambda w: w.T, lambda k: (k.T,))


def _fused_qkv_kernel(q, k, v):
    return lambda ours: _Rule(ours, (q, k, v), lambda a, b, c: np.concatenate([a.T, b.T, c.T], axis=1),
                              lambda w: tuple(x.T for x in np.split(w, 3, axis=1)))


def _fused_qkv_bias(q, k, v):
    return lambda ours: _Rule(ours, (q, k, v), lambda a, b, c: np.concatenate([a, b, c]),
                              lambda w: tuple(np.split(w, 3)))


def _patch_conv(key):  # torch conv OIHW <-> our HWIO patch kernel
    return lambda ours: _Rule(ours, (key,), lambda w: w.transpose(2, 3, 1, 0), lambda w: (w.transpose(3, 2, 0, 1),))


def _ln(prefix):
    return {"scale": _same(f"{prefix}.weight"), "bias": _same(f"{prefix}.bias")}


def _name_table(config: CLIPConfig, layout: str) -> list[_Rule]:
    """All parameters of a model of `config`, mapped to the keys of a `layout` ('hf' or 'open_clip') checkpoint."""
    table: dict[tuple, Callable] = {}

    def block(ours_prefix, i, theirs_prefix):
        if layout == "hf":
            p = f"{theirs_prefix}.encoder.layers.{i}"
            a = f"{p}.self_attn"
            rules = {
                ("ln_1",): _ln(f"{p}.layer_norm1"), ("ln_2",): _ln(f"{p}.layer_norm2"),
                ("attn", "qkv"): {"kernel": _fused_qkv_kernel(*(f"{a}.{x}_proj.weight" for x in "qkv")),
                                  "bias": _fused_qkv_bias(*(f"{a}.{x}_proj.bias" for x in "qkv"))},
                ("attn", "out"): {"kernel": _linear_t(f"{a}.out_proj.weight"), "bias": _same(f"{a}.out_proj.bias")},
                ("mlp", "fc1"): {"kernel": _linear_t(f"{p}.mlp.fc1.weight"), "bias": _same(f"{p}.mlp.fc1.bias")},
                ("mlp", "fc2"): {"kernel": _linear_t(f"{p}.mlp.fc2.weight"), "bias": _same(f"{p}.mlp.fc2.bias")},
            }
        else:
            p = f"{theirs_prefix}transformer.resblocks.{i}"
            rules = {
                ("ln_1",): _ln(f"{p}.ln_1"), ("ln_2",): _ln(f"{p}.ln_2"),
                ("attn", "qkv"): {"kernel": _linear_t(f"{p}.attn.in_proj_weight"),
                                  "bias": _same(f"{p}.attn.in_proj_bias")},
                ("attn", "out"): {"kernel": _linear_t(f"{p}.attn.out_proj.weight"),
                                  "bias": _same(f"{p}.attn.out_proj.bias")},
                ("mlp", "fc1"): {"kernel": _linear_t(f"{p}.mlp.c_fc.weight"), "bias": _same(f"{p}.mlp.c_fc.bias")},
                ("mlp", "fc2"): {"kernel": _linear_t(f"{p}.mlp.c_proj.weight"), "bias": _same(f"{p}.mlp.c_proj.bias")},
            }
        for sub, leaves in rules.items():
            for leaf, make in leaves.items():
                table[(*ours_prefix, "transformer", "blocks", i, *sub, leaf)] = make

    if layout == "hf":
        v, t = "vision_model", "text_model"
        top = {
            ("logit_scale",): _same("logit_scale"),
            ("visual", "class_embedding"): _same(f"{v}.embeddings.class_embedding"),
            ("visual", "patch_embed"): _patch_conv(f"{v}.embeddings.patch_embedding.weight"),
            ("visual", "positional_embedding"): _same(f"{v}.embeddings.position_embedding.weight"),
            ("visual", "proj"): _linear_t("visual_projection.weight"),
            ("text", "token_embedding"): _same(f"{t}.embeddings.token_embedding.weight"),
            ("text", "positional_embedding"): _same(f"{t}.embeddings.position_embedding.weight"),
            ("text", "text_projection"): _linear_t("text_projection.weight"),
        }
        norms = {("visual", "ln_pre"): f"{v}.pre_layrnorm", ("visual", "ln_post"): f"{v}.post_layernorm",
                 ("text", "ln_final"): f"{t}.final_layer_norm"}
        vision_prefix, text_prefix = v, t
    elif layout == "open_clip":
        top = {
            ("logit_scale",): _same("logit_scale"),
            ("visual", "class_embedding"): _same("visual.class_embedding"),
            ("visual", "patch_embed"): _patch_conv("visual.conv1.weight"),
            ("visual", "positional_embedding"): _same("visual.positional_embedding"),
            ("visual", "proj"): _same("visual.proj"),
            ("text", "token_embedding"): _same("token_embedding.weight"),
            ("text", "positional_embedding"): _same("positional_embedding"),
            ("text", "text_projection"): _same("text_projection"),
        }
        norms = {("visual", "ln_pre"): "visual.ln_pre", ("visual", "ln_post"): "visual.ln_post",
                 ("text", "ln_final"): "ln_final"}
        vision_prefix, text_prefix = "visual.", ""
    else:
        raise ValueError(f"unknown checkpoint layout {layout!r}")
    table.update(top)
    for ours, prefix in norms.items():
        for leaf, make in _ln(prefix).items():
            table[(*ours, leaf)] = make
    for i in range(config.vision.layers):
        block(("visual",), i, vision_prefix)
    for i in range(config.text.layers):
        block(("text",), i, text_prefix)
    return [make(ours) for ours, make in table.items()]


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], config: CLIPConfig, layout: str,
                         source: str = "checkpoint") -> dict[tuple, np.ndarray]:
    """Maps a torch-layout state dict (numpy arrays) onto our flat param dict, checking every key and shape."""
    expected = glue.param_shapes(BACKBONE, config)
    rules = _name_table(config, layout)
    missing, wrong_shape, params, used = [], [], {}, set()
    for rule in rules:
        absent = [k for k in rule.theirs if k not in state_dict]
        if absent:
            missing.extend(absent)
            continue
        used.update(rule.theirs)
        value = np.asarray(rule.to_ours(*(np.asarray(state_dict[k]) for k in rule.theirs)), np.float32)
        want = expected[rule.ours]
        if value.shape != want:
            got = ", ".join(f"{k} {tuple(np.shape(state_dict[k]))}" for k in rule.theirs)
            wrong_shape.append(f"{'/'.join(map(str, rule.ours))}: expected {want}, checkpoint has {got}")
            continue
        params[rule.ours] = value
    unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(_IGNORED_SOURCE_KEYS))
    assert set(expected) == {r.ours for r in rules}, "internal: name table does not cover the model"
    check_fit(f"{source} does not fit a {layout} CLIP of this architecture (vision {config.vision}, text "
              f"{config.text}, embed_dim {config.embed_dim}):", missing=missing, unexpected=unexpected,
              wrong_shape=wrong_shape,
              hint="Check the variant/config (layers, widths, patch size, image size) matches the checkpoint.")
    return params


def params_to_state_dict(model: CLIP, layout: str) -> dict[str, np.ndarray]:
    """Our model's parameters as a torch-layout state dict of float32 numpy arrays."""
    flat = traverse_util.flatten_dict(glue.params_of(model))
    out = {}
    for rule in _name_table(model.config, layout):
        for key, value in zip(rule.theirs, rule.to_theirs(np.asarray(flat[rule.ours], np.float32))):
            out[key] = np.array(value, dtype=np.float32, order="C")  # (ascontiguousarray makes 0-d 1-d)
    return out


def model_from_params(config: CLIPConfig, params: Mapping[tuple, np.ndarray]) -> CLIP:
    """A CLIP of `config` holding `params` (flat dict keyed like `traverse_util.flatten_dict`)."""
    return glue.model_from_params(BACKBONE, config, params)


# ----------------------------------------------------------------------------------------------------------------
# Position-embedding resize (bicubic, class token kept)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def bicubic_matrix(n_in: int, n_out: int, antialias: bool = False) -> np.ndarray:
    """(n_out, n_in) matrix of torch's bicubic resize, align_corners=False.

    antialias=False is `F.interpolate(mode="bicubic")` (a=-0.75, border-replicated taps), what HF transformers'
    `interpolate_pos_encoding` uses; antialias=True is `F.interpolate(..., antialias=True)` (a=-0.5 with a
    widened, renormalised kernel when shrinking), what open_clip's `resize_pos_embed` uses.
    """
    scale = n_in / n_out
    m = np.zeros((n_out, n_in), np.float64)
    if not antialias:
        for i in range(n_out):
            src = (i + 0.5) * scale - 0.5
            base = int(np.floor(src))
            for tap in range(-1, 3):
                m[i, min(max(base + tap, 0), n_in - 1)] += _cubic(np.array(src - (base + tap)), -0.75)
        return m
    support_scale = max(scale, 1.0)
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - 2 * support_scale + 0.5), 0)
        hi = min(int(center + 2 * support_scale + 0.5), n_in)
        js = np.arange(lo, hi)
        w = _cubic((js - center + 0.5) / support_scale, -0.5)
        m[i, lo:hi] = w / w.sum()
    return m


def resize_position_embedding(pos: np.ndarray, new_grid: int, antialias: bool = False,
                              prefix_tokens: int = 1) -> np.ndarray:
    """(P + g*g, D) -> (P + new_grid^2, D): bicubic resize of the patch grid; the first P = `prefix_tokens` rows
    (the class token: 1 for CLIP and EVA02, 0 for SigLIP) are kept as they are."""
    pos = np.asarray(pos, np.float64)
    g = int(round(np.sqrt(pos.shape[0] - prefix_tokens)))
    if g * g + prefix_tokens != pos.shape[0]:
        grid_rows = f"{prefix_tokens} + a square grid" if prefix_tokens else "a square grid"
        raise ValueError(f"position embedding of {pos.shape[0]} rows is not {grid_rows}")
    if g == new_grid:
        return pos.astype(np.float32)
    m = bicubic_matrix(g, new_grid, antialias)
    grid = np.einsum("yi,xj,ijd->yxd", m, m, pos[prefix_tokens:].reshape(g, g, -1))
    return np.concatenate([pos[:prefix_tokens], grid.reshape(new_grid * new_grid, -1)]).astype(np.float32)


def _resize_if_needed(params: dict, config: CLIPConfig, checkpoint_image_size: int, antialias: bool) -> dict:
    if checkpoint_image_size == config.vision.image_size:
        return params
    key = ("visual", "positional_embedding")
    params = dict(params)
    params[key] = resize_position_embedding(params[key], config.vision.grid_size, antialias)
    return params


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face


class UnreadableCheckpointError(ValueError):
    """The file is not a state dict (a mapping of names to tensors) that safetensors or torch can read."""


def _read_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a corrupt file
            raise UnreadableCheckpointError(f"{path} is not a readable .safetensors state dict ({e})") from e
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{path} is a pickled torch file; reading it needs torch (pip install torch), or "
                          "convert it to .safetensors first") from e
    try:
        if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()  # OpenAI's TorchScript release
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises pickle, zip and runtime errors for a foreign file
        raise UnreadableCheckpointError(f"{path} is not a torch state dict that torch.load can read "
                                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if isinstance(sd, dict) and "state_dict" in sd:  # open_clip training checkpoints
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not sd:
        raise UnreadableCheckpointError(f"{path} holds a {type(sd).__name__}, not a state dict (a mapping of "
                                        f"parameter names to tensors)")
    out = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        out[k] = v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
    return out


def config_from_hf(hf_config: Mapping, **overrides) -> CLIPConfig:
    """Our CLIPConfig from a HF `config.json` dict (overrides as in `variants.get_config`)."""
    v, t = hf_config["vision_config"], hf_config["text_config"]
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise ValueError(f"unsupported HF CLIP activation(s) {sorted(acts)}; supported: quick_gelu, gelu")
    eps = {v.get("layer_norm_eps", 1e-5), t.get("layer_norm_eps", 1e-5)}
    if len(eps) != 1:
        raise ValueError(f"vision and text layer_norm_eps differ ({sorted(eps)}); not supported")
    config = CLIPConfig(
        embed_dim=hf_config.get("projection_dim", v.get("projection_dim", 512)),
        vision=VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
                            layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
                            mlp_ratio=v["intermediate_size"] / v["hidden_size"]),
        text=TextConfig(width=t["hidden_size"], layers=t["num_hidden_layers"], heads=t["num_attention_heads"],
                        context_length=t.get("max_position_embeddings", 77), vocab_size=t.get("vocab_size", 49408),
                        mlp_ratio=t["intermediate_size"] / t["hidden_size"]),
        layer_norm_eps=eps.pop(),
        logit_scale_init=float(hf_config.get("logit_scale_init_value", 2.6592)),
        activation=acts.pop(),
    )
    return get_config(config, **overrides)


def load_hf_clip(path: PathLike, *, antialias: bool = False, **overrides) -> CLIP:
    """Loads a Hugging Face `CLIPModel` directory (config.json + model.safetensors or pytorch_model.bin).

    `overrides` change the config (e.g. `image_size=336` resizes the position embedding bicubically,
    `dtype="bfloat16"` sets the compute dtype).
    """
    path = pathlib.Path(path)
    config_file = path / "config.json"
    candidates = [path / "model.safetensors", path / "pytorch_model.bin"]
    weights = next((c for c in candidates if c.exists()), None)
    if not config_file.exists() or weights is None:
        raise FileNotFoundError(
            f"{path} is not a Hugging Face CLIPModel directory: expected config.json and one of "
            f"{[c.name for c in candidates]} (sharded checkpoints: merge them or save with "
            "`save_pretrained(..., max_shard_size='10GB')`)")
    hf_config = json.loads(config_file.read_text())
    config = config_from_hf(hf_config, **overrides)
    params = state_dict_to_params(_read_tensors(weights), get_config(config, image_size=hf_config["vision_config"][
        "image_size"]), "hf", source=str(weights))
    params = _resize_if_needed(params, config, hf_config["vision_config"]["image_size"], antialias)
    return model_from_params(config, params)


def hf_config_dict(config: CLIPConfig) -> dict:
    """The `config.json` contents that transformers' CLIPConfig needs for our architecture."""
    v, t = config.vision, config.text
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": config.logit_scale_init,
        "text_config": {"hidden_size": t.width, "intermediate_size": t.mlp_dim, "num_hidden_layers": t.layers,
                        "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
                        "vocab_size": t.vocab_size, "hidden_act": config.activation,
                        "layer_norm_eps": config.layer_norm_eps, "projection_dim": config.embed_dim,
                        # HF pools the text at the first eos_token_id; pad id 0 is how `tokenize` pads.
                        "bos_token_id": tokenizer.sot_token, "eos_token_id": tokenizer.eot_token,
                        "pad_token_id": tokenizer.pad_token},
        "vision_config": {"hidden_size": v.width, "intermediate_size": v.mlp_dim, "num_hidden_layers": v.layers,
                          "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size,
                          "hidden_act": config.activation, "layer_norm_eps": config.layer_norm_eps,
                          "projection_dim": config.embed_dim, "num_channels": 3},
    }


def hf_image_processor_dict(image_size: int, image_mean: Sequence[float] | None = None,
                            image_std: Sequence[float] | None = None) -> dict:
    """The `preprocessor_config.json` of a `CLIPImageProcessor` doing what `data.pipeline.decode_image` does: convert
    to RGB, squash to image_size x image_size with PIL's bicubic resize (no aspect-preserving resize, no crop), scale
    by 1/255, normalise by image_mean/image_std (default: the CLIP family's, OpenAI CLIP's).

    transformers picks its torchvision backend when torchvision is installed, and no config key changes that. Its
    bicubic resize runs both passes in float, while PIL rounds and clips the first (horizontal) pass to uint8, so
    where the kernel overshoots (edges) pixels differ by up to ~10 uint8 levels (torch with a uint8 intermediate
    reproduces PIL exactly). `CLIPProcessor.from_pretrained(path, backend="pil")` gives the pipeline's pixels
    (equal within float32 rounding).
    """
    image_mean = OPENAI_CLIP[0] if image_mean is None else image_mean
    image_std = OPENAI_CLIP[1] if image_std is None else image_std

    def channels(values, name):
        values = [float(v) for v in np.asarray(values, np.float64).reshape(-1)]
        if len(values) != 3:
            raise ValueError(f"{name} needs one value per RGB channel, got {len(values)}")
        # The shortest text that reads back as the same float32 (the pipeline computes in float32).
        return [float(str(np.float32(v))) for v in values]

    size = int(image_size)
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 3,  # PIL.Image.BICUBIC
        "do_center_crop": False,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": channels(image_mean, "image_mean"),
        "image_std": channels(image_std, "image_std"),
    }


def save_hf_clip(model: CLIP, path: PathLike, *, image_mean: Sequence[float] | None = None,
                 image_std: Sequence[float] | None = None, with_processor: bool = True) -> pathlib.Path:
    """Writes `model` as a HF CLIPModel directory, loadable by `transformers.CLIPModel.from_pretrained(path)` and by
    `load_hf_clip`: `config.json` + `model.safetensors`; with `with_processor` (default) also everything
    `transformers.CLIPProcessor.from_pretrained(path)` reads: the tokenizer files of `tokenizer.save_hf_tokenizer`
    (our CLIP BPE, model_max_length = the text context length, pad "!" = id 0) and a `preprocessor_config.json` from
    `hf_image_processor_dict` (the training pipeline's preprocessing at the model's image size; image_mean/image_std
    default to the CLIP family's, OpenAI CLIP's).
    """
    from safetensors.numpy import save_file

    if with_processor:
        if model.config.text.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"the model's text vocabulary has {model.config.text.vocab_size} ids, the CLIP tokenizer "
                             f"{tokenizer.vocab_size}; export with with_processor=False and add a matching tokenizer")
        preprocessor = hf_image_processor_dict(model.config.vision.image_size, image_mean, image_std)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config_dict(model.config), indent=2))
    save_file(params_to_state_dict(model, "hf"), str(path / "model.safetensors"), metadata={"format": "pt"})
    if with_processor:
        tokenizer.save_hf_tokenizer(path, context_length=model.config.text.context_length)
        (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return path


# ----------------------------------------------------------------------------------------------------------------
# open_clip / OpenAI


def load_open_clip(path: PathLike, variant: str | CLIPConfig, *, checkpoint_image_size: int | None = None,
                   antialias: bool = True, **overrides) -> CLIP:
    """Loads an open_clip / OpenAI CLIP state dict (`.pt`, `.bin` or `.safetensors`) into a `variant` model.

    The checkpoint's image size defaults to the variant's; if `overrides` set another `image_size` the position
    embedding is resized (open_clip's antialiased bicubic by default). `.pt`/`.bin` files need torch.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"open_clip checkpoint {path} does not exist")
    base = get_config(variant)
    config = get_config(base, **overrides)
    size = checkpoint_image_size or base.vision.image_size
    state_dict = _read_tensors(path)
    params = state_dict_to_params(state_dict, get_config(config, image_size=size), "open_clip", source=str(path))
    params = _resize_if_needed(params, config, size, antialias)
    return model_from_params(config, params)


def save_open_clip(model: CLIP, path: PathLike) -> pathlib.Path:
    """Writes `model` as an open_clip-layout `.safetensors` state dict."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    save_file(params_to_state_dict(model, "open_clip"), str(path))
    return path
