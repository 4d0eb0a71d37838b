"""Token-level LRC ("Text Token Space", reading B: `config.loss.lrc_text="tokens"`): per-token text embeddings of
every family, span pooling, the pipeline's lexeme spans, the train step and config validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from harmoclip_jax import losses as L
from harmoclip_jax.models import clip, eva02, siglip
from trainer_helpers import scenes_spm


@pytest.mark.parametrize("model_class,variant", [(clip.CLIP, "test-tiny"), (eva02.EVA02CLIP, "EVA02-test-tiny"),
                                                 (siglip.SigLIP, "SigLIP-test-tiny")])
def test_encode_text_tokens_at_the_pooled_position_equals_encode_text(model_class, variant):
    """CLIP/EVA02: the row at the EOT position (argmax id) is `encode_text`; SigLIP: the last position of the row padded
    to the context (the one SigLIP pools). Per-token outputs are projected to the joint width, not normalised."""
    model = model_class(variant, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    length = 12
    if model_class is siglip.SigLIP:
        tokens = rng.integers(2, 1000, (3, length)).astype(np.int32)
        tokens[:, 9:] = model.config.text.pad_id
    else:
        tokens = rng.integers(1, 400, (3, length)).astype(np.int32)
        tokens[:, 0] = 49406
        for row, end in enumerate((4, 7, 11)):
            tokens[row, end], tokens[row, end + 1:] = 49407, 0
    per_token = np.asarray(model.encode_text_tokens(jnp.asarray(tokens)))
    pooled = np.asarray(model.encode_text(jnp.asarray(tokens)))
    assert per_token.shape[0] == 3 and per_token.shape[-1] == pooled.shape[-1]
    if model_class is siglip.SigLIP:
        assert per_token.shape[1] == model.config.text.context_length
        at = per_token[:, -1]
    else:
        assert per_token.shape[1] == length
        at = per_token[np.arange(3), tokens.argmax(-1)]
    np.testing.assert_allclose(at, pooled, rtol=1e-5, atol=1e-6)
    assert not np.allclose(per_token[:, 1], at)  # other positions are other vectors


# ---------------------------------------------------------------- span pooling and the lrc variant


def test_span_of_a_lexeme_and_its_pooling_by_hand():
    """"crimson disc" in "a large crimson disc at the top" (CLIP BPE: one token per word here): tokens 3..4 of the row
    (SOT at 0); pooling is the mean of those two rows."""
    from harmoclip_jax.data.pipeline import find_span
    from harmoclip_jax.tokenizer import default_tokenizer

    tok = default_tokenizer()
    row = tok(["a large crimson disc at the top"], 16)[0]
    lexeme = tok.encode("crimson disc")
    assert len(lexeme) == 2 and list(row[3:5]) == lexeme
    assert find_span(row, lexeme) == (3, 5)
    assert find_span(row, tok.encode("blue square")) == (-1, -1)
    assert find_span(row, []) == (-1, -1)
    embed = np.random.default_rng(0).normal(size=(1, 16, 6)).astype(np.float32)
    pooled, valid = L.span_mean_pool(embed, np.array([[3, 5]]))
    np.testing.assert_allclose(np.asarray(pooled)[0], embed[0, 3:5].mean(0), rtol=1e-6)
    assert bool(valid[0])
    # One caption row, several regions' spans (lrc_token_source="caption"): (B, L, E) with (B, T, 2).
    pooled, valid = L.span_mean_pool(embed, np.array([[[3, 5], [-1, -1], [1, 2]]]))
    np.testing.assert_allclose(np.asarray(pooled)[0], np.stack([embed[0, 3:5].mean(0), np.zeros(6), embed[0, 1]]),
                               rtol=1e-6)
    assert np.asarray(valid).tolist() == [[True, False, True]]


def _token_inputs(seed, source):
    rng = np.random.default_rng(seed)
    b, t, length, e = 6, 3, 10, 5
    box_mask = rng.random((b, t)) < 0.8
    box_mask[:, 0] = True
    starts = rng.integers(1, 5, (b, t))
    spans = np.stack([starts, starts + rng.integers(1, 4, (b, t))], -1).astype(np.int32)
    spans[~box_mask] = -1
    spans[0, 1] = -1  # a real region whose lexeme was not found
    key = "region_text_token_embed" if source == "region_caption" else "text_token_embed"
    shape = (b, t, length, e) if source == "region_caption" else (b, length, e)
    outputs = {"image_embed": rng.normal(size=(b, e)), "text_embed": rng.normal(size=(b, e)),
               "region_embed": rng.normal(size=(b, t, e)), "region_text_embed": rng.normal(size=(b, t, e)),
               key: rng.normal(size=shape), "logit_scale": np.float32(np.log(10.0))}
    outputs = {k: np.asarray(v, np.float32) for k, v in outputs.items()}
    batch = {"box_mask": box_mask, "lexeme_id": rng.integers(0, 4, (b, t)).astype(np.int32), "lexeme_span": spans}
    return outputs, batch, key


@pytest.mark.parametrize("source", ["region_caption", "caption"])
def test_token_lrc_is_lrc_on_span_means_and_ignores_tokens_outside_spans(source):
    config = L.default_loss_config("harmoclip")
    config.lrc_text, config.lrc_token_source = "tokens", source
    outputs, batch, key = _token_inputs(1, source)
    assert L.required_outputs(config) == {"image_embed", "text_embed", "region_embed", "region_text_embed", key,
                                          "logit_scale"}
    assert L.required_batch_keys(config) == {"box_mask", "lexeme_id", "lexeme_span"}
    _, terms = L.total_loss(config, outputs, batch)
    # Reference: the default LRC on NumPy span means, regions without a span masked out.
    tokens = outputs[key] if source == "region_caption" else np.repeat(outputs[key][:, None], 3, axis=1)
    spans, found = batch["lexeme_span"], batch["lexeme_span"][..., 0] >= 0
    lexemes = np.zeros(outputs["region_embed"].shape, np.float32)
    for i, j in zip(*np.nonzero(found)):
        lexemes[i, j] = tokens[i, j, spans[i, j, 0]:spans[i, j, 1]].mean(0)
    want = L.lexeme_region_contrastive_loss(outputs["region_embed"], lexemes, batch["box_mask"] & found,
                                            batch["lexeme_id"], outputs["logit_scale"])
    np.testing.assert_allclose(float(terms["lrc"]), float(want), rtol=1e-5)
    # Token embeddings outside every span (other words, beyond the EOT, padded regions) change neither the loss nor
    # receive gradient.
    inside = np.zeros(tokens.shape[:-1], bool)
    for i, j in np.ndindex(*found.shape):
        if found[i, j]:
            inside[i, j, spans[i, j, 0]:spans[i, j, 1]] = True
    if source == "caption":
        inside = inside.any(1)
    garbage = dict(outputs)
    garbage[key] = np.where(inside[..., None], outputs[key], 100 * np.random.default_rng(2).normal(
        size=outputs[key].shape)).astype(np.float32)
    grad_fn = jax.jit(jax.value_and_grad(lambda o: L.total_loss(config, o, batch)[1]["lrc"]))
    (value, grads), (value_g, grads_g) = grad_fn(outputs), grad_fn(garbage)
    np.testing.assert_allclose(float(value_g), float(value), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grads_g[key]), np.asarray(grads[key]), atol=1e-7)
    assert not np.asarray(grads[key])[~inside].any() and np.asarray(grads[key])[inside].any()


def test_token_lrc_sigmoid_form_and_config_errors():
    config = L.default_loss_config("harmoclip")
    config.lrc_text, config.lrc_form = "tokens", "sigmoid"
    assert "logit_bias" in L.required_outputs(config) and "lexeme_embed" not in L.required_outputs(config)
    outputs, batch, _ = _token_inputs(3, "region_caption")
    _, terms = L.total_loss(config, {**outputs, "logit_bias": np.float32(-2.0)}, batch)
    assert np.isfinite(float(terms["lrc"]))
    for field, value, match in [("lrc_text", "words", "lrc_text='words'"),
                                ("lrc_token_source", "title", "lrc_token_source='title'"),
                                ("lrc_negatives", "vocab", "lrc_text='tokens' derives .* lrc_negatives='vocab'")]:
        bad = L.default_loss_config("harmoclip")
        bad.lrc_text = "tokens"
        bad[field] = value
        with pytest.raises(ValueError, match=match):
            L.validate_loss_config(bad)
    assert "lrc_text" not in L.default_loss_config("harmoclip")  # optional: default configs are unchanged


# ---------------------------------------------------------------- pipeline: lexeme spans on Scenes


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    from harmoclip_jax.data import scenes

    directory = str(tmp_path_factory.mktemp("tfds"))
    scenes.Scenes(config="tiny", data_dir=directory).download_and_prepare()
    return directory


@pytest.mark.parametrize("source", ["region_text", "text"])
def test_pipeline_emits_lexeme_spans(scenes_dir, source):
    """Spans index the lexeme's tokens in the region caption (or the global caption); padded regions are -1; without
    `lexeme_spans` the batch has no spans (no cost)."""
    from harmoclip_jax.data import pipeline
    from harmoclip_jax.tokenizer import default_tokenizer

    config = pipeline.default_data_config()
    config.update(dataset="scenes/tiny", image_size=32, max_regions=3, batch_size=8, read_threads=1)
    assert "lexeme_span" not in next(pipeline.make_train_iterator(config, data_dir=scenes_dir, process_index=0,
                                                                   process_count=1))
    config.lexeme_spans = source
    batch = next(pipeline.make_train_iterator(config, data_dir=scenes_dir, process_index=0, process_count=1))
    spans, mask = batch["lexeme_span"], batch["box_mask"]
    assert spans.shape == (8, 3, 2) and spans.dtype == np.int32
    assert (spans[~mask] == -1).all()
    tok = default_tokenizer()
    found = 0
    for b, t in zip(*np.nonzero(mask)):
        lexeme = tok.decode(batch["lexeme"][b, t])
        row = batch["region_text"][b, t] if source == "region_text" else batch["text"][b]
        start, end = spans[b, t]
        if start < 0:
            assert source == "text"  # a Scenes region caption always contains its lexeme; a global caption may not
            assert pipeline.find_span(row, tok.encode(lexeme)) == (-1, -1)
            continue
        found += 1
        assert list(row[start:end]) == tok.encode(lexeme) and start >= 1  # after SOT
        assert tok.decode(row[start:end]).strip() == lexeme.strip()
    assert found > 0 and (source == "text" or found == mask.sum())


def test_sentencepiece_spans_on_scenes_region_captions(scenes_dir, tmp_path):
    """SigLIP's SentencePiece splits on whitespace and a word's first piece carries the word-start mark with or
    without text before it, so the lexeme tokenized alone is found in every Scenes region caption."""
    from harmoclip_jax.data import pipeline, scenes
    from harmoclip_jax.tokenizer import get_tokenizer

    name = f"siglip:{scenes_spm(tmp_path, [f'a {c}' for c in scenes.CLASS_NAMES], vocab_size=120)}"
    config = pipeline.default_data_config()
    config.update(dataset="scenes/tiny", image_size=32, max_regions=3, batch_size=8, read_threads=1,
                  tokenizer=name, context_length=64, lexeme_spans="region_text")
    batch = next(pipeline.make_train_iterator(config, data_dir=scenes_dir, process_index=0, process_count=1))
    tok, mask, spans = get_tokenizer(name), batch["box_mask"], batch["lexeme_span"]
    assert (spans[mask][:, 0] >= 0).all() and (spans[~mask] == -1).all()
    for b, t in zip(*np.nonzero(mask)):
        start, end = spans[b, t]
        assert tok.decode(batch["region_text"][b, t, start:end]) == tok.decode(batch["lexeme"][b, t])
    row = tok(["A large crimson disc, at the top."], 32)[0]
    assert pipeline.find_span(row, tok.encode("crimson disc")) != (-1, -1)


# ---------------------------------------------------------------- the train step and config validation


def _token_batch(source, seed=0):
    from trainer_helpers import synthetic_batch

    batch = synthetic_batch(seed)
    rows = batch["region_text"] if source == "region_caption" else np.repeat(batch["text"][:, None], 3, axis=1)
    ends = rows.argmax(-1)  # EOT position
    spans = np.stack([np.ones_like(ends), np.minimum(ends, 3)], -1).astype(np.int32)  # 1-2 tokens after SOT
    spans[~batch["box_mask"]] = -1
    spans[0, 0] = -1  # one real region whose lexeme was not found
    batch["lexeme_span"] = spans
    return batch


@pytest.mark.parametrize("source,frozen", [("region_caption", False), ("caption", True)])
def test_train_step_with_token_lrc(source, frozen, tmp_path):
    """Trainable text tower: the LRC gradient reaches the text tower's blocks (only LRC is on, no weight decay). Frozen
    text tower with the text cache: per-token inputs still travel as tokens and the step runs."""
    from harmoclip_jax import sharding, train
    from trainer_helpers import tiny_config

    config = tiny_config(weight_decay=0.0, warmup_steps=0)
    config.loss.lrc_text, config.loss.lrc_token_source = "tokens", source
    config.loss.weights.update(gc=0.0, gr=0.0)
    config.optim.freeze_text_tower = frozen
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 1)], devices=jax.devices()[:2])
    trainer = train.build_trainer(config, mesh)
    token_key = "region_text" if source == "region_caption" else "text"
    assert f"{token_key}_token_embed" in trainer.needed and "lexeme_embed" not in trainer.needed
    assert trainer.text_frozen == frozen
    batch = _token_batch(source)
    with jax.set_mesh(mesh):
        state = trainer.init_state()
        cache = train.make_text_cache(trainer, state["params"], tmp_path, "synthetic")
        assert (cache is not None) == frozen
        keys = train.device_batch_keys(trainer, cache is not None)
        assert {"lexeme_span", token_key, "lexeme_id", "box_mask"} <= set(keys)
        before = sharding.to_host(state["params"])
        host = train.prepare_batch(batch, keys, cache, config.region)
        state, metrics = trainer.train_step(state, sharding.put_batch(host, mesh), {})
        after = sharding.to_host(state["params"])
    assert set(k for k in metrics if k.startswith("loss/")) == {"loss/lrc"}
    assert np.isfinite(float(metrics["loss/lrc"])) and float(metrics["loss/lrc"]) > 0
    real = batch["box_mask"].sum()
    np.testing.assert_allclose(float(metrics["lrc/span_found"]), (real - 1) / real, rtol=1e-6)
    moved = np.abs(after["text"]["transformer"]["blocks"][0]["attn"]["qkv"]["kernel"]
                   - before["text"]["transformer"]["blocks"][0]["attn"]["qkv"]["kernel"]).max()
    assert (moved > 0) != frozen


def test_config_validation_of_token_lrc(monkeypatch):
    from harmoclip_jax import config_lib
    from harmoclip_jax.models import registry
    from harmoclip_jax.models.backbone import Backbone
    from trainer_helpers import tiny_config

    config = tiny_config()
    config.loss.lrc_text = "tokens"
    config_lib.validate(config)
    assert config_lib.data_config(config).lexeme_spans == "region_text"
    config.loss.lrc_token_source = "caption"
    assert config_lib.data_config(config).lexeme_spans == "text"
    assert config_lib.data_config(tiny_config()).lexeme_spans == ""  # reading A: no spans computed
    config.loss.lrc_negatives = "vocab"
    with pytest.raises(ValueError, match="lrc_text='tokens' derives .*lrc_negatives='vocab'"):
        config_lib.validate(config)
    config.loss.lrc_negatives, config.loss.lrc_token_source = "batch", "title"
    with pytest.raises(ValueError, match="lrc_token_source='title'"):
        config_lib.validate(config)

    class NoTokens(clip.CLIP):
        encode_text_tokens = None

    family = Backbone(family="no_tokens_test", model_class=NoTokens, get_config=clip.get_config,
                      config_from_dict=clip.CLIPConfig.from_dict, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    monkeypatch.setitem(registry._BACKBONES, family.family, family)  # gone after the test
    config = tiny_config()
    config.model.family = family.family
    config.loss.lrc_text = "tokens"
    with pytest.raises(ValueError, match=r"config.loss.lrc_text='tokens' .*'no_tokens_test' family"):
        config_lib.validate(config)
    config.loss.lrc_text = "lexeme"
    config_lib.validate(config)

    # The config files' arguments set the optional fields (command-line overrides need them present).
    demo = config_lib.load_config(f"{config_lib.__file__.rsplit('/', 2)[0]}/configs/demo.py:smoke,lrc_text=tokens,"
                                  "lrc_source=caption")
    assert (demo.loss.lrc_text, demo.loss.lrc_token_source) == ("tokens", "caption")
    config_lib.validate(demo)
    assert "lrc_text" not in config_lib.load_config(f"{config_lib.__file__.rsplit('/', 2)[0]}/configs/demo.py").loss
