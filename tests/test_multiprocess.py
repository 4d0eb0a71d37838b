"""Two local processes (jax.distributed on CPU, gloo collectives) give the same loss as one process."""
import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from trainer_helpers import subprocess_env

HERE = pathlib.Path(__file__).parent


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices_per_process):
    return subprocess_env(devices_per_process)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    port = _free_port()
    outs = [tmp_path / "multi" / f"p{i}.json" for i in range(2)]
    outs[0].parent.mkdir()
    procs = [subprocess.Popen([sys.executable, str(HERE / "multiprocess_worker.py"), str(port), "2", str(i),
                               str(outs[i])], env=_env(2), cwd=HERE.parent, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    single_out = tmp_path / "single" / "p0.json"
    single_out.parent.mkdir()
    logs = [p.communicate(timeout=400)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    single = subprocess.run([sys.executable, str(HERE / "multiprocess_worker.py"), "0", "1", "0", str(single_out)],
                            env=_env(4), cwd=HERE.parent, capture_output=True, text=True, timeout=400)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-4000:]
    multi, one = json.loads(outs[0].read_text()), json.loads(single_out.read_text())
    assert multi["processes"] == 2 and multi["devices"] == 4 and one["processes"] == 1 and one["devices"] == 4
    np.testing.assert_allclose(multi["losses"], one["losses"], rtol=1e-5)
    np.testing.assert_allclose(multi["checksum"], one["checksum"], rtol=1e-5)
    # Evaluation across processes sees every eval record exactly once.
    assert multi["final"]["eval/retrieval/num_images"] == 72
    assert multi["final"]["eval/boxcls/num_boxes"] == one["final"]["eval/boxcls/num_boxes"]


def _run(workdir, num_processes, kill_at=-1, num_workers=0):
    """`resume_worker.py` in `num_processes` processes with 4 devices in all (the same global batch and mesh size);
    returns their return codes."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE / "resume_worker.py"), str(port), str(num_processes), str(i),
                               str(workdir), str(kill_at), str(num_workers)], env=_env(4 // num_processes),
                              cwd=HERE.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode in ((0,) if kill_at < 0 else (0, -9)), log[-4000:]
    return logs


def _losses(workdir):
    from harmoclip_jax.metrics_writer import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r}


@pytest.mark.slow
def test_resume_with_another_process_count_continues_the_same_data(tmp_path):
    import shutil

    reference = tmp_path / "reference"  # 1 process, uninterrupted; checkpoints at steps 2 and 4
    _run(reference, 1)
    expected = _losses(reference)
    assert sorted(expected) == [1, 2, 3, 4]
    # 2 processes write step 2, then 1 process (with a grain data worker) resumes to step 4.
    two_to_one = tmp_path / "two_to_one"
    _run(two_to_one, 2, kill_at=2)
    assert max(_losses(two_to_one)) == 2
    assert (two_to_one / "checkpoints/2/data_position").is_dir()
    assert not (two_to_one / "checkpoints/2/data_iter").exists()  # no per-process iterator files
    logs = _run(two_to_one, 1, num_workers=1)
    assert "resumed" in logs[0] and "at step 2" in logs[0]
    # 1 process wrote step 2 (the reference's checkpoint), 2 processes resume to step 4.
    one_to_two = tmp_path / "one_to_two"
    shutil.copytree(reference, one_to_two)
    shutil.rmtree(one_to_two / "checkpoints/4")
    logs = _run(one_to_two, 2)
    assert "resumed" in logs[0] and "at step 2" in logs[0]
    for workdir in (two_to_one, one_to_two):
        got = _losses(workdir)
        assert sorted(got) == [1, 2, 3, 4]
        np.testing.assert_allclose([got[s] for s in range(1, 5)], [expected[s] for s in range(1, 5)], rtol=1e-5)


@pytest.mark.slow
def test_readme_multi_host_launch(tmp_path):
    """README's multi-host launch, as written: `JAX_COORDINATOR_ADDRESS=... JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i
    python -m harmoclip_jax.main --config=configs/demo.py:smoke,noeval ...`, two local processes with 2 fake CPU
    devices each. Both exit 0, the run spans 4 devices in 2 processes, and it finishes (last step's metrics and the
    params export written)."""
    readme = (HERE.parent / "README.md").read_text()
    assert "JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i" in readme
    port = _free_port()
    workdir = tmp_path / "run"
    procs = []
    for i in range(2):
        env = {**_env(2), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "harmoclip_jax.main", "--config=configs/demo.py:smoke,noeval",
             f"--workdir={workdir}", "--config.progress_bar=False", "--config.plot=False"],
            env=env, cwd=HERE.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
        assert "Traceback" not in err, err[-4000:]
    assert "on 4 cpu device(s), 2 process(es)" in outputs[0][0], outputs[0][0]
    steps = [json.loads(line).get("step") for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 4
    assert (workdir / "params" / "model.json").exists()
