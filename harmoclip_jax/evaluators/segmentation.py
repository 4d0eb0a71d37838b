"""Zero-shot semantic segmentation, MaskCLIP-style: every patch feature vs the class text embeddings.

Per image: the dense patch features (`encode_dense`, (h, w, E) in the joint space) are L2-normalised and scored
against the prompt-ensemble class embeddings of the CURRENT text tower (`box_classification.class_embeddings`, the
same 18 templates); the (h, w, C) cosine logits are upsampled bilinearly (half-pixel centres, as PyTorch's
`align_corners=False`) to the mask resolution and the argmax is the predicted class of each pixel. That runs on
the device; the confusion matrix is accumulated on the host over the whole split.

Conventions:
- Resolution: masks are compared at the model input resolution S x S (the eval pipeline squashes each record's
  mask to S x S with NEAREST resampling, exactly as it squashes the image), not at the image's own resolution.
- Ignored pixels: pixels labelled 255 (`features.SEGMENTATION_IGNORE`: background, void, no class) are not counted,
  neither as ground truth nor as prediction: the prediction there is discarded. A class is never "background"; the
  metric asks which class each labelled (object / stuff) pixel belongs to. Scenes masks have 255 everywhere outside
  the objects, so on Scenes this is "which class is each object pixel", as MaskCLIP does for void.
- mIoU (`segmentation_metrics`): IoU_c = TP_c / (TP_c + FP_c + FN_c) over the counted pixels; the mean runs over the
  classes with a defined IoU, i.e. present in the ground truth OR predicted on some counted pixel (mmseg's
  `nanmean`): a class predicted but absent from the ground truth counts with IoU 0, a class absent from both is left
  out. `pixel_acc` is correct counted pixels / counted pixels (mmseg's aAcc).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np

from harmoclip_jax import sharding
from harmoclip_jax.data.features import SEGMENTATION_IGNORE
from harmoclip_jax.evaluators.box_classification import DEFAULT_TEMPLATES, class_embeddings, class_flags
from harmoclip_jax.evaluators.common import EvalContext, class_metadata, eval_batches, eval_data_config, record_order
from harmoclip_jax.ops import dense as dense_ops


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     ignore: int = SEGMENTATION_IGNORE) -> np.ndarray:
    """(C, C) int64 pixel counts, rows = ground-truth class, columns = predicted class.

    Args:
      pred: int array of predicted classes, any shape; gt: the same shape, classes in [0, C) or `ignore`.
    Pixels whose ground truth is `ignore` are left out (whatever was predicted there). Raises on a ground-truth
    class outside [0, C) other than `ignore`, or a predicted class outside [0, C).
    """
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same number of pixels, got {pred.size} and {gt.size}")
    keep = gt != ignore
    pred, gt = pred[keep], gt[keep]
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        bad = np.unique(gt[(gt < 0) | (gt >= num_classes)])
        raise ValueError(f"ground-truth classes {bad.tolist()} outside [0, {num_classes}) and not the ignore label "
                         f"{ignore}: the mask does not match the dataset's class list")
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted classes must be in [0, {num_classes})")
    return np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes,
                                                                                          num_classes)


def segmentation_metrics(confusion: np.ndarray, is_novel: Sequence[bool] | None = None,
                         is_thing: Sequence[bool] | None = None) -> dict[str, float]:
    """mIoU and pixel accuracy of a (C, C) confusion matrix (rows ground truth, columns prediction).

    Returns `miou` (mean IoU over the classes present in the ground truth or the prediction; see module doc),
    `pixel_acc`, `num_classes_evaluated`, and with `is_novel` `miou_base` / `miou_novel` (each when a class of the
    group has an IoU) plus `miou_harmonic` (their harmonic mean, when both exist); with `is_thing` `miou_thing` /
    `miou_stuff`. Raises when the matrix counts no pixel (nothing labelled in the split).
    """
    confusion = np.asarray(confusion, np.float64)
    c = confusion.shape[0]
    if confusion.shape != (c, c):
        raise ValueError(f"confusion must be square, got {confusion.shape}")
    total = confusion.sum()
    if total == 0:
        raise ValueError("no labelled pixel was counted (every ground-truth pixel is the ignore label): the split "
                         "has no segmentation masks")
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    defined = union > 0
    iou = np.where(defined, tp / np.maximum(union, 1), np.nan)
    out = {"miou": float(iou[defined].mean()), "pixel_acc": float(tp.sum() / total),
           "num_classes_evaluated": float(defined.sum())}
    for flags, names in ((class_flags(is_novel, c, "is_novel"), ("novel", "base")),
                         (class_flags(is_thing, c, "is_thing"), ("thing", "stuff"))):
        if flags is None:
            continue
        for name, group in zip(names, (flags, ~flags)):
            if (defined & group).any():
                out[f"miou_{name}"] = float(iou[defined & group].mean())
    if "miou_base" in out and "miou_novel" in out:
        b, n = out["miou_base"], out["miou_novel"]
        out["miou_harmonic"] = 2 * b * n / (b + n) if b + n > 0 else 0.0
    return out


def predict_classes(dense, classes, size: int):
    """(B, h, w, E) dense features, (C, E) unit class embeddings -> (B, size, size) uint8 argmax class per pixel of
    the bilinearly upsampled cosine logits (jax; jit it). The scoring is `ops.dense`, shared with
    `Predictor.segment`."""
    return dense_ops.predict_classes(dense, classes, (size, size)).astype("uint8")


class SegmentationEvaluator:
    """Zero-shot semantic segmentation of an eval split with masks (see module doc).

    Config keys: `dataset`, `split`; optional `class_names` (default: the dataset's metadata), `templates`
    (default: `DEFAULT_TEMPLATES`). Metrics: `miou`, `pixel_acc`, `miou_base` / `miou_novel` / `miou_harmonic` when
    the metadata has `is_novel`, `miou_thing` / `miou_stuff` when it has `is_thing`, `num_classes_evaluated`,
    `num_pixels` (counted pixels at S x S), `num_images`.
    """

    def __init__(self, name: str, eval_config, context: EvalContext):
        self.name = name
        self.config = eval_config
        self.context = context
        self.class_names, meta = class_metadata(name, eval_config, context, "segmentation needs a labelled "
                                                "dataset with masks (e.g. scenes, coco_panoptic_boxes)")
        if len(self.class_names) > SEGMENTATION_IGNORE:
            raise ValueError(f"eval {name}: {len(self.class_names)} classes; uint8 masks hold at most "
                             f"{SEGMENTATION_IGNORE} (255 is the ignore label)")
        if context.fns.encode_dense is None:
            raise ValueError(f"eval {name}: segmentation needs dense features (EvalFns.encode_dense)")
        self.is_thing = meta.get("is_thing") or None
        self.is_novel = meta.get("is_novel") or None
        class_flags(self.is_thing, len(self.class_names), "is_thing")
        class_flags(self.is_novel, len(self.class_names), "is_novel")
        self.templates = tuple(eval_config.get("templates") or DEFAULT_TEMPLATES)
        self._predict = None

    def _predictor(self):
        if self._predict is None:
            import functools

            import jax

            size = int(self.context.data_config.image_size)
            mesh = self.context.mesh
            self._predict = jax.jit(functools.partial(predict_classes, size=size),
                                    in_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
                                    out_shardings=sharding.batch_sharding(mesh))
        return self._predict

    def run(self, params) -> dict[str, float]:
        ctx = self.context
        c = len(self.class_names)
        classes = class_embeddings(ctx.fns.encode_texts, params, self.class_names, self.templates, ctx.fns.tokenize,
                                   ctx.mesh.size)
        classes = sharding.global_from_host(classes, sharding.replicated(ctx.mesh))
        predict = self._predictor()
        data = eval_data_config(ctx, self.config, {"eval_segmentation": True, "eval_regions": False})
        confusion = np.zeros((c, c), np.int64)
        indices = []
        with contextlib.closing(eval_batches(ctx, data)) as batches:
            for batch in batches:
                pred = predict(ctx.fns.encode_dense(params, batch["image"]), classes)
                host = sharding.to_host({"pred": pred, "gt": batch["segmentation"], "mask": batch["mask"],
                                         "index": batch["index"]})
                real = host["mask"].astype(bool)
                confusion += confusion_matrix(host["pred"][real], host["gt"][real], c)
                indices.append(host["index"][real])
        if not indices:
            raise ValueError(f"eval split {data.dataset}:{data.eval_split} is empty")
        index = np.concatenate(indices)
        record_order(index, data)
        try:
            metrics = segmentation_metrics(confusion, self.is_novel, self.is_thing)
        except ValueError as error:
            raise ValueError(f"eval {self.name} on {data.dataset}:{data.eval_split}: {error}") from error
        metrics["num_pixels"] = float(confusion.sum())
        metrics["num_images"] = float(len(index))
        return metrics
