"""Box helpers: round trips, units, clipping, masks, enlargement; NumPy in -> NumPy out, JAX in -> JAX out."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harmoclip_jax.ops import boxes as bx

XYXY = np.array([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 224.0, 224.0], [-10.0, 200.0, 30.0, 250.0]], np.float32)


def test_format_round_trips_and_values():
    np.testing.assert_allclose(bx.xyxy_to_xywh(XYXY)[0], [10, 20, 40, 20])
    np.testing.assert_allclose(bx.xyxy_to_cxcywh(XYXY)[0], [30, 30, 40, 20])
    np.testing.assert_allclose(bx.xywh_to_xyxy(bx.xyxy_to_xywh(XYXY)), XYXY)
    np.testing.assert_allclose(bx.cxcywh_to_xyxy(bx.xyxy_to_cxcywh(XYXY)), XYXY)


def test_numpy_in_numpy_out_and_jax_traceable():
    out = bx.enlarge_boxes(XYXY, 1.5, (224, 224))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    jitted = jax.jit(lambda b: bx.enlarge_boxes(b, 1.5, (224, 224)))(jnp.asarray(XYXY))
    assert isinstance(jitted, jax.Array)
    np.testing.assert_allclose(np.asarray(jitted), out, rtol=1e-6)
    assert bx.pixels_to_grid(XYXY, 16).dtype == np.float32


def test_units():
    norm = bx.pixels_to_normalized(XYXY, (112, 224))  # (height, width)
    np.testing.assert_allclose(norm[0], [10 / 224, 20 / 112, 50 / 224, 40 / 112], rtol=1e-6)
    np.testing.assert_allclose(bx.normalized_to_pixels(norm, (112, 224)), XYXY, rtol=1e-6)
    np.testing.assert_allclose(bx.pixels_to_grid(XYXY, 16)[1], [0, 0, 14, 14])
    np.testing.assert_allclose(bx.grid_to_pixels(bx.pixels_to_grid(XYXY, 16), 16), XYXY)


def test_clip_area_and_masks():
    clipped = bx.clip_boxes(XYXY, (224, 224))
    np.testing.assert_allclose(clipped[2], [0, 200, 30, 224])
    np.testing.assert_allclose(bx.box_area(XYXY), [800, 224 * 224, 40 * 50])
    boxes = np.array([[0, 0, 10, 10], [5, 5, 5, 9], [-5, -5, 3, 3], [300, 0, 310, 5], [0, 0, 3, 20]], np.float32)
    np.testing.assert_array_equal(bx.valid_box_mask(boxes), [True, False, True, True, True])
    np.testing.assert_array_equal(bx.valid_box_mask(boxes, (224, 224)), [True, False, True, False, True])
    np.testing.assert_array_equal(bx.valid_box_mask(boxes, (224, 224), require_inside=True), [True, False, False, False, True])
    np.testing.assert_array_equal(bx.valid_box_mask(boxes, min_size=4), [True, False, True, True, False])
    with pytest.raises(ValueError, match="image_size"):
        bx.valid_box_mask(boxes, require_inside=True)


def test_enlarge_about_centre_and_clip():
    np.testing.assert_allclose(bx.enlarge_boxes(XYXY[:1], 1.5), [[0, 15, 60, 45]])
    np.testing.assert_allclose(bx.enlarge_boxes(XYXY[:1], 1.5, (224, 224)), [[0, 15, 60, 45]])
    np.testing.assert_allclose(bx.enlarge_boxes(XYXY[1:2], 1.5, (224, 224)), [[0, 0, 224, 224]])
    np.testing.assert_allclose(bx.enlarge_boxes(np.array([[0.0, 0, 20, 20]]), 1.5, (224, 224)), [[0, 0, 25, 25]])


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="last axis of size 4"):
        bx.xyxy_to_xywh(np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"\(height, width\)"):
        bx.clip_boxes(XYXY, (224,))
