"""EVA02-CLIP (`models/eva02.py`, `models/convert_eva02.py`): parity with the real open_clip / timm models through the
conversion CLI (real EVA02-B/16 shapes, random weights), the original EVA-CLIP layout, another resolution, the dense
value path, export back to open_clip, and a tiny EVA02 trained on Scenes through the backbone seam."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from harmoclip_jax import checkpoint, config_lib
from harmoclip_jax.models import convert_eva02, eva02, glue, registry
from harmoclip_jax.models.convert import CheckpointMismatchError
from harmoclip_jax.testing import reference
from harmoclip_jax.testing.numerics import assert_same_gradients
from harmoclip_jax.testing.torch_compat import ensure_torch_reference_stack

import torch  # noqa: E402 - dev requirement (requirements-dev.txt): a broken install fails, never skips

ensure_torch_reference_stack()
import open_clip  # noqa: E402
import timm.models.eva as timm_eva  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPEN_CLIP_B16_PARAMS = 149_691_137  # open_clip.create_model("EVA02-B-16"): sum of numel


def _images(rng, n, size):
    return rng.standard_normal((n, size, size, 3)).astype(np.float32)


def _tokens(rng, n, ctx=77, vocab=49408):
    """CLIP-like token rows: SOT, random ids, EOT, zero padding (varied lengths)."""
    toks = np.zeros((n, ctx), np.int64)
    for i in range(n):
        length = int(rng.integers(1, ctx - 1))
        toks[i, 0], toks[i, length + 1] = 49406, 49407
        toks[i, 1:length + 1] = rng.integers(1, vocab - 2, length)
    return toks


def _nchw(images):
    return torch.from_numpy(images.transpose(0, 3, 1, 2))


def _convert_cli(*args) -> None:
    """`python -m harmoclip_jax.convert ARGS`, in process (the B/16 conversion twice in subprocesses is slow)."""
    from absl import flags

    from harmoclip_jax import convert as convert_cli

    flags.FLAGS(["convert", *args])
    try:
        convert_cli.main(["convert"])
    finally:
        flags.FLAGS.unparse_flags()


def _to_eva_clip_layout(open_clip_sd: dict) -> dict:
    """The original EVA-CLIP release's names for an open_clip EVA02 state dict (plus its RoPE buffers)."""
    renames = [("visual.trunk.", "visual."), ("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"),
               ("attn.norm.", "attn.inner_attn_ln."), ("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."),
               ("mlp.norm.", "mlp.ffn_ln."), ("mlp.fc2.", "mlp.w3.")]
    out = {}
    for key, value in open_clip_sd.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    blocks = {k.split(".")[2] for k in out if k.startswith("visual.blocks.")}
    for prefix in ["visual.rope", *(f"visual.blocks.{i}.attn.rope" for i in blocks)]:  # buffers, recomputed
        out[f"{prefix}.freqs_cos"] = out[f"{prefix}.freqs_sin"] = torch.zeros(16, 16)
    return out


# ------------------------------------------------------------------------------------------------ real B/16 shapes


@pytest.fixture(scope="module")
def b16(tmp_path_factory):
    """open_clip's EVA02-B-16 with random weights, its features, and ours converted through the CLI."""
    tmp = tmp_path_factory.mktemp("eva02_b16")
    oc = open_clip.create_model("EVA02-B-16", pretrained=None)
    reference.randomize_(oc, seed=5)
    oc.eval()
    rng = np.random.default_rng(0)
    images, tokens = _images(rng, 2, 224), _tokens(rng, 3)
    with torch.no_grad():
        ref_img = oc.encode_image(_nchw(images)).numpy()
        ref_txt = oc.encode_text(torch.from_numpy(tokens)).numpy()
    sd = {k: v.contiguous() for k, v in oc.state_dict().items()}
    save_file(sd, str(tmp / "eva02_b16.safetensors"))
    _convert_cli("--open_clip", str(tmp / "eva02_b16.safetensors"), "--variant", "EVA02-B-16",
                 "--out", str(tmp / "ckpt"))
    model = checkpoint.load_params(tmp / "ckpt")
    return dict(oc=oc, sd=sd, model=model, images=images, tokens=tokens, ref_img=ref_img, ref_txt=ref_txt, tmp=tmp)


@pytest.mark.slow
def test_b16_parity_with_open_clip_through_the_convert_cli(b16):
    model = b16["model"]
    assert type(model) is eva02.EVA02CLIP and model.config == eva02.get_config("EVA02-B/16")
    assert glue.count_params(model) == OPEN_CLIP_B16_PARAMS == sum(p.numel() for p in b16["oc"].parameters())
    img = np.asarray(model.encode_image(jnp.asarray(b16["images"])))
    txt = np.asarray(model.encode_text(jnp.asarray(b16["tokens"])))
    np.testing.assert_allclose(img, b16["ref_img"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(txt, b16["ref_txt"], atol=1e-4, rtol=0)
    assert float(model.logit_scale[...]) == pytest.approx(float(b16["oc"].logit_scale.detach()), abs=1e-6)


def _timm_value_path_dense(trunk, images):
    """Dense features written on timm's modules: blocks 0..L-2 as timm runs them, then the last block with the
    patch tokens' attention replaced by v -> sub-LN -> proj (no RoPE on v), its MLP, the final norm and the head."""
    with torch.no_grad():
        x = trunk.patch_embed(_nchw(images))
        x, rope = trunk._pos_embed(x)
        for block in trunk.blocks[:-1]:
            x = block(x, rope=rope)
        last = trunk.blocks[-1]
        attn = last.attn
        v = attn.v_proj(last.norm1(x[:, 1:]))
        x = x[:, 1:] + attn.proj(attn.norm(v))
        x = x + last.mlp(last.norm2(x))
        out = trunk.head(trunk.norm(x))
    g = int(round(out.shape[1] ** 0.5))
    return out.numpy().reshape(len(images), g, g, -1)


@pytest.mark.slow
def test_b16_dense_value_path_matches_timm_reference(b16):
    want = _timm_value_path_dense(b16["oc"].visual.trunk, b16["images"])
    model = b16["model"]
    glob, dense = model.encode_dense(jnp.asarray(b16["images"]), return_global=True)
    assert dense.shape == (2, 14, 14, 512)
    np.testing.assert_allclose(np.asarray(dense), want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(glob), b16["ref_img"], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_b16_export_loads_in_open_clip_strict(b16):
    path = convert_eva02.save_open_clip(b16["model"], b16["tmp"] / "export.safetensors")
    from safetensors.numpy import load_file

    exported = load_file(str(path))
    assert set(exported) == set(b16["sd"])
    for key, value in exported.items():
        np.testing.assert_array_equal(value, b16["sd"][key].numpy(), err_msg=key)  # bit for bit
    oc = b16["oc"]
    with torch.no_grad():
        for p in oc.parameters():
            p.zero_()
    oc.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    with torch.no_grad():
        np.testing.assert_array_equal(oc.encode_image(_nchw(b16["images"])).numpy(), b16["ref_img"])


# ------------------------------------------------------------------------------------------------ tiny models


def _tiny_timm(image_size):
    """timm's Eva with EVA02-test-tiny's image tower (the EVA02-CLIP block options of eva02_base_patch16_clip_224)."""
    v = eva02.get_config("EVA02-test-tiny").vision
    return timm_eva.Eva(img_size=image_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.layers,
                        num_heads=v.heads, qkv_fused=False, mlp_ratio=v.mlp_dim / v.width + 1e-6, swiglu_mlp=True,
                        scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True,
                        ref_feat_shape=(v.rope_ref_grid,) * 2, num_classes=32, global_pool="token").eval()


def _tiny_open_clip_state_dict(seed):
    from open_clip.transformer import TextTransformer

    trunk = _tiny_timm(64)
    t = eva02.get_config("EVA02-test-tiny").text
    text = TextTransformer(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                           layers=t.layers, output_dim=32, act_layer=torch.nn.GELU)
    reference.randomize_(trunk, seed=seed)
    reference.randomize_(text, seed=seed + 1)
    sd = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    sd.update({f"text.{k}": v for k, v in text.state_dict().items()})
    sd["logit_scale"] = torch.tensor(2.5)
    return trunk, sd


def test_other_resolution_matches_timm_built_at_that_size(tmp_path, rng):
    """--image_size 128 on a 64px checkpoint: the position embedding resized as timm's checkpoint_filter_fn does
    (bicubic, antialias) and RoPE recomputed for the 8x8 grid (coordinates scaled to the 4x4 pretraining grid)."""
    trunk64, sd = _tiny_open_clip_state_dict(seed=11)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "tiny.safetensors"))
    _convert_cli("--open_clip", str(tmp_path / "tiny.safetensors"), "--variant", "EVA02-test-tiny",
                 "--image_size", "128", "--out", str(tmp_path / "ckpt"))
    model = checkpoint.load_params(tmp_path / "ckpt")
    assert model.config.vision.image_size == 128 and model.config.vision.rope_ref_grid == 4
    trunk128 = _tiny_timm(128)
    trunk128.load_state_dict(timm_eva.checkpoint_filter_fn(trunk64.state_dict(), trunk128), strict=True)
    images = _images(rng, 2, 128)
    with torch.no_grad():
        want = trunk128(_nchw(images)).numpy()
    np.testing.assert_allclose(np.asarray(model.encode_image(jnp.asarray(images))), want, atol=1e-4, rtol=0)
    dense = np.asarray(model.encode_dense(jnp.asarray(images)))
    np.testing.assert_allclose(dense, _timm_value_path_dense(trunk128, images), atol=1e-4, rtol=0)
    from harmoclip_jax.inference import Predictor

    predictor = Predictor.from_open_clip(tmp_path / "tiny.safetensors", "EVA02-test-tiny", image_size=128)
    assert predictor.backbone is eva02.BACKBONE and predictor.image_size == 128  # family from the variant name
    image = (images[0] * 40 + 128).clip(0, 255).astype(np.uint8)[:, :96]  # the dense maps at a 96 x 128 image
    maps = predictor.similarity_maps(image, ["a cat", "a dog"])
    assert maps.cosine.shape == (2, 128, 96) and np.allclose(maps.probs.sum(0), 1.0, atol=1e-5)
    assert predictor.segment(image, ["cat", "dog"], resolution=200).label_map.shape == (128, 96)


def test_original_eva_clip_layout_matches_timm_checkpoint_filter(tmp_path, rng):
    """A pickled state dict in the EVA-CLIP release's layout (renamed from an open_clip one): timm reads it through its
    own checkpoint_filter_fn, we detect the layout from the keys; both give the open_clip-layout features."""
    trunk, sd = _tiny_open_clip_state_dict(seed=7)
    eva_sd = _to_eva_clip_layout(sd)
    assert "visual.blocks.0.attn.q_bias" in eva_sd and "visual.blocks.0.mlp.w3.weight" in eva_sd
    torch.save(eva_sd, tmp_path / "EVA02_CLIP_tiny.pt")
    reloaded = _tiny_timm(64)
    visual = {k: v for k, v in eva_sd.items() if k.startswith("visual.")}
    reloaded.load_state_dict(timm_eva.checkpoint_filter_fn(visual, reloaded), strict=True)
    images, tokens = _images(rng, 2, 64), _tokens(rng, 2)
    with torch.no_grad():
        want = trunk(_nchw(images)).numpy()
        np.testing.assert_array_equal(reloaded(_nchw(images)).numpy(), want)
    model = convert_eva02.load_open_clip(tmp_path / "EVA02_CLIP_tiny.pt", "EVA02-test-tiny")
    np.testing.assert_allclose(np.asarray(model.encode_image(jnp.asarray(images))), want, atol=1e-4, rtol=0)
    from_open_clip = glue.model_from_params(eva02.BACKBONE, model.config, convert_eva02.state_dict_to_params(
        {k: v.numpy() for k, v in sd.items()}, model.config))
    np.testing.assert_array_equal(np.asarray(model.encode_text(jnp.asarray(tokens))),
                                  np.asarray(from_open_clip.encode_text(jnp.asarray(tokens))))


@pytest.mark.parametrize("variant", list(eva02.VARIANTS))
def test_eval_shape_every_variant(variant):
    cfg = eva02.get_config(variant)
    graphdef, state = nnx.split(eva02.abstract_model(variant))
    s, g, e = cfg.vision.image_size, cfg.vision.grid_size, cfg.embed_dim

    def run(state, images, tokens):
        m = nnx.merge(graphdef, state)
        return m.encode_image(images), m.encode_text(tokens), m.encode_dense(images, return_global=True)

    img, txt, (glob, dense) = jax.eval_shape(run, state, jax.ShapeDtypeStruct((2, s, s, 3), jnp.float32),
                                             jax.ShapeDtypeStruct((3, cfg.text.context_length), jnp.int32))
    assert img.shape == glob.shape == (2, e) and txt.shape == (3, e) and dense.shape == (2, g, g, e)
    assert img.dtype == txt.dtype == dense.dtype == jnp.float32


@pytest.mark.parametrize("variant,builder", [("EVA02-B-16", "eva02_base_patch16_clip_224"),
                                             ("EVA02-L-14-336", "eva02_large_patch14_clip_336")])
def test_image_tower_param_count_equals_timm(variant, builder):
    """open_clip's EVA02 image tower is timm's model with the head as projection (built on the meta device)."""
    config = eva02.get_config(variant)
    with torch.device("meta"):
        trunk = getattr(timm_eva, builder)(num_classes=config.embed_dim)
    assert glue.count_params(eva02.abstract_model(variant).visual) == sum(p.numel() for p in trunk.parameters())


def test_variants_aliases_overrides_and_bfloat16(rng):
    assert eva02.get_config("EVA02-B-16") == eva02.get_config("EVA02-B/16")
    assert eva02.get_config("EVA02-L-14-336") == eva02.get_config("EVA02-L/14@336")
    assert registry.for_variant("EVA02-B-16") is eva02.BACKBONE and registry.for_variant("ViT-B/16").family == "clip"
    c = eva02.get_config("EVA02-L-14-336", image_size=448, text_context_length=32, dtype="bfloat16", remat=True,
                         attention_impl="xla")
    assert (c.vision.image_size, c.vision.grid_size, c.text.context_length, c.remat) == (448, 32, 32, True)
    encode = nnx.jit(lambda m, x: m.encode_image(x))  # one compile: cheaper than eager op-by-op dispatch
    images = jnp.asarray(_images(rng, 2, 64))
    out = encode(eva02.EVA02CLIP("EVA02-test-tiny", dtype="bfloat16", remat=True), images)
    ref = encode(eva02.EVA02CLIP("EVA02-test-tiny"), images)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_remat_gives_same_gradients(rng):
    images = jnp.asarray(_images(rng, 2, 64))

    def grads(remat):
        graphdef, params, rest = nnx.split(eva02.EVA02CLIP("EVA02-test-tiny", remat=remat), nnx.Param, ...)

        def loss(p):
            glob, dense = nnx.merge(graphdef, p, rest).encode_dense(images, return_global=True)
            return jnp.sum(dense**2) + jnp.sum(glob**2)

        return jax.jit(jax.grad(loss))(params)["visual"]

    assert_same_gradients(grads(True), grads(False))


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown EVA02-CLIP variant 'EVA02-X'.*EVA02-B-16"):
        eva02.get_config("EVA02-X")
    with pytest.raises(ValueError, match="not a variant of any registered family"):
        registry.for_variant("EVA02-X")
    _, sd = _tiny_open_clip_state_dict(seed=3)
    sd = {k: v.numpy() for k, v in sd.items()}
    with pytest.raises(CheckpointMismatchError, match="shape mismatches.*visual/pos_embed"):
        convert_eva02.state_dict_to_params(sd, eva02.get_config("EVA02-Ti/8@64"))
    del sd["visual.trunk.blocks.1.attn.k_proj.weight"]
    sd["visual.trunk.extra"] = np.zeros(3)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): visual.trunk.blocks.1.attn.k_proj.weight"
                                                      r"(.|\n)*unexpected keys \(1\): visual.trunk.extra"):
        convert_eva02.state_dict_to_params(sd, eva02.get_config("EVA02-test-tiny"))
    clip_sd = {"visual.conv1.weight": np.zeros((64, 3, 16, 16)), "logit_scale": np.zeros(())}
    with pytest.raises(CheckpointMismatchError, match="not an EVA02-CLIP state dict"):
        convert_eva02.state_dict_to_params(clip_sd, eva02.get_config("EVA02-test-tiny"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_eva02.load_open_clip(tmp_path / "missing.pt", "EVA02-B-16")


# ------------------------------------------------------------------------------------------------ the seam


@pytest.mark.slow
def test_tiny_eva02_trains_resumes_and_predicts_on_scenes(tmp_path):
    from harmoclip_jax import train
    from harmoclip_jax import workdir as workdir_lib
    from harmoclip_jax.inference import Predictor
    from harmoclip_jax.metrics_writer import read_metrics

    def config(total_steps):
        c = config_lib.load_config(str(ROOT / "configs" / "demo.py") + ":smoke,noeval")
        c.model.family = "eva02_clip"
        c.model.variant = "EVA02-test-tiny"  # 2 blocks: the train step compiles in seconds (Ti/8@64 is the demo's)
        c.total_steps = total_steps
        c.progress_bar = False
        c.plot = False
        c.checkpoint.async_save = False
        return c

    workdir = tmp_path / "eva"
    train.train_and_evaluate(config(2), workdir)  # no evaluators: they are family-agnostic (test_backbone_seam.py)
    assert workdir_lib.checkpoint_steps(workdir) == [2]
    records = read_metrics(workdir / workdir_lib.METRICS)
    assert {"loss/gc", "loss/lrc", "loss/gr"} <= set(records[-1])  # the HarmoCLIP losses
    losses_2 = {r["step"]: r["loss"] for r in records if "loss" in r}
    train.train_and_evaluate(config(3), workdir)  # resumes from step 2
    losses_3 = {r["step"]: r["loss"] for r in read_metrics(workdir / workdir_lib.METRICS) if "loss" in r}
    assert sorted(losses_3) == [1, 2, 3] and all(losses_3[s] == losses_2[s] for s in (1, 2))
    predictor = Predictor.from_checkpoint(workdir)
    assert type(predictor.model) is eva02.EVA02CLIP and predictor.backbone is eva02.BACKBONE
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), np.uint8)
    result = predictor.classify_regions(image, [[0, 0, 30, 20], [10, 5, 56, 40]], ["red circle", "blue star"])
    assert result.probs.shape == (2, 2)
    np.testing.assert_allclose(result.probs.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("spec,variant,open_clip_name,size", [
    ("configs/eva02_b16.py", "EVA02-B/16", "EVA02-B-16", 224),
    ("configs/eva02_b16.py:method=fineclip,res=448", "EVA02-B/16", "EVA02-B-16", 448),
    ("configs/eva02_l14_336.py:dtype=bfloat16,remat", "EVA02-L/14@336", "EVA02-L-14-336", 336),
])
def test_configs_load_and_stop_with_the_conversion_command(spec, variant, open_clip_name, size, tmp_path):
    from harmoclip_jax import train

    c = config_lib.load_config(str(ROOT / spec))
    config_lib.validate(c, num_devices=8)
    assert (c.model.family, c.model.variant, c.model.image_size) == ("eva02_clip", variant, size)
    model_config = registry.get(c.model.family).config_for(c.model)
    assert model_config.vision.image_size == size and model_config.vision.rope_ref_grid == 16
    c.init.params_dir = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"python -m harmoclip_jax.convert --open_clip .* --variant "
                                                f"{open_clip_name} --out .* --image_size {size}"):
        train.check_inputs(c)
