"""Parity of our NNX CLIP with the real PyTorch libraries (transformers CLIPModel, open_clip CLIP), through the
checkpoint converters, plus export round trips and position-embedding resizing."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harmoclip_jax.models import convert
from harmoclip_jax.models.variants import get_config
from harmoclip_jax.testing import reference

import torch  # noqa: E402 - dev requirement (requirements-dev.txt): a broken install fails, never skips


def _images(rng, n, size):
    return rng.standard_normal((n, size, size, 3)).astype(np.float32)


def _tokens(rng, n, ctx=77, vocab=49408):
    """Random CLIP-like token rows: SOT, random ids, EOT, zero padding (varied lengths)."""
    toks = np.zeros((n, ctx), np.int64)
    for i in range(n):
        length = int(rng.integers(1, ctx - 1))
        toks[i, 0] = 49406
        toks[i, 1:length + 1] = rng.integers(1, vocab - 2, length)
        toks[i, length + 1] = 49407
    return toks


def _hf_features(hf, images, tokens):
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
        txt = hf.get_text_features(input_ids=torch.from_numpy(tokens))
    pick = lambda o: (o.pooler_output if hasattr(o, "pooler_output") else o).numpy()  # noqa: E731
    return pick(img), pick(txt)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    hf = reference.hf_clip_model("test-tiny", seed=1)
    path = tmp_path_factory.mktemp("hf_tiny")
    hf.save_pretrained(path)
    return hf, path


def test_hf_tiny_parity(tiny_hf, rng):
    hf, path = tiny_hf
    model = convert.load_hf_clip(path)
    images, tokens = _images(rng, 3, 64), _tokens(rng, 5)
    ref_img, ref_txt = _hf_features(hf, images, tokens)
    np.testing.assert_allclose(np.asarray(model.encode_image(jnp.asarray(images))), ref_img, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(model.encode_text(jnp.asarray(tokens))), ref_txt, atol=1e-4, rtol=0)
    assert float(model.logit_scale[...]) == pytest.approx(float(hf.logit_scale.detach()), abs=1e-6)


def test_hf_tiny_dense_matches_torch_reference(tiny_hf, rng):
    hf, path = tiny_hf
    model = convert.load_hf_clip(path)
    images = _images(rng, 2, 64)
    want = reference.hf_dense_features(hf, images)
    dense = model.encode_dense(jnp.asarray(images))
    assert dense.shape == (2, 4, 4, 32)
    np.testing.assert_allclose(np.asarray(dense), want, atol=1e-4, rtol=0)
    glob, dense2 = model.encode_dense(jnp.asarray(images), return_global=True)
    np.testing.assert_allclose(np.asarray(dense2), want, atol=1e-4, rtol=0)
    ref_img, _ = _hf_features(hf, images, _tokens(rng, 1))
    np.testing.assert_allclose(np.asarray(glob), ref_img, atol=1e-4, rtol=0)


def test_hf_pytorch_model_bin_and_gelu(tmp_path, rng):
    """Pickled `pytorch_model.bin` checkpoints and the exact-GELU activation (LAION models) also load."""
    hf = reference.hf_clip_model("test-tiny", seed=2, activation="gelu")
    hf.config.save_pretrained(tmp_path)  # transformers v5 writes only safetensors; write the legacy .bin by hand
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model = convert.load_hf_clip(tmp_path)
    assert model.config.activation == "gelu"
    images, tokens = _images(rng, 2, 64), _tokens(rng, 2)
    ref_img, ref_txt = _hf_features(hf, images, tokens)
    np.testing.assert_allclose(np.asarray(model.encode_image(jnp.asarray(images))), ref_img, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(model.encode_text(jnp.asarray(tokens))), ref_txt, atol=1e-4, rtol=0)


def test_save_hf_clip_round_trip(tiny_hf, tmp_path):
    _, path = tiny_hf
    model = convert.load_hf_clip(path)
    out = convert.save_hf_clip(model, tmp_path / "export")
    from safetensors.numpy import load_file

    original, exported = load_file(str(path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(exported) <= set(original)
    for key, value in exported.items():
        assert value.shape == original[key].shape, key
        np.testing.assert_array_equal(value, original[key], err_msg=key)  # exact, bit for bit
    from transformers import CLIPModel

    reloaded = CLIPModel.from_pretrained(out)  # transformers itself can read our export
    for name, p in reloaded.state_dict().items():
        if name in original:
            np.testing.assert_array_equal(p.numpy(), original[name], err_msg=name)
    again = convert.load_hf_clip(out)
    assert again.config == model.config
    bare = convert.save_hf_clip(model, tmp_path / "bare", with_processor=False)
    assert sorted(p.name for p in bare.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.slow
def test_hf_vit_b16_real_shapes_parity(tmp_path, rng):
    hf = reference.hf_clip_model("ViT-B/16", seed=3)
    hf.save_pretrained(tmp_path)
    model = convert.load_hf_clip(tmp_path)
    images, tokens = _images(rng, 2, 224), _tokens(rng, 3)
    ref_img, ref_txt = _hf_features(hf, images, tokens)
    np.testing.assert_allclose(np.asarray(model.encode_image(jnp.asarray(images))), ref_img, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(model.encode_text(jnp.asarray(tokens))), ref_txt, atol=1e-4, rtol=0)
    want = reference.hf_dense_features(hf, images)
    np.testing.assert_allclose(np.asarray(model.encode_dense(jnp.asarray(images))), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_open_clip_state_dict_parity(tmp_path, rng, suffix):
    oc = reference.open_clip_model("test-tiny", seed=4)
    path = tmp_path / f"open_clip{suffix}"
    sd = {k: v for k, v in oc.state_dict().items()}
    if suffix == ".pt":
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)  # training ckpt
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = convert.load_open_clip(path, get_config("test-tiny"))
    images, tokens = _images(rng, 2, 64), _tokens(rng, 3)
    with torch.no_grad():
        ref_img = oc.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
        ref_txt = oc.encode_text(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(np.asarray(model.encode_image(jnp.asarray(images))), ref_img, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(model.encode_text(jnp.asarray(tokens))), ref_txt, atol=1e-4, rtol=0)
    # And back: our open_clip export is the same state dict.
    exported = convert.params_to_state_dict(model, "open_clip")
    for key, value in exported.items():
        assert value.shape == tuple(sd[key].shape), key
        np.testing.assert_array_equal(value, sd[key].numpy(), err_msg=key)


def test_mismatch_error_lists_keys(tiny_hf, tmp_path):
    _, path = tiny_hf
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(path / "model.safetensors"))
    del sd["vision_model.post_layernorm.bias"]
    sd["vision_model.extra_head.weight"] = np.zeros(3, np.float32)
    sd["text_projection.weight"] = np.zeros((7, 64), np.float32)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(sd, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(convert.CheckpointMismatchError) as err:
        convert.load_hf_clip(bad)
    msg = str(err.value)
    assert "missing keys (1): vision_model.post_layernorm.bias" in msg
    assert "unexpected keys (1): vision_model.extra_head.weight" in msg
    assert "text/text_projection: expected (64, 32), checkpoint has text_projection.weight (7, 64)" in msg


def test_missing_directory_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert.load_hf_clip(tmp_path)


def test_wrong_variant_for_open_clip(tmp_path):
    oc = reference.open_clip_model("test-tiny", seed=5)
    path = tmp_path / "oc.pt"
    torch.save(oc.state_dict(), path)
    with pytest.raises(convert.CheckpointMismatchError, match="shape mismatches"):
        convert.load_open_clip(path, "ViT-Ti/8@64")


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("new_grid", [5, 7, 3])
def test_position_embedding_resize_matches_torch_interpolate(rng, antialias, new_grid):
    pos = rng.standard_normal((1 + 4 * 4, 6)).astype(np.float32)
    ours = convert.resize_position_embedding(pos, new_grid, antialias=antialias)
    grid = torch.from_numpy(pos[1:].reshape(1, 4, 4, 6).transpose(0, 3, 1, 2))
    want = torch.nn.functional.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False,
                                           antialias=antialias)
    want = want[0].permute(1, 2, 0).reshape(-1, 6).numpy()
    np.testing.assert_array_equal(ours[0], pos[0])  # class token kept
    np.testing.assert_allclose(ours[1:], want, atol=1e-5)


def test_load_at_new_resolution_matches_hf_interpolate_pos_encoding(tiny_hf, rng):
    """B/16 at 320/448-style use: load at a larger image size; HF's own interpolation gives the same output."""
    hf, path = tiny_hf
    model = convert.load_hf_clip(path, image_size=96)
    assert model.visual.positional_embedding.shape == (1 + 6 * 6, 64)
    images = _images(rng, 2, 96)
    with torch.no_grad():
        want = hf.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                                     interpolate_pos_encoding=True).pooler_output.numpy()
    np.testing.assert_allclose(np.asarray(model.encode_image(jnp.asarray(images))), want, atol=1e-4, rtol=0)


def test_hf_config_json_round_trip(tiny_hf):
    _, path = tiny_hf
    hf_cfg = json.loads((path / "config.json").read_text())
    cfg = convert.config_from_hf(hf_cfg)
    assert cfg == get_config("test-tiny", logit_scale_init=cfg.logit_scale_init)


def _random_model(config, seed):
    """Our CLIP with random values in every parameter (biases and LayerNorm offsets included, as
    `reference.randomize_`), built shape-first: eager initialisation would compile every op."""
    from flax import nnx, traverse_util

    from harmoclip_jax.models.clip import abstract_model

    model = abstract_model(config)
    state = nnx.state(model, nnx.Param)
    gen = np.random.default_rng(seed)
    params = {}
    for key, leaf in traverse_util.flatten_dict(nnx.to_pure_dict(state)).items():
        noise = gen.standard_normal(leaf.shape).astype(np.float32)
        value = 1 + 0.1 * noise if key[-1] == "scale" else 2.6592 + 0.3 * noise if key[-1] == "logit_scale" \
            else 0.02 * noise
        params[key] = jnp.asarray(value)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(params))
    nnx.update(model, state)
    return model


def _structured_image(height, width):
    """uint8 RGB with gradients, stripes and a solid block (resizing has something to get wrong)."""
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([xx * 255 // max(width - 1, 1), (yy * 37) % 256, ((xx // 4 + yy // 4) % 2) * 255], -1)
    image = image.astype(np.uint8)
    image[height // 5:height // 2, width // 4:width // 2] = (250, 10, 40)
    return image


def test_hf_export_processor_matches_our_tokenizer_and_pipeline(tmp_path):
    """The export is a complete HF directory: CLIPProcessor + CLIPModel on raw texts and uint8 images give our
    token ids exactly and our features (our tokenizer/pipeline + our model) within 1e-4."""
    from harmoclip_jax.data.pipeline import decode_image
    from harmoclip_jax.testing.torch_compat import ensure_torch_reference_stack
    from harmoclip_jax.tokenizer import tokenize

    ensure_torch_reference_stack()
    from transformers import CLIPModel, CLIPProcessor

    config = get_config("test-tiny", text_context_length=32)  # model_max_length must follow the model
    model = _random_model(config, seed=11)
    out = convert.save_hf_clip(model, tmp_path / "export")
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "preprocessor_config.json"):
        assert (out / name).is_file(), name
    default = CLIPProcessor.from_pretrained(out)  # the default image backend (torchvision when installed) loads too
    assert default.tokenizer.model_max_length == 32
    # The PIL backend's resize is the pipeline's (PIL bicubic); torchvision's differs (see hf_image_processor_dict).
    processor = CLIPProcessor.from_pretrained(out, backend="pil")
    hf = CLIPModel.from_pretrained(out).eval()
    assert (hf.config.text_config.eos_token_id, hf.config.text_config.pad_token_id) == (49407, 0)

    texts = ["A photo of a CAT!!", "Hello, world... (it's) 3.14 & more?! :-)", "  two   DOGS\tplaying ",
             "<|endoftext|> isn't special here", "a very long caption about a dog, " * 12]
    encoded = processor(text=texts, padding="max_length", truncation=True, return_tensors="pt")
    ours_ids = tokenize(texts, context_length=32)
    assert encoded["input_ids"].shape == (len(texts), 32)
    np.testing.assert_array_equal(encoded["input_ids"].numpy(), ours_ids)
    with torch.no_grad():
        theirs = hf.get_text_features(**encoded)
    theirs = getattr(theirs, "pooler_output", theirs).numpy()
    ours = np.asarray(jax.jit(model.encode_text)(jnp.asarray(ours_ids)))
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)

    size = config.vision.image_size  # 64: one image is squashed wider, one shrunk, one kept
    images = [_structured_image(50, 80), _structured_image(100, 100), _structured_image(size, size)]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    want = np.stack([decode_image(image, size) for image in images])
    np.testing.assert_allclose(pixels.numpy().transpose(0, 2, 3, 1), want, atol=1e-5, rtol=0)
    with torch.no_grad():
        theirs = hf.get_image_features(pixel_values=pixels)
    theirs = getattr(theirs, "pooler_output", theirs).numpy()
    ours = np.asarray(jax.jit(model.encode_image)(jnp.asarray(want)))
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_hf_image_processor_dict_takes_mean_std_and_size():
    from harmoclip_jax.models.normalization import OPENAI_CLIP

    d = convert.hf_image_processor_dict(96)
    assert d["size"] == d["crop_size"] == {"height": 96, "width": 96} and d["do_center_crop"] is False
    np.testing.assert_array_equal(np.float32(d["image_mean"]), np.float32(OPENAI_CLIP[0]))
    np.testing.assert_array_equal(np.float32(d["image_std"]), np.float32(OPENAI_CLIP[1]))
    d = convert.hf_image_processor_dict(32, image_mean=(0.5, 0.5, 0.5), image_std=np.array([0.25, 0.5, 1.0]))
    assert (d["image_mean"], d["image_std"]) == ([0.5, 0.5, 0.5], [0.25, 0.5, 1.0])
    with pytest.raises(ValueError, match="one value per RGB channel"):
        convert.hf_image_processor_dict(32, image_mean=(0.5, 0.5))


def test_hf_export_refuses_a_tokenizer_that_does_not_fit(tmp_path):
    from harmoclip_jax.models.clip import abstract_model

    model = abstract_model(get_config("test-tiny", text_vocab_size=1000))
    with pytest.raises(ValueError, match="with_processor=False"):
        convert.save_hf_clip(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()  # checked before anything is written
