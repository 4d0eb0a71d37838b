"""What evaluators share: the context they run in and the sharded-embedding collection loop."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from harmoclip_jax import sharding
from harmoclip_jax.data import pipeline


@dataclasses.dataclass
class EvalFns:
    """Jitted encoders of the current model (outputs replicated on all devices), and its tokenizer.

    encode_images(params, images (B,S,S,3)) -> (B,E); encode_captions(params, tokens (B,K,L)) -> (B,K,E);
    encode_regions(params, images, boxes (B,T,4)) -> (B,T,E); encode_texts(params, tokens (N,L)) -> (N,E);
    encode_dense(params, images) -> (B,h,w,E) patch features in the joint space (the model's `encode_dense`);
    tokenize(texts) -> (N, L) int32 token ids for this model.
    """

    encode_images: Callable
    encode_captions: Callable
    encode_regions: Callable
    encode_texts: Callable
    tokenize: Callable[[Sequence[str]], np.ndarray]
    encode_dense: Callable | None = None  # None: a model without dense features (segmentation eval refuses)


@dataclasses.dataclass
class EvalContext:
    mesh: jax.sharding.Mesh
    data_config: ml_collections.ConfigDict  # the experiment's config.data (per-process sizes already set)
    fns: EvalFns
    eval_batch_size: int  # global


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32; all-zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def dataset_metadata(dataset: str, data_dir: str | None) -> dict:
    """The TFDS metadata dict (`class_names`, `is_thing`, ...) of a prepared dataset."""
    import tensorflow_datasets as tfds

    from harmoclip_jax.data import registry

    registry.register(dataset)
    builder = tfds.builder(dataset, data_dir=data_dir)
    return dict(builder.info.metadata or {})


def class_metadata(name: str, eval_config, context: EvalContext, needs: str) -> tuple[list[str], dict]:
    """(class names, dataset metadata) of an eval that classifies: `eval_config.class_names` or the dataset's;
    `needs` ends the error when there are none (what kind of dataset the eval needs)."""
    meta = dataset_metadata(eval_config.dataset, context.data_config.data_dir)
    class_names = list(eval_config.get("class_names") or meta.get("class_names") or [])
    if not class_names:
        raise ValueError(f"eval {name}: dataset {eval_config.dataset} has no class_names metadata; {needs}")
    return class_names, meta


def eval_data_config(context: EvalContext, eval_config, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """The pipeline config of one eval: the experiment's data config on the eval's dataset and split, with
    `overrides` (pipeline flags an evaluator needs, e.g. `eval_segmentation=True`) on top."""
    data = ml_collections.ConfigDict(context.data_config.to_dict())
    data.dataset = eval_config.dataset
    data.eval_split = eval_config.split
    data.eval_batch_size = context.eval_batch_size // jax.process_count()
    if eval_config.get("max_regions"):
        data.eval_max_regions = eval_config.max_regions
    data.num_workers = 0  # eval is short; worker start-up would dominate
    for key, value in (overrides or {}).items():
        data[key] = value
    return data


def eval_batches(context: EvalContext, data: ml_collections.ConfigDict):
    """The global eval batches (on the mesh) of the split `data` describes (see `eval_data_config`). Use it under
    `contextlib.closing` so the pipeline closes as soon as the loop ends, also on an error."""
    iterator = pipeline.make_eval_iterator(data)
    try:
        for local in iterator:
            yield sharding.put_batch(local, context.mesh)
    finally:
        closer = getattr(iterator, "close", None)
        if closer is not None:
            closer()


def record_order(index: np.ndarray, data: ml_collections.ConfigDict) -> np.ndarray:
    """The permutation that sorts the real rows' record indices; raises unless they are each record exactly once."""
    order = np.argsort(index, kind="stable")
    if len(np.unique(index)) != len(index) or (len(index) and (index[order] != np.arange(len(index))).any()):
        raise RuntimeError(f"eval {data.dataset}:{data.eval_split}: records were lost or duplicated across "
                           f"devices/processes ({len(index)} kept, {len(np.unique(index))} unique)")
    return order


def collect(context: EvalContext, eval_config, params, embed: Callable[[Any, dict], dict],
            keep: Sequence[str] = (), overrides: dict | None = None) -> dict[str, np.ndarray]:
    """Runs `embed(params, global_batch) -> {name: replicated array}` over the whole eval split.

    Returns numpy arrays over the split's records in record order (padding dropped), plus the batch keys in
    `keep`. Every process gets the same result. Raises if a record is missing or seen twice. `overrides`: pipeline
    flags for this eval (`eval_data_config`).
    """
    data = eval_data_config(context, eval_config, overrides)
    parts: dict[str, list[np.ndarray]] = {}
    with contextlib.closing(eval_batches(context, data)) as batches:
        for batch in batches:
            out = sharding.to_host(embed(params, batch))
            host = sharding.to_host({k: batch[k] for k in ("mask", "index", *keep)})
            for name, value in {**out, **host}.items():
                parts.setdefault(name, []).append(value)
    if not parts:
        raise ValueError(f"eval split {data.dataset}:{data.eval_split} is empty")
    rows = {k: np.concatenate(v) for k, v in parts.items()}
    mask = rows.pop("mask").astype(bool)
    order = record_order(rows.pop("index")[mask], data)
    return {k: v[mask][order] for k, v in rows.items()}
