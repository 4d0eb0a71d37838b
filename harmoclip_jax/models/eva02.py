"""EVA02-CLIP (Fang et al., 2023; open_clip `EVA02-B-16`, `EVA02-L-14-336`) as Flax NNX modules.

Vision (timm's EVA02 image tower): patchify (conv with bias) -> [class token] + learned absolute positions -> pre-LN
blocks -> final LayerNorm -> class token -> linear head with bias. A block differs from CLIP's in three places:
  * attention has q and v biases but no k bias; q and k of the patch tokens (not the class token) are rotated by a
    2-D axial RoPE whose grid coordinates are rescaled to the pretraining grid (`rope_ref_grid`), so a model run at
    another resolution sees the same coordinate range (timm's `ref_feat_shape`);
  * a LayerNorm on the attention output before its projection (sub-LN);
  * a SwiGLU MLP (silu(fc1_g x) * fc1_x x) with a LayerNorm before fc2.
Text: the OpenAI CLIP text tower of `clip.py` (open_clip's EVA configs use exact GELU, LayerNorm eps 1e-5).

Dense features follow CLIPSelf/FineCLIP's EVA form: in the last block the patch tokens take the value path
(v -> sub-LN -> out-proj; RoPE touches only q and k, so none), then the MLP; the class token is dropped.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from harmoclip_jax.models import clip, glue
from harmoclip_jax.models.backbone import Backbone, lazy, override_config
from harmoclip_jax.models.normalization import OPENAI_CLIP
from harmoclip_jax.models.variants import TextConfig

_normal = jax.nn.initializers.normal


@dataclasses.dataclass(frozen=True)
class EVAVisionConfig:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int  # SwiGLU hidden width: int(width * 8/3) for the released models
    rope_ref_grid: int  # grid the RoPE coordinates are scaled to (EVA02 pretraining: 224 / 14 = 16)
    rope_theta: float = 10000.0
    eps: float = 1e-6

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class EVA02Config:
    embed_dim: int
    vision: EVAVisionConfig
    text: TextConfig
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    logit_scale_init: float = math.log(1 / 0.07)
    attention_impl: str | None = "auto"
    text_activation: str = "gelu"  # open_clip's EVA02 configs do not set quick_gelu
    text_eps: float = 1e-5

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EVA02Config":
        d = dict(d)
        return cls(vision=EVAVisionConfig(**d.pop("vision")), text=TextConfig(**d.pop("text")), **d)


def _eva(embed, width, layers, heads, patch, image, mlp_dim, ref, t_width, t_layers, t_heads):
    return EVA02Config(
        embed_dim=embed,
        vision=EVAVisionConfig(image_size=image, patch_size=patch, width=width, layers=layers, heads=heads,
                               mlp_dim=mlp_dim, rope_ref_grid=ref),
        text=TextConfig(width=t_width, layers=t_layers, heads=t_heads),
    )


VARIANTS: dict[str, EVA02Config] = {
    "EVA02-B/16": _eva(512, 768, 12, 12, 16, 224, 2048, 16, 512, 12, 8),
    "EVA02-L/14@336": _eva(768, 1024, 24, 16, 14, 336, 2730, 16, 768, 12, 12),
    # Small models for the Scenes demo and for tests.
    "EVA02-Ti/8@64": _eva(128, 128, 4, 4, 8, 64, 341, 8, 128, 3, 4),
    "EVA02-test-tiny": _eva(32, 64, 2, 4, 16, 64, 170, 4, 64, 2, 4),
}
ALIASES = {"EVA02-B-16": "EVA02-B/16", "EVA02-L-14-336": "EVA02-L/14@336"}  # open_clip's names


def get_config(variant: str | EVA02Config, **overrides: Any) -> EVA02Config:
    """The EVA02Config of a named variant (ours or open_clip's name) with `overrides` applied: a top-level field,
    a vision field (`image_size`, ...) or a text field prefixed with `text_` (`text_context_length`, ...)."""
    if isinstance(variant, EVA02Config):
        config = variant
    else:
        name = ALIASES.get(variant, variant)
        if name not in VARIANTS:
            raise ValueError(f"unknown EVA02-CLIP variant {variant!r}; known variants: "
                             f"{', '.join([*VARIANTS, *ALIASES])}")
        config = VARIANTS[name]
    config = override_config(config, overrides, "EVA02-CLIP")
    _validate(config)
    return config


def _validate(config: EVA02Config) -> None:
    v, t = config.vision, config.text
    if v.image_size % v.patch_size:
        raise ValueError(f"vision.image_size={v.image_size} is not a multiple of patch_size={v.patch_size}")
    if v.width % v.heads or (v.width // v.heads) % 4:
        raise ValueError(f"vision.width={v.width} / heads={v.heads} must give a head width divisible by 4 (2-D RoPE)")
    if t.width % t.heads:
        raise ValueError(f"text.width={t.width} is not divisible by text.heads={t.heads}")
    for name in ("dtype", "param_dtype"):
        if getattr(config, name) not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"{name}={getattr(config, name)!r}; use 'float32', 'bfloat16' or 'float16'")
    if config.text_activation not in clip.ACTIVATIONS:
        raise ValueError(f"text_activation={config.text_activation!r}; use one of {sorted(clip.ACTIVATIONS)}")
    if config.attention_impl not in ("auto", None, "xla", "cudnn"):
        raise ValueError(f"attention_impl={config.attention_impl!r}; use 'auto', None, 'xla' or 'cudnn'")


def rope_tables(grid: int, head_dim: int, ref_grid: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """(sin, cos), each (grid*grid, head_dim) float32, of EVA02's axial RoPE for row-major patch tokens.

    A quarter of the head width of frequencies theta^(-i / (head_dim/4)) per axis; coordinates are the integer grid
    positions times ref_grid / grid; the channel layout is [row bands, column bands], each band repeated twice
    (rotation of adjacent channel pairs)."""
    bands = theta ** -(np.arange(head_dim // 4, dtype=np.float64) / (head_dim // 4))
    coords = np.arange(grid, dtype=np.float64) * (ref_grid / grid)
    rows, cols = np.meshgrid(coords, coords, indexing="ij")
    angles = np.concatenate([rows.reshape(-1, 1) * bands, cols.reshape(-1, 1) * bands], axis=1)
    angles = np.repeat(angles, 2, axis=1)
    # float32 angles, as timm computes them: the tables then agree to rounding at any grid size.
    angles = angles.astype(np.float32)
    return np.sin(angles), np.cos(angles)


def _rotate(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """RoPE on (B, N, H, D) with (N, D) tables: x cos + rot(x) sin, rot((x0, x1)) = (-x1, x0) per channel pair."""
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x32 * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


class SwiGLU(nnx.Module):
    def __init__(self, width: int, hidden: int, *, layers: int, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1_g = nnx.Linear(width, hidden, kernel_init=_normal(0.02), **lin)
        self.fc1_x = nnx.Linear(width, hidden, kernel_init=_normal(0.02), **lin)
        self.norm = clip.LayerNorm(hidden, epsilon=eps, dtype=dtype, param_dtype=param_dtype)
        # timm's EVA init: output projections scaled down with depth.
        self.fc2 = nnx.Linear(hidden, width, kernel_init=_normal(0.02 / math.sqrt(2 * layers)), **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.norm(jax.nn.silu(self.fc1_g(x)) * self.fc1_x(x)))


class EVAAttention(nnx.Module):
    """Self-attention with one fused qkv matmul (no bias) plus q and v biases (k has none), RoPE on the patch
    tokens' q and k, and a sub-LN before the output projection."""

    def __init__(self, width: int, heads: int, *, layers: int, eps: float, dtype, param_dtype, impl,
                 rngs: nnx.Rngs):
        self.heads = heads
        self.impl = impl
        self.dtype = dtype
        self.qkv = nnx.Linear(width, 3 * width, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=_normal(0.02), rngs=rngs)
        self.q_bias = nnx.Param(jnp.zeros((width,), param_dtype))
        self.v_bias = nnx.Param(jnp.zeros((width,), param_dtype))
        self.norm = clip.LayerNorm(width, epsilon=eps, dtype=dtype, param_dtype=param_dtype)
        self.proj = nnx.Linear(width, width, dtype=dtype, param_dtype=param_dtype,
                               kernel_init=_normal(0.02 / math.sqrt(2 * layers)), rngs=rngs)

    def project(self, h: jax.Array, rope) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(B, N, D) -> q, k, v (B, N, heads, head_dim); q and k of tokens 1.. rotated by `rope` = (sin, cos)."""
        b, n, d = h.shape
        bias = jnp.concatenate([self.q_bias[...], jnp.zeros_like(self.q_bias[...]), self.v_bias[...]])
        qkv = (self.qkv(h) + bias.astype(self.dtype)).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        sin, cos = rope
        q = jnp.concatenate([q[:, :1], _rotate(q[:, 1:], sin, cos)], axis=1)
        k = jnp.concatenate([k[:, :1], _rotate(k[:, 1:], sin, cos)], axis=1)
        return q, k, v

    def output(self, o: jax.Array) -> jax.Array:
        """(B, N, heads, head_dim) -> sub-LN -> projection (B, N, D)."""
        return self.proj(self.norm(o.reshape(*o.shape[:2], -1)))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return self.output(clip._dot_product_attention(q, k, v, causal=False, impl=self.impl))


class EVABlock(nnx.Module):
    def __init__(self, cfg: EVAVisionConfig, *, dtype, param_dtype, impl, rngs: nnx.Rngs):
        norm = dict(epsilon=cfg.eps, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = clip.LayerNorm(cfg.width, **norm)
        self.attn = EVAAttention(cfg.width, cfg.heads, layers=cfg.layers, eps=cfg.eps, dtype=dtype,
                                 param_dtype=param_dtype, impl=impl, rngs=rngs)
        self.norm2 = clip.LayerNorm(cfg.width, **norm)
        self.mlp = SwiGLU(cfg.width, cfg.mlp_dim, layers=cfg.layers, eps=cfg.eps, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, rope, *, first_token_only: bool = False) -> jax.Array:
        """`first_token_only` returns just the class token's row (all the last block of encode_image needs)."""
        q, k, v = self.attn.project(self.norm1(x), rope)
        if first_token_only:
            q, x = q[:, :1], x[:, :1]
        x = x + self.attn.attend(q, k, v)
        return x + self.mlp(self.norm2(x))

    def dense(self, x: jax.Array, rope, *, with_first_token: bool) -> jax.Array:
        """Patch tokens take the value path (each attends only to itself); token 0, if wanted, attends as usual."""
        q, k, v = self.attn.project(self.norm1(x), rope)
        out = x[:, 1:] + self.attn.output(v[:, 1:])
        if with_first_token:
            out = jnp.concatenate([x[:, :1] + self.attn.attend(q[:, :1], k, v), out], axis=1)
        return out + self.mlp(self.norm2(out))


class EVAVisionTransformer(nnx.Module):
    def __init__(self, cfg: EVAVisionConfig, embed_dim: int, *, dtype, param_dtype, remat: bool, impl,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        w, p = cfg.width, cfg.patch_size
        # Patchify is a matmul over flattened (p, p, 3) patches; the kernel keeps conv's HWIO layout.
        self.patch_embed = nnx.Param(_normal(0.02)(rngs.params(), (p, p, 3, w), param_dtype))
        self.patch_bias = nnx.Param(jnp.zeros((w,), param_dtype))
        self.cls_token = nnx.Param(_normal(0.02)(rngs.params(), (w,), param_dtype))
        self.pos_embed = nnx.Param(_normal(0.02)(rngs.params(), (cfg.grid_size**2 + 1, w), param_dtype))
        self.blocks = nnx.List([EVABlock(cfg, dtype=dtype, param_dtype=param_dtype, impl=impl, rngs=rngs)
                                for _ in range(cfg.layers)])
        self.norm = clip.LayerNorm(w, epsilon=cfg.eps, dtype=dtype, param_dtype=param_dtype)
        self.head = nnx.Linear(w, embed_dim, dtype=dtype, param_dtype=param_dtype, kernel_init=_normal(0.02),
                               rngs=rngs)

    def _rope(self):
        c = self.cfg
        return tuple(jnp.asarray(t) for t in rope_tables(c.grid_size, c.width // c.heads, c.rope_ref_grid,
                                                           c.rope_theta))

    def _check_images(self, images: jax.Array) -> None:
        s = self.cfg.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"images must be (B, {s}, {s}, 3) CLIP-normalised float arrays for this model, got shape "
                             f"{tuple(images.shape)}; resize the input, or convert the checkpoint at this image size "
                             "(python -m harmoclip_jax.convert ... --image_size S)")

    def _run(self, block: EVABlock, method: str, x: jax.Array, rope, **kwargs) -> jax.Array:
        fn = lambda blk, y, r: getattr(blk, method)(y, r, **kwargs)  # noqa: E731
        if self.remat:
            fn = nnx.remat(fn)
        return fn(block, x, rope)

    def trunk(self, images: jax.Array):
        """(B, S, S, 3) -> tokens after all blocks but the last, and the RoPE tables."""
        self._check_images(images)
        b, p, g = images.shape[0], self.cfg.patch_size, self.cfg.grid_size
        x = images.astype(self.dtype).reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, g * g, p * p * 3) @ self.patch_embed[...].astype(self.dtype).reshape(p * p * 3, -1)
        x = x + self.patch_bias[...].astype(self.dtype)
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(self.dtype)
        rope = self._rope()
        for block in list(self.blocks)[:-1]:
            x = self._run(block, "__call__", x, rope)
        return x, rope

    def project(self, x: jax.Array) -> jax.Array:
        """Final norm + head, in float32 for the losses."""
        return self.head(self.norm(x)).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        x, rope = self.trunk(images)
        x = self._run(self.blocks[len(self.blocks) - 1], "__call__", x, rope, first_token_only=True)
        return self.project(x[:, 0])

    def dense(self, images: jax.Array, *, return_global: bool = False):
        x, rope = self.trunk(images)
        x = self._run(self.blocks[len(self.blocks) - 1], "dense", x, rope, with_first_token=return_global)
        out, g = self.project(x), self.cfg.grid_size
        if return_global:
            return out[:, 0], out[:, 1:].reshape(x.shape[0], g, g, -1)
        return out.reshape(x.shape[0], g, g, -1)


class EVA02CLIP(nnx.Module):
    """EVA02-CLIP: the EVA02 image tower and the OpenAI CLIP text tower. Embeddings are projected, not normalised."""

    def __init__(self, config: EVA02Config | str, *, rngs: nnx.Rngs | None = None, **overrides):
        config = get_config(config, **overrides)
        self.config = config
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        self.visual = EVAVisionTransformer(config.vision, config.embed_dim, dtype=dtype, param_dtype=param_dtype,
                                           remat=config.remat, impl=config.attention_impl, rngs=rngs)
        self.text = clip.TextTransformer(config.text, config.embed_dim, eps=config.text_eps,
                                         activation=config.text_activation, dtype=dtype, param_dtype=param_dtype,
                                         remat=config.remat, impl=config.attention_impl, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init, param_dtype))

    def encode_image(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) CLIP-normalised images -> (B, E) global embeddings."""
        return self.visual(images)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """(N, L <= context_length) int token ids -> (N, E)."""
        return self.text(tokens)

    def encode_text_tokens(self, tokens: jax.Array) -> jax.Array:
        """(N, L <= context_length) ids -> (N, L, E) per-token embeddings (CLIP's text tower: ln_final + projection on
        every position; the EOT row equals `encode_text`)."""
        return self.text.tokens(tokens)

    def encode_dense(self, images: jax.Array, *, return_global: bool = False):
        """(B, H, W, 3) -> (B, h, w, E) patch features (last block as value path); with `return_global`,
        `(encode_image(images), dense)` from one pass."""
        return self.visual.dense(images, return_global=return_global)


BACKBONE = Backbone(
    family="eva02_clip",
    model_class=EVA02CLIP,
    get_config=get_config,
    config_from_dict=EVA02Config.from_dict,
    # open_clip's EVA02 pretrained configs use OpenAI CLIP's mean/std.
    image_mean=OPENAI_CLIP[0],
    image_std=OPENAI_CLIP[1],
    tokenizer="clip",
    # timm's EVA no_weight_decay (pos_embed, cls_token) plus open_clip's text embeddings and temperature; norms and
    # biases are 1-D, which are never decayed.
    no_decay=(r"visual/pos_embed", r"visual/cls_token", r"text/token_embedding", r"text/positional_embedding",
              r"logit_scale"),
    save_open_clip=lazy("harmoclip_jax.models.convert_eva02", "save_open_clip"),
    load_open_clip=lazy("harmoclip_jax.models.convert_eva02", "load_open_clip"),
)


def abstract_model(config: EVA02Config | str, **overrides) -> EVA02CLIP:
    """The model with ShapeDtypeStructs instead of arrays (no memory, no compute)."""
    return glue.abstract_model(BACKBONE, get_config(config, **overrides))
