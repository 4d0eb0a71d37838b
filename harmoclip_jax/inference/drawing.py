"""Drawing predictions: boxes with their top labels on the image (kept apart from the predictor, as plotting is)."""
from __future__ import annotations

from PIL import Image

from harmoclip_jax.inference.inputs import ImageInput, load_pil_image
from harmoclip_jax.inference.predictor import RegionClassification


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
