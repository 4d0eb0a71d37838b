"""COCO / Flickr30k TFDS builders on tiny fake manual_dirs written in the real file formats."""
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from harmoclip_jax.data import prepare as prepare_module
from harmoclip_jax.data.coco import (
    CocoPanopticBoxes,
    CocoRegionCaptions,
    CocoRetrieval,
    mask_xywh,
    panoptic_segment_ids,
    region_caption_key,
)
from harmoclip_jax.data.flickr import Flickr30kRetrieval
from harmoclip_jax.data.manual_files import MissingDatasetFilesError, normalised_xyxy, passes_size_filter


# ------------------------------------------------------------------------------------------ fake files
def _jpeg(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, format="JPEG")


def _json(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


TRAIN_IMAGES = [  # id, file name, width, height, JPEG mode (grayscale and CMYK JPEGs exist in real COCO)
    (1, "000000000001.jpg", 64, 48, "RGB"),
    (2, "000000000002.jpg", 40, 40, "L"),
    (3, "000000000003.jpg", 32, 32, "CMYK"),
]
# image_id, bbox (xywh), region caption (None: no caption for this box), expected fate
TRAIN_BOXES = [
    (1, [10.7, 5.2, 20.9, 30.1], "a man riding a wave on top of a surfboard", "kept"),
    (1, [1, 1, 5, 5], "a tiny thing", "size filtered"),  # 25 px < 8**2
    (1, [0, 0, 8, 8], "two dogs playing with a frisbee", "kept"),  # exactly 8**2 stays
    (1, [30, 20, 10, 10], None, "no caption"),
    (1, [50, 40, 30, 30], "a close up of a pizza", "kept, clipped"),
    (1, [0, 0, 2000, 1000], "the whole world", "size filtered"),  # > 1024**2
    (2, [2, 3, 20, 10], "a red double decker bus", "kept"),
    (2, [5, 5, 10, 10], "a pair of scissors on a desk", "kept"),
]


def write_fake_coco_train(root: Path):
    for image_id, name, w, h, mode in TRAIN_IMAGES:
        _jpeg(root / "train2017" / name, w, h, mode, seed=image_id)
    images = [{"id": i, "file_name": n, "width": w, "height": h} for i, n, w, h, _ in TRAIN_IMAGES]
    captions = [{"id": 100 + k, "image_id": 1, "caption": f"caption {k} of image one "} for k in range(5)]
    captions += [{"id": 200 + k, "image_id": 2, "caption": f"caption {k} of image two"} for k in range(6)]
    captions += [{"id": 300 + k, "image_id": 3, "caption": f"caption {k} of image three"} for k in range(5)]
    _json(root / "annotations/captions_train2017.json", {"images": images, "annotations": captions})
    anns = [{"id": k, "image_id": i, "bbox": box} for k, (i, box, _, _) in enumerate(TRAIN_BOXES)]
    _json(root / "coco_proposals.json", {"images": images, "annotations": anns, "categories": []})
    names = {i: n for i, n, *_ in TRAIN_IMAGES}
    region_captions = {region_caption_key(names[i], *box): text for i, box, text, _ in TRAIN_BOXES if text}
    _json(root / "coco_captions.json", region_captions)


PANOPTIC_CATEGORIES = [  # deliberately not sorted by id: labels must follow sorted ids
    {"id": 184, "name": "tree-merged", "isthing": 0, "supercategory": "plant"},
    {"id": 1, "name": "person", "isthing": 1, "supercategory": "person"},
    {"id": 3, "name": "car", "isthing": 1, "supercategory": "vehicle"},
    {"id": 149, "name": "grass-merged", "isthing": 0, "supercategory": "plant"},
]
STUFF_ID = 70000  # R=112, G=17, B=1: exercises all three channels of id = R + 256 G + 256^2 B
TINY_STUFF_ID = 5000


def _panoptic_png(path: Path, ids: np.ndarray):
    rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def write_fake_coco_val(root: Path):
    _jpeg(root / "val2017/000000000101.jpg", 64, 48, seed=101)
    _jpeg(root / "val2017/000000000102.jpg", 32, 32, seed=102)
    images = [
        {"id": 101, "file_name": "000000000101.jpg", "width": 64, "height": 48},
        {"id": 102, "file_name": "000000000102.jpg", "width": 32, "height": 32},
    ]
    ids = np.zeros((48, 64), np.int64)
    ids[10:30, 5:25] = 7  # person
    ids[0:5, 30:64] = STUFF_ID  # an L-shaped tree segment: tight box x 30..64, y 0..40
    ids[0:40, 60:64] = STUFF_ID
    ids[45:47, 0:3] = TINY_STUFF_ID  # 3x2 px grass: filtered
    _panoptic_png(root / "annotations/panoptic_val2017/000000000101.png", ids)
    ids2 = np.zeros((32, 32), np.int64)
    ids2[4:20, 8:30] = 9
    _panoptic_png(root / "annotations/panoptic_val2017/000000000102.png", ids2)
    annotations = [
        {
            "image_id": 101,
            "file_name": "000000000101.png",
            "segments_info": [
                # thing boxes come from `bbox` (made 1 px larger than the mask here to tell them apart)
                {"id": 7, "category_id": 1, "bbox": [4, 9, 22, 22], "area": 400, "iscrowd": 0},
                {"id": STUFF_ID, "category_id": 184, "bbox": [0, 0, 1, 1], "area": 290, "iscrowd": 0},
                {"id": TINY_STUFF_ID, "category_id": 149, "bbox": [0, 45, 3, 2], "area": 6, "iscrowd": 0},
            ],
        },
        {
            "image_id": 102,
            "file_name": "000000000102.png",
            "segments_info": [{"id": 9, "category_id": 3, "bbox": [8, 4, 22, 16], "area": 352, "iscrowd": 0}],
        },
    ]
    _json(
        root / "annotations/panoptic_val2017.json",
        {"images": images, "annotations": annotations, "categories": PANOPTIC_CATEGORIES},
    )
    captions = [{"id": k, "image_id": 101, "caption": f"val one {k}"} for k in range(7)]
    captions += [{"id": 10 + k, "image_id": 102, "caption": f"val two {k}\n"} for k in range(5)]
    _json(root / "annotations/captions_val2017.json", {"images": images, "annotations": captions})


def write_fake_flickr(root: Path, annotation_format: str, image_dir: str = "flickr30k-images"):
    for k, name in enumerate(["1000092795.jpg", "10002456.jpg", "1001.jpg"]):
        _jpeg(root / image_dir / name, 24, 16, seed=k)
    if annotation_format == "karpathy":
        images = [
            {"filename": "1000092795.jpg", "split": "test", "sentences": [{"raw": f"a {k} "} for k in range(5)]},
            {"filename": "10002456.jpg", "split": "train", "sentences": [{"raw": "x"}] * 5},
            {"filename": "1001.jpg", "split": "test", "sentences": [{"raw": f"b {k}"} for k in range(6)]},
        ]
        _json(root / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    else:
        _json(
            root / "flickr30k_test.json",
            [
                {"image": "flickr30k-images/1000092795.jpg", "caption": [f"a {k}" for k in range(5)]},
                {"image": "flickr30k-images/1001.jpg", "caption": [f"b {k}" for k in range(5)]},
            ],
        )


def _build(builder_cls, manual_dir, data_dir, config=None):
    builder = builder_cls(data_dir=str(data_dir), config=config, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def _records(builder, split):
    return {int(r["image_id"]): r for r in builder.as_data_source()[split]}


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_fake_coco_train(root)
    write_fake_coco_val(root)
    return root


@pytest.fixture(scope="module")
def coco_train(coco_dir, tmp_path_factory):
    return _build(CocoRegionCaptions, coco_dir, tmp_path_factory.mktemp("tfds"))


# ------------------------------------------------------------------------------------------ pure helpers
def test_size_filter_and_box_normalisation():
    assert passes_size_filter(8, 8) and not passes_size_filter(7.9, 8)
    assert passes_size_filter(1024, 1024) and not passes_size_filter(1025, 1024)
    np.testing.assert_allclose(normalised_xyxy(16, 12, 32, 24, 64, 48), [0.25, 0.25, 0.75, 0.75])
    np.testing.assert_allclose(normalised_xyxy(-10, 40, 100, 100, 64, 48), [0, 40 / 48, 1, 1])
    assert normalised_xyxy(70, 0, 10, 10, 64, 48) is None  # entirely outside


def test_region_caption_key_truncates_like_fineclip():
    assert region_caption_key("000000000009.jpg", 10.7, 5.2, 20.9, 30.99) == "000000000009.jpg_10_5_20_30.jpg"


def test_panoptic_png_decoding_and_mask_box(tmp_path):
    ids = np.zeros((6, 8), np.int64)
    ids[1:3, 2:7] = STUFF_ID
    _panoptic_png(tmp_path / "p.png", ids)
    decoded = panoptic_segment_ids(tmp_path / "p.png")
    np.testing.assert_array_equal(decoded, ids)
    assert mask_xywh(decoded == STUFF_ID) == (2, 1, 5, 2)
    assert mask_xywh(decoded == 12345) is None


# ------------------------------------------------------------------------------------------ coco train
def test_coco_train_records(coco_train):
    records = _records(coco_train, "train")
    assert sorted(records) == [1, 2, 3]
    one = records[1]
    assert one["image"].shape == (48, 64, 3) and one["image"].dtype == np.uint8
    assert one["file_name"] == b"000000000001.jpg"
    assert one["captions"] == [f"caption {k} of image one".encode() for k in range(5)]  # stripped
    regions = one["regions"]
    assert regions["caption"] == [
        b"a man riding a wave on top of a surfboard",
        b"two dogs playing with a frisbee",
        b"a close up of a pizza",
    ]
    assert regions["lexeme"] == [b"man", b"dogs", b"pizza"]
    np.testing.assert_allclose(
        np.stack(regions["box"]),
        [
            [10.7 / 64, 5.2 / 48, (10.7 + 20.9) / 64, (5.2 + 30.1) / 48],
            [0, 0, 8 / 64, 8 / 48],
            [50 / 64, 40 / 48, 1, 1],  # clipped to the image
        ],
        rtol=1e-6,
    )
    assert list(regions["label"]) == [-1, -1, -1]
    two = records[2]
    assert len(two["captions"]) == 6  # training keeps every caption
    assert two["image"].shape == (40, 40, 3)  # grayscale JPEG comes back as 3 channels
    assert two["regions"]["lexeme"] == [b"red double decker bus", b"scissors"]
    three = records[3]
    assert three["image"].shape == (32, 32, 3)  # CMYK JPEG converted to RGB at build time
    assert len(three["regions"]["box"]) == 0 and three["regions"]["lexeme"] == []
    metadata = coco_train.info.metadata
    assert metadata["lexeme_backend"].startswith("spacy:")
    assert metadata["build_stats"]["regions_kept"] == 5
    assert metadata["build_stats"]["regions_size_filtered"] == 2
    assert metadata["build_stats"]["regions_without_caption"] == 1


def test_coco_train_options_via_prepare_and_reload(coco_dir, tmp_path):
    builder = prepare_module.prepare(
        "coco_train", str(tmp_path), str(coco_dir), options={"max_regions": "1", "lexeme_backend": "rules"}
    )
    assert builder.builder_config.name == "proposals-lexeme_backend_rules-max_regions_1"
    records = _records(builder, "train")
    assert [len(r["regions"]["box"]) for _, r in sorted(records.items())] == [1, 1, 0]
    assert records[1]["regions"]["lexeme"] == [b"man"]
    # Read back by registered name, as the training pipeline does; metadata survives the round trip.
    source = tfds.data_source(f"coco_region_captions/{builder.builder_config.name}", data_dir=str(tmp_path),
                              split="train")
    assert len(source) == 3
    reloaded = tfds.builder(f"coco_region_captions/{builder.builder_config.name}", data_dir=str(tmp_path))
    assert reloaded.info.metadata["lexeme_backend"] == "rules"


def test_coco_train_region_captions_for_other_boxes_is_an_error(tmp_path):
    write_fake_coco_train(tmp_path)
    _json(tmp_path / "coco_captions.json", {"000000000001.jpg_0_0_1_1.jpg": "wrong boxes"})
    with pytest.raises(ValueError, match="has a caption in"):
        _build(CocoRegionCaptions, tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------------ panoptic
def test_coco_panoptic_boxes(coco_dir, tmp_path):
    builder = _build(CocoPanopticBoxes, coco_dir, tmp_path)
    metadata = builder.info.metadata
    assert metadata["class_names"] == ["person", "car", "grass-merged", "tree-merged"]
    assert metadata["is_thing"] == [True, True, False, False]
    assert metadata["category_ids"] == [1, 3, 149, 184]
    records = _records(builder, "val")
    regions = records[101]["regions"]
    assert list(regions["label"]) == [0, 3]  # person, tree; the 3x2 px grass segment is filtered
    np.testing.assert_allclose(
        np.stack(regions["box"]),
        [[4 / 64, 9 / 48, 26 / 64, 31 / 48], [30 / 64, 0, 1, 40 / 48]],  # thing: JSON bbox; stuff: mask box
        rtol=1e-6,
    )
    assert regions["caption"] == [b"", b""] and records[101]["captions"] == []
    assert list(records[102]["regions"]["label"]) == [1]
    assert metadata["build_stats"]["segments_size_filtered"] == 1
    # The semantic mask: every segment's pixels carry its class label (also the grass segment that is too small
    # to be a box), void (id 0) is 255.
    expected = np.full((48, 64), 255, np.uint8)
    expected[10:30, 5:25] = 0  # person
    expected[0:5, 30:64] = 3  # tree-merged (L-shaped)
    expected[0:40, 60:64] = 3
    expected[45:47, 0:3] = 2  # grass-merged
    mask = records[101]["segmentation"]
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, expected)
    expected2 = np.full((32, 32), 255, np.uint8)
    expected2[4:20, 8:30] = 1  # car
    np.testing.assert_array_equal(records[102]["segmentation"], expected2)
    reloaded = tfds.builder("coco_panoptic_boxes", data_dir=str(tmp_path)).info.metadata
    assert reloaded["class_names"] == metadata["class_names"] and reloaded["is_thing"] == metadata["is_thing"]
    assert reloaded["build_stats"]["regions_kept"] == 3  # counted during generation, saved after it


# ------------------------------------------------------------------------------------------ retrieval
def test_coco_retrieval_keeps_first_five_captions(coco_dir, tmp_path):
    records = _records(_build(CocoRetrieval, coco_dir, tmp_path), "val")
    assert records[101]["captions"] == [f"val one {k}".encode() for k in range(5)]
    assert records[102]["captions"] == [f"val two {k}".encode() for k in range(5)]
    assert len(records[101]["regions"]["box"]) == 0


@pytest.mark.parametrize(
    "annotation_format, image_dir",
    [("karpathy", "flickr30k-images"), ("albef", "flickr30k-images"), ("albef", "flickr30k_images")],
)
def test_flickr30k_retrieval(tmp_path, annotation_format, image_dir):
    write_fake_flickr(tmp_path / "manual", annotation_format, image_dir)
    builder = _build(Flickr30kRetrieval, tmp_path / "manual", tmp_path / "out")
    records = _records(builder, "test")
    assert sorted(records) == [1001, 1000092795]  # only the test split, ids from the file names
    assert records[1000092795]["captions"] == [f"a {k}".encode() for k in range(5)]
    assert records[1001]["captions"] == [f"b {k}".encode() for k in range(5)]
    assert records[1001]["image"].shape == (16, 24, 3)


# ------------------------------------------------------------------------------------------ missing files
@pytest.mark.parametrize(
    "builder_cls, expected_files",
    [
        (
            CocoRegionCaptions,
            ["train2017/", "annotations/captions_train2017.json", "coco_proposals.json", "coco_captions.json"],
        ),
        (CocoPanopticBoxes, ["val2017/", "annotations/panoptic_val2017.json", "annotations/panoptic_val2017/"]),
        (CocoRetrieval, ["val2017/", "annotations/captions_val2017.json"]),
        (Flickr30kRetrieval, ["flickr30k-images/", "dataset_flickr30k.json", "flickr30k_test.json"]),
    ],
)
def test_missing_files_error_names_every_file(tmp_path, builder_cls, expected_files):
    manual = tmp_path / "manual"
    manual.mkdir()
    with pytest.raises(MissingDatasetFilesError) as error:
        _build(builder_cls, manual, tmp_path / "out")
    message = str(error.value)
    for relative in expected_files:
        assert relative in message
    assert str(manual) in message and "docs/datasets.md" in message


def test_missing_instances_file_named_for_instances_config(coco_dir, tmp_path):
    with pytest.raises(MissingDatasetFilesError, match="annotations/instances_train2017.json"):
        _build(CocoRegionCaptions, coco_dir, tmp_path, config="instances")


def test_missing_single_image_is_named(tmp_path):
    write_fake_coco_val(tmp_path)
    (tmp_path / "val2017/000000000102.jpg").unlink()
    with pytest.raises(MissingDatasetFilesError, match="000000000102.jpg"):
        _build(CocoRetrieval, tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------------ CLI
def test_prepare_cli_builds_and_reports(coco_dir, tmp_path, capsys):
    assert prepare_module.main(
        ["--dataset", "coco_retrieval", "--manual_dir", str(coco_dir), "--data_dir", str(tmp_path)]
    ) == 0
    out = capsys.readouterr().out
    assert "split 'val': 2 records" in out and "tfds.data_source('coco_retrieval'" in out


def test_prepare_rejects_unknown_option_and_missing_manual_dir(tmp_path):
    with pytest.raises(ValueError, match="no option 'max_boxes'"):
        prepare_module.resolve_config(CocoRegionCaptions, None, {"max_boxes": "3"})
    with pytest.raises(ValueError, match="--manual_dir"):
        prepare_module.prepare("coco_retrieval", str(tmp_path))
