"""The dataset registry: one entry per builder, names that agree with TFDS, lazy imports."""
import subprocess
import sys

import pytest

from harmoclip_jax.data import registry


@pytest.mark.parametrize("name", sorted(registry.DATASETS))
def test_entries_name_their_builders(name):
    builder = registry.builder_class(f"{name}/some_config")
    assert builder.name == name  # the key is the TFDS name that config.data.dataset uses
    assert registry.from_prepare_name(registry.prepare_name(name)) == name
    assert registry.DATASETS[name].generated == (not builder.MANUAL_DOWNLOAD_INSTRUCTIONS)


def test_prepare_names_are_unique():
    assert len(set(registry.prepare_names())) == len(registry.DATASETS)


def test_prepare_command():
    assert registry.prepare_name("coco_region_captions/proposals") == "coco_train"
    assert registry.prepare_command("coco_region_captions/instances-max_regions_20", "/data/tfds") == (
        "python -m harmoclip_jax.data.prepare --dataset coco_train --config instances --manual_dir DIR "
        "--data_dir /data/tfds")
    assert registry.prepare_command("scenes", None) == (
        "python -m harmoclip_jax.data.prepare --dataset scenes --data_dir ~/tensorflow_datasets")


def test_unknown_names():
    assert registry.lookup("no_such_set/x") is None
    registry.register("no_such_set")  # nothing to import: a no-op
    with pytest.raises(ValueError, match="unknown dataset 'no_such_set'"):
        registry.builder_class("no_such_set")
    with pytest.raises(ValueError, match="unknown dataset 'coco_region_captions'.*coco_train"):
        registry.from_prepare_name("coco_region_captions")


def test_importing_the_registry_imports_no_builder():
    code = ("import sys; from harmoclip_jax.data import registry; registry.lookup('coco_retrieval'); "
            "print(sorted(m for m in sys.modules if m.startswith(('tensorflow_datasets', 'grain', "
            "'harmoclip_jax.data.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['harmoclip_jax.data.registry']"
