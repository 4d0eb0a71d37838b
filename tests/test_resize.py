"""Device-side resize (`ops/resize.py`, `config.data.resize_canvas`) against PIL's own bicubic resize, and the
pipeline path that uses it: canvas batches squashed on the device are the host-squashed batches."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from harmoclip_jax.data import pipeline, scenes
from harmoclip_jax.ops.resize import resize_from_canvas


def _pil_squash(picture: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(picture).resize((size, size), Image.BICUBIC), np.int32)


@pytest.mark.parametrize("size", [16, 37])
def test_resize_from_canvas_is_pils_bicubic(rng, size):
    """Down- and upscaling, square and not, with the picture smaller than its canvas (zeros around it must not leak
    in): every pixel equals PIL's `resize(BICUBIC)` up to 1 level, nearly all exactly. Smooth pictures plus noise,
    so edges and overshoot (the clipped uint8 intermediate) both occur."""
    canvas = 96
    shapes = [(96, 96), (60, 80), (37, 37), (20, 90), (9, 13), (size, size)]
    pictures, hw = [], []
    batch = np.zeros((len(shapes), canvas, canvas, 3), np.uint8)
    for i, (h, w) in enumerate(shapes):
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = 127 + 100 * np.sin(xx[..., None] / 5.0 + np.arange(3)) * np.cos(yy[..., None] / 7.0)
        picture = np.clip(smooth + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        picture[h // 3: h // 2, w // 4: w // 2] = 255  # a hard edge: bicubic overshoot, clipped in between
        batch[i, :h, :w] = picture
        pictures.append(picture)
        hw.append((h, w))
    out = np.asarray(jax.jit(resize_from_canvas, static_argnums=2)(jnp.asarray(batch), jnp.asarray(hw), size))
    assert out.shape == (len(shapes), size, size, 3)
    for i, picture in enumerate(pictures):
        want = _pil_squash(picture, size)
        diff = np.abs(out[i].astype(np.int32) - want)
        assert diff.max() <= 1, (shapes[i], diff.max())
        assert (diff == 0).mean() >= 0.995, (shapes[i], (diff == 0).mean())


def test_canvas_decode_plus_device_resize_is_the_host_decode():
    """decode_to_canvas (JPEG draft, picture at the top-left) + resize_from_canvas = decode_image(uint8), and a
    picture larger than the canvas is squashed on the host instead (height, width = size)."""
    scene = scenes.generate_example(0, "train", 1, 200)
    buffer = io.BytesIO()
    Image.fromarray(scene.image).resize((200, 150), Image.BICUBIC).save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    size = 48
    host = pipeline.decode_image(jpeg, size, dtype="uint8").astype(np.int32)
    canvas, hw = pipeline.decode_to_canvas(jpeg, size, 128)
    assert canvas.shape == (128, 128, 3) and canvas.dtype == np.uint8
    assert tuple(hw) == (75, 100)  # JPEG draft: decoded at 1/2 scale, still covering 48 x 48
    assert not canvas[75:].any() and not canvas[:, 100:].any()
    device = np.asarray(resize_from_canvas(jnp.asarray(canvas[None]), jnp.asarray(hw[None]), size))[0]
    assert np.abs(device.astype(np.int32) - host).max() <= 1
    small_canvas, small_hw = pipeline.decode_to_canvas(jpeg, size, 60)  # 100 px wide: does not fit
    assert tuple(small_hw) == (size, size)
    np.testing.assert_array_equal(small_canvas[:size, :size], host.astype(np.uint8))
    same = np.asarray(resize_from_canvas(jnp.asarray(small_canvas[None]), jnp.asarray(small_hw[None]), size))[0]
    np.testing.assert_array_equal(same, host)  # scale 1: the identity


def test_train_batches_with_resize_canvas_match_host_resized_batches(tmp_path):
    """The same training stream with `resize_canvas`: canvases + image_hw whose device squash is the host batch
    (to 1 level), every other key identical; the config check names both fields."""
    from harmoclip_jax import config_lib

    config = pipeline.default_data_config()
    config.dataset, config.image_size, config.batch_size, config.image_dtype = "scenes/tiny", 32, 4, "uint8"
    host_iter = pipeline.make_train_iterator(config, data_dir=str(tmp_path), process_index=0, process_count=1)
    config.resize_canvas = 64
    canvas_iter = pipeline.make_train_iterator(config, data_dir=str(tmp_path), process_index=0, process_count=1)
    try:
        for _ in range(2):
            host, canvas = next(host_iter), next(canvas_iter)
            assert canvas["image"].shape == (4, 64, 64, 3) and canvas["image_hw"].dtype == np.int32
            assert set(canvas) == set(host) | {"image_hw"}
            for key in host:
                if key != "image":
                    np.testing.assert_array_equal(canvas[key], host[key], err_msg=key)
            squashed = np.asarray(resize_from_canvas(jnp.asarray(canvas["image"]), jnp.asarray(canvas["image_hw"]),
                                                     32))
            assert np.abs(squashed.astype(np.int32) - host["image"].astype(np.int32)).max() <= 1
    finally:
        host_iter.close()
        canvas_iter.close()
    full = config_lib.base_config("harmoclip")
    full.data.resize_canvas = 448
    with pytest.raises(ValueError, match="resize_canvas=448 needs config.data.image_dtype='uint8'"):
        config_lib.validate(full)


def test_train_source_leaves_segmentation_undecoded(tmp_path):
    """Training never reads `segmentation`: its source leaves the zlib mask as stored (eval decodes it)."""
    decoded = pipeline.open_source("scenes/tiny", "train", str(tmp_path))[0]["segmentation"]
    assert isinstance(decoded, np.ndarray) and decoded.ndim == 2
    raw = pipeline.open_source("scenes/tiny", "train", str(tmp_path),
                               undecoded=pipeline.TRAIN_UNREAD_FEATURES)[0]["segmentation"]
    assert isinstance(raw, dict) and isinstance(raw["value"], bytes)  # TFDS's stored form: shape + zlib bytes
