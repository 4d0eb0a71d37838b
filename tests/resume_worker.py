"""One process of the process-count-free resume test (tests/test_multiprocess.py): jax.distributed on CPU with gloo.

Usage: python resume_worker.py PORT NUM_PROCESSES PROCESS_ID WORKDIR KILL_AT NUM_WORKERS
Runs (or resumes) `train_and_evaluate` of the smoke demo without evals (4 steps, a checkpoint every 2, a loss
logged every step) in WORKDIR; KILL_AT >= 0 dies like `kill -9` after that step; NUM_WORKERS grain data workers.
"""
import pathlib
import sys

import jax


def main():
    port, num_processes, process_id, workdir, kill_at, num_workers = sys.argv[1:]
    num_processes, process_id = int(num_processes), int(process_id)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if num_processes > 1:
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)

    from harmoclip_jax import config_lib, train

    config = config_lib.load_config(str(pathlib.Path(__file__).parents[1] / "configs/demo.py:smoke,noeval"))
    config.total_steps = 4
    config.checkpoint.every = 2
    config.checkpoint.async_save = False
    config.checkpoint.export_params = False
    config.log_every = 1
    config.progress_bar = False
    config.plot = False
    config.debug.kill_at_step = int(kill_at)
    config.data.num_workers = int(num_workers)
    train.train_and_evaluate(config, workdir)


if __name__ == "__main__":  # grain's data workers (spawned) import this file
    main()
