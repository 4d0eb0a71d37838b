"""The trade-off study with an equal tuning budget per method: is there a HarmoCLIP without the trade-off?

Protocol (declared before any result; `--print_space` writes it, docs/tradeoff_tuned_space.md holds it):
  1. The setting is the study's (benchmarks/tradeoff.py: same dataset, model, steps and schedule): one GC-only
     pretraining shared by every run of the sweep (its own: XLA:CPU's numerics differ between CPU kinds, so another
     machine's pretraining is not bit-identical), and GC-only training continued for 3 seeds as the reference.
  2. Each swept method (HarmoCLIP with lexeme-level LRC, HarmoCLIP with token-level LRC, FineCLIP, CLIPSelf) gets
     the same budget: `--configs` configurations (default 8), one seed (0). Configuration 0 is the method's default
     (the study's row); the others are drawn without repetition, uniformly, from the method's declared space (loss
     weights, temperatures, variants, learning rate, which parameters train) by a generator seeded with the
     method's name, so the draws are the same on every machine and do not depend on any result.
  3. Every run is evaluated on the held-out `val` split (selection) and the `test` split (report); the selection
     reads `val` only. Objectives (each picks one configuration per method):
       balanced (the headline)  max val novel-class box top-1 subject to val mean R@1 >= GC-only's (mean of its
                                seeds); if no configuration meets the bound, the one closest to it (highest R@1)
       region-first             max val novel-class box top-1
       retrieval-first          max val mean R@1 subject to val novel top-1 >= GC-only's + 0.05 (if none meets
                                it, the highest novel top-1)
  4. Each selected configuration runs seeds 1 and 2 as well; the table reports its 3 seeds on `test`, with Welch's
     t against GC-only and against the balanced FineCLIP.
  5. `--scale_check` (after the sweep): each method's balanced pick and GC-only again on `scenes/ov` (5x the images,
     128 px) with ViT-S/8, from their own GC pretraining, 2 seeds: does the ranking hold? (GPU-sized: ~24x the
     FLOPs per image.)

Every run is an ordinary trainer run in `<workdir>/runs/...` with its own checkpoints, resumable like the study's;
`--shard k/n` splits the sweep over n processes (shard 0 pretrains first; the selected configurations' extra seeds
start once every configuration has its val result).

    python benchmarks/tradeoff_tuned.py                      # ~4-5 h on 2 CPU cores (3-5 min a run); resumable
    python benchmarks/tradeoff_tuned.py --shard 0/2 & python benchmarks/tradeoff_tuned.py --shard 1/2
    python benchmarks/tradeoff_tuned.py --report_only        # redraw docs/tradeoff_tuned.{md,json,png}
    python benchmarks/tradeoff_tuned.py --print_space        # the declared search spaces, as markdown

Outputs: `<report_dir>/tradeoff_tuned.{md,json,png}` and one JSON line per selected configuration and metric on
stdout (the benchmark format; reference: GC-only).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))

import tradeoff  # noqa: E402
from tradeoff import format_cell as cell, format_delta as delta  # noqa: E402
from harmoclip_jax import cli  # noqa: E402
from harmoclip_jax.testing.machine import cpu_description  # noqa: E402

SPLITS = ("val", "test")
METRIC_KEYS = tradeoff.split_metrics(SPLITS)
REFERENCE = "clip"  # GC-only, continued: tradeoff.RUNS' first run
WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)

# ------------------------------------------------------------------------------------------------ spaces


@dataclasses.dataclass(frozen=True)
class Space:
    """One method's search space. `choices`: dotted config key -> values, the first being the method's default
    (configuration 0). `fixed`: overrides every configuration shares. Keys under `loss.` set config.loss fields;
    `train` picks the trained parameters (see `TRAIN_CHOICES`); the rest set the run's config."""

    name: str
    label: str
    method: str
    choices: dict
    fixed: dict = dataclasses.field(default_factory=dict)

    def size(self) -> int:
        return int(np.prod([len(v) for v in self.choices.values()]))


# Which image-tower parameters train (the text tower is frozen unless a space fixes it trainable).
TRAIN_CHOICES = {
    "all": "the whole image tower",
    "late": "the image tower's second half (patch/position embeddings, pre-LN and the first half of the blocks "
            "frozen)",
}

# HarmoCLIP's knobs, shared by both LRC readings (the key order fixes the draws).
_LRC_GR = {"loss.weights.lrc": (1.0, *[w for w in WEIGHTS if w != 1.0]), "loss.weights.gr": (1.0, 0.0, 0.5, 2.0),
           "loss.gr_variant": ("a", "b", "c")}
_LRC_TEMPERATURES = (0.0, 0.01, 0.03, 0.07)
_OPTIMISATION = {"optim.lr": (1e-4, 3e-5, 3e-4), "train": ("all", "late")}

SPACES = (
    Space("harmoclip", "HarmoCLIP (GC + lexeme LRC + GR)", "harmoclip", {
        **_LRC_GR, "loss.lrc_negatives": ("batch", "vocab"), "loss.lrc_temperature": _LRC_TEMPERATURES,
        **_OPTIMISATION}),
    Space("harmoclip_tokens", "HarmoCLIP, token-level LRC (text tower trains)", "harmoclip", {
        **_LRC_GR, "loss.lrc_token_source": ("region_caption", "caption"), "loss.lrc_temperature": _LRC_TEMPERATURES,
        **_OPTIMISATION}, fixed={"loss.lrc_text": "tokens", "optim.freeze_text_tower": False}),
    Space("fineclip", "FineCLIP (GC + SD + RC)", "fineclip", {
        "loss.weights.sd": (1.0, *[w for w in WEIGHTS if w != 1.0]),
        "loss.weights.rc": (1.0, *[w for w in WEIGHTS if w != 1.0]),
        "loss.sd_target": ("student", "teacher"),
        "loss.sd_stop_grad": (False, True),
        "optim.lr": (1e-4, 3e-5, 3e-4),
        "train": ("all", "late"),
    }),
    # One loss term: its weight acts only through gradient clipping, so the knobs are the optimisation's.
    Space("clipself", "CLIPSelf (SD to teacher crops)", "clipself", {
        "optim.lr": (1e-4, 1e-5, 3e-5, 3e-4),
        "train": ("all", "late"),
        "loss.sd_target": ("teacher", "student"),
        "optim.warmup_steps": (15, 50),
    }),
)
SPACE_NAMES = tuple(s.name for s in SPACES)
SPACE_BY_NAME = {s.name: s for s in SPACES}


def draw_configurations(space: Space, count: int) -> list[dict]:
    """`count` distinct configurations of `space`: its default first, then uniform draws without repetition from a
    generator seeded with the space's name (stable across machines and Python runs; independent of results)."""
    keys = list(space.choices)
    grid = list(itertools.product(*(space.choices[k] for k in keys)))
    if count > len(grid):
        raise cli.UsageError(f"--configs={count}: the {space.name} space has only {len(grid)} configurations")
    seed = int.from_bytes(hashlib.sha256(space.name.encode()).digest()[:8], "little")
    order = np.random.default_rng(seed).permutation(np.arange(1, len(grid)))
    picks = [grid[0], *(grid[i] for i in order[:count - 1])]
    return [dict(zip(keys, values)) for values in picks]


def frozen_regex(layers: int) -> str:
    """optim.freeze regex of the `late` choice: everything of the image tower before its block layers // 2."""
    blocks = "|".join(str(i) for i in range(layers // 2))
    return f"visual/(class_embedding|positional_embedding|patch_embed|ln_pre/.*|transformer/blocks/({blocks})/.*)"


def as_run(space: Space, index: int, overrides: dict, study: tradeoff.Study) -> tradeoff.Run:
    """The study's Run for configuration `index` of `space` (loss fields vs other config fields split)."""
    from harmoclip_jax.models.variants import get_config

    merged = {**space.fixed, **overrides}
    loss = {k.removeprefix("loss."): v for k, v in merged.items() if k.startswith("loss.")}
    config = {k: v for k, v in merged.items() if not k.startswith("loss.") and k != "train"}
    if merged.get("train", "all") == "late":
        config["optim.freeze"] = (frozen_regex(get_config(study.variant).vision.layers),)
    return tradeoff.Run(config_name(space, index), f"{space.label}, configuration {index}", space.method, loss,
                        "sweep", config)


def config_name(space: Space, index: int) -> str:
    return f"{space.name}/cfg{index}"


# ------------------------------------------------------------------------------------------------ selection

OBJECTIVES = {
    "balanced": "max val novel box top-1 s.t. val mean R@1 >= GC-only's (else the highest R@1)",
    "region_first": "max val novel box top-1",
    "retrieval_first": "max val mean R@1 s.t. val novel box top-1 >= GC-only's + 0.05 (else the highest novel)",
}
NOVEL_MARGIN = 0.05


def _novel(metrics: dict, split: str = "val") -> float:
    suffix = tradeoff.split_suffix(split)
    return metrics.get(f"box_top1_novel{suffix}", metrics[f"box_top1{suffix}"])


def _r1(metrics: dict, split: str = "val") -> float:
    suffix = tradeoff.split_suffix(split)
    return (metrics[f"t2i_r1{suffix}"] + metrics[f"i2t_r1{suffix}"]) / 2


def select(configs: list[dict], reference: dict) -> dict:
    """{objective: index} over `configs` (each {"index", "val": metrics}) given the GC-only `reference` val
    metrics (means over its seeds). Reads val only."""
    bound_r1, bound_novel = _r1(reference), _novel(reference) + NOVEL_MARGIN

    def best(candidates, key):
        return max(candidates, key=key)["index"]

    meets_r1 = [c for c in configs if _r1(c["val"]) >= bound_r1]
    meets_novel = [c for c in configs if _novel(c["val"]) >= bound_novel]
    return {
        "balanced": best(meets_r1, lambda c: _novel(c["val"])) if meets_r1 else best(configs, lambda c: _r1(c["val"])),
        "region_first": best(configs, lambda c: _novel(c["val"])),
        "retrieval_first": (best(meets_novel, lambda c: _r1(c["val"])) if meets_novel
                            else best(configs, lambda c: _novel(c["val"]))),
    }


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better), by increasing x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any((a >= x and b >= y) and (a > x or b > y) for a, b in points)]
    return sorted(front, key=lambda i: points[i])


# ------------------------------------------------------------------------------------------------ running


def _result(workdir: pathlib.Path, name: str, seed: int) -> dict | None:
    """A run's result, if it has finished with both splits' metrics."""
    path = tradeoff.result_path(tradeoff.run_directory(workdir, name, seed))
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if tradeoff.has_metrics(result, METRIC_KEYS) else None


def _config_for(study: tradeoff.Study, workdir: pathlib.Path, name: str, seed: int, configurations: dict):
    init = tradeoff.run_directory(workdir, tradeoff.PRETRAINED) / "params"
    if name == tradeoff.PRETRAINED:
        return tradeoff.pretrain_config(study)
    if name == REFERENCE:
        return tradeoff.finetune_config(study, tradeoff.RUNS[0], seed, init)
    space_name, index = name.split("/cfg")
    run = as_run(SPACE_BY_NAME[space_name], int(index), configurations[space_name][int(index)], study)
    return tradeoff.finetune_config(study, run, seed, init)


def sweep_runs(configurations: dict, seeds: tuple[int, ...]) -> list[tuple[str, int]]:
    """Phase 1: the pretraining, GC-only's seeds, every configuration at seed 0."""
    runs = [(tradeoff.PRETRAINED, 0)] + [(REFERENCE, s) for s in seeds]
    for space_name, configs in configurations.items():
        runs += [(config_name(SPACE_BY_NAME[space_name], i), 0) for i in range(len(configs))]
    return runs


def selections(workdir: pathlib.Path, configurations: dict, seeds: tuple[int, ...]) -> dict | None:
    """{space: {objective: index}} once GC-only and every configuration have their results, else None."""
    reference = [_result(workdir, REFERENCE, s) for s in seeds]
    if any(r is None for r in reference):
        return None
    ref = {k: float(np.mean([r["metrics"][k] for r in reference])) for k in reference[0]["metrics"]}
    out = {}
    for space_name, configs in configurations.items():
        space = SPACE_BY_NAME[space_name]
        results = [_result(workdir, config_name(space, i), 0) for i in range(len(configs))]
        if any(r is None for r in results):
            return None
        out[space_name] = select([{"index": i, "val": r["metrics"]} for i, r in enumerate(results)], ref)
    return out


def final_runs(chosen: dict, seeds: tuple[int, ...]) -> list[tuple[str, int]]:
    """Phase 2: the selected configurations' other seeds (each configuration once, whatever objectives chose it)."""
    runs = []
    for space_name, picks in chosen.items():
        space = SPACE_BY_NAME[space_name]
        for index in sorted(set(picks.values())):
            runs += [(config_name(space, index), s) for s in seeds if s != 0]  # seed 0: the sweep's run
    return runs


def _run_each(study: tradeoff.Study, workdir: pathlib.Path, configurations: dict, todo: list[tuple[str, int]],
              phase: str, shard: tuple[int, int], clock: dict) -> None:
    """Trains+evaluates this shard's share of `todo` (the pretraining: shard 0's alone) that has no result yet."""
    k, n = shard
    mine = [(name, seed) for i, (name, seed) in enumerate(todo)
            if (k == 0 if name == tradeoff.PRETRAINED else i % n == k)]
    left = [r for r in mine if _result(workdir, *r) is None]
    for index, (name, seed) in enumerate(left):
        if name != tradeoff.PRETRAINED and _result(workdir, tradeoff.PRETRAINED, 0) is None:
            raise cli.Error(f"the shared pretraining in {workdir} has not finished: run shard 0 first (it "
                            "pretrains), then the other shards")
        elapsed = time.perf_counter() - clock["start"]
        eta = f", ~{elapsed / clock['done'] * (len(left) - index) / 60:.0f} min left in this phase" \
            if clock["done"] else ""
        print(f"[tradeoff_tuned] {phase} {index + 1}/{len(left)}: {name} seed {seed} ({elapsed / 60:.1f} min so "
              f"far{eta})", file=sys.stderr, flush=True)
        tradeoff.run_one(_config_for(study, workdir, name, seed, configurations),
                         tradeoff.run_directory(workdir, name, seed), METRIC_KEYS)
        clock["done"] += 1


def run_all(study: tradeoff.Study, workdir: pathlib.Path, configurations: dict, shard: tuple[int, int]) -> bool:
    """Runs this shard's share of both phases; True when everything (every shard's share) has finished."""
    tradeoff.use_compilation_cache(workdir)
    clock = {"start": time.perf_counter(), "done": 0}
    phase1 = sweep_runs(configurations, study.seeds)
    _run_each(study, workdir, configurations, phase1[:1], "pretraining", shard, clock)
    _run_each(study, workdir, configurations, phase1[1:], "sweep", shard, clock)
    chosen = selections(workdir, configurations, study.seeds)
    if chosen is None:
        print("[tradeoff_tuned] other shards' sweep runs are still running: rerun this command once they finish to "
              "start the selected configurations' seeds", file=sys.stderr, flush=True)
        return False
    finals = final_runs(chosen, study.seeds)
    _run_each(study, workdir, configurations, finals, "selected seeds", shard, clock)
    finished = all(_result(workdir, *r) is not None for r in finals)
    print(f"[tradeoff_tuned] this shard is done ({(time.perf_counter() - clock['start']) / 60:.1f} min this time)"
          + ("" if finished else "; other shards are still running"), file=sys.stderr, flush=True)
    return finished


# The scale check: each method's balanced pick (and GC-only) again on 5x the images at twice the resolution with a
# wider, deeper model, from its own GC pretraining, to see whether the ranking holds.
SCALE_DATASET, SCALE_VARIANT, SCALE_IMAGE_SIZE, SCALE_SEEDS = "scenes/ov", "ViT-S/8@64", 128, (0, 1)
SCALE_DIR = "scale_check"


def scale_study(study: tradeoff.Study) -> tradeoff.Study:
    """The scale check's study (`--smoke`: the smoke study itself, which checks the plumbing only)."""
    if study.variant == "test-tiny":
        return dataclasses.replace(study, seeds=SCALE_SEEDS)
    return dataclasses.replace(study, dataset=SCALE_DATASET, variant=SCALE_VARIANT, image_size=SCALE_IMAGE_SIZE,
                               seeds=SCALE_SEEDS)


def scale_runs(chosen: dict) -> list[tuple[str, int]]:
    runs = [(tradeoff.PRETRAINED, 0)] + [(REFERENCE, s) for s in SCALE_SEEDS]
    for space_name, picks in chosen.items():
        space = SPACE_BY_NAME[space_name]
        runs += [(config_name(space, picks["balanced"]), s) for s in SCALE_SEEDS]
    return runs


def run_scale_check(study: tradeoff.Study, workdir: pathlib.Path, configurations: dict,
                    shard: tuple[int, int]) -> None:
    chosen = selections(workdir, configurations, study.seeds)
    if chosen is None:
        raise cli.Error(f"--scale_check reruns the sweep's selections, and the sweep in {workdir} has not finished: "
                        "run the command without --scale_check first")
    scale, scale_dir = scale_study(study), workdir / SCALE_DIR
    tradeoff.stamp_workdir(scale_dir, scale)
    tradeoff.use_compilation_cache(scale_dir)
    clock = {"start": time.perf_counter(), "done": 0}
    todo = scale_runs(chosen)
    _run_each(scale, scale_dir, configurations, todo[:1], "scale-check pretraining", shard, clock)
    _run_each(scale, scale_dir, configurations, todo[1:], "scale check", shard, clock)


# ------------------------------------------------------------------------------------------------ report


def _summary(results: list[dict]) -> dict:
    """{"seeds", "per_seed": {metric: [...]}, "mean", "std"} with mean R@1 per split added."""
    per_seed = {m: [r["metrics"][m] for r in results] for m in results[0]["metrics"]}
    for split in SPLITS:
        per_seed[f"r1_mean{tradeoff.split_suffix(split)}"] = [_r1(r["metrics"], split) for r in results]
    return {"seeds": [r["seed"] for r in results], "per_seed": per_seed,
            "mean": {m: float(np.mean(v)) for m, v in per_seed.items()},
            "std": {m: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for m, v in per_seed.items()}}


def collect(workdir: pathlib.Path, configurations: dict, seeds: tuple[int, ...]) -> dict:
    """Everything finished so far: the pretrained start, GC-only, every configuration (its overrides and per-seed
    val and test metrics) and, once the sweep is complete, each method's selections."""
    out = {"pretrained": None, "reference": None, "spaces": {},
           "selections": selections(workdir, configurations, seeds)}
    start = _result(workdir, tradeoff.PRETRAINED, 0)
    out["pretrained"] = _summary([start]) if start else None
    reference = [r for s in seeds if (r := _result(workdir, REFERENCE, s))]
    out["reference"] = _summary(reference) if reference else None
    for space_name, configs in configurations.items():
        space = SPACE_BY_NAME[space_name]
        rows = []
        for i, overrides in enumerate(configs):
            results = [r for s in seeds if (r := _result(workdir, config_name(space, i), s))]
            rows.append({"index": i, "overrides": overrides, **(_summary(results) if results else {"seeds": []})})
        out["spaces"][space_name] = {"label": space.label, "method": space.method, "fixed": space.fixed,
                                     "configurations": rows}
    out["scale_check"] = collect_scale_check(workdir, out["selections"])
    return out


def collect_scale_check(workdir: pathlib.Path, chosen: dict | None) -> dict | None:
    """The scale check's finished runs: its study, GC-only and each method's balanced pick (None before it ran)."""
    scale_dir = workdir / SCALE_DIR
    if chosen is None or not (scale_dir / "study.json").exists():
        return None
    reference = [r for s in SCALE_SEEDS if (r := _result(scale_dir, REFERENCE, s))]
    picks = {}
    for space_name, pick in chosen.items():
        space = SPACE_BY_NAME[space_name]
        results = [r for s in SCALE_SEEDS if (r := _result(scale_dir, config_name(space, pick["balanced"]), s))]
        if results:
            picks[space_name] = {"index": pick["balanced"], **_summary(results)}
    return {"study": json.loads((scale_dir / "study.json").read_text()),
            "reference": _summary(reference) if reference else None, "picks": picks}


def _describe_overrides(overrides: dict) -> str:
    return ", ".join(f"{k.removeprefix('loss.').removeprefix('optim.')}={v:g}" if isinstance(v, float) else
                     f"{k.removeprefix('loss.').removeprefix('optim.')}={v}" for k, v in overrides.items())


def space_markdown(count: int) -> str:
    """The declared spaces and objectives, as markdown (written before any result)."""
    lines = ["<!-- regenerate: python benchmarks/tradeoff_tuned.py --print_space > docs/tradeoff_tuned_space.md -->",
             "# The tuned trade-off study: search spaces and objectives, declared before the results", "",
             "The protocol is `benchmarks/tradeoff_tuned.py`'s docstring; results: [tradeoff_tuned.md]"
             "(tradeoff_tuned.md). Every method gets the same budget: "
             f"{count} configurations, one seed (0), on `val`.", "",
             "Each method: configuration 0 is its default; the other draws are uniform without repetition from:", ""]
    for space in SPACES:
        fixed = f"; fixed: {_describe_overrides(space.fixed)}" if space.fixed else ""
        lines.append(f"- **{space.label}** (`{space.name}`, method `{space.method}`; {space.size()} "
                     f"configurations{fixed}):")
        for key, values in space.choices.items():
            shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
            lines.append(f"  - `{key}`: {shown}")
        lines.append(f"  - drawn ({count}): " + "; ".join(
            f"{i}: {_describe_overrides(c)}" for i, c in enumerate(draw_configurations(space, count))))
    lines += ["", "`train`: " + "; ".join(f"`{k}` = {v}" for k, v in TRAIN_CHOICES.items()) + ". "
              "`lrc_temperature` 0 = LRC shares the learnable `logit_scale`; T > 0 fixes LRC's temperature.", "",
              "Objectives (selection on `val`, one seed; the selected configuration then runs 3 seeds, reported on "
              "`test`):", ""]
    lines += [f"- `{name}`: {text}" for name, text in OBJECTIVES.items()]
    return "\n".join(lines) + "\n"


SUMMARY_COLUMNS = (("novel", "box_top1_novel_test"), ("base", "box_top1_base_test"), ("all", "box_top1_test"),
                   ("mean R@1", "r1_mean_test"), ("seg mIoU", "seg_miou_test"))


def markdown_report(data: dict, study: tradeoff.Study, count: int) -> str:
    lines = [f"`{study.dataset}`, {study.variant}, batch {study.batch_size}, {study.finetune_steps} fine-tuning steps "
             f"from a GC-only pretraining of {study.pretrain_steps} steps (as in [tradeoff.md](tradeoff.md)). "
             f"{count} configurations per method at seed 0, selected on `val`; the selected configurations at seeds "
             f"{', '.join(map(str, study.seeds))}, reported on `test` (mean ± sample std; Welch's t).", ""]
    reference, chosen = data["reference"], data["selections"]
    if chosen is None:
        done = sum(len(c["seeds"]) > 0 for s in data["spaces"].values() for c in s["configurations"])
        total = sum(len(s["configurations"]) for s in data["spaces"].values())
        lines.append(f"**The sweep is not complete** ({done} of {total} configurations finished): no selection yet.")
    else:
        fine = None
        for objective, text in OBJECTIVES.items():
            heads = [f"box top-1 {t}" if t in ("novel", "base", "all") else t for t, _ in SUMMARY_COLUMNS]
            lines += [f"### {objective.replace('_', '-')}: {text}", "",
                      "| method | configuration | val novel | val mean R@1 | " + " | ".join(f"test {h}" for h in heads)
                      + " | Δ novel vs GC-only | Δ R@1 vs GC-only | Δ novel vs FineCLIP | Δ R@1 vs FineCLIP | seeds |",
                      "| --- |" + " --- |" * (len(heads) + 8)]
            rows = [("GC-only (continued)", "default", reference)]
            for space_name, picks in chosen.items():
                space = data["spaces"][space_name]
                row = space["configurations"][picks[objective]]
                rows.append((space["label"], f"{picks[objective]}: {_describe_overrides(row['overrides'])}", row))
            fine = next(r for label, _, r in rows if label.startswith("FineCLIP")) if "fineclip" in chosen else None
            for label, described, row in rows:
                cells = [cell(row, m) for m in ("box_top1_novel", "r1_mean", *(m for _, m in SUMMARY_COLUMNS))]
                cells += [delta(row, base, m) for base in (reference, fine)
                          for m in ("box_top1_novel_test", "r1_mean_test")]
                lines.append(f"| {label} | {described} | " + " | ".join(cells) + f" | {len(row['seeds'])} |")
            lines.append("")
    scale = data.get("scale_check")
    if scale:
        described = scale["study"]
        lines += [f"### Scale check: `{described['dataset']}`, {described['variant']} at {described['image_size']} px, "
                  f"seeds {', '.join(map(str, SCALE_SEEDS))}, test split", "",
                  "Each method's balanced pick and GC-only, from their own GC pretraining at this scale; rank: by "
                  "test novel box top-1 here (and in the main sweep's 3-seed table).", "",
                  "| method | configuration | test novel | test mean R@1 | test seg mIoU | Δ novel vs GC-only | "
                  "Δ R@1 vs GC-only | rank (main) | seeds |", "| --- |" + " --- |" * 8]
        main_novel = {n: data["spaces"][n]["configurations"][p["balanced"]]["mean"].get("box_top1_novel_test", 0.0)
                      for n, p in (data["selections"] or {}).items()}
        here = {n: row["mean"]["box_top1_novel_test"] for n, row in scale["picks"].items()}
        rank = lambda values, n: sorted(values, key=values.get, reverse=True).index(n) + 1  # noqa: E731
        ref, shown = scale["reference"], ("box_top1_novel_test", "r1_mean_test", "seg_miou_test")
        if ref:
            lines.append("| GC-only (continued) | default | " + " | ".join(cell(ref, m) for m in shown)
                         + f" |  |  |  | {len(ref['seeds'])} |")
        for name, row in scale["picks"].items():
            lines.append(f"| {data['spaces'][name]['label']} | {row['index']} | "
                         + " | ".join([*(cell(row, m) for m in shown), *(delta(row, ref, m) for m in shown[:2])])
                         + f" | {rank(here, name)} ({rank(main_novel, name)}) | {len(row['seeds'])} |")
        lines.append("")
    lines += ["### Every configuration (seed 0; val selects, test reports)", "",
              "| method | # | configuration | val novel | val mean R@1 | test novel | test mean R@1 | test seg mIoU |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for space in data["spaces"].values():
        for row in space["configurations"]:
            seed0 = lambda m: (f"{row['per_seed'][m][row['seeds'].index(0)]:.3f}"  # noqa: E731
                               if 0 in row["seeds"] and m in row["per_seed"] else "–")
            lines.append(f"| {space['label']} | {row['index']} | {_describe_overrides(row['overrides'])} | "
                         f"{seed0('box_top1_novel')} | {seed0('r1_mean')} | {seed0('box_top1_novel_test')} | "
                         f"{seed0('r1_mean_test')} | {seed0('seg_miou_test')} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: pathlib.Path, title: str) -> None:
    """Left: test novel box top-1 vs test mean R@1, every configuration (seed 0) a dot, each method's Pareto front
    a line, the balanced selections (3 seeds) with error bars, GC-only as the reference lines. Right: seg mIoU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 6))
    colors = dict(zip(data["spaces"], plt.get_cmap("tab10").colors))
    for ax, y_metric, y_label in ((axes[0], "r1_mean_test", "retrieval R@1 (mean of both directions), test"),
                                  (axes[1], "seg_miou_test", "zero-shot segmentation mIoU, test")):
        for space_name, space in data["spaces"].items():
            rows = [r for r in space["configurations"] if 0 in r["seeds"]]
            points = [(r["per_seed"]["box_top1_novel_test"][r["seeds"].index(0)],
                       r["per_seed"][y_metric][r["seeds"].index(0)]) for r in rows]
            if not points:
                continue
            ax.scatter(*zip(*points), s=22, alpha=0.6, color=colors[space_name], label=space["label"])
            front = [points[i] for i in pareto_front(points)]
            ax.plot(*zip(*front), color=colors[space_name], alpha=0.8, lw=1.2)
            if data["selections"]:
                row = space["configurations"][data["selections"][space_name]["balanced"]]
                ax.errorbar(row["mean"]["box_top1_novel_test"], row["mean"][y_metric],
                            xerr=row["std"]["box_top1_novel_test"], yerr=row["std"][y_metric], fmt="*", ms=15,
                            color=colors[space_name], mec="black", capsize=3)
        for name, marker in (("reference", "o"), ("pretrained", "P")):
            row = data[name]
            if row and y_metric in row["mean"]:
                ax.errorbar(row["mean"]["box_top1_novel_test"], row["mean"][y_metric],
                            xerr=row["std"]["box_top1_novel_test"], yerr=row["std"][y_metric], fmt=marker, ms=9,
                            color="black", capsize=3,
                            label=f"GC-only, continued ({len(row['seeds'])} seeds)" if name == "reference"
                            else "pretrained CLIP")
        if data["reference"] and y_metric in data["reference"]["mean"]:
            ax.axhline(data["reference"]["mean"][y_metric], color="black", ls=":", lw=1)
        ax.set_xlabel("box classification top-1, novel classes (per-class mean), test")
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    seeds = len(data["reference"]["seeds"]) if data["reference"] else 0
    axes[0].set_title(f"every configuration (seed 0); lines: Pareto fronts; stars: balanced picks, {seeds} seeds")
    axes[1].set_title("dense quality")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(data: dict, study: tradeoff.Study, count: int, report_dir: pathlib.Path, command: str) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "tradeoff_tuned.md").write_text(f"<!-- regenerate: {command} -->\n"
                                                  + markdown_report(data, study, count))
    (report_dir / "tradeoff_tuned.json").write_text(json.dumps(
        {"study": dataclasses.asdict(study), "configs_per_method": count, "objectives": OBJECTIVES,
         "spaces": {s.name: {"label": s.label, "method": s.method, "choices": s.choices, "fixed": s.fixed}
                    for s in SPACES if s.name in data["spaces"]},
         "command": command, "date": time.strftime("%Y-%m-%d"), **data}, indent=1))
    plot(data, report_dir / "tradeoff_tuned.png", f"{study.dataset}, {study.variant}: {count} configurations per "
         f"method, selected on val, reported on test")
    if data["selections"] and data["reference"]:
        for space_name, picks in data["selections"].items():
            row = data["spaces"][space_name]["configurations"][picks["balanced"]]
            for metric in ("box_top1_novel_test", "r1_mean_test", "seg_miou_test"):
                ref = data["reference"]["mean"][metric]
                print(json.dumps({"bench": "tradeoff_tuned", "cpu": cpu_description(),
                                  "case": {"method": space_name, "objective": "balanced", "configuration":
                                           picks["balanced"], "metric": metric, "seeds": row["seeds"]},
                                  "unit": metric, "ours": round(row["mean"][metric], 4),
                                  "reference": round(ref, 4), "reference_name": "clip (GC only, same steps)",
                                  "speedup": round(row["mean"][metric] / ref, 3) if ref else None}), flush=True)


# ------------------------------------------------------------------------------------------------ main


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not k/n (e.g. 0/2)") from None
    if not (n >= 1 and 0 <= k < n):
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= k < n")
    return k, n


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "tradeoff_tuned"), help="runs and checkpoints")
    parser.add_argument("--report_dir", default=str(ROOT / "docs"), help="where tradeoff_tuned.{md,json,png} go")
    parser.add_argument("--configs", type=int, default=8, help="configurations per method (the equal budget)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of GC-only and of each selected configuration")
    parser.add_argument("--only", default="", help=f"comma-separated methods (default all): {','.join(SPACE_NAMES)}")
    parser.add_argument("--shard", type=_shard, default=(0, 1), help="k/n: this process's share of the runs")
    parser.add_argument("--data_dir", default=None,
                        help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    parser.add_argument("--report_only", action="store_true", help="only redraw the report from finished runs")
    parser.add_argument("--scale_check", action="store_true",
                        help=f"rerun each method's balanced pick on {SCALE_DATASET} with {SCALE_VARIANT} at "
                             f"{SCALE_IMAGE_SIZE} px, {len(SCALE_SEEDS)} seeds (after the sweep; GPU-sized work)")
    parser.add_argument("--print_space", action="store_true", help="print the declared search spaces and exit")
    parser.add_argument("--smoke", action="store_true", help="tiny model/dataset, 2 steps: checks the plumbing")
    parser.add_argument("--verbose", action="store_true", help=cli.VERBOSE_HELP)
    args = parser.parse_args(argv)

    if args.configs < 1 or args.seeds < 1:
        parser.error(f"--configs={args.configs} and --seeds={args.seeds} must be at least 1")
    names = tuple(n.strip() for n in args.only.split(",") if n.strip()) or SPACE_NAMES
    unknown = [n for n in names if n not in SPACE_NAMES]
    if unknown:
        parser.error(f"--only: unknown methods {unknown}; choose from {', '.join(SPACE_NAMES)}")
    if args.print_space:
        print(space_markdown(args.configs), end="")
        return 0
    study = tradeoff.Study.smoke(1, args.data_dir) if args.smoke else tradeoff.Study(data_dir=args.data_dir)
    study = dataclasses.replace(study, seeds=tuple(range(args.seeds)), eval_splits=SPLITS)
    configurations = {s.name: draw_configurations(s, args.configs) for s in SPACES if s.name in names}
    workdir = pathlib.Path(args.workdir).absolute()
    tradeoff.stamp_workdir(workdir, study)
    if args.scale_check and not args.report_only:
        run_scale_check(study, workdir, configurations, args.shard)
    elif not args.report_only:
        run_all(study, workdir, configurations, args.shard)
    data = collect(workdir, configurations, study.seeds)
    if data["pretrained"] is None and data["reference"] is None:
        raise cli.Error(f"no finished runs in {workdir}; run without --report_only first")
    options = [f"--configs {args.configs}" if args.configs != 8 else "",
               f"--seeds {args.seeds}" if args.seeds != 3 else "", f"--only {args.only}" if args.only else "",
               "--smoke" if args.smoke else ""]
    command = " ".join(["python benchmarks/tradeoff_tuned.py", *filter(None, options)])
    write_report(data, study, args.configs, pathlib.Path(args.report_dir), command)
    print(f"[tradeoff_tuned] report: {pathlib.Path(args.report_dir) / 'tradeoff_tuned.md'} (+ .png, .json)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
