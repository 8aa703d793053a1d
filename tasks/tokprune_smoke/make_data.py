"""Regenerate the tokprune_smoke data (deterministic): ``python tasks/tokprune_smoke/make_data.py``.

Writes ``images/*.png`` (simple coloured shapes drawn with PIL from a fixed seed; a mix of sizes, one
non-square, one grayscale (mode L), one RGBA, one doc with two images) and ``data/test.jsonl`` (one doc per line:
``id``, ``question``, ``answer`` (one word), ``category``, ``images`` = file names relative to ``images/``).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SEED = 1234

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ["circle", "square", "triangle"]
BACKGROUNDS = [(255, 255, 255), (235, 235, 235), (20, 20, 20)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(shape)


def _place(rng: random.Random, w: int, h: int, n: int, r: float) -> list[tuple[float, float]]:
    """n non-overlapping centres for shapes of radius r inside a w x h canvas."""
    out: list[tuple[float, float]] = []
    for _ in range(10_000):
        if len(out) == n:
            break
        c = (rng.uniform(r + 4, w - r - 4), rng.uniform(r + 4, h - r - 4))
        if all((c[0] - o[0]) ** 2 + (c[1] - o[1]) ** 2 > (2.3 * r) ** 2 for o in out):
            out.append(c)
    if len(out) != n:
        raise RuntimeError("could not place shapes")
    return out


def _scene(rng: random.Random, size, items, mode="RGB", bg=None):
    """items: list of (shape, colour name). Returns a PIL image of the requested mode."""
    w, h = size
    bg = bg if bg is not None else rng.choice(BACKGROUNDS[:2])
    if mode == "RGBA":
        img = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    else:
        img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    r = min(w, h) / (4.5 + 1.5 * len(items))
    for (shape, colour), (cx, cy) in zip(items, _place(rng, w, h, len(items), r)):
        fill = COLOURS[colour] + ((255,) if mode == "RGBA" else ())
        _draw_shape(draw, shape, cx, cy, r, fill)
    if mode == "L":
        img = img.convert("L")
    return img


def build() -> list[dict]:
    rng = random.Random(SEED)
    img_dir = HERE / "images"
    img_dir.mkdir(exist_ok=True)
    for old in img_dir.glob("*.png"):
        old.unlink()
    docs: list[dict] = []
    sizes = [(336, 336)] * 3 + [(400, 300), (256, 256), (500, 336), (300, 420)]

    def save(img: Image.Image, name: str) -> str:
        img.save(img_dir / name, optimize=True)
        return name

    def add(category, question, answer, images):
        docs.append({"id": f"smoke_{len(docs):03d}", "category": category, "question": question, "answer": answer, "images": images})

    # colour (6)
    for i in range(6):
        shape, colour = SHAPES[i % 3], list(COLOURS)[i % 4]
        img = _scene(rng, sizes[i % len(sizes)], [(shape, colour)])
        add("colour", f"What colour is the {shape}?", colour, [save(img, f"colour_{i}.png")])
    # shape (6)
    for i in range(6):
        shape, colour = SHAPES[(i + 1) % 3], list(COLOURS)[(i + 2) % 4]
        img = _scene(rng, sizes[(i + 3) % len(sizes)], [(shape, colour)])
        add("shape", "What shape is shown in the image?", shape, [save(img, f"shape_{i}.png")])
    # count (5)
    for i in range(5):
        shape, n = SHAPES[i % 3], 1 + (i % 4)
        items = [(shape, rng.choice(list(COLOURS))) for _ in range(n)]
        img = _scene(rng, (336, 336), items)
        add("count", f"How many {shape}s are there in the image?", str(n), [save(img, f"count_{i}.png")])
    # yes/no (4)
    for i in range(4):
        shape, colour = SHAPES[i % 3], list(COLOURS)[(i + 1) % 4]
        present = i % 2 == 0
        other = [c for c in COLOURS if c != colour][i % 3]
        img = _scene(rng, sizes[(i + 5) % len(sizes)], [(shape, colour if present else other), (SHAPES[(i + 1) % 3], other)])
        add("yesno", f"Is there a {colour} {shape} in the image?", "yes" if present else "no", [save(img, f"yesno_{i}.png")])
    # special modes: grayscale (L) and RGBA
    img = _scene(rng, (336, 336), [("triangle", "red")], mode="L")
    add("shape", "What shape is shown in the image?", "triangle", [save(img, "gray_L.png")])
    img = _scene(rng, (360, 300), [("circle", "blue")], mode="RGBA")
    add("colour", "What colour is the circle?", "blue", [save(img, "rgba.png")])
    # two images in one doc
    a = _scene(rng, (336, 336), [("square", "green")])
    b = _scene(rng, (400, 300), [("square", "green")])
    add("two_images", "Are the shapes in the two images the same colour?", "yes", [save(a, "pair_a.png"), save(b, "pair_b.png")])

    data_dir = HERE / "data"
    data_dir.mkdir(exist_ok=True)
    with open(data_dir / "test.jsonl", "w") as f:
        f.writelines(json.dumps(d, sort_keys=True) + "\n" for d in docs)
    return docs


if __name__ == "__main__":
    docs = build()
    n_img = sum(len(d["images"]) for d in docs)
    print(f"wrote {len(docs)} docs, {n_img} images to {HERE}")
