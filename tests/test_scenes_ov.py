"""Scenes open-vocabulary configs (synonyms, extracted lexemes, novel classes) and the semantic masks of scenes."""
import collections
import hashlib
import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from harmoclip_jax.data import pipeline, scenes
from harmoclip_jax.data.features import SEGMENTATION_IGNORE, record_features
from harmoclip_jax.data.lexemes import LexemeExtractor

SIZE = 64  # ov_tiny


@pytest.fixture(scope="module")
def ov_tiny(tmp_path_factory):
    builder = scenes.Scenes(config="ov_tiny", data_dir=str(tmp_path_factory.mktemp("tfds")))
    builder.download_and_prepare()
    return builder


def _records(builder, split):
    source = builder.as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def _split_lexeme(lexeme: str, label: int) -> tuple[str, str]:
    """(colour word, shape word) of a lexeme, checked to be synonyms of the label's colour and shape."""
    colour, shape = divmod(label, len(scenes.SHAPES))
    colour_word, _, shape_word = lexeme.partition(" ")
    assert colour_word in scenes.COLOUR_SYNONYMS[scenes.COLOURS[colour]], (lexeme, scenes.CLASS_NAMES[label])
    assert shape_word in scenes.SHAPE_SYNONYMS[scenes.SHAPES[shape]], (lexeme, scenes.CLASS_NAMES[label])
    return colour_word, shape_word


def _mentions(objects) -> list[str]:
    """A regex-free check list: per object, every '<size> <colour word> <shape word>' it may be named by."""
    out = []
    for obj in objects:
        colours = scenes.COLOUR_SYNONYMS[scenes.COLOURS[obj.colour]]
        shapes = scenes.SHAPE_SYNONYMS[scenes.SHAPES[obj.shape]]
        out.append([f"{scenes.SIZES[obj.size]} {c} {s}" for c in colours for s in shapes])
    return out


# ------------------------------------------------------------------------------------------ configs, classes
def test_ov_configs():
    configs = {c.name: c for c in scenes.Scenes.BUILDER_CONFIGS}
    expected = {"ov": (128, 10_000, 1_000, 1_000), "ov_small": (96, 2_000, 200, 200), "ov_tiny": (64, 96, 72, 72)}
    for name, (size, train, val, test) in expected.items():
        config = configs[name]
        assert config.open_vocab and (config.image_size, config.num_train, config.num_val, config.num_test) == (
            size, train, val, test)
    assert not any(configs[name].open_vocab for name in ("default", "small", "tiny"))


def test_novel_classes_leave_every_colour_and_shape_among_the_base_classes():
    assert len(scenes.NOVEL_CLASSES) == len(set(scenes.NOVEL_CLASSES)) == 9
    assert set(scenes.NOVEL_CLASSES) <= set(scenes.CLASS_NAMES)
    assert sum(scenes.IS_NOVEL) == 9 and len(scenes.IS_NOVEL) == scenes.NUM_CLASSES
    base = [name.split() for name, novel in zip(scenes.CLASS_NAMES, scenes.IS_NOVEL) if not novel]
    novel = [name.split() for name in scenes.NOVEL_CLASSES]
    for position, words in ((0, scenes.COLOURS), (1, scenes.SHAPES)):
        assert {b[position] for b in base} == set(words)  # every colour and shape still has base classes
        assert {n[position] for n in novel} == set(words)  # and every one has a novel class too


def test_metadata(ov_tiny, tmp_path):
    assert list(ov_tiny.info.metadata["class_names"]) == list(scenes.CLASS_NAMES)  # prompts: canonical names
    assert list(ov_tiny.info.metadata["is_novel"]) == list(scenes.IS_NOVEL)
    reloaded = tfds.builder("scenes/ov_tiny", data_dir=str(ov_tiny.data_path.parents[2])).info.metadata
    assert list(reloaded["is_novel"]) == list(scenes.IS_NOVEL)
    closed = scenes.Scenes(config="tiny", data_dir=str(tmp_path)).info.metadata
    assert "is_novel" not in closed and list(closed["class_names"]) == list(scenes.CLASS_NAMES)


# ------------------------------------------------------------------------------------------ text
def test_every_synonym_caption_extracts_to_its_lexeme():
    """The rule extractor (what the build uses) returns exactly '<colour word> <shape word>' for every region
    caption an open-vocabulary scene can have."""
    captions, expected = [], []
    for colours, shapes in itertools.product(scenes.COLOUR_SYNONYMS.values(), scenes.SHAPE_SYNONYMS.values()):
        for colour, shape, cell in itertools.product(colours, shapes, itertools.product(range(3), range(3))):
            captions.append(f"{scenes._article(colour)} {colour} {shape} {scenes.position_phrase(cell)}")
            expected.append(f"{colour} {shape}")
    assert LexemeExtractor(backend="rules").primary(captions) == expected
    assert scenes._lexeme_extractor().backend == "rules"  # the build never depends on spaCy being installed


def test_lexemes_are_synonyms_extracted_from_region_captions(ov_tiny):
    records = _records(ov_tiny, "train") + _records(ov_tiny, "val")
    extractor = LexemeExtractor(backend="rules")
    lexemes, labels, captions = [], [], []
    for record in records:
        regions = record["regions"]
        lexemes += [x.decode() for x in regions["lexeme"]]
        captions += [x.decode() for x in regions["caption"]]
        labels += [int(x) for x in regions["label"]]
    assert extractor.primary(captions) == lexemes
    words = collections.Counter()
    for lexeme, caption, label in zip(lexemes, captions, labels):
        colour_word, shape_word = _split_lexeme(lexeme, label)
        words[colour_word] += 1
        words[shape_word] += 1
        assert caption.startswith(f"{scenes._article(lexeme)} {lexeme} ")  # the caption contains the lexeme
        assert not any(size in caption.split() for size in scenes.SIZES)  # no size word: the lexeme is the class
    differ = np.mean([lexeme != scenes.CLASS_NAMES[label] for lexeme, label in zip(lexemes, labels)])
    assert 0.75 < differ < 0.95, differ  # mostly synonyms; the canonical words are one option among several
    all_words = {w for options in itertools.chain(scenes.COLOUR_SYNONYMS.values(), scenes.SHAPE_SYNONYMS.values())
                 for w in options}
    assert set(words) == all_words  # every synonym is used


def test_global_captions_name_every_object_including_novel_ones():
    for index in range(40):
        scene = scenes.generate_example(0, "train", index, SIZE, open_vocab=True)
        for caption in scene.captions:
            lower = caption.lower()
            for options in _mentions(scene.objects):
                assert sum(lower.count(m) for m in options) == 1, (options, caption)


def test_open_vocab_captions_fit_clip_context():
    from harmoclip_jax.tokenizer import tokenize

    captions = [c for i in range(200) for c in scenes.generate_example(0, "train", i, SIZE, True).captions]
    lengths = (tokenize(captions) != 0).sum(1)
    assert lengths.max() < 77


# ------------------------------------------------------------------------------------------ novel classes
def test_train_split_has_no_novel_regions(ov_tiny):
    size, seed = ov_tiny.builder_config.image_size, ov_tiny.builder_config.seed
    unannotated = 0
    for record in _records(ov_tiny, "train"):
        labels = [int(l) for l in record["regions"]["label"]]
        assert labels and not any(scenes.IS_NOVEL[l] for l in labels)  # >= 1 region, none of a novel class
        assert record["segmentation"].shape == (0, 0)
        scene = scenes.generate_example(seed, "train", int(record["image_id"]), size, open_vocab=True)
        assert labels == [o.label for o in scene.objects if not o.is_novel]  # every base object is annotated
        np.testing.assert_array_equal(np.stack(record["regions"]["box"]),
                                      scene.boxes[[not o.is_novel for o in scene.objects]])
        unannotated += sum(o.is_novel for o in scene.objects)
    assert unannotated >= 10  # novel objects are in the pictures (and in the captions, tested above)


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_splits_annotate_every_class(ov_tiny, split):
    size, seed = ov_tiny.builder_config.image_size, ov_tiny.builder_config.seed
    labels = collections.Counter()
    for record in _records(ov_tiny, split):
        scene = scenes.generate_example(seed, split, int(record["image_id"]), size, open_vocab=True)
        assert [int(l) for l in record["regions"]["label"]] == [o.label for o in scene.objects]
        labels.update(int(l) for l in record["regions"]["label"])
    assert sorted(labels) == list(range(scenes.NUM_CLASSES))  # base and novel


def test_ov_images_are_the_closed_vocabulary_images():
    """Eval images equal those of the closed-vocabulary config of the same size; train pairs too, except pairs
    resampled because one of their images had only novel objects."""
    for index in range(8):
        assert np.array_equal(scenes.generate_example(0, "val", index, SIZE, True).image,
                              scenes.generate_example(0, "val", index, SIZE).image)
    same = [np.array_equal(scenes.generate_example(0, "train", i, SIZE, True).image,
                           scenes.generate_example(0, "train", i, SIZE).image) for i in range(96)]
    assert 0.85 < np.mean(same) < 1.0, np.mean(same)  # ~3.5 % of train pairs are resampled


def test_ov_build_is_deterministic(ov_tiny, tmp_path):
    again = scenes.Scenes(config="ov_tiny", data_dir=str(tmp_path))
    again.download_and_prepare()

    def digests(directory):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.array_record*"))}

    first = digests(ov_tiny.data_path)
    assert len(first) == 3 and first == digests(again.data_path)
    scenes._generate_pair.cache_clear()
    a = scenes.generate_example(0, "train", 7, SIZE, True)
    scenes._generate_pair.cache_clear()
    b = scenes.generate_example(0, "train", 7, SIZE, True)
    assert a.captions == b.captions and a.lexemes == b.lexemes and np.array_equal(a.image, b.image)


# ------------------------------------------------------------------------------------------ masks
def _check_mask_against_regions(mask, regions, size):
    assert mask.shape == (size, size) and mask.dtype == np.uint8
    labels = [int(l) for l in regions["label"]]
    assert set(np.unique(mask).tolist()) - {SEGMENTATION_IGNORE} <= set(labels)
    for label, box in zip(labels, regions["box"]):
        x0, y0, x1, y1 = np.round(np.asarray(box) * size).astype(int)
        ys, xs = np.nonzero(mask == label)
        assert xs.size >= 20
        # The class's pixels lie inside its box and touch all four sides: the stored box is the mask's tight box.
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)


@pytest.mark.parametrize("split", ["val", "test"])
def test_ov_masks_agree_with_boxes(ov_tiny, split):
    for record in _records(ov_tiny, split):
        _check_mask_against_regions(record["segmentation"], record["regions"], SIZE)
        assert (record["segmentation"] != SEGMENTATION_IGNORE).mean() < 0.6  # background stays background


def test_mask_is_the_visible_objects():
    scene = scenes.generate_example(0, "val", 3, SIZE)
    mask = scenes.semantic_mask(scene)
    for obj, visible in zip(scene.objects, scene.masks):
        assert np.all(mask[visible] == obj.label) and (mask == obj.label).sum() == visible.sum()
    assert np.all((mask == SEGMENTATION_IGNORE) == ~scene.masks.any(0))
    assert scenes.scene_record(scene, "train", 3)["segmentation"].shape == (0, 0)


# ------------------------------------------------------------------------------------------ pipeline
def test_training_pipeline_takes_a_record_without_regions():
    """OV train images always keep >= 1 region, but a record whose objects are all novel would have none: the
    training transform must give an example with no regions, not fail or skip it."""
    scene = scenes.generate_example(0, "train", 0, SIZE, open_vocab=True)
    record = scenes.scene_record(scene, "train", 0)
    record["regions"] = {"box": np.zeros((0, 4), np.float32), "caption": [], "lexeme": [],
                         "label": np.zeros((0,), np.int64)}
    features = record_features()
    record = features.deserialize_example_np(features.serialize_example(record))  # as a data source reads it
    assert record["regions"]["box"] == []
    config = pipeline.default_data_config()
    config.image_size = 32
    transform = pipeline.TrainTransform(inputs=pipeline.ModelInputs.from_config(config), max_regions=3, seed=0,
                                        epoch_length=1)
    example = transform(0, (0, record))
    assert example["image"].shape == (32, 32, 3) and example["text"][0] != 0
    assert not example["box_mask"].any() and np.all(example["label"] == -1) and np.all(example["lexeme_id"] == -1)
    assert not example["region_text"].any() and not example["lexeme"].any() and not example["boxes"].any()
    assert example["_problems"][1] == ()
