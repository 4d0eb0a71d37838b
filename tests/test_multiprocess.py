"""The README's multi-host launch, two local processes (jax.distributed on CPU, gloo collectives): it trains and
evaluates like one process, a run resumes across a change of process count, and a process killed mid-run ends the
survivor with one line (`distributed.exit_if_process_lost`)."""
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
from harmoclip_jax import distributed, workdir as workdir_lib
import warm_python
from trainer_helpers import ROOT, losses_by_step, main_command, subprocess_env

# The smoke demo (4 steps, a checkpoint every 2, its evaluation at step 4), saving synchronously: a run killed after
# step 2 has written checkpoint 2. No eval picture: multi-process runs never draw it, and the 1-process runs here would
# compile its functions for nothing asserted (test_run_logging tests the picture).
RUN = ("--config.checkpoint.async_save=False", "--config.eval_picture=False")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, num_processes, *overrides, killed=False):
    """`python -m harmoclip_jax.main` in `num_processes` processes launched as the README says
    (`JAX_COORDINATOR_ADDRESS=... JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i`), 4 fake CPU devices in all (the same global
    batch and mesh); returns process 0's stdout. `killed`: the run dies like `kill -9` (`debug.kill_at_step`)."""
    port = _free_port()
    procs = []
    for i in range(num_processes):
        env = subprocess_env(4 // num_processes)
        if num_processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
                       JAX_PROCESS_ID=str(i))
        procs.append(warm_python.Popen(main_command(workdir, *RUN, *overrides, arg="smoke"), env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=400) for p in procs]
    finally:  # a hung launch (a collective that never completes) must not outlive the test
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
        if killed and i > 0 and p.returncode in (-6, distributed.LOST_PROCESS_EXIT_CODE):
            # Process 0 hosts the coordination service: when its kill lands while another process still waits on
            # the save's last barrier, that process aborts on the lost service (as on a real cluster) or reports
            # the loss (`distributed.exit_if_process_lost`) before its own kill. The checkpoint was finalised before
            # that barrier; the resume below proves it.
            assert "coordination service" in err or "error: process 0 of 2 was lost" in err, err[-4000:]
            continue
        assert p.returncode == (-9 if killed else 0), out[-2000:] + err[-4000:]
        assert killed or "Traceback" not in err, err[-4000:]  # a killed run's last words are not checked
    assert f"on 4 cpu device(s), {num_processes} process(es)" in outputs[0][0], outputs[0][0]
    return outputs[0][0]


def _evals(workdir):
    from harmoclip_jax.metrics_writer import read_metrics

    return [r for r in read_metrics(workdir / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]


def _params_checksum(workdir):
    import jax

    from harmoclip_jax import checkpoint
    from harmoclip_jax.models import glue

    params = glue.params_of(checkpoint.load_params(workdir / "params"))
    return float(sum(np.abs(np.asarray(x)).astype(np.float64).sum() for x in jax.tree.leaves(params)))


@pytest.mark.slow
def test_readme_multi_host_launch_trains_evaluates_and_resumes_across_process_counts(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert "JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i" in readme
    reference = tmp_path / "reference"  # 1 process, uninterrupted: checkpoints at steps 2 and 4, evaluated at 4
    _launch(reference, 1)
    expected = losses_by_step(reference)
    assert sorted(expected) == [1, 2, 3, 4]
    [reference_eval] = _evals(reference)

    # 2 processes write step 2 and die; 1 process with a grain data worker resumes to step 4.
    two_to_one = tmp_path / "two_to_one"
    _launch(two_to_one, 2, "--config.debug.kill_at_step=2", killed=True)
    assert max(losses_by_step(two_to_one)) == 2
    assert (two_to_one / "checkpoints/2/data_position").is_dir()
    assert not (two_to_one / "checkpoints/2/data_iter").exists()  # no per-process iterator files
    out = _launch(two_to_one, 1, "--config.data.num_workers=1")
    assert "resumed" in out and "at step 2" in out

    # 1 process wrote step 2 (the reference's checkpoint); 2 processes resume to step 4, evaluate and export.
    one_to_two = tmp_path / "one_to_two"
    shutil.copytree(reference, one_to_two)
    shutil.rmtree(one_to_two / "checkpoints/4")
    shutil.rmtree(one_to_two / "params")
    out = _launch(one_to_two, 2)
    assert "resumed" in out and "at step 2" in out
    assert (one_to_two / "params" / "model.json").exists()

    for workdir in (two_to_one, one_to_two):
        got = losses_by_step(workdir)
        assert sorted(got) == [1, 2, 3, 4]
        np.testing.assert_allclose([got[s] for s in range(1, 5)], [expected[s] for s in range(1, 5)], rtol=1e-5)
        np.testing.assert_allclose(_params_checksum(workdir), _params_checksum(reference), rtol=1e-5)
        # Evaluation (in 2 processes for one_to_two) sees every eval record exactly once.
        [evaluated] = _evals(workdir)
        assert evaluated["step"] == 4 and evaluated["eval/retrieval/num_images"] == 72
        assert evaluated["eval/boxcls/num_boxes"] == reference_eval["eval/boxcls/num_boxes"] > 0


@pytest.mark.slow
def test_losing_a_process_ends_the_survivor_with_one_line_naming_it_and_the_last_checkpoint(tmp_path):
    """Process 1 of 2 dies like `kill -9` mid-training (SIGKILL from itself after step 4 and its checkpoint,
    `debug.kill_at_step`): process 0's next collective fails; it prints one line (which process, the last checkpoint,
    relaunch every process) within seconds and exits with LOST_PROCESS_EXIT_CODE, without the ~100 s wait on the dead
    process and XLA's abort at exit. The kill lands at a known step: a kill from outside at a random moment can land
    inside a checkpoint save, whose barriers wait on the coordination service's heartbeat timeout instead
    (distributed.py says so)."""
    workdir, port = tmp_path / "run", _free_port()
    procs, logs = [], [tmp_path / f"process_{i}.txt" for i in range(2)]
    for i in range(2):
        env = subprocess_env(2)
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        kill = ("--config.debug.kill_at_step=4",) if i == 1 else ()
        with open(logs[i], "w") as log:
            procs.append(warm_python.Popen(
                main_command(workdir, *RUN, "--config.total_steps=100000", "--config.checkpoint.every=2",
                             "--config.log_every=1", *kill), env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    try:
        procs[1].wait(timeout=400)
        killed = time.time()
        procs[0].wait(timeout=90)
        elapsed = time.time() - killed
    finally:  # nothing outlives the test
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = logs[0].read_text()
    print(f"the survivor ended {elapsed:.1f}s after the kill")
    assert procs[1].returncode == -signal.SIGKILL, logs[1].read_text()[-4000:]
    assert procs[0].returncode == distributed.LOST_PROCESS_EXIT_CODE, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-4000:]
    assert workdir_lib.checkpoint_steps(workdir)[-1] == 4, workdir_lib.checkpoint_steps(workdir)
    assert errors[0].startswith("error: process 1 of 2 was lost"), errors[0]
    assert f"the last checkpoint is step 4 in {workdir / 'checkpoints'}" in errors[0], errors[0]
    assert "relaunch every process with the same command to resume" in errors[0], errors[0]
    assert "Traceback" not in out and "Fatal Python error" not in out and "Check failure" not in out, out[-4000:]
    assert elapsed < 30, elapsed  # the probe waits PROBE_S for the dead process; exit-time cleanup would take ~100 s


def test_lost_process_message_names_the_processes_and_the_last_checkpoint(tmp_path):
    message = distributed.lost_process_message([2, 3], 4, tmp_path, 7)
    assert message == ("processes 2, 3 of 4 were lost (killed, crashed or its host went down) at step 7; no checkpoint "
                       "was written yet: relaunch every process with the same command to start over")
    for step in (2, 4):
        (tmp_path / workdir_lib.CHECKPOINTS / str(step) / workdir_lib.STATE_ITEM).mkdir(parents=True)
    (tmp_path / workdir_lib.CHECKPOINTS / "6.orbax-checkpoint-tmp").mkdir()  # an unfinished save does not count
    message = distributed.lost_process_message([0], 2, tmp_path, None)
    assert message == (f"process 0 of 2 was lost (killed, crashed or its host went down); the last checkpoint is step "
                       f"4 in {tmp_path / 'checkpoints'}: relaunch every process with the same command to resume "
                       "from it")
