"""benchmarks/tradeoff.py end to end at smoke size: every run trains from the shared pretrained checkpoint, the
report (table, plot, JSON) covers them with seeds and spread, and a rerun resumes instead of retraining."""
import json
import pathlib
import sys

import warm_python
from trainer_helpers import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _study(tmp_path, *args):
    cmd = [sys.executable, "benchmarks/tradeoff.py", "--smoke", "--seeds", "2", "--only", "clip,harmoclip_vocab",
           "--workdir", str(tmp_path / "study"), "--report_dir", str(tmp_path / "report"), *args]
    proc = warm_python.run(cmd, cwd=ROOT, env=subprocess_env(), timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_smoke_study_reports_and_resumes(tmp_path):
    proc = _study(tmp_path)
    assert "run 5/5: harmoclip_vocab seed 1" in proc.stderr
    report = tmp_path / "report"
    data = json.loads((report / "tradeoff.json").read_text())
    assert list(data["runs"]) == ["pretrained", "clip", "harmoclip_vocab"]
    assert data["command"] == "python benchmarks/tradeoff.py --seeds 2 --only clip,harmoclip_vocab --smoke"
    for name in ("clip", "harmoclip_vocab"):
        run = data["runs"][name]
        assert run["seeds"] == [0, 1] and run["steps"] == 2
        for metric in ("box_top1", "box_top1_base", "box_top1_novel", "box_top5", "t2i_r1", "i2t_r1", "seg_miou"):
            values = run["per_seed"][metric]
            assert len(values) == 2 and all(0 <= v <= 1 for v in values)
            assert abs(run["mean"][metric] - sum(values) / 2) < 1e-9
    # Every fine-tuning run started from the pretrained export.
    config = json.loads((tmp_path / "study/runs/clip/seed1/config.json").read_text())
    assert config["init"]["params_dir"] == str(tmp_path / "study/runs/pretrained/params")
    assert config["seed"] == 1 and config["data"]["seed"] == 1 and config["optim"]["freeze_text_tower"] is True
    assert (tmp_path / "study/runs/harmoclip_vocab/seed0/lexeme_vocab.json").exists()
    table = (report / "tradeoff.md").read_text()
    assert "| CLIP (GC only, continued) |" in table and " ± " in table and "2 steps" in table
    assert "scenes/ov_tiny" in table  # the open-vocabulary data by default
    header = next(line for line in table.splitlines() if line.startswith("| run |"))
    for column in ("box top-1 novel", "box top-1 base", "seg mIoU", "Δ novel vs CLIP", "Δ mIoU vs FineCLIP"):
        assert column in header
    assert (report / "tradeoff.png").stat().st_size > 10_000
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert {(x["case"]["run"], x["case"]["metric"]) for x in lines} >= {("harmoclip_vocab", "box_top1")}
    # A second invocation finds every run finished and only redraws the report.
    again = _study(tmp_path)
    assert "[tradeoff] run " not in again.stderr
    # A workdir belongs to one study.
    clash = warm_python.run([sys.executable, "benchmarks/tradeoff.py", "--workdir", str(tmp_path / "study"),
                            "--report_only"], cwd=ROOT, env=subprocess_env(), timeout=120)
    assert clash.returncode != 0 and "other settings" in clash.stderr


def test_interrupted_run_says_how_to_resume(tmp_path, monkeypatch):
    """Ctrl-C during a run: the trainer saves and returns early, and the study stops with the way to resume instead
    of a missing-metrics error (which stays for a run that reached its last step without them)."""
    import ml_collections
    import pytest

    from harmoclip_jax import cli, train

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import tradeoff

    monkeypatch.setattr(train, "train_and_evaluate", lambda config, run_dir: {"loss": 1.0})
    config = ml_collections.ConfigDict({"total_steps": 150, "seed": 0})
    monkeypatch.setattr(tradeoff.workdir_lib, "checkpoint_steps", lambda run_dir: [75, 91])
    with pytest.raises(cli.Error, match=r"stopped at step 91 of 150 .*rerun the same command to resume"):
        tradeoff.run_one(config, tmp_path / "run")
    monkeypatch.setattr(tradeoff.workdir_lib, "checkpoint_steps", lambda run_dir: [150])
    with pytest.raises(RuntimeError, match="finished without the metrics"):
        tradeoff.run_one(config, tmp_path / "run")
    assert not (tmp_path / "run" / "result.json").exists()
