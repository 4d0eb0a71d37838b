"""Orbax checkpoints: a params-only export that loads with one call, full training checkpoints, and a model read
back from a training workdir (`load_workdir_model`; the workdir's layout is `workdir.py`, which this module imports
and which imports nothing of it).

Layout of a params checkpoint directory:
    DIR/model.json         {"family": ..., "config": ...}: the backbone family and its architecture config
    DIR/params/            an Orbax StandardCheckpointer tree of the model's parameters (pure dict)
(Exports written before families existed have `clip_config.json` instead of `model.json`; they still load.)
"""
from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from harmoclip_jax import workdir as workdir_lib
from harmoclip_jax.models import glue, registry

log = logging.getLogger(__name__)

MODEL_FILE = "model.json"
LEGACY_CLIP_FILE = "clip_config.json"
PARAMS_DIR = "params"


def _tree_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's tree handler (the format `StandardSave` writes), with replica-parallel array saves on TPUs only
    (Orbax's default: on for every backend but GPUs). They split each replicated array's write over its replicas,
    cut by one compiled slice per replica and shape: that spreads device-to-host copies over TPU hosts, but CPU
    devices share one memory, so there it only compiles (a first save of the tiny test model on 8 CPU devices: 12 s
    instead of 2). No array-metadata files: they record PRNG-key types, and states keep raw key data."""
    replica_parallel = jax.default_backend() == "tpu"
    arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=replica_parallel)
    handlers = ocp.type_handlers.create_type_handler_registry(
        (int, ocp.type_handlers.ScalarHandler()), (float, ocp.type_handlers.ScalarHandler()),
        (np.number, ocp.type_handlers.ScalarHandler()), (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, arrays), (str, ocp.type_handlers.StringHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=handlers)


def save_params(model, directory: str | os.PathLike, *, force: bool = False,
                tokenizer_file: str | os.PathLike | None = None) -> pathlib.Path:
    """Writes `model`'s parameters, family and architecture to `directory` (created; must not exist unless
    `force`), and a copy of `tokenizer_file` for families whose tokenizer ships with the weights
    (`Backbone.tokenizer_file`: SigLIP's spiece.model), so the checkpoint is complete on its own."""
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()) and not force:
        raise FileExistsError(f"{directory} exists and is not empty; pass force=True (--force) to overwrite")
    backbone = registry.of_model(model)
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.Checkpointer(_tree_handler()) as ckptr:
        ckptr.save(directory / PARAMS_DIR, args=ocp.args.PyTreeSave(glue.params_of(model)), force=True)
    (directory / LEGACY_CLIP_FILE).unlink(missing_ok=True)
    if tokenizer_file is not None and backbone.tokenizer_file:
        shutil.copyfile(tokenizer_file, directory / backbone.tokenizer_file)
    (directory / MODEL_FILE).write_text(json.dumps({"family": backbone.family, "config": model.config.to_dict()},
                                                   indent=2))
    return directory


def is_params_checkpoint(directory: str | os.PathLike) -> bool:
    directory = pathlib.Path(directory)
    return ((directory / MODEL_FILE).exists() or (directory / LEGACY_CLIP_FILE).exists()) and \
        (directory / PARAMS_DIR).exists()


def read_model_config(directory: str | os.PathLike, **overrides) -> tuple[Any, Any]:
    """(Backbone, model config) of a params checkpoint; `overrides` as the family's `get_config` takes them."""
    directory = pathlib.Path(directory)
    if (directory / MODEL_FILE).exists():
        record = json.loads((directory / MODEL_FILE).read_text())
    else:
        record = {"family": "clip", "config": json.loads((directory / LEGACY_CLIP_FILE).read_text())}
    backbone = registry.get(record["family"])
    return backbone, backbone.get_config(backbone.config_from_dict(record["config"]), **overrides)


def restore_params(path: str | os.PathLike, abstract: Any, *, sharding: Callable | jax.sharding.Sharding | None = None,
                   key: str | None = None) -> Any:
    """Reads a params tree shaped like `abstract` (ShapeDtypeStructs) from an Orbax tree at `path`, or only the
    subtree `key` of it (e.g. "params" of a training state: optimizer state and the rest stay on disk).
    `sharding`: one Sharding for every array, or `(path, ShapeDtypeStruct) -> Sharding`; default: device 0."""
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
    else:
        target = jax.tree_util.tree_map_with_path(
            lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(p, x)), abstract)
    if key is None:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path, target)
    target = {key: target}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(path, args=args)[key]


def load_params(directory: str | os.PathLike, *, sharding: Callable | jax.sharding.Sharding | None = None,
                **overrides):
    """Loads a params checkpoint written by `save_params` (or `python -m harmoclip_jax.convert`) as a model of
    its family.

    `overrides` change non-structural config fields (e.g. `dtype="bfloat16"`, `remat=True`). `sharding` is one
    `jax.sharding.Sharding` for every array, or a function `(path, ShapeDtypeStruct) -> Sharding`, so the
    parameters are restored directly onto a mesh (a different one from the saving run's works too).
    """
    directory = pathlib.Path(directory).absolute()
    if not is_params_checkpoint(directory):
        raise FileNotFoundError(
            f"{directory} is not a harmoclip_jax params checkpoint: expected {MODEL_FILE} and {PARAMS_DIR}/ "
            "(write one with harmoclip_jax.checkpoint.save_params or `python -m harmoclip_jax.convert`)")
    backbone, config = read_model_config(directory, **overrides)
    params = restore_params(directory / PARAMS_DIR, glue.abstract_params(backbone, config), sharding=sharding)
    return glue.model_from_params(backbone, config, params)


# ------------------------------------------------------------------------------------- training checkpoints

STATE_ITEM = workdir_lib.STATE_ITEM
DATA_ITEM = workdir_lib.DATA_ITEM  # legacy: per-process grain iterator states (read only)
DATA_POSITION_ITEM = workdir_lib.DATA_POSITION_ITEM


def _legacy_data_position(directory: pathlib.Path) -> dict:
    """`{"position": ...}` from a checkpoint's per-process grain iterator files (written before DATA_POSITION_ITEM):
    possible for one process without workers, whose state counts the records read (`seen`)."""
    files = sorted(directory.glob("process_*-of-*.json"))
    if len(files) != 1 or not files[0].name.endswith("-of-1.json"):
        raise ValueError(f"{directory} holds the grain iterator states of {len(files)} processes (an old checkpoint "
                         "format): only one-process checkpoints of that format resume; restart from the params "
                         "(config.init) or resume with the version that wrote it")
    state = json.loads(files[0].read_text())

    def find_seen(node):
        if isinstance(node, dict):
            if "seen" in node and "bad" in node:
                return int(node["seen"])
            for value in node.values():
                found = find_seen(value)
                if found is not None:
                    return found
        return None

    seen = find_seen(state)
    if seen is None:
        raise ValueError(f"{files[0]} is an old-format iterator state written with data workers; it cannot be "
                         "converted to a global data position")
    return {"position": seen}


class CheckpointSaveError(ValueError):
    """Writing a training checkpoint failed (e.g. the disk is full); the earlier checkpoints are untouched.
    (A ValueError so the command line prints it as one `error:` line.)"""


class TrainCheckpointer:
    """Full training checkpoints in `directory`: the state pytree (params, optimizer state, step, rng, ...) and
    the data position (`data_iterator.get_state()`: one global example index, the same on every process, written
    by process 0 as JSON), saved together per step by an Orbax `CheckpointManager`. The data position restores
    with any process or worker count; old checkpoints with per-process grain states restore for one process.

    Keeps the newest `keep` steps; saves asynchronously when `async_save` (the next training steps overlap the
    write; a crash mid-write leaves only a temporary directory that Orbax ignores, so the previous step stays the
    latest). Restores into abstract targets that carry shardings, so a checkpoint restores onto any mesh.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True,
                 fail_save_at_step: int = -1):
        self.directory = pathlib.Path(directory).absolute()
        self.fail_save_at_step = fail_save_at_step  # testing aid: that save fails like a full disk
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
        state_handler, json_handler = _tree_handler(), ocp.handlers.JsonCheckpointHandler()
        for args in (ocp.args.PyTreeSave, ocp.args.PyTreeRestore):
            handlers.add(STATE_ITEM, args, state_handler)
        for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
            handlers.add(DATA_POSITION_ITEM, args, json_handler)
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def finished_steps(self) -> list[int]:
        """Steps whose directory is complete (an unfinished write is a temporary directory)."""
        return workdir_lib.finished_steps(self.directory)

    def _save_failed(self, step: int, error: OSError) -> CheckpointSaveError:
        try:  # an earlier step may still be committing in the background: let it land before naming the last good
            self.manager.wait_until_finished()
        except OSError:
            pass
        good = [s for s in self.finished_steps() if s != step]
        return CheckpointSaveError(
            f"saving the checkpoint of step {step} in {self.directory} failed: {error}. The last good checkpoint "
            f"is step {good[-1] if good else None} (untouched); free space and rerun the same command to resume.")

    def save(self, step: int, state, data_iterator=None) -> None:
        items = {STATE_ITEM: ocp.args.PyTreeSave(state)}
        if data_iterator is not None:
            items[DATA_POSITION_ITEM] = ocp.args.JsonSave(data_iterator.get_state())
        try:
            if step == self.fail_save_at_step:
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (simulated by "
                              "config.debug.fail_save_at_step)")
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except OSError as error:  # an async write of an earlier step may report here too
            raise self._save_failed(step, error) from error

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores `step` into `abstract_state` (ShapeDtypeStructs with shardings); sets the iterator's position."""
        items = {STATE_ITEM: ocp.args.PyTreeRestore(
            item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
        step_dir = self.directory / str(step)
        legacy = data_iterator is not None and not (step_dir / DATA_POSITION_ITEM).exists()
        if data_iterator is not None and not legacy:
            items[DATA_POSITION_ITEM] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iterator is not None:
            data_iterator.set_state(_legacy_data_position(step_dir / DATA_ITEM) if legacy
                                    else restored[DATA_POSITION_ITEM])
        return restored[STATE_ITEM]

    def restore_latest(self, abstract_state, data_iterator=None):
        """(step, state) of the newest checkpoint that restores, or (None, None) when there is none. A checkpoint
        that fails to restore (truncated or missing files) is skipped with a warning and, once an older one has
        restored, moved aside to `STEP.corrupt-<time>` so it no longer shadows the good one. When none restores,
        the first error is raised and nothing is moved."""
        failed, first_error = [], None
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self.restore(step, abstract_state, data_iterator)
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
                log.warning("checkpoint step %d in %s does not restore (%s: %s); trying the previous one", step,
                            self.directory, type(error).__name__, str(error).splitlines()[0] if str(error) else "")
                failed.append(step)
                first_error = first_error or error
                continue
            stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
            for bad in failed:
                aside = self.directory / f"{bad}.corrupt-{stamp}"
                os.replace(self.directory / str(bad), aside)
                log.warning("moved the unreadable checkpoint step %d aside to %s; resuming from step %d", bad, aside,
                            step)
            if failed:
                self.manager.reload()
            return step, state
        if first_error is not None:
            raise first_error
        return None, None

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except OSError as error:
            raise self._save_failed(self.manager.latest_step(), error) from error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


# ------------------------------------------------------------------------------------- training workdirs


def is_workdir(path: str | os.PathLike) -> bool:
    """Whether `path` is a training workdir holding a model: its config and training checkpoints or the params
    export (`workdir.py`)."""
    path = pathlib.Path(path)
    return workdir_lib.read_config(path) is not None and ((path / workdir_lib.CHECKPOINTS).is_dir()
                                                         or is_params_checkpoint(path / workdir_lib.PARAMS))


def load_workdir_model(workdir: str | os.PathLike, step: int | None = None, **overrides: Any) -> tuple[Any, str]:
    """(model, description) of a training workdir: the params of checkpoint `step` (default: the latest, the newest
    state), else the `params/` export. `overrides` change non-structural model fields (`dtype`, `remat`)."""
    from harmoclip_jax import config_lib

    workdir = pathlib.Path(workdir)
    steps = workdir_lib.checkpoint_steps(workdir)
    if step is None and not steps:
        export = workdir / workdir_lib.PARAMS
        return load_params(export, **overrides), f"params export {export}"
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"workdir {workdir} has no training checkpoint at step {step}; it has steps {steps}")
    config = workdir_lib.read_config(workdir)
    backbone = config_lib.backbone(config)
    model_config = backbone.get_config(backbone.config_for(config_lib.model_section(config)), **overrides)
    params = restore_params(workdir / workdir_lib.CHECKPOINTS / str(step) / STATE_ITEM,
                            glue.abstract_params(backbone, model_config), key="params")
    return glue.model_from_params(backbone, model_config, params), f"workdir {workdir}, training checkpoint step {step}"
