"""HarmoCLIP loss family vs NumPy references, masking, duplicates, config API, and global-batch sharding."""
import contextlib
import math

import jax
import jax.numpy as jnp

import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from harmoclip_jax import losses as L

B, T, E, K, V = 8, 3, 5, 16, 7


# ---------------------------------------------------------------- numpy references (plain loops)


def np_normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_row_nce(logits, row_valid, allowed, positive):
    """mean over valid rows of -log(sum_{allowed positives} e^l / sum_{allowed} e^l)."""
    losses = []
    for i in range(logits.shape[0]):
        if not row_valid[i]:
            continue
        cols = [j for j in range(logits.shape[1]) if allowed[i, j]]
        pos = [j for j in cols if positive[i, j]]
        if not pos:
            continue
        num = sum(math.exp(logits[i, j]) for j in pos)
        den = sum(math.exp(logits[i, j]) for j in cols)
        losses.append(-math.log(num / den))
    return float(np.mean(losses)) if losses else 0.0


def np_symmetric_nce(q, k, scale, valid, positive=None, negative=None):
    n = q.shape[0]
    logits = scale * np_normalize(q) @ np_normalize(k).T
    eye = np.eye(n, dtype=bool)
    positive = eye if positive is None else (positive | eye)
    allowed = np.ones((n, n), bool) if negative is None else (negative | positive)
    return 0.5 * (
        np_row_nce(logits, valid, allowed & valid[None, :], positive)
        + np_row_nce(logits.T, valid, allowed.T & valid[None, :], positive.T)
    )


def np_cos_distill(r, t, mask):
    cos = np.sum(np_normalize(r) * np_normalize(t), axis=-1)
    return float(np.sum((1 - cos) * mask) / max(mask.sum(), 1))


def np_concept(region, concept, teacher, mask, log_scale, temperature, threshold):
    tl = np_normalize(teacher) @ np_normalize(concept).T / temperature
    probs = np.exp(tl - tl.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    total, count = 0.0, 0
    for b in range(region.shape[0]):
        for t in range(region.shape[1]):
            if not mask[b, t] or probs[b, t].max() <= threshold:
                continue
            label = int(np.argmax(probs[b, t]))
            z = math.exp(log_scale) * np_normalize(region[b, t]) @ np_normalize(concept).T
            y = np.zeros(len(z))
            y[label] = 1
            total += sum(-(y[c] * math.log(1 / (1 + math.exp(-z[c]))) + (1 - y[c]) * math.log(1 - 1 / (1 + math.exp(-z[c])))) for c in range(len(z)))
            count += 1
    return total / max(count, 1)


# ---------------------------------------------------------------- fixtures


def make_inputs(seed=0, b=B):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    box_mask = rng.random((b, T)) < 0.7
    box_mask[0] = False  # an image without regions
    box_mask[1] = True
    lexeme_id = rng.integers(0, 4, size=(b, T)).astype(np.int32)  # few ids: many duplicates
    teacher_region = f(b, T, E)
    concept = f(K, E)
    # Make some teacher regions confidently match a concept so pseudo labels are kept and dropped.
    teacher_region[::2, 0] = concept[1] * 3
    teacher_region[1::2, 1] = 0.0  # cosine 0 to every concept: uniform 1/K < threshold, dropped
    outputs = dict(
        image_embed=f(b, E),
        text_embed=f(b, E),
        region_embed=f(b, T, E),
        region_text_embed=f(b, T, E),
        lexeme_embed=f(b, T, E),
        crop_embed=f(b, T, E),
        teacher_crop_embed=f(b, T, E),
        teacher_region_embed=teacher_region,
        concept_embed=concept,
        lexeme_vocab_embed=f(V, E),
        logit_scale=np.float32(math.log(4.0)),
    )
    batch = dict(box_mask=box_mask, lexeme_id=lexeme_id)
    return outputs, batch


# ---------------------------------------------------------------- GC


def _open_clip_loss_module():
    from harmoclip_jax.testing.reference import open_clip_file_module

    return open_clip_file_module("loss")  # loss.py imports only torch, not torchvision


def test_gc_equals_open_clip_clip_loss():
    import torch
    outputs, _ = make_inputs(1)
    clip_loss = _open_clip_loss_module().ClipLoss()
    img, txt = np_normalize(outputs["image_embed"]), np_normalize(outputs["text_embed"])
    expected = clip_loss(torch.tensor(img), torch.tensor(txt), torch.tensor(math.exp(outputs["logit_scale"]))).item()
    got = L.global_contrastive_loss(outputs["image_embed"], outputs["text_embed"], outputs["logit_scale"])
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_gc_hand_checked():
    eye = np.eye(2, dtype=np.float32)
    # logits = identity: each row's CE is -log(e / (e + 1)) = log(1 + 1/e)
    np.testing.assert_allclose(float(L.global_contrastive_loss(eye, eye * 3, 0.0)), math.log(1 + math.exp(-1)), rtol=1e-6)


# ---------------------------------------------------------------- LRC


def test_lrc_duplicates_are_positives():
    outputs, batch = make_inputs(2)
    mask, ids = batch["box_mask"].reshape(-1), batch["lexeme_id"].reshape(-1)
    same = ids[:, None] == ids[None, :]
    assert (same & ~np.eye(len(ids), dtype=bool) & mask[:, None] & mask[None, :]).any()  # the test has duplicates
    args = (outputs["region_embed"], outputs["lexeme_embed"], batch["box_mask"], batch["lexeme_id"], outputs["logit_scale"])
    q, k = outputs["region_embed"].reshape(-1, E), outputs["lexeme_embed"].reshape(-1, E)
    scale = math.exp(outputs["logit_scale"])
    expected_pos = np_symmetric_nce(q, k, scale, mask, positive=same)
    expected_mask = np_symmetric_nce(q, k, scale, mask, negative=~same)
    plain = np_symmetric_nce(q, k, scale, mask)
    np.testing.assert_allclose(float(L.lexeme_region_contrastive_loss(*args)), expected_pos, rtol=1e-5)
    np.testing.assert_allclose(float(L.lexeme_region_contrastive_loss(*args, duplicates="mask")), expected_mask, rtol=1e-5)
    assert abs(expected_pos - plain) > 1e-3 and abs(expected_mask - plain) > 1e-3


def test_lrc_hand_checked_duplicate_pair():
    # Two regions, both "dog" (same id), lexeme embeddings identical: with duplicates as positives
    # each row's positives cover the whole softmax, so the loss is exactly 0.
    regions = np.array([[[1.0, 0.0], [0.6, 0.8]]], np.float32)
    lexemes = np.array([[[1.0, 0.0], [1.0, 0.0]]], np.float32)
    mask, ids = np.ones((1, 2), bool), np.zeros((1, 2), np.int32)
    assert float(L.lexeme_region_contrastive_loss(regions, lexemes, mask, ids, 0.0)) == pytest.approx(0.0, abs=1e-6)
    # As distinct lexemes (ids 0, 1) it is ordinary InfoNCE: rows regions->lexemes, logits [[1,1],[.6,.6]]
    # -> each row log 2; lexemes->regions logits [[1,.6],[1,.6]] -> row 0: log(1+e^-.4), row 1: log(1+e^.4)
    distinct = float(L.lexeme_region_contrastive_loss(regions, lexemes, mask, np.array([[0, 1]], np.int32), 0.0))
    expected = 0.5 * (math.log(2) + 0.5 * (math.log(1 + math.exp(-0.4)) + math.log(1 + math.exp(0.4))))
    assert distinct == pytest.approx(expected, rel=1e-6)


def test_lrc_vocab_negatives():
    outputs, batch = make_inputs(3)
    batch["lexeme_id"] = batch["lexeme_id"] % V
    regions = np_normalize(outputs["region_embed"].reshape(-1, E))
    logits = math.exp(outputs["logit_scale"]) * regions @ np_normalize(outputs["lexeme_vocab_embed"]).T
    target = batch["lexeme_id"].reshape(-1)[:, None] == np.arange(V)[None, :]
    expected = np_row_nce(logits, batch["box_mask"].reshape(-1), np.ones_like(target), target)
    got = L.lexeme_vocab_contrastive_loss(
        outputs["region_embed"], outputs["lexeme_vocab_embed"], batch["box_mask"], batch["lexeme_id"], outputs["logit_scale"]
    )
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_gradients_stay_finite_at_clips_maximal_scale():
    """At exp(logit_scale) = 100 (CLIP's clamp, OpenAI CLIP's trained value) a negative can score ~200 above a
    positive: exp of it overflows float32. Masked entries must not turn that inf into a NaN gradient."""
    e = np.eye(3, dtype=np.float32)
    queries, keys = e[[0, 1, 2]], np.stack([-e[0], e[1], e[0]])  # row 0: positive cos -1, a negative cos +1
    same = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 1]], bool)  # and with extra positives (LRC's duplicates)
    for positive in (None, same):
        loss = lambda q, k: L.masked_info_nce(q, k, np.float32(math.log(100.0)), positive=positive)  # noqa: E731
        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(queries, keys)
        assert np.isfinite(float(value)) and all(np.isfinite(np.asarray(g)).all() for g in grads)
        assert float(value) > 10.0  # row 0's loss is ~200 / 2 / 3 nats: large, and finite


def test_lrc_fixed_temperature():
    """lrc_temperature=T: LRC's logits use the constant 1/T (batch and vocabulary negatives), GC keeps the learnable
    scale, and the scale's gradient comes from GC alone; 0 (absent) is the shared scale; bad values are refused."""
    def with_temperature(temperature, **overrides):
        config = _config("harmoclip", overrides)
        config.weights.update(gr=0.0)
        config.lrc_temperature = temperature  # an optional field: absent from the defaults
        return config

    outputs, batch = make_inputs(13)
    batch["lexeme_id"] = batch["lexeme_id"] % V
    for negatives in ("batch", "vocab"):
        config = with_temperature(0.05, lrc_negatives=negatives)
        shared_scale = with_temperature(0.0, lrc_negatives=negatives)
        _, terms = L.total_loss(config, _select(outputs, config), batch)
        fixed = {**outputs, "logit_scale": np.float32(math.log(20.0))}
        _, want = L.total_loss(shared_scale, _select(fixed, config), batch)
        np.testing.assert_allclose(float(terms["lrc"]), float(want["lrc"]), rtol=1e-5)
        _, shared = L.total_loss(shared_scale, _select(outputs, config), batch)
        assert abs(float(shared["lrc"]) - float(terms["lrc"])) > 1e-3  # exp(logit_scale) = 4 here, not 20
        config.weights.update(gc=0.0)  # LRC alone: nothing reaches the learnable scale
        grads = jax.grad(lambda o: L.total_loss(config, o, batch)[0])(_select(outputs, config))
        assert float(grads["logit_scale"]) == 0.0 and np.asarray(grads["region_embed"]).any()
    for bad in (-0.1, 1.5, "0.01"):
        with pytest.raises(ValueError, match="lrc_temperature"):
            L.required_outputs(with_temperature(bad))


# ---------------------------------------------------------------- GR variants, SD, concept


def test_gr_a_is_region_caption_infonce():
    outputs, batch = make_inputs(4)
    mask = batch["box_mask"].reshape(-1)
    expected = np_symmetric_nce(
        outputs["region_embed"].reshape(-1, E), outputs["region_text_embed"].reshape(-1, E), math.exp(outputs["logit_scale"]), mask
    )
    got = L.region_caption_loss(outputs["region_embed"], outputs["region_text_embed"], batch["box_mask"], outputs["logit_scale"])
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_gr_b_pooled_regions_vs_caption():
    outputs, batch = make_inputs(5)
    mask = batch["box_mask"]
    pooled = np.stack(
        [np_normalize(outputs["region_embed"][b])[mask[b]].mean(0) if mask[b].any() else np.zeros(E) for b in range(B)]
    )
    expected = np_symmetric_nce(pooled, outputs["text_embed"], math.exp(outputs["logit_scale"]), mask.any(1))
    got = L.pooled_region_global_loss(outputs["region_embed"], outputs["text_embed"], mask, outputs["logit_scale"])
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_gr_c_and_sd_cosine_hand_checked_and_stop_gradient():
    region = np.array([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]], np.float32)
    crop = np.array([[[0.0, 1.0], [0.0, 1.0], [-1.0, -1.0]]], np.float32)
    mask = np.array([[True, True, False]])
    # 1 - cos: 1 and 0 on the valid boxes; the padded third box (cos -1) is ignored
    assert float(L.cosine_distillation_loss(region, crop, mask)) == pytest.approx(0.5, abs=1e-6)
    grad_sg = jax.grad(lambda c: L.cosine_distillation_loss(region, c, mask, stop_gradient=True))(crop)
    grad_live = jax.grad(lambda c: L.cosine_distillation_loss(region, c, mask, stop_gradient=False))(crop)
    assert not np.asarray(grad_sg).any() and np.asarray(grad_live).any()
    outputs, batch = make_inputs(6)
    expected = np_cos_distill(outputs["region_embed"], outputs["crop_embed"], batch["box_mask"])
    got = L.cosine_distillation_loss(outputs["region_embed"], outputs["crop_embed"], batch["box_mask"])
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_concept_loss_and_pseudo_labels():
    outputs, batch = make_inputs(7)
    labels, keep = L.concept_pseudo_labels(outputs["teacher_region_embed"], outputs["concept_embed"], batch["box_mask"])
    keep = np.asarray(keep)
    assert keep.any() and (batch["box_mask"] & ~keep).any()  # some regions kept, some valid ones dropped
    assert (np.asarray(labels)[::2, 0][keep[::2, 0]] == 1).all()
    args = (outputs["region_embed"], outputs["concept_embed"], outputs["teacher_region_embed"], batch["box_mask"], outputs["logit_scale"])
    expected = np_concept(*args, 0.01, 0.1)
    np.testing.assert_allclose(float(L.concept_loss(*args)), expected, rtol=1e-5)
    # the scale is detached: no gradient to logit_scale
    g = jax.grad(lambda s: L.concept_loss(*args[:4], s))(outputs["logit_scale"])
    assert float(g) == 0.0


# ---------------------------------------------------------------- masking


ALL_VARIANT_CONFIGS = [
    ("harmoclip", {}),
    ("harmoclip", {"gr_variant": "b"}),
    ("harmoclip", {"gr_variant": "c"}),
    ("harmoclip", {"lrc_negatives": "vocab"}),
    ("harmoclip", {"lrc_duplicates": "mask"}),
    ("fineclip", {}),
    ("clipself", {}),
    ("regionclip", {"concept_teacher": "crop", "weights.gc": 1.0}),
]


def _config(method, overrides):
    config = L.default_loss_config(method)
    config.update_from_flattened_dict(overrides)
    return config


def _select(outputs, config):
    needed = L.required_outputs(config)
    return {k: v for k, v in outputs.items() if k in needed}


@pytest.mark.parametrize("method,overrides", ALL_VARIANT_CONFIGS)
def test_padded_regions_change_nothing(method, overrides):
    config = _config(method, overrides)
    outputs, batch = make_inputs(8)
    batch["lexeme_id"] = batch["lexeme_id"] % V
    outputs = _select(outputs, config)
    pad = ~batch["box_mask"]
    garbage_outputs = dict(outputs)
    rng = np.random.default_rng(99)
    for key, value in outputs.items():
        if value.ndim == 3:  # (B, T, E): overwrite padded slots with large random garbage
            garbage_outputs[key] = np.where(pad[..., None], 50 * rng.normal(size=value.shape), value).astype(np.float32)
    garbage_batch = dict(batch, lexeme_id=np.where(pad, rng.integers(0, V, pad.shape), batch["lexeme_id"]).astype(np.int32))

    @jax.jit
    def loss_and_grad(o, b):
        return jax.value_and_grad(lambda o: L.total_loss(config, o, b)[0])(o)

    value, grads = loss_and_grad(outputs, batch)
    value_g, grads_g = loss_and_grad(garbage_outputs, garbage_batch)
    assert np.isfinite(float(value))
    np.testing.assert_allclose(float(value_g), float(value), rtol=1e-5)
    for key in outputs:
        g, gg = np.asarray(grads[key]), np.asarray(grads_g[key])
        np.testing.assert_allclose(gg, g, atol=1e-6, err_msg=key)
        if g.ndim == 3:
            assert not g[pad].any(), f"padded {key} slots received gradient"


def test_no_valid_regions_gives_zero_not_nan():
    outputs, batch = make_inputs(9)
    batch["box_mask"][:] = False
    config = _config("harmoclip", {})
    value, terms = jax.jit(lambda o, b: L.total_loss(config, o, b))(_select(outputs, config), batch)
    assert float(terms["lrc"]) == 0.0 and float(terms["gr"]) == 0.0 and np.isfinite(float(value))
    grads = jax.jit(jax.grad(lambda o: L.total_loss(config, o, batch)[0]))(_select(outputs, config))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads.values())


# ---------------------------------------------------------------- total_loss and config API


def test_total_loss_terms_and_weights():
    outputs, batch = make_inputs(10)
    config = _config("harmoclip", {})
    config.weights.update(gc=1.0, lrc=0.5, gr=2.0)
    total, terms = L.total_loss(config, _select(outputs, config), batch)
    assert set(terms) == {"gc", "lrc", "gr", "total"}
    np.testing.assert_allclose(float(terms["gc"]), float(L.global_contrastive_loss(outputs["image_embed"], outputs["text_embed"], outputs["logit_scale"])), rtol=1e-6)
    np.testing.assert_allclose(float(total), float(terms["gc"] + 0.5 * terms["lrc"] + 2.0 * terms["gr"]), rtol=1e-6)
    assert float(terms["total"]) == float(total)


def test_presets_and_required_outputs():
    expect = {
        "harmoclip": {"image_embed", "text_embed", "region_embed", "lexeme_embed", "region_text_embed", "logit_scale"},
        "clip": {"image_embed", "text_embed", "logit_scale"},
        "fineclip": {"image_embed", "text_embed", "region_embed", "crop_embed", "region_text_embed", "logit_scale"},
        "clipself": {"region_embed", "teacher_crop_embed"},
        "regionclip": {"region_embed", "concept_embed", "teacher_region_embed", "logit_scale"},
    }
    for method, keys in expect.items():
        assert L.required_outputs(L.default_loss_config(method)) == keys, method
    fine = L.default_loss_config("fineclip")
    assert fine.sd_stop_grad is False and fine.sd_target == "student"
    assert L.default_loss_config("clipself").sd_stop_grad is True
    assert L.required_batch_keys(L.default_loss_config("harmoclip")) == {"box_mask", "lexeme_id"}
    assert L.required_batch_keys(L.default_loss_config("clip")) == set()
    vocab = _config("harmoclip", {"lrc_negatives": "vocab", "gr_variant": "c"})
    assert L.required_outputs(vocab) == {"image_embed", "text_embed", "region_embed", "lexeme_vocab_embed", "crop_embed", "logit_scale"}


def test_fineclip_sd_gradient_reaches_crops_and_clipself_does_not():
    outputs, batch = make_inputs(11)
    for method, key, flows in [("fineclip", "crop_embed", True), ("clipself", "teacher_crop_embed", False)]:
        config = L.default_loss_config(method)
        grads = jax.grad(lambda o: L.total_loss(config, o, batch)[0])(_select(outputs, config))
        assert bool(np.asarray(grads[key]).any()) == flows, method


def test_bad_config_and_missing_outputs_raise():
    with pytest.raises(ValueError, match="unknown loss method 'siglip'"):
        L.default_loss_config("siglip")
    for field, value in [("gr_variant", "d"), ("lrc_negatives", "global"), ("lrc_duplicates", "drop"), ("sd_target", "x")]:
        config = L.default_loss_config("harmoclip")
        config[field] = value
        with pytest.raises(ValueError, match=field):
            L.required_outputs(config)
    config = L.default_loss_config("harmoclip")
    outputs, batch = make_inputs(12)
    del outputs["lexeme_embed"]
    with pytest.raises(KeyError, match="lexeme_embed"):
        L.total_loss(config, outputs, batch)


# ---------------------------------------------------------------- sharded inputs: the losses see the global batch
# The losses are plain jnp math without collectives, so under jit GSPMD computes the same global-batch values
# whatever the inputs' sharding. What the check below guards is that they STAY global-batch math: a loss with
# per-shard reductions (e.g. wrapped in shard_map, each device seeing only its own negatives) fails it, as the
# last test demonstrates. It says nothing about how the trainer shards its batch.


def _sharded_inputs(method, overrides):
    config = _config(method, overrides)
    outputs, batch = make_inputs(13, b=16)
    batch["lexeme_id"] = batch["lexeme_id"] % V
    outputs = _select(outputs, config)
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    unbatched = {"concept_embed", "lexeme_vocab_embed", "logit_scale"}  # vocabularies and the scale
    specs = ({k: P() if k in unbatched else P("data") for k in outputs}, {k: P("data") for k in batch})
    sharded = tuple({k: jax.device_put(v, NamedSharding(mesh, spec[k])) for k, v in tree.items()}
                    for tree, spec in zip((outputs, batch), specs))
    if "region_embed" in outputs:
        assert len(sharded[0]["region_embed"].sharding.device_set) == 8
    return config, mesh, specs, (outputs, batch), sharded


def _assert_equals_global_batch_loss(config, loss_fn, inputs, sharded):
    """``loss_fn`` on the sharded inputs has the value and gradients of ``L.total_loss`` on the whole batch."""
    want, want_grads = jax.jit(jax.value_and_grad(lambda o, b: L.total_loss(config, o, b)[0]))(*inputs)
    got, grads = jax.jit(jax.value_and_grad(loss_fn))(*sharded)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-6)
    for key in want_grads:
        np.testing.assert_allclose(np.asarray(grads[key]), np.asarray(want_grads[key]), atol=1e-5, err_msg=key)


@pytest.mark.parametrize("method,overrides", ALL_VARIANT_CONFIGS)
def test_losses_on_inputs_sharded_over_8_devices_equal_global_batch_values(method, overrides):
    config, _, _, inputs, sharded = _sharded_inputs(method, overrides)
    _assert_equals_global_batch_loss(config, lambda o, b: L.total_loss(config, o, b)[0], inputs, sharded)


def test_global_batch_check_catches_per_shard_losses():
    """The check above has power: the same loss computed per shard (local negatives, local means) fails it."""
    config, mesh, specs, inputs, sharded = _sharded_inputs("harmoclip", {})
    per_shard = jax.shard_map(lambda o, b: jax.lax.pmean(L.total_loss(config, o, b)[0], "data"),
                              mesh=mesh, in_specs=specs, out_specs=P())
    with pytest.raises(AssertionError):
        _assert_equals_global_batch_loss(config, per_shard, inputs, sharded)


@pytest.mark.parametrize("method,overrides", ALL_VARIANT_CONFIGS)
def test_losses_in_the_trainers_mesh_context_run_as_rings_with_the_global_batch_values(method, overrides):
    """Under `jax.set_mesh` (as in the trainer) the InfoNCE terms take the ring form: same value and gradients."""
    config, mesh, _, inputs, sharded = _sharded_inputs(method, overrides)
    loss = jax.value_and_grad(lambda o, b: L.total_loss(config, o, b)[0])
    want, want_grads = jax.jit(loss)(*inputs)
    with jax.set_mesh(mesh):
        got, grads = jax.jit(loss)(*sharded)
        jaxpr = str(jax.make_jaxpr(loss)(*sharded))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-6)
    for key in want_grads:
        np.testing.assert_allclose(np.asarray(grads[key]), np.asarray(want_grads[key]), atol=1e-5, err_msg=key)
    infonce = {"gc", "rc"} | ({"lrc"} if config.lrc_negatives == "batch" else set()) | \
        ({"gr"} if config.gr_variant in ("a", "b") else set())
    assert ("ppermute" in jaxpr) == bool(infonce & {t for t, w in config.weights.items() if w}), "ring form or not"


@pytest.mark.parametrize("duplicates,grouped", [("positive", True), ("mask", True), ("positive", False)])
def test_info_nce_ring_memory_falls_with_the_square_of_the_devices(duplicates, grouped):
    """The ring holds (N/d, N/d) logits blocks, the dense form a (N/d, N) share: 4096 items, value and gradients,
    compiled temporaries per device. From 2 to 8 devices the ring's fall 16x (the dense form's 4x; measured 14x and
    4x), and on 8 devices the ring needs a ninth of the dense form's (asserted: under a quarter)."""
    n, e = 4096, 8
    valid = jnp.ones((n,), bool)
    group = jnp.arange(n) % 100 if grouped else None

    def loss(q, k):
        return L.grouped_info_nce(q, k, jnp.float32(4.0), valid, group, duplicates)

    def temporaries(devices, ring):
        mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.devices()[:devices])
        rows = jax.ShapeDtypeStruct((n, e), jnp.float32, sharding=NamedSharding(mesh, P("data")))
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        with jax.set_mesh(mesh) if ring else contextlib.nullcontext():
            return step.lower(rows, rows).compile().memory_analysis().temp_size_in_bytes

    ring_2, ring_8, dense_8 = temporaries(2, True), temporaries(8, True), temporaries(8, False)
    assert ring_2 / ring_8 > 8, (ring_2, ring_8)
    assert ring_8 < dense_8 / 4, (ring_8, dense_8)


# ---------------------------------------------------------------- behaviour pinned from the pre-table code
# Computed once with losses.py as of commit a185648 (before the loss-term table), eager on CPU, inputs
# make_inputs(21) with lexeme_id % V. Per config: required outputs, required batch keys, the float32 bit
# pattern of every term and of the total, and a float64 checksum of the gradients w.r.t. every output.
# Pinned on an AVX2 EPYC; an AVX-512 Xeon's matmul kernels round differently: there every term lands within 1 ulp
# of the pin and every checksum within 1.1e-6 (relative). So terms must be within 2 ulps, checksums within 1e-5:
# any change to what a loss computes moves them by orders of magnitude more. Re-pin only after checking that
# losses.py did not change.

PINNED = [
    ("harmoclip", {}, "image_embed lexeme_embed logit_scale region_embed region_text_embed text_embed", "box_mask lexeme_id",
     {"gc": 0x406B67C4, "gr": 0x4084752D, "lrc": 0x40025B4C, "total": 0x411DAB5A}, "0x1.9523e4efa0000p+2"),
    ("harmoclip", {"gr_variant": "b"}, "image_embed lexeme_embed logit_scale region_embed text_embed", "box_mask lexeme_id",
     {"gc": 0x406B67C4, "gr": 0x405D8D90, "lrc": 0x40025B4C, "total": 0x4112D428}, "0x1.7a60dcae00000p+3"),
    ("harmoclip", {"gr_variant": "c"}, "crop_embed image_embed lexeme_embed logit_scale region_embed text_embed",
     "box_mask lexeme_id", {"gc": 0x406B67C4, "gr": 0x3F65D223, "lrc": 0x40025B4C, "total": 0x40D39BCC}, "0x1.91f14f8980000p+1"),
    ("harmoclip", {"lrc_negatives": "vocab"},
     "image_embed lexeme_vocab_embed logit_scale region_embed region_text_embed text_embed", "box_mask lexeme_id",
     {"gc": 0x406B67C4, "gr": 0x4084752D, "lrc": 0x40141BE3, "total": 0x41221B80}, "0x1.95f1f1c0e0000p+2"),
    ("harmoclip", {"lrc_duplicates": "mask"}, "image_embed lexeme_embed logit_scale region_embed region_text_embed text_embed",
     "box_mask lexeme_id", {"gc": 0x406B67C4, "gr": 0x4084752D, "lrc": 0x408E0A74, "total": 0x414419C2}, "0x1.8c567b5090000p+3"),
    ("clip", {}, "image_embed logit_scale text_embed", "", {"gc": 0x406B67C4, "total": 0x406B67C4}, "0x1.08e7529c00000p+0"),
    ("fineclip", {}, "crop_embed image_embed logit_scale region_embed region_text_embed text_embed", "box_mask",
     {"gc": 0x406B67C4, "rc": 0x4084752D, "sd": 0x3F65D223, "total": 0x410B71AA}, "0x1.7df84a23a0000p+1"),
    ("fineclip", {"sd_stop_grad": True}, "crop_embed image_embed logit_scale region_embed region_text_embed text_embed",
     "box_mask", {"gc": 0x406B67C4, "rc": 0x4084752D, "sd": 0x3F65D223, "total": 0x410B71AA}, "0x1.7b66313140000p+1"),
    ("clipself", {}, "region_embed teacher_crop_embed", "box_mask", {"sd": 0x3F815269, "total": 0x3F815269},
     "-0x1.5ff829c000000p-8"),
    ("regionclip", {}, "concept_embed logit_scale region_embed teacher_region_embed", "box_mask",
     {"concept": 0x4174991B, "total": 0x4174991B}, "-0x1.7da5734b80000p+3"),
    ("regionclip", {"concept_teacher": "crop", "concept_threshold": 0.05, "concept_temperature": 0.02, "weights.gc": 1.0},
     "concept_embed image_embed logit_scale region_embed teacher_crop_embed text_embed", "box_mask",
     {"concept": 0x417FDBD8, "gc": 0x406B67C4, "total": 0x419D5AE4}, "-0x1.21be728ec0000p+4"),
    ("harmoclip", {"weights.gc": 0.5, "weights.lrc": 2.0, "weights.gr": 0.25, "weights.rc": 1.5, "weights.sd": 0.75,
                   "weights.concept": 3.0, "sd_target": "teacher", "gr_variant": "b"},
     "concept_embed image_embed lexeme_embed logit_scale region_embed region_text_embed teacher_crop_embed "
     "teacher_region_embed text_embed", "box_mask lexeme_id",
     {"concept": 0x4174991B, "gc": 0x406B67C4, "gr": 0x405D8D90, "lrc": 0x40025B4C, "rc": 0x4084752D, "sd": 0x3F815269,
      "total": 0x426E6D99}, "-0x1.a880625b55000p+5"),
]


@pytest.mark.usefixtures("default_compiles")
@pytest.mark.parametrize("method,overrides,outputs_needed,batch_needed,bits,grad_checksum", PINNED)
def test_total_loss_equals_pre_table_code_to_the_last_bits(method, overrides, outputs_needed, batch_needed, bits,
                                                           grad_checksum):
    config = _config(method, overrides)
    assert L.required_outputs(config) == set(outputs_needed.split())
    assert L.required_batch_keys(config) == set(batch_needed.split())
    outputs, batch = make_inputs(21)
    batch["lexeme_id"] = batch["lexeme_id"] % V
    (_, terms), grads = jax.value_and_grad(lambda o: L.total_loss(config, o, batch), has_aux=True)(_select(outputs, config))
    assert set(terms) == set(bits)
    names = sorted(bits)
    pinned = np.array([bits[k] for k in names], np.uint32).view(np.float32)
    np.testing.assert_array_max_ulp(np.array([terms[k] for k in names], np.float32), pinned, maxulp=2)
    checksum = sum((i + 1) * float(np.asarray(grads[k], np.float64).sum()) for i, k in enumerate(sorted(grads)))
    assert checksum == pytest.approx(float.fromhex(grad_checksum), rel=1e-5, abs=0)


def test_default_loss_configs_pinned():
    base = dict(concept_teacher="region", concept_temperature=0.01, concept_threshold=0.1, gr_variant="a",
                lrc_duplicates="positive", lrc_negatives="batch", sd_stop_grad=False, sd_target="student")
    weights = {"harmoclip": "gc lrc gr", "clip": "gc", "fineclip": "gc rc sd", "clipself": "sd", "regionclip": "concept"}
    assert L.METHODS == tuple(weights)
    for method, on in weights.items():
        want = dict(base, weights={t: float(t in on.split()) for t in ("gc", "lrc", "gr", "rc", "sd", "concept")})
        if method == "clipself":
            want.update(sd_target="teacher", sd_stop_grad=True)
        assert L.default_loss_config(method).to_dict() == want, method


# ---------------------------------------------------------------- the loss-term table


def test_table_gives_each_method_the_pre_table_requirements():
    # Pinned from the pre-table code (commit a185648): required outputs / batch keys of each default config.
    pinned = {
        "harmoclip": ("image_embed text_embed region_embed lexeme_embed region_text_embed logit_scale", "box_mask lexeme_id"),
        "clip": ("image_embed text_embed logit_scale", ""),
        "fineclip": ("image_embed text_embed region_embed crop_embed region_text_embed logit_scale", "box_mask"),
        "clipself": ("region_embed teacher_crop_embed", "box_mask"),
        "regionclip": ("region_embed concept_embed teacher_region_embed logit_scale", "box_mask"),
    }
    assert L.TERMS == tuple(t.name for t in L.LOSS_TERMS) == ("gc", "lrc", "gr", "rc", "sd", "concept")
    assert L.GR_VARIANTS == ("a", "b", "c")
    for method, (outputs, batch_keys) in pinned.items():
        config = L.default_loss_config(method)
        active = [t for t in L.LOSS_TERMS if t.weights.get(method, 0.0)]
        variants = [t.variants[t.defaults(method)[t.select]] if t.select else t.variants[""] for t in active]
        assert [t.name for t in active] == [t for t in L.TERMS if config.weights[t]], method
        assert {k for v in variants for k in v.outputs} == set(outputs.split()) == L.required_outputs(config), method
        assert {k for v in variants for k in v.batch_keys} == set(batch_keys.split()) == L.required_batch_keys(config)


def test_table_is_checked_and_read_only():
    L.check_loss_table(L.LOSS_TERMS, L.METHODS)
    gc = L.LOSS_TERMS[0]
    with pytest.raises(TypeError):
        gc.weights["clipself"] = 1.0
    with pytest.raises(ValueError, match="duplicate"):
        L.check_loss_table(L.LOSS_TERMS + (gc,), L.METHODS)
    with pytest.raises(ValueError, match="unknown methods"):
        L.check_loss_table(L.LOSS_TERMS, L.METHODS[:-1])
    with pytest.raises(ValueError, match="enables no term"):
        L.check_loss_table(L.LOSS_TERMS, L.METHODS + ("siglip",))


def test_a_new_term_is_one_table_entry(monkeypatch):
    """A toy term added to LOSS_TERMS alone reaches the config, validation, requirements and total_loss."""
    toy = L.LossTerm(
        "toy", weights={"clip": 0.5}, select="toy_key",
        variants={
            "image": L.LossVariant(("image_embed",), ("box_mask",), lambda o, b, c: c.toy_power * o["image_embed"].sum()),
            "undeclared": L.LossVariant(("image_embed",), (), lambda o, b, c: o["text_embed"].sum()),
        },
        options=(L.LossOption("toy_power", 2.0),),
    )
    monkeypatch.setattr(L, "LOSS_TERMS", L.LOSS_TERMS + (toy,))
    config = L.default_loss_config("clip")
    assert (config.weights.toy, config.toy_key, config.toy_power) == (0.5, "image", 2.0)
    assert L.required_outputs(config) == {"image_embed", "text_embed", "logit_scale"}
    assert L.required_batch_keys(config) == {"box_mask"}
    outputs, batch = make_inputs(15)
    total, terms = L.total_loss(config, outputs, batch)
    np.testing.assert_allclose(float(terms["toy"]), 2.0 * outputs["image_embed"].sum(), rtol=1e-5)
    np.testing.assert_allclose(float(total), float(terms["gc"] + 0.5 * terms["toy"]), rtol=1e-6)
    config.toy_key = "undeclared"  # a variant only sees the keys it declares
    with pytest.raises(KeyError, match="text_embed"):
        L.total_loss(config, outputs, batch)
    config.toy_key = "pixels"
    with pytest.raises(ValueError, match="toy_key='pixels'"):
        L.validate_loss_config(config)


@pytest.mark.parametrize("method,overrides", [("harmoclip", {}), ("harmoclip", {"gr_variant": "b"}), ("fineclip", {})])
def test_pairwise_score_flops_is_xlas_count_of_the_dense_loss(method, overrides):
    """The analytic pair-score FLOPs (the roofline's loss share, `harmoclip_jax.aot`) against XLA's cost analysis of
    the dense loss's value and gradient, at an embedding width where the matmuls dominate the elementwise work."""
    b, t, e = 16, 8, 512
    config = _config(method, overrides)
    rng = np.random.default_rng(0)
    outputs = {k: jnp.asarray(rng.normal(size=(b, t, e) if k.startswith("region") or k in ("lexeme_embed", "crop_embed")
                                         else (b, e)), jnp.float32) for k in L.required_outputs(config) if k != "logit_scale"}
    outputs["logit_scale"] = jnp.float32(math.log(1 / 0.07))
    batch = {"box_mask": jnp.ones((b, t), bool), "lexeme_id": jnp.asarray(rng.integers(0, 50, (b, t)))}
    batch = {k: batch[k] for k in L.required_batch_keys(config)}
    compiled = jax.jit(jax.grad(lambda o: L.total_loss(config, o, batch)[0])).lower(outputs).compile()
    xla = compiled.cost_analysis()["flops"]
    analytic = L.pairwise_score_flops(config, b, t, e, "dense")
    assert analytic == pytest.approx(xla, rel=0.1), (analytic, xla)
    assert L.pairwise_score_flops(config, b, t, e, "ring") > 2 * analytic  # recomputed blocks, both directions
