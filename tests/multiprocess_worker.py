"""One process of the two-process test (tests/test_multiprocess.py): jax.distributed on CPU with gloo.

Usage: python multiprocess_worker.py PORT NUM_PROCESSES PROCESS_ID OUT_JSON
Runs 3 train steps of the tiny config on a fixed global batch (each process feeds its rows) and writes the losses
and a parameter checksum; then a 2-step `train_and_evaluate` smoke run with evaluation into OUT_JSON's folder.
"""
import json
import pathlib
import sys

import jax

port, num_processes, process_id, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if num_processes > 1:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from harmoclip_jax import config_lib, sharding, train  # noqa: E402
from trainer_helpers import synthetic_batch, tiny_config  # noqa: E402

config = tiny_config()
mesh = sharding.make_mesh(config.mesh)  # data = every device of every process
trainer = train.build_trainer(config, mesh)
losses = []
with jax.set_mesh(mesh):
    state = trainer.init_state()
    for step in range(3):
        batch = synthetic_batch(step)
        rows = config.batch_size // jax.process_count()
        local = {k: v[process_id * rows:(process_id + 1) * rows] for k, v in batch.items()}
        state, metrics = trainer.train_step(state, sharding.put_batch(local, mesh), {})
        losses.append(float(metrics["loss"]))
    params = sharding.to_host(state["params"])
checksum = float(sum(np.abs(x).astype(np.float64).sum() for x in jax.tree.leaves(params)))

demo = config_lib.load_config(str(pathlib.Path(__file__).parents[1] / "configs/demo.py:smoke"))
demo.total_steps = 2
demo.progress_bar = False
demo.plot = False
final = train.train_and_evaluate(demo, pathlib.Path(out).parent / f"run{num_processes}")
if jax.process_index() == 0 or num_processes == 1:
    pathlib.Path(out).write_text(json.dumps({"losses": losses, "checksum": checksum, "final": final,
                                             "devices": jax.device_count(), "processes": jax.process_count()}))
