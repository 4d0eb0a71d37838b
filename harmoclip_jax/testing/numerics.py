"""Comparing two float32 computations of the same values that XLA may fuse and order differently."""
from __future__ import annotations

import jax
import numpy as np


def assert_same_gradients(actual, desired, *, rtol: float = 1e-5, atol: float = 1e-6,
                          atol_of_max: float = 1e-6) -> None:
    """Each leaf of `actual` equals `desired`'s to `rtol`, and to `atol` or `atol_of_max` x the leaf's largest
    magnitude, whichever is larger.

    Rematerialisation recomputes the forward pass inside the backward pass; XLA fuses the recomputation differently
    and so rounds each float32 gradient sum (over the batch, tokens and channels) differently. How much depends on the
    XLA version: jax 0.10's XLA stays within 1e-6 absolute on the test models, jax 0.12's reaches 1.1e-5 on SigLIP's
    gradients of magnitude ~75 (1.5e-7 of the largest: about one float32 ulp there; 3.6e-7 on CLIP's). 1e-6 of a
    leaf's largest magnitude is ~8 ulps of it, far below what a wrong gradient (a stop-gradient, a dropped term)
    gives: differences of the order of the values themselves."""
    actual_leaves, desired_leaves = jax.tree.leaves(actual), jax.tree.leaves(desired)
    assert len(actual_leaves) == len(desired_leaves), (len(actual_leaves), len(desired_leaves))
    for a, d in zip(actual_leaves, desired_leaves):
        a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
        scale = float(np.max(np.abs(d))) if d.size else 0.0
        np.testing.assert_allclose(a, d, rtol=rtol, atol=max(atol, atol_of_max * scale))
