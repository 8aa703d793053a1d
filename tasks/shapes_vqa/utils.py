"""shapes_vqa task hooks. Images are opened relative to this file, so the tasks work from any cwd."""

from __future__ import annotations

import re
import string
from pathlib import Path

from PIL import Image

IMAGE_DIR = Path(__file__).resolve().parent / "images"
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def doc_to_visual(doc):
    with Image.open(IMAGE_DIR / doc["image"]) as im:
        im.load()
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace."""
    return " ".join(_PUNCT.sub(" ", str(text).lower()).split())


def process_results(doc, results):
    pred = results[0] if results else ""
    return {"exact_match": float(normalize_answer(pred) == normalize_answer(doc["answer"]))}
