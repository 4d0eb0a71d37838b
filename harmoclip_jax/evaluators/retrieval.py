"""Image-text retrieval: R@1/5/10 in both directions (an image counts for all its captions).

`retrieval_metrics` is the metric math (numpy, testable); `RetrievalEvaluator` embeds an eval split with the
current parameters, on the mesh, and feeds it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from harmoclip_jax.evaluators.common import EvalContext, collect, l2_normalize


def retrieval_metrics(image_embed: np.ndarray, text_embed: np.ndarray, text_image: np.ndarray,
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 4096) -> dict[str, float]:
    """Recall@k for text->image and image->text.

    Args:
      image_embed: (N, E) image embeddings; text_embed: (M, E) caption embeddings (normalised here).
      text_image: (M,) int, the index in [0, N) of each caption's image.
    Returns:
      {"t2i_r{k}", "i2t_r{k}"} in [0, 1]. text->image: a caption is a hit at k if its image is among the k
      most similar images. image->text: an image is a hit at k if ANY of its captions is among the k most
      similar captions. Ties count against the query (a rival with an equal score ranks ahead).
    """
    images, texts = l2_normalize(image_embed), l2_normalize(text_embed)
    text_image = np.asarray(text_image, np.int64)
    n, m = len(images), len(texts)
    if text_image.shape != (m,) or (m and (text_image.min() < 0 or text_image.max() >= n)):
        raise ValueError(f"text_image must be ({m},) indices into the {n} images")
    if n == 0 or m == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    t2i_rank = np.empty((m,), np.int64)
    for start in range(0, m, chunk):
        sims = texts[start:start + chunk] @ images.T  # (c, N)
        true = sims[np.arange(len(sims)), text_image[start:start + chunk]]
        t2i_rank[start:start + chunk] = (sims >= true[:, None]).sum(1) - 1  # rivals at or above the true image
    i2t_rank = np.empty((n,), np.int64)
    for start in range(0, n, chunk):
        sims = images[start:start + chunk] @ texts.T  # (c, M)
        own = text_image[None, :] == np.arange(start, start + len(sims))[:, None]
        best = np.where(own, sims, -np.inf).max(1)
        # The image's best caption is a hit at k if fewer than k OTHER images' captions score at least as high.
        i2t_rank[start:start + chunk] = ((sims >= best[:, None]) & ~own).sum(1)
    has_caption = np.bincount(text_image, minlength=n) > 0
    out = {}
    for k in ks:
        out[f"t2i_r{k}"] = float(np.mean(t2i_rank < k))
        out[f"i2t_r{k}"] = float(np.mean(i2t_rank[has_caption] < k))
    return out


class RetrievalEvaluator:
    """Embeds every image and its (up to K) captions of an eval split and reports R@1/5/10 both ways."""

    def __init__(self, name: str, eval_config, context: EvalContext):
        self.name = name
        self.config = eval_config
        self.context = context

    def run(self, params) -> dict[str, float]:
        ctx = self.context
        rows = collect(ctx, self.config, params, lambda p, batch: {
            "image": ctx.fns.encode_images(p, batch["image"]),
            "caption": ctx.fns.encode_captions(p, batch["captions"]),
        }, keep=("caption_mask",))
        images, caption_embed, caption_mask = rows["image"], rows["caption"], rows["caption_mask"]
        n, k = caption_mask.shape
        text_image = np.repeat(np.arange(n), k).reshape(n, k)[caption_mask]
        texts = caption_embed[caption_mask]
        if len(texts) == 0:
            raise ValueError(f"eval {self.name}: split {self.config.dataset}:{self.config.split} has no captions; "
                             "retrieval needs an image-caption dataset")
        metrics = retrieval_metrics(images, texts, text_image, ks=tuple(self.config.get("ks", (1, 5, 10))))
        metrics["num_images"] = float(n)
        metrics["num_captions"] = float(len(texts))
        return metrics
