"""Model structure: every variant's abstract shapes (scenic-style eval_shape tests), parameter counts against the
reference PyTorch models, dtype/remat options and input validation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from harmoclip_jax.models.clip import CLIP, abstract_model
from harmoclip_jax.models.glue import count_params
from harmoclip_jax.models.variants import VARIANTS, get_config
from harmoclip_jax.testing.numerics import assert_same_gradients

# open_clip's published counts for the OpenAI architectures.
KNOWN_COUNTS = {"ViT-B/32": 151_277_313, "ViT-B/16": 149_620_737, "ViT-L/14": 427_616_513,
                "ViT-L/14@336": 427_944_193}


@pytest.mark.parametrize("family,variant", [("clip", "test-tiny"), ("eva02_clip", "EVA02-test-tiny"),
                                            ("siglip", "SigLIP-test-tiny")])
def test_abstract_model_is_the_built_model_without_its_arrays(family, variant):
    """`glue.abstract_model` traces the constructor with NumPy draw counters (cheap); what comes out is the built
    model's graph, each array a ShapeDtypeStruct of the built array's shape and dtype."""
    from harmoclip_jax import config_lib
    from harmoclip_jax.models import glue, registry

    backbone = registry.get(family)
    c = config_lib.base_config()
    c.model.family, c.model.variant = family, variant
    config = backbone.config_for(c.model)
    abstract_graph, abstract_state = nnx.split(glue.abstract_model(backbone, config))
    built_graph, built_state = nnx.split(backbone.model_class(config, rngs=nnx.Rngs(0)))
    assert abstract_graph == built_graph
    abstract_leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(abstract_state))[0]
    built_leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(built_state))[0]
    assert [path for path, _ in abstract_leaves] == [path for path, _ in built_leaves]
    for (path, a), (_, b) in zip(abstract_leaves, built_leaves):
        assert isinstance(a, jax.ShapeDtypeStruct) and (a.shape, a.dtype) == (b.shape, b.dtype), path


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_eval_shape_every_variant(variant):
    cfg = get_config(variant)
    model = abstract_model(variant)
    g, e = cfg.vision.grid_size, cfg.embed_dim
    images = jax.ShapeDtypeStruct((2, cfg.vision.image_size, cfg.vision.image_size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((3, cfg.text.context_length), jnp.int32)
    graphdef, state = nnx.split(model)

    def run(state, images, tokens):
        m = nnx.merge(graphdef, state)
        return m.encode_image(images), m.encode_text(tokens), m.encode_dense(images, return_global=True)

    img, txt, (glob, dense) = jax.eval_shape(run, state, images, tokens)
    assert img.shape == (2, e) and txt.shape == (3, e) and glob.shape == (2, e)
    assert dense.shape == (2, g, g, e)
    assert img.dtype == txt.dtype == dense.dtype == jnp.float32
    if variant in KNOWN_COUNTS:
        assert count_params(model) == KNOWN_COUNTS[variant]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_param_count_equals_transformers_model(variant):
    """The same architecture built by transformers (on the meta device: no memory) has as many parameters."""
    import torch
    from harmoclip_jax.models.convert import hf_config_dict
    from harmoclip_jax.testing.torch_compat import ensure_torch_reference_stack

    ensure_torch_reference_stack()
    from transformers import CLIPConfig, CLIPModel

    d = hf_config_dict(get_config(variant))
    with torch.device("meta"):
        hf = CLIPModel(CLIPConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")}))
    assert count_params(abstract_model(variant)) == sum(p.numel() for p in hf.parameters())


def test_bfloat16_compute_keeps_float32_params_and_outputs(rng):
    model = CLIP("test-tiny", dtype="bfloat16", remat=True)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    images = jnp.asarray(rng.standard_normal((2, 64, 64, 3)), jnp.float32)
    out = model.encode_image(images)
    ref = CLIP("test-tiny").encode_image(images)  # same seed, float32 compute
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max())


@pytest.mark.usefixtures("default_compiles")  # the bound holds for optimised programs (conftest.py)
def test_remat_gives_same_gradients(rng):
    images = jnp.asarray(rng.standard_normal((2, 64, 64, 3)), jnp.float32)

    def grads(remat):
        model = CLIP("test-tiny", remat=remat)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p):
            return jnp.sum(nnx.merge(graphdef, p, rest).encode_dense(images) ** 2)

        return jax.jit(jax.grad(loss))(params)

    assert_same_gradients(grads(True), grads(False))


def test_global_from_dense_pass_equals_encode_image(rng):
    model = CLIP("ViT-Ti/8@64")
    images = jnp.asarray(rng.standard_normal((3, 64, 64, 3)), jnp.float32)
    # Each path its own jitted program (op by op, every primitive would compile on its own).
    glob, dense = nnx.jit(lambda m, x: m.encode_dense(x, return_global=True))(model, images)
    np.testing.assert_allclose(np.asarray(glob), np.asarray(nnx.jit(lambda m, x: m.encode_image(x))(model, images)),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(dense), np.asarray(nnx.jit(lambda m, x: m.encode_dense(x))(model, images)),
                               atol=1e-5)


def test_text_pooling_uses_eot_position(rng):
    """Tokens after EOT (padding) must not change the embedding; tokens before it must."""
    model = CLIP("test-tiny")
    base = np.zeros((1, 77), np.int32)
    base[0, :4] = [49406, 320, 1125, 49407]
    other_pad = base.copy()
    other_pad[0, 5:] = 7  # garbage after EOT: causal attention never sees it at the EOT position
    other_word = base.copy()
    other_word[0, 2] = 2368
    e = lambda t: np.asarray(model.encode_text(jnp.asarray(t)))  # noqa: E731
    np.testing.assert_allclose(e(base), e(other_pad), atol=1e-6)
    assert np.abs(e(base) - e(other_word)).max() > 1e-3
    # A prefix that still holds the EOT encodes the same (the trainer feeds short region texts this way).
    np.testing.assert_allclose(e(base[:, :8]), e(base), atol=1e-5)  # float summation order only


def test_bad_inputs_give_clear_errors():
    model = CLIP("test-tiny")
    with pytest.raises(ValueError, match=r"images must be \(B, 64, 64, 3\)"):
        model.encode_image(jnp.zeros((1, 3, 64, 64)))
    with pytest.raises(ValueError, match=r"token ids must be \(N, L\) int arrays with L <= 77"):
        model.encode_text(jnp.zeros((2, 78), jnp.int32))
    with pytest.raises(ValueError, match="unknown CLIP variant 'ViT-X/3'"):
        get_config("ViT-X/3")
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        get_config("ViT-B/16", image_size=230)
    with pytest.raises(ValueError, match="unknown CLIP config override 'widht'"):
        get_config("ViT-B/16", widht=3)


def test_overrides_and_text_prefix():
    cfg = get_config("ViT-B/16", image_size=448, text_context_length=64, dtype="bfloat16")
    assert cfg.vision.grid_size == 28 and cfg.text.context_length == 64 and cfg.dtype == "bfloat16"
    model = abstract_model(cfg)
    assert model.visual.positional_embedding.shape == (1 + 28 * 28, 768)
    assert math.isclose(float(CLIP("test-tiny").logit_scale[...]), math.log(1 / 0.07), rel_tol=1e-6)


def test_layer_norm_custom_backward_matches_autodiff(rng):
    """The hand-written LayerNorm gradient equals autodiff of the plain formula (and torch's forward)."""
    from jax.test_util import check_grads

    from harmoclip_jax.models.clip import layer_norm

    x = jnp.asarray(rng.standard_normal((3, 5, 16)) * 3 + 1, jnp.float32)
    scale = jnp.asarray(rng.standard_normal(16), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(16), jnp.float32)

    def plain(x, scale, bias):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + 1e-5) * scale + bias

    np.testing.assert_allclose(layer_norm(x, scale, bias, 1e-5), plain(x, scale, bias), atol=1e-5)
    cot = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    ours = jax.vjp(lambda *a: layer_norm(*a, 1e-5), x, scale, bias)[1](cot)
    want = jax.vjp(plain, x, scale, bias)[1](cot)
    for a, b in zip(ours, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    check_grads(lambda *a: layer_norm(*a, 1e-5), (x, scale, bias), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)
    import torch
    want_torch = torch.nn.functional.layer_norm(torch.from_numpy(np.array(x)), (16,),
                                                torch.from_numpy(np.array(scale)), torch.from_numpy(np.array(bias)))
    np.testing.assert_allclose(np.asarray(layer_norm(x, scale, bias, 1e-5)), want_torch.numpy(), atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_custom_backward_matches_torch(rng, causal):
    """The heads-major attention (hand-written backward) equals torch's scaled_dot_product_attention, forward and
    every input gradient, with and without the causal mask; bfloat16 inputs stay close too."""
    import torch

    from harmoclip_jax.models.clip import _heads_major_attention

    b, t, n, h = 2, 9, 3, 8
    q, k, v, cot = (rng.standard_normal((b, t, n, h)).astype(np.float32) * 2 for _ in range(4))
    out, vjp = jax.vjp(lambda q, k, v: _heads_major_attention(q, k, v, causal=causal), q, k, v)
    grads = vjp(jnp.asarray(cot))
    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).requires_grad_() for x in (q, k, v))  # (B, N, T, H)
    want = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    want.backward(torch.from_numpy(cot).transpose(1, 2))
    np.testing.assert_allclose(np.asarray(out), want.detach().transpose(1, 2).numpy(), rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(grads, (tq, tk, tv)):
        np.testing.assert_allclose(np.asarray(ours), theirs.grad.transpose(1, 2).numpy(), rtol=1e-4, atol=1e-5)
    low = _heads_major_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), causal=causal)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), np.asarray(out), atol=0.1)


@pytest.mark.usefixtures("default_compiles")  # the bound holds for optimised programs (conftest.py)
def test_quick_gelu_matches_transformers(rng):
    """The tanh form of quick_gelu equals transformers' QuickGELUActivation (x * sigmoid(1.702 x)) and its
    gradient, to float32 rounding, except far below zero: there float32 tanh reaches -1 and the output 0 where
    torch's is ~-1e-6 (2e-6 absolute bounds both)."""
    import torch
    from transformers.activations import QuickGELUActivation

    from harmoclip_jax.models.clip import quick_gelu

    x = (rng.standard_normal(4096) * 6).astype(np.float32)
    tx = torch.from_numpy(x).requires_grad_()
    want = QuickGELUActivation()(tx)
    want.sum().backward()
    np.testing.assert_allclose(np.asarray(quick_gelu(jnp.asarray(x))), want.detach().numpy(), rtol=1e-5, atol=2e-6)
    grad = jax.grad(lambda x: quick_gelu(x).sum())(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grad), tx.grad.numpy(), rtol=1e-5, atol=1e-5)
