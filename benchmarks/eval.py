"""Evaluation throughput: our evaluators (grain eval pipeline, jitted sharded embedding, NumPy metrics) vs the same
evaluation written plainly on transformers' PyTorch CLIPModel, same random weights, same data, one run.

Cases (on the held-out split of the scenes dataset, squashed to the model's input size):
  retrieval           every image and its 5 captions embedded, R@1/5/10 both ways;
  box_classification  dense patch features (last block as "attend to self"), RoIAlign 1x1 per labelled box,
                      scored against 18-template prompt-ensemble class embeddings, per-class top-1/top-5.
Ours is timed on its second call (the first compiles; its time is printed as `ours_first_call_s`). The reference
decodes with PIL, embeds with `get_image_features` / `get_text_features`, pools with `grid_sample` (torchvision's
RoIAlign semantics: aligned, adaptive sampling) and ranks in torch. Both sides must agree on the metrics (printed
as `max_metric_diff`); the unit is images of the split per second.

    python benchmarks/eval.py                                  # ViT-B/16 at 224, scenes/small val (200 images)
    python benchmarks/eval.py --variant ViT-B/32 --dataset scenes/default
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harmoclip_jax.testing.machine import cpu_description  # noqa: E402


# ----------------------------------------------------------------------------------------------- reference


def _reference_images(source, size: int):
    import io

    from PIL import Image

    from harmoclip_jax.models.normalization import OPENAI_CLIP

    for i in range(len(source)):
        record = source[i]
        picture = Image.open(io.BytesIO(record["image"])).convert("RGB").resize((size, size), Image.BICUBIC)
        yield record, (np.asarray(picture, np.float32) / 255 - np.float32(OPENAI_CLIP[0])) / np.float32(OPENAI_CLIP[1])


def _batches(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _text_features(hf, texts, context_length, batch):
    import torch

    from harmoclip_jax.tokenizer import tokenize

    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            tokens = torch.from_numpy(tokenize(texts[start:start + batch], context_length=context_length).astype(
                np.int64))
            feats = hf.get_text_features(input_ids=tokens)
            out.append(getattr(feats, "pooler_output", feats))
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def reference_retrieval(hf, source, size, context_length, batch):
    """R@1/5/10 both ways, written plainly in torch."""
    import torch

    image_feats, captions, owner, num_images = [], [], [], 0
    with torch.no_grad():
        for group in _batches(_reference_images(source, size), batch):
            pixels = torch.from_numpy(np.stack([p for _, p in group])).permute(0, 3, 1, 2)
            feats = hf.get_image_features(pixel_values=pixels)
            image_feats.append(getattr(feats, "pooler_output", feats))
            for record, _ in group:
                captions += [c.decode() for c in record["captions"]]
                owner += [num_images] * len(record["captions"])
                num_images += 1
    images = torch.nn.functional.normalize(torch.cat(image_feats), dim=-1)
    owner = torch.tensor(owner)
    texts = _text_features(hf, captions, context_length, batch * 5)
    sims = texts @ images.T  # (M, N)
    true = sims[torch.arange(len(owner)), owner]
    t2i_rank = (sims > true[:, None]).sum(1)
    own = owner[None, :] == torch.arange(len(images))[:, None]  # (N, M)
    best = torch.where(own, sims.T, -torch.inf).max(1).values
    i2t_rank = ((sims.T > best[:, None]) & ~own).sum(1)
    out = {}
    for k in (1, 5, 10):
        out[f"t2i_r{k}"] = float((t2i_rank < k).float().mean())
        out[f"i2t_r{k}"] = float((i2t_rank < k).float().mean())
    return out


def _roi_align_1x1(dense, boxes, patch):
    """torchvision.ops.roi_align(output_size=1, spatial_scale=1/patch, sampling_ratio=-1, aligned=True) on one
    image's (g, g, E) features, with grid_sample: each box averages ceil(h) x ceil(w) bilinear samples (clamped at
    the border, as torchvision does inside [-1, g])."""
    import torch

    g = dense.shape[0]
    feature = dense.permute(2, 0, 1)[None]  # (1, E, g, g)
    pooled = []
    for box in boxes.tolist():
        x0, y0, x1, y1 = (v / patch - 0.5 for v in box)
        h, w = y1 - y0, x1 - x0
        gh, gw = max(1, math.ceil(h)), max(1, math.ceil(w))
        ys = y0 + (torch.arange(gh, dtype=torch.float32) + 0.5) * h / gh
        xs = x0 + (torch.arange(gw, dtype=torch.float32) + 0.5) * w / gw
        yy, xx = torch.meshgrid(ys.clamp(0, g - 1), xs.clamp(0, g - 1), indexing="ij")
        grid = torch.stack([xx / (g - 1) * 2 - 1, yy / (g - 1) * 2 - 1], -1)[None]
        samples = torch.nn.functional.grid_sample(feature, grid, mode="bilinear", align_corners=True)
        pooled.append(samples.mean(dim=(2, 3))[0])
    return torch.stack(pooled)


def reference_box_classification(hf, source, size, context_length, batch, class_names, templates, patch):
    """Per-class-mean top-1/top-5 of every labelled box, written plainly in torch."""
    import torch

    from harmoclip_jax.testing.reference import hf_dense_features

    prompts = _text_features(hf, [t.format(n) for n in class_names for t in templates], context_length, 256)
    classes = torch.nn.functional.normalize(prompts.reshape(len(class_names), len(templates), -1).mean(1), dim=-1)
    regions, labels = [], []
    for group in _batches(_reference_images(source, size), batch):
        dense = torch.from_numpy(hf_dense_features(hf, np.stack([p for _, p in group])))
        for (record, _), features in zip(group, dense):
            boxes = np.asarray(record["regions"]["box"], np.float32).reshape(-1, 4) * size
            keep = np.asarray(record["regions"]["label"]) >= 0
            if keep.any():
                regions.append(_roi_align_1x1(features, boxes[keep], patch))
                labels += np.asarray(record["regions"]["label"])[keep].tolist()
    scores = torch.nn.functional.normalize(torch.cat(regions), dim=-1) @ classes.T
    labels = torch.tensor(labels)
    rank = (scores > scores[torch.arange(len(labels)), labels][:, None]).sum(1)
    out = {}
    for k in (1, 5):
        hits = (rank < k).float()
        per_class = [hits[labels == c].mean() for c in labels.unique()]
        out[f"top{k}"] = float(torch.stack(per_class).mean())
    return out


# ----------------------------------------------------------------------------------------------- ours


def _ours(args, hf_dir):
    import jax
    import ml_collections
    from flax import nnx

    from harmoclip_jax import config_lib, evaluators, train
    from harmoclip_jax.models import convert

    c = config_lib.base_config("clip")
    c.model.variant = args.variant
    c.model.image_size = args.image_size
    c.data.dataset = args.dataset
    c.data.data_dir = args.data_dir
    c.eval_batch_size = args.batch
    trainer = train.build_trainer(c)
    model = convert.load_hf_clip(hf_dir)
    params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)), trainer.state_shardings["params"])
    context = evaluators.EvalContext(mesh=trainer.mesh, data_config=config_lib.data_config(c), fns=trainer.eval_fns(),
                                     eval_batch_size=args.batch)
    built = {
        case: evaluators.build(case, ml_collections.ConfigDict({"type": case, "dataset": args.dataset,
                                                                "split": args.split, "max_regions": 8}), context)
        for case in ("retrieval", "box_classification")
    }
    return trainer, params, built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="ViT-B/16")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--dataset", default="scenes/small")
    parser.add_argument("--split", default="val")
    parser.add_argument("--batch", type=int, default=50, help="images per embedding call (both sides)")
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args()

    import jax
    import torch

    from harmoclip_jax.data import pipeline
    from harmoclip_jax.evaluators.box_classification import DEFAULT_TEMPLATES
    from harmoclip_jax.evaluators.common import dataset_metadata
    from harmoclip_jax.models.variants import get_config
    from harmoclip_jax.testing import reference

    torch.set_num_threads(os.cpu_count() or 1)
    clip_config = get_config(args.variant, image_size=args.image_size)
    hf = reference.hf_clip_model(clip_config, seed=0)
    source = pipeline.open_source(args.dataset, args.split, args.data_dir)
    class_names = list(dataset_metadata(args.dataset, args.data_dir)["class_names"])
    with tempfile.TemporaryDirectory() as hf_dir:
        hf.save_pretrained(hf_dir)
        trainer, params, built = _ours(args, hf_dir)
    context_length = clip_config.text.context_length
    for case, evaluator in built.items():
        with jax.set_mesh(trainer.mesh):
            start = time.perf_counter()
            evaluator.run(params)
            first = time.perf_counter() - start
            start = time.perf_counter()
            ours_metrics = evaluator.run(params)
            ours_s = time.perf_counter() - start
        start = time.perf_counter()
        if case == "retrieval":
            ref_metrics = reference_retrieval(hf, source, args.image_size, context_length, args.batch)
        else:
            ref_metrics = reference_box_classification(hf, source, args.image_size, context_length, args.batch,
                                                       class_names, DEFAULT_TEMPLATES,
                                                       clip_config.vision.patch_size)
        ref_s = time.perf_counter() - start
        diff = max(abs(ours_metrics[k] - v) for k, v in ref_metrics.items())
        n = len(source)
        print(json.dumps({
            "cpu": cpu_description(),
            "bench": "eval", "case": {"evaluator": case, "variant": args.variant, "image_size": args.image_size,
                                      "dataset": f"{args.dataset}:{args.split}", "images": n,
                                      "device": jax.devices()[0].device_kind},
            "unit": "images/s", "ours": round(n / ours_s, 2), "reference": round(n / ref_s, 2),
            "reference_name": "transformers CLIPModel + torch, written plainly", "speedup": round(ref_s / ours_s, 2),
            "ours_first_call_s": round(first, 1), "max_metric_diff": round(diff, 4),
            "metrics": {k: round(v, 4) for k, v in ref_metrics.items()}}), flush=True)


if __name__ == "__main__":
    main()
