"""RoIAlign vs the real torchvision.ops.roi_align, where torchvision is importable (not on the CPU CI machine).

Part 1: max |ours - torchvision| over random maps and boxes (inside, outside, zero-area, whole-map), output sizes
1x1/7x7/2x3, sampling_ratio -1/1/2, aligned True/False, on torchvision's CPU and (if present) CUDA kernels.
Part 2 (CUDA only): timing of ours (jax, default matmul precision) vs torchvision's CUDA kernel, one JSON line per
case in the format of benchmarks/RESULTS.md.

    python3 benchmarks/roi_align_vs_torchvision.py
"""
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

from harmoclip_jax.ops.roi_align import roi_align  # noqa: E402
from harmoclip_jax.testing.machine import cpu_description  # noqa: E402

SCALE = 1 / 16


def torchvision_rois(boxes: np.ndarray, device: str) -> torch.Tensor:
    """(B, T, 4) boxes -> torchvision's (B*T, 5) rows [batch index, x1, y1, x2, y2]."""
    b, t, _ = boxes.shape
    index = torch.arange(b).repeat_interleave(t)[:, None].float()
    return torch.cat([index, torch.tensor(boxes.reshape(-1, 4))], 1).to(device)


def random_case(rng):
    """A random feature map and a box zoo: centres may lie outside, two zero-area boxes, one whole-map box."""
    height, width, b, t, c = int(rng.integers(3, 16)), int(rng.integers(3, 16)), 2, 12, 3
    features = rng.normal(size=(b, height, width, c)).astype(np.float32)
    centre = rng.uniform(-3, max(height, width) + 3, (b, t, 2)) / SCALE
    size = rng.uniform(0, max(height, width) * 0.9, (b, t, 2)) / SCALE
    size[:, :2] = 0
    boxes = np.concatenate([centre - size / 2, centre + size / 2], -1).astype(np.float32)
    boxes[:, 2] = [0, 0, width / SCALE, height / SCALE]
    return features, boxes


def max_differences(rng, trials: int = 30) -> dict[str, float]:
    worst: dict[str, float] = {}
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for _ in range(trials):
            features, boxes = random_case(rng)
            b, t = boxes.shape[:2]
            for out in [(1, 1), (7, 7), (2, 3)]:
                for ratio in [-1, 1, 2]:
                    for aligned in [True, False]:
                        ref = torchvision.ops.roi_align(torch.tensor(features).permute(0, 3, 1, 2).to(device),
                                                        torchvision_rois(boxes, device), out, SCALE, ratio, aligned)
                        ref = ref.permute(0, 2, 3, 1).reshape(b, t, *out, -1).cpu().numpy()
                        got = np.asarray(roi_align(features, boxes, out, SCALE, ratio, aligned,
                                                   max_samples_per_bin=64, precision="highest"))
                        key = f"{device} {out} sr={ratio} aligned={aligned}"
                        worst[key] = max(worst.get(key, 0.0), float(np.abs(got - ref).max()))
    return worst


def seconds_per_call(fn, n: int = 50) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def cuda_timings(rng) -> None:
    b, t, grid, c = 32, 20, 14, 768
    features = rng.normal(size=(b, grid, grid, c)).astype(np.float32)
    centre, size = rng.uniform(0, 224, (b, t, 2)), rng.uniform(16, 224, (b, t, 2))
    boxes = np.clip(np.concatenate([centre - size / 2, centre + size / 2], -1), 0, 224).astype(np.float32)
    features_jax, boxes_jax = jnp.asarray(features), jnp.asarray(boxes)
    features_torch = torch.tensor(features).permute(0, 3, 1, 2).contiguous().cuda()
    rois = torchvision_rois(boxes, "cuda")
    for o in [1, 7]:
        forward = jax.jit(lambda f: roi_align(f, boxes_jax, (o, o), SCALE))
        backward = jax.jit(jax.grad(lambda f: jnp.sum(roi_align(f, boxes_jax, (o, o), SCALE) ** 2)))
        ours = [seconds_per_call(lambda: forward(features_jax).block_until_ready()),
                seconds_per_call(lambda: backward(features_jax).block_until_ready())]
        leaf = features_torch.clone().requires_grad_()

        def torch_forward():
            torchvision.ops.roi_align(features_torch, rois, (o, o), SCALE, -1, True)
            torch.cuda.synchronize()

        def torch_backward():
            torch.autograd.grad((torchvision.ops.roi_align(leaf, rois, (o, o), SCALE, -1, True) ** 2).sum(), leaf)
            torch.cuda.synchronize()

        reference = [seconds_per_call(torch_forward), seconds_per_call(torch_backward)]
        for mode, ours_s, ref_s in zip(["forward", "forward+backward"], ours, reference):
            print(json.dumps({
                "cpu": cpu_description(),
                "bench": "roi_align",
                "case": {"B": b, "grid": "14x14x768", "T": t, "output": f"{o}x{o}", "mode": mode,
                         "backend": torch.cuda.get_device_name()},
                "unit": "boxes/s", "ours": b * t / ours_s, "reference": b * t / ref_s,
                "reference_name": "torchvision.ops.roi_align CUDA (torch)", "speedup": ref_s / ours_s,
            }))


def main() -> None:
    rng = np.random.default_rng(0)
    worst = max_differences(rng)
    print(json.dumps(worst))
    print("MAX", max(worst.values()), torchvision.__version__, jax.__version__, jax.devices())
    if torch.cuda.is_available():
        cuda_timings(rng)


if __name__ == "__main__":
    main()
