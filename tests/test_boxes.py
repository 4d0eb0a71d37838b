"""Box helpers: round trips, units, clipping, validity, enlargement; NumPy in -> NumPy out, JAX in -> JAX out."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harmoclip_jax.ops import boxes as bx

XYXY = np.array([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 224.0, 224.0], [-10.0, 200.0, 30.0, 250.0]], np.float32)


def test_format_round_trips_and_values():
    np.testing.assert_allclose(bx.xywh_to_xyxy(np.array([[10.0, 20, 40, 20]])), XYXY[:1])
    np.testing.assert_allclose(bx.xyxy_to_cxcywh(XYXY)[0], [30, 30, 40, 20])
    np.testing.assert_allclose(bx.cxcywh_to_xyxy(bx.xyxy_to_cxcywh(XYXY)), XYXY)


def test_numpy_in_numpy_out_and_jax_traceable():
    out = bx.enlarge_boxes(XYXY, 1.5, (224, 224))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    jitted = jax.jit(lambda b: bx.enlarge_boxes(b, 1.5, (224, 224)))(jnp.asarray(XYXY))
    assert isinstance(jitted, jax.Array)
    np.testing.assert_allclose(np.asarray(jitted), out, rtol=1e-6)
    assert bx.pixels_to_normalized(XYXY, (224, 224)).dtype == np.float32


def test_units():
    norm = bx.pixels_to_normalized(XYXY, (112, 224))  # (height, width)
    np.testing.assert_allclose(norm[0], [10 / 224, 20 / 112, 50 / 224, 40 / 112], rtol=1e-6)
    np.testing.assert_allclose(bx.normalized_to_pixels(norm, (112, 224)), XYXY, rtol=1e-6)


def test_clip():
    clipped = bx.clip_boxes(XYXY, (224, 224))
    np.testing.assert_allclose(clipped[2], [0, 200, 30, 224])


def test_box_faults_reports_the_first_broken_rule():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 5, 9], [-0.4, 0, 3, 20], [-5, -5, 3, 3], [300, 0, 310, 5],
                      [0, np.nan, 3, 3], [np.inf, 0, np.inf, 3], [9, 9, 5, 300], [0, 0, 0.5, 5]], np.float32)
    expected = [bx.OK, bx.EMPTY, bx.OK, bx.OUTSIDE, bx.OUTSIDE, bx.NON_FINITE, bx.NON_FINITE, bx.EMPTY, bx.TOO_SMALL]
    faults = bx.box_faults(boxes, (224, 224), tolerance=0.5, min_size=1)
    assert isinstance(faults, np.ndarray)
    np.testing.assert_array_equal(faults, expected)
    jitted = jax.jit(lambda b: bx.box_faults(b, (224, 224), tolerance=0.5, min_size=1))(jnp.asarray(boxes))
    np.testing.assert_array_equal(np.asarray(jitted), expected)
    # Without min_size or tolerance: only emptiness and the image's edges count.
    np.testing.assert_array_equal(bx.box_faults(boxes[[0, 2, 8]], (224, 224)), [bx.OK, bx.OUTSIDE, bx.OK])


def test_enlarge_about_centre_and_clip():
    np.testing.assert_allclose(bx.enlarge_boxes(XYXY[:1], 1.5), [[0, 15, 60, 45]])
    np.testing.assert_allclose(bx.enlarge_boxes(XYXY[:1], 1.5, (224, 224)), [[0, 15, 60, 45]])
    np.testing.assert_allclose(bx.enlarge_boxes(XYXY[1:2], 1.5, (224, 224)), [[0, 0, 224, 224]])
    np.testing.assert_allclose(bx.enlarge_boxes(np.array([[0.0, 0, 20, 20]]), 1.5, (224, 224)), [[0, 0, 25, 25]])


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="last axis of size 4"):
        bx.xywh_to_xyxy(np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"\(height, width\)"):
        bx.clip_boxes(XYXY, (224,))
