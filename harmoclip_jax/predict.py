"""Label boxes, map phrases, segment: a trained model on one image; prints JSON and draws PNGs.

    python -m harmoclip_jax.predict --checkpoint workdirs/demo --image photo.jpg \\
        --boxes "10,20,200,240;150,30,320,200" --labels "cat,dog,sofa" --out photo_labelled.png
    python -m harmoclip_jax.predict --open_clip ViT-B-16.pt --variant ViT-B/16 --image ... --boxes ... --labels ...
    python -m harmoclip_jax.predict --scene val:3 --save_scene scene.jpg      # a Scenes test image + its boxes
    python -m harmoclip_jax.predict --checkpoint workdirs/demo --scene val:3 --out scene_labelled.png
    python -m harmoclip_jax.predict --checkpoint workdirs/demo --image photo.jpg --heatmap "a red car" "a bicycle"
    python -m harmoclip_jax.predict --checkpoint workdirs/demo --image photo.jpg --segment car,road,sky --out seg.png

--checkpoint takes a training workdir, a params checkpoint or a Hugging Face CLIPModel directory. Boxes are pixel
x1,y1,x2,y2 of the image as stored (--box_format xywh / cxcywh for other layouts), separated by ';'. --scene
SPLIT:INDEX uses image INDEX of a Scenes split (rendered at --scene_size px, seed 0: the `scenes/default`
images; `val`/`test` are never trained on) with its ground-truth boxes and, unless --labels is given, the 36
Scenes class names as labels.

--heatmap PHRASE [PHRASE ...] draws where each phrase lights up (`Predictor.similarity_maps`: every patch feature
against the phrase's embedding, at the image's size); --segment LABELS labels every pixel with one of the
comma-separated labels (`Predictor.segment`; --background P leaves pixels whose best label has probability < P
unlabelled). Both take --resolution R for large images: the shorter side resized to R pixels and model-sized windows
slid over it. Their PNG goes to --out (default: IMAGE_heatmap.png / IMAGE_segment.png in the current directory).
"""
from __future__ import annotations

import json
import pathlib

from absl import flags

from harmoclip_jax import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, params checkpoint or HF CLIPModel dir.")
_STEP = flags.DEFINE_integer("step", None, "Training checkpoint step of a workdir (default: the latest).")
_OPEN_CLIP = flags.DEFINE_string("open_clip", None, "open_clip / OpenAI state dict file (needs --variant).")
_VARIANT = flags.DEFINE_string("variant", None, "Architecture of an --open_clip file, e.g. ViT-B/16.")
_IMAGE = flags.DEFINE_string("image", None, "Image file.")
_BOXES = flags.DEFINE_string("boxes", None, "Boxes 'x1,y1,x2,y2;x1,y1,x2,y2' in pixels of --image.")
_BOX_FORMAT = flags.DEFINE_enum("box_format", "xyxy", ["xyxy", "xywh", "cxcywh"], "Layout of --boxes.")
_LABELS = flags.DEFINE_string("labels", None, "Candidate labels, comma-separated: 'cat,dog,sofa'.")
_LABELS_FILE = flags.DEFINE_string("labels_file", None, "Candidate labels, one per line (instead of --labels).")
_TEMPLATES = flags.DEFINE_multi_string("template", None, "Prompt template with '{}' (repeatable); default: the "
                                       "box-classification evaluator's 18-template ensemble.")
_TOP_K = flags.DEFINE_integer("top_k", 3, "Labels reported per box.")
_OUT = flags.DEFINE_string("out", None, "Write a PNG with the boxes and their top labels here.")
_SHOW = flags.DEFINE_integer("show", 1, "Labels drawn per box in --out.")
_SCENE = flags.DEFINE_string("scene", None, "SPLIT:INDEX of a Scenes image to use instead of --image/--boxes.")
_SCENE_SIZE = flags.DEFINE_integer("scene_size", 128, "Size of the --scene image in pixels.")
_SAVE_SCENE = flags.DEFINE_string("save_scene", None, "Write the --scene image to this file (JPEG/PNG).")
_HEATMAP = flags.DEFINE_multi_string("heatmap", None, "Phrases to map over the image: --heatmap 'a red car' "
                                      "'a bicycle' (the words after --heatmap; or repeat the flag).")
_SEGMENT = flags.DEFINE_string("segment", None, "Zero-shot segmentation into these labels, comma-separated: "
                               "'car,road,sky'.")
_BACKGROUND = flags.DEFINE_float("background", None, "--segment: pixels whose best label's probability is below "
                                 "this are left unlabelled.")
_RESOLUTION = flags.DEFINE_integer("resolution", None, "--heatmap / --segment: slide model-sized windows over the "
                                   "image resized to this shorter side (pixels), for large images.")
_STRIDE = flags.DEFINE_integer("stride", None, "Window stride in pixels with --resolution (default ~2/3 of the "
                               "model's input size).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the checkpoint's).")


class UsageError(cli.UsageError):
    """Wrong or missing flags: one line, and where the usage is."""

    def __init__(self, message: str):
        super().__init__(f"{message} (usage: python -m harmoclip_jax.predict --help)")


def _scene(spec: str, size: int):
    """'val:3' -> (uint8 image, pixel xyxy boxes, class names, ground-truth label per box)."""
    from harmoclip_jax.data import scenes

    split, _, index = spec.partition(":")
    if split not in ("train", "val", "test") or not index.isdigit():
        raise UsageError(f"--scene {spec!r}: expected SPLIT:INDEX with SPLIT train, val or test, e.g. val:3")
    scene = scenes.generate_example(0, split, int(index), size)
    boxes = scene.boxes * size  # normalised xyxy -> pixels of the size x size image
    truth = [scenes.CLASS_NAMES[obj.label] for obj in scene.objects]
    return scene.image, boxes, list(scenes.CLASS_NAMES), truth


def _labels() -> list[str] | None:
    if _LABELS.value and _LABELS_FILE.value:
        raise UsageError("give --labels or --labels_file, not both")
    if _LABELS_FILE.value:
        path = pathlib.Path(_LABELS_FILE.value)
        if not path.is_file():
            raise UsageError(f"--labels_file {path} does not exist")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if _LABELS.value is not None:
        return [part.strip() for part in _LABELS.value.split(",")]
    return None


def _predictor():
    from harmoclip_jax.inference import Predictor

    kwargs = {"templates": _TEMPLATES.value} if _TEMPLATES.value else {}
    if bool(_CHECKPOINT.value) == bool(_OPEN_CLIP.value):
        raise UsageError("give exactly one of --checkpoint and --open_clip")
    if _OPEN_CLIP.value:
        if not _VARIANT.value:
            raise UsageError("--open_clip needs --variant (e.g. ViT-B/16)")
        return Predictor.from_open_clip(_OPEN_CLIP.value, _VARIANT.value, dtype=_DTYPE.value, **kwargs)
    return Predictor.from_checkpoint(_CHECKPOINT.value, step=_STEP.value, dtype=_DTYPE.value, **kwargs)


def _dense_task(phrases: list[str]) -> dict:
    """--heatmap / --segment on --image or --scene: the report, and the PNG written."""
    if phrases and _SEGMENT.value is not None:
        raise UsageError("give --heatmap or --segment, not both (one picture per run)")
    if _BOXES.value or _LABELS.value or _LABELS_FILE.value:
        raise UsageError("--heatmap and --segment take no --boxes / --labels: the phrases or labels follow the flag")
    if _SCENE.value:
        if _IMAGE.value:
            raise UsageError("--scene replaces --image; give one or the other")
        image = _scene(_SCENE.value, _SCENE_SIZE.value)[0]
        image_name, stem = f"scenes:{_SCENE.value}@{_SCENE_SIZE.value}px", f"scene_{_SCENE.value.replace(':', '_')}"
    elif _IMAGE.value:
        image, image_name, stem = _IMAGE.value, _IMAGE.value, pathlib.Path(_IMAGE.value).stem
    else:
        raise UsageError("give --image (or --scene SPLIT:INDEX) to map or segment")
    if not (_CHECKPOINT.value or _OPEN_CLIP.value):
        raise UsageError("give --checkpoint (or --open_clip with --variant)")
    from harmoclip_jax.inference import draw_segmentation, draw_similarity_maps

    predictor = _predictor()
    window = {"resolution": _RESOLUTION.value, "stride": _STRIDE.value}
    if phrases:
        result = predictor.similarity_maps(image, phrases, **window)
        picture, kind = draw_similarity_maps(image, result), "heatmap"
    else:
        labels = [part.strip() for part in _SEGMENT.value.split(",")]
        result = predictor.segment(image, labels, background=_BACKGROUND.value, **window)
        picture, kind = draw_segmentation(image, result), "segment"
    out = _OUT.value or f"{stem}_{kind}.png"
    picture.save(out)
    return {"checkpoint": predictor.source, "image": image_name, **result.to_dict(), "out": out}


def run(phrases: list[str] | None = None) -> dict:
    """Does what the flags ask (`phrases`: the --heatmap phrases); returns the JSON-able report that main prints."""
    from harmoclip_jax.inference import parse_boxes

    if phrases or _SEGMENT.value is not None:
        return _dense_task(phrases or [])
    if _BACKGROUND.value is not None or _RESOLUTION.value is not None or _STRIDE.value is not None:
        raise UsageError("--background, --resolution and --stride go with --heatmap or --segment")
    labels = _labels()
    truth = None
    if _SCENE.value:
        if _IMAGE.value or _BOXES.value:
            raise UsageError("--scene replaces --image and --boxes; give one or the other")
        image, boxes, class_names, truth = _scene(_SCENE.value, _SCENE_SIZE.value)
        labels = labels or class_names
        image_name = f"scenes:{_SCENE.value}@{_SCENE_SIZE.value}px"
        box_format = "xyxy"
        if _SAVE_SCENE.value:
            from PIL import Image

            Image.fromarray(image).save(_SAVE_SCENE.value, quality=95)
            image_name = _SAVE_SCENE.value
    else:
        if not (_IMAGE.value and _BOXES.value):
            raise UsageError("give --image and --boxes (or --scene SPLIT:INDEX)")
        image, image_name, box_format = _IMAGE.value, _IMAGE.value, _BOX_FORMAT.value
        boxes = parse_boxes(_BOXES.value)
    if not (_CHECKPOINT.value or _OPEN_CLIP.value):
        if _SCENE.value and _SAVE_SCENE.value:  # only export the scene: print how to label it
            box_text = ";".join(",".join(f"{v:.1f}" for v in box) for box in boxes)
            return {"image": image_name, "boxes": box_text, "labels": ",".join(labels), "ground_truth": truth,
                    "command": f"python -m harmoclip_jax.predict --checkpoint CHECKPOINT --image {image_name} "
                               f"--boxes \"{box_text}\" --labels \"{','.join(labels)}\" --out labelled.png"}
        raise UsageError("give --checkpoint (or --open_clip with --variant)")
    if labels is None:
        raise UsageError("give the candidate labels: --labels 'cat,dog' or --labels_file FILE")
    predictor = _predictor()
    result = predictor.classify_regions(image, boxes, labels, top_k=_TOP_K.value, box_format=box_format)
    report = {"checkpoint": predictor.source, "image": image_name, **result.to_dict()}
    if truth is not None:
        for region, label in zip(report["regions"], truth):
            region["ground_truth"] = label
    if _OUT.value:
        from harmoclip_jax.inference import draw_regions

        draw_regions(image, result, show=_SHOW.value).save(_OUT.value)
        report["out"] = _OUT.value
    return report


def main(argv) -> None:
    phrases = list(_HEATMAP.value or [])
    if len(argv) > 1:
        if not phrases:  # words after --heatmap are more phrases; anywhere else they are a mistake
            raise UsageError(f"unexpected arguments {argv[1:]}")
        phrases += argv[1:]
    print(format_report(run(phrases)))


def format_report(report: dict) -> str:
    """JSON with one line per top-level entry and per region (valid JSON, readable in a terminal)."""
    lines = []
    for key, value in report.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            inner = ",\n    ".join(json.dumps(item) for item in value)
            lines.append(f"  {json.dumps(key)}: [\n    {inner}\n  ]")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}"


if __name__ == "__main__":
    cli.run_absl(main)
