"""`python -m harmoclip_jax.main` end to end on the tiny scenes dataset: smoke run, NaN stop, SIGTERM (kill -9 and
resume: test_resume.py). Runs the real command in subprocesses (1 CPU device each, so they are quick)."""
import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

from harmoclip_jax.metrics_writer import read_metrics
import warm_python
from trainer_helpers import losses_by_step, run_main, subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_smoke_run_writes_everything_and_evaluates(tmp_path):
    workdir = tmp_path / "run"
    proc = run_main(workdir, "--config.plot=True", arg="smoke")
    assert "harmoclip_jax | method=harmoclip" in proc.stdout  # the one-line summary
    assert "final evaluation" in proc.stdout
    for name in ("metrics.jsonl", "config.json", "curves.png", "params/model.json"):
        assert (workdir / name).exists(), name
    records = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    last = records[-1]
    for key in ("loss", "loss/gc", "loss/lrc", "loss/gr", "learning_rate", "images_per_s",
                "eval/retrieval/t2i_r1", "eval/retrieval/i2t_r10", "eval/boxcls/top1", "eval/boxcls/top5_micro"):
        assert key in last, key
    assert last["eval/retrieval/num_images"] == 72 and last["eval/retrieval/num_captions"] == 360
    assert json.loads((workdir / "config.json").read_text())["method"] == "harmoclip"
    # TensorBoard: the eval's picture (labelled boxes and a similarity map of a held-out image) at the eval step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    (picture,) = events.Images("eval/picture")
    assert picture.step == 4 and picture.width > 2 * picture.height > 300  # boxes | image + map
    # The params-only export loads with one call and embeds.
    from harmoclip_jax.checkpoint import load_params

    model = load_params(workdir / "params")
    assert model.encode_image(np.zeros((1, 64, 64, 3), np.float32)).shape == (1, 32)
    # Rerunning a finished run resumes at the last step and only re-evaluates.
    again = run_main(workdir, arg="smoke")
    assert "resumed" in again.stdout and "at step 4" in again.stdout


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "nan"
    proc = run_main(workdir, "--config.total_steps=8", "--config.checkpoint.every=2",
                 "--config.debug.inject_nan_at_step=5", "--config.checkpoint.async_save=True", check=False)
    assert proc.returncode != 0
    assert "non-finite loss at step 5" in proc.stderr and "last good checkpoint is step 4" in proc.stderr
    from harmoclip_jax.checkpoint import TrainCheckpointer

    ckpt = TrainCheckpointer(workdir / "checkpoints")
    assert ckpt.latest_step() == 4
    import jax

    from harmoclip_jax import config_lib, train

    config = config_lib.load_config(str(ROOT / "configs/demo.py:smoke"))
    trainer = train.build_trainer(config, train.sharding.make_mesh([("data", 1), ("fsdp", 1)], jax.devices()[:1]))
    state = ckpt.restore(4, trainer.abstract_state)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    assert int(state["step"]) == 4


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "term"
    cmd = [sys.executable, "-m", "harmoclip_jax.main", "--config=configs/demo.py:smoke,noeval",
           f"--workdir={workdir}", "--config.progress_bar=False", "--config.plot=False",
           "--config.total_steps=100000", "--config.checkpoint.every=100000", "--config.log_every=1"]
    proc = warm_python.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if (workdir / "metrics.jsonl").exists() and len(losses_by_step(workdir)) >= 3:
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "checkpoint saved" in out
    from harmoclip_jax.checkpoint import TrainCheckpointer

    latest = TrainCheckpointer(workdir / "checkpoints").latest_step()
    assert latest is not None and latest >= 3 and latest == max(losses_by_step(workdir))
