"""Device mesh, parameter shardings (regex rules + FSDP) and batch placement.

The mesh has two axes, `data` and `fsdp`. The batch is split over both (every device sees distinct examples);
parameters and optimizer state are split over `fsdp` only (ZeRO-3 style: each fsdp group holds one copy of the
model, cut in pieces). Per-parameter tactics come from `config.sharding.rules`, a list of (regex, tactic) pairs
matched against the '/'-joined parameter path (first match wins; a rule matches a path or any '/'-suffix of it,
so optimizer-state leaves, whose paths end in the parameter's path, follow their parameter):

    "fsdp"       shard the largest dimension divisible by the fsdp size, if the array has at least
                 `config.sharding.fsdp_min_size_mb` MiB (small arrays are cheaper replicated);
    "replicate"  keep a full copy on every device.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
TACTICS = ("fsdp", "replicate")


def mesh_shape(mesh_config, num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Resolves `[("data", -1), ("fsdp", 2)]` to concrete sizes for `num_devices` (one -1 fills)."""
    names = tuple(str(name) for name, _ in mesh_config)
    sizes = [int(size) for _, size in mesh_config]
    if sorted(names) != ["data", "fsdp"]:
        raise ValueError(f"config.mesh must name exactly the axes 'data' and 'fsdp', got {list(names)}")
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1 (fill), got {list(zip(names, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh sizes must be positive or -1, got {list(zip(names, sizes))}")
    known = 1
    for s in sizes:
        if s != -1:
            known *= s
    if fills:
        if num_devices % known:
            raise ValueError(f"config.mesh {list(zip(names, sizes))}: {num_devices} devices are not divisible by "
                             f"the fixed axis sizes (product {known})")
        sizes[fills[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(f"config.mesh {list(zip(names, sizes))} needs {known} devices, but {num_devices} are "
                         "available; use -1 for one axis to fill")
    return names, tuple(sizes)


def make_mesh(mesh_config: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp) mesh from `config.mesh`, e.g. `[("data", -1), ("fsdp", 1)]` (-1 fills)."""
    devices = list(devices if devices is not None else jax.devices())
    names, sizes = mesh_shape(mesh_config, len(devices))
    order = [names.index(a) for a in ("data", "fsdp")]
    sizes = tuple(sizes[i] for i in order)
    return jax.make_mesh(sizes, ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2, devices=devices)


def path_str(path) -> str:
    """A jax key path as 'visual/transformer/blocks/0/attn/qkv/kernel'."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def fsdp_spec(shape: Sequence[int], dtype, axis_size: int, min_size_mb: float) -> P:
    """Shards the largest dimension divisible by `axis_size` over 'fsdp', if the array is big enough."""
    if axis_size == 1 or not shape:
        return P()
    if math.prod(shape) * np.dtype(dtype).itemsize < min_size_mb * 2**20:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % axis_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def param_shardings(abstract_tree: Any, mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, str]],
                    min_size_mb: float) -> Any:
    """NamedShardings for every leaf of `abstract_tree` (arrays or ShapeDtypeStructs) by the regex rules."""
    compiled = []
    for pattern, tactic in rules:
        if tactic not in TACTICS:
            raise ValueError(f"sharding rule ({pattern!r}, {tactic!r}): unknown tactic; use one of {TACTICS}")
        compiled.append((re.compile(f"(?:^|.*/)(?:{pattern})"), tactic))
    axis_size = mesh.shape["fsdp"]

    def one(path, leaf):
        name = path_str(path)
        tactic = next((t for regex, t in compiled if regex.fullmatch(name)), "replicate")
        if tactic == "fsdp":
            return NamedSharding(mesh, fsdp_spec(leaf.shape, leaf.dtype, axis_size, min_size_mb))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This process's slice of the batch -> global arrays sharded over (data, fsdp) along dimension 0."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def global_from_host(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host array that every process holds in full (e.g. class prompt tokens)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy, the full array on every process (gathered across processes when needed)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)
