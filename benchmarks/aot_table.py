"""Compiles every shipped config for the targets users pick (`python -m harmoclip_jax.aot`, one process per cell) and
writes docs/accelerators.md's table from the reports in docs/aot/ (a cell already there is not compiled again).

    python benchmarks/aot_table.py                 # every cell, then the table
    python benchmarks/aot_table.py --cells vitb16@tpu:v5e:4x4 --max_batch
    python benchmarks/aot_table.py --report_only   # the table from what docs/aot holds
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "aot"
DOC = ROOT / "docs" / "accelerators.md"
CONFIGS = {  # name -> config spec (bfloat16: what accelerators train in)
    "vitb16": "configs/vitb16.py:dtype=bfloat16",
    "vitl14": "configs/vitl14.py:dtype=bfloat16",
    "eva02_b16": "configs/eva02_b16.py:dtype=bfloat16",
    "eva02_l14_336": "configs/eva02_l14_336.py:dtype=bfloat16",
    "siglip_b16": "configs/siglip_b16.py:dtype=bfloat16",
}
TARGETS = ("tpu:v5e:4x4", "gpu:h100:1x1x8", "gpu:h200:1x1x8", "tpu:v5p:2x2x2")
# Eval encoders are forward passes at eval_batch_size, far from any limit: compiled on the first TPU and GPU target.
EVAL_TARGETS = ("tpu:v5e:4x4", "gpu:h100:1x1x8")
EXTRA = {  # cells beyond config x target: name@target -> (config spec, extra flags)
    "vitb16_32k@tpu:v5e:16x16": ("configs/vitb16.py:dtype=bfloat16,remat", ["--config.batch_size=32768",
                                                                            "--noevals"]),
    "vitb16_f32@tpu:v5e:4x4": ("configs/vitb16.py", ["--noevals"]),
    "vitl14_fsdp16@tpu:v5e:4x4": ("configs/vitl14.py:dtype=bfloat16", ["--config.mesh=(('data',1),('fsdp',16))",
                                                                       "--noevals"]),
    "vitb16_f32@gpu:h100:1x1x8": ("configs/vitb16.py", ["--noevals"]),
}


def cells() -> dict[str, tuple[str, str, list[str]]]:
    """name@target -> (config spec, target, flags), in the order they are compiled: the slower TPU column last but
    one, the extra cells (a 32k batch on a v5e-256, float32 for the FLOP check) after the first three targets."""
    out = {}
    for target in TARGETS:
        if target == TARGETS[-1]:
            out.update({cell: (spec, cell.split("@")[1], flags) for cell, (spec, flags) in EXTRA.items()})
        for name, spec in CONFIGS.items():
            out[f"{name}@{target}"] = (spec, target, [] if target in EVAL_TARGETS else ["--noevals"])
    return out


def path(cell: str) -> pathlib.Path:
    return OUT / (cell.replace("@", "__").replace(":", "-") + ".json")


def run(cell: str, spec: str, target: str, flags: list[str], max_batch: bool) -> None:
    cmd = [sys.executable, "-m", "harmoclip_jax.aot", f"--config={spec}", f"--target={target}",
           f"--json={path(cell)}", *flags] + (["--max_batch"] if max_batch else [])
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode:
        err = [l for l in proc.stderr.splitlines() if l.startswith("error:")] or proc.stderr.splitlines()[-3:]
        print(f"FAILED ({proc.returncode}) after {time.time() - start:.0f} s: {' '.join(err)}", flush=True)
        path(cell).with_suffix(".error").write_text("\n".join(err) + "\n")


GiB = 2**30


def table() -> str:
    rows = ["| config | target | batch | per-chip memory (train step) | fits | largest batch (no remat / remat) | "
            "TFLOP per chip per step (XLA / analytic) | roofline step (bound; compute floor) | img/s per chip ceiling | "
            "MFU at the bound | eval steps | compile |", "|" + "---|" * 12]
    for cell in sorted(cells(), key=lambda c: (c.split("@")[0], c.split("@")[1])):
        file = path(cell)
        name, target = cell.split("@")
        if not file.exists():
            err = file.with_suffix(".error")
            if err.exists():
                rows.append(f"| {name} | {target} | | fails to compile: {err.read_text().strip()[:200]} |" + " |" * 8)
            continue
        report = json.loads(file.read_text())
        t = report["programs"]["train_step"]
        mb = report.get("max_batch")
        largest = f"{mb['no_remat']['largest_fitting']} / {mb['remat']['largest_fitting']}" if mb else ""
        evals = [r for k, r in report["programs"].items() if k != "train_step"]
        eval_fit = "" if not evals else ("all fit, max %.1f GiB" % max(r["bytes_per_device"]["total"] / GiB
                                                                     for r in evals if "bytes_per_device" in r)
                                         if all(r["fits"] for r in evals) else "some do not fit")
        compile_s = sum(r["compile_s"] for r in report["programs"].values())
        if "bytes_per_device" not in t:
            rows.append(f"| {name} | {target} | {t['global_batch']} | {t.get('compile_error', '')[:120]} | no | "
                        f"{largest} | | | | | {eval_fit} | {compile_s:.0f} s |")
            continue
        mem = t["bytes_per_device"]["total"] / GiB
        loss_flops = t.get("analytic_loss_flops_per_device", 0)  # shown where it matters (> 1% of the model's)
        loss = f" + {loss_flops / 1e12:.2f} loss" if loss_flops > 0.01 * t["analytic_flops_per_device"] else ""
        cap = t["device_memory_bytes"] / GiB
        rows.append(
            f"| {name} | {target} | {t['global_batch']}{' remat' if t['remat'] else ''} | {mem:.1f} of {cap:.0f} GiB"
            f" | {'yes' if t['fits'] else 'no'} | {largest} | {t['xla_flops_per_device'] / 1e12:.2f} / "
            f"{t['analytic_flops_per_device'] / 1e12:.2f}{loss} | {t['roofline_step_s'] * 1e3:.0f} ms "
            f"({t['roofline_bound']}; {t['roofline']['compute_s'] * 1e3:.0f} ms) | "
            f"{t['images_per_s_per_device_bound']:.0f} | "
            f"{100 * t['mfu_at_roofline']:.0f}% | {eval_fit} | {compile_s:.0f} s |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="*", help="config@target names (default: every one)")
    parser.add_argument("--max_batch", action="store_true")
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        todo = cells()
        for cell in args.cells or list(todo):
            if cell not in todo:
                parser.error(f"unknown cell {cell}; known: {', '.join(todo)}")
            if not path(cell).exists():
                run(cell, *todo[cell], args.max_batch)
    text = table()
    print(text)
    write_table(text)
    return 0


BEGIN, END = "<!-- aot table: begin (benchmarks/aot_table.py writes it) -->\n", "<!-- aot table: end -->"
README = ROOT / "README.md"
SUMMARY_BEGIN, SUMMARY_END = "<!-- aot summary: begin -->\n", "<!-- aot summary: end -->"
SUMMARY_CELLS = ("vitb16@tpu:v5e:4x4", "vitb16@gpu:h100:1x1x8", "eva02_l14_336@tpu:v5e:4x4",
                 "eva02_l14_336@gpu:h100:1x1x8", "vitb16_32k@tpu:v5e:16x16")


def summary() -> str:
    """The README's few lines: the train step of SUMMARY_CELLS, from their reports."""
    lines = []
    for cell in SUMMARY_CELLS:
        if not path(cell).exists():
            continue
        report = json.loads(path(cell).read_text())
        t = report["programs"]["train_step"]
        name, target = cell.split("@")
        what = f"`{CONFIGS.get(name, EXTRA.get(cell, ('',))[0])}` at batch {t['global_batch']}" + \
            (" with remat" if t["remat"] else "")
        if "bytes_per_device" not in t:
            lines.append(f"- {what} on `{target}`: does not fit ({t.get('compile_error', '')[:100]})")
            continue
        mem, cap = t["bytes_per_device"]["total"] / GiB, t["device_memory_bytes"] / GiB
        verdict = f"fits, {mem:.1f} of {cap:.0f} GiB per chip" if t["fits"] else \
            f"short by {mem - cap:.1f} GiB per chip"
        lines.append(f"- {what} on `{target}`: {verdict}; roofline {t['roofline_step_s'] * 1e3:.0f} ms per step "
                     f"({t['images_per_s_per_device_bound']:.0f} images/s per chip at most)")
    return "\n".join(lines)


def _replace(file: pathlib.Path, begin: str, end: str, text: str) -> None:
    doc = file.read_text()
    head, _, rest = doc.partition(begin)
    _, _, tail = rest.partition(end)
    file.write_text(head + begin + text + "\n" + end + tail)


def write_table(text: str) -> None:
    """Replaces the table in docs/accelerators.md and the summary in README.md (between their markers)."""
    _replace(DOC, BEGIN, END, text)
    _replace(README, SUMMARY_BEGIN, SUMMARY_END, summary())


if __name__ == "__main__":
    sys.exit(main())
