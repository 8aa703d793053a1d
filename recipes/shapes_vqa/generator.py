"""Deterministic synthetic scenes and VQA questions (the `shapes_vqa` benchmark).

A scene is 336x336 (LLaVA-1.5's input size) with 1-8 shapes (5 shapes x 6 colours x 3 sizes, the small ones
1-2 CLIP patches wide, all on the 14-px patch grid), optionally one rendered word (its box also starts on the
grid), on a plain or cluttered background. Questions come in five
families that mirror the standard benchmarks:

==========  =====================================================  ==================
family      question                                               mirrors
==========  =====================================================  ==================
attribute   What colour is the star? / What shape is the red ...   GQA / VQAv2 attr.
counting    How many circles are there? / How many blue objects?   VQAv2 "number"
existence   Is there a green square in the image? (yes/no 50/50)   POPE (adversarial)
reading     What word is written in the image?                     TextVQA
relation    Is the red circle to the left of the blue star?        GQA relations
==========  =====================================================  ==================

Everything is a pure function of ``(split, index)``: ``scene_for(split, i)`` draws from
``random.Random(SPLIT_SEEDS[split] + i)``, so splits never overlap and any item can be regenerated alone.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 336
SPLIT_SEEDS = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}
FAMILIES = ("attribute", "counting", "existence", "reading", "relation")
POST_PROMPT = "\nAnswer the question using a single word or phrase."

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (30, 165, 60),
    "blue": (35, 75, 225),
    "yellow": (240, 205, 20),
    "purple": (135, 50, 180),
    "orange": (245, 125, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
PLURALS = {s: s + "s" for s in SHAPES}
# Shapes sit on CLIP's 14-px patch grid and measure whole patches (small: 1-2, medium: 3, large: 4-5 patches wide).
# Why: the demo ViT is trained from scratch in minutes on a CPU; a ViT's linear patch embedding has no shift
# invariance, so shapes at arbitrary sub-patch offsets are far too data-hungry to learn in that budget (a linear
# probe read shape at chance after 1,300 s of CLIP training). A word's box starts on the grid too (its glyphs
# then look the same in every scene, so reading is learnable in that budget).
PATCH = 14
SIZES = {"small": (1, 2), "medium": (3, 3), "large": (4, 5)}  # in patches
WORDS = ("cat", "dog", "car", "bus", "tree", "house", "sky", "water", "road", "sign", "man", "child", "book", "fish", "moon", "ship")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")

# Backgrounds are pale and unsaturated (or dark gray) so they never look like one of the named colours.
PLAIN_BACKGROUNDS = ((255, 255, 255), (228, 228, 228), (242, 234, 218), (222, 230, 240), (58, 58, 62))


@dataclass
class Obj:
    kind: str  # a shape name, or "text"
    colour: str  # colour name (text: "black" / "white")
    size: str  # small / medium / large (text: its font size class)
    box: Tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    word: Optional[str] = None

    @property
    def centre(self) -> Tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass
class Scene:
    split: str
    index: int
    background: str  # plain / cluttered
    bg_colour: Tuple[int, int, int]
    objects: List[Obj] = field(default_factory=list)
    clutter: List[Tuple] = field(default_factory=list)  # drawing primitives, drawn before the objects
    rng_state: int = 0

    @property
    def shapes(self) -> List[Obj]:
        return [o for o in self.objects if o.kind != "text"]

    @property
    def text(self) -> Optional[Obj]:
        return next((o for o in self.objects if o.kind == "text"), None)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("clutter")
        return d


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _overlaps(box, boxes, margin: int = 4) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin for b in boxes)


def _place(rng: random.Random, w: int, h: int, boxes, grid: int = 1) -> Optional[Tuple[int, int, int, int]]:
    for _ in range(200):
        if grid > 1:  # top-left corner on the patch grid, whole patches, one patch margin to other objects
            x0 = grid * rng.randint(0, (IMAGE_SIZE - w) // grid)
            y0 = grid * rng.randint(0, (IMAGE_SIZE - h) // grid)
            box = (x0, y0, x0 + w, y0 + h)
            snapped = [(b[0] // grid * grid, b[1] // grid * grid, -(-b[2] // grid) * grid, -(-b[3] // grid) * grid) for b in boxes]
            if not _overlaps(box, snapped, margin=1):  # never shares a patch with another object
                return box
            continue
        else:
            x0 = rng.randint(4, IMAGE_SIZE - w - 4)
            y0 = rng.randint(4, IMAGE_SIZE - h - 4)
        box = (x0, y0, x0 + w, y0 + h)
        if not _overlaps(box, boxes):
            return box
    return None


def _clutter(rng: random.Random, base: Tuple[int, int, int]) -> List[Tuple]:
    """Low-saturation distractors: faint panels, thin lines and small specks."""
    dark = sum(base) < 300
    items: List[Tuple] = []

    def grey(lo, hi):
        v = rng.randint(lo, hi)
        return (v, v, v)

    for _ in range(rng.randint(2, 4)):
        x0, y0 = rng.randint(0, IMAGE_SIZE - 60), rng.randint(0, IMAGE_SIZE - 60)
        items.append(("rect", (x0, y0, x0 + rng.randint(50, 170), y0 + rng.randint(50, 170)), grey(70, 95) if dark else grey(200, 235)))
    for _ in range(rng.randint(8, 18)):
        pts = (rng.randint(0, IMAGE_SIZE), rng.randint(0, IMAGE_SIZE), rng.randint(0, IMAGE_SIZE), rng.randint(0, IMAGE_SIZE))
        items.append(("line", pts, grey(100, 140) if dark else grey(120, 190), rng.randint(1, 2)))
    for _ in range(rng.randint(15, 40)):
        x, y, r = rng.randint(0, IMAGE_SIZE), rng.randint(0, IMAGE_SIZE), rng.randint(1, 3)
        items.append(("dot", (x - r, y - r, x + r, y + r), grey(90, 150) if dark else grey(110, 170)))
    return items


def sample_scene(split: str, index: int, *, n_objects: Optional[int] = None, with_text: Optional[bool] = None) -> Scene:
    """The scene ``index`` of ``split`` (deterministic). ``n_objects`` / ``with_text`` force a layout."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLIT_SEEDS)}")
    rng = random.Random(SPLIT_SEEDS[split] + index)
    cluttered = rng.random() < 0.5
    bg = PLAIN_BACKGROUNDS[rng.randrange(len(PLAIN_BACKGROUNDS))]
    scene = Scene(split, index, "cluttered" if cluttered else "plain", bg)
    if cluttered:
        scene.clutter = _clutter(rng, bg)
    n = n_objects if n_objects is not None else rng.randint(1, 8)
    text = with_text if with_text is not None else rng.random() < 0.5
    boxes: List[Tuple[int, int, int, int]] = []
    if text:
        word = WORDS[rng.randrange(len(WORDS))]
        fsize = rng.choice((26, 30, 34, 40))
        l, t, r, b = _font(fsize).getbbox(word)
        pad = 5
        box = _place(rng, r - l + 2 * pad, b - t + 2 * pad, boxes, grid=PATCH)
        if box is not None:
            ink = "white" if sum(bg) < 300 and rng.random() < 0.8 else "black"
            scene.objects.append(Obj("text", ink, str(fsize), box, word))
            boxes.append(box)
    for _ in range(n):
        size = rng.choice(tuple(SIZES))
        lo, hi = SIZES[size]
        s = PATCH * rng.randint(lo, hi)
        box = _place(rng, s, s, boxes, grid=PATCH)
        if box is None:
            continue
        scene.objects.append(Obj(SHAPES[rng.randrange(len(SHAPES))], tuple(COLOURS)[rng.randrange(len(COLOURS))], size, box))
        boxes.append(box)
    scene.rng_state = rng.randrange(2**31)
    return scene


def _star(box) -> List[Tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2 + (y1 - y0) * 0.04, (x1 - x0) / 2
    pts = []
    for i in range(10):
        a = -math.pi / 2 + i * math.pi / 5
        rr = r if i % 2 == 0 else r * 0.45
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def render(scene: Scene) -> Image.Image:
    """The scene as a 336x336 RGB image (deterministic; colours get a small per-object jitter)."""
    rng = random.Random(scene.rng_state)
    im = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.bg_colour)
    draw = ImageDraw.Draw(im)
    for item in scene.clutter:
        if item[0] == "rect":
            draw.rectangle(item[1], fill=item[2])
        elif item[0] == "line":
            draw.line(item[1], fill=item[2], width=item[3])
        else:
            draw.ellipse(item[1], fill=item[2])
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        if o.kind == "text":
            fill = (20, 20, 20) if o.colour == "black" else (245, 245, 245)
            font = _font(int(o.size))
            l, t, _, _ = font.getbbox(o.word)
            draw.text((x0 + 5 - l, y0 + 5 - t), o.word, fill=fill, font=font)
            continue
        base = COLOURS[o.colour]
        _draw_shape(draw, o, tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in base))
    return im


def _draw_shape(draw: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    x0, y0, x1, y1 = o.box
    box = (x0, y0, x1 - 1, y1 - 1)
    if o.kind == "circle":
        draw.ellipse(box, fill=fill)
    elif o.kind == "square":
        draw.rectangle(box, fill=fill)
    elif o.kind == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    elif o.kind == "star":
        draw.polygon(_star(box), fill=fill)
    elif o.kind == "diamond":
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, (y0 + y1) / 2), ((x0 + x1) / 2, y1 - 1), (x0, (y0 + y1) / 2)], fill=fill)


def patch_coverage(obj: Obj, patch: int = 14) -> List[Tuple[int, float]]:
    """(patch index, fraction of that patch the shape covers) for every patch the shape touches.

    Why: dense (per-patch) supervision of the demo ViT needs to know which patches show which object; the
    mask is drawn with the renderer's own geometry, so it is exact, occlusion aside (objects never overlap).
    """
    if obj.kind == "text":
        raise ValueError("patch_coverage is defined for shapes, not text")
    im = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    _draw_shape(ImageDraw.Draw(im), obj, 255)
    mask = np.asarray(im, dtype=np.float64) / 255.0
    x0, y0, x1, y1 = obj.box
    grid = IMAGE_SIZE // patch
    out = []
    for r in range(y0 // patch, (y1 - 1) // patch + 1):
        for c in range(x0 // patch, (x1 - 1) // patch + 1):
            cov = float(mask[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].mean())
            if cov > 0:
                out.append((r * grid + c, cov))
    return out


def box_patches(obj: Obj, patch: int = 14) -> List[int]:
    """Patch indices (row-major) of the object's box: shapes and words sit on the patch grid, so these are
    the image tokens that show the object (shapes may leave corner patches empty: see :func:`patch_coverage`)."""
    x0, y0, x1, y1 = obj.box
    grid = IMAGE_SIZE // patch
    return [r * grid + c for r in range(y0 // patch, (y1 - 1) // patch + 1) for c in range(x0 // patch, (x1 - 1) // patch + 1)]


# ------------------------------------------------------------------------------------------------ questions
@dataclass
class Question:
    family: str
    question: str
    answer: str
    # the objects the question is about (none for a "no" existence question): the grounding target of training
    about: Tuple[Obj, ...] = field(default=(), compare=False, repr=False)


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _unique(objs: Sequence[Obj], key) -> Dict[str, Obj]:
    groups: Dict[str, List[Obj]] = {}
    for o in objs:
        groups.setdefault(key(o), []).append(o)
    return {k: v[0] for k, v in groups.items() if len(v) == 1}


def questions_for(scene: Scene, family: str, rng: random.Random) -> List[Question]:
    """All (or a sample of) the valid questions of one family for a scene; empty when none applies."""
    shapes = scene.shapes
    out: List[Question] = []
    if family == "attribute":
        for s, o in sorted(_unique(shapes, lambda o: o.kind).items()):
            out.append(Question(family, f"What colour is the {s}?", o.colour, (o,)))
        for c, o in sorted(_unique(shapes, lambda o: o.colour).items()):
            out.append(Question(family, f"What shape is the {c} object?", o.kind, (o,)))
    elif family == "counting":
        kinds = sorted({o.kind for o in shapes})
        colours = sorted({o.colour for o in shapes})
        for s in kinds:
            hits = tuple(o for o in shapes if o.kind == s)
            out.append(Question(family, f"How many {PLURALS[s]} are there?", str(len(hits)), hits))
        for c in colours:
            hits = tuple(o for o in shapes if o.colour == c)
            out.append(Question(family, f"How many {c} objects are there?", str(len(hits)), hits))
        out.append(Question(family, "How many shapes are there?", str(len(shapes)), tuple(shapes)))
        absent = [s for s in SHAPES if s not in kinds]
        if absent and rng.random() < 0.3:
            out.append(Question(family, f"How many {PLURALS[rng.choice(absent)]} are there?", "0"))
    elif family == "existence":
        present = sorted({(o.colour, o.kind) for o in shapes})
        for c, s in present:
            hits = tuple(o for o in shapes if (o.colour, o.kind) == (c, s))
            out.append(Question(family, f"Is there {_a(c)} {c} {s} in the image?", "yes", hits))
        # POPE-style negatives: half adversarial (a present colour or shape), half random.
        kinds, colours = {o.kind for o in shapes}, {o.colour for o in shapes}
        pool = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        adv = [p for p in pool if p[0] in colours or p[1] in kinds]
        negs: List[Tuple[str, str]] = []
        while len(negs) < len(present) and pool:
            src = adv if adv and rng.random() < 0.5 else pool
            p = src[rng.randrange(len(src))]
            if p not in negs:
                negs.append(p)
            if len(negs) >= len(pool):
                break
        for c, s in negs:
            out.append(Question(family, f"Is there {_a(c)} {c} {s} in the image?", "no"))
    elif family == "reading":
        t = scene.text
        if t is not None:
            q = rng.choice(("What word is written in the image?", "What does the text say?", "What word is shown in the picture?"))
            out.append(Question(family, q, t.word, (t,)))
    elif family == "relation":
        named = sorted(_unique(shapes, lambda o: o.name).values(), key=lambda o: o.name)
        for i, a in enumerate(named):
            for b in named[i + 1:]:
                (ax, ay), (bx, by) = a.centre, b.centre
                opts = []
                if abs(ax - bx) >= 40:
                    opts.append(("horizontal", ax < bx))
                if abs(ay - by) >= 40:
                    opts.append(("vertical", ay < by))
                for axis, a_first in opts:
                    first, second = (a, b) if rng.random() < 0.5 else (b, a)
                    truth = a_first if first is a else not a_first  # first is left of / above second
                    ask_true = rng.random() < 0.5
                    if axis == "horizontal":
                        rel = ("to the left of" if truth else "to the right of") if ask_true else ("to the right of" if truth else "to the left of")
                    else:
                        rel = ("above" if truth else "below") if ask_true else ("below" if truth else "above")
                    out.append(Question(family, f"Is the {first.name} {rel} the {second.name}?", "yes" if ask_true else "no", (first, second)))
    else:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    return out


def caption(scene: Scene, rng: random.Random) -> str:
    """A CLIP training caption listing every object (random order), its size, and the background."""
    parts = []
    for o in rng.sample(scene.objects, len(scene.objects)):
        if o.kind == "text":
            parts.append(f'the word "{o.word}"')
        else:
            parts.append(f"{_a(o.size)} {o.size} {o.colour} {o.kind}")
    n = len(scene.shapes)
    head = f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} shape{'s' if n != 1 else ''}"
    body = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1] if parts else "nothing"
    return f"{head} on a {scene.background} background: {body}."


def corpus_sentences() -> List[str]:
    """Vocabulary of the benchmark, for the tokenizers of the demo checkpoint."""
    lines = []
    for c in COLOURS:
        for s in SHAPES:
            lines.append(f"Is there a {c} {s} in the image? What colour is the {s}? What shape is the {c} object? How many {PLURALS[s]} are there? How many {c} objects are there?")
            lines.append(f"a small {c} {s}, a medium {c} {s}, a large {c} {s}, {PLURALS[s]}")
    for w in WORDS:
        lines.append(f'What word is written in the image? What does the text say? the word "{w}" {w}')
    lines.append("Is the red circle to the left of the blue star? to the right of above below How many shapes are there? "
                 "What word is shown in the picture? on a plain background cluttered background " + " ".join(NUMBER_WORDS))
    return lines * 3
