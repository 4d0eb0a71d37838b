"""Parity of our NNX CLIP with the real PyTorch libraries (transformers CLIPModel, open_clip CLIP), through the
checkpoint converters, plus export round trips and position-embedding resizing."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from harmoclip_jax.models import convert
from harmoclip_jax.models.variants import get_config
from harmoclip_jax.testing import reference

torch = pytest.importorskip("torch")  # dev requirement; CI installs it


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
