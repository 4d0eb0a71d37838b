"""TFDS builders for COCO 2017, read from manually downloaded files (no TensorFlow, no network).

- `coco_region_captions` (split "train"): train2017 images, all their captions, and regions: boxes from
  FineCLIP's `coco_proposals.json` (config "proposals") or the GT instances (config "instances"), each with its
  BLIP-2 region caption (FineCLIP's `coco_captions.json`) and the caption's primary lexeme (lexemes.py).
- `coco_panoptic_boxes` (split "val"): panoptic val2017, the box-classification benchmark of FineCLIP: every
  segment of all 133 categories as a labelled box.
- `coco_retrieval` (split "val"): val2017, 5,000 images x 5 captions, image-text retrieval.

All write the record schema of features.py. The manual_dir is FineCLIP's `data/coco` layout (docs/datasets.md):

    manual_dir/
      train2017/*.jpg  val2017/*.jpg
      annotations/captions_train2017.json  annotations/captions_val2017.json
      annotations/instances_train2017.json            (config "instances" only)
      annotations/panoptic_val2017.json  annotations/panoptic_val2017/*.png
      coco_proposals.json  coco_captions.json          (FineCLIP's region boxes and region captions)
"""
from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from harmoclip_jax.data.features import NO_LABEL, SEGMENTATION_IGNORE, no_segmentation, record_info
from harmoclip_jax.data.lexemes import LexemeExtractor
from harmoclip_jax.data.manual_files import (
    MAX_BOX_SIZE,
    MIN_BOX_SIZE,
    RETRIEVAL_CAPTIONS_PER_IMAGE,
    empty_regions,
    first_captions,
    image_for_tfds,
    load_json,
    logger,
    manual_dir_of,
    normalised_xyxy,
    passes_size_filter,
    require_files,
    require_images,
    retrieval_examples,
)

MAX_PANOPTIC_SEGMENTS = 100  # FineCLIP COCOPanopticDataset: max_anns = min(max(num_annos), 100)

COCO_DOWNLOAD_HELP = """\
Get them from https://cocodataset.org/#download: train2017.zip / val2017.zip (unzip into manual_dir),
annotations_trainval2017.zip (captions_*.json, instances_*.json -> manual_dir/annotations/),
panoptic_annotations_trainval2017.zip (panoptic_val2017.json -> manual_dir/annotations/, and unzip the inner
panoptic_val2017.zip so the PNGs are in manual_dir/annotations/panoptic_val2017/).
FineCLIP's region files (coco_proposals.json, coco_captions.json) are linked from https://github.com/Timsty1/FineCLIP
("Proposal Data" / region captions); put them directly in manual_dir."""


def region_caption_key(file_name: str, x: float, y: float, w: float, h: float) -> str:
    """FineCLIP's region-caption key: f"{file_name}_{int(x)}_{int(y)}_{int(w)}_{int(h)}.jpg" (int truncates)."""
    return f"{file_name}_{int(x)}_{int(y)}_{int(w)}_{int(h)}.jpg"


def _captions_by_image(captions_json: dict) -> dict[int, list[str]]:
    """image_id -> its captions, stripped, in the order of the annotation file."""
    by_image: dict[int, list[str]] = collections.defaultdict(list)
    for ann in captions_json["annotations"]:
        by_image[ann["image_id"]].append(ann["caption"].strip())
    return by_image


def _image_info(image: dict, image_dir: Path) -> tuple[Path, int, int]:
    path = image_dir / image["file_name"]
    if "width" in image and "height" in image:
        return path, int(image["width"]), int(image["height"])
    with Image.open(path) as im:
        return path, im.size[0], im.size[1]


# --------------------------------------------------------------------------------------------- train2017
@dataclasses.dataclass(eq=False)
class CocoRegionsConfig(tfds.core.BuilderConfig):
    """Options of coco_region_captions. Change any of them under a new config `name` (prepare.py does this)."""

    boxes: str = "proposals"  # "proposals": `proposals_file`; "instances": annotations/instances_train2017.json
    proposals_file: str = "coco_proposals.json"
    region_captions_file: str = "coco_captions.json"
    max_regions: int = 100  # per image, the first ones in file order that pass the filters; training samples <= 20
    min_box_size: float = MIN_BOX_SIZE
    max_box_size: float = MAX_BOX_SIZE
    lexeme_backend: str = "auto"  # LexemeExtractor backend: "auto" | "spacy" | "rules"
    lexeme_processes: int = 1  # spaCy worker processes (it parses ~1k captions/s per core)

    def boxes_file(self) -> str:
        if self.boxes == "proposals":
            return self.proposals_file
        if self.boxes == "instances":
            return "annotations/instances_train2017.json"
        raise ValueError(f"CocoRegionsConfig.boxes must be 'proposals' or 'instances', got {self.boxes!r}")


@dataclasses.dataclass
class _PlannedImage:
    """One train image with the regions chosen for it, before lexemes are attached."""

    image_id: int
    file_name: str
    path: Path
    captions: list[str]
    boxes: list[np.ndarray]
    region_captions: list[str]


def plan_coco_train(root: Path, config: CocoRegionsConfig) -> tuple[list[_PlannedImage], dict]:
    """Reads the COCO train files under root and picks each image's regions. Returns (images, build stats).

    Every image of captions_train2017.json becomes a record (an image without usable boxes keeps no regions).
    A box is kept if it passes FineCLIP's size filter (on the raw JSON w*h), has a region caption under
    FineCLIP's key, and is non-empty after clipping to the image; at most `config.max_regions` per image.
    """
    boxes_file = config.boxes_file()
    require_files(
        root,
        {
            "train2017/": "COCO train2017 images",
            "annotations/captions_train2017.json": "COCO 2017 train captions",
            boxes_file: "region boxes, COCO format" + (" (FineCLIP proposals)" if config.boxes == "proposals" else ""),
            config.region_captions_file: "region captions, FineCLIP key format '{file_name}_{x}_{y}_{w}_{h}.jpg'",
        },
        dataset="coco_region_captions",
        how_to_get=COCO_DOWNLOAD_HELP,
    )
    captions_json = load_json(root / "annotations/captions_train2017.json")
    captions = _captions_by_image(captions_json)
    boxes_json = load_json(root / boxes_file)
    anns_by_image: dict[int, list[dict]] = collections.defaultdict(list)
    for ann in boxes_json["annotations"]:
        anns_by_image[ann["image_id"]].append(ann)
    del boxes_json
    region_captions: dict[str, str] = load_json(root / config.region_captions_file)

    stats = collections.Counter()
    planned = []
    for image in captions_json["images"]:
        path, width, height = _image_info(image, root / "train2017")
        boxes, texts = [], []
        for ann in anns_by_image.get(image["id"], ()):
            if len(boxes) == config.max_regions:
                stats["regions_over_cap"] += 1
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            if not passes_size_filter(w, h, config.min_box_size, config.max_box_size):
                stats["regions_size_filtered"] += 1
                continue
            text = region_captions.get(region_caption_key(image["file_name"], x, y, w, h))
            if text is None:
                stats["regions_without_caption"] += 1
                continue
            box = normalised_xyxy(x, y, w, h, width, height)
            if box is None:
                stats["regions_outside_image"] += 1
                continue
            boxes.append(box)
            texts.append(text.strip())
        stats["regions_kept"] += len(boxes)
        stats["images_without_regions"] += not boxes
        planned.append(
            _PlannedImage(image["id"], image["file_name"], path, captions.get(image["id"], []), boxes, texts)
        )
    stats["images"] = len(planned)
    if stats["regions_kept"] == 0 and stats["regions_without_caption"] > 0:
        some_key = next(iter(region_captions), "<empty file>")
        raise ValueError(
            f"coco_region_captions: none of the {stats['regions_without_caption']} boxes of {root / boxes_file} "
            f"that pass the size filter has a caption in {root / config.region_captions_file} (its keys look "
            f"like {some_key!r}; the builder looks up '{{file_name}}_{{int x}}_{{int y}}_{{int w}}_{{int h}}.jpg'). "
            "Region captions must be made for the same boxes file."
        )
    if stats["regions_without_caption"]:
        logger.warning(
            "%d boxes had no region caption and were skipped (%d kept)",
            stats["regions_without_caption"],
            stats["regions_kept"],
        )
    require_images([p.path for p in planned], "coco_region_captions", root / "train2017")
    return planned, dict(stats)


def attach_lexemes(planned: list[_PlannedImage], extractor: LexemeExtractor, chunk: int = 20000):
    """Primary lexeme of every region caption, as one list per image (unique captions parsed once)."""
    unique = list(dict.fromkeys(t for p in planned for t in p.region_captions))
    lexeme_of: dict[str, str] = {}
    for start in range(0, len(unique), chunk):
        part = unique[start : start + chunk]
        lexeme_of.update(zip(part, extractor.primary(part)))
        logger.info("lexemes: %d / %d unique region captions (%s)", len(lexeme_of), len(unique), extractor.backend)
    return [[lexeme_of[t] for t in p.region_captions] for p in planned]


class CocoRegionCaptions(tfds.core.GeneratorBasedBuilder):
    """COCO train2017 with global captions and captioned, lexeme-tagged regions (HarmoCLIP/FineCLIP training)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "Records carry a `segmentation` field (see features.py)."}
    BUILDER_CONFIGS = [
        CocoRegionsConfig(name="proposals", description="FineCLIP's coco_proposals.json boxes (its default)"),
        CocoRegionsConfig(name="instances", boxes="instances", description="COCO GT instance boxes"),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "proposals"
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__ + "\n" + COCO_DOWNLOAD_HELP

    def _info(self) -> tfds.core.DatasetInfo:
        return record_info(
            self,
            description="COCO train2017 + captions + regions with BLIP-2 region captions and lexemes.",
            homepage="https://cocodataset.org",
        )

    def _split_generators(self, dl_manager):
        config: CocoRegionsConfig = self.builder_config
        planned, stats = plan_coco_train(manual_dir_of(dl_manager), config)
        extractor = LexemeExtractor(config.lexeme_backend, n_process=config.lexeme_processes)
        lexemes = attach_lexemes(planned, extractor)
        self.info.metadata.update(
            {"class_names": [], "lexeme_backend": extractor.backend, "build_stats": stats}
        )
        return {"train": self._generate_examples(planned, lexemes)}

    def _generate_examples(self, planned, lexemes):
        for image, image_lexemes in zip(planned, lexemes):
            regions = empty_regions()
            if image.boxes:
                n = len(image.boxes)
                regions = {
                    "box": np.stack(image.boxes),
                    "caption": image.region_captions,
                    "lexeme": image_lexemes,
                    "label": np.full((n,), NO_LABEL, np.int64),
                }
            yield image.image_id, {
                "image": image_for_tfds(image.path),
                "image_id": image.image_id,
                "file_name": image.file_name,
                "captions": image.captions,
                "regions": regions,
                "segmentation": no_segmentation(),
            }


# --------------------------------------------------------------------------------------- panoptic val2017
def panoptic_segment_ids(png_path: Path) -> np.ndarray:
    """Decode a COCO panoptic PNG into its (H, W) int32 segment-id map: id = R + 256 * G + 256**2 * B."""
    with Image.open(png_path) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def mask_xywh(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight box of a boolean mask as COCO xywh covering whole pixels (x1 = last column + 1), None if empty.

    (CLIPSelf's `mask2box` returns the last column itself, a box 1 px smaller; ours matches how COCO's
    panopticapi computes a segment's `bbox`, so thing and stuff boxes follow one convention.)
    """
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        return None
    x0, x1, y0, y1 = int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
    return x0, y0, x1 - x0, y1 - y0


def panoptic_class_metadata(categories: list[dict]) -> tuple[list[str], list[bool], dict[int, int]]:
    """(class names, is_thing, category_id -> label): labels follow sorted category ids, like FineCLIP's
    `cat_id2label` and the row order of its class-embedding files."""
    ordered = sorted(categories, key=lambda c: c["id"])
    names = [c["name"] for c in ordered]
    is_thing = [bool(c["isthing"]) for c in ordered]
    return names, is_thing, {c["id"]: label for label, c in enumerate(ordered)}


def panoptic_semantic_mask(segments: list[dict], png_path: Path, label_of: dict[int, int]) -> np.ndarray:
    """uint8 (H, W) semantic mask of one panoptic image: each pixel's segment's class label (`label_of` its
    category), SEGMENTATION_IGNORE where the PNG has id 0 (void) or a segment missing from `segments`.

    Every segment counts, also those that `panoptic_regions` drops as boxes (size filter, MAX_PANOPTIC_SEGMENTS):
    the mask is the ground truth of the whole image, as in COCO-Stuff / panoptic semantic evaluation.
    """
    ids = panoptic_segment_ids(png_path)
    mask = np.full(ids.shape, SEGMENTATION_IGNORE, np.uint8)
    for seg in segments:
        label = label_of.get(seg["category_id"])
        if label is None:  # a category outside the class list stays unlabelled
            continue
        if not 0 <= label < SEGMENTATION_IGNORE:
            raise ValueError(f"class label {label} does not fit a uint8 mask with {SEGMENTATION_IGNORE} = ignore")
        mask[ids == seg["id"]] = label
    return mask


def panoptic_regions(segments: list[dict], png_path: Path, label_of: dict[int, int], is_thing_cat: dict[int, bool],
                     width: int, height: int, stats: collections.Counter) -> dict:
    """FineCLIP's box-classification regions of one panoptic image.

    The first MAX_PANOPTIC_SEGMENTS segments are considered; a thing's box is its annotation `bbox`, a stuff
    segment's box is the tight box of its mask; boxes with w*h < 8**2 or > 1024**2 px are skipped.
    """
    segments = segments[:MAX_PANOPTIC_SEGMENTS]
    ids = None
    boxes, labels = [], []
    for seg in segments:
        if is_thing_cat[seg["category_id"]]:
            x, y, w, h = (float(v) for v in seg["bbox"])
        else:
            if ids is None:  # decode the PNG only for images that have stuff segments
                ids = panoptic_segment_ids(png_path)
            xywh = mask_xywh(ids == seg["id"])
            if xywh is None:
                stats["segments_missing_from_png"] += 1
                continue
            x, y, w, h = xywh
        if not passes_size_filter(w, h):
            stats["segments_size_filtered"] += 1
            continue
        box = normalised_xyxy(x, y, w, h, width, height)
        if box is None:
            stats["segments_outside_image"] += 1
            continue
        boxes.append(box)
        labels.append(label_of[seg["category_id"]])
    stats["regions_kept"] += len(boxes)
    if not boxes:
        return empty_regions()
    return {
        "box": np.stack(boxes),
        "caption": [""] * len(boxes),
        "lexeme": [""] * len(boxes),
        "label": np.asarray(labels, np.int64),
    }


class CocoPanopticBoxes(tfds.core.GeneratorBasedBuilder):
    """COCO panoptic val2017 as labelled boxes of all 133 categories (FineCLIP box-classification protocol).

    metadata: `class_names` (133, label order = sorted category id), `is_thing` (80 True), `category_ids`.
    `segmentation`: the semantic mask of every segment (`panoptic_semantic_mask`), 255 on void.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "Records carry a `segmentation` field (see features.py): the semantic mask of the "
                              "panoptic segments (class label per pixel, 255 on void)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__ + "\n" + COCO_DOWNLOAD_HELP

    def _info(self) -> tfds.core.DatasetInfo:
        return record_info(
            self,
            description="COCO panoptic val2017 segments as labelled boxes (thing: bbox; stuff: tight mask box).",
            homepage="https://cocodataset.org/#panoptic-2020",
        )

    def _split_generators(self, dl_manager):
        root = manual_dir_of(dl_manager)
        require_files(
            root,
            {
                "val2017/": "COCO val2017 images",
                "annotations/panoptic_val2017.json": "COCO panoptic val2017 annotations",
                "annotations/panoptic_val2017/": "COCO panoptic val2017 PNGs (the inner panoptic_val2017.zip)",
            },
            dataset="coco_panoptic_boxes",
            how_to_get=COCO_DOWNLOAD_HELP,
        )
        panoptic = load_json(root / "annotations/panoptic_val2017.json")
        names, is_thing, label_of = panoptic_class_metadata(panoptic["categories"])
        is_thing_cat = {c["id"]: bool(c["isthing"]) for c in panoptic["categories"]}
        images = {im["id"]: im for im in panoptic["images"]}
        items = []
        for ann in panoptic["annotations"]:
            path, width, height = _image_info(images[ann["image_id"]], root / "val2017")
            items.append((ann, path, width, height))
        require_images([it[1] for it in items], "coco_panoptic_boxes", root / "val2017")
        require_images(
            [root / "annotations/panoptic_val2017" / it[0]["file_name"] for it in items],
            "coco_panoptic_boxes",
            root / "annotations/panoptic_val2017",
        )
        stats = collections.Counter()
        self.info.metadata.update(
            {
                "class_names": names,
                "is_thing": is_thing,
                "category_ids": sorted(label_of),
                "build_stats": stats,  # filled while examples are generated, saved after
            }
        )
        return {"val": self._generate_examples(items, root, label_of, is_thing_cat, stats)}

    def _generate_examples(self, items, root, label_of, is_thing_cat, stats):
        for ann, path, width, height in items:
            image_id = ann["image_id"]
            png_path = root / "annotations/panoptic_val2017" / ann["file_name"]
            regions = panoptic_regions(ann["segments_info"], png_path, label_of, is_thing_cat, width, height, stats)
            segmentation = panoptic_semantic_mask(ann["segments_info"], png_path, label_of)
            if segmentation.shape != (height, width):
                raise ValueError(f"panoptic PNG {png_path} is {segmentation.shape[1]}x{segmentation.shape[0]} px but "
                                 f"image {image_id} is {width}x{height}")
            stats["images"] += 1
            yield image_id, {
                "image": image_for_tfds(path),
                "image_id": image_id,
                "file_name": path.name,
                "captions": [],
                "regions": regions,
                "segmentation": segmentation,
            }


# --------------------------------------------------------------------------------------- retrieval val2017
class CocoRetrieval(tfds.core.GeneratorBasedBuilder):
    """COCO val2017 image-text retrieval: 5,000 images x 5 captions (FineCLIP/Long-CLIP protocol, not Karpathy).

    Images with more than 5 captions keep the first 5 in the order of captions_val2017.json.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "Records carry a `segmentation` field (see features.py)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__ + "\n" + COCO_DOWNLOAD_HELP

    def _info(self) -> tfds.core.DatasetInfo:
        return record_info(
            self,
            description="COCO val2017, 5 captions per image, for image-text retrieval.",
            homepage="https://cocodataset.org",
        )

    def _split_generators(self, dl_manager):
        root = manual_dir_of(dl_manager)
        require_files(
            root,
            {"val2017/": "COCO val2017 images", "annotations/captions_val2017.json": "COCO 2017 val captions"},
            dataset="coco_retrieval",
            how_to_get=COCO_DOWNLOAD_HELP,
        )
        captions_json = load_json(root / "annotations/captions_val2017.json")
        captions = _captions_by_image(captions_json)
        items = []
        trimmed = 0
        for image in captions_json["images"]:
            path, _, _ = _image_info(image, root / "val2017")
            all_captions = captions.get(image["id"], [])
            trimmed += len(all_captions) > RETRIEVAL_CAPTIONS_PER_IMAGE
            items.append((image["id"], path, first_captions(all_captions, image["file_name"])))
        require_images([it[1] for it in items], "coco_retrieval", root / "val2017")
        self.info.metadata.update(
            {"class_names": [], "build_stats": {"images": len(items), "images_with_captions_trimmed_to_5": trimmed}}
        )
        return {"val": self._generate_examples(items)}

    def _generate_examples(self, items):
        return retrieval_examples(items)
