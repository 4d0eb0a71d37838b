"""RoIAlign vs a loop port of torchvision's CPU kernel, plus grad/jit/vmap/dtype/chunking checks."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from harmoclip_jax.ops.roi_align import default_max_samples_per_bin, roi_align
from roi_align_reference import roi_align_reference

# One XLA program per configuration: much faster in tests than op-by-op eager dispatch.
jit_roi_align = jax.jit(roi_align, static_argnums=(2, 3, 4, 5), static_argnames=("max_samples_per_bin", "box_chunk_size"))

HEIGHT, WIDTH, SCALE = 5, 6, 1.0 / 16  # H != W catches swapped axes; boxes in pixels, grid = px / 16
MAP_W, MAP_H = WIDTH / SCALE, HEIGHT / SCALE


def _box_zoo(rng):
    """(2, 12, 4) pixel boxes: random inside, borders, partly/fully outside, zero-area, whole map."""
    def random_inside(n):
        xs = np.sort(rng.uniform(0, MAP_W, size=(n, 2)), axis=1)
        ys = np.sort(rng.uniform(0, MAP_H, size=(n, 2)), axis=1)
        return np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)

    special = np.array(
        [
            [0.0, 0.0, MAP_W, MAP_H],  # as large as the map
            [0.0, 10.0, 20.0, MAP_H],  # touching left and bottom borders
            [MAP_W - 7.0, 0.0, MAP_W, 9.0],  # thin box at the right border
            [-20.0, -12.0, 30.0, 25.0],  # partly outside (top-left)
            [MAP_W - 30.0, MAP_H - 20.0, MAP_W + 25.0, MAP_H + 10.0],  # partly outside (bottom-right)
            [-60.0, -40.0, -30.0, -20.0],  # fully outside, above-left
            [MAP_W + 20.0, 10.0, MAP_W + 50.0, 40.0],  # fully outside, right
            [33.0, 21.0, 33.0, 50.0],  # zero width
            [40.0, 17.0, 40.0, 17.0],  # a point
            [50.0, 40.0, 30.0, 20.0],  # inverted (negative extent)
            [-8.0, -8.0, -8.0 + 1e-3, 5.0],  # sliver near the -1 cell boundary
        ]
    )
    return np.stack([np.concatenate([special, random_inside(5)]), np.concatenate([random_inside(11), special[:5]])]).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def features():
    return np.random.default_rng(1).normal(size=(2, HEIGHT, WIDTH, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def boxes():
    return _box_zoo(np.random.default_rng(2))


@pytest.mark.parametrize(
    "output_size,sampling_ratio,aligned", list(itertools.product([(1, 1), (7, 7)], [-1, 1, 2], [True, False]))
)
def test_matches_torchvision_reference(features, boxes, output_size, sampling_ratio, aligned):
    expected = roi_align_reference(features, boxes, output_size, SCALE, sampling_ratio, aligned)
    got = jit_roi_align(features, boxes, output_size, SCALE, sampling_ratio, aligned)
    assert got.shape == (2, 16, *output_size, 3)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)
    # the zoo's degenerate boxes really give torchvision's zeros, not garbage
    assert not np.isnan(np.asarray(got)).any()


def test_randomized_sweep_other_scale_and_rectangular_output():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(3, 4, 7, 2)).astype(np.float32)
    scale = 1.0 / 14  # not a power of two: coordinates round like torchvision's float32 math
    for trial in range(2):
        centre = rng.uniform(-1, 8, size=(3, 6, 2)) / scale
        size = rng.uniform(0, 4, size=(3, 6, 2)) / scale
        bxs = np.concatenate([centre - size / 2, centre + size / 2], axis=-1)[..., [0, 1, 2, 3]].astype(np.float32)
        for out, sr, aligned in [((2, 3), -1, True), ((3, 1), -1, False), ((2, 2), 3, True)]:
            expected = roi_align_reference(feats, bxs, out, scale, sr, aligned)
            got = jit_roi_align(feats, bxs, out, scale, sr, aligned)
            np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, err_msg=f"trial {trial} {out} {sr} {aligned}")


def test_boxes_larger_than_map_exact_with_enough_samples_and_clamped_past_the_bound(features):
    huge = np.array([[[-100.0, -80.0, 2 * MAP_W, 2 * MAP_H]]] * 2, np.float32)  # needs 15 (y) x 19 (x) samples
    expected = roi_align_reference(features, huge, (1, 1), SCALE, -1, True)
    exact = jit_roi_align(features, huge, (1, 1), SCALE, -1, True, max_samples_per_bin=(15, 19))
    np.testing.assert_allclose(np.asarray(exact), expected, atol=1e-5)
    # Past the bound the sample grid is clamped to the bound: identical to a fixed sampling_ratio.
    clamped = jit_roi_align(features, huge, (1, 1), SCALE, -1, True, max_samples_per_bin=4)
    fixed = roi_align_reference(features, huge, (1, 1), SCALE, 4, True)
    np.testing.assert_allclose(np.asarray(clamped), fixed, atol=1e-5)
    assert not np.allclose(np.asarray(clamped), expected, atol=1e-3)  # so it is a different (approximate) answer
    assert default_max_samples_per_bin((HEIGHT, WIDTH), (1, 1)) == (HEIGHT + 1, WIDTH + 1)


def test_gradients_match_finite_differences(features, boxes):
    feats = jnp.asarray(features[:, :, :, :2])
    for output_size, sr, aligned in [((1, 1), -1, True), ((2, 3), 2, False)]:
        fn = jax.jit(lambda f: roi_align(f, boxes, output_size, SCALE, sr, aligned))
        check_grads(fn, (feats,), order=1, modes=("rev", "fwd"), atol=1e-2, rtol=1e-2)


def test_gradient_equals_reference_adjoint(features, boxes):
    """The op is linear in features: <roi_align(F), G> must equal <F, grad>, with grad from jax."""
    cotangent = np.random.default_rng(4).normal(size=(2, 16, 7, 7, 3)).astype(np.float32)
    grad = jax.grad(lambda f: jnp.sum(roi_align(f, boxes, (7, 7), SCALE, -1, True) * cotangent))(features)
    forward = roi_align_reference(features, boxes, (7, 7), SCALE, -1, True)
    np.testing.assert_allclose(np.sum(np.asarray(grad) * features), np.sum(forward * cotangent), rtol=1e-4)


def test_backward_has_no_gather_or_scatter(features, boxes):
    for chunk in (None, 5):
        loss = lambda f: jnp.sum(roi_align(f, boxes, (7, 7), SCALE, -1, True, box_chunk_size=chunk) ** 2)  # noqa: E731
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(features))
        assert "gather" not in jaxpr and "scatter" not in jaxpr


def test_vmap_and_jit_and_chunking_agree(features, boxes):
    direct = jit_roi_align(features, boxes, (7, 7), SCALE)
    stacked = jax.vmap(lambda f, b: roi_align(f, b, (7, 7), SCALE))(jnp.stack([features, -features]), jnp.stack([boxes, boxes]))
    np.testing.assert_allclose(np.asarray(stacked[0]), np.asarray(direct), atol=1e-5)
    np.testing.assert_allclose(np.asarray(stacked[1]), -np.asarray(direct), atol=1e-5)
    for chunk in (5, 8):  # 16 boxes: an uneven and an exact split
        chunked = jax.jit(lambda f, b: roi_align(f, b, (7, 7), SCALE, box_chunk_size=chunk))(features, boxes)
        np.testing.assert_allclose(np.asarray(chunked), np.asarray(direct), atol=1e-5)


def test_bfloat16_inputs(features, boxes):
    expected = roi_align_reference(features, boxes, (7, 7), SCALE, -1, True)
    got = roi_align(jnp.asarray(features, jnp.bfloat16), boxes, (7, 7), SCALE)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=3e-2, rtol=2e-2)
    grad = jax.grad(lambda f: jnp.sum(roi_align(f, boxes, (1, 1), SCALE).astype(jnp.float32)))(
        jnp.asarray(features, jnp.bfloat16)
    )
    assert grad.dtype == jnp.bfloat16 and np.isfinite(np.asarray(grad, np.float32)).all()


def test_bad_inputs_raise_clear_errors(features, boxes):
    with pytest.raises(ValueError, match=r"features must be \(B, H, W, C\)"):
        roi_align(features[0], boxes)
    with pytest.raises(ValueError, match=r"boxes must be \(B, T, 4\)"):
        roi_align(features, boxes[..., :3])
    with pytest.raises(ValueError, match="batch"):
        roi_align(features, boxes[:1])
    with pytest.raises(ValueError, match="output_size"):
        roi_align(features, boxes, (0, 2))


def test_large_outputs_take_two_matmuls_and_still_match_the_reference():
    """Crops (output as large as the map) contract one axis at a time; same numbers, same gradient rule."""
    from harmoclip_jax.ops.roi_align import _two_matmuls_are_cheaper

    rng = np.random.default_rng(7)
    feats = rng.normal(size=(2, 12, 10, 3)).astype(np.float32)
    xs, ys = np.sort(rng.uniform(-2, 10 * 8 + 2, (2, 5, 2)), -1), np.sort(rng.uniform(-2, 12 * 8 + 2, (2, 5, 2)), -1)
    crops = np.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], -1).astype(np.float32)
    assert _two_matmuls_are_cheaper((24, 24), (12, 10), 3) and not _two_matmuls_are_cheaper((7, 7), (14, 14), 768)
    for sampling_ratio, aligned in [(1, True), (-1, True), (2, False)]:
        expected = roi_align_reference(feats, crops, (24, 24), 1 / 8, sampling_ratio, aligned)
        got = jit_roi_align(feats, crops, (24, 24), 1 / 8, sampling_ratio, aligned)
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)
    cotangent = rng.normal(size=(2, 5, 24, 24, 3)).astype(np.float32)
    grad = jax.grad(lambda f: jnp.sum(roi_align(f, crops, (24, 24), 1 / 8, 1, True) * cotangent))(feats)
    forward = roi_align_reference(feats, crops, (24, 24), 1 / 8, 1, True)
    np.testing.assert_allclose(np.sum(np.asarray(grad) * feats), np.sum(forward * cotangent), rtol=1e-4)
