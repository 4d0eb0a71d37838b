"""SigLIP towers as Flax NNX modules (big_vision / Hugging Face `SiglipModel` architecture).

Vision: patchify (with bias) + learned positions, no class token, no pre-LN -> pre-LN blocks (tanh-GELU MLP) ->
post-LN -> MAP head (multihead attention pooling: one learned probe attends to all patch tokens, then the head's
LN + MLP residual). No projection: the embedding is the head's output (width = embed_dim).
Text: token + learned positions -> pre-LN blocks without a causal mask -> final LN -> the LAST position (SigLIP
pads every text to the full context, 64) -> linear head with bias.
Scores: exp(logit_scale) * cos + logit_bias, turned into probabilities by independent sigmoids.

Dense features (`encode_dense`), `config.dense_mode`:
  "map_value" (default): every patch token goes through the MAP head as if the probe attended only to it: the
      value and output projections of the head's attention (attention to a single token is its value), then the
      head's LN + MLP residual. This is the MaskCLIP/FineCLIP value-path trick of clip.py moved to the place
      where SigLIP pools, so patch features land in the same space as the global embedding.
  "post_ln": the patch tokens after the post-LN, without the head (width must equal embed_dim, as in every
      SigLIP).
With `return_global=True` both come from one pass of the encoder (the head's k/v projection is shared).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from harmoclip_jax.models import glue
from harmoclip_jax.models.backbone import Backbone, lazy, override_config
from harmoclip_jax.models.clip import Attention, LayerNorm, _dot_product_attention

_normal = jax.nn.initializers.normal

ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # big_vision / HF "gelu_pytorch_tanh"
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # open_clip's timm trunk and text tower compute erf-GELU
}
DENSE_MODES = ("map_value", "post_ln")


# ------------------------------------------------------------------------------------------------ configs


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int  # explicit: So400m's 4304 is no integer ratio of its width

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    width: int
    layers: int
    heads: int
    mlp_dim: int
    context_length: int = 64
    vocab_size: int = 32000
    pad_id: int = 1  # SigLIP's tokenizer pads with </s> (id 1); shorter rows are padded with it to full length


@dataclasses.dataclass(frozen=True)
class SigLIPConfig:
    """Everything that defines a SigLIP model's parameters and numerics."""

    embed_dim: int  # = vision.width (the MAP head's output); the text head projects to it
    vision: VisionConfig
    text: TextConfig
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    layer_norm_eps: float = 1e-6
    logit_scale_init: float = math.log(10.0)  # SigLIP paper: t' = log 10, b = -10
    logit_bias_init: float = -10.0
    attention_impl: str | None = "auto"
    activation: str = "gelu_tanh"
    dense_mode: str = "map_value"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SigLIPConfig":
        d = dict(d)
        return cls(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**d.pop("text")), **d)


def _siglip(width, layers, heads, mlp, patch, image, *, text=None, vocab=32000, context=64):
    t_width, t_layers, t_heads, t_mlp = text or (width, layers, heads, mlp)
    return SigLIPConfig(
        embed_dim=width,
        vision=VisionConfig(image_size=image, patch_size=patch, width=width, layers=layers, heads=heads, mlp_dim=mlp),
        text=TextConfig(width=t_width, layers=t_layers, heads=t_heads, mlp_dim=t_mlp, context_length=context,
                        vocab_size=vocab),
    )


VARIANTS: dict[str, SigLIPConfig] = {
    # google/siglip-* architectures (big_vision names; image size after @).
    "SigLIP-B/16": _siglip(768, 12, 12, 3072, 16, 224),
    "SigLIP-B/16@256": _siglip(768, 12, 12, 3072, 16, 256),
    "SigLIP-B/16@384": _siglip(768, 12, 12, 3072, 16, 384),
    "SigLIP-L/16@256": _siglip(1024, 24, 16, 4096, 16, 256),
    "SigLIP-L/16@384": _siglip(1024, 24, 16, 4096, 16, 384),
    "SigLIP-So400m/14@224": _siglip(1152, 27, 16, 4304, 14, 224),
    "SigLIP-So400m/14@384": _siglip(1152, 27, 16, 4304, 14, 384),
    # Small models trained from scratch on CPU (Scenes) and for tests.
    "SigLIP-Ti/8@64": _siglip(128, 4, 4, 512, 8, 64, text=(128, 3, 4, 512), vocab=32000),
    "SigLIP-test-tiny": _siglip(64, 2, 4, 256, 16, 64, text=(64, 2, 4, 256), vocab=1000, context=16),
}
# open_clip's model names (what `--open_clip FILE --variant` users type) -> ours.
OPEN_CLIP_NAMES = {
    "ViT-B-16-SigLIP": "SigLIP-B/16", "ViT-B-16-SigLIP-256": "SigLIP-B/16@256",
    "ViT-B-16-SigLIP-384": "SigLIP-B/16@384", "ViT-L-16-SigLIP-256": "SigLIP-L/16@256",
    "ViT-L-16-SigLIP-384": "SigLIP-L/16@384", "ViT-SO400M-14-SigLIP": "SigLIP-So400m/14@224",
    "ViT-SO400M-14-SigLIP-384": "SigLIP-So400m/14@384",
}


def get_config(variant: str | SigLIPConfig, **overrides: Any) -> SigLIPConfig:
    """The SigLIPConfig of a named variant (ours or open_clip's name) with `overrides` applied: a top-level field,
    a vision field (`image_size`, ...) or a text field prefixed with `text_` (`text_context_length`, ...)."""
    if isinstance(variant, SigLIPConfig):
        config = variant
    else:
        name = OPEN_CLIP_NAMES.get(variant, variant)
        if name not in VARIANTS:
            raise ValueError(f"unknown SigLIP variant {variant!r}; known variants: {', '.join(VARIANTS)} "
                             f"(open_clip names: {', '.join(OPEN_CLIP_NAMES)})")
        config = VARIANTS[name]
    config = override_config(config, overrides, "SigLIP")
    validate(config)
    return config


def validate(config: SigLIPConfig) -> None:
    """Rejects configs that cannot build a model, saying which field to change."""
    v, t = config.vision, config.text
    if v.image_size < v.patch_size:
        raise ValueError(f"vision.image_size={v.image_size} is smaller than patch_size={v.patch_size}")
    for name, tower in (("vision", v), ("text", t)):
        if tower.width % tower.heads:
            raise ValueError(f"{name}.width={tower.width} is not divisible by {name}.heads={tower.heads}")
    if config.embed_dim != v.width:
        raise ValueError(f"embed_dim={config.embed_dim} must equal vision.width={v.width} (SigLIP has no image "
                         "projection)")
    for name in ("dtype", "param_dtype"):
        if getattr(config, name) not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"{name}={getattr(config, name)!r}; use 'float32', 'bfloat16' or 'float16'")
    if config.activation not in ACTIVATIONS:
        raise ValueError(f"activation={config.activation!r}; use one of {sorted(ACTIVATIONS)}")
    if config.dense_mode not in DENSE_MODES:
        raise ValueError(f"dense_mode={config.dense_mode!r}; use one of {DENSE_MODES}")
    if config.attention_impl not in ("auto", None, "xla", "cudnn"):
        raise ValueError(f"attention_impl={config.attention_impl!r}; use 'auto', None, 'xla' or 'cudnn'")


# ------------------------------------------------------------------------------------------------ modules


class MLP(nnx.Module):
    def __init__(self, width: int, hidden: int, *, activation: str, dtype, param_dtype, rngs: nnx.Rngs):
        self.activation = activation
        linear = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=jax.nn.initializers.xavier_uniform(),
                      bias_init=_normal(1e-6), rngs=rngs)
        self.fc1 = nnx.Linear(width, hidden, **linear)
        self.fc2 = nnx.Linear(hidden, width, **linear)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class Block(nnx.Module):
    """Pre-LN residual block x + attn(ln_1(x)); x + mlp(ln_2(x)), attention over all tokens (no mask)."""

    def __init__(self, width: int, heads: int, mlp_dim: int, *, layers: int, common: dict, rngs: nnx.Rngs):
        norm = dict(epsilon=common["eps"], dtype=common["dtype"], param_dtype=common["param_dtype"])
        self.ln_1 = LayerNorm(width, **norm)
        self.attn = Attention(width, heads, layers=layers, dtype=common["dtype"], param_dtype=common["param_dtype"],
                              impl=common["impl"], rngs=rngs)
        self.ln_2 = LayerNorm(width, **norm)
        self.mlp = MLP(width, mlp_dim, activation=common["activation"], dtype=common["dtype"],
                       param_dtype=common["param_dtype"], rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn.attend(*self.attn.project(self.ln_1(x)), causal=False)
        return x + self.mlp(self.ln_2(x))


class Encoder(nnx.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, *, common: dict, rngs: nnx.Rngs):
        self.remat = common["remat"]
        self.blocks = nnx.List([Block(width, heads, mlp_dim, layers=layers, common=common, rngs=rngs)
                                for _ in range(layers)])

    def __call__(self, x: jax.Array) -> jax.Array:
        run = (lambda blk, y: blk(y))  # noqa: E731
        run = nnx.remat(run) if self.remat else run
        for block in self.blocks:
            x = run(block, x)
        return x


class MAPHead(nnx.Module):
    """Multihead attention pooling: a learned probe attends over the tokens; then out + mlp(ln(out))."""

    def __init__(self, width: int, heads: int, mlp_dim: int, *, common: dict, rngs: nnx.Rngs):
        dtype, param_dtype = common["dtype"], common["param_dtype"]
        self.heads, self.dtype, self.impl = heads, dtype, common["impl"]
        self.probe = nnx.Param(jax.nn.initializers.xavier_uniform()(rngs.params(), (1, width), param_dtype))
        linear = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=jax.nn.initializers.xavier_uniform(),
                      rngs=rngs)
        self.q = nnx.Linear(width, width, **linear)
        self.kv = nnx.Linear(width, 2 * width, **linear)  # keys then values (timm's layout)
        self.out = nnx.Linear(width, width, **linear)
        self.ln = LayerNorm(width, epsilon=common["eps"], dtype=dtype, param_dtype=param_dtype)
        self.mlp = MLP(width, mlp_dim, activation=common["activation"], dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)

    def _residual_mlp(self, o: jax.Array) -> jax.Array:
        return o + self.mlp(self.ln(o))

    def pool(self, k: jax.Array, v: jax.Array) -> jax.Array:
        """k, v (B, N, heads, head_dim) -> (B, D): the probe's attention over all tokens, then LN + MLP."""
        b, _, n, h = k.shape
        q = jnp.broadcast_to(self.q(self.probe[...].astype(self.dtype)).reshape(1, 1, n, h), (b, 1, n, h))
        o = _dot_product_attention(q, k, v, causal=False, impl=self.impl)
        return self._residual_mlp(self.out(o.reshape(b, 1, n * h)))[:, 0]

    def keys_values(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, t, d = x.shape
        kv = self.kv(x).reshape(b, t, 2, self.heads, d // self.heads)
        return kv[:, :, 0], kv[:, :, 1]

    def values(self, x: jax.Array) -> jax.Array:
        """The value projection alone (the right half of the kv kernel): what attention to one token returns."""
        d = x.shape[-1]
        kernel, bias = self.kv.kernel[...].astype(self.dtype), self.kv.bias[...].astype(self.dtype)
        return x.astype(self.dtype) @ kernel[:, d:] + bias[d:]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.pool(*self.keys_values(x))

    def per_token(self, v: jax.Array) -> jax.Array:
        """Value-path pooling of every token: (B, N, D) values -> (B, N, D) = out(v) + mlp(ln(out(v)))."""
        return self._residual_mlp(self.out(v))


class VisionTransformer(nnx.Module):
    def __init__(self, config: SigLIPConfig, *, common: dict, rngs: nnx.Rngs):
        cfg = config.vision
        self.cfg, self.dtype, self.dense_mode = cfg, common["dtype"], config.dense_mode
        w, p = cfg.width, cfg.patch_size
        param_dtype = common["param_dtype"]
        # Patchify as a matmul over flattened (p, p, 3) patches; the kernel keeps conv's HWIO layout.
        self.patch_embed = nnx.Param(jax.nn.initializers.lecun_normal()(rngs.params(), (p, p, 3, w), param_dtype))
        self.patch_bias = nnx.Param(jnp.zeros((w,), param_dtype))
        self.positional_embedding = nnx.Param(_normal(w**-0.5)(rngs.params(), (cfg.grid_size**2, w), param_dtype))
        self.transformer = Encoder(w, cfg.layers, cfg.heads, cfg.mlp_dim, common=common, rngs=rngs)
        self.ln_post = LayerNorm(w, epsilon=common["eps"], dtype=self.dtype, param_dtype=param_dtype)
        self.head = MAPHead(w, cfg.heads, cfg.mlp_dim, common=common, rngs=rngs)

    def tokens(self, images: jax.Array) -> jax.Array:
        """(B, S, S, 3) -> patch tokens (B, g*g, D) after the encoder and the post-LN."""
        s, p, g = self.cfg.image_size, self.cfg.patch_size, self.cfg.grid_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"images must be (B, {s}, {s}, 3) normalised float arrays for this model, got shape "
                             f"{tuple(images.shape)}; resize the input (or the model's position embedding, see "
                             "harmoclip_jax.models.convert_siglip.load_hf_siglip(image_size=...))")
        b = images.shape[0]
        # Like the stride-p conv of the reference, pixels past the last full patch are dropped (So400m/14@384).
        x = images[:, :g * p, :g * p].astype(self.dtype).reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, g * g, p * p * 3) @ self.patch_embed[...].astype(self.dtype).reshape(p * p * 3, -1)
        x = x + self.patch_bias[...].astype(self.dtype) + self.positional_embedding[...].astype(self.dtype)
        return self.ln_post(self.transformer(x))

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.tokens(images)).astype(jnp.float32)

    def dense(self, images: jax.Array, *, return_global: bool = False):
        x = self.tokens(images)
        b, g = x.shape[0], self.cfg.grid_size
        if self.dense_mode == "post_ln":
            dense = x
            pooled = self.head(x) if return_global else None
        elif return_global:
            k, v = self.head.keys_values(x)
            pooled = self.head.pool(k, v)
            dense = self.head.per_token(v.reshape(x.shape))
        else:
            dense, pooled = self.head.per_token(self.head.values(x)), None
        dense = dense.astype(jnp.float32).reshape(b, g, g, -1)
        return (pooled.astype(jnp.float32), dense) if return_global else dense


class TextTransformer(nnx.Module):
    def __init__(self, config: SigLIPConfig, *, common: dict, rngs: nnx.Rngs):
        cfg = self.cfg = config.text
        self.dtype = common["dtype"]
        param_dtype = common["param_dtype"]
        w = cfg.width
        self.token_embedding = nnx.Param(_normal(w**-0.5)(rngs.params(), (cfg.vocab_size, w), param_dtype))
        self.positional_embedding = nnx.Param(_normal(w**-0.5)(rngs.params(), (cfg.context_length, w), param_dtype))
        self.transformer = Encoder(w, cfg.layers, cfg.heads, cfg.mlp_dim, common=common, rngs=rngs)
        self.ln_final = LayerNorm(w, epsilon=common["eps"], dtype=self.dtype, param_dtype=param_dtype)
        self.head = nnx.Linear(w, config.embed_dim, dtype=self.dtype, param_dtype=param_dtype,
                               kernel_init=_normal(w**-0.5), rngs=rngs)

    def _hidden(self, tokens: jax.Array) -> jax.Array:
        """(N, L) ids -> (N, context_length, width) after the blocks and the final LN (rows padded as SigLIP)."""
        n = self.cfg.context_length
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= n:
            raise ValueError(f"token ids must be (N, L) int arrays with L <= {n} (the siglip tokenizer), got shape "
                             f"{tuple(tokens.shape)}")
        # Attention is bidirectional and pooling takes the last position, so a short row must be padded to the
        # full context (as SigLIP was trained) to encode like the same text at full length.
        tokens = jnp.pad(tokens, ((0, 0), (0, n - tokens.shape[1])), constant_values=self.cfg.pad_id)
        x = self.token_embedding[...].astype(self.dtype)[tokens] + self.positional_embedding[...].astype(self.dtype)
        return self.ln_final(self.transformer(x))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.head(self._hidden(tokens)[:, -1]).astype(jnp.float32)

    def tokens(self, tokens: jax.Array) -> jax.Array:
        """(N, L) ids -> (N, context_length, E): final LN + head on every position of the padded row; the last
        position is `__call__`'s embedding."""
        return self.head(self._hidden(tokens)).astype(jnp.float32)


class SigLIP(nnx.Module):
    """A two-tower SigLIP model. Embeddings are not normalised (HF `get_*_features` semantics)."""

    def __init__(self, config: SigLIPConfig | str, *, rngs: nnx.Rngs | None = None, **overrides):
        config = get_config(config, **overrides)
        self.config = config
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        common = dict(eps=config.layer_norm_eps, activation=config.activation, dtype=jnp.dtype(config.dtype),
                      param_dtype=jnp.dtype(config.param_dtype), remat=config.remat, impl=config.attention_impl)
        self.visual = VisionTransformer(config, common=common, rngs=rngs)
        self.text = TextTransformer(config, common=common, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init, common["param_dtype"]))
        self.logit_bias = nnx.Param(jnp.asarray(config.logit_bias_init, common["param_dtype"]))

    def encode_image(self, images: jax.Array) -> jax.Array:
        """(B, S, S, 3) images normalised with mean = std = 0.5 -> (B, E)."""
        return self.visual(images)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """(N, L <= context_length) ids -> (N, E); short rows are padded with `text.pad_id` to the context."""
        return self.text(tokens)

    def encode_text_tokens(self, tokens: jax.Array) -> jax.Array:
        """(N, L <= context_length) ids -> (N, context_length, E) per-token embeddings (final LN + head on every
        position of the row padded to the context; the last position, which SigLIP pools, equals `encode_text`).
        Positions < L are the input's tokens."""
        return self.text.tokens(tokens)

    def encode_dense(self, images: jax.Array, *, return_global: bool = False):
        """(B, S, S, 3) -> (B, h, w, E) patch features in the joint space (`config.dense_mode`); with
        `return_global`, `(encode_image(images), dense)` from one pass."""
        return self.visual.dense(images, return_global=return_global)


BACKBONE = Backbone(
    family="siglip",
    model_class=SigLIP,
    get_config=get_config,
    config_from_dict=SigLIPConfig.from_dict,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    tokenizer="siglip",
    tokenizer_file="spiece.model",  # SentencePiece model; HF SigLIP directories ship it
    no_decay=(r".*positional_embedding", r".*token_embedding", r".*probe", r"logit_scale", r"logit_bias"),
    probabilities="sigmoid",
    save_hf=lazy("harmoclip_jax.models.convert_siglip", "save_hf_siglip"),
    save_open_clip=lazy("harmoclip_jax.models.convert_siglip", "save_open_clip_siglip"),
    load_hf=lazy("harmoclip_jax.models.convert_siglip", "load_hf_siglip"),
    load_open_clip=lazy("harmoclip_jax.models.convert_siglip", "load_open_clip_siglip"),
    hf_model_type="siglip",
    hf_architecture="SiglipModel",
)


def abstract_model(config: SigLIPConfig | str, **overrides) -> SigLIP:
    """The model with ShapeDtypeStructs instead of arrays (no memory, no compute)."""
    return glue.abstract_model(BACKBONE, get_config(config, **overrides))
