"""tokprune_smoke task hooks. Images are opened relative to this file, so the task works from any cwd."""

from __future__ import annotations

import re
import string
from pathlib import Path

from PIL import Image

TASK_DIR = Path(__file__).resolve().parent
IMAGE_DIR = TASK_DIR / "images"

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def _open(name: str) -> Image.Image:
    path = Path(name)
    if not path.is_absolute():
        path = IMAGE_DIR / path
    with Image.open(path) as im:
        im.load()
        return im.copy()  # keep the mode (RGB / L / RGBA): converting is the model's job


def smoke_doc_to_visual(doc):
    return [_open(name) for name in doc["images"]]


def smoke_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace."""
    return " ".join(_PUNCT.sub(" ", str(text).lower()).split())


def smoke_process_results(doc, results):
    pred = results[0] if results else ""
    return {"exact_match": float(normalize_answer(pred) == normalize_answer(doc["answer"]))}
