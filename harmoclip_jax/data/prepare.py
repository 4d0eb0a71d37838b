"""Build a dataset into ArrayRecord files (TFDS, no TensorFlow):

    python -m harmoclip_jax.data.prepare --dataset coco_train --manual_dir /data/coco --data_dir /data/tfds
    python -m harmoclip_jax.data.prepare --dataset coco_train --config instances --option max_regions=20 ...

`--option key=value` (repeatable) overrides a field of the builder's config (e.g. CocoRegionsConfig); the
result is built under a derived config name, printed at the end with the line that loads it.
`--dataset` takes the `prepare_name` of a dataset in `registry.DATASETS` (adding a dataset: one line there).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import time

import tensorflow_datasets as tfds

from harmoclip_jax import cli
from harmoclip_jax.data import registry


def _parse_value(text: str, current):
    """Convert an --option value to the type of the field's current value."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    return text


def resolve_config(builder_cls, config: str | None, options: dict[str, str] | None):
    """The BuilderConfig to build: `config` (or the default) with `options` applied under a derived name."""
    configs = {c.name: c for c in (builder_cls.BUILDER_CONFIGS or [])}
    if not configs:
        if config or options:
            raise ValueError(f"{builder_cls.name} has no configs; drop --config/--option")
        return None
    name = config or builder_cls.DEFAULT_BUILDER_CONFIG_NAME or next(iter(configs))
    if name not in configs:
        raise ValueError(f"{builder_cls.name} has no config {name!r}; choose one of {sorted(configs)}")
    base = configs[name]
    if not options:
        return base
    fields = {f.name for f in dataclasses.fields(base)} - {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    changes = {}
    for key, text in options.items():
        if key not in fields:
            raise ValueError(f"{builder_cls.name} config has no option {key!r}; options: {sorted(fields)}")
        try:
            changes[key] = _parse_value(text, getattr(base, key))
        except ValueError as e:
            raise ValueError(f"--option {key}={text}: {e}") from None
    suffix = "-".join(f"{k}_{re.sub(r'[^A-Za-z0-9.]+', '_', str(v))}" for k, v in sorted(changes.items()))
    return dataclasses.replace(base, name=f"{base.name}-{suffix}", **changes)


def make_builder(dataset: str, data_dir: str, config: str | None = None, options: dict[str, str] | None = None):
    """A builder of the dataset whose prepare name is `dataset`, writing ArrayRecord files under data_dir."""
    builder_cls = registry.builder_class(registry.from_prepare_name(dataset))
    return builder_cls(
        data_dir=data_dir, config=resolve_config(builder_cls, config, options), file_format="array_record"
    )


def prepare(dataset: str, data_dir: str, manual_dir: str | None = None, config: str | None = None,
            options: dict[str, str] | None = None, overwrite: bool = False):
    """Build `dataset` (a registry prepare name) from manual_dir into data_dir; returns the prepared builder."""
    builder = make_builder(dataset, data_dir, config, options)
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not manual_dir:
        raise ValueError(f"{dataset} is built from manually downloaded files: pass --manual_dir (docs/datasets.md)")
    modes = tfds.download.GenerateMode
    mode = modes.FORCE_REDOWNLOAD if overwrite else modes.REUSE_DATASET_IF_EXISTS
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode)
    )
    return builder


def describe(builder) -> str:
    """What was built, and how to read it back."""
    full_name = builder.name + (f"/{builder.builder_config.name}" if builder.builder_config else "")
    lines = [f"built {full_name} {builder.version} in {builder.data_dir}"]
    for split, info in builder.info.splits.items():
        lines.append(f"  split {split!r}: {info.num_examples} records")
    metadata = builder.info.metadata or {}
    for key in ("lexeme_backend", "build_stats"):
        if key in metadata:
            lines.append(f"  {key}: {metadata[key]}")
    if metadata.get("class_names"):
        lines.append(f"  classes: {len(metadata['class_names'])}")
    lines.append(
        f"load: import {type(builder).__module__}; tfds.data_source({full_name!r}, "
        f"data_dir={str(builder.data_dir).rsplit('/' + builder.name, 1)[0]!r})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=registry.prepare_names())
    parser.add_argument("--data_dir", required=True, help="where the TFDS ArrayRecord dataset is written")
    parser.add_argument("--manual_dir", help="the manually downloaded files (docs/datasets.md)")
    parser.add_argument("--config", help="builder config name (coco_train: proposals | instances)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. max_regions=20 or lexeme_backend=rules")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the dataset already exists")
    parser.add_argument("--verbose", action="store_true", help=cli.VERBOSE_HELP)
    args = parser.parse_args(argv)
    options = {}
    for item in args.option:
        if "=" not in item:
            parser.error(f"--option expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        options[key] = value

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    start = time.time()
    print(f"preparing {args.dataset} from {args.manual_dir or '(generated)'} into {args.data_dir}", flush=True)
    builder = prepare(args.dataset, args.data_dir, args.manual_dir, args.config, options, args.overwrite)
    print(describe(builder), flush=True)
    print(f"done in {time.time() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
