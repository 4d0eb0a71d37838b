"""Command line entry point; the work is in `harmoclip_jax.train` (importable from notebooks).

    python -m harmoclip_jax.main --config=configs/demo.py --workdir=/tmp/demo
    python -m harmoclip_jax.main --config=configs/vitb16.py:method=fineclip,res=336 --config.optim.lr=2e-5

Rerunning the same command resumes from the latest checkpoint in --workdir. Under a multi-process launcher set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under SLURM/Cloud TPU, which JAX detects):
`distributed.initialize_from_environment`.
Expected errors (bad flags or config, missing files) print one `error: ...` line; --verbose adds the traceback.
"""
from __future__ import annotations

import os

from absl import flags

from harmoclip_jax import cli, config_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots (default: "
                               "runs/<config name>).")
_CONFIG = None  # the config flag's holder, defined by _define_flags (run_absl reports its errors as one line)


def _define_flags() -> None:
    global _CONFIG
    _CONFIG = config_lib.define_config_flag("config", "configs/demo.py", "Experiment config file[:arguments].")


def _config_file() -> str:
    return flags.FLAGS["config"].config_filename.split(":", 1)[0]  # without the `:arguments`


def main(argv):
    import sys

    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}: flags are --config=FILE[:ARGS], --config.a.b=VALUE, "
                             f"--workdir=DIR")
    if any(arg.startswith("--config.method") for arg in sys.argv[1:]):
        # The method is a preset: the config file's `method=` argument sets the loss weights with it.
        raise cli.UsageError("--config.method would rename the run without changing its losses; choose the method "
                             "in the config argument, e.g. --config=configs/demo.py:method=fineclip")
    from harmoclip_jax import distributed

    distributed.initialize_from_environment()
    from harmoclip_jax import train
    from harmoclip_jax.data import pipeline

    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", os.path.splitext(os.path.basename(_config_file()))[0])
    try:
        train.train_and_evaluate(config, workdir)
    except (train.NonFiniteLossError, pipeline.BadRecordsError) as error:
        # Expected failures (a diverged run, a dataset with too many bad records) deserve a message, not a
        # traceback; missing data/weights (OSError) and bad configs (ValueError) are reported by cli.run_absl.
        raise cli.Error(str(error)) from error


if __name__ == "__main__":
    cli.run_absl(main, define_flags=_define_flags)
