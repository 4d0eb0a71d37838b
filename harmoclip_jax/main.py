"""Command line entry point; the work is in `harmoclip_jax.train` (importable from notebooks).

    python -m harmoclip_jax.main --config=configs/demo.py --workdir=/tmp/demo
    python -m harmoclip_jax.main --config=configs/vitb16.py:method=fineclip,res=336 --config.optim.lr=2e-5

Rerunning the same command resumes from the latest checkpoint in --workdir. Under a multi-process launcher set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under SLURM/Cloud TPU, which JAX detects).
"""
from __future__ import annotations

import os

from absl import flags

from harmoclip_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots (default: "
                               "runs/<config name>).")
_CONFIG = None  # the config flag's holder, defined by _define_flags (run_absl reports its errors as one line)


def _define_flags() -> None:
    global _CONFIG
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Experiment config file[:arguments].",
                                              lock_config=True)


def distributed_arguments(environ=os.environ) -> dict | None:
    """The `jax.distributed.initialize` arguments of this launch; None for a single process.

    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (README's multi-host launch) are passed explicitly:
    jax does not read them itself. Under SLURM or on a Cloud TPU slice the arguments are left to jax's detection.
    """
    address = environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        missing = [name for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not environ.get(name)]
        if missing:
            raise cli.UsageError(f"JAX_COORDINATOR_ADDRESS={address} is set but {' and '.join(missing)} "
                                 f"{'is' if len(missing) == 1 else 'are'} not: set JAX_NUM_PROCESSES=N and "
                                 f"JAX_PROCESS_ID=i (0..N-1) for each process")
        try:
            num_processes, process_id = int(environ["JAX_NUM_PROCESSES"]), int(environ["JAX_PROCESS_ID"])
        except ValueError:
            raise cli.UsageError(f"JAX_NUM_PROCESSES={environ['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                                 f"{environ['JAX_PROCESS_ID']!r} must be integers") from None
        if not 0 <= process_id < num_processes:
            raise cli.UsageError(f"JAX_PROCESS_ID={process_id} must be in 0..{num_processes - 1} "
                                 f"(JAX_NUM_PROCESSES={num_processes})")
        return {"coordinator_address": address, "num_processes": num_processes, "process_id": process_id}
    if environ.get("SLURM_JOB_ID") or environ.get("TPU_WORKER_HOSTNAMES"):
        return {}  # jax's cluster detection fills everything in
    return None


def _maybe_initialize_distributed() -> None:
    arguments = distributed_arguments()
    if arguments is None:
        return
    import jax

    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**arguments)


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
    if not os.path.isfile(_config_file()):
        raise cli.UsageError(f"--config: no config file {_config_file()} (relative to {os.getcwd()}); e.g. "
                             f"--config=configs/demo.py from the repository root")
    _maybe_initialize_distributed()
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
