"""The zero-shot segmentation evaluator end to end: masks through the eval pipeline, a tiny model through the
trainer's eval functions, and an oracle whose dense features are the class embeddings of the true class per pixel
(it must score mIoU 1)."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from harmoclip_jax import config_lib, evaluators, sharding, train
from harmoclip_jax.data import pipeline, scenes
from harmoclip_jax.data.features import SEGMENTATION_IGNORE, record_features
from harmoclip_jax.evaluators.box_classification import DEFAULT_TEMPLATES, class_embeddings
from trainer_helpers import tiny_config

NUM_RECORDS = 12  # with eval_batch_size 8: two batches, the second half padding
IMAGE_SIZE = 96  # stored images; the model's input is 64, so masks are resized (NEAREST) on the way
IS_NOVEL = [label % 4 == 0 for label in range(scenes.NUM_CLASSES)]
IS_THING = [label % 6 < 3 for label in range(scenes.NUM_CLASSES)]


def scene_mask(scene) -> np.ndarray:
    """The semantic mask of a rendered scene: each object's visible pixels its class, 255 elsewhere."""
    mask = np.full(scene.image.shape[:2], SEGMENTATION_IGNORE, np.uint8)
    for obj, visible in zip(scene.objects, scene.masks):
        mask[visible] = obj.label
    return mask


class SegEvalScenes(tfds.core.GeneratorBasedBuilder):
    """Scenes val records that carry their semantic masks, with is_novel / is_thing metadata."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=record_features("jpeg"), metadata=tfds.core.MetadataDict(
            class_names=list(scenes.CLASS_NAMES), is_novel=IS_NOVEL, is_thing=IS_THING))

    def _split_generators(self, dl_manager):
        return {"val": self._generate_examples()}

    def _generate_examples(self):
        for index in range(NUM_RECORDS):
            scene = scenes.generate_example(0, "val", index, IMAGE_SIZE)
            record = scenes.scene_record(scene, "val", index)
            record["segmentation"] = scene_mask(scene)
            yield index, record


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("seg_tfds"))
    SegEvalScenes(data_dir=directory, file_format="array_record").download_and_prepare()
    return directory


@pytest.fixture(scope="module")
def setup(data_dir):
    config = tiny_config()
    config.eval_batch_size = 8
    config.data.data_dir = data_dir
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 1)], jax.devices()[:2])
    trainer = train.build_trainer(config, mesh)
    state = trainer.init_state()
    context = evaluators.EvalContext(mesh=mesh, data_config=config_lib.data_config(config), fns=trainer.eval_fns(),
                                     eval_batch_size=config.eval_batch_size)
    return trainer, state["params"], context


def _eval_config():
    return ml_collections.ConfigDict({"type": "segmentation", "dataset": "seg_eval_scenes", "split": "val"})


def test_eval_batches_carry_masks_only_when_asked(data_dir, setup):
    _, _, context = setup
    data = evaluators.common.eval_data_config(context, _eval_config())
    assert "segmentation" not in next(pipeline.make_eval_iterator(data, process_index=0, process_count=1))
    data = evaluators.common.eval_data_config(context, _eval_config(), {"eval_segmentation": True})
    batches = list(pipeline.make_eval_iterator(data, process_index=0, process_count=1))
    source = pipeline.open_source("seg_eval_scenes", "val", data_dir)
    s = data.image_size
    assert [b["segmentation"].shape for b in batches] == [(8, s, s)] * 2
    assert all(b["segmentation"].dtype == np.uint8 for b in batches)
    rows = np.concatenate([b["segmentation"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert (rows[~mask] == SEGMENTATION_IGNORE).all()  # padding is ignored
    for row, index in enumerate(np.concatenate([b["index"] for b in batches])[mask]):
        stored = source[int(index)]["segmentation"]
        assert stored.shape == (IMAGE_SIZE, IMAGE_SIZE)
        np.testing.assert_array_equal(rows[row], pipeline.resize_segmentation(stored, s))
        assert set(np.unique(rows[row])) <= set(np.unique(stored))  # NEAREST: no blended labels
    assert (rows[mask] != SEGMENTATION_IGNORE).any()


def test_mask_at_the_wrong_resolution_is_a_bad_record(data_dir):
    source = pipeline.open_source("seg_eval_scenes", "val", data_dir)
    record = dict(source[0])
    record["segmentation"] = record["segmentation"][:10]
    config = pipeline.default_data_config()
    config.update(dataset="seg_eval_scenes", image_size=32, eval_batch_size=2, eval_segmentation=True,
                  read_threads=1)
    with pytest.raises(pipeline.BadRecordError, match=r"segmentation mask of shape \(10, 96\)"):
        list(pipeline.make_eval_iterator(config, source=[record], process_index=0, process_count=1))
    record["segmentation"] = np.zeros((0, 0), np.uint8)  # no mask: all ignored, not an error
    (batch,) = pipeline.make_eval_iterator(config, source=[record], process_index=0, process_count=1)
    assert (batch["segmentation"] == SEGMENTATION_IGNORE).all()


def test_segmentation_evaluator_on_a_tiny_model_and_an_oracle(data_dir, setup):
    trainer, params, context = setup
    eval_config = _eval_config()
    with jax.set_mesh(context.mesh):
        metrics = evaluators.build("seg", eval_config, context).run(params)
    assert metrics["num_images"] == NUM_RECORDS
    s = context.data_config.image_size
    source = pipeline.open_source("seg_eval_scenes", "val", data_dir)
    truth = [pipeline.resize_segmentation(source[i]["segmentation"], s) for i in range(NUM_RECORDS)]
    assert metrics["num_pixels"] == sum(int((t != SEGMENTATION_IGNORE).sum()) for t in truth)
    for key in ("miou", "pixel_acc", "miou_base", "miou_novel", "miou_harmonic", "miou_thing", "miou_stuff"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
    assert 1 <= metrics["num_classes_evaluated"] <= scenes.NUM_CLASSES

    # The oracle: per pixel (at S x S) the class embedding of the true class; zeros on ignored pixels / padding.
    inputs = pipeline.ModelInputs.from_config(context.data_config)
    by_image = {inputs.image(source[i]["image"]).tobytes(): truth[i] for i in range(NUM_RECORDS)}
    with jax.set_mesh(context.mesh):
        classes = class_embeddings(context.fns.encode_texts, params, list(scenes.CLASS_NAMES), DEFAULT_TEMPLATES,
                                   context.fns.tokenize, context.mesh.size)
    table = np.concatenate([classes, np.zeros((256 - len(classes), classes.shape[1]), np.float32)])

    def oracle(shift):
        def encode_dense(p, images):
            images = np.asarray(images)
            masks = np.stack([by_image.get(x.tobytes(), np.full((s, s), SEGMENTATION_IGNORE, np.uint8))
                              for x in images])
            assert (masks != SEGMENTATION_IGNORE).any(axis=(1, 2)).sum() >= 1
            shifted = np.where(masks < len(classes), (masks.astype(np.int64) + shift) % len(classes), masks)
            return jnp.asarray(table[shifted])
        return encode_dense

    for shift, expected in ((0, 1.0), (1, 0.0)):
        fns = dataclasses.replace(context.fns, encode_dense=oracle(shift))
        with jax.set_mesh(context.mesh):
            m = evaluators.build("seg", eval_config, dataclasses.replace(context, fns=fns)).run(params)
        assert m["miou"] == pytest.approx(expected) and m["pixel_acc"] == pytest.approx(expected), (shift, m)
        if shift == 0:
            assert m["miou_base"] == m["miou_novel"] == m["miou_thing"] == m["miou_stuff"] == 1.0
            assert m["num_classes_evaluated"] == len({int(c) for t in truth for c in np.unique(t)} - {255})


def test_box_classification_reports_base_novel_from_metadata(setup):
    _, params, context = setup
    eval_config = ml_collections.ConfigDict({"type": "box_classification", "dataset": "seg_eval_scenes",
                                             "split": "val"})
    with jax.set_mesh(context.mesh):
        metrics = evaluators.build("boxcls", eval_config, context).run(params)
    for key in ("top1", "top1_base", "top1_novel", "top5_thing", "top5_stuff"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
    assert metrics["num_boxes"] >= 2 * NUM_RECORDS  # scenes have 2-4 objects each
