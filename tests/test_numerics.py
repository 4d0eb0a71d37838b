"""The gradient comparison the remat tests share (harmoclip_jax.testing.numerics): it passes float32 reassociation
and fails a wrong gradient."""
import numpy as np
import pytest

from harmoclip_jax.testing.numerics import assert_same_gradients


def test_reassociated_sums_pass_and_a_wrong_gradient_fails(rng):
    terms = rng.standard_normal((4096, 64)).astype(np.float32) * 10
    forward = {"w": terms.sum(0), "b": terms[:8].sum(0) * 1e-3}
    backward = {"w": terms[::-1].sum(0), "b": terms[7::-1].sum(0) * 1e-3}  # same sums, other order
    assert not np.array_equal(forward["w"], backward["w"])  # float32 rounding differs ...
    assert_same_gradients(backward, forward)  # ... within the bound
    wrong = {"w": forward["w"] - terms[0], "b": forward["b"]}  # one term dropped
    with pytest.raises(AssertionError):
        assert_same_gradients(wrong, forward)
    with pytest.raises(AssertionError):  # a leaf short
        assert_same_gradients({"w": forward["w"]}, forward)
