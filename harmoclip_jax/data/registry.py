"""The datasets this package can build, in one table: TFDS name -> builder, `prepare --dataset` name.

To add a dataset, write its TFDS builder module and add one line to DATASETS. Nothing here imports TFDS: a
builder's module is imported (which registers the builder with TFDS) only when something asks for it.
"""
from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class Dataset:
    builder: str  # "module:Class" of the TFDS builder
    prepare_name: str  # the `python -m harmoclip_jax.data.prepare --dataset` value
    generated: bool = False  # True: built from code on first use, no manually downloaded files (--manual_dir)


# TFDS builder name (the part of config.data.dataset before "/") -> Dataset.
DATASETS: dict[str, Dataset] = {
    "coco_region_captions": Dataset("harmoclip_jax.data.coco:CocoRegionCaptions", "coco_train"),
    "coco_panoptic_boxes": Dataset("harmoclip_jax.data.coco:CocoPanopticBoxes", "coco_panoptic"),
    "coco_retrieval": Dataset("harmoclip_jax.data.coco:CocoRetrieval", "coco_retrieval"),
    "flickr30k_retrieval": Dataset("harmoclip_jax.data.flickr:Flickr30kRetrieval", "flickr30k_retrieval"),
    "scenes": Dataset("harmoclip_jax.data.scenes:Scenes", "scenes", generated=True),
}


def lookup(dataset: str) -> Dataset | None:
    """The entry of `dataset` ("name[/config]"), or None if this package has no builder of that name."""
    return DATASETS.get(dataset.split("/")[0])


def builder_class(dataset: str) -> type:
    """The TFDS builder class of `dataset` ("name[/config]"); importing its module registers it with TFDS."""
    entry = lookup(dataset)
    if entry is None:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    module, name = entry.builder.split(":")
    return getattr(importlib.import_module(module), name)


def register(dataset: str) -> None:
    """Registers `dataset`'s builder with TFDS (`tfds.builder(dataset)` then finds it); no-op for other names."""
    if lookup(dataset) is not None:
        builder_class(dataset)


def prepare_names() -> list[str]:
    """The `prepare --dataset` choices, sorted."""
    return sorted(entry.prepare_name for entry in DATASETS.values())


def from_prepare_name(prepare_name: str) -> str:
    """The TFDS name of the dataset that `prepare --dataset prepare_name` builds."""
    for name, entry in DATASETS.items():
        if entry.prepare_name == prepare_name:
            return name
    raise ValueError(f"unknown dataset {prepare_name!r}; choose one of {prepare_names()}")


def prepare_name(dataset: str) -> str:
    """The `prepare --dataset` value that builds `dataset` ("name[/config]"); the name itself if unregistered."""
    entry = lookup(dataset)
    return entry.prepare_name if entry is not None else dataset.split("/")[0]


def prepare_command(dataset: str, data_dir: str | None) -> str:
    """The command line that builds `dataset` ("name[/config]") into `data_dir` (None: the TFDS default).

    A config name that `prepare --option` derived ("proposals-max_regions_20") gives its base config only; the
    options it was built with are not recoverable from the name.
    """
    entry = lookup(dataset)
    manual = "" if entry is not None and entry.generated else " --manual_dir DIR"
    config = f" --config {dataset.split('/', 1)[1].split('-')[0]}" if "/" in dataset else ""
    return (f"python -m harmoclip_jax.data.prepare --dataset {prepare_name(dataset)}{config}{manual} "
            f"--data_dir {data_dir or '~/tensorflow_datasets'}")
