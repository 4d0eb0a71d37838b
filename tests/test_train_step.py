"""The sharded train step: parity across meshes, restore onto other meshes, optimizer masks, text cache."""
import jax
import numpy as np
import pytest

from harmoclip_jax import checkpoint, config_lib, optim, sharding, train
from trainer_helpers import synthetic_batch, tiny_config

STEPS = 3


def _mesh(data, fsdp):
    return sharding.make_mesh([("data", data), ("fsdp", fsdp)], devices=jax.devices()[: data * fsdp])


_TRAINERS = {}


def _trainer(config, mesh):
    """One trainer per (config, mesh) in this module: tests of the same setting share its traced and compiled train
    step and state initialisation instead of building them again."""
    key = (config.to_json_best_effort(sort_keys=True), tuple(mesh.shape.items()))
    if key not in _TRAINERS:
        _TRAINERS[key] = train.build_trainer(config, mesh)
    return _TRAINERS[key]


def _run(config, mesh, steps=STEPS):
    trainer = _trainer(config, mesh)
    with jax.set_mesh(mesh):
        state = trainer.init_state()
        losses = []
        for step in range(steps):
            batch = sharding.put_batch(synthetic_batch(step), mesh)
            state, metrics = trainer.train_step(state, batch, {})
            losses.append(float(metrics["loss"]))
    return trainer, state, losses


@pytest.fixture(scope="module")
def single_device_run():
    _, state, losses = _run(tiny_config(), _mesh(1, 1))
    return sharding.to_host(state["params"]), losses


@pytest.mark.parametrize("data,fsdp", [(8, 1), (4, 2), (2, 4)])
def test_sharded_step_matches_single_device(single_device_run, data, fsdp):
    """Tolerance: float32 reductions run in a different order on 8 devices; after 3 AdamW steps at lr 1e-3 the
    losses agree to 1e-5 relative and every parameter to 2e-5 absolute."""
    params_1, losses_1 = single_device_run
    trainer, state, losses = _run(tiny_config(), _mesh(data, fsdp))
    if fsdp > 1:  # the parameters really are split over the fsdp axis
        qkv = state["params"]["visual"]["transformer"]["blocks"][0]["attn"]["qkv"]["kernel"]
        assert "fsdp" in tuple(qkv.sharding.spec)
    np.testing.assert_allclose(losses, losses_1, rtol=1e-5)
    flat_1 = jax.tree_util.tree_flatten_with_path(params_1)[0]
    flat = jax.tree.leaves(sharding.to_host(state["params"]))
    for (path, expected), actual in zip(flat_1, flat):
        np.testing.assert_allclose(actual, expected, atol=2e-5, err_msg=sharding.path_str(path))


def test_grad_accumulation_matches_sum_of_microbatch_losses():
    """With 2 micro-batches the step's loss is the mean of the two half-batch losses (each its own contrastive
    batch, as documented), and the run stays finite."""
    mesh = _mesh(2, 1)
    config = tiny_config()
    config.optim.grad_accum_steps = 2
    trainer = train.build_trainer(config, mesh)
    plain = train.build_trainer(tiny_config(batch_size=8), mesh)
    batch = synthetic_batch(0)
    with jax.set_mesh(mesh):
        state = trainer.init_state()
        _, metrics = trainer.train_step(state, sharding.put_batch(batch, mesh), {})
        halves = []
        for j in range(2):
            half = {k: v[j::2] for k, v in batch.items()}
            _, m = plain.train_step(plain.init_state(), sharding.put_batch(half, mesh), {})
            halves.append(float(m["loss"]))
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(halves), rtol=1e-5)


def test_checkpoint_restores_onto_other_meshes(tmp_path):
    config = tiny_config()
    trainer8, state, _ = _run(config, _mesh(8, 1), steps=1)
    expected = sharding.to_host(state)
    ckpt = checkpoint.TrainCheckpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, state)
    ckpt.close()
    for data, fsdp in [(2, 4), (1, 1)]:
        mesh = _mesh(data, fsdp)
        trainer = _trainer(config, mesh)
        restored = checkpoint.TrainCheckpointer(tmp_path / "ckpt").restore(1, trainer.abstract_state)
        leaves = jax.tree.leaves(restored)
        assert all(leaf.sharding.mesh.shape == mesh.shape for leaf in leaves if hasattr(leaf, "sharding"))
        for got, want in zip(jax.tree.leaves(sharding.to_host(restored)), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(got, want)
        # ... and training continues from it on the new mesh.
        with jax.set_mesh(mesh):
            _, metrics = trainer.train_step(restored, sharding.put_batch(synthetic_batch(1), mesh), {})
        assert np.isfinite(float(metrics["loss"]))


def test_text_cache_gives_the_same_loss_as_encoding(tmp_path):
    """With the text tower frozen, cached embeddings replace token inputs without changing the loss."""
    mesh = _mesh(8, 1)
    config = tiny_config(warmup_steps=0)
    config.optim.freeze_text_tower = True
    trainer = train.build_trainer(config, mesh)
    assert trainer.text_frozen
    batch = synthetic_batch(0)
    with jax.set_mesh(mesh):
        state = trainer.init_state()
        cache = train.make_text_cache(trainer, state["params"], tmp_path, "synthetic")
        assert cache is not None
        cached_keys = train.device_batch_keys(trainer, True)
        assert "region_text_embed" in cached_keys and "region_text" not in cached_keys
        cached = sharding.put_batch(train.prepare_batch(batch, cached_keys, cache), mesh)
        plain = sharding.put_batch(train.prepare_batch(batch, train.device_batch_keys(trainer, False), None), mesh)
        before = sharding.to_host(state["params"])
        _, m_plain = trainer.train_step(jax.tree.map(lambda x: x.copy(), state), plain, {})
        new_state, m_cached = trainer.train_step(state, cached, {})
        after = sharding.to_host(new_state["params"])
    np.testing.assert_allclose(float(m_cached["loss"]), float(m_plain["loss"]), rtol=1e-5)
    # The frozen text tower does not move; the image tower does.
    for got, want in zip(jax.tree.leaves(after["text"]), jax.tree.leaves(before["text"])):
        np.testing.assert_array_equal(got, want)
    assert np.abs(after["visual"]["proj"] - before["visual"]["proj"]).max() > 0
    cache.save()
    assert cache.misses > 0 and len(cache) == cache.misses
    # Reloaded from disk it encodes nothing new.
    again = train.make_text_cache(trainer, after, tmp_path, "synthetic")
    before = again.misses
    again.lookup(batch["region_text"])
    assert again.misses == before == 0


def test_optimizer_masks():
    from harmoclip_jax.models import clip, glue

    params = glue.abstract_params(clip.BACKBONE, clip.get_config("test-tiny"))
    optim_config = config_lib.base_config().optim
    freeze, no_decay = optim.parameter_rules(optim_config, clip.BACKBONE)
    assert freeze == ("text/.*",) and no_decay == clip.BACKBONE.no_decay  # the defaults: text tower frozen
    decay = {sharding.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(
        optim.decay_mask(params, no_decay))[0]}
    assert decay["visual/transformer/blocks/0/attn/qkv/kernel"]
    assert not decay["visual/transformer/blocks/0/attn/qkv/bias"]
    assert not decay["visual/ln_pre/scale"]
    assert not decay["text/token_embedding"] and not decay["visual/positional_embedding"]
    assert not decay["logit_scale"]
    trained = {sharding.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(
        optim.trainable_mask(params, freeze))[0]}
    assert not trained["text/transformer/blocks/0/mlp/fc1/kernel"] and trained["visual/proj"]
    assert trained["logit_scale"]


def test_logit_scale_is_clamped():
    mesh = _mesh(1, 1)
    config = tiny_config(lr=10.0)  # a huge step pushes logit_scale far past ln(100)
    config.optim.warmup_steps = 0
    config.optim.grad_clip_norm = 0.0
    trainer = train.build_trainer(config, mesh)
    with jax.set_mesh(mesh):
        state = trainer.init_state()
        for step in range(2):
            state, _ = trainer.train_step(state, sharding.put_batch(synthetic_batch(step), mesh), {})
    assert float(state["params"]["logit_scale"]) <= np.log(100.0) + 1e-6


@pytest.mark.parametrize("method", ["fineclip", "clipself", "regionclip", "harmoclip-bf16-remat"])
def test_every_method_trains(method):
    mesh = _mesh(2, 1)
    config = tiny_config(method.split("-")[0])
    if method.endswith("bf16-remat"):
        config.model.dtype, config.model.remat = "bfloat16", True
    trainer = train.build_trainer(config, mesh)
    consts = {}
    if method == "regionclip":
        from harmoclip_jax.tokenizer import tokenize

        consts = {"concept_tokens": tokenize(["red circle", "blue square", "a cat", "a dog"], context_length=16)}
    with jax.set_mesh(mesh):
        state = trainer.init_state()
        state, metrics = trainer.train_step(state, sharding.put_batch(synthetic_batch(0), mesh), consts)
    expected = {"harmoclip-bf16-remat": {"gc", "lrc", "gr"}, "fineclip": {"gc", "sd", "rc"}, "clipself": {"sd"}, "regionclip": {"concept"}}
    assert {k.removeprefix("loss/") for k in metrics if k.startswith("loss/")} == expected[method]
    assert np.isfinite(float(metrics["loss"]))


def test_distinct_region_texts_are_encoded_once_with_the_same_loss():
    """config.region.distinct_lexemes / distinct_region_texts: each distinct text of the batch is encoded once and
    gathered back; the step computes the loss of encoding every text."""
    mesh = _mesh(8, 1)
    batch = synthetic_batch(3)
    patterns = synthetic_batch(4)["lexeme"].reshape(-1, 16)[:6]  # 6 lexeme strings, reused by every region
    batch["lexeme"] = patterns[batch["lexeme_id"]]
    batch["region_text"][1::2] = batch["region_text"][::2]  # half the region captions repeat
    plain = _trainer(tiny_config(), mesh)
    config = tiny_config()
    config.region.update(distinct_lexemes=8, distinct_region_texts=32)
    distinct = train.build_trainer(config, mesh)
    keys = train.device_batch_keys(distinct, cache_active=False)
    assert {"lexeme_table", "lexeme_index", "region_text_table", "region_text_index"} <= set(keys)
    assert "lexeme" not in keys and "region_text" not in keys
    host = train.prepare_batch(batch, keys, None, config.region)
    assert host["lexeme_table"].shape == (8, 16)
    assert len(np.unique(host["lexeme_table"], axis=0)) == 7  # the 6 lexemes and the zero padding row
    np.testing.assert_array_equal(host["lexeme_table"][host["lexeme_index"]], batch["lexeme"])
    np.testing.assert_array_equal(host["region_text_table"][host["region_text_index"]], batch["region_text"])
    with jax.set_mesh(mesh):
        _, want = plain.train_step(plain.init_state(), sharding.put_batch(
            train.prepare_batch(batch, train.device_batch_keys(plain, False), None), mesh), {})
        _, got = distinct.train_step(distinct.init_state(), sharding.put_batch(host, mesh), {})
    for key in ("loss", "loss/lrc", "loss/gr", "grad_norm"):
        np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5, err_msg=key)
    config.region.distinct_lexemes = 4
    with pytest.raises(ValueError, match=r"6 distinct lexeme texts, more than config.region.distinct_lexemes=4"):
        train.prepare_batch(batch, keys, None, config.region)


def test_uint8_host_images_normalised_on_the_device_give_the_same_step_and_embeddings():
    """config.data.image_dtype="uint8": the host sends raw pixels and the jitted step / eval functions normalise
    them with the family's mean/std; the numbers equal those of host-normalised float32 batches."""
    from harmoclip_jax.models.normalization import OPENAI_CLIP, normalize_pixels

    mesh = _mesh(2, 1)
    trainer = train.build_trainer(tiny_config(), mesh)
    raw = synthetic_batch(0)
    pixels = np.random.default_rng(1).integers(0, 256, size=raw["image"].shape, dtype=np.uint8)
    as_float = dict(raw, image=normalize_pixels(pixels, *OPENAI_CLIP))
    as_uint8 = dict(raw, image=pixels)
    with jax.set_mesh(mesh):
        results = []
        for batch in (as_float, as_uint8):
            state = trainer.init_state()
            state, metrics = trainer.train_step(state, sharding.put_batch(batch, mesh), {})
            fns = trainer.eval_fns()
            images = sharding.put_batch({"image": batch["image"]}, mesh)["image"]
            results.append((float(metrics["loss"]), float(metrics["grad_norm"]),
                            np.asarray(fns.encode_images(state["params"], images))))
    (loss_f, grad_f, embed_f), (loss_u, grad_u, embed_u) = results
    np.testing.assert_allclose(loss_u, loss_f, rtol=1e-6)
    np.testing.assert_allclose(grad_u, grad_f, rtol=1e-5)
    np.testing.assert_allclose(embed_u, embed_f, atol=1e-6)
    assert as_uint8["image"].nbytes * 4 == as_float["image"].nbytes


def test_canvas_images_are_resized_in_the_step():
    """config.data.resize_canvas: the step squashes (canvas, image_hw) batches itself (`ops/resize.py`): its numbers
    equal those of the same squash done beforehand and sent at scale 1 (height, width = S: the identity);
    `image_hw` is a device key."""
    import jax.numpy as jnp

    from harmoclip_jax.ops.resize import resize_from_canvas

    mesh = _mesh(2, 1)
    config = tiny_config()
    raw = synthetic_batch(0)
    b, s = raw["image"].shape[:2]
    config.data.image_dtype, config.data.resize_canvas = "uint8", 2 * s
    rng = np.random.default_rng(3)
    canvas = np.zeros((b, 2 * s, 2 * s, 3), np.uint8)
    hw = np.stack([rng.integers(s // 2, 2 * s + 1, b), rng.integers(s // 2, 2 * s + 1, b)], 1).astype(np.int32)
    for i, (h, w) in enumerate(hw):
        canvas[i, :h, :w] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    squashed = np.zeros_like(canvas)
    squashed[:, :s, :s] = np.asarray(resize_from_canvas(jnp.asarray(canvas), jnp.asarray(hw), s)).astype(np.uint8)
    trainer = train.build_trainer(config, mesh)
    assert "image_hw" in train.device_batch_keys(trainer, cache_active=False)
    results = []
    with jax.set_mesh(mesh):
        for batch in (dict(raw, image=canvas, image_hw=hw), dict(raw, image=squashed, image_hw=np.full_like(hw, s))):
            _, metrics = trainer.train_step(trainer.init_state(), sharding.put_batch(batch, mesh), {})
            results.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)
