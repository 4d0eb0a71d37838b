"""The optax optimizer from `config.optim`: AdamW with a weight-decay mask, warmup + cosine, clipping, freezing.

Parameters are addressed by their '/'-joined path in the params dict ('text/transformer/blocks/0/attn/qkv/kernel',
'logit_scale'). Frozen parameters (the backbone's text tower when `config.optim.freeze_text_tower`, and whatever
the `config.optim.freeze` regexes match in full) get no update, no optimizer state and no gradient computation.
Weight decay skips the backbone's `no_decay` parameters, those `config.optim.no_decay` matches, and every array
with fewer than 2 dimensions (biases, LayerNorm scales, logit_scale).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import ml_collections
import optax

from harmoclip_jax.models.backbone import Backbone
from harmoclip_jax.sharding import path_str


def _matcher(patterns: Sequence[str]):
    compiled = [re.compile(p) for p in patterns]
    return lambda name: any(r.fullmatch(name) for r in compiled)


def trainable_mask(params: Any, freeze: Sequence[str]) -> Any:
    """Tree of bools: True where the parameter is trained (matches no `freeze` regex)."""
    frozen = _matcher(freeze)
    return jax.tree_util.tree_map_with_path(lambda p, _: not frozen(path_str(p)), params)


def decay_mask(params: Any, no_decay: Sequence[str]) -> Any:
    """Tree of bools: True where weight decay applies (>= 2-D and not matched by `no_decay`)."""
    excluded = _matcher(no_decay)
    return jax.tree_util.tree_map_with_path(lambda p, x: len(x.shape) >= 2 and not excluded(path_str(p)), params)


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine (or constant) to `lr * end_lr_fraction`."""
    warmup = min(int(optim.warmup_steps), total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr_fraction)
    elif optim.schedule == "constant":
        after = optax.constant_schedule(optim.lr)
    else:
        raise ValueError(f"config.optim.schedule={optim.schedule!r}; use 'cosine' or 'constant'")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup])


def parameter_rules(optim: ml_collections.ConfigDict, backbone: Backbone) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(freeze, no_decay) regexes of `config.optim` for a model of `backbone`'s family."""
    freeze = tuple(optim.freeze) + ((backbone.text_tower_regex,) if optim.freeze_text_tower else ())
    return freeze, tuple(backbone.no_decay) + tuple(optim.no_decay)


def make_optimizer(optim: ml_collections.ConfigDict, params: Any, total_steps: int, backbone: Backbone
                   ) -> tuple[optax.GradientTransformation, optax.Schedule, Any]:
    """Returns (transformation, learning-rate schedule, trainable mask) for `params` (arrays or shapes)."""
    schedule = learning_rate_schedule(optim, total_steps)
    freeze, no_decay = parameter_rules(optim, backbone)
    train = trainable_mask(params, freeze)
    if not any(jax.tree.leaves(train)):
        raise ValueError(f"config.optim.freeze={list(optim.freeze)} with freeze_text_tower={optim.freeze_text_tower} "
                         "freezes every parameter; nothing to train")
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                        mask=decay_mask(params, no_decay))
    parts = [optax.clip_by_global_norm(optim.grad_clip_norm)] if optim.grad_clip_norm else []
    labels = jax.tree.map(lambda t: "train" if t else "frozen", train)
    tx = optax.multi_transform({"train": optax.chain(*parts, adamw), "frozen": optax.set_to_zero()}, labels)
    return tx, schedule, train


def count(params: Any, mask: Any | None = None) -> int:
    """Number of scalars in `params` (where `mask` is True, if given)."""
    leaves = jax.tree.leaves(params)
    flags = jax.tree.leaves(mask) if mask is not None else [True] * len(leaves)
    return int(sum(int(x.size) if hasattr(x, "size") else 0 for x, f in zip(leaves, flags) if f))
