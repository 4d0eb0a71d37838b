"""The layout of a training workdir, in one place. Light to import (no JAX, no Orbax): `checkpoint.py` imports it,
never the reverse; reading a model back from a workdir is `checkpoint.load_workdir_model`.

    WORKDIR/config.json          the experiment config of the run (`ml_collections` JSON)
    WORKDIR/checkpoints/STEP/    full training checkpoints (Orbax; `checkpoint.TrainCheckpointer`)
    WORKDIR/params/              params-only export at the end (`checkpoint.save_params`)
    WORKDIR/metrics.jsonl        one JSON object per logged step; WORKDIR/curves.png its plot
    WORKDIR/tensorboard/         TensorBoard event files of the same records (`metrics_writer.TensorBoardSink`)
    WORKDIR/wandb/               Weights & Biases run files (config.wandb; unless WANDB_DIR is set), and
    WORKDIR/wandb_run_id.txt     the W&B run id a resumed run continues
    WORKDIR/profile/             jax.profiler traces of config.profile_steps (plugins/profile/TIME/HOST.xplane.pb)
    WORKDIR/lexeme_vocab.json    LRC's lexeme vocabulary (lrc_negatives="vocab")
    WORKDIR/text_cache/          frozen-text-tower embeddings
    WORKDIR/config_history.jsonl one line per start/resume: accepted config changes (`resume.py`)
    WORKDIR/.lock                held (fcntl.flock) by the process training in it (`resume.WorkdirLock`)
"""
from __future__ import annotations

import json
import os
import pathlib

import ml_collections

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
PARAMS = "params"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
TENSORBOARD = "tensorboard"
WANDB_RUN_ID = "wandb_run_id.txt"
PROFILE = "profile"
LEXEME_VOCAB = "lexeme_vocab.json"
TEXT_CACHE = "text_cache"
CONFIG_HISTORY = "config_history.jsonl"
LOCK = ".lock"
# The training state's item inside checkpoints/STEP/ (`checkpoint.TrainCheckpointer`).
STATE_ITEM = "state"
# The data position (`{"position": global example index}`, JSON, written by process 0). Checkpoints written before
# it have DATA_ITEM instead: grain iterator states, one `process_{i}-of-{n}.json` per process.
DATA_POSITION_ITEM = "data_position"
DATA_ITEM = "data_iter"


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict | None:
    """The run's experiment config, or None when `workdir` has none (or `config.json` is a Hugging Face one)."""
    path = pathlib.Path(workdir) / CONFIG
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if "vision_config" in data or "model" not in data:  # a Hugging Face model directory
        return None
    return ml_collections.ConfigDict(data)


def finished_steps(checkpoints: str | os.PathLike) -> list[int]:
    """The finished steps in a checkpoints directory (an unfinished write is a temporary directory, a checkpoint
    moved aside as unreadable is `STEP.corrupt-...`)."""
    directory = pathlib.Path(checkpoints)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / STATE_ITEM).is_dir())


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """The finished training-checkpoint steps of a workdir."""
    return finished_steps(pathlib.Path(workdir) / CHECKPOINTS)


def region_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict | None:
    """The run's `region` section completed with today's defaults (None when `workdir` is not a workdir)."""
    from harmoclip_jax import config_lib

    config = read_config(workdir)
    if config is None or "region" not in config:
        return None
    merged = config_lib.base_config().region
    merged.update({k: v for k, v in config.region.items() if k in merged})
    return merged
