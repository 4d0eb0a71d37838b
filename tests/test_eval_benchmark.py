"""benchmarks/eval.py at test size: our evaluators and the plain transformers + torch evaluation agree exactly."""
import json
import pathlib
import sys

import torch  # noqa: F401 - dev requirement (requirements-dev.txt): a broken install fails, never skips
import warm_python
from trainer_helpers import subprocess_env

from harmoclip_jax.testing.machine import cpu_description

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_eval_benchmark_sides_compute_the_same_metrics():
    cmd = [sys.executable, "benchmarks/eval.py", "--variant", "test-tiny", "--image_size", "64", "--dataset",
           "scenes/tiny", "--batch", "24"]
    proc = warm_python.run(cmd, cwd=ROOT, env=subprocess_env(), timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [x["case"]["evaluator"] for x in lines] == ["retrieval", "box_classification"]
    for line in lines:
        assert {"bench", "case", "unit", "ours", "reference", "reference_name", "speedup", "cpu"} <= set(line), line
        assert line["cpu"] == cpu_description()  # the CPU model and its vector extensions, with every figure
        assert line["max_metric_diff"] == 0.0, line
        assert line["ours"] > 0 and line["reference"] > 0 and line["case"]["images"] == 72
    assert set(lines[0]["metrics"]) == {f"{d}_r{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)}
