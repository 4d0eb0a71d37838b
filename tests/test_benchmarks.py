"""The speed benchmarks at test size: they run for every family they name and print the benchmark format (one JSON
object per case with the CPU it ran on). Timing itself is never asserted."""
import json
import pathlib
import sys

import pytest
import warm_python
from trainer_helpers import subprocess_env

from harmoclip_jax.testing.machine import cpu_description

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORMAT = {"bench", "case", "unit", "ours", "reference", "reference_name", "speedup", "cpu"}


def _cases(*args):
    proc = warm_python.run([sys.executable, *args], cwd=ROOT, env=subprocess_env(), timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = [x for x in proc.stdout.splitlines() if x.strip()]
    assert text and all(x.startswith("{") for x in text), proc.stdout[-2000:]  # stdout: JSON lines only
    lines = [json.loads(x) for x in text]
    for line in lines:
        assert FORMAT <= set(line), line
        assert line["cpu"] == cpu_description() and line["ours"] > 0
    return lines


@pytest.mark.parametrize("family,variant,reference", [("clip", "test-tiny", True),
                                                       ("eva02_clip", "EVA02-test-tiny", False)])
def test_train_step_benchmark_runs_each_family(family, variant, reference):
    args = ["benchmarks/train_step.py", "--family", family, "--variant", variant, "--size", "64", "--batch", "2",
            "--boxes", "3", "--steps", "1", "--peak_gflops", "100", *([] if reference else ["--skip_reference"])]
    [line] = _cases(*args)
    assert line["case"]["family"] == family and line["xla_gflops_per_step"] > 0 and 0 < line["mfu"]
    assert (line["reference"] is not None) == reference
    assert line["case"]["xla_flags"] == subprocess_env()["XLA_FLAGS"]  # the flags it ran under, recorded


def test_train_step_benchmark_refuses_a_reference_it_does_not_have():
    proc = warm_python.run([sys.executable, "benchmarks/train_step.py", "--family", "eva02_clip", "--variant",
                           "EVA02-test-tiny"], cwd=ROOT, env=subprocess_env(), timeout=200)
    assert proc.returncode == 2 and "pass --skip_reference" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("family,variant,reference", [("clip", "test-tiny", True),
                                                       ("eva02_clip", "EVA02-test-tiny", False)])
def test_encode_benchmark_runs_each_family(family, variant, reference):
    [line] = _cases("benchmarks/encode.py", "--family", family, "--variant", variant, "--iters", "1",
                    *([] if reference else ["--no_reference"]))
    assert line["case"]["family"] == family and (line["reference"] is not None) == reference


def test_pipeline_jpeg_benchmark_reports_per_core_rates_and_a_profile(tmp_path):
    """COCO-size-JPEG input benchmark at toy size (64x48 JPEGs, 32 px input, 8 images, one grain worker): one line
    per case with the per-core target, and the per-image profile whose stages add up to its total."""
    lines = _cases("benchmarks/pipeline_jpeg.py", "--data_dir", str(tmp_path), "--width", "64", "--height", "48",
                   "--num_images", "8", "--image_size", "32", "--batch_size", "4", "--batches", "2", "--repeats", "1",
                   "--workers", "0", "1")
    by_case = {(x["bench"], x["case"].get("path"), x["case"].get("num_workers")): x for x in lines}
    assert set(by_case) == {("pipeline_jpeg", "pil_draft_resize", None), ("pipeline_jpeg", "decode_image_uint8", None),
                            ("pipeline_jpeg", "train_iterator", 0),
                            ("pipeline_jpeg", "train_iterator", 1),
                            ("pipeline_jpeg", "train_iterator_uint8", 0), ("pipeline_jpeg", "train_iterator_uint8", 1),
                            ("pipeline_jpeg", "train_iterator_resize_canvas", 0),
                            ("pipeline_jpeg", "train_iterator_resize_canvas", 1), ("pipeline_profile", None, None)}, \
        list(by_case)
    assert by_case["pipeline_jpeg", "train_iterator", 0]["case"]["image_dtype"] == "float32"
    assert by_case["pipeline_jpeg", "train_iterator_uint8", 0]["case"]["image_dtype"] == "uint8"
    assert by_case["pipeline_jpeg", "train_iterator_uint8", 0]["case"]["resize_canvas"] == 0
    canvas = by_case["pipeline_jpeg", "train_iterator_resize_canvas", 1]["case"]
    assert canvas["image_dtype"] == "uint8" and canvas["resize_canvas"] == 64  # 64x48 JPEGs: no draft at 32 px
    for line in lines:
        assert line["reference"] > 0 and line["case"]["jpeg"] == "64x48 q90" and line["case"]["num_images"] == 8
    for key, line in by_case.items():
        if key[0] == "pipeline_jpeg":
            assert line["target_per_core"] == 210 and line["meets_target"] == (line["ours"] >= 210)
            assert line["case"]["wall_per_core"] > 0
    assert by_case["pipeline_jpeg", "train_iterator", 0]["case"]["pinned_to_core"] is not None
    assert by_case["pipeline_jpeg", "train_iterator", 1]["case"]["index_space"] == 118_287  # COCO-sized shuffle
    profile = by_case["pipeline_profile", None, None]
    stages = profile["stages_ms"]
    assert set(stages) == {"read_record", "decode", "resize", "normalise", "boxes_regions", "tokenize",
                           "stack_batch"}
    assert all(v >= 0 for v in stages.values()) and abs(sum(stages.values()) - profile["ours"]) < 0.01
    assert profile["dominant_stage"] == max(stages, key=stages.get)
    assert profile["whole_transform_ms"] > 0 and set(profile["alternatives_ms"]) == {
        "to_uint8_array", "stack_batch_uint8", "tokenize_uncached", "resize_bilinear", "decode_pil"}
    decode = by_case["pipeline_jpeg", "decode_image_uint8", None]
    assert decode["reference_name"] == "PIL draft + bicubic resize" and decode["case"]["pinned_to_core"] is not None
