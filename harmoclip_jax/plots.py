"""A PNG of the training curves (loss terms, learning rate, throughput) and eval metrics from metrics.jsonl."""
from __future__ import annotations

import os
import pathlib

from harmoclip_jax.metrics_writer import read_metrics


def plot_metrics(metrics_path: str | os.PathLike, out_path: str | os.PathLike) -> pathlib.Path | None:
    """Writes the curves to `out_path`; returns it (None when there is nothing to plot)."""
    # A bare Figure (no pyplot): no backend switch, so plots in a notebook that trains keep working.
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path) if pathlib.Path(metrics_path).exists() else []
    if not records:
        return None

    def series(key):
        pts = [(r["step"], r[key]) for r in records if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    keys = sorted({k for r in records for k in r})
    loss_keys = [k for k in keys if k == "loss" or k.startswith("loss/")]
    eval_keys = [k for k in keys if k.startswith("eval/") and not k.endswith(("num_images", "num_captions",
                                                                                "num_boxes"))]
    panels = [("losses", loss_keys, "log"), ("eval metrics", eval_keys, "linear"),
              ("learning rate", ["learning_rate"], "linear"), ("images/s", ["images_per_s"], "linear")]
    panels = [p for p in panels if any(k in keys for k in p[1])]
    fig = Figure(figsize=(5 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, names, yscale) in zip(axes[0], panels):
        for name in names:
            xs, ys = series(name)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=name.removeprefix("eval/"))
        ax.set_title(title)
        ax.set_xlabel("step")
        if yscale == "log" and all(v > 0 for n in names for v in series(n)[1]):
            ax.set_yscale("log")
        if len(names) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_path = pathlib.Path(out_path)
    fig.savefig(out_path, dpi=110)
    return out_path
