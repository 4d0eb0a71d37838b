"""The resume contract and the fault behaviour of `python -m harmoclip_jax.main` (docs/training.md, "Resume
contract and faults"): refused / allowed config changes, the workdir lock, a torn metrics.jsonl, a corrupt latest
checkpoint, a full disk during a save, double Ctrl-C with grain workers, and kill -9 at random moments.

The end-to-end tests run the real command on the smoke config (1 CPU device, compile-bound: seconds per run) and
share one finished 4-step run (`base`), copied per test."""
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import time

import pytest

from harmoclip_jax import config_lib, resume
from harmoclip_jax.metrics_writer import MetricsWriter, read_metrics
import warm_python
from trainer_helpers import losses_by_step, main_command, run_main, subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = ["--config.total_steps=4", "--config.checkpoint.every=2", "--config.log_every=1"]


def _snapshot(workdir):
    """(bytes, mtime) of every file in the workdir but the lock (which names the last process that took it)."""
    workdir = pathlib.Path(workdir)
    return {str(p.relative_to(workdir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(workdir.rglob("*")) if p.is_file() and p.name != ".lock"}


def _history(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "config_history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 4-step smoke run with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("base") / "run"
    run_main(workdir, *BASE)
    return workdir


def _copy(base, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(base, workdir)
    return workdir


# ------------------------------------------------------------------------------------ the table (no runs)


def test_unlisted_fields_are_refused_and_listed_ones_are_harmless():
    old = resume._as_json(config_lib.load_config(str(ROOT / "configs/demo.py:smoke")))
    new = json.loads(json.dumps(old))
    new["total_steps"], new["checkpoint"]["every"], new["evals"] = 99, 7, {}
    new["mesh"] = [["data", 2], ["fsdp", 4]]
    new["optim"]["lr"], new["model"]["variant"], new["data"]["seed"] = 0.5, "ViT-B/16", 3
    new["brand_new_field"] = 1  # nobody classified it: refused
    changes = resume.config_changes(old, new)
    assert {k for k in changes if not resume.is_harmless(k)} == {"optim.lr", "model.variant", "data.seed",
                                                                  "brand_new_field"}
    assert changes["total_steps"] == (4, 99) and changes["brand_new_field"] == ("<absent>", 1)
    # A field the saved config lacks (older code) compares equal to today's default.
    del old["resume"]
    assert "resume.allow_changes" not in resume.config_changes(old, new, defaults=resume._as_json(
        config_lib.base_config()))


# --------------------------------------------------------------------------------- refused / allowed resume


def test_changed_config_is_refused_naming_each_field_and_changes_nothing(base, tmp_path):
    workdir = _copy(base, tmp_path)
    before = _snapshot(workdir)
    proc = run_main(workdir, *BASE, "--config.batch_size=8", "--config.optim.lr=0.01", "--config.data.seed=3",
                 "--config.log_every=2", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr
    assert err.count("error:") == 1 and "Traceback" not in err
    for line in ("  batch_size: 16 -> 8", "  optim.lr: 0.001 -> 0.01", "  data.seed: 0 -> 3"):
        assert line in err, (line, err)
    assert "log_every" not in err  # harmless: not part of the refusal
    assert "new --workdir" in err and \
        "--config.resume.allow_changes=\"('batch_size', 'data.seed', 'optim.lr')\"" in err
    assert _snapshot(workdir) == before  # config.json, checkpoints, metrics: same bytes, same mtimes


def test_harmless_and_allowed_changes_resume_and_are_recorded_through_a_torn_metrics_line(base, tmp_path):
    workdir = _copy(base, tmp_path)
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.')  # a crash mid-write
    proc = run_main(workdir, "--config.total_steps=6", "--config.checkpoint.every=2", "--config.log_every=1",
                 "--config.optim.lr=0.002", "--config.resume.allow_changes=('optim.lr',)")
    assert "resumed" in proc.stdout and "at step 4" in proc.stdout
    assert "not a JSON record" in proc.stderr  # the torn line was dropped with a warning
    assert sorted(losses_by_step(workdir)) == [1, 2, 3, 4, 5, 6]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["total_steps"] == 6 and saved["optim"]["lr"] == 0.002
    last = _history(workdir)[-1]
    assert last["event"] == "resume" and last["step"] == 4 and last["pid"] > 0
    assert last["changes"]["total_steps"] == {"old": 4, "new": 6, "accepted_as": "harmless"}
    assert last["changes"]["optim.lr"] == {"old": 0.001, "new": 0.002, "accepted_as": "allowed"}


# -------------------------------------------------------------------------------------------------- lock


def test_second_run_on_a_live_workdir_is_refused_naming_the_holder_and_kill_9_frees_it(tmp_path):
    workdir = tmp_path / "run"
    holder = warm_python.Popen(main_command(workdir, "--config.total_steps=100000", "--config.checkpoint.every=100000",
                                   "--config.log_every=1"),
                              cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # the holder takes the lock before it compiles: the second run is refused while the first compiles
        deadline, lock = time.time() + 180, workdir / ".lock"
        while time.time() < deadline and not (lock.exists() and f"pid={holder.pid}" in lock.read_text()):
            time.sleep(0.1)
        assert holder.poll() is None
        second = run_main(workdir, "--config.total_steps=2", check=False, timeout=120)
        assert second.returncode == 1
        assert f"pid={holder.pid}" in second.stderr and "host=" in second.stderr
        assert "in use by another run" in second.stderr and "Traceback" not in second.stderr
    finally:
        holder.kill()
        holder.wait()
    third = run_main(workdir, "--config.total_steps=2", "--config.checkpoint.every=100000")
    assert sorted(losses_by_step(workdir)) == [1, 2] and "Traceback" not in third.stderr


# -------------------------------------------------------------------------------------------------- faults


def test_torn_and_bad_metrics_lines_are_dropped_and_the_file_replaced(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2, "loss": 0.5}\n{"step": 3, "loss": 0.2}\n'
                    '{"step": 4, "lo')
    with pytest.raises(ValueError):  # a bad line in the middle is corruption, not a torn tail
        read_metrics(path)
    MetricsWriter(tmp_path).truncate_after(2)
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
    assert "not json" in caplog.text and '{"step": 4, "lo' in caplog.text
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed over metrics.jsonl
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 1.0}]  # a torn last line: skipped with a warning


def test_corrupt_latest_checkpoint_is_moved_aside_and_the_previous_one_resumes(base, tmp_path):
    workdir = _copy(base, tmp_path)
    data_files = sorted((workdir / "checkpoints/4/state").rglob("d/*"))
    assert data_files
    for path in data_files:  # a write torn by a crash / bad disk
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    proc = run_main(workdir, *BASE)
    assert "checkpoint step 4" in proc.stderr and "does not restore" in proc.stderr
    assert "resumed" in proc.stdout and "at step 2" in proc.stdout
    aside = [p.name for p in (workdir / "checkpoints").iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].startswith("4.corrupt-")
    assert (workdir / "checkpoints/4/state").is_dir()  # written again
    assert losses_by_step(workdir) == losses_by_step(base)  # the redone steps 3, 4 give the same numbers


def test_disk_full_during_a_save_is_one_error_line_and_the_last_good_checkpoint_restores(base, tmp_path):
    workdir = tmp_path / "run"
    proc = run_main(workdir, *BASE, "--config.debug.fail_save_at_step=4", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "No space left on device" in error_lines[0] and "last good checkpoint is step 2" in error_lines[0]
    steps = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert steps == ["2"], steps
    run_main(workdir, *BASE)  # rerun: resumes from 2 and finishes exactly like the uninterrupted run
    assert losses_by_step(workdir) == losses_by_step(base)


def _descendants(pid):
    """The pids of the live descendants of `pid` (Linux /proc)."""
    out, todo = set(), [pid]
    while todo:
        for task in pathlib.Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = {int(c) for c in (task / "children").read_text().split()}
            except OSError:  # the process or thread ended meanwhile
                continue
            todo.extend(children - out)
            out |= children
    return out


def _alive(pid):
    """Whether `pid` runs (not a zombie waiting for its parent)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not pathlib.Path("/proc/self/task").exists(), reason="reads child pids from Linux /proc")
def test_kill_9_then_rerun_resumes_with_identical_losses(base, tmp_path):
    """Killed after step 3 (checkpoints every 2), with two grain workers: the workers exit within seconds of the
    trainer (nothing of it is left running), and the rerun resumes from step 2 and gives the uninterrupted run's
    numbers (no workers), bitwise (same batches, same rng, same state, one device). Saves are synchronous here, so
    checkpoint 2 is complete; kills inside an async save:
    `test_kill_9_at_random_moments_then_rerun_equals_an_uninterrupted_run`."""
    workdir = tmp_path / "killed"
    overrides = [*BASE, "--config.checkpoint.async_save=False", "--config.data.num_workers=2"]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = warm_python.Popen(main_command(workdir, *overrides, "--config.debug.kill_at_step=3"), cwd=ROOT,
                                env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    workers = set()
    try:
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            workers |= _descendants(proc.pid)
            time.sleep(0.05)
        proc.wait(timeout=10)
        killed = time.time()
        while time.time() - killed < 10 and any(_alive(p) for p in workers):
            time.sleep(0.1)
        left = [p for p in workers if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in [p for p in workers if _alive(p)]:
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    assert len(workers) >= 2, workers  # the grain workers (and multiprocessing's resource tracker)
    assert not left, f"still running 10 s after the trainer's SIGKILL: {left}"
    print(f"{len(workers)} worker processes gone {time.time() - killed:.1f}s after the trainer's kill -9")
    assert max(losses_by_step(workdir)) == 3
    resumed = run_main(workdir, *overrides)
    assert "resumed" in resumed.stdout and "at step 2" in resumed.stdout
    expected, got = losses_by_step(base), losses_by_step(workdir)
    assert sorted(got) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert got[step] == expected[step], (step, got[step], expected[step])


@pytest.mark.parametrize("to_group", [True, False], ids=["terminal", "trainer_only"])
def test_double_ctrl_c_with_grain_workers_exits_at_once_and_the_workdir_resumes(to_group, tmp_path):
    """The first SIGINT lands just before step 4, whose evaluation (compiling the encoders) keeps the run busy for
    seconds; the second one, sent once the first is acknowledged, exits at once. `terminal`: both go to the whole
    process group (a terminal's Ctrl-C; the grain workers get them too); `trainer_only` (`kill -INT PID`): the
    trainer must end its workers itself."""
    send = (lambda pid: os.killpg(pid, signal.SIGINT)) if to_group else (lambda pid: os.kill(pid, signal.SIGINT))
    workdir = tmp_path / "run"
    overrides = ["--config.data.num_workers=2", "--config.checkpoint.every=2", "--config.log_every=1"]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = warm_python.Popen(main_command(workdir, "--config.total_steps=100000", *overrides, arg="smoke"), cwd=ROOT,
                                env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)  # its own process group, like a terminal's foreground job
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not ((workdir / "metrics.jsonl").exists() and len(losses_by_step(workdir)) >= 3):
            time.sleep(0.05)
        assert proc.poll() is None
        send(proc.pid)
        while time.time() < deadline and "saving a checkpoint after this step" not in log.read_text():
            time.sleep(0.02)
        send(proc.pid)  # ... twice: stop now
        start = time.time()
        proc.wait(timeout=60)
        assert time.time() - start < 5
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = log.read_text()
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "SIGINT again: exiting now" in err
    time.sleep(2)
    alive = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(proc.pid)], capture_output=True, text=True).stdout
    assert not [line for line in alive.splitlines() if "Z" not in line.split()[1]], alive  # no worker outlives it
    # Nothing is corrupt: the rerun resumes from the last finished checkpoint (the step-2 save may still have been
    # in flight: then it starts over) and finishes.
    again = run_main(workdir, "--config.total_steps=5", *overrides)
    assert "Traceback" not in again.stderr
    assert sorted(losses_by_step(workdir)) == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------------- kill -9 at random


# Each run is compile-bound (~20-60 s on a shared 2-core CPU), so by default two random kills per config, and the
# text cache and the lexeme vocabulary share a config; HARMOCLIP_KILL_SEEDS=0,1,2,3 kills that many times per run.
KILL_CONFIGS = {
    "text_cache+lexeme_vocab": ("smoke,noeval", ["--config.optim.freeze_text_tower=True",
                                                 "--config.loss.lrc_negatives=vocab"]),
    "teacher": ("smoke,noeval,method=clipself", []),
}
KILL_SEEDS = [int(s) for s in os.environ.get("HARMOCLIP_KILL_SEEDS", "0,1").split(",")]


@pytest.mark.parametrize("name", sorted(KILL_CONFIGS))
def test_kill_9_at_random_moments_then_rerun_equals_an_uninterrupted_run(name, tmp_path):
    """For each seed: start (or resume) the run, SIGKILL it at a random moment after its first new step (often
    inside an async save: a checkpoint every step), then rerun to completion; the losses equal an uninterrupted
    run's, bitwise."""
    arg, extra = KILL_CONFIGS[name]
    overrides = ["--config.total_steps=10", "--config.checkpoint.every=1", "--config.checkpoint.keep=2",
                 "--config.log_every=1", *extra]
    reference = tmp_path / "reference"
    run_main(reference, *overrides, arg=arg)
    workdir = tmp_path / "killed"
    killed_mid_run = 0
    for seed in KILL_SEEDS:
        delay = random.Random(f"{name}:{seed}").uniform(0.0, 1.5)
        proc = warm_python.Popen(main_command(workdir, *overrides, arg=arg), cwd=ROOT, env=subprocess_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 180
            start = len(losses_by_step(workdir)) if (workdir / "metrics.jsonl").exists() else 0
            while time.time() < deadline and proc.poll() is None:
                if (workdir / "metrics.jsonl").exists() and max(losses_by_step(workdir), default=0) > start:
                    break
                time.sleep(0.05)
            time.sleep(delay)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                killed_mid_run += 1
            proc.wait(timeout=60)
            in_flight = [p.name for p in (workdir / "checkpoints").glob("*tmp*")]
            print(f"{name} seed {seed}: killed {delay:.2f}s after a step; unfinished saves left: {in_flight}")
        finally:
            if proc.poll() is None:
                proc.kill()
    assert killed_mid_run >= 1  # at least one kill landed while it was training
    run_main(workdir, *overrides, arg=arg)
    expected, got = losses_by_step(reference), losses_by_step(workdir)
    assert sorted(got) == list(range(1, 11))
    for step in range(1, 11):
        assert got[step] == expected[step], (name, step, got[step], expected[step])
