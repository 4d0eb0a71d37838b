"""CLIP architecture configs and the variant table ("ViT-B/16" -> sizes), big_vision style.

`get_config("ViT-B/16")` gives the OpenAI/open_clip architecture; keyword overrides change any field, e.g.
`get_config("ViT-B/16", image_size=336, dtype="bfloat16", remat=True)`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from harmoclip_jax.models.backbone import override_config


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    width: int
    layers: int
    heads: int
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Everything that defines a CLIP model's parameters and numerics."""

    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    dtype: str = "float32"  # compute dtype; "bfloat16" on accelerators
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise transformer blocks in the backward pass
    layer_norm_eps: float = 1e-5
    logit_scale_init: float = math.log(1 / 0.07)
    attention_impl: str | None = "auto"  # "auto" (cuDNN for bf16/fp16 on GPU), None/"xla" or "cudnn"
    activation: str = "quick_gelu"  # OpenAI weights; LAION/open_clip non-quickgelu models use "gelu" (erf)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        d = dict(d)
        return cls(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**d.pop("text")), **d)


def _clip(embed, v_width, v_layers, v_heads, patch, image, t_width, t_layers, t_heads):
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig(image_size=image, patch_size=patch, width=v_width, layers=v_layers, heads=v_heads),
        text=TextConfig(width=t_width, layers=t_layers, heads=t_heads),
    )


VARIANTS: dict[str, CLIPConfig] = {
    # OpenAI CLIP architectures (open_clip names).
    "ViT-B/32": _clip(512, 768, 12, 12, 32, 224, 512, 12, 8),
    "ViT-B/16": _clip(512, 768, 12, 12, 16, 224, 512, 12, 8),
    "ViT-L/14": _clip(768, 1024, 24, 16, 14, 224, 768, 12, 12),
    "ViT-L/14@336": _clip(768, 1024, 24, 16, 14, 336, 768, 12, 12),
    # Small models for the demo (trained from scratch on CPU) and for tests.
    "ViT-S/8@64": _clip(256, 256, 6, 4, 8, 64, 256, 4, 4),
    "ViT-Ti/8@64": _clip(128, 128, 4, 4, 8, 64, 128, 3, 4),
    "test-tiny": _clip(32, 64, 2, 4, 16, 64, 64, 2, 4),
}


def get_config(variant: str | CLIPConfig, **overrides: Any) -> CLIPConfig:
    """Returns the CLIPConfig of a named variant with `overrides` applied.

    Overrides may name a top-level field (`dtype`, `embed_dim`, ...), a vision field (`image_size`,
    `patch_size`, ...) or a text field prefixed with `text_` (`text_context_length`, ...).
    """
    if isinstance(variant, CLIPConfig):
        config = variant
    else:
        if variant not in VARIANTS:
            raise ValueError(f"unknown CLIP variant {variant!r}; known variants: {', '.join(VARIANTS)}")
        config = VARIANTS[variant]
    config = override_config(config, overrides, "CLIP")
    validate(config)
    return config


def validate(config: CLIPConfig) -> None:
    """Rejects configs that cannot build a model, saying which field to change."""
    v, t = config.vision, config.text
    if v.image_size % v.patch_size:
        raise ValueError(f"vision.image_size={v.image_size} is not a multiple of patch_size={v.patch_size}")
    if v.width % v.heads:
        raise ValueError(f"vision.width={v.width} is not divisible by vision.heads={v.heads}")
    if t.width % t.heads:
        raise ValueError(f"text.width={t.width} is not divisible by text.heads={t.heads}")
    for name in ("dtype", "param_dtype"):
        if getattr(config, name) not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"{name}={getattr(config, name)!r}; use 'float32', 'bfloat16' or 'float16'")
    if config.activation not in ("quick_gelu", "gelu"):
        raise ValueError(f"activation={config.activation!r}; use 'quick_gelu' (OpenAI CLIP) or 'gelu'")
    if config.attention_impl not in ("auto", None, "xla", "cudnn"):
        raise ValueError(f"attention_impl={config.attention_impl!r}; use 'auto', None, 'xla' or 'cudnn'")
