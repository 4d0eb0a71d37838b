"""Zero-shot segmentation quality of a trained model's `Predictor.segment` on held-out Scenes images, beside uniform
random labels (the chance level). Not a speed benchmark: the unit is mIoU.

Each `test` scene (seed 0, never trained on; rendered at --size px) is segmented among all 36 class names; the
ground truth is each object's visible pixels, background ignored, as the segmentation evaluator counts
(`evaluators/segmentation.py`: mIoU over the classes present or predicted). The quickstart notebook runs the same
measurement on a few scenes.

    python benchmarks/segment_miou.py --checkpoint workdirs/demo                 # 200 scenes, one pass at S x S
    python benchmarks/segment_miou.py --checkpoint workdirs/demo --resolution 128
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harmoclip_jax.testing.machine import cpu_description  # noqa: E402


def main(argv=None) -> int:
    from harmoclip_jax import cli

    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training workdir or params checkpoint")
    parser.add_argument("--scenes", type=int, default=200, help="held-out test scenes")
    parser.add_argument("--size", type=int, default=96, help="scene size in pixels (scenes/small: 96)")
    parser.add_argument("--resolution", type=int, default=None, help="sliding windows at this shorter side")
    args = parser.parse_args(argv)
    from harmoclip_jax.data import scenes
    from harmoclip_jax.evaluators.segmentation import confusion_matrix, segmentation_metrics
    from harmoclip_jax.inference import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint)
    names = list(scenes.CLASS_NAMES)
    rng = np.random.default_rng(0)
    ours = chance = np.zeros((len(names), len(names)), np.int64)
    start = time.perf_counter()
    for index in range(args.scenes):
        scene = scenes.generate_example(0, "test", index, args.size)
        truth = scenes.semantic_mask(scene)
        labels = predictor.segment(scene.image, names, resolution=args.resolution).label_map
        ours = ours + confusion_matrix(labels, truth, len(names))
        chance = chance + confusion_matrix(rng.integers(0, len(names), truth.shape), truth, len(names))
    m, r = segmentation_metrics(ours), segmentation_metrics(chance)
    print(json.dumps({"bench": "segment_miou", "case": f"scenes test x{args.scenes} @{args.size}px"
                      + (f", windows at {args.resolution}px" if args.resolution else ""),
                      "unit": "mIoU", "ours": round(m["miou"], 4), "reference": round(r["miou"], 4),
                      "reference_name": "uniform random labels", "speedup": round(m["miou"] / r["miou"], 2),
                      "pixel_acc": round(m["pixel_acc"], 4), "checkpoint": predictor.source,
                      "seconds": round(time.perf_counter() - start, 1), "cpu": cpu_description()}))
    return 0


if __name__ == "__main__":
    from harmoclip_jax import cli

    sys.exit(cli.run(main))
