"""Command line entry point; the work is in `harmoclip_jax.train` (importable from notebooks).

    python -m harmoclip_jax.main --config=configs/demo.py --workdir=/tmp/demo
    python -m harmoclip_jax.main --config=configs/vitb16.py:method=fineclip,res=336 --config.optim.lr=2e-5

Rerunning the same command resumes from the latest checkpoint in --workdir. Under a multi-process launcher set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under SLURM/Cloud TPU, which JAX detects).
"""
from __future__ import annotations

import logging
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Experiment config file[:arguments].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots (default: "
                               "runs/<config name>).")


def _maybe_initialize_distributed() -> None:
    import jax

    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_JOB_ID") or \
            os.environ.get("TPU_WORKER_HOSTNAMES"):
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()


def main(argv):
    del argv
    import sys

    if any(arg.startswith("--config.method") for arg in sys.argv[1:]):
        # The method is a preset: the config file's `method=` argument sets the loss weights with it.
        print("error: --config.method would rename the run without changing its losses; choose the method in the "
              "config argument, e.g. --config=configs/demo.py:method=fineclip", file=sys.stderr, flush=True)
        raise SystemExit(2)
    logging.getLogger("absl").setLevel(logging.WARNING)
    _maybe_initialize_distributed()
    from harmoclip_jax import train

    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", os.path.splitext(os.path.basename(
        flags.FLAGS["config"].config_filename))[0])
    try:
        train.train_and_evaluate(config, workdir)
    except (FileNotFoundError, ValueError, train.NonFiniteLossError) as error:
        # Expected failures (missing data/weights, bad config, diverged run) deserve a message, not a traceback.
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    app.run(main)
