"""CLIP towers as Flax NNX modules (OpenAI / open_clip architecture).

Vision: patchify -> [class token] + learned positions -> ln_pre -> pre-LN blocks (quick_gelu MLP) -> ln_post on
the class token -> projection. Text: token + learned positions -> causal pre-LN blocks -> ln_final -> the EOT
token (argmax of the ids, as OpenAI/open_clip) -> projection.

Region methods need the patch tokens in the joint space (`encode_dense`). Following MaskCLIP/CLIPSelf/FineCLIP,
the last vision block runs with attention replaced by its value path (each token attends only to itself), so the
patch tokens are transformed like the class token would be. The global embedding needs only the class token's
row of that same last block, so `encode_dense(..., return_global=True)` gets both from one pass that shares the
first L-1 blocks and the last block's qkv projection.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from harmoclip_jax.models import glue
from harmoclip_jax.models.backbone import Backbone, lazy
from harmoclip_jax.models.normalization import OPENAI_CLIP
from harmoclip_jax.models.variants import CLIPConfig, TextConfig, VisionConfig, get_config

_normal = jax.nn.initializers.normal


def quick_gelu(x: jax.Array) -> jax.Array:
    """x * sigmoid(1.702 x), written with the identity sigmoid(z) = (1 + tanh(z / 2)) / 2: XLA:CPU's vectorised
    tanh makes it ~4x faster than its exp-and-divide sigmoid at ViT-B/16's MLP size, alone (1576 x 3072: 3.0 vs
    11.8 ms forward on a 2-core AMD EPYC, AVX2; inside the train step, where the pass is memory-bound, the gain is
    a few ms per layer). Same values to float32 rounding, but below x ~ -9.3 float32 tanh is -1 and the output 0
    instead of >= -1.3e-6."""
    return x * (0.5 + 0.5 * jnp.tanh(0.851 * x))


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


def _batched_matmul(a, b, contract_a: int, contract_b: int) -> jax.Array:
    """(G, ., .) x (G, ., .) -> (G, ., .), contracting one axis of each, float32 accumulation."""
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((0,), (0,))),
                               preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _softmax_attention(q, k, v, causal: bool):
    """softmax(q k^T) v over (G, T, H) operands (q pre-scaled); G = batch x heads. Float32 logits and softmax."""
    return _softmax_attention_fwd(q, k, v, causal)[0]


def _softmax_attention_fwd(q, k, v, causal):
    # Normalise the (G, T, H) output instead of the (G, T, S) probabilities, and keep the unnormalised
    # exponentials e for the backward pass: fewer passes over the T x S matrix, the part XLA:CPU is slow at.
    logits = _batched_matmul(q, k, 2, 2)
    if causal:
        t, s = logits.shape[1:]
        logits = jnp.where(jnp.tril(jnp.ones((t, s), bool)), logits, -jnp.inf)
    e = jnp.exp(logits - logits.max(-1, keepdims=True))
    inv_sum = 1.0 / e.sum(-1, keepdims=True)
    out = (_batched_matmul(e.astype(v.dtype), v, 2, 1) * inv_sum).astype(v.dtype)
    return out, (q, k, v, e, inv_sum, out)


def _softmax_attention_bwd(causal, residuals, d_out):
    # With p = e / l: dv = p^T do, dp = do v^T, ds = p * (dp - rowsum(do * out)) (rowsum(dp * p) = rowsum(do * out),
    # a sum over H instead of S). Everything below carries the 1/l factor on the (G, T, H) side.
    del causal  # masked logits have e = 0, so their gradients are already zero
    q, k, v, e, inv_sum, out = residuals
    d_out = d_out.astype(jnp.float32)
    row_dot = jnp.sum(d_out * out.astype(jnp.float32), -1, keepdims=True) * inv_sum
    d_scaled = (d_out * inv_sum).astype(v.dtype)
    dv = _batched_matmul(e.astype(v.dtype), d_scaled, 1, 1)
    d_logits = (e * (_batched_matmul(d_scaled, v, 2, 2) - row_dot)).astype(q.dtype)
    dq = _batched_matmul(d_logits, k, 2, 1)
    dk = _batched_matmul(d_logits, q, 1, 1)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _heads_major_attention(q, k, v, *, causal: bool):
    """Softmax attention as batched matmuls over (batch*heads): (B, T, N, H) -> (B, T, N, H).

    Same math as `jax.nn.dot_product_attention(implementation="xla")`, with the heads moved next to the batch
    first, which XLA:CPU runs as plain batched GEMMs (measured 4x faster forward and 2x faster forward+backward for
    ViT-B/16 shapes, B=8, T=197, 12x64, on a 2-core Xeon), and a hand-written backward pass (`_softmax_attention`:
    forward+backward 87 -> 74 ms per layer at those shapes on a 2-core AMD EPYC). Logits and softmax are float32
    for any input dtype.
    """
    b, t, n, h = q.shape
    q = q * jnp.asarray(h**-0.5, q.dtype)
    q, k, v = (x.transpose(0, 2, 1, 3).reshape(b * n, -1, h) for x in (q, k, v))
    out = _softmax_attention(q, k, v, causal)
    return out.reshape(b, n, t, h).transpose(0, 2, 1, 3)


_ATTENTION_PLATFORM = contextvars.ContextVar("attention_platform", default=None)


@contextlib.contextmanager
def attention_platform(platform: str):
    """Traces "auto" attention for `platform` ("gpu", "tpu", "cpu") instead of `jax.default_backend()`: ahead-of-time
    compilation for a GPU on a CPU host must build the program the GPU would run."""
    token = _ATTENTION_PLATFORM.set(platform)
    try:
        yield
    finally:
        _ATTENTION_PLATFORM.reset(token)


def _dot_product_attention(q, k, v, *, causal: bool, impl: str | None):
    """Attention with a per-platform kernel. impl "auto": cuDNN's fused kernel for half precision on GPUs (measured
    ~1.45x faster ViT-B/16 inference on an H100 than XLA's) where cuDNN takes the shape, else the heads-major matmul
    form (fastest on CPU). None/"xla"/"cudnn" go to `jax.nn.dot_product_attention` as given."""
    if impl != "auto":
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
    platform = _ATTENTION_PLATFORM.get() or jax.default_backend()
    if platform == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
        except Exception:  # unsupported shape/cuDNN version: the matmul form below always works
            pass
    return _heads_major_attention(q, k, v, causal=causal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis (biased variance, as torch), statistics in float32, output in x's dtype.

    The hand-written backward is the point: with autodiff's LayerNorm gradient, XLA:CPU fuses the residual
    stream's gradient chain of every layer into each weight-gradient transpose and recomputes it there (quadratic
    in depth): 4.6 s vs 2.7 s for a ViT-B/16 forward+backward at batch 8 on a 2-core Xeon.
    """
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    centered = x32 - x32.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(centered * centered, -1, keepdims=True) + eps)
    xhat = centered * rstd
    y = (xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
    return y, (xhat, rstd, scale)


def _layer_norm_bwd(eps, residuals, dy):
    xhat, rstd, scale = residuals
    dy32 = dy.astype(jnp.float32)
    g = dy32 * scale.astype(jnp.float32)
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * jnp.mean(g * xhat, -1, keepdims=True))
    rows = tuple(range(dy.ndim - 1))
    return (dx.astype(dy.dtype), jnp.sum(dy32 * xhat, rows).astype(scale.dtype),
            jnp.sum(dy32, rows).astype(scale.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
    """LayerNorm with `scale`/`bias` parameters (the names of nnx.LayerNorm) and the custom backward above."""

    def __init__(self, width: int, *, epsilon: float, dtype, param_dtype, rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init; the argument keeps nnx.LayerNorm's signature
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((width,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((width,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x.astype(self.dtype), self.scale[...], self.bias[...], self.epsilon)


class MLP(nnx.Module):
    def __init__(self, width: int, hidden: int, *, layers: int, activation: str, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.activation = activation
        # open_clip's init: fc std (2w)^-0.5, proj std w^-0.5 (2L)^-0.5.
        self.fc1 = nnx.Linear(width, hidden, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=_normal((2 * width) ** -0.5), rngs=rngs)
        self.fc2 = nnx.Linear(hidden, width, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=_normal(width**-0.5 * (2 * layers) ** -0.5), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection (one matmul; open_clip's in_proj layout)."""

    def __init__(self, width: int, heads: int, *, layers: int, dtype, param_dtype, impl, rngs: nnx.Rngs):
        self.heads = heads
        self.impl = impl
        self.qkv = nnx.Linear(width, 3 * width, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=_normal(width**-0.5), rngs=rngs)
        self.out = nnx.Linear(width, width, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=_normal(width**-0.5 * (2 * layers) ** -0.5), rngs=rngs)

    def project(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(B, N, D) -> q, k, v, each (B, N, heads, head_dim)."""
        b, n, d = h.shape
        qkv = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads)
        # split, not indexing: its gradient is one concatenate (indexing's is three pads and their sum)
        q, k, v = jnp.split(qkv, 3, axis=2)
        return q[:, :, 0], k[:, :, 0], v[:, :, 0]

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool) -> jax.Array:
        o = _dot_product_attention(q, k, v, causal=causal, impl=self.impl)
        return self.out(o.reshape(*o.shape[:2], -1))

    def value_path(self, v: jax.Array) -> jax.Array:
        """Attention where every token attends only to itself: out_proj(v)."""
        return self.out(v.reshape(*v.shape[:2], -1))


class Block(nnx.Module):
    """Pre-LN residual block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_dim: int, *, layers: int, eps: float, activation: str, dtype,
                 param_dtype, impl, rngs: nnx.Rngs):
        norm = dict(epsilon=eps, dtype=dtype, param_dtype=param_dtype)
        self.ln_1 = LayerNorm(width, **norm)
        self.attn = Attention(width, heads, layers=layers, dtype=dtype, param_dtype=param_dtype, impl=impl,
                              rngs=rngs)
        self.ln_2 = LayerNorm(width, **norm)
        self.mlp = MLP(width, mlp_dim, layers=layers, activation=activation, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)

    def __call__(self, x: jax.Array, *, causal: bool = False, first_token_only: bool = False) -> jax.Array:
        """The usual block. `first_token_only` returns just row 0 (the class token), skipping the other rows'
        attention outputs and MLPs: the last block of `encode_image` needs nothing else."""
        q, k, v = self.attn.project(self.ln_1(x))
        if first_token_only:
            q, x = q[:, :1], x[:, :1]
        x = x + self.attn.attend(q, k, v, causal=causal)
        return x + self.mlp(self.ln_2(x))

    def dense(self, x: jax.Array, *, with_first_token: bool) -> jax.Array:
        """Last block for dense features: tokens 1.. take the value path; token 0 (if wanted) attends as usual.

        Returns (B, N, D) when `with_first_token`, else (B, N-1, D) for the patch tokens only.
        """
        q, k, v = self.attn.project(self.ln_1(x))
        patches = x[:, 1:] + self.attn.value_path(v[:, 1:])
        if with_first_token:
            cls = x[:, :1] + self.attn.attend(q[:, :1], k, v, causal=False)
            patches = jnp.concatenate([cls, patches], axis=1)
        return patches + self.mlp(self.ln_2(patches))


class Transformer(nnx.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, *, eps: float, activation: str, dtype,
                 param_dtype, remat: bool, impl, rngs: nnx.Rngs):
        self.remat = remat
        self.blocks = nnx.List([
            Block(width, heads, mlp_dim, layers=layers, eps=eps, activation=activation, dtype=dtype,
                  param_dtype=param_dtype, impl=impl, rngs=rngs)
            for _ in range(layers)
        ])

    def _run(self, block: Block, method: str, x: jax.Array, **kwargs) -> jax.Array:
        fn = lambda blk, y: getattr(blk, method)(y, **kwargs)  # noqa: E731
        if self.remat:
            fn = nnx.remat(fn)
        return fn(block, x)

    def __call__(self, x: jax.Array, *, causal: bool = False, upto: int | None = None) -> jax.Array:
        """Runs blocks[:upto] (all by default)."""
        for block in list(self.blocks)[:upto]:
            x = self._run(block, "__call__", x, causal=causal)
        return x

    def last(self, x: jax.Array, method: str, **kwargs) -> jax.Array:
        return self._run(self.blocks[len(self.blocks) - 1], method, x, **kwargs)


def _dt(name: str):
    return jnp.dtype(name)


class VisionTransformer(nnx.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, *, eps: float, activation: str, dtype, param_dtype,
                 remat: bool, impl, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        w, p = cfg.width, cfg.patch_size
        scale = w**-0.5
        # Patchify is a matmul over flattened (p, p, 3) patches; the kernel keeps conv's HWIO layout.
        self.patch_embed = nnx.Param(_normal(0.02)(rngs.params(), (p, p, 3, w), param_dtype))
        self.class_embedding = nnx.Param(_normal(scale)(rngs.params(), (w,), param_dtype))
        self.positional_embedding = nnx.Param(_normal(scale)(rngs.params(), (cfg.grid_size**2 + 1, w), param_dtype))
        norm = dict(epsilon=eps, dtype=dtype, param_dtype=param_dtype)
        self.ln_pre = LayerNorm(w, **norm)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_dim, eps=eps, activation=activation,
                                       dtype=dtype, param_dtype=param_dtype, remat=remat, impl=impl, rngs=rngs)
        self.ln_post = LayerNorm(w, **norm)
        self.proj = nnx.Param(_normal(scale)(rngs.params(), (w, embed_dim), param_dtype))

    def _check_images(self, images: jax.Array) -> None:
        s = self.cfg.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(
                f"images must be (B, {s}, {s}, 3) CLIP-normalised float arrays for this model, got shape "
                f"{tuple(images.shape)}; resize the input (or the model's position embedding, see "
                "harmoclip_jax.models.convert.resize_position_embedding)"
            )

    def stem(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) -> tokens (B, 1 + h*w, D) after ln_pre."""
        self._check_images(images)
        b, p, g = images.shape[0], self.cfg.patch_size, self.cfg.grid_size
        x = images.astype(self.dtype).reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, g * g, p * p * 3) @ self.patch_embed[...].astype(self.dtype).reshape(p * p * 3, -1)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...].astype(self.dtype)
        return self.ln_pre(x)

    def head(self, x: jax.Array) -> jax.Array:
        """ln_post + projection, in float32 for the losses."""
        return (self.ln_post(x) @ self.proj[...].astype(self.dtype)).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.transformer(self.stem(images), upto=-1)
        x = self.transformer.last(x, "__call__", first_token_only=True)
        return self.head(x[:, 0])

    def dense(self, images: jax.Array, *, return_global: bool = False):
        x = self.transformer(self.stem(images), upto=-1)
        x = self.transformer.last(x, "dense", with_first_token=return_global)
        g = self.cfg.grid_size
        if return_global:
            out = self.head(x)
            return out[:, 0], out[:, 1:].reshape(x.shape[0], g, g, -1)
        return self.head(x).reshape(x.shape[0], g, g, -1)


class TextTransformer(nnx.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, *, eps: float, activation: str, dtype, param_dtype,
                 remat: bool, impl, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        w = cfg.width
        self.token_embedding = nnx.Param(_normal(0.02)(rngs.params(), (cfg.vocab_size, w), param_dtype))
        self.positional_embedding = nnx.Param(_normal(0.01)(rngs.params(), (cfg.context_length, w), param_dtype))
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_dim, eps=eps, activation=activation,
                                       dtype=dtype, param_dtype=param_dtype, remat=remat, impl=impl, rngs=rngs)
        self.ln_final = LayerNorm(w, epsilon=eps, dtype=dtype, param_dtype=param_dtype)
        self.text_projection = nnx.Param(_normal(w**-0.5)(rngs.params(), (w, embed_dim), param_dtype))

    def _hidden(self, tokens: jax.Array) -> jax.Array:
        """(N, L) ids -> (N, L, width) after the causal blocks and ln_final."""
        n = self.cfg.context_length
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= n:
            raise ValueError(f"token ids must be (N, L) int arrays with L <= {n} (harmoclip_jax.tokenizer.tokenize), "
                             f"got shape {tuple(tokens.shape)}")
        # Shorter rows use the first L positions: with causal attention the EOT output does not depend on the
        # padding after it, so a text whose EOT lies within L encodes exactly as at full length, only cheaper.
        length = tokens.shape[1]
        x = (self.token_embedding[...].astype(self.dtype)[tokens]
             + self.positional_embedding[...].astype(self.dtype)[:length])
        return self.ln_final(self.transformer(x, causal=True))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self._hidden(tokens)
        # EOT has the largest id in CLIP's vocabulary, so argmax finds it (first occurrence if padded with EOT).
        eot = x[jnp.arange(x.shape[0]), jnp.argmax(tokens, axis=-1)]
        return (eot @ self.text_projection[...].astype(self.dtype)).astype(jnp.float32)

    def tokens(self, tokens: jax.Array) -> jax.Array:
        """(N, L) ids -> (N, L, E): ln_final + text_projection applied to every position (the EOT row is
        `__call__`'s embedding). Causal attention: position i sees only tokens 0..i, and CLIP trained only the EOT
        row into the joint space."""
        return (self._hidden(tokens) @ self.text_projection[...].astype(self.dtype)).astype(jnp.float32)


class CLIP(nnx.Module):
    """A two-tower CLIP model. Embeddings are projected, not normalised (HF `get_*_features` semantics)."""

    def __init__(self, config: CLIPConfig | str, *, rngs: nnx.Rngs | None = None, **overrides):
        config = get_config(config, **overrides)
        self.config = config
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        common = dict(eps=config.layer_norm_eps, activation=config.activation, dtype=_dt(config.dtype),
                      param_dtype=_dt(config.param_dtype), remat=config.remat, impl=config.attention_impl, rngs=rngs)
        self.visual = VisionTransformer(config.vision, config.embed_dim, **common)
        self.text = TextTransformer(config.text, config.embed_dim, **common)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init, _dt(config.param_dtype)))

    def encode_image(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) CLIP-normalised images -> (B, E) global embeddings."""
        return self.visual(images)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """(N, L <= context_length) int token ids -> (N, E) text embeddings (short rows: see TextTransformer)."""
        return self.text(tokens)

    def encode_text_tokens(self, tokens: jax.Array) -> jax.Array:
        """(N, L <= context_length) ids -> (N, L, E) projected (not normalised) per-token embeddings; the row at each
        text's EOT position equals `encode_text`."""
        return self.text.tokens(tokens)

    def encode_dense(self, images: jax.Array, *, return_global: bool = False):
        """(B, H, W, 3) -> (B, h, w, E) patch features in the joint space (last block as value path).

        With `return_global=True` returns `(global (B, E), dense (B, h, w, E))` from one pass; the global
        embedding equals `encode_image(images)`.
        """
        return self.visual.dense(images, return_global=return_global)


BACKBONE = Backbone(
    family="clip",
    model_class=CLIP,
    get_config=get_config,
    config_from_dict=CLIPConfig.from_dict,
    image_mean=OPENAI_CLIP[0],
    image_std=OPENAI_CLIP[1],
    tokenizer="clip",
    # Embeddings and the temperature are never decayed (open_clip's rule).
    no_decay=(r".*positional_embedding", r".*class_embedding", r".*token_embedding", r"logit_scale"),
    save_hf=lazy("harmoclip_jax.models.convert", "save_hf_clip"),
    save_open_clip=lazy("harmoclip_jax.models.convert", "save_open_clip"),
    load_hf=lazy("harmoclip_jax.models.convert", "load_hf_clip"),
    load_open_clip=lazy("harmoclip_jax.models.convert", "load_open_clip"),
    hf_model_type="clip",
    hf_architecture="CLIPModel",
)


def abstract_model(config: CLIPConfig | str, **overrides) -> CLIP:
    """The model with ShapeDtypeStructs instead of arrays (no memory, no compute)."""
    return glue.abstract_model(BACKBONE, get_config(config, **overrides))
