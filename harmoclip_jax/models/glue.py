"""Between the two forms of a model: an NNX module (what computes) and a pure dict of parameters (what jitted
functions, optimizers and checkpoints hold). Family-agnostic: every function takes the family's `Backbone`."""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from harmoclip_jax.models.backbone import Backbone
from harmoclip_jax.models.normalization import normalize_pixels
from harmoclip_jax.ops.resize import resize_from_canvas
from harmoclip_jax.sharding import path_str


def abstract_model(backbone: Backbone, config: Any) -> nnx.Module:
    """The model with ShapeDtypeStructs instead of arrays (no memory, no compute)."""
    return nnx.eval_shape(lambda: backbone.model_class(config, rngs=_shape_only_rngs()))


def _shape_only_rngs() -> nnx.Rngs:
    """`nnx.Rngs(0)` with NumPy draw counters, for `abstract_model` only.

    Under tracing, each draw from flax's jax counter reads the new counter's `.sharding`, which on a tracer builds an
    error message that walks the whole trace so far: quadratic in the number of parameters (ViT-B/16 2.1 s, SigLIP
    So400m 7.9 s). A NumPy counter is plain Python arithmetic (0.5 s, 1.5 s). Its draws are not the seeded ones
    (flax reads the counter by reference), which is harmless here: only shapes and dtypes come out.
    """
    rngs = nnx.Rngs(0)
    for _, stream in rngs.items():
        stream.count.set_raw_value(np.zeros(np.shape(stream.count.get_raw_value()), np.uint32))
    return rngs


def abstract_params(backbone: Backbone, config: Any) -> dict:
    """The pure params dict of ShapeDtypeStructs."""
    return nnx.to_pure_dict(nnx.state(abstract_model(backbone, config), nnx.Param))


def param_shapes(backbone: Backbone, config: Any) -> dict[tuple, tuple]:
    """{flat parameter path: shape} of a model of `config`: what a converter checks a checkpoint against."""
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract_params(backbone, config)).items()}


def params_of(model: nnx.Module) -> dict:
    """A model's parameters as a pure dict."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def model_from_params(backbone: Backbone, config: Any, params: Mapping) -> nnx.Module:
    """A model of `config` holding `params` (a nested pure dict, or a flat dict keyed by path tuples), built
    without initialising weights that would be thrown away."""
    if params and all(isinstance(k, tuple) for k in params):
        params = traverse_util.unflatten_dict(dict(params))
    model = abstract_model(backbone, config)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def count_params(model_or_params: Any) -> int:
    """Number of parameter scalars of a model or a params tree."""
    tree = nnx.state(model_or_params, nnx.Param) if isinstance(model_or_params, nnx.Module) else model_or_params
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


class ModelGlue:
    """Converts between the pure params dict (what training state holds) and the family's module, inside jit."""

    def __init__(self, backbone: Backbone, config: Any):
        self.backbone = backbone
        self.config = config
        self.graphdef, abstract_state = nnx.split(abstract_model(backbone, config))
        self.abstract_params = nnx.to_pure_dict(abstract_state)
        self._treedef = jax.tree.structure(abstract_state)
        # unflatten(leaves(params)) below relies on both trees listing leaves in the same order.
        state_paths = [path_str(p).removesuffix("/value")
                       for p, _ in jax.tree_util.tree_flatten_with_path(abstract_state)[0]]
        dict_paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(self.abstract_params)[0]]
        if state_paths != dict_paths:
            raise RuntimeError("nnx state and its pure dict flatten in different orders; update ModelGlue")

    def merge(self, params: Any) -> nnx.Module:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self._treedef, jax.tree.leaves(params)))

    def init_params(self, seed: int) -> Any:
        return params_of(self.backbone.model_class(self.config, rngs=nnx.Rngs(seed)))

    def model_images(self, images: jax.Array, image_hw: jax.Array | None = None) -> jax.Array:
        """A batch's images as the model takes them: uint8 pixels (`config.data.image_dtype="uint8"`) normalised
        here, on the device, with the family's mean/std; float images arrive normalised by the host pipeline.
        With `image_hw` the uint8 images are pictures on a canvas (`config.data.resize_canvas`), squashed to the
        model's input size here first."""
        if images.dtype != jnp.uint8:
            return images
        if image_hw is not None:
            images = resize_from_canvas(images, image_hw, self.config.vision.image_size)
        return normalize_pixels(images, self.backbone.image_mean, self.backbone.image_std)

    @property
    def patch_size(self) -> int:
        """The stride, in input pixels, of the dense features."""
        return self.config.vision.patch_size

    @property
    def image_tower(self) -> str:
        return self.backbone.image_tower
