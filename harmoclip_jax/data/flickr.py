"""TFDS builder for Flickr30k 1k-test image-text retrieval (Karpathy split), from manually downloaded files.

`flickr30k_retrieval` (split "test"): 1,000 images x 5 captions, record schema of features.py (no regions).
It reads either annotation format found in manual_dir (the first present wins):
- `dataset_flickr30k.json` (Karpathy): {"images": [{"filename", "split", "sentences": [{"raw"}, ...]}, ...]};
  the images with split == "test" are used;
- `flickr30k_test.json` (ALBEF/BLIP, what FineCLIP evaluates on): [{"image": "flickr30k-images/x.jpg",
  "caption": [5 sentences]}, ...].
Images: manual_dir/flickr30k-images/*.jpg (the archive's name; FineCLIP's layout calls it flickr30k_images/, which
is accepted too). Each image keeps exactly 5 captions (the first 5 if more).
`image_id` is the numeric Flickr photo id of the file name (e.g. 1000092795.jpg -> 1000092795).
"""
from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from harmoclip_jax.data.features import record_info
from harmoclip_jax.data.manual_files import (
    MissingDatasetFilesError,
    first_captions,
    load_json,
    manual_dir_of,
    require_files,
    require_images,
    retrieval_examples,
)

KARPATHY_FILE = "dataset_flickr30k.json"
ALBEF_FILE = "flickr30k_test.json"
IMAGE_DIR = "flickr30k-images"
IMAGE_DIR_ALIASES = (IMAGE_DIR, "flickr30k_images")  # the tarball's name, FineCLIP's README name

FLICKR_DOWNLOAD_HELP = f"""\
Images: request Flickr30k at https://shannon.cs.illinois.edu/DenotationGraph/ (flickr30k-images.tar.gz) and
unpack it so the JPEGs are in manual_dir/{IMAGE_DIR}/.
Annotations, either: {KARPATHY_FILE} from Karpathy's caption_datasets.zip
(https://cs.stanford.edu/people/karpathy/deepimagesent/), or {ALBEF_FILE} from ALBEF/BLIP
(https://github.com/salesforce/BLIP, data/flickr30k_test.json); put the file directly in manual_dir."""


def _photo_id(file_name: str, fallback: int) -> int:
    stem = Path(file_name).stem
    return int(stem) if stem.isdigit() else fallback


def image_dir(root: Path) -> Path:
    """manual_dir/flickr30k-images, or FineCLIP's manual_dir/flickr30k_images if only that exists."""
    for name in IMAGE_DIR_ALIASES:
        if (root / name).is_dir():
            return root / name
    return root / IMAGE_DIR


def _resolve_image(root: Path, image: str) -> Path:
    """An annotation's image path: as given relative to manual_dir, else its file name in the image folder."""
    direct = root / image
    return direct if direct.is_file() else image_dir(root) / Path(image).name


def flickr30k_test_items(root: Path) -> tuple[list[tuple[int, Path, list[str]]], str]:
    """[(image_id, image path, 5 captions)] of the 1k test split, and the annotation file used."""
    if (root / KARPATHY_FILE).is_file():
        source = KARPATHY_FILE
        entries = [
            (im["filename"], [s["raw"].strip() for s in im["sentences"]])
            for im in load_json(root / KARPATHY_FILE)["images"]
            if im["split"] == "test"
        ]
    elif (root / ALBEF_FILE).is_file():
        source = ALBEF_FILE
        entries = [(e["image"], [c.strip() for c in e["caption"]]) for e in load_json(root / ALBEF_FILE)]
    else:
        raise MissingDatasetFilesError(
            f"flickr30k_retrieval: no annotation file in manual_dir {root}: expected {root / KARPATHY_FILE} or "
            f"{root / ALBEF_FILE}.\n{FLICKR_DOWNLOAD_HELP}\nSee docs/datasets.md for the full directory layout."
        )
    items = [
        (_photo_id(image, index), _resolve_image(root, image), first_captions(captions, image))
        for index, (image, captions) in enumerate(entries)
    ]
    return items, source


class Flickr30kRetrieval(tfds.core.GeneratorBasedBuilder):
    """Flickr30k Karpathy 1k test: 1,000 images x 5 captions for image-text retrieval."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "Records carry a `segmentation` field (see features.py)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__ + "\n" + FLICKR_DOWNLOAD_HELP

    def _info(self) -> tfds.core.DatasetInfo:
        return record_info(
            self,
            description="Flickr30k Karpathy test split (1k images, 5 captions each) for image-text retrieval.",
            homepage="https://shannon.cs.illinois.edu/DenotationGraph/",
        )

    def _split_generators(self, dl_manager):
        root = manual_dir_of(dl_manager)
        expected = {f"{image_dir(root).name}/": "Flickr30k images"}
        if not (root / ALBEF_FILE).is_file():  # either annotation file will do; name the Karpathy one if neither
            expected[KARPATHY_FILE] = f"Karpathy split annotations, or instead {ALBEF_FILE} (ALBEF/BLIP format)"
        require_files(root, expected, "flickr30k_retrieval", FLICKR_DOWNLOAD_HELP)
        items, source = flickr30k_test_items(root)
        require_images([path for _, path, _ in items], "flickr30k_retrieval", image_dir(root))
        self.info.metadata.update({"class_names": [], "build_stats": {"images": len(items), "annotations": source}})
        return {"test": self._generate_examples(items)}

    def _generate_examples(self, items):
        return retrieval_examples(items)
