"""benchmarks/tradeoff_tuned.py: the declared spaces (drawn reproducibly, committed before the results), the selection
on val, the report on test (from synthetic results, no training), and the whole sweep end to end at smoke size."""
import json
import pathlib
import re
import sys

import pytest
import warm_python
from trainer_helpers import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tuned():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import tradeoff_tuned

    return tradeoff_tuned


def test_spaces_are_drawn_reproducibly_and_declared_in_the_docs(tuned):
    for space in tuned.SPACES:
        configs = tuned.draw_configurations(space, 8)
        assert configs == tuned.draw_configurations(space, 8)  # the same draws on every run and machine
        assert configs[0] == {k: v[0] for k, v in space.choices.items()}  # the method's default comes first
        assert len({json.dumps(c, sort_keys=True) for c in configs}) == 8
        assert all(c[k] in space.choices[k] for c in configs for k in c)
        assert tuned.draw_configurations(space, 3) == configs[:3]  # a smaller budget is a prefix of a larger one
    # Every method's budget is the same; the docs hold exactly what the code draws (declared before the results).
    assert (ROOT / "docs" / "tradeoff_tuned_space.md").read_text() == tuned.space_markdown(8)
    clipself = next(s for s in tuned.SPACES if s.name == "clipself")
    with pytest.raises(Exception, match="has only 32 configurations"):
        tuned.draw_configurations(clipself, 33)


def test_configurations_become_valid_trainer_configs(tuned):
    import tradeoff
    from harmoclip_jax import config_lib, optim

    study = tradeoff.Study(eval_splits=("val", "test"))
    # `late`: the image tower's embeddings and first half of its blocks frozen, nothing else.
    regex = re.compile(tuned.frozen_regex(4))
    assert regex.fullmatch("visual/transformer/blocks/1/mlp/fc1/kernel") and regex.fullmatch("visual/patch_embed")
    assert not regex.fullmatch("visual/transformer/blocks/2/mlp/fc1/kernel") and not regex.fullmatch("visual/proj")
    assert not optim.trainable_mask({"visual": {"ln_pre": {"scale": 0}}}, (tuned.frozen_regex(4),))["visual"][
        "ln_pre"]["scale"]
    tokens = next(s for s in tuned.SPACES if s.name == "harmoclip_tokens")
    overrides = {**tuned.draw_configurations(tokens, 1)[0], "loss.lrc_temperature": 0.03, "train": "late",
                 "optim.lr": 3e-4}
    config = tradeoff.finetune_config(study, tuned.as_run(tokens, 5, overrides, study), 1, pathlib.Path("/p"))
    config_lib.validate(config)
    assert config.loss.lrc_text == "tokens" and config.loss.lrc_temperature == 0.03
    assert config.optim.freeze_text_tower is False and config.optim.lr == 3e-4
    assert config.optim.freeze == (tuned.frozen_regex(4),)
    # Both held-out splits are evaluated: val (selection) and test (report).
    assert {ev.split for ev in config.evals.values()} == {"val", "test"}
    assert set(config.evals) == {"retrieval", "boxcls", "seg", "retrieval_test", "boxcls_test", "seg_test"}
    # The scale check: the same configuration on scenes/ov, ViT-S/8 (6 blocks: `late` freezes 3) at 128 px.
    scale = tuned.scale_study(study)
    config = tradeoff.finetune_config(scale, tuned.as_run(tokens, 5, overrides, scale), 1, pathlib.Path("/p"))
    config_lib.validate(config)
    assert (config.data.dataset, config.model.variant, config.model.image_size) == ("scenes/ov", "ViT-S/8@64", 128)
    assert config.optim.freeze == (tuned.frozen_regex(6),) and "blocks/(0|1|2)/" in tuned.frozen_regex(6)
    assert {ev.dataset for ev in config.evals.values()} == {"scenes/ov"}


def _metrics(novel, r1, shift=0.0):
    """A run's metrics on both splits (test = val + shift)."""
    out = {}
    for suffix, extra in (("", 0.0), ("_test", shift)):
        out.update({f"box_top1_novel{suffix}": novel + extra, f"box_top1_base{suffix}": 0.2, f"box_top1{suffix}": 0.2,
                    f"box_top5{suffix}": 0.5, f"t2i_r1{suffix}": r1 + extra, f"i2t_r1{suffix}": r1 + extra,
                    f"seg_miou{suffix}": 0.05})
    return out


def test_selection_reads_val_and_follows_each_objective(tuned):
    reference = _metrics(0.10, 0.50)
    configs = [{"index": i, "val": _metrics(n, r)} for i, (n, r) in
               enumerate([(0.20, 0.49), (0.18, 0.51), (0.30, 0.40), (0.12, 0.55)])]
    assert tuned.select(configs, reference) == {"balanced": 1, "region_first": 2, "retrieval_first": 1}
    # No configuration keeps GC-only's R@1: the balanced pick is the closest (highest R@1); none beats its novel
    # top-1 by the margin: retrieval-first falls back to the best novel.
    low = [{"index": i, "val": _metrics(n, r)} for i, (n, r) in enumerate([(0.11, 0.40), (0.12, 0.45)])]
    assert tuned.select(low, reference) == {"balanced": 1, "region_first": 1, "retrieval_first": 1}
    assert tuned.select(low, _metrics(0.0, 0.0))["retrieval_first"] == 1
    # Test-split metrics never enter the selection.
    flipped = [{"index": c["index"], "val": {**c["val"], "box_top1_novel_test": 1.0 - c["val"]["box_top1_novel"]}}
               for c in configs]
    assert tuned.select(flipped, reference) == tuned.select(configs, reference)
    assert tuned.pareto_front([(0.2, 0.49), (0.18, 0.51), (0.3, 0.4), (0.12, 0.55), (0.1, 0.5)]) == [3, 1, 0, 2]


def _write(workdir, name, seed, metrics):
    run_dir = workdir / "runs" / name if name == "pretrained" else workdir / "runs" / name / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").write_text(json.dumps({"metrics": metrics, "steps": 2, "seed": seed, "seconds": 1.0}))


def test_report_from_finished_runs(tuned, tmp_path, capsys):
    """The report of a complete sweep (synthetic results: nothing trains): both tables' selections, 3 seeds on test,
    Welch's t, every configuration's val and test metrics in the JSON, the plot; and of a partial one."""
    work, report = tmp_path / "w", tmp_path / "r"
    args = ["--smoke", "--configs", "2", "--only", "harmoclip,fineclip", "--workdir", str(work), "--report_dir",
            str(report), "--report_only"]
    _write(work, "pretrained", 0, _metrics(0.05, 0.50))
    for seed in range(3):
        _write(work, "clip", seed, _metrics(0.10 + 0.01 * seed, 0.50 + 0.002 * seed, shift=0.01))
    values = {"harmoclip": [(0.20, 0.49), (0.18, 0.52)], "fineclip": [(0.19, 0.48), (0.15, 0.47)]}
    for space, points in values.items():
        for index, (novel, r1) in enumerate(points):
            _write(work, f"{space}/cfg{index}", 0, _metrics(novel, r1, shift=-0.02))
    assert tuned.main(args) == 0  # the sweep is done, the selected configurations' seeds are not
    table = (report / "tradeoff_tuned.md").read_text()
    assert table.startswith("<!-- regenerate: python benchmarks/tradeoff_tuned.py --configs 2 --only harmoclip,"
                            "fineclip --smoke -->")
    balanced = table.split("### balanced")[1].split("###")[0]
    assert "| HarmoCLIP (GC + lexeme LRC + GR) | 1: weights.lrc=4," in balanced  # R@1 0.52 >= 0.502, best novel
    assert "| FineCLIP (GC + SD + RC) | 0: " in balanced  # nothing keeps R@1: the highest R@1
    for space, picks in (("harmoclip", {1: (0.01, 0.02), 0: (0.015, 0.03)}), ("fineclip", {0: (0.01, 0.02)})):
        for index, (dn, dr) in picks.items():
            for seed in (1, 2):
                novel, r1 = values[space][index]
                _write(work, f"{space}/cfg{index}", seed, _metrics(novel + dn * seed, r1 + dr * seed, shift=-0.02))
    capsys.readouterr()
    assert tuned.main(args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert {(x["case"]["method"], x["case"]["metric"]) for x in lines} >= {("harmoclip", "box_top1_novel_test")}
    data = json.loads((report / "tradeoff_tuned.json").read_text())
    assert data["selections"] == {"harmoclip": {"balanced": 1, "region_first": 0, "retrieval_first": 1},
                                  "fineclip": {"balanced": 0, "region_first": 0, "retrieval_first": 0}}
    row = data["spaces"]["harmoclip"]["configurations"][1]
    assert row["seeds"] == [0, 1, 2] and len(row["per_seed"]["box_top1_novel"]) == 3
    assert row["per_seed"]["box_top1_novel_test"] == pytest.approx([0.16, 0.17, 0.18])
    assert data["spaces"]["harmoclip"]["configurations"][1]["overrides"]["loss.weights.lrc"] == 4.0
    assert data["spaces"]["fineclip"]["configurations"][1]["seeds"] == [0]  # not selected: one seed
    table = (report / "tradeoff_tuned.md").read_text()
    balanced = table.split("### balanced")[1].split("###")[0]
    harmo = next(line for line in balanced.splitlines() if line.startswith("| HarmoCLIP"))
    # test novel 0.170 ± 0.010 vs GC-only's 0.12 ± 0.01 (t = 0.05 / sqrt(2 * 0.01² / 3) = +6.1)
    assert "0.170 ± 0.010" in harmo and "+0.050 (t +6.1)" in harmo and harmo.endswith("| 3 |")
    assert "| GC-only (continued) | default |" in balanced
    assert "### region-first" in table and "### Every configuration" in table and "Scale check" not in table
    assert (report / "tradeoff_tuned.png").stat().st_size > 10_000
    # The scale check's runs (its own workdir and study) get their own table: each balanced pick vs GC-only.
    scale = work / "scale_check"
    scale.mkdir()
    (scale / "study.json").write_text(json.dumps({"dataset": "scenes/ov", "variant": "ViT-S/8@64", "image_size": 128}))
    for seed in (0, 1):
        _write(scale, "clip", seed, _metrics(0.10 + 0.02 * seed, 0.60, shift=0.0))
        _write(scale, "harmoclip/cfg1", seed, _metrics(0.30 + 0.02 * seed, 0.58, shift=0.0))
        _write(scale, "fineclip/cfg0", seed, _metrics(0.20 + 0.02 * seed, 0.55, shift=0.0))
    assert tuned.main(args) == 0
    table = (report / "tradeoff_tuned.md").read_text()
    check = table.split("### Scale check: `scenes/ov`, ViT-S/8@64 at 128 px")[1].split("###")[0]
    harmo = next(line for line in check.splitlines() if line.startswith("| HarmoCLIP"))
    # novel 0.31 ± 0.014 vs GC-only 0.11 ± 0.014: +0.200, t = 0.2 / 0.0141 = +14.1; first here, second in the sweep
    assert "| 1 | 0.310 ± 0.014 |" in harmo and "+0.200 (t +14.1)" in harmo and "| 1 (2) | 2 |" in harmo
    assert json.loads((report / "tradeoff_tuned.json").read_text())["scale_check"]["picks"]["fineclip"]["index"] == 0


def test_smoke_sweep_end_to_end(tmp_path):
    """Pretraining, GC-only, one configuration per method, the selected one's second seed: every run evaluated on
    val and test; a result without its test metrics is evaluated again (no training); shards wait for shard 0."""
    work, report = tmp_path / "w", tmp_path / "r"
    cmd = [sys.executable, "benchmarks/tradeoff_tuned.py", "--smoke", "--configs", "1", "--seeds", "2", "--only",
           "clipself", "--workdir", str(work), "--report_dir", str(report)]
    early = warm_python.run([*cmd, "--shard", "1/2"], cwd=ROOT, env=subprocess_env(), timeout=120)
    assert early.returncode != 0 and "run shard 0 first" in early.stderr
    early = warm_python.run([*cmd, "--scale_check"], cwd=ROOT, env=subprocess_env(), timeout=120)
    assert early.returncode != 0 and "run the command without --scale_check first" in early.stderr
    proc = warm_python.run(cmd, cwd=ROOT, env=subprocess_env(), timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "selected seeds 1/1: clipself/cfg0 seed 1" in proc.stderr
    for run in ("pretrained", "clip/seed0", "clip/seed1", "clipself/cfg0/seed0", "clipself/cfg0/seed1"):
        metrics = json.loads((work / "runs" / run / "result.json").read_text())["metrics"]
        for name in ("box_top1", "box_top1_novel", "t2i_r1", "i2t_r1", "seg_miou"):
            assert 0 <= metrics[name] <= 1 and 0 <= metrics[f"{name}_test"] <= 1, (run, name)
        assert any(metrics[k] != metrics[f"{k}_test"] for k in ("box_top1", "t2i_r1", "seg_miou")), run
    data = json.loads((report / "tradeoff_tuned.json").read_text())
    assert data["selections"] == {"clipself": {"balanced": 0, "region_first": 0, "retrieval_first": 0}}
    assert data["spaces"]["clipself"]["configurations"][0]["seeds"] == [0, 1]
    # A finished run whose result lacks the test metrics (say, from before they existed) is evaluated again.
    path = work / "runs" / "clip" / "seed1" / "result.json"
    result = json.loads(path.read_text())
    path.write_text(json.dumps({**result, "metrics": {k: v for k, v in result["metrics"].items()
                                                      if not k.endswith("_test")}}))
    again = warm_python.run(cmd, cwd=ROOT, env=subprocess_env(), timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "sweep 1/1: clip seed 1" in again.stderr and again.stderr.count("[tradeoff_tuned] ") == 3
    assert json.loads(path.read_text())["metrics"] == result["metrics"]  # the same checkpoint, evaluated again
