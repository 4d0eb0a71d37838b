"""Box classification: each labelled box's RoIAlign region embedding vs class text embeddings.

Class embeddings come from prompt templates (a ViLD-style ensemble: each template's embedding L2-normalised,
averaged over templates, renormalised), recomputed from the CURRENT text tower at every eval. Reports top-1/top-5
as per-class mean (FineCLIP's "mAcc", over classes present) and micro (per box), and the thing/stuff split of the
per-class mean when the dataset's metadata has `is_thing` (COCO panoptic), and the base/novel split when it has
`is_novel` (open-vocabulary splits).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from harmoclip_jax.evaluators.common import EvalContext, class_metadata, collect, l2_normalize

# Prompt templates in the style of ViLD's ensemble ("a photo of a {}.", "There is a {} in the scene.", ...).
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "There is a {} in the scene.",
    "There is the {} in the scene.",
    "This is a {} in the scene.",
    "This is the {} in the scene.",
    "This is one {} in the scene.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of the {}.",
    "a good photo of a {}.",
    "itap of a {}.",
    "a photo of one {}.",
)


def box_classification_metrics(scores: np.ndarray, labels: np.ndarray, is_thing: Sequence[bool] | None = None,
                               ks: Sequence[int] = (1, 5), is_novel: Sequence[bool] | None = None) -> dict[str, float]:
    """Top-k accuracies of per-box class scores.

    Args:
      scores: (R, C) class scores per box (higher = more likely); labels: (R,) ints in [0, C).
      is_thing: optional (C,) bools; adds the per-class mean over thing and over stuff classes.
      is_novel: optional (C,) bools; adds the per-class mean over base and over novel classes.
    Returns:
      `top{k}` (mean over the classes that occur of the per-class accuracy), `top{k}_micro` (over boxes),
      `top{k}_thing` / `top{k}_stuff` and `top{k}_base` / `top{k}_novel` (each only when a class of the group
      occurs). A box is a hit at k if fewer than k classes score at least as high as its
      true class (ties count against it).
    """
    scores = np.asarray(scores, np.float32)
    labels = np.asarray(labels, np.int64)
    r, c = scores.shape
    if labels.shape != (r,) or (r and (labels.min() < 0 or labels.max() >= c)):
        raise ValueError(f"labels must be ({r},) class indices in [0, {c})")
    if r == 0:
        raise ValueError("box classification needs at least one labelled box")
    true = scores[np.arange(r), labels]
    rank = (scores >= true[:, None]).sum(1) - 1
    present = np.bincount(labels, minlength=c) > 0
    is_thing = class_flags(is_thing, c, "is_thing")
    is_novel = class_flags(is_novel, c, "is_novel")
    out = {}
    for k in ks:
        hit = (rank < k).astype(np.float64)
        per_class = np.bincount(labels, weights=hit, minlength=c) / np.maximum(np.bincount(labels, minlength=c), 1)
        out[f"top{k}"] = float(per_class[present].mean())
        out[f"top{k}_micro"] = float(hit.mean())
        for flags, names in ((is_thing, ("thing", "stuff")), (is_novel, ("novel", "base"))):
            if flags is None:
                continue
            for name, group in zip(names, (flags, ~flags)):
                if (present & group).any():
                    out[f"top{k}_{name}"] = float(per_class[present & group].mean())
    return out


def class_flags(flags: Sequence[bool] | None, num_classes: int, name: str) -> np.ndarray | None:
    """Per-class metadata flags (`is_thing`, `is_novel`) as a (C,) bool array, checked; None stays None."""
    if flags is None:
        return None
    out = np.asarray(flags, bool)
    if out.shape != (num_classes,):
        raise ValueError(f"{name} must have one entry per class ({num_classes}), got {out.shape}")
    return out


def class_embeddings(encode_texts, params, class_names: Sequence[str], templates: Sequence[str], tokenize,
                     multiple: int) -> np.ndarray:
    """(C, E) normalised prompt-ensemble embeddings (see module doc). `multiple` pads the text batch for sharding."""
    from harmoclip_jax.sharding import to_host

    texts = [t.format(name) for name in class_names for t in templates]
    tokens = tokenize(texts)
    pad = (-len(tokens)) % multiple
    tokens = np.concatenate([tokens, np.repeat(tokens[:1], pad, axis=0)])
    embed = to_host(encode_texts(params, tokens))[: len(texts)]
    mean = l2_normalize(embed).reshape(len(class_names), len(templates), -1).mean(1)
    return l2_normalize(mean)


class BoxClassificationEvaluator:
    """Classifies every labelled box of an eval split (boxes as given, not enlarged) into the dataset's classes."""

    def __init__(self, name: str, eval_config, context: EvalContext):
        self.name = name
        self.config = eval_config
        self.context = context
        self.class_names, meta = class_metadata(name, eval_config, context, "box classification needs a labelled "
                                                "dataset (e.g. scenes, coco_panoptic_boxes)")
        self.is_thing = meta.get("is_thing") or None
        self.is_novel = meta.get("is_novel") or None
        self.templates = tuple(eval_config.get("templates") or DEFAULT_TEMPLATES)

    def run(self, params) -> dict[str, float]:
        ctx = self.context
        classes = class_embeddings(ctx.fns.encode_texts, params, self.class_names, self.templates, ctx.fns.tokenize,
                                   ctx.mesh.size)
        rows = collect(ctx, self.config, params,
                       lambda p, batch: {"region": ctx.fns.encode_regions(p, batch["image"], batch["boxes"])},
                       keep=("box_mask", "label"))
        valid = rows["box_mask"].astype(bool) & (rows["label"] >= 0)
        regions = rows["region"][valid]
        regions = l2_normalize(regions)
        metrics = box_classification_metrics(regions @ classes.T, rows["label"][valid], self.is_thing,
                                             is_novel=self.is_novel)
        metrics["num_boxes"] = float(valid.sum())
        return metrics
