"""Drawing predictions (kept apart from the predictor, as plotting is): boxes with their top labels, similarity
maps as heat-map overlays, label maps with a colour legend."""
from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image

from harmoclip_jax.inference.inputs import ImageInput, load_pil_image
from harmoclip_jax.inference.predictor import RegionClassification, Segmentation, SimilarityMaps


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _label_place(box, w, h, line, size, placed, boxes) -> tuple[float, float]:
    """Where a w x h label of `box` goes: above or below it (left- or right-aligned) or inside its top, whichever
    covers the least of the earlier labels (weighted 10x) and of all boxes."""
    x1, y1, x2, y2 = box
    width, height = size
    candidates = [(x, y) for y in (y1 - h, y2) for x in (x1, x2 - w)] + [(x1 + line, y1 + line)]
    candidates = [(min(max(0.0, x), width - w), min(max(0.0, y), height - h)) for x, y in candidates]

    def cost(place):
        rect = (*place, place[0] + w, place[1] + h)
        return 10 * sum(_overlap(rect, r) for r in placed) + sum(_overlap(rect, b) for b in boxes)

    return min(candidates, key=cost)


_PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4",
            "#469990", "#9a6324", "#800000")


def draw_regions(image: ImageInput, result: RegionClassification, *, min_side: int = 512,
                 show: int = 1) -> Image.Image:
    """The image with every box and its top `show` labels and scores drawn on it (upscaled so that its longer side
    is at least `min_side` pixels, so labels stay readable on small images)."""
    from PIL import ImageDraw, ImageFont

    picture = load_pil_image(image)
    scale = max(1.0, min_side / max(picture.size))
    if scale > 1:
        picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.BICUBIC)
    draw = ImageDraw.Draw(picture)
    font_size = max(12, round(max(picture.size) / 26))
    font = ImageFont.load_default(size=font_size)
    line = max(2, round(font_size / 6))
    placed: list[tuple[float, float, float, float]] = []
    boxes = [tuple(v * scale for v in p.box) for p in result.top_k]
    for t, prediction in enumerate(result.top_k):
        colour = _PALETTE[t % len(_PALETTE)]
        x1, y1, x2, y2 = (v * scale for v in prediction.box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
        text = "\n".join(f"{label} {score:.2f}" for label, score in
                         list(zip(prediction.labels, prediction.scores))[:show])
        left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
        w, h = right - left + 6, bottom - top + 6
        tx, ty = _label_place((x1, y1, x2, y2), w, h, line, picture.size, placed, boxes)
        placed.append((tx, ty, tx + w, ty + h))
        draw.rectangle([tx, ty, tx + w, ty + h], fill=colour)
        draw.multiline_text((tx + 3 - left, ty + 3 - top), text, fill="white", font=font, stroke_width=1,
                            stroke_fill="black")
    return picture


def _render(fig) -> Image.Image:
    """A bare matplotlib Figure (no pyplot: notebooks keep their backend) -> RGB PIL image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def _panel_size(size: tuple[int, int], panel_inches: float) -> tuple[float, float]:
    width, height = size
    return (panel_inches, panel_inches * height / width) if width >= height else \
        (panel_inches * width / height, panel_inches)


def draw_similarity_maps(image: ImageInput, maps: SimilarityMaps, *, panel_inches: float = 3.2,
                         alpha: float = 0.55) -> Image.Image:
    """The image, then one panel per text: its cosine map over the image (one colour scale for every panel, so
    panels compare; a colour bar), the text as the panel's title and a cross at the map's peak."""
    from matplotlib.figure import Figure

    picture = np.asarray(load_pil_image(image))
    n = len(maps.texts) + 1
    pw, ph = _panel_size(maps.image_size, panel_inches)
    fig = Figure(figsize=(pw * n + 0.9, ph + 0.7), dpi=110, layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    low, high = float(maps.cosine.min()), float(maps.cosine.max())
    axes[0].imshow(picture)
    axes[0].set_title("image", fontsize=10)
    shown = None
    for t, (ax, text, cosine) in enumerate(zip(axes[1:], maps.texts, maps.cosine)):
        ax.imshow(picture)
        shown = ax.imshow(cosine, cmap="inferno", alpha=alpha, vmin=low, vmax=high)
        ax.plot(*maps.peak(t), marker="+", color="cyan", markersize=12, markeredgewidth=2)
        ax.set_title("\n".join(textwrap.wrap(f'"{text}"', 28)), fontsize=10)
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(shown, ax=list(axes), fraction=0.03, pad=0.01, label="cosine")
    return _render(fig)


def draw_segmentation(image: ImageInput, segmentation: Segmentation, *, panel_inches: float = 3.6,
                      alpha: float = 0.6, max_legend: int = 12) -> Image.Image:
    """The image beside its label map (colours over the image), with a legend of the labels present, largest share
    of the pixels first. The `max_legend` largest get their own colour; the rest are grey, as "other"."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    picture = np.asarray(load_pil_image(image))
    areas = {k: v for k, v in segmentation.areas().items() if k != "background"}
    shown = list(areas)[:max_legend]
    tones = colormaps["tab20"].colors
    palette = [tones[i] for i in range(0, 20, 2) if i != 14] + [tones[i] for i in range(1, 20, 2) if i != 15]  # no grey
    colours = np.full((len(segmentation.labels), 3), 0.55)  # "other": grey
    index = {label: i for i, label in enumerate(segmentation.labels)}
    for rank, label in enumerate(shown):
        colours[index[label]] = palette[rank % len(palette)]  # the strong tones first
    overlay = np.zeros((*segmentation.label_map.shape, 4), np.float32)
    known = segmentation.label_map >= 0
    overlay[known, :3] = colours[segmentation.label_map[known]]
    overlay[known, 3] = alpha
    pw, ph = _panel_size(segmentation.image_size, panel_inches)
    fig = Figure(figsize=(2 * pw + 2.4, ph + 0.6), dpi=110, layout="constrained")
    axes = fig.subplots(1, 2, squeeze=False)[0]
    axes[0].imshow(picture)
    axes[0].set_title("image", fontsize=10)
    axes[1].imshow(picture)
    axes[1].imshow(overlay)
    axes[1].set_title("zero-shot labels" + (f" (none below p = {segmentation.background:g})"
                                             if segmentation.background is not None else ""), fontsize=10)
    for ax in axes:
        ax.set_axis_off()
    handles = [Patch(facecolor=colours[index[label]], label=f"{label} {areas[label]:.0%}") for label in shown]
    rest = sum(areas[label] for label in list(areas)[max_legend:])
    if rest:
        handles.append(Patch(facecolor=(0.55,) * 3, label=f"{len(areas) - max_legend} other labels {rest:.0%}"))
    background = segmentation.areas().get("background")
    if background:
        handles.append(Patch(facecolor="none", edgecolor="black", label=f"no label {background:.0%}"))
    fig.legend(handles=handles, loc="outside right center", fontsize=9, frameon=False)
    return _render(fig)
