"""The lexeme vocabulary (LRC with `lrc_negatives="vocab"`): building, lookup, persistence, and its use in the step."""
import jax
import numpy as np
import pytest

from harmoclip_jax import config_lib, losses, sharding, train
from harmoclip_jax.data import lexeme_vocab
from harmoclip_jax.data.pipeline import lexeme_id
from harmoclip_jax.ops.regions import region_embeddings
from trainer_helpers import synthetic_batch, tiny_config


def test_counts_merge_spellings_and_order_by_frequency():
    texts = ["red circle", "Red  Circle", "red circle", "blue star", "blue star", "green ring", b"green ring", "",
             "purple cross"]
    vocab = lexeme_vocab.from_lexemes(texts, max_size=10)
    assert vocab.lexemes == ("red circle", "blue star", "green ring", "purple cross")  # ties broken by string
    assert vocab.counts == (3, 2, 2, 1)
    assert lexeme_vocab.from_lexemes(texts, max_size=2).lexemes == ("red circle", "blue star")
    assert lexeme_vocab.from_lexemes(texts, max_size=10, min_count=2).lexemes == ("red circle", "blue star",
                                                                                   "green ring")
    with pytest.raises(ValueError, match="max_size"):
        lexeme_vocab.from_lexemes(texts, max_size=0)


def test_index_maps_hashes_to_rows_with_minus_one_for_padding_and_unknown(tmp_path):
    vocab = lexeme_vocab.from_lexemes(["a b", "c d", "c d", "e f", "e f", "e f"], max_size=10)
    assert vocab.lexemes == ("e f", "c d", "a b")
    ids = np.array([[lexeme_id("a b"), lexeme_id("E F"), -1], [lexeme_id("zz"), lexeme_id("c d"), lexeme_id("a b")]])
    np.testing.assert_array_equal(vocab.index(ids), [[2, 0, -1], [-1, 1, 2]])
    vocab.save(tmp_path / "v.json")
    again = lexeme_vocab.LexemeVocab.load(tmp_path / "v.json")
    assert again == vocab
    np.testing.assert_array_equal(again.index(ids), vocab.index(ids))
    # A saved vocabulary wins over rebuilding (a resumed run keeps its rows).
    assert lexeme_vocab.load_or_build(tmp_path / "v.json", "no-such-dataset", "train", None, 5) == vocab
    with pytest.raises(ValueError, match="distinct"):
        lexeme_vocab.LexemeVocab(("x", "X"), (1, 1))


def test_built_from_scenes_has_every_training_lexeme():
    from harmoclip_jax.data import pipeline

    vocab = lexeme_vocab.build("scenes/tiny", "train", None, max_size=1000)
    source = pipeline.open_source("scenes/tiny", "train")
    all_lexemes = [x.decode() for i in range(len(source)) for x in source[i]["regions"]["lexeme"]]
    assert sum(vocab.counts) == len(all_lexemes)
    assert set(vocab.lexemes) == set(all_lexemes)
    assert all(len(x.split()) == 2 for x in vocab.lexemes)  # "colour shape"
    assert len(vocab) <= 36


def test_config_accepts_vocab_negatives_with_a_positive_size():
    config = tiny_config()
    config.loss.lrc_negatives = "vocab"
    config_lib.validate(config)
    config.region.lexeme_vocab_size = 0
    with pytest.raises(ValueError, match="lexeme_vocab_size"):
        config_lib.validate(config)


@pytest.mark.parametrize("frozen_text", [False, True])
def test_train_step_classifies_regions_against_the_vocabulary(tmp_path, frozen_text):
    names = [f"thing {i}" for i in range(6)]
    vocab = lexeme_vocab.from_lexemes(names, max_size=10)
    config = tiny_config(warmup_steps=0)
    config.loss.lrc_negatives = "vocab"
    if frozen_text:
        config.optim.freeze_text_tower = True
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 1)], devices=jax.devices()[:2])
    trainer = train.build_trainer(config, mesh)
    assert "lexeme_vocab_embed" in trainer.needed and "lexeme_embed" not in trainer.needed
    batch = synthetic_batch(0)
    batch["lexeme_id"] = np.array([lexeme_id(names[i % 6]) for i in range(batch["lexeme_id"].size)],
                                  np.int32).reshape(batch["lexeme_id"].shape)
    with jax.set_mesh(mesh):
        state = trainer.init_state()
        cache = train.make_text_cache(trainer, state["params"], tmp_path, "synthetic")
        assert (cache is not None) == frozen_text
        consts = train.make_consts(trainer, cache, [], vocab)
        assert set(consts) == {"lexeme_vocab_embed" if frozen_text else "lexeme_vocab_tokens"}
        keys = train.device_batch_keys(trainer, cache is not None)
        host = train.prepare_batch(batch, keys, cache, None, vocab)
        np.testing.assert_array_equal(host["lexeme_id"].reshape(-1), [vocab.lexemes.index(names[i % 6])
                                                                      for i in range(batch["lexeme_id"].size)])
        _, metrics = trainer.train_step(jax.tree.map(lambda x: x.copy(), state), sharding.put_batch(host, mesh),
                                        consts)
        # The same term from the losses module on the model's own outputs (one jitted program: op by op, its ~250
        # primitives would each compile).
        @jax.jit
        def reference_lrc(params, host, vocab_tokens):
            model = trainer.glue.merge(params)
            region = region_embeddings(model.encode_dense(host["image"]), host["boxes"],
                                       stride=trainer.glue.patch_size, output_size=config.region.output_size,
                                       sampling_ratio=config.region.sampling_ratio)
            return losses.lexeme_vocab_contrastive_loss(region, model.encode_text(vocab_tokens), host["box_mask"],
                                                        host["lexeme_id"], model.logit_scale[...])

        want = reference_lrc(state["params"], host, train.make_consts(trainer, None, [], vocab)["lexeme_vocab_tokens"])
        np.testing.assert_allclose(float(metrics["loss/lrc"]), float(want), rtol=2e-4)
        # Regions whose lexeme is not in the vocabulary drop out of the term.
        batch["lexeme_id"][:] = lexeme_id("not in the vocabulary")
        unknown = train.prepare_batch(batch, keys, cache, None, vocab)
        assert (unknown["lexeme_id"] == -1).all()
        _, metrics = trainer.train_step(state, sharding.put_batch(unknown, mesh), consts)
        assert float(metrics["loss/lrc"]) == 0.0
