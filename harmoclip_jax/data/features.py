"""The one record schema every dataset builder writes and every pipeline reads.

Training sets (scenes, COCO train2017), retrieval sets (COCO val2017, Flickr30k) and box-classification sets
(scenes, COCO panoptic) all share it, so one grain pipeline serves them all. Fields a dataset does not have are
left empty (no regions, no captions) rather than omitted.

Conventions:
- `image`: encoded JPEG/PNG, decoded to uint8 HWC by TFDS (no TensorFlow needed).
- `captions`: global captions of the whole image (COCO: 5).
- `regions/box`: xyxy, NORMALISED to [0, 1] by the ORIGINAL image width/height, so boxes survive any resize.
- `regions/caption`: a sentence describing the region ("" if the dataset has none).
- `regions/lexeme`: the region's lexeme, a short noun phrase ("red circle"); "" if none.
- `regions/label`: class index into the dataset's class list (`DatasetInfo.metadata["class_names"]`), -1 if the
  region is unlabelled (proposals).
- `segmentation`: uint8 (H, W) semantic mask at the image's own resolution, a class index per pixel (same class
  list), `SEGMENTATION_IGNORE` (255) where no class applies (background, void); an empty (0, 0) array when the
  record has no mask (training splits, retrieval sets). At most 255 classes.
Class metadata goes into `tfds.core.MetadataDict`: `class_names` (the class list), `is_thing` (panoptic: one bool
per class) and `is_novel` (open-vocabulary sets: one bool per class, True for classes without training regions;
absent when the dataset has no novel classes, so read it with `metadata.get("is_novel")`).

Read back through `tfds.data_source` (no TensorFlow), a record is a dict: `image` uint8 HWC ndarray, `image_id`
int, `file_name` bytes, `captions` list[bytes], and `regions` a dict of lists (`box` list of float32 (4,) arrays,
`caption`/`lexeme` list[bytes], `label` list[np.int64]); an image with no regions has empty lists;
`segmentation` a uint8 (H, W) array, (0, 0) when absent.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: importing tfds costs seconds, and the pipeline reads this module's constants
    import tensorflow_datasets as tfds

NO_LABEL = -1
SEGMENTATION_IGNORE = 255  # mask pixels of no class (background, void)


def no_segmentation() -> np.ndarray:
    """The `segmentation` value of a record without a mask."""
    return np.zeros((0, 0), np.uint8)


def record_features(encoding_format: str = "jpeg") -> "tfds.features.FeaturesDict":
    """The TFDS FeaturesDict of an image-text-regions record (see module docstring)."""
    import tensorflow_datasets as tfds  # here, not at the top: the pipeline reads this module's constants on
    # machines without TFDS (the accelerator suite)

    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=encoding_format),
            "image_id": tfds.features.Scalar(dtype=np.int64),
            "file_name": tfds.features.Text(),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "segmentation": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="zlib"),
            "regions": tfds.features.Sequence(
                {
                    "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "caption": tfds.features.Text(),
                    "lexeme": tfds.features.Text(),
                    "label": tfds.features.Scalar(dtype=np.int64),
                }
            ),
        }
    )


def record_info(builder: "tfds.core.DatasetBuilder", *, description: str, homepage: str,
                encoding_format: str = "jpeg") -> "tfds.core.DatasetInfo":
    """The DatasetInfo of a builder writing this schema; builders fill `metadata` (class names) while building."""
    import tensorflow_datasets as tfds

    return tfds.core.DatasetInfo(builder=builder, description=description, homepage=homepage,
                                 features=record_features(encoding_format), metadata=tfds.core.MetadataDict())
