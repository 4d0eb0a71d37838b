"""Evaluator metric math on constructed embeddings with known answers."""
import numpy as np
import pytest

from harmoclip_jax.evaluators import (box_classification_metrics, confusion_matrix, retrieval_metrics,
                                     segmentation_metrics)


def _onehot(indices, dim):
    out = np.zeros((len(indices), dim), np.float32)
    out[np.arange(len(indices)), indices] = 1.0
    return out


def test_retrieval_perfect_and_known_ranks():
    images = _onehot([0, 1, 2, 3], 4)
    # Two captions per image; each caption equals its image embedding -> every recall is 1.
    texts = np.repeat(images, 2, axis=0)
    text_image = np.repeat(np.arange(4), 2)
    m = retrieval_metrics(images, texts, text_image)
    assert all(v == 1.0 for v in m.values()), m

    # Caption 0 (of image 0) points at image 1; caption 1 (of image 0) at image 0. Captions 2,3 of image 1 point at
    # image 2. Images 2, 3 have no correct caption close: captions 4,5 -> image 3, 6,7 -> image 2.
    texts = _onehot([1, 0, 2, 2, 3, 3, 2, 2], 4) + 0.1 * _onehot([0, 0, 1, 1, 2, 2, 3, 3], 4)
    m = retrieval_metrics(images, texts, text_image, ks=(1, 2))
    # t2i top-1 hits: caption 1 only (caption 0's best is image 1, 2/3 -> image 2, 4/5 -> image 3, 6/7 -> image 2).
    assert m["t2i_r1"] == pytest.approx(1 / 8)
    # t2i top-2: each caption's own image has score 0.1 (second best) except caption 1 (1.1, best) -> all 8 hit.
    assert m["t2i_r2"] == pytest.approx(1.0)
    # i2t: image 0 -> its caption 1 scores 1.1 (best overall) -> hit. Image 1: its captions score 0.1, but caption 0
    # scores 1.0 on image 1 -> rank 1 (hit at 2, not 1). Image 2: captions 2,3,6,7 score 1.0, its own (4,5) 0.1 ->
    # rank 4. Image 3: captions 4,5 score 1.0 (they are image 2's), its own 6,7 score 0.1 -> rank 2.
    assert m["i2t_r1"] == pytest.approx(1 / 4)
    assert m["i2t_r2"] == pytest.approx(2 / 4)


def test_retrieval_ties_count_against_the_query():
    images = np.ones((3, 2), np.float32)  # all identical: every score ties
    m = retrieval_metrics(images, images, np.arange(3), ks=(1, 3))
    assert m["t2i_r1"] == 0.0 and m["t2i_r3"] == 1.0
    assert m["i2t_r1"] == 0.0 and m["i2t_r3"] == 1.0


def test_retrieval_rejects_bad_indices():
    with pytest.raises(ValueError, match="indices into the 2 images"):
        retrieval_metrics(np.eye(2), np.eye(2), np.array([0, 2]))


def test_box_classification_known_answers():
    # 3 classes; boxes: class 0 x3 (2 right at top-1, the third ranks 2nd), class 1 x1 (ranks 3rd), class 2 x0.
    scores = np.array([[3, 1, 0], [3, 2, 1], [1, 2, 0], [2, 1, 3]], np.float32)
    labels = np.array([0, 0, 0, 1])
    m = box_classification_metrics(scores, labels, ks=(1, 2))
    assert m["top1_micro"] == pytest.approx(2 / 4)
    assert m["top1"] == pytest.approx((2 / 3 + 0) / 2)  # per-class mean over the 2 classes present
    assert m["top2_micro"] == pytest.approx(3 / 4)
    assert m["top2"] == pytest.approx((1.0 + 0.0) / 2)


def test_box_classification_top2_miss_and_thing_stuff():
    scores = np.array([[1, 3, 2], [0, 1, 2], [2, 1, 0]], np.float32)
    labels = np.array([0, 1, 2])  # class 0 ranks 3rd, class 1 2nd, class 2 3rd
    m = box_classification_metrics(scores, labels, is_thing=[True, True, False], ks=(1, 2))
    assert m["top1"] == 0.0 and m["top1_micro"] == 0.0
    assert m["top2"] == pytest.approx(1 / 3)
    assert m["top2_thing"] == pytest.approx(0.5) and m["top2_stuff"] == 0.0


def test_box_classification_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\)"):
        box_classification_metrics(np.zeros((2, 2)), np.array([0, 2]))


def test_box_classification_base_novel():
    scores = np.array([[1, 3, 2], [0, 1, 2], [2, 1, 0]], np.float32)
    labels = np.array([0, 1, 2])  # class 0 ranks 3rd, class 1 2nd, class 2 3rd
    m = box_classification_metrics(scores, labels, ks=(1, 2), is_novel=[False, True, True])
    assert m["top2_base"] == 0.0 and m["top2_novel"] == pytest.approx(0.5)
    assert m["top1_base"] == 0.0 and m["top1_novel"] == 0.0
    assert "top1_thing" not in m
    # 4 classes, class 2 (novel) absent: novel is the mean over the novel classes that occur (class 3 only).
    scores = np.array([[2, 1, 0, 0], [1, 2, 0, 0], [0, 2, 1, 0], [1, 0, 0, 0.5]], np.float32)
    m = box_classification_metrics(scores, np.array([0, 0, 1, 3]), ks=(1,), is_novel=[False, False, True, True],
                                   is_thing=[True, True, True, False])
    assert m["top1_base"] == pytest.approx((0.5 + 1.0) / 2) and m["top1_novel"] == 0.0
    assert m["top1"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m["top1_thing"] == pytest.approx(0.75) and m["top1_stuff"] == 0.0
    # Only base classes present: no novel key (not a misleading 0).
    m = box_classification_metrics(scores[:3], np.array([0, 0, 1]), ks=(1,), is_novel=[False, False, True, True])
    assert "top1_novel" not in m and m["top1_base"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="is_novel must have one entry per class"):
        box_classification_metrics(scores, np.array([0, 0, 1, 3]), is_novel=[True])


# ------------------------------------------------------------------------------------------- segmentation


def _reference_ious(pred, gt, num_classes, ignore=255):
    """Per-class IoU written plainly (a loop over classes on boolean masks); NaN when the class has no pixel in
    the ground truth or the prediction (over the non-ignored pixels)."""
    pred, gt = np.asarray(pred).ravel(), np.asarray(gt).ravel()
    counted = gt != ignore
    ious = []
    for c in range(num_classes):
        p, g = (pred == c) & counted, (gt == c) & counted
        union = (p | g).sum()
        ious.append((p & g).sum() / union if union else np.nan)
    return np.array(ious), float(((pred == gt) & counted).sum() / counted.sum())


def test_segmentation_metrics_by_hand():
    gt = np.array([[0, 0, 1, 255], [1, 1, 255, 0]], np.uint8)
    pred = np.array([[0, 1, 1, 3], [1, 2, 0, 0]], np.uint8)
    confusion = confusion_matrix(pred, gt, 4)
    # Ignored pixels (gt 255) are dropped whatever was predicted there (class 3 and class 0).
    assert confusion.sum() == 6 and confusion[:, 3].sum() == 0
    m = segmentation_metrics(confusion, is_novel=[False, False, True, True], is_thing=[True, False, True, False])
    # class 0: TP 2, FN 1 (-> 1), FP 0 -> 2/3; class 1: TP 2, FN 1 (-> 2), FP 1 (gt 0) -> 2/4; class 2: predicted
    # once, never in the ground truth -> IoU 0, counted; class 3: only predicted on an ignored pixel -> left out.
    assert m["miou"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    assert m["num_classes_evaluated"] == 3
    assert m["pixel_acc"] == pytest.approx(4 / 6)
    assert m["miou_base"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert m["miou_novel"] == 0.0 and m["miou_harmonic"] == 0.0
    assert m["miou_thing"] == pytest.approx((2 / 3 + 0.0) / 2) and m["miou_stuff"] == pytest.approx(0.5)
    assert "miou_base" not in segmentation_metrics(confusion, is_thing=[True] * 4)


def test_segmentation_metrics_match_a_plain_reference():
    rng = np.random.default_rng(0)
    c = 7
    gt = rng.integers(0, c - 1, size=(3, 20, 24)).astype(np.uint8)  # class 6 never in the ground truth
    gt[rng.uniform(size=gt.shape) < 0.2] = 255
    pred = np.where(rng.uniform(size=gt.shape) < 0.6, gt, rng.integers(0, c - 2, size=gt.shape)).astype(np.uint8)
    pred[pred == 255] = 0  # class 5 predicted only where the ground truth says so; class 6 never: absent from both
    confusion = sum(confusion_matrix(p, g, c) for p, g in zip(pred, gt))  # accumulates like the evaluator
    ious, acc = _reference_ious(pred, gt, c)
    assert np.isnan(ious[6]) and not np.isnan(ious[:6]).any()
    novel = [False, True, False, True, False, True, True]
    m = segmentation_metrics(confusion, is_novel=novel)
    assert m["miou"] == pytest.approx(np.nanmean(ious))
    assert m["pixel_acc"] == pytest.approx(acc)
    assert m["miou_novel"] == pytest.approx(np.nanmean(ious[np.array(novel)]))
    assert m["miou_base"] == pytest.approx(np.nanmean(ious[~np.array(novel)]))
    b, n = m["miou_base"], m["miou_novel"]
    assert m["miou_harmonic"] == pytest.approx(2 * b * n / (b + n))
    perfect = segmentation_metrics(confusion_matrix(gt, gt, c))
    assert perfect["miou"] == 1.0 and perfect["pixel_acc"] == 1.0


def test_segmentation_rejects_bad_masks():
    with pytest.raises(ValueError, match=r"ground-truth classes \[7\] outside \[0, 4\)"):
        confusion_matrix(np.zeros((2, 2)), np.array([[0, 7], [255, 1]]), 4)
    with pytest.raises(ValueError, match="no labelled pixel"):
        segmentation_metrics(confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 255), 4))
    with pytest.raises(ValueError, match="is_thing must have one entry per class"):
        segmentation_metrics(np.eye(3), is_thing=[True])


def _bilinear_half_pixel(x, size):
    """(h, w, C) -> (size, size, C): PyTorch's interpolate(mode='bilinear', align_corners=False), written plainly."""
    h, w, _ = x.shape

    def axis(n_in):
        src = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    top = x[y0][:, x0] * (1 - fx)[None, :, None] + x[y0][:, x1] * fx[None, :, None]
    bottom = x[y1][:, x0] * (1 - fx)[None, :, None] + x[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


def test_predict_classes_is_cosine_then_bilinear_upsampling_then_argmax():
    from harmoclip_jax.evaluators.segmentation import predict_classes

    rng = np.random.default_rng(1)
    dense = rng.normal(size=(2, 4, 4, 8)).astype(np.float32) * rng.uniform(0.5, 3, size=(2, 4, 4, 1))
    classes = rng.normal(size=(5, 8)).astype(np.float32)
    classes /= np.linalg.norm(classes, axis=-1, keepdims=True)
    got = np.asarray(predict_classes(dense, classes, 16))
    assert got.shape == (2, 16, 16) and got.dtype == np.uint8
    cosine = (dense / np.linalg.norm(dense, axis=-1, keepdims=True)) @ classes.T
    expected = np.stack([_bilinear_half_pixel(c, 16).argmax(-1) for c in cosine])
    np.testing.assert_array_equal(got, expected)
