"""The global-local trade-off study: does region training cost global retrieval, and does HarmoCLIP avoid it?

Protocol (the paper's, at CPU scale, on the embedded open-vocabulary scenes dataset `scenes/ov_small`: region
texts use synonyms, so a lexeme is not its class name, and a quarter of the classes have no region annotation in
training, the OV-COCO situation; docs/scenes.md):
  1. Pretrain a global-only CLIP (GC loss, both towers, from scratch): the "pretrained CLIP" every method starts
     from, as the paper's methods start from OpenAI/EVA CLIP.
  2. From that checkpoint, fine-tune every method (`clip` = GC only continued, `clipself`, `regionclip`,
     `fineclip`, `harmoclip` with GR-a/b/c) and the ablations of docs/method.md (GC+LRC, GC+GR, +FineCLIP's
     self-distillation, lexeme vocabulary negatives, token-level LRC) with the same steps, batch and schedule, text
     tower frozen (FineCLIP/CLIPSelf protocol; token-level LRC alone trains it, as it must), for each of several
     seeds (data order and shuffles).
  3. Evaluate on the held-out split: box classification top-1 on base, novel and all classes (per-class mean,
     class prompts through the text tower), retrieval R@1 both directions, zero-shot segmentation mIoU from the
     patch features; report mean and sample std over seeds, and Welch's t against GC-only and against FineCLIP,
     as a markdown table, a plot (x: novel-class box top-1, y: retrieval R@1; a panel of mIoU) and JSON.

Every run is an ordinary trainer run in `<workdir>/runs/<name>/seed<k>` with its own checkpoints, so a killed
study resumes where it stopped (finished runs are skipped; an interrupted run continues from its last checkpoint).

    python benchmarks/tradeoff.py                          # the default study (~2 h on 2 CPU cores)
    python benchmarks/tradeoff.py --scale 4 --seeds 5      # longer and stronger, for bigger machines
    python benchmarks/tradeoff.py --dataset scenes/ov --variant ViT-S/8@64 --scale 4   # more data, wider model
    python benchmarks/tradeoff.py --dataset scenes/small   # the first study's closed-vocabulary data
    python benchmarks/tradeoff.py --only clip,harmoclip    # a subset (the report covers what has finished)
    python benchmarks/tradeoff.py --report_only            # redraw table/plot/JSON from finished runs

Outputs: `<report_dir>/tradeoff.{md,json,png}` (default docs/, which the README shows) and one JSON line per
run on stdout: {"bench": "tradeoff", "case": {"run": ...}, "unit": ..., "ours": <run>, "reference": <clip>, ...}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from harmoclip_jax import cli, workdir as workdir_lib  # noqa: E402
from harmoclip_jax.testing.machine import cpu_description  # noqa: E402

# ------------------------------------------------------------------------------------------------ the study


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    label: str  # what the table and plot call it
    method: str
    loss: dict  # overrides of config.loss (dotted keys)
    group: str  # "method" or "ablation"
    config: dict = dataclasses.field(default_factory=dict)  # other overrides of the run's config (dotted keys)


RUNS = (
    Run("clip", "CLIP (GC only, continued)", "clip", {}, "method"),
    Run("clipself", "CLIPSelf (SD to teacher crops)", "clipself", {}, "method"),
    Run("regionclip", "RegionCLIP (concept loss)", "regionclip", {}, "method"),
    Run("fineclip", "FineCLIP (GC + SD + RC)", "fineclip", {}, "method"),
    Run("harmoclip", "HarmoCLIP (GC + LRC + GR-a)", "harmoclip", {}, "method"),
    Run("harmoclip_grb", "HarmoCLIP, GR-b (pooled regions - caption)", "harmoclip", {"gr_variant": "b"}, "method"),
    Run("harmoclip_grc", "HarmoCLIP, GR-c (region - own crop)", "harmoclip", {"gr_variant": "c"}, "method"),
    Run("gc_lrc", "GC + LRC", "harmoclip", {"weights.gr": 0.0}, "ablation"),
    Run("gc_gr", "GC + GR-a (= FineCLIP without SD)", "harmoclip", {"weights.lrc": 0.0}, "ablation"),
    Run("harmoclip_sd", "GC + LRC + GR-a + FineCLIP SD", "harmoclip", {"weights.sd": 1.0}, "ablation"),
    Run("harmoclip_vocab", "GC + LRC (vocabulary negatives) + GR-a", "harmoclip", {"lrc_negatives": "vocab"},
        "ablation"),
    # The "Text Token Space" reading: lexeme = pooled caption tokens. CLIP's causal text tower never trained its
    # non-EOT tokens into the joint space, so this run alone trains the text tower.
    Run("harmoclip_tokens", "GC + token-level LRC + GR-a (text tower trains)", "harmoclip", {"lrc_text": "tokens"},
        "ablation", {"optim.freeze_text_tower": False}),
)
RUN_NAMES = tuple(r.name for r in RUNS)
PRETRAINED = "pretrained"  # the shared starting point, evaluated as a row of its own

METRICS = {  # report name -> trainer metric
    "box_top1": "eval/boxcls/top1",
    "box_top1_base": "eval/boxcls/top1_base",
    "box_top1_novel": "eval/boxcls/top1_novel",
    "box_top5": "eval/boxcls/top5",
    "t2i_r1": "eval/retrieval/t2i_r1",
    "i2t_r1": "eval/retrieval/i2t_r1",
    "seg_miou": "eval/seg/miou",
}
# Only open-vocabulary datasets (metadata `is_novel`) have a base/novel split.
OPTIONAL_METRICS = ("box_top1_base", "box_top1_novel")


@dataclasses.dataclass(frozen=True)
class Study:
    dataset: str = "scenes/ov_small"
    variant: str = "ViT-Ti/8@64"
    image_size: int = 64
    batch_size: int = 64
    pretrain_steps: int = 600
    pretrain_lr: float = 1e-3
    finetune_steps: int = 150
    finetune_lr: float = 1e-4
    seeds: tuple[int, ...] = (0, 1, 2)
    data_dir: str | None = None
    # Held-out splits every run is evaluated on: "val" (the study's table) and, for the tuned sweep, "test" (never
    # seen by the selection; its metrics are `<name>_test`).
    eval_splits: tuple[str, ...] = ("val",)

    @classmethod
    def default(cls, scale: float = 1.0, num_seeds: int = 3, data_dir: str | None = None,
                dataset: str | None = None, variant: str | None = None) -> "Study":
        if scale <= 0 or num_seeds < 1:
            raise cli.UsageError(f"--scale={scale} must be positive and --seeds={num_seeds} at least 1")
        if dataset and not dataset.startswith("scenes/"):
            raise cli.UsageError(f"--dataset={dataset}: the study's configs (text lengths, classes) are made for the scenes "
                             "dataset (scenes/small, scenes/default); for COCO run configs/vitb16.py with each method=")
        base = cls()
        image_size = base.image_size
        if variant:
            from harmoclip_jax.models.variants import get_config

            image_size = get_config(variant).vision.image_size
        return dataclasses.replace(base, pretrain_steps=max(1, round(base.pretrain_steps * scale)),
                                   finetune_steps=max(1, round(base.finetune_steps * scale)),
                                   seeds=tuple(range(num_seeds)), data_dir=data_dir,
                                   dataset=dataset or base.dataset, variant=variant or base.variant,
                                   image_size=image_size)

    @classmethod
    def smoke(cls, num_seeds: int = 2, data_dir: str | None = None) -> "Study":
        """Seconds per run: the tiny model and dataset of the unit tests (checks the plumbing, not the science)."""
        return cls(dataset="scenes/ov_tiny", variant="test-tiny", batch_size=16, pretrain_steps=2, finetune_steps=2,
                   seeds=tuple(range(num_seeds)), data_dir=data_dir)

    def describe(self) -> str:
        return (f"`{self.dataset}` (train split; evaluated on the held-out `val` split), {self.variant}, batch "
                f"{self.batch_size}. Pretraining: GC only, both towers, from scratch, {self.pretrain_steps} steps, lr "
                f"{self.pretrain_lr:g} (seed 0). Each run: {self.finetune_steps} steps from that checkpoint, text tower "
                f"frozen, AdamW lr {self.finetune_lr:g} (cosine, {self.warmup(self.finetune_steps)} warmup steps), "
                f"seeds {', '.join(map(str, self.seeds))} (data order). Box top-1: per-class mean over the novel classes "
                f"(no region annotation in training), the base classes and all; mIoU: zero-shot segmentation from the "
                f"patch features, background pixels ignored. Cells: mean ± sample std over seeds; Δ columns: difference "
                f"of means from the GC-only run and from FineCLIP, with Welch's t (|t| < 2: within the seed noise).")

    @staticmethod
    def warmup(steps: int) -> int:
        return max(1, steps // 10)


def base_config(study: Study, method: str):
    from harmoclip_jax import config_lib

    c = config_lib.load_config(str(ROOT / "configs" / "demo.py") + (":smoke" if study.variant == "test-tiny" else ""))
    config_lib.set_method(c, method)
    c.model.variant = study.variant
    c.model.image_size = study.image_size
    c.data.dataset = study.dataset
    c.data.data_dir = study.data_dir
    c.batch_size = study.batch_size
    c.evals.seg = dict(type="segmentation", dataset=study.dataset, split="val")
    for ev in c.evals.values():
        ev.dataset = study.dataset
    for split in study.eval_splits:
        if split != "val":
            for name, ev in list(c.evals.items()):
                if ev.split == "val":
                    c.evals[f"{name}_{split}"] = dict(ev.to_dict(), split=split)
    c.region.distinct_lexemes = 0  # the demo's bound fits its 36 lexemes, not Scenes-OV's synonyms
    c.progress_bar = False
    c.plot = False
    c.eval_picture = False  # the study reads the metrics; a picture per eval would add compiles to every run
    c.checkpoint.keep = 1
    c.checkpoint.async_save = False
    return c


def pretrain_config(study: Study):
    c = base_config(study, "clip")
    c.seed = c.data.seed = 0
    c.total_steps = study.pretrain_steps
    c.optim.lr = study.pretrain_lr
    c.optim.warmup_steps = Study.warmup(study.pretrain_steps)
    c.optim.freeze_text_tower = False  # from scratch: both towers
    c.eval_every = study.pretrain_steps  # the final evaluation is the one reported
    c.checkpoint.every = max(1, study.pretrain_steps // 2)
    return c


def finetune_config(study: Study, run: Run, seed: int, init_dir: pathlib.Path):
    c = base_config(study, run.method)
    for key, value in run.loss.items():  # optional loss fields (absent from the defaults, e.g. lrc_text) are added
        if key in c.loss or "." in key:
            c.loss.update_from_flattened_dict({key: value})
        else:
            c.loss[key] = value
    c.seed = c.data.seed = seed
    c.init.mode = "params"
    c.init.params_dir = str(init_dir)
    c.total_steps = study.finetune_steps
    c.optim.lr = study.finetune_lr
    c.optim.warmup_steps = Study.warmup(study.finetune_steps)
    c.optim.freeze_text_tower = True
    c.eval_every = study.finetune_steps
    c.checkpoint.every = max(1, study.finetune_steps // 2)
    c.update_from_flattened_dict(run.config)
    return c


# ------------------------------------------------------------------------------------------------ running


def run_directory(workdir: pathlib.Path, name: str, seed: int = 0) -> pathlib.Path:
    """Where one run lives: `runs/pretrained` (one, shared) or `runs/<name>/seed<k>`."""
    return workdir / "runs" / name if name == PRETRAINED else workdir / "runs" / name / f"seed{seed}"


def result_path(run_dir: pathlib.Path) -> pathlib.Path:
    return run_dir / "result.json"


def is_optional_metric(name: str) -> bool:
    """Whether report metric `name` (of any split) may be absent: base/novel exist on open-vocabulary data only."""
    return any(name == m or name.startswith(m + "_") for m in OPTIONAL_METRICS)


def split_suffix(split: str) -> str:
    """What a held-out split's metric and evaluator names end with: nothing for "val", `_<split>` otherwise."""
    return "" if split == "val" else f"_{split}"


def split_metrics(splits: tuple[str, ...]) -> dict:
    """METRICS for the held-out `splits`: "val" as named there, another split's as `<name>_<split>` (its evaluators
    are `<evaluator>_<split>`, see base_config)."""
    out = {}
    for split in splits:
        for name, key in METRICS.items():
            _, evaluator, metric = key.split("/")
            out[f"{name}{split_suffix(split)}"] = f"eval/{evaluator}{split_suffix(split)}/{metric}"
    return out


def has_metrics(result: dict, metric_keys: dict) -> bool:
    """Whether a run's `result` holds every report metric of `metric_keys` (the optional ones may be absent)."""
    return all(name in result["metrics"] or is_optional_metric(name) for name in metric_keys)


def use_compilation_cache(workdir: pathlib.Path) -> None:
    """XLA's persistent cache in `workdir`: the seeds of one run compile the same programs, and skip the recompiles."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(workdir / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_one(config, run_dir: pathlib.Path, metric_keys: dict = METRICS) -> dict:
    """Trains+evaluates one run (resuming it if interrupted) unless its result.json exists with every metric of
    `metric_keys` (report name -> trainer metric); returns the result. A finished run whose result lacks some (a
    split added later) is evaluated again from its last checkpoint, without training."""
    from harmoclip_jax import train

    path = result_path(run_dir)
    earlier = json.loads(path.read_text()) if path.exists() else None
    if earlier and has_metrics(earlier, metric_keys):
        return earlier
    start = time.perf_counter()
    metrics = train.train_and_evaluate(config, run_dir)
    missing = [m for name, m in metric_keys.items() if m not in metrics and not is_optional_metric(name)]
    steps = workdir_lib.checkpoint_steps(run_dir)
    if missing and (not steps or steps[-1] < config.total_steps):  # Ctrl-C / SIGTERM: the trainer saved and returned
        raise cli.Error(f"{run_dir}: stopped at step {steps[-1] if steps else 0} of {config.total_steps} (checkpoint "
                        "saved); rerun the same command to resume the study from there")
    if missing:
        raise RuntimeError(f"{run_dir}: the run finished without the metrics {missing}; got {sorted(metrics)}")
    result = {"metrics": {name: float(metrics[key]) for name, key in metric_keys.items() if key in metrics},
              "steps": int(config.total_steps), "seed": int(config.seed),
              "seconds": earlier["seconds"] if earlier else time.perf_counter() - start}  # training's, not a re-eval's
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    return result


def run_study(study: Study, workdir: pathlib.Path, names: tuple[str, ...]) -> None:
    use_compilation_cache(workdir)
    todo = [(PRETRAINED, 0)] + [(name, seed) for name in names for seed in study.seeds]
    start = time.perf_counter()
    done_now = 0
    for index, (name, seed) in enumerate(todo):
        run_dir = run_directory(workdir, name, seed)
        if result_path(run_dir).exists():
            continue
        elapsed = time.perf_counter() - start
        remaining = len(todo) - index
        eta = f", ~{elapsed / done_now * remaining / 60:.0f} min left" if done_now else ""
        print(f"[tradeoff] run {index + 1}/{len(todo)}: {name} seed {seed} ({elapsed / 60:.1f} min so far{eta})",
              file=sys.stderr, flush=True)
        if name == PRETRAINED:
            config = pretrain_config(study)
        else:
            run = next(r for r in RUNS if r.name == name)
            config = finetune_config(study, run, seed, run_directory(workdir, PRETRAINED) / "params")
        run_one(config, run_dir)
        done_now += 1
    print(f"[tradeoff] all {len(todo)} runs finished ({(time.perf_counter() - start) / 60:.1f} min this time)",
          file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ report


def collect(workdir: pathlib.Path, study: Study) -> dict:
    """{name: {"label", "group", "seeds": [...], "per_seed": {metric: [...]}, "mean": {...}, "std": {...}}} of the
    finished runs (a partial study reports what it has)."""
    rows = {}
    entries = [(PRETRAINED, "Pretrained CLIP (the starting point)", "start", [run_directory(workdir, PRETRAINED)])]
    entries += [(r.name, r.label, r.group, [run_directory(workdir, r.name, s) for s in study.seeds]) for r in RUNS]
    for name, label, group, dirs in entries:
        results = [json.loads(result_path(d).read_text()) for d in dirs if result_path(d).exists()]
        if not results:
            continue
        per_seed = {m: [r["metrics"][m] for r in results] for m in METRICS if m in results[0]["metrics"]}
        per_seed["r1_mean"] = [(a + b) / 2 for a, b in zip(per_seed["t2i_r1"], per_seed["i2t_r1"])]
        rows[name] = {
            "label": label, "group": group, "seeds": [r["seed"] for r in results], "steps": results[0]["steps"],
            "seconds": [round(r["seconds"], 1) for r in results], "per_seed": per_seed,
            "mean": {m: float(np.mean(v)) for m, v in per_seed.items()},
            "std": {m: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for m, v in per_seed.items()},
        }
    return rows


def format_cell(row: dict, metric: str) -> str:
    if metric not in row["mean"]:
        return "–"
    if len(row["seeds"]) == 1:
        return f"{row['mean'][metric]:.3f}"
    return f"{row['mean'][metric]:.3f} ± {row['std'][metric]:.3f}"


def welch_t(row: dict, base: dict, metric: str) -> float | None:
    """Welch's t of the difference of means (None: fewer than 2 seeds on a side, or no spread: identical seeds
    leave float noise of ~1e-17 in the std, which would divide into a meaningless t of ~1e15)."""
    n, m = len(row["seeds"]), len(base["seeds"])
    se = (row["std"][metric] ** 2 / n + base["std"][metric] ** 2 / m) ** 0.5
    if n < 2 or m < 2 or row is base or se < 1e-12:
        return None
    return (row["mean"][metric] - base["mean"][metric]) / se


def format_delta(row: dict, base: dict | None, metric: str) -> str:
    """Difference of means, with Welch's t when both sides have several seeds (|t| < 2: within the noise)."""
    if base is None or row is base or metric not in row["mean"] or metric not in base["mean"]:
        return ""
    diff = row["mean"][metric] - base["mean"][metric]
    t = welch_t(row, base, metric)
    return f"{diff:+.3f}" if t is None else f"{diff:+.3f} (t {t:+.1f})"


# (column title, metric) of the table's value columns, and the metrics its Δ columns compare.
TABLE_COLUMNS = (("box top-1 novel", "box_top1_novel"), ("box top-1 base", "box_top1_base"),
                 ("box top-1 all", "box_top1"), ("text→image R@1", "t2i_r1"), ("image→text R@1", "i2t_r1"),
                 ("mean R@1", "r1_mean"), ("seg mIoU", "seg_miou"))
DELTA_METRICS = (("novel", "box_top1_novel"), ("R@1", "r1_mean"), ("mIoU", "seg_miou"))


def markdown_table(rows: dict, study: Study) -> str:
    columns = [(title, m) for title, m in TABLE_COLUMNS if any(m in r["mean"] for r in rows.values())]
    deltas = [(title, m) for title, m in DELTA_METRICS if any(m in r["mean"] for r in rows.values())]
    heads = ([title for title, _ in columns] + [f"Δ {title} vs CLIP" for title, _ in deltas]
             + [f"Δ {title} vs FineCLIP" for title, _ in deltas])
    lines = [study.describe(), "", "| run | " + " | ".join(heads) + " | seeds |",
             "| --- |" + " --- |" * (len(heads) + 1)]
    for name, row in rows.items():
        cells = [format_cell(row, m) for _, m in columns]
        for base_name in ("clip", "fineclip"):
            base = rows.get(base_name) if name != PRETRAINED else None
            cells += [format_delta(row, base, m) for _, m in deltas]
        label = f"**{row['label']}**" if name == "harmoclip" else row["label"]
        if row["group"] == "ablation":
            label = f"ablation: {label}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(row['seeds'])} |")
    return "\n".join(lines) + "\n"


def scatter_plot(rows: dict, path: pathlib.Path, title: str) -> None:
    """Two panels of x = box top-1 (novel classes when the dataset has them) vs y = mean retrieval R@1 (methods,
    ablations), and a third of segmentation mIoU per run; bars are the seed std, dots the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_metric = "box_top1_novel" if any("box_top1_novel" in r["mean"] for r in rows.values()) else "box_top1"
    fig, axes = plt.subplots(1, 3, figsize=(19, 6), gridspec_kw={"width_ratios": [1, 1, 0.8]})
    groups = (("method", "Methods"), ("ablation", "HarmoCLIP ablations"))
    palette = [*plt.get_cmap("tab10").colors, "navy", "olive", "teal"]  # distinct hues, one per run everywhere
    color = {name: "black" if name == PRETRAINED else palette[i % len(palette)] for i, name in enumerate(rows)}
    for ax, (group, heading) in zip(axes[:2], groups):
        shown = [n for n, r in rows.items() if r["group"] in (group, "start") or n in ("clip", "harmoclip")]
        for name in shown:
            row = rows[name]
            if x_metric not in row["mean"]:
                continue
            x, y = row["mean"][x_metric], row["mean"]["r1_mean"]
            marker = {"start": "*", "method": "o", "ablation": "s"}[row["group"]]
            ax.errorbar(x, y, xerr=row["std"][x_metric], yerr=row["std"]["r1_mean"], fmt=marker,
                        ms=13 if marker == "*" else 7, color=color[name], capsize=3, label=row["label"],
                        zorder=3 if name == PRETRAINED else 2)
            ax.scatter(row["per_seed"][x_metric], row["per_seed"]["r1_mean"], s=8, alpha=0.35, color=color[name])
        ax.set_title(heading)
        ax.set_xlabel("box classification top-1, " + ("novel classes" if x_metric.endswith("novel") else "all classes")
                      + " (per-class mean, held-out)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="best")
    axes[0].set_ylabel("retrieval R@1 (mean of text→image and image→text)")
    axes[1].sharex(axes[0])
    axes[1].sharey(axes[0])
    ax = axes[2]
    names = [n for n, r in rows.items() if "seg_miou" in r["mean"]]
    for i, name in enumerate(names):
        row = rows[name]
        ax.barh(i, row["mean"]["seg_miou"], xerr=row["std"]["seg_miou"], color=color[name], capsize=3)
        ax.scatter(row["per_seed"]["seg_miou"], [i] * len(row["seeds"]), s=8, color="black", alpha=0.5, zorder=3)
    ax.set_yticks(range(len(names)), [rows[n]["label"] for n in names], fontsize=7.5)
    ax.invert_yaxis()
    ax.set_xlabel("zero-shot segmentation mIoU (patch features, held-out)")
    ax.set_title("Dense quality")
    ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: dict, study: Study, report_dir: pathlib.Path, command: str) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, study)
    (report_dir / "tradeoff.md").write_text(f"<!-- regenerate: {command} -->\n{table}")
    (report_dir / "tradeoff.json").write_text(json.dumps({"study": dataclasses.asdict(study), "command": command,
                                                          "date": time.strftime("%Y-%m-%d"), "runs": rows},
                                                         indent=1))
    scatter_plot(rows, report_dir / "tradeoff.png", f"{study.dataset}, {study.variant}: {study.finetune_steps} steps "
                 f"from a GC-pretrained CLIP, {len(study.seeds)} seeds (bars: std; dots: seeds)")
    base = rows.get("clip")
    for name, row in rows.items():  # one JSON line per run, the benchmark format (reference: GC-only CLIP)
        for metric in ("box_top1_novel", "box_top1", "r1_mean", "seg_miou"):
            if metric not in row["mean"]:
                continue
            ref = base["mean"].get(metric) if base else None
            print(json.dumps({"bench": "tradeoff", "cpu": cpu_description(),
                              "case": {"run": name, "metric": metric, "seeds": row["seeds"]},
                              "unit": metric, "ours": round(row["mean"][metric], 4),
                              "ours_std": round(row["std"][metric], 4),
                              "reference": None if ref is None else round(ref, 4),
                              "reference_name": "clip (GC only, same steps)",
                              "speedup": None if not ref else round(row["mean"][metric] / ref, 3)}), flush=True)


# ------------------------------------------------------------------------------------------------ main


def stamp_workdir(workdir: pathlib.Path, study: Study) -> None:
    """A workdir belongs to one study: mixing steps or datasets would average incomparable runs. Writes the study's
    settings to `study.json` or refuses a workdir holding another's."""
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = workdir / "study.json"
    settings = {k: v for k, v in dataclasses.asdict(study).items() if k not in ("seeds", "data_dir")}
    if tuple(settings["eval_splits"]) == ("val",):
        del settings["eval_splits"]  # the default, and workdirs from before the field exist: they stay valid
    described = json.dumps(settings, sort_keys=True)
    if stamp.exists() and stamp.read_text() != described:
        raise cli.UsageError(f"{workdir} holds a study with other settings ({stamp.read_text()}); use another "
                             f"--workdir for {described}")
    tmp = stamp.with_suffix(f".tmp{os.getpid()}")  # atomic: a second study process (--only) may be reading it
    tmp.write_text(described)
    os.replace(tmp, stamp)


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "tradeoff"), help="runs and checkpoints")
    parser.add_argument("--report_dir", default=str(ROOT / "docs"), help="where tradeoff.{md,json,png} go")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies pretraining and fine-tuning steps")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dataset", default=None, help="default scenes/ov_small; scenes/ov has 5x the images; "
                        "scenes/small is the closed-vocabulary data of the first study")
    parser.add_argument("--variant", default=None, help="default ViT-Ti/8@64; e.g. ViT-S/8@64 (models/variants.py)")
    parser.add_argument("--only", default="", help=f"comma-separated runs (default all): {','.join(RUN_NAMES)}")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    parser.add_argument("--report_only", action="store_true", help="only redraw the report from finished runs")
    parser.add_argument("--smoke", action="store_true", help="tiny model/dataset, 2 steps: checks the plumbing")
    parser.add_argument("--verbose", action="store_true", help=cli.VERBOSE_HELP)
    args = parser.parse_args(argv)

    names = tuple(n.strip() for n in args.only.split(",") if n.strip()) or RUN_NAMES
    unknown = [n for n in names if n not in RUN_NAMES]
    if unknown:
        parser.error(f"--only: unknown runs {unknown}; choose from {', '.join(RUN_NAMES)}")
    if args.smoke:
        study = Study.smoke(args.seeds, args.data_dir)
    else:
        study = Study.default(args.scale, args.seeds, args.data_dir, args.dataset, args.variant)
    workdir = pathlib.Path(args.workdir).absolute()
    stamp_workdir(workdir, study)
    if not args.report_only:
        run_study(study, workdir, names)
    rows = collect(workdir, study)
    if not rows:
        raise cli.Error(f"no finished runs in {workdir}; run without --report_only first")
    options = [f"--scale {args.scale:g}" if args.scale != 1 else "", f"--seeds {args.seeds}" if args.seeds != 3 else "",
               f"--dataset {args.dataset}" if args.dataset else "", f"--variant {args.variant}" if args.variant else "",
               f"--only {args.only}" if args.only else "", "--smoke" if args.smoke else ""]
    command = " ".join(["python benchmarks/tradeoff.py", *filter(None, options)])
    write_report(rows, study, pathlib.Path(args.report_dir), command)
    print(f"[tradeoff] report: {pathlib.Path(args.report_dir) / 'tradeoff.md'} (+ .png, .json)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
