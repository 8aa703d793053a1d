"""tokprune_video_smoke task hooks: a clip is given as its path (what lmms-eval's video tasks give), an image opened."""

from __future__ import annotations

import re
import string
from pathlib import Path

from PIL import Image

TASK_DIR = Path(__file__).resolve().parent
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def video_smoke_doc_to_visual(doc):
    path = TASK_DIR / doc["visual"]
    if path.suffix == ".mp4":
        return [str(path)]
    with Image.open(path) as im:
        im.load()
        return [im.copy()]


def video_smoke_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def normalize_answer(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", str(text).lower()).split())


def video_smoke_process_results(doc, results):
    pred = results[0] if results else ""
    return {"exact_match": float(normalize_answer(pred) == normalize_answer(doc["answer"]))}
