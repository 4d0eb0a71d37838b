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
  crop_embed           (B, T, E)  student ``encode_image`` of each region's (1.5x) crop
  teacher_crop_embed   (B, T, E)  frozen teacher's crop embeddings (CLIPSelf; concept pseudo labels)
  teacher_region_embed (B, T, E)  frozen teacher's RoIAlign region features (concept pseudo labels)
  concept_embed        (K, E)     concept vocabulary (RegionCLIP)
  lexeme_vocab_embed   (V, E)     lexeme vocabulary (LRC with ``lrc_negatives="vocab"``)
  logit_scale          ()         log of the contrastive scale, as in CLIP (scale = exp(logit_scale))

``batch`` holds ``box_mask (B, T) bool`` (which region slots are real) and ``lexeme_id (B, T) int``
(the lexeme's identity: equal ids = the same lexeme string; with vocabulary negatives it indexes
``lexeme_vocab_embed`` and must lie in [0, V) for every valid box).

Masks are explicit everywhere: padded region slots are excluded from the softmax denominators (as
rows and as columns) and from every average, so their content never changes a loss or a gradient.

Sharding: the losses are written on the global batch. Under ``jax.jit`` with the batch sharded over
a ``data`` mesh axis, GSPMD computes exactly the global result (every device's regions are negatives
for every other device's), with gradients flowing to all shards (tests/test_losses.py proves it).

Terms (``total_loss`` returns each one unweighted, plus ``total``):
  gc      symmetric InfoNCE image <-> caption (open_clip ClipLoss formula).
  lrc     Lexeme-Region Contrastive: regions <-> lexemes, symmetric InfoNCE over the valid regions of
          the global batch; same-lexeme pairs are extra positives (or masked out of the negatives); or
          regions classified against a fixed lexeme vocabulary.
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

import jax
import jax.numpy as jnp
import ml_collections

__all__ = [
    "METHODS",
    "GR_VARIANTS",
    "l2_normalize",
    "masked_info_nce",
    "global_contrastive_loss",
    "lexeme_region_contrastive_loss",
    "lexeme_vocab_contrastive_loss",
    "region_caption_loss",
    "pooled_region_global_loss",
    "cosine_distillation_loss",
    "concept_pseudo_labels",
    "concept_loss",
    "default_loss_config",
    "validate_loss_config",
    "required_outputs",
    "required_batch_keys",
    "total_loss",
]

METHODS = ("harmoclip", "clip", "fineclip", "clipself", "regionclip")
GR_VARIANTS = ("a", "b", "c")
TERMS = ("gc", "lrc", "gr", "rc", "sd", "concept")
_LRC_NEGATIVES = ("batch", "vocab")
_LRC_DUPLICATES = ("positive", "mask")
_SD_TARGETS = ("student", "teacher")
_CONCEPT_TEACHERS = ("region", "crop")


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """x / max(||x||, eps) in float32 (like torch F.normalize); zero vectors stay zero, never NaN."""
    x = jnp.asarray(x, jnp.float32)
    # Clamp the squared norm before the sqrt: sqrt's derivative at 0 is inf, and inf * 0 = NaN
    # would leak into the gradient of an all-zero (e.g. fully padded, pooled) vector.
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def _masked_mean(values, mask):
    """Mean of ``values`` over ``mask``; 0 when nothing is valid (no NaN)."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _masked_logsumexp(logits, mask):
    """Row-wise logsumexp over the True entries of ``mask``; -inf for rows with none (never NaN)."""
    masked = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(masked, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), jax.lax.stop_gradient(row_max), 0.0)
    summed = jnp.sum(jnp.where(mask, jnp.exp(logits - row_max), 0.0), axis=-1)
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
    queries, keys = l2_normalize(queries), l2_normalize(keys)
    n = queries.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
    eye = jnp.eye(n, dtype=bool)
    positive = eye if positive is None else (positive.astype(bool) | eye)
    allowed = jnp.ones((n, n), bool) if negative is None else (negative.astype(bool) | positive)
    logits = jnp.exp(logit_scale) * queries @ keys.T
    # Columns a row may see: the valid ones it is allowed to compare with.
    q_to_k = _multi_positive_nce(jnp.where(allowed, logits, -jnp.inf), valid, valid, positive & allowed)
    k_to_q = _multi_positive_nce(jnp.where(allowed.T, logits.T, -jnp.inf), valid, valid, positive.T & allowed.T)
    return (q_to_k + k_to_q) / 2


def _flatten_regions(x):
    return x.reshape(-1, x.shape[-1])


# ----------------------------------------------------------------------------------------------
# Loss terms
# ----------------------------------------------------------------------------------------------


def global_contrastive_loss(image_embed, text_embed, logit_scale):
    """GC: symmetric InfoNCE between image i and caption i over the global batch (open_clip ClipLoss)."""
    return masked_info_nce(image_embed, text_embed, logit_scale)


def lexeme_region_contrastive_loss(region_embed, lexeme_embed, box_mask, lexeme_id, logit_scale, duplicates="positive"):
    """LRC with in-batch negatives: regions <-> lexemes over the valid regions of the global batch.

    Region j's positive is its own lexeme. Other regions whose lexeme has the same ``lexeme_id``
    (the same string) are extra positives (``duplicates="positive"``) or are removed from the
    negatives (``duplicates="mask"``); either way they are never pushed apart.
    """
    if duplicates not in _LRC_DUPLICATES:
        raise ValueError(f"lrc duplicates must be one of {_LRC_DUPLICATES}, got {duplicates!r}")
    ids = lexeme_id.reshape(-1)
    same = ids[:, None] == ids[None, :]
    if duplicates == "positive":
        positive, negative = same, None
    else:
        positive, negative = None, ~same
    return masked_info_nce(
        _flatten_regions(region_embed),
        _flatten_regions(lexeme_embed),
        logit_scale,
        valid=box_mask.reshape(-1),
        positive=positive,
        negative=negative,
    )


def lexeme_vocab_contrastive_loss(region_embed, lexeme_vocab_embed, box_mask, lexeme_id, logit_scale):
    """LRC against a fixed lexeme vocabulary: each valid region is classified over all V lexemes.

    One direction only (region -> vocabulary): vocabulary entries absent from the batch have no
    region to point at. ``lexeme_id`` indexes the vocabulary; ids of padded slots are ignored.
    """
    regions = l2_normalize(_flatten_regions(region_embed))
    vocab = l2_normalize(lexeme_vocab_embed)
    logits = jnp.exp(logit_scale) * regions @ vocab.T  # (N, V)
    target = lexeme_id.reshape(-1)[:, None] == jnp.arange(vocab.shape[0])[None, :]
    return _multi_positive_nce(logits, box_mask.reshape(-1), jnp.ones((vocab.shape[0],), bool), target)


def region_caption_loss(region_embed, region_text_embed, box_mask, logit_scale):
    """GR-a / FineCLIP L_RC: symmetric InfoNCE region j <-> its own region caption, valid regions only."""
    return masked_info_nce(
        _flatten_regions(region_embed),
        _flatten_regions(region_text_embed),
        logit_scale,
        valid=box_mask.reshape(-1),
    )


def pooled_region_global_loss(region_embed, text_embed, box_mask, logit_scale):
    """GR-b: mean of an image's (normalised) valid regions <-> its global caption, InfoNCE over the batch.

    Images without any valid region take part neither as rows nor as columns.
    """
    regions = l2_normalize(region_embed)
    weights = box_mask.astype(regions.dtype)[..., None]
    pooled = jnp.sum(regions * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    return masked_info_nce(pooled, text_embed, logit_scale, valid=jnp.any(box_mask, axis=1))


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
    scale = jax.lax.stop_gradient(jnp.exp(logit_scale))
    concepts = l2_normalize(concept_embed)
    logits = scale * l2_normalize(region_embed) @ concepts.T  # (B, T, K)
    targets = (labels[..., None] == jnp.arange(concepts.shape[0])).astype(logits.dtype)
    # Numerically stable BCE with logits: max(z, 0) - z*y + log(1 + exp(-|z|)).
    bce = jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return _masked_mean(jnp.sum(bce, axis=-1), keep)


# ----------------------------------------------------------------------------------------------
# Config, requirements, total
# ----------------------------------------------------------------------------------------------


def default_loss_config(method: str = "harmoclip") -> ml_collections.ConfigDict:
    """Loss config preset for ``method``.

    Presets: harmoclip = GC + LRC + GR-a; clip = GC; fineclip = GC + SD (student crops, no
    stop-gradient) + RC; clipself = SD against frozen-teacher crops; regionclip = concept loss (set
    ``weights.gc = 1.0`` to add GC). A term is computed iff its weight is non-zero.
    """
    if method not in METHODS:
        raise ValueError(f"unknown loss method {method!r}; choose one of {METHODS}")
    config = ml_collections.ConfigDict()
    config.method = method
    config.weights = ml_collections.ConfigDict({term: 0.0 for term in TERMS})
    config.gr_variant = "a"  # a: region<->region caption, b: pooled regions<->caption, c: 1-cos vs sg(crop)
    config.lrc_negatives = "batch"  # batch: in-batch lexemes; vocab: fixed lexeme vocabulary
    config.lrc_duplicates = "positive"  # positive: same lexeme_id = positive; mask: drop from negatives
    config.sd_target = "student"  # student: crop_embed; teacher: teacher_crop_embed
    config.sd_stop_grad = False
    config.concept_teacher = "region"  # region: teacher_region_embed; crop: teacher_crop_embed
    config.concept_temperature = 0.01
    config.concept_threshold = 0.1
    if method == "harmoclip":
        config.weights.update(gc=1.0, lrc=1.0, gr=1.0)
    elif method == "clip":
        config.weights.gc = 1.0
    elif method == "fineclip":
        config.weights.update(gc=1.0, sd=1.0, rc=1.0)
    elif method == "clipself":
        config.weights.sd = 1.0
        config.sd_target, config.sd_stop_grad = "teacher", True
    elif method == "regionclip":
        config.weights.concept = 1.0
    return config


def _check_choice(config, field, choices):
    value = config[field]
    if value not in choices:
        raise ValueError(f"loss config: {field}={value!r} is not one of {choices}")


def validate_loss_config(config) -> None:
    """Raise ValueError for unknown methods, variants, options or term names."""
    if config.method not in METHODS:
        raise ValueError(f"loss config: unknown method {config.method!r}; choose one of {METHODS}")
    unknown = set(config.weights.keys()) - set(TERMS)
    if unknown:
        raise ValueError(f"loss config: unknown loss terms {sorted(unknown)} in weights; known terms: {TERMS}")
    _check_choice(config, "gr_variant", GR_VARIANTS)
    _check_choice(config, "lrc_negatives", _LRC_NEGATIVES)
    _check_choice(config, "lrc_duplicates", _LRC_DUPLICATES)
    _check_choice(config, "sd_target", _SD_TARGETS)
    _check_choice(config, "concept_teacher", _CONCEPT_TEACHERS)
    if not any(float(config.weights[t]) != 0.0 for t in config.weights.keys()):
        raise ValueError("loss config: every loss weight is zero; enable at least one term")


def _active_terms(config):
    return [t for t in TERMS if float(config.weights.get(t, 0.0)) != 0.0]


def required_outputs(config) -> set[str]:
    """Output keys the model/trainer must compute for ``config`` (see the module contract)."""
    validate_loss_config(config)
    needed: set[str] = set()
    for term in _active_terms(config):
        if term == "gc":
            needed |= {"image_embed", "text_embed", "logit_scale"}
        elif term == "lrc":
            lexemes = "lexeme_embed" if config.lrc_negatives == "batch" else "lexeme_vocab_embed"
            needed |= {"region_embed", lexemes, "logit_scale"}
        elif term == "gr":
            needed |= {
                "a": {"region_embed", "region_text_embed", "logit_scale"},
                "b": {"region_embed", "text_embed", "logit_scale"},
                "c": {"region_embed", "crop_embed"},
            }[config.gr_variant]
        elif term == "rc":
            needed |= {"region_embed", "region_text_embed", "logit_scale"}
        elif term == "sd":
            needed |= {"region_embed", "crop_embed" if config.sd_target == "student" else "teacher_crop_embed"}
        elif term == "concept":
            teacher = "teacher_region_embed" if config.concept_teacher == "region" else "teacher_crop_embed"
            needed |= {"region_embed", "concept_embed", teacher, "logit_scale"}
    return needed


def required_batch_keys(config) -> set[str]:
    """Batch keys ``total_loss`` reads for ``config``: box_mask for region terms, lexeme_id for LRC."""
    outputs = required_outputs(config)
    keys = {"box_mask"} if "region_embed" in outputs else set()
    if float(config.weights.get("lrc", 0.0)) != 0.0:
        keys.add("lexeme_id")
    return keys


def _require(mapping, keys, what, config):
    missing = sorted(k for k in keys if k not in mapping)
    if missing:
        raise KeyError(
            f"total_loss: {what} lacks {missing}, needed by loss config method={config.method!r} "
            f"(terms {_active_terms(config)}); compute them or disable those terms"
        )


def total_loss(config, outputs, batch):
    """Weighted sum of the enabled terms.

    Returns:
      (total, terms) where ``terms`` maps each enabled term name to its UNWEIGHTED value and
      ``"total"`` to the weighted sum.
    """
    _require(outputs, required_outputs(config), "outputs", config)
    _require(batch, required_batch_keys(config), "batch", config)
    o = outputs
    scale = o.get("logit_scale")
    box_mask = batch.get("box_mask")
    if box_mask is not None:
        box_mask = jnp.asarray(box_mask).astype(bool)
    terms = {}
    for term in _active_terms(config):
        if term == "gc":
            value = global_contrastive_loss(o["image_embed"], o["text_embed"], scale)
        elif term == "lrc":
            if config.lrc_negatives == "batch":
                value = lexeme_region_contrastive_loss(
                    o["region_embed"], o["lexeme_embed"], box_mask, batch["lexeme_id"], scale, config.lrc_duplicates
                )
            else:
                value = lexeme_vocab_contrastive_loss(
                    o["region_embed"], o["lexeme_vocab_embed"], box_mask, batch["lexeme_id"], scale
                )
        elif term == "gr":
            if config.gr_variant == "a":
                value = region_caption_loss(o["region_embed"], o["region_text_embed"], box_mask, scale)
            elif config.gr_variant == "b":
                value = pooled_region_global_loss(o["region_embed"], o["text_embed"], box_mask, scale)
            else:
                value = cosine_distillation_loss(o["region_embed"], o["crop_embed"], box_mask, stop_gradient=True)
        elif term == "rc":
            value = region_caption_loss(o["region_embed"], o["region_text_embed"], box_mask, scale)
        elif term == "sd":
            target = o["crop_embed"] if config.sd_target == "student" else o["teacher_crop_embed"]
            value = cosine_distillation_loss(o["region_embed"], target, box_mask, stop_gradient=config.sd_stop_grad)
        else:  # concept
            teacher = o["teacher_region_embed"] if config.concept_teacher == "region" else o["teacher_crop_embed"]
            value = concept_loss(
                o["region_embed"],
                o["concept_embed"],
                teacher,
                box_mask,
                scale,
                config.concept_temperature,
                config.concept_threshold,
            )
        terms[term] = value
    total = sum(float(config.weights[t]) * v for t, v in terms.items())
    terms["total"] = total
    return total, terms
