"""The SigLIP family: parity with transformers' SiglipModel and open_clip's ViT-B-16-SigLIP (perturbed random
weights, through the convert CLI), HF export round trip, the SentencePiece tokenizer against transformers'
SiglipTokenizer, the sigmoid loss (open_clip's SigLipLoss; the ring form on 8 devices) and a tiny SigLIP that trains
on Scenes, resumes and predicts. Offline, CPU."""
import io
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from harmoclip_jax import losses as L
from harmoclip_jax import tokenizer as tk
from harmoclip_jax.models import glue, registry, siglip
from harmoclip_jax.models.backbone import image_text_logits
from harmoclip_jax.testing.numerics import assert_same_gradients
from trainer_helpers import scenes_spm

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _torch():
    from harmoclip_jax.testing.torch_compat import ensure_torch_reference_stack

    ensure_torch_reference_stack()
    import torch

    return torch


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _perturb(torch, module, std, seed=0):
    """Random weights moved away from their init (zero biases, unit LayerNorms would hide mapping mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen))


def _convert_cli(args):
    from absl.testing import flagsaver

    from harmoclip_jax import convert

    with flagsaver.flagsaver():
        convert.flags.FLAGS.unparse_flags()
        convert.flags.FLAGS(["convert", *args])
        convert.main(["convert"])


# ------------------------------------------------------------------------------------------------ the model


def test_variants_build_and_encode_shapes():
    for name in ("SigLIP-Ti/8@64", "SigLIP-test-tiny"):  # B/16: the parity tests
        cfg = siglip.get_config(name)
        model = siglip.abstract_model(name)
        graphdef, state = nnx.split(model)
        s, g, e = cfg.vision.image_size, cfg.vision.grid_size, cfg.embed_dim

        def run(state, images, tokens):
            m = nnx.merge(graphdef, state)
            return m.encode_image(images), m.encode_text(tokens), m.encode_dense(images, return_global=True)

        img, txt, (glob, dense) = jax.eval_shape(run, state, jax.ShapeDtypeStruct((2, s, s, 3), jnp.float32),
                                                 jax.ShapeDtypeStruct((3, cfg.text.context_length), jnp.int32))
        assert img.shape == glob.shape == (2, e) and txt.shape == (3, e) and dense.shape == (2, g, g, e), name
    assert registry.get("siglip") is siglip.BACKBONE and siglip.BACKBONE.probabilities == "sigmoid"
    assert siglip.get_config("ViT-B-16-SigLIP") == siglip.get_config("SigLIP-B/16")
    with pytest.raises(ValueError, match="dense_mode"):
        siglip.get_config("SigLIP-test-tiny", dense_mode="cls")


@pytest.mark.usefixtures("default_compiles")  # the bound holds for optimised programs (conftest.py)
def test_remat_gives_same_gradients(rng):
    images = jnp.asarray(rng.standard_normal((2, 64, 64, 3)), jnp.float32)

    def grads(**overrides):
        graphdef, params, rest = nnx.split(siglip.SigLIP("SigLIP-test-tiny", **overrides), nnx.Param, ...)

        def loss(p):
            pooled, dense = nnx.merge(graphdef, p, rest).encode_dense(images, return_global=True)
            return jnp.sum(dense**2) + jnp.sum(pooled)  # the text tower runs the same Encoder

        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

    assert_same_gradients(grads(remat=True), grads())


def test_dense_modes_and_one_pass_global(rng):
    images = jnp.asarray(rng.standard_normal((2, 64, 64, 3)), jnp.float32)
    model = siglip.SigLIP("SigLIP-test-tiny")
    # Each path its own jitted program (op by op, every primitive would compile on its own).
    glob, dense = nnx.jit(lambda m, x: m.encode_dense(x, return_global=True))(model, images)
    np.testing.assert_allclose(glob, nnx.jit(lambda m, x: m.encode_image(x))(model, images), atol=1e-6)
    encode_dense = nnx.jit(lambda m, x: m.encode_dense(x))
    np.testing.assert_allclose(dense, encode_dense(model, images), atol=1e-6)
    # map_value: a patch token through the head's value/output projections, then its LN + MLP residual.
    head, tokens = model.visual.head, nnx.jit(lambda m, x: m.visual.tokens(x))(model, images)

    @nnx.jit
    def map_value(head, token):
        o = token @ head.kv.kernel[...][:, 64:] + head.kv.bias[...][64:]
        o = o @ head.out.kernel[...] + head.out.bias[...]
        return o + head.mlp(head.ln(o))

    np.testing.assert_allclose(dense[0, 1, 1], map_value(head, tokens[0, 5]), atol=1e-5)
    post_ln = siglip.SigLIP("SigLIP-test-tiny", dense_mode="post_ln")
    np.testing.assert_allclose(encode_dense(post_ln, images)[0, 1, 1], tokens[0, 5], atol=1e-6)
    # Short token rows are padded with </s> to the context: same embedding as the full row.
    short = jnp.asarray([[5, 6, 7, 1]], jnp.int32)
    full = jnp.pad(short, ((0, 0), (0, 12)), constant_values=1)
    encode_text = nnx.jit(lambda m, t: m.encode_text(t))
    np.testing.assert_allclose(encode_text(model, short), encode_text(model, full), atol=1e-6)


def test_param_count_equals_transformers():
    """The variants built by transformers (meta device: no memory) have as many parameters as ours (B/16 and the
    test model: the parity tests)."""
    torch = _torch()
    from transformers import SiglipConfig, SiglipModel

    from harmoclip_jax.models.convert_siglip import hf_config_dict

    for name in ("SigLIP-So400m/14@384", "SigLIP-Ti/8@64"):
        d = hf_config_dict(siglip.get_config(name))
        with torch.device("meta"):
            hf = SiglipModel(SiglipConfig(text_config=d["text_config"], vision_config=d["vision_config"]))
        assert glue.count_params(siglip.abstract_model(name)) == sum(p.numel() for p in hf.parameters()), name


# ------------------------------------------------------------------------------------------------ conversion


@pytest.fixture(scope="module")
def hf_b16(tmp_path_factory):
    """A transformers SiglipModel B/16 (random, perturbed) saved as a HF directory, and its converted params."""
    torch = _torch()
    from transformers import SiglipConfig, SiglipModel

    from harmoclip_jax.models.convert_siglip import hf_config_dict

    d = hf_config_dict(siglip.get_config("SigLIP-B/16"))
    torch.manual_seed(0)
    hf = SiglipModel(SiglipConfig(text_config=d["text_config"], vision_config=d["vision_config"])).eval()
    _perturb(torch, hf, 0.02)
    with torch.no_grad():
        hf.logit_scale.fill_(2.1)
        hf.logit_bias.fill_(-6.5)
    root = tmp_path_factory.mktemp("hf_b16")
    hf.save_pretrained(root / "hf")
    _convert_cli(["--hf", str(root / "hf"), "--out", str(root / "params")])
    return hf, root


def _hf_inputs(rng, torch, image_size=224, n_text=3, vocab=32000):
    pixels = rng.standard_normal((2, 3, image_size, image_size)).astype(np.float32)
    ids = rng.integers(2, vocab, (n_text, 64))
    ids[0, 10:] = 1  # a padded row (pad = </s> = 1)
    return pixels, ids, torch.tensor(pixels), torch.tensor(ids)


def _features(out):
    return (out.pooler_output if hasattr(out, "pooler_output") else out).detach().numpy()


def test_hf_siglip_b16_parity_through_the_convert_cli(hf_b16, rng):
    torch = _torch()
    from harmoclip_jax import checkpoint

    hf, root = hf_b16
    model = checkpoint.load_params(root / "params")
    assert type(model) is siglip.SigLIP
    assert glue.count_params(model) == sum(p.numel() for p in hf.parameters())
    pixels, ids, tp, ti = _hf_inputs(rng, torch)
    with torch.no_grad():
        want_img, want_txt = _features(hf.get_image_features(pixel_values=tp)), _features(hf.get_text_features(
            input_ids=ti))
        logits = hf(input_ids=ti, pixel_values=tp).logits_per_image.numpy()
    img = np.asarray(model.encode_image(jnp.asarray(pixels.transpose(0, 2, 3, 1))))
    txt = np.asarray(model.encode_text(jnp.asarray(ids)))
    err_img, err_txt = np.abs(img - want_img).max(), np.abs(txt - want_txt).max()
    print(f"HF B/16 parity: image max|diff| {err_img:.2e}, text {err_txt:.2e}")
    assert err_img <= 1e-4 and err_txt <= 1e-4
    ours_logits = image_text_logits(model, _normalize(img) @ _normalize(txt).T)
    assert np.abs(ours_logits - logits).max() <= 1e-4


def test_export_round_trip_loads_in_transformers_with_identical_outputs(hf_b16, spm_file, rng, tmp_path):
    torch = _torch()
    from transformers import AutoTokenizer, SiglipModel

    hf, root = hf_b16
    _convert_cli(["--params", str(root / "params"), "--to_hf", str(tmp_path / "export"), "--tokenizer_file",
                  str(spm_file)])
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "export", use_fast=False)
    want = hf_tok(HARD_TEXTS, padding="max_length", truncation=True, max_length=64)["input_ids"]
    np.testing.assert_array_equal(tk.get_tokenizer(f"siglip:{tmp_path / 'export'}")(HARD_TEXTS), np.asarray(want))
    back = SiglipModel.from_pretrained(tmp_path / "export").eval()
    _, _, tp, ti = _hf_inputs(rng, torch)
    with torch.no_grad():
        a, b = hf(input_ids=ti, pixel_values=tp), back(input_ids=ti, pixel_values=tp)
    for key in ("image_embeds", "text_embeds", "logits_per_image"):
        np.testing.assert_array_equal(getattr(a, key).numpy(), getattr(b, key).numpy())
    assert sorted(back.state_dict()) == sorted(hf.state_dict())


def test_open_clip_vit_b16_siglip_parity(rng, tmp_path):
    torch = _torch()
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(1)
    oc = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None).eval()
    _perturb(torch, oc, 0.02, seed=1)
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(tmp_path / "oc.safetensors"))
    model = siglip.BACKBONE.load_open_clip(tmp_path / "oc.safetensors", "ViT-B-16-SigLIP")  # what --open_clip runs
    assert glue.count_params(model) == sum(p.numel() for p in oc.parameters())
    pixels, ids, tp, ti = _hf_inputs(rng, torch)
    with torch.no_grad():
        want_img, want_txt = oc.encode_image(tp).numpy(), oc.encode_text(ti).numpy()
    err_img = np.abs(np.asarray(model.encode_image(jnp.asarray(pixels.transpose(0, 2, 3, 1)))) - want_img).max()
    err_txt = np.abs(np.asarray(model.encode_text(jnp.asarray(ids))) - want_txt).max()
    print(f"open_clip B/16 parity: image max|diff| {err_img:.2e}, text {err_txt:.2e}")
    assert err_img <= 1e-4 and err_txt <= 1e-4


def test_position_embedding_resize_matches_hf_interpolate_pos_encoding(rng, tmp_path):
    """A tiny HF SigLIP loaded at 96px (from 64px) equals HF with interpolate_pos_encoding=True."""
    torch = _torch()
    from transformers import SiglipConfig, SiglipModel

    from harmoclip_jax.models import convert_siglip
    from harmoclip_jax.models.convert import CheckpointMismatchError

    d = convert_siglip.hf_config_dict(siglip.get_config("SigLIP-test-tiny"))
    torch.manual_seed(2)
    hf = SiglipModel(SiglipConfig(text_config=d["text_config"], vision_config=d["vision_config"])).eval()
    _perturb(torch, hf, 0.05, seed=2)
    hf.save_pretrained(tmp_path / "hf")
    model = convert_siglip.load_hf_siglip(tmp_path / "hf", image_size=96)
    pixels = rng.standard_normal((2, 3, 96, 96)).astype(np.float32)
    with torch.no_grad():
        want = _features(hf.get_image_features(pixel_values=torch.tensor(pixels), interpolate_pos_encoding=True))
    np.testing.assert_allclose(model.encode_image(jnp.asarray(pixels.transpose(0, 2, 3, 1))), want, atol=1e-4)
    assert glue.count_params(siglip.abstract_model("SigLIP-test-tiny")) == sum(p.numel() for p in hf.parameters())
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    sd.pop("vision_model.head.probe")
    sd["extra.weight"] = np.zeros(3, np.float32)
    mismatch = r"(?s)missing keys \(1\): vision_model.head.probe.*unexpected keys \(1\): extra.weight"
    with pytest.raises(CheckpointMismatchError, match=mismatch):
        convert_siglip.state_dict_to_params(sd, siglip.get_config("SigLIP-test-tiny"), "hf")


# ------------------------------------------------------------------------------------------------ the losses


def test_sigmoid_loss_equals_open_clip_siglip_loss(rng):
    torch = _torch()
    from open_clip.loss import SigLipLoss

    img, txt = rng.standard_normal((12, 16)).astype(np.float32), rng.standard_normal((12, 16)).astype(np.float32)
    scale, bias = np.float32(np.log(10.0) + 0.3), np.float32(-7.5)
    want = SigLipLoss()(torch.tensor(_normalize(img)), torch.tensor(_normalize(txt)), torch.tensor(np.exp(scale)),
                        torch.tensor(bias)).item()
    got = float(L.sigmoid_contrastive_loss(img, txt, scale, bias))
    assert abs(got - want) < 1e-5 * abs(want)

    # As the gc term of a config: global_form="sigmoid" (absent from default configs: softmax, unchanged).
    config = L.default_loss_config("clip")
    assert "global_form" not in config
    config.global_form = "sigmoid"
    assert L.required_outputs(config) == {"image_embed", "text_embed", "logit_scale", "logit_bias"}
    out = {"image_embed": img, "text_embed": txt, "logit_scale": scale, "logit_bias": bias}
    assert float(L.total_loss(config, out, {})[1]["gc"]) == pytest.approx(want, rel=1e-5)
    config.global_form = "cosine"
    with pytest.raises(ValueError, match="global_form"):
        L.required_outputs(config)


def _ring_setup(rng, batch, dim=16):
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    img = jnp.asarray(rng.standard_normal((batch, dim)), jnp.float32)
    txt = jnp.asarray(img + 0.5 * rng.standard_normal((batch, dim)), jnp.float32)
    return mesh, img, txt, jnp.float32(np.log(10.0)), jnp.float32(-3.0)


def test_ring_sigmoid_loss_equals_single_device_value_and_gradient(rng):
    assert len(jax.devices()) >= 8
    mesh, img, txt, scale, bias = _ring_setup(rng, 32)
    args = (img, txt, scale, bias)
    single = jax.jit(jax.value_and_grad(L.sigmoid_contrastive_loss, argnums=(0, 1, 2, 3)))
    ring = jax.jit(jax.value_and_grad(lambda *a: L.sharded_sigmoid_loss(mesh, *a), argnums=(0, 1, 2, 3)))
    (v1, g1), (v2, g2) = single(*args), ring(*args)
    assert abs(float(v1) - float(v2)) <= 1e-5 * abs(float(v1))
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2), (2, 4)])
def test_the_trainer_gc_term_takes_the_ring_form_on_a_mesh(rng, mesh_shape):
    """`total_loss` with global_form="sigmoid" under the trainer's mesh context: the ring (collective-permute in the
    compiled step, the batch split over data x fsdp), same value and gradient as without a mesh."""
    from harmoclip_jax import sharding

    cfg = L.default_loss_config("clip")
    cfg.global_form = "sigmoid"
    img = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    txt = jnp.asarray(img + 0.5 * rng.standard_normal((16, 8)), jnp.float32)

    def loss(img, txt, scale, bias):
        out = {"image_embed": img, "text_embed": txt, "logit_scale": scale, "logit_bias": bias}
        return L.total_loss(cfg, out, {})[0]

    args = (img, txt, jnp.float32(np.log(10.0)), jnp.float32(-3.0))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    want_value, want_grads = step(*args)
    mesh = sharding.make_mesh([("data", mesh_shape[0]), ("fsdp", mesh_shape[1])])
    with jax.set_mesh(mesh):
        batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
        sharded = (jax.device_put(img, batch), jax.device_put(txt, batch), *args[2:])
        assert "collective-permute" in step.lower(*sharded).compile().as_text()
        value, grads = step(*sharded)
    assert abs(float(value) - float(want_value)) <= 1e-5 * abs(float(want_value))
    for a, b in zip(grads, want_grads):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def _gathered_sigmoid_loss(mesh, img, txt, scale, bias):
    """The gathered form: every device scores its images against all texts (all_gather), (b, n*b) logits."""
    from jax.sharding import PartitionSpec as P

    def local(img, txt, scale, bias):
        n, b = jax.lax.axis_size("data"), img.shape[0]
        texts = jax.lax.all_gather(txt, "data", tiled=True)
        logits = jnp.exp(scale) * L.l2_normalize(img) @ L.l2_normalize(texts).T + bias
        signs = -jnp.ones_like(logits)
        signs = jax.lax.dynamic_update_slice(signs, 2 * jnp.eye(b) - 1, (0, jax.lax.axis_index("data") * b))
        return jax.lax.psum(-jnp.sum(jax.nn.log_sigmoid(signs * logits)), "data") / (n * b)

    return jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()), out_specs=P())(
        img, txt, scale, bias)


def test_ring_form_memory_does_not_grow_like_the_gathered_form(rng):
    """Per-device temporary memory of value_and_grad (XLA's compiled memory analysis) at global batches 1024 and
    2048 on 8 devices: the gathered form holds (b, n*b) logits, the ring form one (b, b) block at a time."""
    temp = {}
    for form, fn in (("ring", L.sharded_sigmoid_loss), ("gathered", _gathered_sigmoid_loss)):
        for batch in (1024, 2048):
            mesh, *args = _ring_setup(rng, batch)
            step = jax.jit(jax.value_and_grad(lambda *a, fn=fn, mesh=mesh: fn(mesh, *a), argnums=(0, 1)))
            stats = step.lower(*args).compile().memory_analysis()
            temp[form, batch] = stats.temp_size_in_bytes
    mesh, *args = _ring_setup(rng, 64)
    np.testing.assert_allclose(_gathered_sigmoid_loss(mesh, *args), L.sigmoid_contrastive_loss(*args), rtol=1e-5)
    ring_growth = temp["ring", 2048] - temp["ring", 1024]
    gathered_growth = temp["gathered", 2048] - temp["gathered", 1024]
    print("per-device temp bytes:", temp)
    assert temp["ring", 2048] * 4 < temp["gathered", 2048]
    assert ring_growth * 4 < gathered_growth


# ------------------------------------------------------------------------------------------------ the tokenizer


def _train_spm(path: pathlib.Path) -> pathlib.Path:
    """A small SentencePiece model with SigLIP's special ids (pad 0, </s> 1, <unk> 2)."""
    import sentencepiece as spm

    corpus = [f"a photo of {a} {b} on the {c}" for a in ("a red", "two blue", "the small", "une grande", "café")
              for b in ("cat", "dog", "circle", "star", "naïve") for c in ("left", "right", "table", "sky")]
    corpus += ["hello world its 314 oclock", "emoji 🐱 and ümlauts ärger", "ﬁ ligature and ｆｕｌｌ width"]
    corpus += [f"{c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle", "star")]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus * 5), model_writer=buf, vocab_size=64,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   pad_piece="<pad>",
                                   eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0, minloglevel=2)
    path.mkdir(parents=True, exist_ok=True)
    (path / "spiece.model").write_bytes(buf.getvalue())
    return path / "spiece.model"


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    return _train_spm(tmp_path_factory.mktemp("spm"))


HARD_TEXTS = ["", " ", "a photo of a cat", "  Hello,   WORLD!!  ", "A red circle; two blue stars.", "Café naïve Ärger",
              "emoji 🐱🐶 🚀!", "ﬁ ｆｕｌｌ", "tab\tand\nnewline", "x" * 300, "a \u2581 b \u2581\u2581c", "long " * 80,
              "\u00a0nbsp\u2003em", "日本語のテキスト", "it's 3.14 o'clock (approx.) -- \"quoted\" & <tags>"]


def test_tokenizer_ids_equal_transformers_siglip_tokenizer(spm_file, tmp_path):
    _torch()
    from transformers import SiglipTokenizer

    SiglipTokenizer(vocab_file=str(spm_file)).save_pretrained(tmp_path / "hf")
    hf = SiglipTokenizer.from_pretrained(tmp_path / "hf")
    ours = tk.get_tokenizer(f"siglip:{tmp_path / 'hf'}")  # a checkpoint directory holding spiece.model
    want = hf(HARD_TEXTS, padding="max_length", truncation=True, max_length=64)["input_ids"]
    got = ours(HARD_TEXTS, 64)
    assert got.dtype == np.int32 and got.shape == (len(HARD_TEXTS), 64)
    np.testing.assert_array_equal(got, np.asarray(want))
    # Special-token literals stay text (big_vision); transformers agrees with split_special_tokens=True.
    literal = ["an <unk> and a </s> in a caption"]
    want = hf(literal, padding="max_length", truncation=True, max_length=64, split_special_tokens=True)["input_ids"]
    np.testing.assert_array_equal(ours(literal, 64), np.asarray(want))
    import pickle

    assert np.array_equal(pickle.loads(pickle.dumps(ours))(HARD_TEXTS, 64), ours(HARD_TEXTS, 64))  # grain workers
    with pytest.raises(ValueError, match="tokenizer_file"):
        tk.siglip_tokenizer.__wrapped__(None)


# ------------------------------------------------------------------------------------------------ training


def _train_config(total_steps, spm):
    from harmoclip_jax import config_lib

    c = config_lib.load_config(str(ROOT / "configs" / "demo.py") + ":smoke")
    c.model.family = "siglip"
    c.model.variant = "SigLIP-test-tiny"
    c.model.context_length = 32
    c.model.tokenizer_file = str(spm)  # the pipeline, trainer and Predictor use "siglip:<this file>"
    c.loss.global_form = "sigmoid"
    c.region.text_length = None
    c.total_steps = total_steps
    c.progress_bar = False
    c.plot = False
    c.checkpoint.async_save = False
    return c


def test_tiny_siglip_trains_on_scenes_resumes_and_predicts(tmp_path):
    from harmoclip_jax import checkpoint, train
    from harmoclip_jax import workdir as workdir_lib
    from harmoclip_jax.inference import Predictor
    from harmoclip_jax.metrics_writer import read_metrics

    spm = scenes_spm(tmp_path / "spm")
    workdir = tmp_path / "run"
    metrics = train.train_and_evaluate(_train_config(3, spm), workdir)
    assert workdir_lib.checkpoint_steps(workdir) == [2, 3]
    assert 0 <= metrics["eval/boxcls/top1"] <= 1 and 0 <= metrics["eval/retrieval/t2i_r1"] <= 1
    records = read_metrics(workdir / workdir_lib.METRICS)
    assert {"loss/gc", "loss/lrc", "loss/gr"} <= set(records[-1])
    losses_3 = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert all(np.isfinite(v) for v in losses_3.values())

    resume = _train_config(5, spm)
    resume.evals = {}  # evaluated above; the resume is about the steps
    train.train_and_evaluate(resume, workdir)  # resumes from step 3
    records = read_metrics(workdir / workdir_lib.METRICS)
    losses_5 = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses_5) == [1, 2, 3, 4, 5] and all(losses_5[s] == losses_3[s] for s in (1, 2, 3))

    predictor = Predictor.from_checkpoint(workdir)
    assert type(predictor.model) is siglip.SigLIP and predictor.tokenizer == f"siglip:{spm}"
    params = glue.params_of(predictor.model)
    assert float(params["logit_bias"]) != -10.0  # the bias trained
    jax.tree.map(np.testing.assert_array_equal, params,
                 glue.params_of(checkpoint.load_params(workdir / workdir_lib.PARAMS)))
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), np.uint8)
    result = predictor.classify_regions(image, [[0, 0, 30, 20], [10, 5, 56, 40]], ["red circle", "blue star"])
    assert result.probs.shape == (2, 2) and np.all((result.probs > 0) & (result.probs < 1))
    assert not np.allclose(result.probs.sum(-1), 1.0)  # independent sigmoids, not a softmax
    maps = predictor.similarity_maps(image, ["red circle", "blue star"])  # dense maps: sigmoid probabilities too
    assert maps.cosine.shape == (2, 40, 56) and not np.allclose(maps.probs.sum(0), 1.0)
    labels = predictor.segment(image, ["red circle", "blue star"], background=0.5, resolution=80)
    assert labels.label_map.shape == (40, 56) and labels.windows > 1 and set(np.unique(labels.label_map)) <= {-1, 0, 1}
    np.testing.assert_allclose(predictor.preprocess(np.full((8, 8, 3), 255, np.uint8))[0], 1.0, rtol=1e-6)


def test_siglip_b16_config_stops_with_the_conversion_command(tmp_path):
    from harmoclip_jax import config_lib, train

    c = config_lib.load_config(str(ROOT / "configs" / "siglip_b16.py") + ":res=256,hf_dir=/ckpt/siglip256,"
                               f"params_dir={tmp_path / 'none'}")
    config_lib.validate(c)
    assert c.model.variant == "SigLIP-B/16@256" and c.model.family == "siglip" and c.loss.global_form == "sigmoid"
    assert config_lib.tokenizer_name(c) == f"siglip:{tmp_path / 'none' / 'spiece.model'}"  # convert copies it
    assert L.required_outputs(c.loss) >= {"logit_bias", "region_embed"}
    with pytest.raises(FileNotFoundError, match=f"python -m harmoclip_jax.convert --hf /ckpt/siglip256 --out "
                                                f"{tmp_path / 'none'}"):
        train.check_inputs(c)


def test_sigmoid_lrc_against_numpy(rng):
    n, e = 10, 8
    regions, lexemes = rng.standard_normal((2, 5, e)), rng.standard_normal((2, 5, e))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool)
    ids = rng.integers(0, 3, (2, 5))
    scale, bias = 1.7, -2.0
    logits = np.exp(scale) * _normalize(regions.reshape(n, e)) @ _normalize(lexemes.reshape(n, e)).T + bias
    same, valid = ids.reshape(-1)[:, None] == ids.reshape(-1)[None, :], mask.reshape(-1)
    for duplicates in ("positive", "mask"):
        z = np.where(same if duplicates == "positive" else np.eye(n, dtype=bool), 1.0, -1.0)
        counted = valid[:, None] & valid[None, :] & ((same & (z > 0)) | ~same | np.eye(n, dtype=bool))
        want = -np.sum(np.where(counted, np.log(1 / (1 + np.exp(-z * logits))), 0)) / valid.sum()
        config = L.default_loss_config("harmoclip")
        config.weights.gr, config.weights.gc = 0.0, 0.0
        config.lrc_form, config.lrc_duplicates = "sigmoid", duplicates
        out = {"region_embed": regions, "lexeme_embed": lexemes, "logit_scale": scale, "logit_bias": bias}
        got = L.total_loss(config, out, {"box_mask": mask, "lexeme_id": ids})[1]["lrc"]
        assert float(got) == pytest.approx(want, rel=1e-5), duplicates
    config.lrc_negatives = "vocab"
    with pytest.raises(ValueError, match="lrc_form='sigmoid' needs lrc_negatives='batch'"):
        L.required_outputs(config)


def test_the_sentencepiece_model_travels_with_the_weights(spm_file, tmp_path):
    """HF dir (with spiece.model) -> params checkpoint -> HF export: each carries the tokenizer, and the Predictor of
    each tokenizes with it, no tokenizer argument needed."""
    from flax import nnx

    from harmoclip_jax.inference import Predictor
    from harmoclip_jax.models.convert_siglip import save_hf_siglip

    save_hf_siglip(siglip.SigLIP("SigLIP-test-tiny", rngs=nnx.Rngs(0)), tmp_path / "hf", tokenizer_file=spm_file)
    _convert_cli(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "params")])
    assert (tmp_path / "params" / "spiece.model").read_bytes() == spm_file.read_bytes()
    _convert_cli(["--params", str(tmp_path / "params"), "--to_hf", str(tmp_path / "export")])
    assert (tmp_path / "export" / "spiece.model").read_bytes() == spm_file.read_bytes()
    want = tk.get_tokenizer(f"siglip:{spm_file}")(HARD_TEXTS, 16)
    for source, load in (("hf", Predictor.from_hf), ("params", Predictor.from_checkpoint),
                         ("export", Predictor.from_hf)):
        predictor = load(tmp_path / source)
        assert predictor.tokenizer == f"siglip:{tmp_path / source / 'spiece.model'}", source
        np.testing.assert_array_equal(predictor.tokenize(HARD_TEXTS), want)
