"""The accelerator suite (benchmarks/accelerator_suite.sh) at test size on CPU, as the H200 would see the package:
grain, TFDS and TensorFlow made unimportable. Every case must print the benchmark format plus "device"; the
PyTorch-on-CUDA cases must say "skipped: no CUDA" instead of failing. Timing itself is never asserted."""
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
from trainer_helpers import subprocess_env

from harmoclip_jax.testing.machine import cpu_description

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORMAT = {"bench", "case", "unit", "ours", "reference", "reference_name", "speedup", "cpu", "device"}


@pytest.mark.slow
def test_accelerator_suite_script_runs_every_case_on_cpu():
    env = subprocess_env()
    env["ACCEL_SUITE_HIDE_MODULES"] = "grain,tensorflow_datasets,tensorflow"
    env["PYTHON"] = sys.executable
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(["bash", "benchmarks/accelerator_suite.sh", "--tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines()]  # every stdout line is one JSON object
    by_bench = {}
    for line in lines:
        assert FORMAT <= set(line), line
        assert "error" not in line and line["cpu"] == cpu_description() and line["device"] == "cpu", line
        by_bench.setdefault(line["bench"], []).append(line)
    assert set(by_bench) == {"train_step", "matmul_peak", "train_step_torch", "encode_image", "roi_align",
                             "pipeline", "max_batch", "aot_memory"}, sorted(by_bench)
    for bench in ("train_step_torch", "roi_align"):
        [line] = by_bench[bench]
        assert line["skipped"] == "no CUDA" and line["ours"] is None, line
    [aot_memory] = by_bench["aot_memory"]  # the prediction needs an H100/H200 to compare with
    assert aot_memory["skipped"].startswith("not an H100/H200") and aot_memory["ours"] is None, aot_memory
    [step] = by_bench["train_step"]
    assert step["ours"] > 0 and step["xla_gflops_per_step"] > 0 and 0 < step["mfu"], step
    assert step["grain"] == "stub" and step["case"]["batch"] == 2, step
    [encode] = by_bench["encode_image"]
    assert encode["ours"] > 0 and encode["reference"] is None and "no CUDA" in encode["reference_skipped"]
    [pipeline] = by_bench["pipeline"]
    assert pipeline["ours"] > 0 and pipeline["reference"] > 0 and pipeline["case"]["mode"].startswith("process pool")
    searches = {line["case"]["remat"]: line for line in by_bench["max_batch"]}
    assert set(searches) == {False, True}
    for line in searches.values():  # batch 2 runs, batch 4 stops the search (a simulated OOM at test size)
        assert line["ours"] == 2 and [t["result"] for t in line["case"]["searched"]] == ["fits", "OOM"], line


@pytest.mark.parametrize("options,error", [
    (["--budget_s", "1"], "not run: under 5 s left"),  # the suite's budget is spent before the case starts
    (["--bound_scale", "0.2", "--pipeline_window_s", "60"], "timed out after 8 s"),  # cut off, its pool with it
])
def test_accelerator_suite_reports_a_failing_case(options, error):
    """A case that cannot run or finish is an "error" line and a nonzero exit, not silence or a hang."""
    env = subprocess_env()
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "benchmarks/accelerator_suite.py", "--tiny", "--cases", "pipeline",
                           *options], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    [line] = [json.loads(x) for x in proc.stdout.splitlines()]
    assert FORMAT <= set(line) and line["bench"] == "pipeline" and line["error"].startswith(error), line
    assert time.monotonic() - start < 120
