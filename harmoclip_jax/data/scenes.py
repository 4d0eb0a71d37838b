"""Scenes: the embedded, procedurally generated image-text-regions dataset (no download needed).

Every image shows 2-4 coloured shapes (6 shapes x 6 colours x 2 sizes) on a noisy, cluttered background, placed
in distinct cells of a 3x3 grid. Each image has exactly 5 global captions (paraphrase templates that name every
object with its size, colour and position or its relation to the other objects), and per object a tight box, a
region caption ("a large red circle in the top left"), a lexeme ("red circle") and a class label
(colour x shape, 36 classes). Images come in pairs (2k, 2k+1): the second is a hard negative of the first with the
same background and the same objects but two colours, two shapes or two positions swapped, so that only attribute
binding / spatial relations separate the pair's captions. Val/test records carry a semantic mask
(`segmentation`: each pixel's visible object's class label, 255 on background); train records an empty one.

Open-vocabulary configs (`ov`, `ov_small`, `ov_tiny`; `ScenesConfig.open_vocab`): every mention of a colour or
shape is a synonym drawn per mention (COLOUR_SYNONYMS, SHAPE_SYNONYMS: "a scarlet disc in the top left"), region
captions leave out the size word, and each lexeme is the noun phrase that the rule-based lexeme extractor
(lexemes.py) takes from the region caption ("scarlet disc"). In the train split, objects of the 9 NOVEL_CLASSES are
drawn and named in the global captions but have no region (no box, region caption, lexeme or label), as novel
categories in OV-COCO; every train image keeps >= 1 region. Val/test annotate every object. Class names (the
evaluation prompts) stay canonical; `DatasetInfo.metadata["is_novel"]` marks the novel classes.

Generation is deterministic: example `index` of `split` depends only on (config seed, split, index, open_vocab).
A default build (10k/1k/1k images of 128 px) takes ~85 MB (build times: docs/scenes.md). Usage:

    builder = Scenes(config="default", data_dir=...)     # or tfds.data_source("scenes/default", ...)
    builder.download_and_prepare()                        # generates; nothing is downloaded
    source = builder.as_data_source(split="train")

`python -m harmoclip_jax.data.scenes --preview docs/scenes_samples.png` draws a few samples with boxes/captions.
See docs/scenes.md.
"""
from __future__ import annotations

import dataclasses
import functools
import io
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from harmoclip_jax import cli
from harmoclip_jax.data.features import SEGMENTATION_IGNORE, no_segmentation, record_features
from harmoclip_jax.data.lexemes import LexemeExtractor

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
# Saturated, mutually distinct RGB anchors; each object jitters around its anchor (see _object_rgb).
COLOUR_RGB = np.array(
    [[215, 35, 35], [40, 165, 55], [40, 75, 215], [235, 215, 40], [145, 50, 185], [245, 135, 25]],
    dtype=np.float32,
)
SIZES = ("small", "large")
CLASS_NAMES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
NUM_CLASSES = len(CLASS_NAMES)  # 36

# Open-vocabulary configs: the classes whose objects are drawn and named in global captions but get no region
# annotation in the train split (the OV-COCO situation). One per colour and one per shape (a permutation) plus
# three more, so every colour and every shape keeps 4-5 base classes.
NOVEL_CLASSES = (
    "red star", "green circle", "blue triangle", "blue ring", "yellow square", "yellow ring", "purple cross",
    "orange circle", "orange triangle",
)
IS_NOVEL = tuple(name in NOVEL_CLASSES for name in CLASS_NAMES)
# Open-vocabulary configs name colours and shapes with these words, one drawn per mention. The canonical word is
# kept as one option, so a lexeme equals its class name for ~1 region in 9 (1 in 6 for crosses). Colour words are
# single words, so a lexeme splits into (colour word, shape word(s)) at its first space.
COLOUR_SYNONYMS = {
    "red": ("crimson", "scarlet", "red"),
    "green": ("emerald", "lime", "green"),
    "blue": ("azure", "cobalt", "blue"),
    "yellow": ("golden", "lemon", "yellow"),
    "purple": ("violet", "plum", "purple"),
    "orange": ("amber", "tangerine", "orange"),
}
SHAPE_SYNONYMS = {
    "circle": ("disc", "dot", "circle"),
    "square": ("box", "block", "square"),
    "triangle": ("wedge", "pyramid", "triangle"),
    "star": ("pentagram", "asterisk", "star"),
    "cross": ("plus sign", "cross"),
    "ring": ("hoop", "doughnut", "ring"),
}

# 3x3 grid: (row, col) -> phrase used in captions.
_CELL_NAMES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
_CELL_PREPOSITION = {"top": "at the", "bottom": "at the", "left": "on the", "right": "on the"}
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
# Minimum visible fraction of every object after the others are drawn over it.
MIN_VISIBLE_FRACTION = 0.75
# Radius ranges as a fraction of the image side (a grid cell is 1/3 of the side).
_RADIUS_RANGE = {"small": (0.075, 0.10), "large": (0.14, 0.175)}
_JPEG_QUALITY = 92


def position_phrase(cell: tuple[int, int]) -> str:
    """'in the top left', 'at the top', 'on the left', 'in the center', ..."""
    name = _CELL_NAMES[cell]
    return f"{_CELL_PREPOSITION.get(name, 'in the')} {name}"


def relation_phrase(cell_a: tuple[int, int], cell_b: tuple[int, int]) -> str:
    """Where object a is relative to object b: 'above', 'to the left of', 'below and to the right of', ..."""
    d_row, d_col = cell_a[0] - cell_b[0], cell_a[1] - cell_b[1]
    vertical = "above" if d_row < 0 else "below" if d_row > 0 else ""
    horizontal = "to the left of" if d_col < 0 else "to the right of" if d_col > 0 else ""
    if vertical and horizontal:
        return f"{vertical} and {horizontal}"
    return vertical or horizontal


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: int  # index into SHAPES
    colour: int  # index into COLOURS
    size: int  # index into SIZES
    cell: tuple[int, int]  # (row, col) of the 3x3 grid
    centre: tuple[float, float]  # (x, y) in pixels
    radius: float  # pixels

    @property
    def label(self) -> int:
        return self.colour * len(SHAPES) + self.shape

    @property
    def is_novel(self) -> bool:
        return IS_NOVEL[self.label]

    @property
    def lexeme(self) -> str:
        return f"{COLOURS[self.colour]} {SHAPES[self.shape]}"

    @property
    def noun_phrase(self) -> str:
        return f"a {SIZES[self.size]} {self.lexeme}"

    @property
    def region_caption(self) -> str:
        return f"{self.noun_phrase} {position_phrase(self.cell)}"


@dataclasses.dataclass(frozen=True)
class RenderedScene:
    image: np.ndarray  # uint8 (S, S, 3), before JPEG encoding
    objects: tuple[SceneObject, ...]
    masks: np.ndarray  # bool (n, S, S): the VISIBLE pixels of each object
    boxes: np.ndarray  # float32 (n, 4): tight xyxy of each visible mask, normalised to [0, 1]
    captions: tuple[str, ...]  # exactly 5
    variant: str  # "base", "swap_colour", "swap_shape" or "swap_position"
    region_captions: tuple[str, ...]  # per object (open vocabulary: with synonyms, without the size word)
    lexemes: tuple[str, ...]  # per object (open vocabulary: extracted from the region caption)
    annotated: tuple[bool, ...]  # per object: gets a region in the record (False: novel class, OV train split)


# ----------------------------------------------------------------------------------------------- drawing


def _shape_polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape (everything but the circle and the ring)."""
    if shape == "square":
        angles, radii = np.arange(4) * np.pi / 2 + np.pi / 4 + rotation, np.full(4, r * 1.05)
    elif shape == "triangle":
        angles, radii = np.arange(3) * 2 * np.pi / 3 - np.pi / 2 + rotation, np.full(3, r * 1.1)
    elif shape == "star":
        angles = np.arange(10) * np.pi / 5 - np.pi / 2 + rotation
        radii = np.where(np.arange(10) % 2 == 0, r * 1.1, r * 0.45)
    elif shape == "cross":
        a, b = r, r * 0.36  # arm half-length and half-width
        corners = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
                   (-a, -b), (-b, -b)]
        c, s = np.cos(rotation), np.sin(rotation)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))


def _shape_mask(obj: SceneObject, image_size: int, rotation: float) -> np.ndarray:
    """Boolean (S, S) mask of the full (unoccluded) object."""
    canvas = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    (cx, cy), r = obj.centre, obj.radius
    if SHAPES[obj.shape] in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if SHAPES[obj.shape] == "ring":  # the hole shows the background
            inner = r * 0.5
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    else:
        draw.polygon(_shape_polygon(SHAPES[obj.shape], cx, cy, r, rotation), fill=255)
    return np.asarray(canvas) > 127


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation, noisy, cluttered background, float32 (S, S, 3) in [0, 255]."""
    base = rng.uniform(70, 185) + rng.uniform(-18, 18, size=3)
    coarse = rng.normal(0.0, 22.0, size=(6, 6, 1)) + rng.normal(0.0, 6.0, size=(6, 6, 3))
    low_freq = np.asarray(
        Image.fromarray(((coarse + 128).clip(0, 255)).astype(np.uint8)).resize((size, size), Image.BILINEAR),
        dtype=np.float32,
    ) - 128.0
    clutter = Image.new("RGB", (size, size), (0, 0, 0))
    clutter_mask = Image.new("L", (size, size), 0)
    draw, draw_mask = ImageDraw.Draw(clutter), ImageDraw.Draw(clutter_mask)
    for _ in range(int(rng.integers(6, 14))):  # grey/brown strokes and blobs, never saturated colours
        tone = rng.uniform(40, 220)
        colour = tuple(min(255, max(0, int(tone + d))) for d in rng.uniform(-15, 15, size=3).tolist())
        x0, y0 = rng.uniform(0, size, size=2)
        if rng.random() < 0.6:
            x1, y1 = x0 + rng.normal(0, size / 3), y0 + rng.normal(0, size / 3)
            width = int(rng.integers(1, max(2, size // 40) + 1))
            draw.line([x0, y0, x1, y1], fill=colour, width=width)
            draw_mask.line([x0, y0, x1, y1], fill=255, width=width)
        else:
            r = rng.uniform(size / 40, size / 12)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)
            draw_mask.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=255)
    image = base.astype(np.float32) + low_freq
    alpha = np.asarray(clutter_mask, dtype=np.float32)[..., None] * np.float32(rng.uniform(0.35, 0.7) / 255.0)
    return image + (np.asarray(clutter, dtype=np.float32) - image) * alpha


def _object_rgb(rng: np.random.Generator, colour: int) -> np.ndarray:
    """The anchor colour with a small per-object jitter, so colour is a category, not one RGB value."""
    return np.clip(COLOUR_RGB[colour] * rng.uniform(0.85, 1.08) + rng.uniform(-12, 12, size=3), 0, 255)


def _render(objects: tuple[SceneObject, ...], image_size: int, rng: np.random.Generator):
    """Draws the objects in order (later ones cover earlier ones), each shaded, over a fresh background, then adds
    pixel noise. Returns the uint8 (S, S, 3) image, each object's visible mask and each object's full mask."""
    image = _background(rng, image_size)
    full_masks = []
    for obj in objects:
        mask = _shape_mask(obj, image_size, rotation=rng.uniform(-0.25, 0.25))
        rgb = _object_rgb(rng, obj.colour)
        # A gentle linear shading across the object keeps it from being one flat colour.
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction) + 1e-6
        ys, xs = np.nonzero(mask)
        shade = 1 + 0.12 * ((xs - obj.centre[0]) * direction[0] + (ys - obj.centre[1]) * direction[1]) / obj.radius
        image[ys, xs] = rgb[None, :] * shade[:, None]
        full_masks.append(mask)
    visible = np.stack(full_masks)
    for i in range(len(objects)):
        for later in full_masks[i + 1:]:
            visible[i] &= ~later
    image += rng.standard_normal(size=image.shape, dtype=np.float32) * np.float32(7.0)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), visible, np.stack(full_masks)


def _tight_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy box of each mask, normalised: pixel (x, y) covers [x, x+1) / S."""
    size = masks.shape[-1]
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.asarray(boxes, dtype=np.float32) / size


# ---------------------------------------------------------------------------------------------- captions


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def _canonical_noun_phrase(obj: SceneObject) -> str:
    return obj.noun_phrase


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _synonym_namer(rng: np.random.Generator):
    """Open vocabulary: obj -> "<colour word> <shape word>", a fresh synonym choice from `rng` per call."""

    def name(obj: SceneObject) -> str:
        colours, shapes = COLOUR_SYNONYMS[COLOURS[obj.colour]], SHAPE_SYNONYMS[SHAPES[obj.shape]]
        return f"{colours[int(rng.integers(len(colours)))]} {shapes[int(rng.integers(len(shapes)))]}"

    return name


def _caption_templates(objects: list[SceneObject], rng: np.random.Generator,
                       noun_phrase=_canonical_noun_phrase) -> list[str]:
    """Six paraphrases; each names every object with size, colour, shape and where it is.

    `noun_phrase(obj)` names one mention of an object ("a large red circle"); `rng` draws only the object orders.
    """
    o = objects
    n = len(o)

    def order() -> list[SceneObject]:
        return [o[i] for i in rng.permutation(n)]

    captions = []
    a = order()
    captions.append(_sentence(_join([f"{noun_phrase(x)} {position_phrase(x.cell)}" for x in a])))
    a = order()
    captions.append(_sentence("there is " + _join([f"{noun_phrase(x)} {position_phrase(x.cell)}" for x in a])))
    # A chain of pairwise relations, read left to right.
    a = sorted(o, key=lambda x: (x.cell[1], x.cell[0]))
    chain = f"{noun_phrase(a[0])} is {relation_phrase(a[0].cell, a[1].cell)} {noun_phrase(a[1])}"
    for prev, nxt in zip(a[1:], a[2:]):
        chain += f", which is {relation_phrase(prev.cell, nxt.cell)} {noun_phrase(nxt)}"
    captions.append(_sentence(chain))
    # Everything relative to one anchor object.
    a = order()
    anchor, rest = a[0], a[1:]
    captions.append(_sentence(
        f"an image of {noun_phrase(anchor)} with "
        + _join([f"{noun_phrase(x)} {relation_phrase(x.cell, anchor.cell)} it" for x in rest])
    ))
    a = order()
    captions.append(_sentence(
        f"{_NUMBER_WORDS[n]} shapes on a noisy background: "
        + _join([f"{noun_phrase(x)} {position_phrase(x.cell)}" for x in a])
    ))
    a = order()
    captions.append(_sentence(_join([f"{position_phrase(x.cell)} is {noun_phrase(x)}" for x in a])))
    return captions


# ---------------------------------------------------------------------------------------------- layouts


def _sample_objects(rng: np.random.Generator, image_size: int, n: int, first_class: int) -> list[SceneObject]:
    """n objects with distinct colours, distinct shapes and distinct grid cells."""
    first_colour, first_shape = divmod(first_class, len(SHAPES))
    colours = [first_colour] + list(rng.permutation([c for c in range(len(COLOURS)) if c != first_colour])[: n - 1])
    shapes = [first_shape] + list(rng.permutation([s for s in range(len(SHAPES)) if s != first_shape])[: n - 1])
    cells = [divmod(int(c), 3) for c in rng.choice(9, size=n, replace=False)]
    cell_px = image_size / 3
    objects = []
    for colour, shape, cell in zip(colours, shapes, cells):
        size = int(rng.integers(2))
        lo, hi = _RADIUS_RANGE[SIZES[size]]
        radius = rng.uniform(lo, hi) * image_size
        jitter = rng.uniform(-0.12, 0.12, size=2) * cell_px
        centre = ((cell[1] + 0.5) * cell_px + jitter[0], (cell[0] + 0.5) * cell_px + jitter[1])
        objects.append(SceneObject(int(shape), int(colour), size, cell, centre, float(radius)))
    return objects


def _swap(objects: list[SceneObject], kind: str, i: int, j: int) -> list[SceneObject]:
    a, b = objects[i], objects[j]
    if kind == "swap_colour":
        a2, b2 = dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour)
    elif kind == "swap_shape":
        a2, b2 = dataclasses.replace(a, shape=b.shape), dataclasses.replace(b, shape=a.shape)
    elif kind == "swap_position":
        a2 = dataclasses.replace(a, cell=b.cell, centre=b.centre)
        b2 = dataclasses.replace(b, cell=a.cell, centre=a.centre)
    else:
        raise ValueError(kind)
    out = list(objects)
    out[i], out[j] = a2, b2
    return out


def _visible_enough(visible: np.ndarray, full: np.ndarray) -> bool:
    return bool(np.all(visible.sum((1, 2)) >= MIN_VISIBLE_FRACTION * full.sum((1, 2))))


def generate_example(seed: int, split: str, index: int, image_size: int, open_vocab: bool = False) -> RenderedScene:
    """Renders example `index` of `split`, a pure function of (seed, split, index, image_size, open_vocab).

    Examples 2k and 2k+1 share their pair's layout rng; 2k+1 is the hard negative (one swap) of 2k. The pair's
    first object cycles through all 36 classes (pair k -> a fixed permutation's entry k mod 36), so every
    split with >= 72 images contains every class.

    open_vocab: name colours and shapes with synonyms (COLOUR_SYNONYMS, SHAPE_SYNONYMS), region captions without
    the size word, lexemes extracted from the region captions, and in the train split no region annotation for
    objects of NOVEL_CLASSES (`annotated`); a train pair whose base or negative image would have only novel
    objects is resampled. Otherwise the layouts and pixels are those of the closed-vocabulary scene, so the
    val/test images of an open-vocabulary config equal those of the closed-vocabulary config of the same size.
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
    pair, is_negative = divmod(index, 2)
    return _generate_pair(seed, _SPLIT_IDS[split], pair, image_size, bool(open_vocab))[is_negative]


@functools.cache
def _lexeme_extractor() -> LexemeExtractor:
    # The rule backend: builds must not depend on whether (or which) spaCy model is installed.
    return LexemeExtractor(backend="rules")


def _open_vocab_text(objs: list[SceneObject], caption_rng: np.random.Generator, synonym_rng: np.random.Generator
                     ) -> tuple[list[str], tuple[str, ...], tuple[str, ...]]:
    """(six caption templates, region captions, lexemes) of one open-vocabulary scene."""
    name = _synonym_namer(synonym_rng)
    templates = _caption_templates(objs, caption_rng, lambda x: f"a {SIZES[x.size]} {name(x)}")
    names = [name(x) for x in objs]
    region_captions = tuple(f"{_article(n)} {n} {position_phrase(x.cell)}" for n, x in zip(names, objs))
    lexemes = tuple(_lexeme_extractor().primary(region_captions))
    if list(lexemes) != names:  # a synonym the extractor splits differently would make lexemes lie
        raise ValueError(f"lexeme extraction of {region_captions} gave {lexemes}, expected {names}")
    return templates, region_captions, lexemes


@functools.lru_cache(maxsize=4)  # consecutive indices 2k, 2k+1 render the pair once
def _generate_pair(seed: int, split_id: int, pair: int, image_size: int, open_vocab: bool = False
                   ) -> tuple[RenderedScene, RenderedScene]:
    """The (base, hard negative) scenes of one pair; both must place every object visibly."""
    class_cycle = np.random.default_rng([seed, split_id, 1 << 30]).permutation(NUM_CLASSES)
    drop_novel = open_vocab and split_id == _SPLIT_IDS["train"]
    for attempt in range(100):
        layout_rng = np.random.default_rng([seed, split_id, pair, attempt])
        n = int(layout_rng.integers(2, 5))
        objects = _sample_objects(layout_rng, image_size, n, int(class_cycle[pair % NUM_CLASSES]))
        # Draw large objects first so small ones stay visible; ties keep sampling order.
        objects.sort(key=lambda x: -x.radius)
        swap_kind = ("swap_colour", "swap_shape", "swap_position")[int(layout_rng.integers(3))]
        i, j = (int(v) for v in layout_rng.choice(n, size=2, replace=False))
        variants = {"base": objects, swap_kind: _swap(objects, swap_kind, i, j)}
        render_seed = int(layout_rng.integers(1 << 31))
        if drop_novel and any(all(x.is_novel for x in objs) for objs in variants.values()):
            continue  # a training image needs at least one annotated region
        # Both images of a pair are rendered (same background rng) and must both be valid, so the negative is
        # always a faithful swap of its base.
        rendered = {}
        for kind, objs in variants.items():
            image, visible, full = _render(tuple(objs), image_size, np.random.default_rng(render_seed))
            if not _visible_enough(visible, full):
                break
            rendered[kind] = (objs, image, visible)
        else:
            scenes = []
            for is_negative, (kind, (objs, image, visible)) in enumerate(rendered.items()):
                caption_rng = np.random.default_rng([seed, split_id, pair, is_negative, 7])
                if open_vocab:
                    synonym_rng = np.random.default_rng([seed, split_id, pair, is_negative, 11])
                    templates, region_captions, lexemes = _open_vocab_text(objs, caption_rng, synonym_rng)
                else:
                    templates = _caption_templates(objs, caption_rng)
                    region_captions = tuple(x.region_caption for x in objs)
                    lexemes = tuple(x.lexeme for x in objs)
                keep = sorted(caption_rng.choice(len(templates), size=5, replace=False))
                scenes.append(RenderedScene(
                    image=image,
                    objects=tuple(objs),
                    masks=visible,
                    boxes=_tight_boxes(visible),
                    captions=tuple(templates[k] for k in keep),
                    variant=kind,
                    region_captions=region_captions,
                    lexemes=lexemes,
                    annotated=tuple(not (drop_novel and x.is_novel) for x in objs),
                ))
            return scenes[0], scenes[1]
    raise RuntimeError(f"could not place the objects of pair {pair} in split {split_id} (seed {seed})")


def encode_jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


def semantic_mask(scene: RenderedScene) -> np.ndarray:
    """uint8 (S, S): the class label of the visible object at each pixel, SEGMENTATION_IGNORE on background.

    Every object is in the mask, annotated or not (visible masks do not overlap: later objects cover earlier).
    """
    mask = np.full(scene.masks.shape[1:], SEGMENTATION_IGNORE, np.uint8)
    for obj, visible in zip(scene.objects, scene.masks):
        mask[visible] = obj.label
    return mask


def scene_record(scene: RenderedScene, split: str, index: int) -> dict:
    """The `features.record_features` dict of one rendered scene (image as JPEG bytes, never numpy).

    Regions: the annotated objects only (see `RenderedScene.annotated`). `segmentation`: the semantic mask in
    val/test, empty in train (to save space).
    """
    keep = [k for k, annotated in enumerate(scene.annotated) if annotated]
    return {
        "image": encode_jpeg(scene.image),
        "image_id": index,
        "file_name": f"scenes_{split}_{index:06d}.jpg",
        "captions": list(scene.captions),
        "regions": {
            "box": scene.boxes[keep].reshape(-1, 4),
            "caption": [scene.region_captions[k] for k in keep],
            "lexeme": [scene.lexemes[k] for k in keep],
            "label": np.asarray([scene.objects[k].label for k in keep], dtype=np.int64),
        },
        "segmentation": no_segmentation() if split == "train" else semantic_mask(scene),
    }


# ---------------------------------------------------------------------------------------------- TFDS builder


@dataclasses.dataclass
class ScenesConfig(tfds.core.BuilderConfig):
    """Size of the generated dataset. Eval splits need >= 72 images so every one of the 36 classes occurs.

    open_vocab: synonyms in all text, lexemes extracted from region captions, and no train regions of
    NOVEL_CLASSES (see `generate_example`); metadata gets `is_novel`.
    """

    image_size: int = 128
    num_train: int = 10_000
    num_val: int = 1_000
    num_test: int = 1_000
    seed: int = 0
    open_vocab: bool = False


_MIN_EVAL_IMAGES = 2 * NUM_CLASSES


class Scenes(tfds.core.GeneratorBasedBuilder):
    """Procedural image-text-regions dataset; see the module docstring and docs/scenes.md."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "Records carry a `segmentation` field (see features.py): the semantic mask in val/test, empty in "
                 "train. Open-vocabulary configs ov, ov_small, ov_tiny (synonyms, novel classes unannotated in "
                 "train, metadata `is_novel`). The images and text of default, small and tiny are unchanged.",
    }
    BUILDER_CONFIGS = [
        ScenesConfig(name="default", description="128 px, 10k train / 1k val / 1k test images."),
        ScenesConfig(name="small", description="96 px, 2k train / 200 val / 200 test images (quick demos).",
                     image_size=96, num_train=2_000, num_val=200, num_test=200),
        ScenesConfig(name="tiny", description="64 px, 96 train / 72 val / 72 test images (unit tests).",
                     image_size=64, num_train=96, num_val=72, num_test=72),
        ScenesConfig(name="ov", description="Open vocabulary (synonyms; 9 novel classes without train regions), "
                     "128 px, 10k train / 1k val / 1k test images.", open_vocab=True),
        ScenesConfig(name="ov_small", description="Open vocabulary, 96 px, 2k train / 200 val / 200 test images.",
                     image_size=96, num_train=2_000, num_val=200, num_test=200, open_vocab=True),
        ScenesConfig(name="ov_tiny", description="Open vocabulary, 64 px, 96 train / 72 val / 72 test images.",
                     image_size=64, num_train=96, num_val=72, num_test=72, open_vocab=True),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def __init__(self, *, file_format=None, **kwargs):
        # ArrayRecord gives random access for grain and needs no TensorFlow.
        super().__init__(file_format=file_format or "array_record", **kwargs)
        config = self.builder_config
        for split, count in (("val", config.num_val), ("test", config.num_test)):
            if count < _MIN_EVAL_IMAGES:
                raise ValueError(f"scenes config {config.name!r}: {split} has {count} images; eval splits need "
                                 f">= {_MIN_EVAL_IMAGES} so that all {NUM_CLASSES} classes occur")
        if config.image_size < 32:
            raise ValueError(f"scenes config {config.name!r}: image_size {config.image_size} < 32 is too small "
                             "for small objects to stay recognisable")

    def _info(self) -> tfds.core.DatasetInfo:
        metadata = {"class_names": list(CLASS_NAMES)}
        if self.builder_config.open_vocab:  # closed-vocabulary configs have no novel classes and no key
            metadata["is_novel"] = list(IS_NOVEL)
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=record_features(encoding_format="jpeg"),
            metadata=tfds.core.MetadataDict(**metadata),
        )

    def _split_generators(self, dl_manager):
        config = self.builder_config
        return {
            "train": self._generate_examples("train", config.num_train),
            "val": self._generate_examples("val", config.num_val),
            "test": self._generate_examples("test", config.num_test),
        }

    def _generate_examples(self, split: str, count: int) -> Iterator[tuple[int, dict]]:
        config = self.builder_config
        for index in range(count):
            scene = generate_example(config.seed, split, index, config.image_size, config.open_vocab)
            yield index, scene_record(scene, split, index)


def load_source(split: str, *, config: str = "default", data_dir: str | None = None, decoders=None):
    """The random-access data source of a scenes split, generating the dataset first if needed."""
    builder = Scenes(config=config, data_dir=data_dir)
    builder.download_and_prepare()
    return builder.as_data_source(split=split, decoders=decoders)


# ---------------------------------------------------------------------------------------------- preview


def draw_preview(path: str, *, seed: int = 0, image_size: int = 128, num_pairs: int = 3, scale: int = 3,
                 open_vocab: bool = False, split: str = "val") -> None:
    """Saves a PNG of `num_pairs` base/hard-negative pairs with boxes, region captions and 2 global captions
    (annotated objects only: the train split of an open-vocabulary config shows no box on novel objects)."""
    from PIL import ImageFont

    font = ImageFont.load_default()
    tile = image_size * scale
    text_height = 150
    sheet = Image.new("RGB", (tile * num_pairs * 2 + 10 * (num_pairs * 2 - 1), tile + text_height), "white")
    for k in range(num_pairs * 2):
        scene = generate_example(seed, split, k, image_size, open_vocab)
        picture = Image.fromarray(scene.image).resize((tile, tile), Image.NEAREST)
        draw = ImageDraw.Draw(picture)
        for region_caption, box, annotated in zip(scene.region_captions, scene.boxes, scene.annotated):
            if not annotated:
                continue
            x0, y0, x1, y1 = (box * tile).tolist()
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline="white", width=2)
            label = region_caption.removeprefix("a ").removeprefix("an ")
            draw.text((x0 + 2, max(0, y0 - 11)), label, fill="white", font=font, stroke_width=2, stroke_fill="black")
        x = k * (tile + 10)
        sheet.paste(picture, (x, 0))
        draw = ImageDraw.Draw(sheet)
        lines = [f"#{k} ({scene.variant})"]
        for caption in scene.captions[:2]:
            words, line = caption.split(), ""
            for word in words:  # greedy wrap to the tile width
                if draw.textlength(line + " " + word, font=font) > tile - 4:
                    lines.append(line)
                    line = word
                else:
                    line = (line + " " + word).strip()
            lines.append(line)
        for row, line in enumerate(lines[:13]):
            draw.text((x + 2, tile + 2 + 11 * row), line, fill="black", font=font)
    sheet.save(path)


def _main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preview", metavar="PNG", help="write a picture of a few samples to this path")
    parser.add_argument("--build", metavar="CONFIG",
                        help="generate this config (default/small/tiny/ov/ov_small/ov_tiny) into --data_dir")
    parser.add_argument("--open_vocab", action="store_true", help="--preview: open-vocabulary text")
    parser.add_argument("--split", default="val", choices=sorted(_SPLIT_IDS), help="--preview: the split shown")
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args(argv)
    if args.preview:
        draw_preview(args.preview, open_vocab=args.open_vocab, split=args.split)
        print(f"wrote {args.preview}")
    if args.build:
        import time

        start = time.perf_counter()
        builder = Scenes(config=args.build, data_dir=args.data_dir)
        builder.download_and_prepare()
        print(f"built scenes/{args.build} in {time.perf_counter() - start:.1f} s at {builder.data_dir}")
    if not (args.preview or args.build):
        parser.print_help()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(cli.run(_main))
