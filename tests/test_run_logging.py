"""Run logging beside metrics.jsonl: TensorBoard event files (and their truncation on resume), an offline Weights &
Biases run, jax.profiler traces of `config.profile_steps`, and the config checks of these fields.

One module-scoped pair of real runs (`resumed_run`: 4 steps, then a resume that redoes steps 3 and 4) serves every
end-to-end assertion; the rest works on event files written in-process (no training)."""
import pathlib
import shutil
import sys

import numpy as np
import pytest

from harmoclip_jax import config_lib, metrics_writer, train
from harmoclip_jax.metrics_writer import open_run_writer, read_metrics, truncate_event_files
import warm_python
from trainer_helpers import ROOT, main_command, subprocess_env

# test_resume.py's `base` run plus W&B (the same train step: the persistent compilation cache serves it)
RUN = ["--config.total_steps=4", "--config.checkpoint.every=2", "--config.log_every=1",
       "--config.wandb.project=harmoclip-tests", "--config.wandb.mode=offline"]


def _events(directory) -> tuple[dict, dict]:
    """({tag: [(step, value)]} of the scalars, {tag: [step]} of the images) as TensorBoard's own reader sees them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})  # 0: keep every value
    accumulator.Reload()
    tags = accumulator.Tags()
    scalars = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in tags["scalars"]}
    images = {tag: [e.step for e in accumulator.Images(tag)] for tag in tags["images"]}
    return scalars, images


def _expected(records) -> dict:
    """metrics.jsonl's records as the event files should hold them: {tag: [(step, float32 value)]}."""
    out = {}
    for record in records:
        for key, value in record.items():
            if key != "step":
                out.setdefault(key, []).append((record["step"], float(np.float32(value))))
    return out


def _run(workdir, env, *overrides):
    cmd = main_command(workdir, *RUN, *overrides)
    proc = warm_python.run(cmd, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A 4-step smoke run (checkpoints at 2 and 4) whose step-4 checkpoint is then removed, as if the run had died
    after logging step 4 but before saving it, then resumed: the resume redoes steps 3 and 4, and traces them
    (config.profile_steps=(3, 5), an accepted change). Both runs log to one offline W&B run."""
    root = tmp_path_factory.mktemp("logging")
    workdir = root / "run"
    env = subprocess_env()
    env.pop("WANDB_DIR", None)  # the default: workdir/wandb
    env.update(WANDB_SILENT="true", WANDB_CONFIG_DIR=str(root / "wandb-config"), WANDB_CACHE_DIR=str(root / "wandb-cache"),
               WANDB_DATA_DIR=str(root / "wandb-data"))
    _run(workdir, env)
    before = _events(workdir / "tensorboard")[0]
    shutil.rmtree(workdir / "checkpoints" / "4")
    proc = _run(workdir, env, "--config.profile_steps=(3, 5)", "--config.resume.allow_changes=('profile_steps',)")
    assert "at step 2" in proc.stdout
    return workdir, before, proc


def test_event_files_hold_each_logged_value_once_across_a_resume(resumed_run):
    workdir, before, _ = resumed_run
    assert [step for step, _ in before["loss"]] == [1, 2, 3, 4]  # the first run's steps 3 and 4 were there too
    records = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    scalars, _ = _events(workdir / "tensorboard")
    expected = _expected(records)
    assert {"loss", "loss/gc", "loss/lrc", "learning_rate", "grad_norm", "images_per_s"} <= set(scalars)
    assert set(scalars) == set(expected)
    for tag, values in expected.items():  # each step once, with metrics.jsonl's value (the resumed run's step 3)
        assert scalars[tag] == values, tag
    assert before["images_per_s"][2:] != scalars["images_per_s"][2:]  # the redone steps replaced the first ones


def test_wandb_offline_run_is_continued_by_the_resume(resumed_run):
    workdir, _, _ = resumed_run
    run_id = (workdir / "wandb_run_id.txt").read_text().strip()
    runs = sorted((workdir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(f"-{run_id}") for run in runs), runs
    for run in runs:
        assert (run / f"run-{run_id}.wandb").stat().st_size > 0


def test_profile_traces_the_configured_steps(resumed_run):
    from jax.profiler import ProfileData

    workdir, _, proc = resumed_run
    assert "profile of steps 3..4 written to" in proc.stdout
    traces = list((workdir / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, traces
    steps = {dict(event.stats)["step_num"] for plane in ProfileData.from_file(str(traces[0])).planes
             for line in plane.lines for event in line.events if event.name == "train"}
    assert steps == {3, 4}


# --------------------------------------------------------------------------------------------- no training


def test_truncation_keeps_earlier_events_byte_for_byte_and_drops_a_torn_tail(tmp_path, caplog):
    metrics_writer._import_tensorboardx()  # without torch (seconds)
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir=str(tmp_path))
    for step in range(1, 5):
        writer.add_scalar("loss", 1.0 / step, step)
        writer.add_image("eval/picture", np.full((4, 5, 3), step, np.uint8), step, dataformats="HWC")
    writer.close()
    (path,) = tmp_path.iterdir()
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(whole[-30:-5])  # a record torn by a crash mid-write
    empty = tmp_path / "events.out.tfevents.0.host.1"  # a file whose values all go: removed
    SummaryWriter(logdir=str(tmp_path), filename_suffix=".1").close()
    next(p for p in tmp_path.iterdir() if p.name.endswith(".1")).rename(empty)

    assert truncate_event_files(tmp_path, 2) == {(1, "loss"), (2, "loss"), (1, "eval/picture"), (2, "eval/picture")}
    assert "not a whole event record" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file, the empty one removed
    assert whole.startswith(path.read_bytes())  # the kept records unchanged
    scalars, images = _events(tmp_path)
    assert scalars == {"loss": [(1, 1.0), (2, 0.5)]} and images == {"eval/picture": [1, 2]}
    assert truncate_event_files(tmp_path / "nowhere", 2) == set()


def test_run_writer_mirrors_records_and_refills_what_a_crash_lost(tmp_path):
    config = config_lib.base_config()
    records = [{"step": s, "loss": 1.0 / s, "loss/gc": 0.1 * s, "learning_rate": 1e-3} for s in (1, 2, 3, 4)]
    records[1].update({"eval/scenes_val/box_top1": 0.25, "eval/scenes_val/num_boxes": 72})
    writer = open_run_writer(tmp_path, config)
    for record in records:
        writer.write(record)
    writer.write_image(2, "eval/picture", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 .height, width, channels. image"):
        writer.write_image(2, "eval/picture", np.zeros((8, 8), np.float32))
    writer.close()
    truncate_event_files(tmp_path / "tensorboard", 2)  # as if kill -9 had lost step 3's and 4's events

    resumed = open_run_writer(tmp_path, config)
    resumed.truncate_after(3)  # restored checkpoint 3: metrics.jsonl keeps 1-3, the events get step 3 back
    resumed.write({"step": 4, "loss": 0.2, "loss/gc": 0.3, "learning_rate": 1e-3})
    resumed.close()
    final = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in final] == [1, 2, 3, 4] and final[-1]["loss"] == 0.2
    scalars, images = _events(tmp_path / "tensorboard")
    assert scalars == _expected(final) and images == {"eval/picture": [2]}
    assert scalars["eval/scenes_val/box_top1"] == [(2, 0.25)]

    off = config_lib.base_config()
    off.tensorboard = False
    assert open_run_writer(tmp_path / "off", off).sinks == ()
    assert open_run_writer(tmp_path / "other", config, enabled=False).sinks == ()


@pytest.mark.parametrize("steps", [(3,), (0, 2), (3, 3), (2.5, 4), (1, 2, 3), (True, 3)])
def test_bad_profile_steps_are_refused_in_one_line(steps):
    config = config_lib.base_config()
    config.profile_steps = steps
    with pytest.raises(ValueError, match=r"config.profile_steps=.* must be \(start, stop\) with 1 <= start < stop"):
        config_lib.profile_steps(config)


def test_profile_steps_and_wandb_settings():
    config = config_lib.base_config()
    assert config_lib.profile_steps(config) == range(0)
    config.profile_steps = (10, 13)
    assert list(config_lib.profile_steps(config)) == [10, 11, 12]
    demo = config_lib.load_config(str(ROOT / "configs/demo.py:smoke"))
    demo.wandb.mode = "cloud"
    with pytest.raises(ValueError, match=r"config.wandb.mode='cloud'; use one of \('online', 'offline'"):
        config_lib.validate(demo)


def test_missing_wandb_is_one_clear_error_before_training(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec: not installed
    config = config_lib.load_config(str(ROOT / "configs/demo.py:smoke"))
    train.check_inputs(config)  # W&B off: not needed
    config.wandb.project = "p"
    with pytest.raises(ValueError, match=r"config.wandb.project='p' logs to Weights & Biases, but the wandb package "
                                         r"is not installed: pip install wandb") as error:
        train.check_inputs(config)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="pip install wandb"):
        metrics_writer.WandbSink(pathlib.Path("/nonexistent"), config.wandb, {})
