"""The embedded scenes dataset: determinism, statistics, tight boxes, captions and hard negatives."""
import collections
import hashlib
import io
import re

import numpy as np
import pytest
from PIL import Image

from harmoclip_jax.data import scenes


def _file_digests(directory) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.array_record*"))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = scenes.Scenes(config="tiny", data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder


def _records(builder, split):
    source = builder.as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def test_build_is_deterministic_byte_for_byte(tiny, tmp_path):
    again = scenes.Scenes(config="tiny", data_dir=str(tmp_path))
    again.download_and_prepare()
    first, second = _file_digests(tiny.data_path), _file_digests(again.data_path)
    assert len(first) == 3 and first == second


def test_seed_changes_the_images():
    a = scenes.generate_example(0, "train", 5, 64)
    b = scenes.generate_example(1, "train", 5, 64)
    assert not np.array_equal(a.image, b.image)
    # Splits are generated from different streams too.
    assert not np.array_equal(a.image, scenes.generate_example(0, "val", 5, 64).image)


def test_split_sizes_and_metadata(tiny):
    config = tiny.builder_config
    assert {name: info.num_examples for name, info in tiny.info.splits.items()} == {
        "train": config.num_train, "val": config.num_val, "test": config.num_test}
    assert list(tiny.info.metadata["class_names"]) == list(scenes.CLASS_NAMES)
    assert len(set(scenes.CLASS_NAMES)) == 36


@pytest.mark.parametrize("split", ["val", "test"])
def test_every_class_occurs_in_eval_splits(tiny, split):
    labels = collections.Counter(int(l) for r in _records(tiny, split) for l in r["regions"]["label"])
    assert sorted(labels) == list(range(scenes.NUM_CLASSES))


def test_records_are_consistent(tiny):
    records = _records(tiny, "val")
    object_counts = collections.Counter()
    for record in records:
        captions = [c.decode() for c in record["captions"]]
        regions = record["regions"]
        n = len(regions["label"])
        object_counts[n] += 1
        assert len(captions) == 5 and len(set(captions)) == 5, captions
        assert 2 <= n <= 4
        assert len({int(l) for l in regions["label"]}) == n  # distinct classes per image
        for label, lexeme, region_caption in zip(regions["label"], regions["lexeme"], regions["caption"]):
            lexeme, region_caption = lexeme.decode(), region_caption.decode()
            assert lexeme == scenes.CLASS_NAMES[int(label)]
            size_and_lexeme = re.match(r"a (small|large) (\w+ \w+) ", region_caption)
            assert size_and_lexeme and size_and_lexeme.group(2) == lexeme
            noun_phrase = size_and_lexeme.group(0).strip()
            # Every global caption names every object with its size, colour and shape.
            for caption in captions:
                assert noun_phrase in caption.lower(), (noun_phrase, caption)
        assert record["image"].shape == (64, 64, 3) and record["image"].dtype == np.uint8
        assert record["file_name"].decode() == f"scenes_val_{record['image_id']:06d}.jpg"
    assert set(object_counts) == {2, 3, 4}


def test_boxes_are_tight_and_pixels_show_the_named_colour(tiny):
    """Regenerates each stored record and checks boxes against the visible masks and the stored JPEG pixels."""
    size = tiny.builder_config.image_size
    for record in _records(tiny, "val"):
        scene = scenes.generate_example(tiny.builder_config.seed, "val", int(record["image_id"]), size)
        stored = record["image"].astype(np.float32)
        # The stored image is the JPEG of this very render.
        np.testing.assert_array_equal(stored, np.asarray(Image.open(io.BytesIO(scenes.encode_jpeg(scene.image)))))
        np.testing.assert_array_equal(np.stack(record["regions"]["box"]), scene.boxes)
        for obj, mask, box, label in zip(scene.objects, scene.masks, scene.boxes, record["regions"]["label"]):
            x0, y0, x1, y1 = np.round(box * size).astype(int)
            ys, xs = np.nonzero(mask)
            # Every visible pixel inside the box, and the box touches the object on all four sides.
            assert xs.min() == x0 and xs.max() == x1 - 1 and ys.min() == y0 and ys.max() == y1 - 1
            assert mask.sum() >= 20
            # The object's pixels in the stored image have the colour its label names (nearest anchor).
            core = mask.copy()
            core[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]  # skip JPEG edges
            mean_rgb = stored[core if core.sum() >= 5 else mask].mean(0)
            nearest = int(np.argmin(np.linalg.norm(scenes.COLOUR_RGB - mean_rgb, axis=1)))
            assert nearest == int(label) // len(scenes.SHAPES), (mean_rgb, scenes.CLASS_NAMES[int(label)])


def test_objects_mostly_visible_and_positions_match_captions():
    for index in range(60):
        scene = scenes.generate_example(3, "train", index, 96)
        for obj, visible, box in zip(scene.objects, scene.masks, scene.boxes):
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            assert (min(2, int(cy * 3)), min(2, int(cx * 3))) == obj.cell  # "in the top left" is true
            assert obj.region_caption.endswith(scenes.position_phrase(obj.cell))
        areas = np.array([np.count_nonzero(m) for m in scene.masks])
        assert np.all(areas > 0)


def test_pairs_are_hard_negatives():
    kinds = collections.Counter()
    for pair in range(30):
        base = scenes.generate_example(0, "test", 2 * pair, 64)
        negative = scenes.generate_example(0, "test", 2 * pair + 1, 64)
        assert base.variant == "base" and negative.variant.startswith("swap_")
        kinds[negative.variant] += 1
        # Same colours, shapes and sizes overall; only their binding or placement differs.
        for attribute in ("colour", "shape", "size"):
            assert sorted(getattr(o, attribute) for o in base.objects) == sorted(
                getattr(o, attribute) for o in negative.objects)
        assert {o.region_caption for o in base.objects} != {o.region_caption for o in negative.objects}
        assert not set(base.captions) & set(negative.captions)
    assert set(kinds) == {"swap_colour", "swap_shape", "swap_position"}


def test_relation_and_position_phrases():
    assert scenes.position_phrase((0, 0)) == "in the top left"
    assert scenes.position_phrase((0, 1)) == "at the top"
    assert scenes.position_phrase((1, 2)) == "on the right"
    assert scenes.relation_phrase((0, 0), (1, 1)) == "above and to the left of"
    assert scenes.relation_phrase((2, 1), (0, 1)) == "below"
    assert scenes.relation_phrase((1, 2), (1, 0)) == "to the right of"


def test_small_eval_split_is_rejected(tmp_path):
    config = scenes.ScenesConfig(name="too_small", num_train=10, num_val=10, num_test=72, image_size=64)
    with pytest.raises(ValueError, match="eval splits need >= 72"):
        scenes.Scenes(config=config, data_dir=str(tmp_path))


def test_preview_png(tmp_path):
    path = tmp_path / "preview.png"
    scenes.draw_preview(str(path), image_size=64, num_pairs=1, scale=2)
    picture = Image.open(io.BytesIO(path.read_bytes()))
    assert picture.format == "PNG" and picture.size[0] == 2 * 128 + 10


def test_captions_fit_clip_context():
    from harmoclip_jax.tokenizer import tokenize

    captions = [c for i in range(300) for c in scenes.generate_example(0, "train", i, 64).captions]
    captions += [o.region_caption for i in range(50) for o in scenes.generate_example(0, "val", i, 64).objects]
    lengths = (tokenize(captions) != 0).sum(1)
    assert lengths.max() < 77  # never truncated (a cut caption would fill all 77 positions)


def test_prepare_cli_builds_scenes_without_manual_dir(tmp_path):
    from harmoclip_jax.data.prepare import prepare

    builder = prepare("scenes", data_dir=str(tmp_path), config="tiny")
    assert {name: info.num_examples for name, info in builder.info.splits.items()} == \
        {"train": 96, "val": 72, "test": 72}


def _small_digest(*, jpeg: bool) -> str:
    """sha256 of a few `small` records (seed 0, 96 px) of every split: image (JPEG bytes or raw pixels), id, file
    name, captions, boxes, labels, region captions and lexemes. Everything but `segmentation`."""
    digest = hashlib.sha256()
    for split in ("train", "val", "test"):
        for index in (0, 1, 2, 3, 37, 150):
            scene = scenes.generate_example(0, split, index, 96)
            record = scenes.scene_record(scene, split, index)
            digest.update(record["image"] if jpeg else scene.image.tobytes())
            digest.update(record["file_name"].encode())
            digest.update(str(record["image_id"]).encode())
            for text in record["captions"]:
                digest.update(text.encode() + b"\0")
            regions = record["regions"]
            digest.update(np.asarray(regions["box"], np.float32).tobytes())
            digest.update(np.asarray(regions["label"], np.int64).tobytes())
            for text in regions["caption"] + regions["lexeme"]:
                digest.update(text.encode() + b"\0")
    return digest.hexdigest()


def test_existing_configs_are_unchanged():
    """Pins the `small` records as they were before the open-vocabulary configs were added (the demo's metrics
    depend on them). The raw-pixel digest is the contract; the JPEG digest also depends on Pillow's libjpeg
    (computed with Pillow 13.0.0, numpy 2.4.6)."""
    configs = {c.name: c for c in scenes.Scenes.BUILDER_CONFIGS}
    small = configs["small"]
    assert (small.image_size, small.seed, small.open_vocab) == (96, 0, False)  # the digest's arguments
    assert not any(configs[name].open_vocab for name in ("default", "small", "tiny"))
    assert _small_digest(jpeg=False) == "7ec88596ffc09be60b559e6f69a0322533ec6b0e58f274ce83a08cf670a12153"
    assert _small_digest(jpeg=True) == "5fef36be9058cd20760f3f22e97ec2a1141fa55fce3f97e37ad62d0003e2b62f"


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_records_have_semantic_masks_that_agree_with_boxes(tiny, split):
    size = tiny.builder_config.image_size
    for record in _records(tiny, split):
        mask = record["segmentation"]
        assert mask.shape == (size, size) and mask.dtype == np.uint8
        labels = [int(l) for l in record["regions"]["label"]]
        assert set(np.unique(mask).tolist()) == set(labels) | {scenes.SEGMENTATION_IGNORE}
        for label, box in zip(labels, record["regions"]["box"]):
            ys, xs = np.nonzero(mask == label)
            # Each object's pixels lie inside its box and touch all four sides: the box is the mask's tight box.
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == np.round(box * size).astype(int).tolist()


def test_train_records_have_no_mask(tiny):
    source = tiny.as_data_source(split="train")
    assert all(source[i]["segmentation"].shape == (0, 0) for i in range(4))
