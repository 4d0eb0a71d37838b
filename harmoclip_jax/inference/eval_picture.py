"""The picture a training run logs at each evaluation (TensorBoard / W&B tag `eval/picture`).

One fixed held-out image, the first record of the first box-classification or segmentation eval split: its
ground-truth boxes labelled by the current weights (against the dataset's class names) beside the similarity map of
its first region's phrase. It shows at a glance whether the dense features learn where things are, which the
scalar metrics summarise only. Labels are embedded with one prompt (not the evaluators' 18-template ensemble): the
picture is a glance, and it must cost an eval little.
"""
from __future__ import annotations

from typing import Any, Callable

import ml_collections
import numpy as np
from PIL import Image

_SPLIT_TYPES = ("box_classification", "segmentation")


def _held_out_record(config: ml_collections.ConfigDict, data_dir: str | None) -> tuple[dict, list[str]] | None:
    """(first record with regions of the first eval split that has boxes and class names, its class names)."""
    from harmoclip_jax.data import pipeline
    from harmoclip_jax.evaluators.common import dataset_metadata

    for ev in config.evals.values():
        if ev.get("type") not in _SPLIT_TYPES:
            continue
        names = list(dataset_metadata(ev.dataset, data_dir).get("class_names") or [])
        source = pipeline.open_source(ev.dataset, ev.split, data_dir)
        for index in range(min(len(source), 16)):
            record = source[index]
            if names and len(record["regions"]["box"]):
                return record, names
    return None


def make_eval_picture(model_of: Callable[[Any], Any], config: ml_collections.ConfigDict,
                      data_dir: str | None) -> Callable[[Any], np.ndarray] | None:
    """A function params -> uint8 (H, W, 3) picture (see module doc), or None when no eval split has boxes.
    `model_of(params)` builds the model (the trainer's `glue.merge`). Runs on one device: single-process runs."""
    found = _held_out_record(config, data_dir)
    if found is None:
        return None
    record, class_names = found
    from harmoclip_jax import config_lib
    from harmoclip_jax.inference.drawing import draw_regions, draw_similarity_maps
    from harmoclip_jax.inference.inputs import read_image
    from harmoclip_jax.inference.predictor import Predictor

    image = record["image"]
    width, height = read_image(image)[1]
    boxes = np.stack(record["regions"]["box"]) * np.asarray([width, height, width, height], np.float32)
    first = record["regions"]
    phrase = (first["lexeme"][0] or first["caption"][0] or b"").decode() or class_names[int(first["label"][0])]
    predictor: list[Predictor] = []

    def picture(params) -> np.ndarray:
        model = model_of(params)
        if not predictor:
            predictor.append(Predictor(model, region=config.region, tokenizer=config_lib.tokenizer_name(config),
                                       templates=("a photo of a {}.",), batch_size=1, box_bucket=len(boxes),
                                       source="training"))
        else:
            predictor[0].set_weights(model)
        p = predictor[0]
        labelled = draw_regions(image, p.classify_regions(image, boxes, class_names, top_k=1), min_side=384)
        maps = draw_similarity_maps(image, p.similarity_maps(image, [phrase]))
        scale = labelled.height / maps.height
        maps = maps.resize((round(maps.width * scale), labelled.height), Image.BICUBIC)
        canvas = Image.new("RGB", (labelled.width + maps.width, labelled.height), "white")
        canvas.paste(labelled, (0, 0))
        canvas.paste(maps, (labelled.width, 0))
        return np.asarray(canvas)

    return picture
