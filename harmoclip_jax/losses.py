"""HarmoCLIP loss family and the baselines' losses (FineCLIP, CLIPSelf, RegionCLIP), as pure functions.

Contract
--------
``outputs`` is a dict of arrays. Embeddings are NOT normalised; every loss L2-normalises them.
Only the keys a config needs are present (``required_outputs(config)`` lists them):

  image_embed          (B, E)     global image embedding
  text_embed           (B, E)     global caption embedding
  region_embed         (B, T, E)  RoIAlign-pooled student region features (dense branch)
  region_text_embed    (B, T, E)  embedding of each region's full caption (GR-a / FineCLIP RC)
  lexeme_embed         (B, T, E)  embedding of each region's lexeme (LRC, in-batch negatives)
  region_text_token_embed (B, T, L, E) per-token embeddings of each region's caption (LRC with lrc_text="tokens")
  text_token_embed     (B, L, E)  per-token embeddings of the global caption (lrc_text="tokens", lrc_token_source="caption")
  crop_embed           (B, T, E)  student ``encode_image`` of each region's (1.5x) crop
  teacher_crop_embed   (B, T, E)  frozen teacher's crop embeddings (CLIPSelf; concept pseudo labels)
  teacher_region_embed (B, T, E)  frozen teacher's RoIAlign region features (concept pseudo labels)
  concept_embed        (K, E)     concept vocabulary (RegionCLIP)
  lexeme_vocab_embed   (V, E)     lexeme vocabulary (LRC with ``lrc_negatives="vocab"``)
  logit_scale          ()         log of the contrastive scale, as in CLIP (scale = exp(logit_scale))
  logit_bias           ()         SigLIP's logit bias (the sigmoid form of gc only)

``batch`` holds ``box_mask (B, T) bool`` (which region slots are real) and ``lexeme_id (B, T) int``
(the lexeme's identity: equal ids = the same lexeme string; with vocabulary negatives it indexes
``lexeme_vocab_embed`` and must lie in [0, V) for every valid box); with ``lrc_text="tokens"`` also
``lexeme_span (B, T, 2) int`` ([start, end) of the lexeme's tokens in the source text's token row, -1 when
not found).

Masks are explicit everywhere: padded region slots are excluded from the softmax denominators (as
rows and as columns) and from every average, so their content never changes a loss or a gradient.

Sharding: the losses are global-batch math: every device's regions are negatives for every other
device's. Outside a mesh (or when the batch axes do not split the items) they are plain jnp math on the
(N, N) logits, which GSPMD partitions under jit. In the trainer's `jax.set_mesh` context the InfoNCE
terms (gc, lrc, gr-a/b, rc) and the sigmoid gc run as rings instead (``info_nce_ring``,
``sigmoid_contrastive_loss_ring``): each device keeps its rows and the columns travel around the
devices block by block, the same value and gradient without any device holding the (N, N) matrix, which
at a 32k batch with 20 regions per image would be 655k x 655k. Computing them per shard inside
``shard_map`` instead would give each device only its own negatives (tests/test_losses.py checks that
the check catches it).

Loss-term table: ``LOSS_TERMS`` holds one ``LossTerm`` per weighted term: its default weight per
method, its variants (``LossVariant``: the ``outputs`` and ``batch`` keys it reads and its function)
selected by one config field, and the other config fields it reads (``LossOption``).
``default_loss_config``, ``validate_loss_config``, ``required_outputs``, ``required_batch_keys`` and
``total_loss`` are all read off it. To add a term: write its loss function, add one ``LossTerm``
(or one ``LossVariant`` to an existing term) to ``LOSS_TERMS``; a new model output also needs its
producer in the trainer. Image-text scores go through ``scaled_cosine_logits`` (CLIP's
exp(logit_scale) * cos); the sigmoid (SigLIP) GC is the variant of ``gc`` selected by the optional field
``global_form`` (absent from the default configs: "softmax"), reading the extra ``logit_bias`` output.

Terms (``total_loss`` returns each one unweighted, plus ``total``):
  gc      symmetric InfoNCE image <-> caption (open_clip ClipLoss formula), or with ``global_form="sigmoid"``
          SigLIP's pairwise sigmoid loss (open_clip SigLipLoss; needs the model's ``logit_bias``).
  lrc     Lexeme-Region Contrastive: regions <-> lexemes, symmetric InfoNCE over the valid regions of
          the global batch; same-lexeme pairs are extra positives (or masked out of the negatives); or
          regions classified against a fixed lexeme vocabulary; with ``lrc_form="sigmoid"`` the pairwise
          sigmoid loss over the same pairs (SigLIP models). ``lrc_text`` (optional field) picks the lexeme
          embedding: "lexeme" (default) the lexeme encoded as its own text; "tokens" the mean of the lexeme's
          token embeddings in one pass over the region caption (``lrc_token_source="region_caption"``) or the
          global caption ("caption"), see ``span_mean_pool``. ``lrc_temperature`` (optional, > 0) fixes
          LRC's temperature instead of sharing the learnable scale.
  gr      Global-Region alignment, variant a (region <-> region caption InfoNCE, = FineCLIP's L_RC),
          b (masked-mean pooled regions of an image <-> its global caption, InfoNCE over the batch) or
          c (1 - cos(region, stop_grad(student crop))).
  rc      FineCLIP's region-caption InfoNCE (same function as gr-a; a separate term for the baseline).
  sd      self-distillation 1 - cos(region, crop): FineCLIP (student crops, no stop-gradient by
          default) or CLIPSelf (frozen teacher crops).
  concept RegionCLIP-style concept loss (CLIPSelf's EVA re-implementation): sigmoid BCE of regions vs
          a concept vocabulary against teacher pseudo labels, logits scaled by the detached scale.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from harmoclip_jax.sharding import BATCH_AXES

__all__ = [
    "METHODS",
    "TERMS",
    "GR_VARIANTS",
    "LossOption",
    "LossVariant",
    "LossTerm",
    "LossInput",
    "LOSS_TERMS",
    "check_loss_table",
    "l2_normalize",
    "scaled_cosine_logits",
    "masked_info_nce",
    "grouped_info_nce",
    "contrastive_form",
    "pairwise_score_flops",
    "info_nce_ring",
    "global_contrastive_loss",
    "sigmoid_contrastive_loss",
    "sigmoid_contrastive_loss_ring",
    "masked_sigmoid_loss",
    "sharded_sigmoid_loss",
    "lexeme_region_contrastive_loss",
    "span_mean_pool",
    "lexeme_vocab_contrastive_loss",
    "region_caption_loss",
    "pooled_region_global_loss",
    "cosine_distillation_loss",
    "concept_pseudo_labels",
    "concept_loss",
    "default_loss_config",
    "optional_loss_options",
    "validate_loss_config",
    "required_outputs",
    "required_batch_keys",
    "total_loss",
]

METHODS = ("harmoclip", "clip", "fineclip", "clipself", "regionclip")
_LRC_DUPLICATES = ("positive", "mask")


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """x / max(||x||, eps) in float32 (like torch F.normalize); zero vectors stay zero, never NaN."""
    x = jnp.asarray(x, jnp.float32)
    # Clamp the squared norm before the sqrt: sqrt's derivative at 0 is inf, and inf * 0 = NaN
    # would leak into the gradient of an all-zero (e.g. fully padded, pooled) vector.
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def scaled_cosine_logits(queries, keys, logit_scale):
    """CLIP's score, the one place ``logit_scale`` is applied: exp(logit_scale) * cos(query, key).

    ``queries`` (..., E) against ``keys`` (K, E) gives (..., K). Every contrastive term scores pairs
    with it; a sigmoid (SigLIP-style) term would add its bias on top of these logits.
    """
    return jnp.exp(logit_scale) * l2_normalize(queries) @ l2_normalize(keys).T


def _masked_mean(values, mask):
    """Mean of ``values`` over ``mask``; 0 when nothing is valid (no NaN)."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _masked_logsumexp(logits, mask):
    """Row-wise logsumexp over the True entries of ``mask``; -inf for rows with none (never NaN)."""
    masked = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(masked, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), jax.lax.stop_gradient(row_max), 0.0)
    # Masked before the exp, not after: a masked-out logit far above the row's max (more than ~88 at CLIP's maximal
    # scale of 100) overflows exp to inf, and where's zero cotangent times inf is a NaN gradient.
    summed = jnp.sum(jnp.exp(jnp.where(mask, logits - row_max, -jnp.inf)), axis=-1)
    safe = jnp.where(summed > 0, summed, 1.0)
    return jnp.where(summed > 0, jnp.log(safe) + row_max[..., 0], -jnp.inf)


def _multi_positive_nce(logits, row_valid, col_valid, positive):
    """Mean over valid rows of -log(sum_{positives} p), p = softmax over the row's valid columns.

    With one positive per row this is the usual cross-entropy. Rows without a valid positive
    (only padded rows, if the caller's masks are consistent) are excluded rather than giving inf.
    """
    col_valid = jnp.broadcast_to(col_valid[None, :], logits.shape)
    positive = positive & col_valid
    log_numerator = _masked_logsumexp(logits, positive)
    log_denominator = _masked_logsumexp(logits, col_valid)
    rows = row_valid & jnp.any(positive, axis=-1)
    per_row = jnp.where(rows, log_denominator - log_numerator, 0.0)
    return _masked_mean(per_row, rows)


def masked_info_nce(queries, keys, logit_scale, valid=None, positive=None, negative=None):
    """Symmetric InfoNCE between paired sets ``queries[i] <-> keys[i]`` with explicit masks.

    Args:
      queries, keys: (N, E) embeddings (normalised here).
      logit_scale: log of the scale (scale = exp(logit_scale)).
      valid: (N,) bool; invalid items are neither rows nor columns. Default: all valid.
      positive: (N, N) bool, extra positives beyond the diagonal (e.g. same lexeme). Default: eye.
      negative: (N, N) bool, which off-positive pairs may act as negatives. Default: all. Pairs that
        are neither positive nor negative are dropped from the denominator.

    Returns:
      (mean_i CE(query_i -> keys) + mean_i CE(key_i -> queries)) / 2 over valid items, where a row's
      loss is -log of the softmax mass on its positives.
    """
    n = queries.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
    eye = jnp.eye(n, dtype=bool)
    positive = eye if positive is None else (positive.astype(bool) | eye)
    allowed = jnp.ones((n, n), bool) if negative is None else (negative.astype(bool) | positive)
    logits = scaled_cosine_logits(queries, keys, logit_scale)
    # Columns a row may see: the valid ones it is allowed to compare with.
    q_to_k = _multi_positive_nce(jnp.where(allowed, logits, -jnp.inf), valid, valid, positive & allowed)
    k_to_q = _multi_positive_nce(jnp.where(allowed.T, logits.T, -jnp.inf), valid, valid, positive.T & allowed.T)
    return (q_to_k + k_to_q) / 2


def sigmoid_contrastive_loss(image_embed, text_embed, logit_scale, logit_bias):
    """SigLIP: -sum_{i,j} log sigmoid(z_ij * (exp(logit_scale) * cos_ij + logit_bias)) / B, z = +1 on the diagonal
    (image i with caption i), -1 elsewhere: every pair is an independent binary problem (open_clip SigLipLoss)."""
    logits = scaled_cosine_logits(image_embed, text_embed, logit_scale) + logit_bias
    signs = 2.0 * jnp.eye(logits.shape[0], logits.shape[1], dtype=logits.dtype) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / image_embed.shape[0]


def masked_sigmoid_loss(queries, keys, logit_scale, logit_bias, valid=None, positive=None, negative=None):
    """The pairwise sigmoid loss between paired sets ``queries[i] <-> keys[i]`` with ``masked_info_nce``'s masks:
    -sum log sigmoid(z * (exp(logit_scale) * cos + logit_bias)) over valid pairs / the number of valid items, z = +1
    for positives (the diagonal and ``positive``), -1 for the allowed negatives; other pairs do not count."""
    n = queries.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
    eye = jnp.eye(n, dtype=bool)
    positive = eye if positive is None else (positive.astype(bool) | eye)
    allowed = jnp.ones((n, n), bool) if negative is None else (negative.astype(bool) | positive)
    pairs = allowed & valid[:, None] & valid[None, :]
    logits = scaled_cosine_logits(queries, keys, logit_scale) + logit_bias
    per_pair = jax.nn.log_sigmoid(jnp.where(positive, logits, -logits))
    return -jnp.sum(jnp.where(pairs, per_pair, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def sigmoid_contrastive_loss_ring(image_embed, text_embed, logit_scale, logit_bias, axis_name: str = "data"):
    """``sigmoid_contrastive_loss`` of the global batch, called inside ``shard_map`` over ``axis_name``.

    Images stay on their device; the text blocks travel around the ring (``ppermute`` to the next device, n - 1
    times), so a device holds one (b, b) logits block at a time instead of the (b, n*b) block of the gathered form,
    and every block is recomputed in the backward pass (``jax.checkpoint``) rather than stored (big_vision's chunked
    sigmoid loss). Only the first block, the device's own texts, holds positives. Returns the global value on every
    device (the pair sum over all devices / the global batch).
    """
    n = jax.lax.axis_size(axis_name)
    images, scale = l2_normalize(image_embed), jnp.exp(logit_scale)

    @jax.checkpoint
    def block(texts, signs):
        logits = scale * images @ l2_normalize(texts).T + logit_bias
        return -jnp.sum(jax.nn.log_sigmoid(signs * logits))

    b = images.shape[0]
    eye = jnp.eye(b, text_embed.shape[0], dtype=jnp.float32)
    ring = [(i, (i + 1) % n) for i in range(n)]

    def step(carry, _):  # a loop, not unrolled: XLA then keeps one block's buffers live, whatever n is
        texts, total = carry
        texts = jax.lax.ppermute(texts, axis_name, ring)
        return (texts, total + block(texts, -jnp.ones_like(eye))), None

    (_, total), _ = jax.lax.scan(step, (text_embed, block(text_embed, 2.0 * eye - 1.0)), None, length=n - 1)
    return jax.lax.psum(total, axis_name) / (b * n)


def sharded_sigmoid_loss(mesh, image_embed, text_embed, logit_scale, logit_bias, axis_name: str | tuple = "data"):
    """The ring form on ``mesh`` (None: the `jax.set_mesh` context's): embeddings sharded over ``axis_name`` (the
    batch axis or axes), scale and bias replicated."""
    from jax.sharding import PartitionSpec as P

    fn = jax.shard_map(functools.partial(sigmoid_contrastive_loss_ring, axis_name=axis_name), mesh=mesh,
                       in_specs=(P(axis_name), P(axis_name), P(), P()), out_specs=P())
    return fn(image_embed, text_embed, logit_scale, logit_bias)


def _running_logsumexp(state, logits, mask):
    """Adds one block's ``mask``ed entries to per-row running logsumexps ``state = (shift, total)``, value
    log(total) + shift. The shift is the largest entry seen so far (no gradient: the value does not depend on it);
    masked entries go through exp(-inf) = 0, so neither the value nor the gradient can overflow into NaN."""
    shift, total = state
    seen = total > 0
    block_max = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1)
    new = jnp.where(seen, jnp.maximum(shift, block_max), block_max)
    new = jax.lax.stop_gradient(jnp.where(jnp.isfinite(new), new, 0.0))
    rescaled = total * jnp.exp(jnp.where(seen, shift - new, 0.0))
    return new, rescaled + jnp.sum(jnp.exp(jnp.where(mask, logits - new[:, None], -jnp.inf)), axis=-1)


def _info_nce_ring_direction(rows, cols, valid, group, duplicates, scale, axis_name):
    """One direction of ``grouped_info_nce`` inside ``shard_map``: (sum of the device's row losses, row count).

    The device keeps its ``rows``; the ``cols`` block (with its validity and groups) travels around the ring, one
    (b, b) logits block at a time, recomputed in the backward pass; running logsumexps carry the numerator
    (positives) and the denominator (allowed columns) across blocks."""
    n, me, b = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name), rows.shape[0]
    rows = l2_normalize(rows)
    row_index = me * b + jnp.arange(b)

    @jax.checkpoint
    def block(states, cols, col_valid, col_group, source):
        logits = scale * rows @ l2_normalize(cols).T
        eye = row_index[:, None] == (source * b + jnp.arange(b))[None, :]
        same = group[:, None] == col_group[None, :]
        positive = (eye | same) if duplicates == "positive" else eye
        allowed = (eye | ~same) if duplicates == "mask" else jnp.ones_like(eye)
        num, den = states
        return (_running_logsumexp(num, logits, positive & col_valid[None, :]),
                _running_logsumexp(den, logits, allowed & col_valid[None, :]))

    zeros = jnp.zeros_like(rows[:, 0])  # derived from the rows: varying over the ring, like the carries it starts
    ring = [(i, (i + 1) % n) for i in range(n)]

    def step(carry, s):  # a loop over all n blocks (the last ppermute is spare): one block's buffers live, any n
        states, travelling = carry
        states = block(states, *travelling, (me - s) % n)
        return (states, tuple(jax.lax.ppermute(x, axis_name, ring) for x in travelling)), None

    start = (((zeros, zeros), (zeros, zeros)), (cols, valid, group))
    ((num, den), _), _ = jax.lax.scan(step, start, jnp.arange(n))
    counted = valid & (num[1] > 0)  # rows with a valid positive, as in _multi_positive_nce
    per_row = (jnp.log(jnp.where(counted, den[1], 1.0)) + den[0]) - (jnp.log(jnp.where(counted, num[1], 1.0)) + num[0])
    return jnp.sum(jnp.where(counted, per_row, 0.0)), jnp.sum(counted.astype(jnp.float32))


def info_nce_ring(queries, keys, logit_scale, valid, group, duplicates: str = "positive", axis_name="data"):
    """``grouped_info_nce`` of the global batch, called inside ``shard_map`` over ``axis_name``: no device ever holds
    more than a (b, b) block of the (N, N) logits, so a 32k-image batch with 20 regions each (655k x 655k region
    logits) trains as readily as 256 images. Both directions are the same ring with rows and columns swapped (the
    masks are symmetric). Returns the global value on every device."""
    scale = jnp.exp(logit_scale)
    total = 0.0
    for rows, cols in ((queries, keys), (keys, queries)):
        loss_sum, count = _info_nce_ring_direction(rows, cols, valid, group, duplicates, scale, axis_name)
        loss_sum, count = jax.lax.psum((loss_sum, count), axis_name)
        total = total + loss_sum / jnp.maximum(count, 1.0)
    return total / 2


def grouped_info_nce(queries, keys, logit_scale, valid=None, group=None, duplicates: str = "positive"):
    """``masked_info_nce`` with its pair masks given per item: item i's positives are itself and, with
    ``duplicates="positive"``, every item of the same ``group``; with ``duplicates="mask"`` the other items of its
    group are removed from its negatives instead. In a `jax.set_mesh` context whose batch axes split the items, the
    ring form (``info_nce_ring``; same value and gradient), else the dense (N, N) form."""
    if duplicates not in _LRC_DUPLICATES:
        raise ValueError(f"lrc duplicates must be one of {_LRC_DUPLICATES}, got {duplicates!r}")
    n = queries.shape[0]
    axes = _batch_mesh_axes(n)
    if axes:
        from jax.sharding import PartitionSpec as P

        valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
        group = jnp.arange(n) if group is None else group  # every item its own group: only the diagonal
        fn = jax.shard_map(functools.partial(info_nce_ring, duplicates=duplicates, axis_name=axes),
                           in_specs=(P(axes), P(axes), P(), P(axes), P(axes)), out_specs=P())
        return fn(queries, keys, logit_scale, valid, group)
    positive, negative = _group_masks(group, duplicates) if group is not None else (None, None)
    return masked_info_nce(queries, keys, logit_scale, valid=valid, positive=positive, negative=negative)


def _group_masks(group, duplicates: str):
    """The dense (positive, negative) masks of ``masked_info_nce`` for items grouped by ``group``."""
    same = group[:, None] == group[None, :]
    return (same, None) if duplicates == "positive" else (None, ~same)


def _flatten_regions(x):
    return x.reshape(-1, x.shape[-1])


def span_mean_pool(token_embed, spans):
    """Mean of the token rows ``[start, end)`` of each span: the token-level ("Text Token Space", reading B)
    lexeme embedding.

    Args:
      token_embed: (*rows, L, E) per-token embeddings (e.g. a text tower's projected tokens).
      spans: (*rows, *extra, 2) int [start, end) positions into the L axis of the same leading ``rows``; ``extra``
        axes pool several spans from one row (the regions of an image from its global caption). A span with
        ``start < 0`` or ``end <= start`` (lexeme not found, padded region) is invalid.

    Returns:
      (pooled (*rows, *extra, E) float32, valid (*rows, *extra) bool); invalid spans pool to zeros (never NaN), and
      tokens outside a span get no gradient from it.
    """
    token_embed = jnp.asarray(token_embed, jnp.float32)
    spans = jnp.asarray(spans)
    rows = token_embed.ndim - 2
    if spans.ndim < rows + 1 or spans.shape[:rows] != token_embed.shape[:rows] or spans.shape[-1] != 2:
        raise ValueError(f"span_mean_pool: spans {spans.shape} must be (*rows, *extra, 2) for token_embed "
                         f"{token_embed.shape} = (*rows, L, E)")
    start, end = spans[..., 0], spans[..., 1]
    valid = (start >= 0) & (end > start)
    position = jnp.arange(token_embed.shape[-2])
    weights = valid[..., None] & (position >= start[..., None]) & (position < end[..., None])  # (*rows, *extra, L)
    weights = weights.astype(jnp.float32).reshape(*spans.shape[:rows], -1, token_embed.shape[-2])
    summed = jnp.einsum("...kl,...le->...ke", weights, token_embed)
    pooled = summed / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1.0)
    return pooled.reshape(*spans.shape[:-1], token_embed.shape[-1]), valid.reshape(spans.shape[:-1])


# ----------------------------------------------------------------------------------------------
# Loss terms
# ----------------------------------------------------------------------------------------------


def global_contrastive_loss(image_embed, text_embed, logit_scale):
    """GC: symmetric InfoNCE between image i and caption i over the global batch (open_clip ClipLoss)."""
    return grouped_info_nce(image_embed, text_embed, logit_scale)


def lexeme_region_contrastive_loss(region_embed, lexeme_embed, box_mask, lexeme_id, logit_scale, duplicates="positive"):
    """LRC with in-batch negatives: regions <-> lexemes over the valid regions of the global batch.

    Region j's positive is its own lexeme. Other regions whose lexeme has the same ``lexeme_id``
    (the same string) are extra positives (``duplicates="positive"``) or are removed from the
    negatives (``duplicates="mask"``); either way they are never pushed apart.
    """
    return grouped_info_nce(_flatten_regions(region_embed), _flatten_regions(lexeme_embed), logit_scale,
                            valid=box_mask.reshape(-1), group=lexeme_id.reshape(-1), duplicates=duplicates)


def lexeme_vocab_contrastive_loss(region_embed, lexeme_vocab_embed, box_mask, lexeme_id, logit_scale):
    """LRC against a fixed lexeme vocabulary: each valid region is classified over all V lexemes.

    One direction only (region -> vocabulary): vocabulary entries absent from the batch have no
    region to point at. ``lexeme_id`` indexes the vocabulary; ids of padded slots are ignored.
    """
    logits = scaled_cosine_logits(_flatten_regions(region_embed), lexeme_vocab_embed, logit_scale)  # (N, V)
    v = lexeme_vocab_embed.shape[0]
    target = lexeme_id.reshape(-1)[:, None] == jnp.arange(v)[None, :]
    return _multi_positive_nce(logits, box_mask.reshape(-1), jnp.ones((v,), bool), target)


def region_caption_loss(region_embed, region_text_embed, box_mask, logit_scale):
    """GR-a / FineCLIP L_RC: symmetric InfoNCE region j <-> its own region caption, valid regions only."""
    return grouped_info_nce(_flatten_regions(region_embed), _flatten_regions(region_text_embed), logit_scale,
                            valid=box_mask.reshape(-1))


def pooled_region_global_loss(region_embed, text_embed, box_mask, logit_scale):
    """GR-b: mean of an image's (normalised) valid regions <-> its global caption, InfoNCE over the batch.

    Images without any valid region take part neither as rows nor as columns.
    """
    regions = l2_normalize(region_embed)
    weights = box_mask.astype(regions.dtype)[..., None]
    pooled = jnp.sum(regions * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    return grouped_info_nce(pooled, text_embed, logit_scale, valid=jnp.any(box_mask, axis=1))


def cosine_distillation_loss(region_embed, target_embed, box_mask, stop_gradient=True):
    """Mean over valid regions of 1 - cos(region, target); ``stop_gradient`` detaches the target."""
    if stop_gradient:
        target_embed = jax.lax.stop_gradient(target_embed)
    cosine = jnp.sum(l2_normalize(region_embed) * l2_normalize(target_embed), axis=-1)
    return _masked_mean(1.0 - cosine, box_mask)


def concept_pseudo_labels(teacher_embed, concept_embed, box_mask, temperature=0.01, threshold=0.1):
    """RegionCLIP pseudo labels: argmax concept of softmax(cos(teacher, concept) / temperature).

    Returns (labels (B, T) int32, keep (B, T) bool); a region is kept when it is valid and its top
    probability exceeds ``threshold``. No gradient flows through the labels.
    """
    teacher = l2_normalize(jax.lax.stop_gradient(teacher_embed))
    concepts = l2_normalize(jax.lax.stop_gradient(concept_embed))
    probs = jax.nn.softmax(teacher @ concepts.T / temperature, axis=-1)  # (B, T, K)
    labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    keep = box_mask.astype(bool) & (jnp.max(probs, axis=-1) > threshold)
    return labels, keep


def concept_loss(region_embed, concept_embed, teacher_embed, box_mask, logit_scale, temperature=0.01, threshold=0.1):
    """RegionCLIP-style concept loss (CLIPSelf's EVA version): sigmoid BCE summed over the K concepts,
    averaged over kept regions, logits = stop_grad(exp(logit_scale)) * cos(region, concept).

    CLIPSelf additionally subsamples 100 concepts per step (federated loss); here all K concepts
    take part, which makes the loss deterministic.
    """
    labels, keep = concept_pseudo_labels(teacher_embed, concept_embed, box_mask, temperature, threshold)
    logits = scaled_cosine_logits(region_embed, concept_embed, jax.lax.stop_gradient(logit_scale))  # (B, T, K)
    targets = (labels[..., None] == jnp.arange(concept_embed.shape[0])).astype(logits.dtype)
    # Numerically stable BCE with logits: max(z, 0) - z*y + log(1 + exp(-|z|)).
    bce = jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return _masked_mean(jnp.sum(bce, axis=-1), keep)


# ----------------------------------------------------------------------------------------------
# The loss-term table
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossOption:
    """A field of the loss config (``config.loss.<field>``) that a term's variants read."""

    field: str
    default: Any
    choices: tuple | None = None  # allowed values; None: not checked here (ConfigDict keeps the default's type)
    # Optional fields are left out of the default configs (configs and workdirs written before the field existed
    # stay as they were) and read with their default when absent.
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class LossVariant:
    """One way to compute a term: the arrays it reads and the function that reads them.

    ``fn(outputs, batch, config)`` returns the unweighted scalar. ``total_loss`` hands it only the
    ``outputs`` and ``batch`` keys declared here (``box_mask`` as bool), so an undeclared read fails
    loudly instead of silently depending on what the trainer happened to compute.
    """

    outputs: tuple[str, ...]
    batch_keys: tuple[str, ...]
    fn: Callable[[Mapping[str, Any], Mapping[str, Any], Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class LossInput:
    """An optional config field (absent from the default configs) that changes where a term's variants get some of
    their inputs: for a value other than ``default``, ``derive[value](config)`` is a ``LossVariant`` whose ``fn``
    returns ``(outputs, batch)`` updates computed from the keys it declares (e.g. ``lexeme_embed`` mean-pooled from
    per-token embeddings, and a ``box_mask`` without the regions whose lexeme has no span). Every variant of the term
    then runs on the updated arrays; a variant that reads none of ``provides`` cannot take the field.
    ``options``: further optional fields the derivations read."""

    field: str
    default: str
    provides: tuple[str, ...]
    derive: Mapping[str, Callable[[Any], LossVariant]]
    options: tuple[LossOption, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "derive", types.MappingProxyType(dict(self.derive)))

    def all_options(self) -> tuple[LossOption, ...]:
        return (LossOption(self.field, self.default, (self.default, *self.derive), optional=True), *self.options)


def _with_derived_inputs(variant: LossVariant, derived: LossVariant, provides: tuple[str, ...]) -> LossVariant:
    """``variant`` reading the arrays ``derived`` computes instead of the ``provides`` outputs it declares."""
    outputs = tuple(dict.fromkeys([k for k in variant.outputs if k not in provides] + list(derived.outputs)))
    batch_keys = tuple(dict.fromkeys(variant.batch_keys + derived.batch_keys))

    def fn(o, b, c):
        new_o, new_b = derived.fn({k: o[k] for k in derived.outputs}, {k: b[k] for k in derived.batch_keys}, c)
        o, b = {**o, **new_o}, {**b, **new_b}
        return variant.fn({k: o[k] for k in variant.outputs}, {k: b[k] for k in variant.batch_keys}, c)

    return LossVariant(outputs, batch_keys, fn)


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """A weighted term: ``config.weights[name]`` scales it; it is computed iff that weight is non-zero.

    Attributes:
      name: key in ``config.weights`` and in ``total_loss``'s terms.
      weights: default weight per method; methods not listed get 0.
      variants: the ways to compute it, keyed by the value of ``config[select]``; the first is the default.
      select: config field choosing the variant ("" for a single variant, keyed "").
      options: further config fields its variants read.
      presets: per method, defaults of ``select``/``options`` that differ from the usual ones.
      inputs: an optional ``LossInput``: a field that derives some of the variants' inputs from other arrays.
    """

    name: str
    weights: Mapping[str, float]
    variants: Mapping[str, LossVariant]
    select: str = ""
    options: tuple[LossOption, ...] = ()
    # An optional second selector (a field absent from the default configs, see LossOption.optional) whose
    # non-default values replace the variant `select` chose: `form` names the field and its default value.
    form: tuple[str, str] | None = None
    form_variants: Mapping[str, LossVariant] = dataclasses.field(default_factory=dict)
    presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    inputs: LossInput | None = None

    def __post_init__(self):
        # Read-only views: the table is constant.
        freeze = types.MappingProxyType
        object.__setattr__(self, "weights", freeze(dict(self.weights)))
        object.__setattr__(self, "variants", freeze(dict(self.variants)))
        object.__setattr__(self, "form_variants", freeze(dict(self.form_variants)))
        object.__setattr__(self, "presets", freeze({m: freeze(dict(p)) for m, p in self.presets.items()}))

    def all_options(self) -> tuple[LossOption, ...]:
        """Every config field this term owns: the variant selector first, then ``options``."""
        selector = (LossOption(self.select, next(iter(self.variants)), tuple(self.variants)),) if self.select else ()
        if self.form:
            field, default = self.form
            selector += (LossOption(field, default, (default, *self.form_variants), optional=True),)
        return selector + self.options + (self.inputs.all_options() if self.inputs else ())

    def defaults(self, method: str) -> dict[str, Any]:
        """The config fields this term owns, with their default values for ``method``."""
        preset = self.presets.get(method, {})
        return {opt.field: preset.get(opt.field, opt.default) for opt in self.all_options()
                if not opt.optional or opt.field in preset}

    def base_variant(self, config) -> LossVariant:
        """The variant ``config`` selects with ``select`` and ``form``, reading its inputs as declared."""
        if self.form and config.get(self.form[0], self.form[1]) != self.form[1]:
            return self.form_variants[config[self.form[0]]]
        return self.variants[config[self.select] if self.select else ""]

    def derived_inputs(self, config) -> LossVariant | None:
        """The derivation ``config`` asks for through ``inputs``, or None."""
        if self.inputs is None:
            return None
        value = config.get(self.inputs.field, self.inputs.default)
        return None if value == self.inputs.default else self.inputs.derive[value](config)

    def variant(self, config) -> LossVariant:
        """The variant ``config`` selects (with its inputs derived as ``inputs`` asks)."""
        variant, derived = self.base_variant(config), self.derived_inputs(config)
        return variant if derived is None else _with_derived_inputs(variant, derived, self.inputs.provides)


# Variant functions: (outputs, batch, config) -> unweighted scalar, reading only their declared keys.


def _gc(o, b, c):
    return global_contrastive_loss(o["image_embed"], o["text_embed"], o["logit_scale"])


def _batch_mesh_axes(batch_size: int) -> tuple[str, ...]:
    """The mesh axes the batch is split over in the current `jax.set_mesh` context (the trainer's
    `sharding.BATCH_AXES` of size > 1), or () outside a mesh / when the batch does not split evenly."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    return axes if axes and batch_size % shards == 0 else ()


def contrastive_form(batch_size: int) -> str:
    """"ring" where the current `jax.set_mesh` context splits a batch of ``batch_size`` images (the contrastive terms
    then run as rings, see the module docstring), else "dense"."""
    return "ring" if _batch_mesh_axes(batch_size) else "dense"


def _gc_sigmoid(o, b, c):
    """On a mesh, the ring form: no device ever holds the global B x B logits (same value and gradient)."""
    args = (o["image_embed"], o["text_embed"], o["logit_scale"], o["logit_bias"])
    axes = _batch_mesh_axes(o["image_embed"].shape[0])
    return sharded_sigmoid_loss(None, *args, axis_name=axes) if axes else sigmoid_contrastive_loss(*args)


def _lrc_logit_scale(o, c):
    """LRC's scale: the shared learnable ``logit_scale``, or with ``lrc_temperature`` T > 0 (optional field) the
    fixed log(1/T), which leaves the shared scale to GC (FG-CLIP-style separate region temperature)."""
    temperature = float(c.get("lrc_temperature", 0.0))
    return o["logit_scale"] if temperature == 0.0 else jnp.asarray(-np.log(temperature), o["logit_scale"].dtype)


def _lrc_batch(o, b, c):
    return lexeme_region_contrastive_loss(
        o["region_embed"], o["lexeme_embed"], b["box_mask"], b["lexeme_id"], _lrc_logit_scale(o, c), c.lrc_duplicates
    )


def _lrc_sigmoid(o, b, c):
    positive, negative = _group_masks(b["lexeme_id"].reshape(-1), c.lrc_duplicates)
    return masked_sigmoid_loss(_flatten_regions(o["region_embed"]), _flatten_regions(o["lexeme_embed"]),
                               _lrc_logit_scale(o, c), o["logit_bias"], b["box_mask"].reshape(-1), positive, negative)


def _lrc_vocab(o, b, c):
    return lexeme_vocab_contrastive_loss(
        o["region_embed"], o["lexeme_vocab_embed"], b["box_mask"], b["lexeme_id"], _lrc_logit_scale(o, c)
    )


# lrc_text="tokens" (reading B of "Text Token Space"): the lexeme embedding is the mean of the lexeme's tokens in one
# pass of the text tower over the source text; lrc_token_source picks the source, i.e. which per-token output it reads.
_LRC_TOKEN_SOURCES = {"region_caption": "region_text_token_embed", "caption": "text_token_embed"}


def _lexeme_from_tokens(config) -> LossVariant:
    """``lexeme_embed`` = ``span_mean_pool`` of the source's token embeddings over ``lexeme_span``; regions without a
    span (lexeme not found in the source text) leave the term through ``box_mask``."""
    key = _LRC_TOKEN_SOURCES[config.get("lrc_token_source", "region_caption")]

    def fn(o, b, c):
        pooled, found = span_mean_pool(o[key], b["lexeme_span"])
        return {"lexeme_embed": pooled}, {"box_mask": b["box_mask"].astype(bool) & found}

    return LossVariant((key,), ("box_mask", "lexeme_span"), fn)


def _region_caption(o, b, c):
    return region_caption_loss(o["region_embed"], o["region_text_embed"], b["box_mask"], o["logit_scale"])


def _pooled_region_global(o, b, c):
    return pooled_region_global_loss(o["region_embed"], o["text_embed"], b["box_mask"], o["logit_scale"])


def _distill_to_crop(o, b, c):
    return cosine_distillation_loss(o["region_embed"], o["crop_embed"], b["box_mask"], stop_gradient=True)


def _sd(target):
    def fn(o, b, c):
        return cosine_distillation_loss(o["region_embed"], o[target], b["box_mask"], stop_gradient=c.sd_stop_grad)

    return LossVariant(("region_embed", target), _MASK, fn)


def _concept(teacher):
    def fn(o, b, c):
        return concept_loss(o["region_embed"], o["concept_embed"], o[teacher], b["box_mask"], o["logit_scale"],
                            c.concept_temperature, c.concept_threshold)

    return LossVariant(("region_embed", "concept_embed", teacher, "logit_scale"), _MASK, fn)


_MASK, _MASK_IDS = ("box_mask",), ("box_mask", "lexeme_id")
_REGION_CAPTION = LossVariant(("region_embed", "region_text_embed", "logit_scale"), _MASK, _region_caption)

# The table. Its order is the order of the terms in ``total_loss`` (and of the floating-point sum).
LOSS_TERMS: tuple[LossTerm, ...] = (
    LossTerm(
        "gc", weights={"harmoclip": 1.0, "clip": 1.0, "fineclip": 1.0},
        variants={"": LossVariant(("image_embed", "text_embed", "logit_scale"), (), _gc)},
        form=("global_form", "softmax"),
        form_variants={
            "sigmoid": LossVariant(("image_embed", "text_embed", "logit_scale", "logit_bias"), (), _gc_sigmoid),
        },
    ),
    LossTerm(
        "lrc", weights={"harmoclip": 1.0}, select="lrc_negatives",
        variants={
            "batch": LossVariant(("region_embed", "lexeme_embed", "logit_scale"), _MASK_IDS, _lrc_batch),
            "vocab": LossVariant(("region_embed", "lexeme_vocab_embed", "logit_scale"), _MASK_IDS, _lrc_vocab),
        },
        options=(LossOption("lrc_duplicates", "positive", _LRC_DUPLICATES),
                 LossOption("lrc_temperature", 0.0, optional=True)),
        form=("lrc_form", "softmax"),
        form_variants={
            "sigmoid": LossVariant(("region_embed", "lexeme_embed", "logit_scale", "logit_bias"), _MASK_IDS,
                                   _lrc_sigmoid),
        },
        inputs=LossInput("lrc_text", "lexeme", provides=("lexeme_embed",), derive={"tokens": _lexeme_from_tokens},
                         options=(LossOption("lrc_token_source", "region_caption", tuple(_LRC_TOKEN_SOURCES),
                                             optional=True),)),
    ),
    LossTerm(
        "gr", weights={"harmoclip": 1.0}, select="gr_variant",
        variants={
            "a": _REGION_CAPTION,
            "b": LossVariant(("region_embed", "text_embed", "logit_scale"), _MASK, _pooled_region_global),
            "c": LossVariant(("region_embed", "crop_embed"), _MASK, _distill_to_crop),
        },
    ),
    LossTerm("rc", weights={"fineclip": 1.0}, variants={"": _REGION_CAPTION}),
    LossTerm(
        "sd", weights={"fineclip": 1.0, "clipself": 1.0}, select="sd_target",
        variants={"student": _sd("crop_embed"), "teacher": _sd("teacher_crop_embed")},
        options=(LossOption("sd_stop_grad", False),),
        presets={"clipself": {"sd_target": "teacher", "sd_stop_grad": True}},
    ),
    LossTerm(
        "concept", weights={"regionclip": 1.0}, select="concept_teacher",
        variants={"region": _concept("teacher_region_embed"), "crop": _concept("teacher_crop_embed")},
        options=(LossOption("concept_temperature", 0.01), LossOption("concept_threshold", 0.1)),
    ),
)


def check_loss_table(table, methods) -> None:
    """Raise ValueError if ``table`` is inconsistent (run on ``LOSS_TERMS`` at import)."""
    names = [t.name for t in table]
    if len(set(names)) != len(names):
        raise ValueError(f"loss table: duplicate term names {names}")
    fields = [opt.field for t in table for opt in t.all_options()]
    if len(set(fields)) != len(fields) or {"method", "weights"} & set(fields):
        raise ValueError(f"loss table: config fields must be unique and not 'method'/'weights': {fields}")
    for t in table:
        if not t.variants or (not t.select and list(t.variants) != [""]):
            raise ValueError(f"loss table: term {t.name!r} needs select= for several variants, or one variant keyed ''")
        if set(t.weights) - set(methods) or set(t.presets) - set(methods):
            raise ValueError(f"loss table: term {t.name!r} names unknown methods")
        own = {opt.field for opt in t.all_options()}
        if any(set(p) - own for p in t.presets.values()):
            raise ValueError(f"loss table: term {t.name!r} presets fields it does not own")
    for method in methods:
        if not any(t.weights.get(method, 0.0) for t in table):
            raise ValueError(f"loss table: method {method!r} enables no term")


check_loss_table(LOSS_TERMS, METHODS)
TERMS = tuple(t.name for t in LOSS_TERMS)
GR_VARIANTS = tuple(next(t for t in LOSS_TERMS if t.name == "gr").variants)


# ----------------------------------------------------------------------------------------------
# Config, requirements, total: all read off LOSS_TERMS
# ----------------------------------------------------------------------------------------------


def default_loss_config(method: str = "harmoclip") -> ml_collections.ConfigDict:
    """Loss config preset for ``method``: ``weights`` and every term's option fields (the method's name is kept
    once, in the experiment config's ``method``).

    Presets: harmoclip = GC + LRC + GR-a; clip = GC; fineclip = GC + SD (student crops, no
    stop-gradient) + RC; clipself = SD against frozen-teacher crops; regionclip = concept loss (set
    ``weights.gc = 1.0`` to add GC). A term is computed iff its weight is non-zero.
    """
    if method not in METHODS:
        raise ValueError(f"unknown loss method {method!r}; choose one of {METHODS}")
    config = ml_collections.ConfigDict()
    config.weights = ml_collections.ConfigDict({t.name: float(t.weights.get(method, 0.0)) for t in LOSS_TERMS})
    for term in LOSS_TERMS:
        for field, value in term.defaults(method).items():
            config[field] = value
    return config


def optional_loss_options() -> dict[str, LossOption]:
    """The optional loss fields (absent from the default configs, read with their default when absent), by name."""
    return {opt.field: opt for term in LOSS_TERMS for opt in term.all_options() if opt.optional}


def _check_choice(config, field, choices, default=None):
    value = config.get(field, default)
    if value not in choices:
        raise ValueError(f"loss config: {field}={value!r} is not one of {choices}")


def validate_loss_config(config) -> None:
    """Raise ValueError for unknown variants, options or term names."""
    known = tuple(t.name for t in LOSS_TERMS)
    unknown = set(config.weights.keys()) - set(known)
    if unknown:
        raise ValueError(f"loss config: unknown loss terms {sorted(unknown)} in weights; known terms: {known}")
    for term in LOSS_TERMS:
        for opt in term.all_options():
            if opt.choices is not None:
                _check_choice(config, opt.field, opt.choices, opt.default)
        # A form replaces the default variant only (the sigmoid LRC has in-batch negatives, not the vocabulary).
        if term.form and term.select and config.get(term.form[0], term.form[1]) != term.form[1] \
                and config[term.select] != next(iter(term.variants)):
            raise ValueError(f"loss config: {term.form[0]}={config[term.form[0]]!r} needs {term.select}="
                             f"{next(iter(term.variants))!r}, not {config[term.select]!r}")
        if term.derived_inputs(config) is not None and \
                not set(term.inputs.provides) & set(term.base_variant(config).outputs):
            selector = term.form[0] if term.form and config.get(*term.form) != term.form[1] else term.select
            raise ValueError(f"loss config: {term.inputs.field}={config[term.inputs.field]!r} derives "
                             f"{list(term.inputs.provides)}, which {selector}={config[selector]!r} does not read; "
                             f"use {term.select}={next(iter(term.variants))!r} or {term.inputs.field}="
                             f"{term.inputs.default!r}")
    temperature = config.get("lrc_temperature", 0.0)
    if not isinstance(temperature, (int, float)) or not 0.0 <= temperature < 1.0:
        raise ValueError(f"loss config: lrc_temperature={temperature!r} must be 0 (LRC shares the learnable "
                         "logit_scale) or a fixed temperature in (0, 1), e.g. 0.01")
    if not any(float(config.weights[t]) != 0.0 for t in config.weights.keys()):
        raise ValueError("loss config: every loss weight is zero; enable at least one term")


def _active(config) -> list[tuple[LossTerm, LossVariant]]:
    return [(t, t.variant(config)) for t in LOSS_TERMS if float(config.weights.get(t.name, 0.0)) != 0.0]


def pairwise_score_flops(config, batch_size: int, regions: int, embed_dim: int, form: str) -> float:
    """FLOPs of the pair scores (the N x N logits matmuls, 2 N^2 E per pass) of one step's value and gradient for a
    loss ``config`` on ``batch_size`` images with ``regions`` slots each, in ``form`` ("ring" or "dense", see
    ``contrastive_form``). Dense: forward + two backward matmuls; ring InfoNCE: per direction a forward, its
    recomputation and two backward (8 passes); ring sigmoid: 4. Negligible at a 256 batch, twice the model's
    at 32k images with 20 regions (655k x 655k), which XLA's cost analysis undercounts (it counts a loop body once)."""
    passes = {"dense": {"softmax": 3, "sigmoid": 3}, "ring": {"softmax": 8, "sigmoid": 4}}[form]
    regional = batch_size * regions
    items = {_gc: (batch_size, "softmax"), _gc_sigmoid: (batch_size, "sigmoid"), _lrc_batch: (regional, "softmax"),
             _region_caption: (regional, "softmax"), _pooled_region_global: (batch_size, "softmax")}
    total = 0.0
    for term, _ in _active(config):
        fn = term.base_variant(config).fn
        if fn is _lrc_sigmoid:  # no ring form: dense whatever the mesh
            total += 3 * 2.0 * regional**2 * embed_dim
        elif fn in items:
            n, kind = items[fn]
            total += passes[kind] * 2.0 * n**2 * embed_dim
    return total


def required_outputs(config) -> set[str]:
    """Output keys the model/trainer must compute for ``config`` (see the module contract)."""
    validate_loss_config(config)
    return {key for _, variant in _active(config) for key in variant.outputs}


def required_batch_keys(config) -> set[str]:
    """Batch keys ``total_loss`` reads for ``config``: box_mask for region terms, lexeme_id for LRC."""
    validate_loss_config(config)
    return {key for _, variant in _active(config) for key in variant.batch_keys}


def _require(mapping, keys, what, config):
    missing = sorted(k for k in keys if k not in mapping)
    if missing:
        raise KeyError(
            f"total_loss: {what} lacks {missing}, needed by the loss terms {[t.name for t, _ in _active(config)]}; "
            "compute them or disable those terms"
        )


def total_loss(config, outputs, batch):
    """Weighted sum of the enabled terms.

    Returns:
      (total, terms) where ``terms`` maps each enabled term name to its UNWEIGHTED value and
      ``"total"`` to the weighted sum.
    """
    _require(outputs, required_outputs(config), "outputs", config)
    _require(batch, required_batch_keys(config), "batch", config)
    if "box_mask" in batch:
        batch = {**batch, "box_mask": jnp.asarray(batch["box_mask"]).astype(bool)}
    terms = {}
    for term, variant in _active(config):
        terms[term.name] = variant.fn(
            {k: outputs[k] for k in variant.outputs}, {k: batch[k] for k in variant.batch_keys}, config
        )
    total = sum(float(config.weights[t]) * v for t, v in terms.items())
    terms["total"] = total
    return total, terms
