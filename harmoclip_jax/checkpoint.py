"""Orbax checkpoints of model parameters: a params-only export that loads with one call.

Layout of a params checkpoint directory:
    DIR/clip_config.json   the architecture (`CLIPConfig.to_dict()`), so loading needs nothing else
    DIR/params/            an Orbax StandardCheckpointer tree of the nnx.Param state (pure dict)
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Callable

import jax
import orbax.checkpoint as ocp
from flax import nnx

from harmoclip_jax.models.clip import CLIP, abstract_model
from harmoclip_jax.models.variants import CLIPConfig, get_config

CONFIG_FILE = "clip_config.json"
PARAMS_DIR = "params"


def save_params(model: CLIP, directory: str | os.PathLike, *, force: bool = False) -> pathlib.Path:
    """Writes `model`'s parameters and architecture to `directory` (created; must not exist unless `force`)."""
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()) and not force:
        raise FileExistsError(f"{directory} exists and is not empty; pass force=True (--force) to overwrite")
    directory.mkdir(parents=True, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / PARAMS_DIR, params, force=True)
        ckptr.wait_until_finished()
    (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2))
    return directory


def is_params_checkpoint(directory: str | os.PathLike) -> bool:
    directory = pathlib.Path(directory)
    return (directory / CONFIG_FILE).exists() and (directory / PARAMS_DIR).exists()


def load_params(directory: str | os.PathLike, *, sharding: Callable | jax.sharding.Sharding | None = None,
                **overrides) -> CLIP:
    """Loads a params checkpoint written by `save_params` (or `python -m harmoclip_jax.convert`).

    `overrides` change non-structural config fields (e.g. `dtype="bfloat16"`, `remat=True`). `sharding` is one
    `jax.sharding.Sharding` for every array, or a function `(path, ShapeDtypeStruct) -> Sharding`, so the
    parameters are restored directly onto a mesh (a different one from the saving run's works too).
    """
    directory = pathlib.Path(directory).absolute()
    if not is_params_checkpoint(directory):
        raise FileNotFoundError(
            f"{directory} is not a harmoclip_jax params checkpoint: expected {CONFIG_FILE} and {PARAMS_DIR}/ "
            "(write one with harmoclip_jax.checkpoint.save_params or `python -m harmoclip_jax.convert`)")
    config = get_config(CLIPConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text())), **overrides)
    abstract = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
    else:
        target = jax.tree_util.tree_map_with_path(
            lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(p, x)), abstract)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(directory / PARAMS_DIR, target)
    model = nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


# ------------------------------------------------------------------------------------- training checkpoints

STATE_ITEM = "state"
DATA_ITEM = "data_iter"


class TrainCheckpointer:
    """Full training checkpoints in `directory`: the state pytree (params, optimizer state, step, rng, ...) and
    the grain iterator of every process, saved together per step by an Orbax `CheckpointManager`.

    Keeps the newest `keep` steps; saves asynchronously when `async_save` (the next training steps overlap the
    write; a crash mid-write leaves only a temporary directory that Orbax ignores, so the previous step stays the
    latest). Restores into abstract targets that carry shardings, so a checkpoint restores onto any mesh.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, item_names=(STATE_ITEM, DATA_ITEM), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iterator=None) -> None:
        import grain

        items = {STATE_ITEM: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores `step` into `abstract_state` (ShapeDtypeStructs with shardings); sets the iterator's position."""
        import grain

        items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE_ITEM]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
