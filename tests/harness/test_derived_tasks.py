"""Derived standard tasks (new names, since built-in names win): their configs and prompt hooks.

The hub datasets cannot be downloaded here, so the YAMLs are loaded with lmms-eval's own loader and
their hooks run on hand-made documents shaped like the real ones.
"""

from __future__ import annotations

from pathlib import Path

import datasets
from PIL import Image

TASKS = Path(__file__).resolve().parents[2] / "tasks"


def _load(rel: str) -> dict:
    from lmms_eval.utils import load_yaml_config

    return load_yaml_config(str(TASKS / rel), mode="full")


def test_textvqa_val_ocr_prompt_matches_llava_textvqa_eval():
    cfg = _load("textvqa_val_ocr/textvqa_val_ocr.yaml")
    assert cfg["task"] == "textvqa_val_ocr" and cfg["dataset_path"] == "lmms-lab-encoder/textvqa"
    kwargs = cfg["lmms_eval_specific_kwargs"]["default"]
    doc = {"question": "what is written on the sign?", "ocr_tokens": ["STOP", "ahead"]}
    assert cfg["doc_to_text"](doc, kwargs) == (
        "What is written on the sign?\nReference OCR token: STOP, ahead\nAnswer the question using a single word or phrase."
    )


def test_seedbench_img_keeps_image_questions_only():
    cfg = _load("seedbench_img/seedbench_img.yaml")
    assert cfg["task"] == "seedbench_img"
    rows = {
        "data_type": ["image", "video", "image"],
        "question": ["q1", "q2", "q3"],
        "image": [[Image.new("RGB", (4, 4))]] * 3,
    }
    kept = cfg["process_docs"](datasets.Dataset.from_dict(rows))
    assert kept["question"] == ["q1", "q3"]


def test_derived_task_names_do_not_clash_with_builtins():
    from lmms_eval.tasks import TaskManager

    builtin = set(TaskManager("WARNING").all_tasks)
    assert "textvqa_val_ocr" not in builtin and "seedbench_img" not in builtin
    ours = set(TaskManager("WARNING", include_path=str(TASKS)).all_tasks)
    assert {"textvqa_val_ocr", "seedbench_img", "tokprune_smoke"} <= ours
