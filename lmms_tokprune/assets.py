"""Short names for the checkpoints shipped inside the package (no network needed).

``pretrained=demo`` -> ``lmms_tokprune/assets/demo_llava`` (a small LLaVA-1.5-shaped model trained on the
synthetic shapes_vqa benchmark, see ``lmms-tokprune train-demo``); ``text_encoder=demo`` ->
``lmms_tokprune/assets/demo_clip`` (its CLIP: text tower + projections, vision = the same ViT).
Any other name is returned unchanged.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEMO_NAMES = {"demo": "demo_llava", "demo_llava": "demo_llava", "demo_clip": "demo_clip"}
CLIP_DEMO_NAMES = {"demo": "demo_clip", "demo_clip": "demo_clip"}


def resolve_checkpoint(name, kind: str = "llava"):
    """The shipped folder for a short name (``demo``), else ``name`` itself. ``kind``: 'llava' or 'clip'."""
    if not isinstance(name, str):
        return name
    table = CLIP_DEMO_NAMES if kind == "clip" else DEMO_NAMES
    key = name.strip()
    if key not in table:
        return name
    folder = ASSETS_DIR / table[key]
    if not (folder / "config.json").is_file():
        raise ValueError(f"{name!r} names the shipped demo checkpoint, but {folder} is missing; reinstall lmms-tokprune "
                         "or rebuild it with `lmms-tokprune train-demo --install`")
    return str(folder)
