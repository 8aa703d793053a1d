"""The shapes_vqa benchmark generator and its committed lmms-eval test split (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes.shapes_vqa import FAMILIES, caption, questions_for, render, sample_scene, training_items
from recipes.shapes_vqa import test_docs as generated_test_docs  # renamed: pytest would collect a test_* name

REPO = Path(__file__).resolve().parents[2]
TASK_DIR = REPO / "tasks" / "shapes_vqa"


def test_generator_is_deterministic():
    import random

    import numpy as np

    for split in ("train", "val", "test"):
        a, b = sample_scene(split, 7), sample_scene(split, 7)
        assert a.to_dict() == b.to_dict()
        assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
        assert render(a).size == (336, 336)
        qa = [questions_for(a, f, random.Random(1)) for f in FAMILIES]
        qb = [questions_for(b, f, random.Random(1)) for f in FAMILIES]
        assert qa == qb
        assert caption(a, random.Random(2)) == caption(b, random.Random(2))
    assert sample_scene("train", 3).to_dict() != sample_scene("test", 3).to_dict()
    t1, t2 = training_items("train", 5), training_items("train", 5)
    assert [x["questions"] for x in t1] == [x["questions"] for x in t2]


def test_scenes_cover_the_spec():
    scenes = [sample_scene("train", i) for i in range(200)]
    counts = {len(s.shapes) for s in scenes}
    assert min(counts) >= 1 and max(counts) <= 8 and len(counts) >= 7
    assert {s.background for s in scenes} == {"plain", "cluttered"}
    assert any(s.text is not None for s in scenes) and any(s.text is None for s in scenes)
    assert {o.size for s in scenes for o in s.shapes} == {"small", "medium", "large"}
    with pytest.raises(ValueError, match="unknown split"):
        sample_scene("dev", 0)


def test_committed_test_split_matches_the_generator():
    docs = generated_test_docs()
    for fam in FAMILIES:
        rows = [json.loads(line) for line in (TASK_DIR / "data" / f"{fam}.jsonl").read_text().splitlines()]
        assert len(rows) == 50
        assert [(r["question"], r["answer"], r["image"]) for r in rows] == [(d["question"], d["answer"], d["image"]) for d in docs[fam]]
        if fam in ("existence", "relation"):
            assert sum(r["answer"] == "yes" for r in rows) == 25  # balanced like POPE
        for r in rows:
            assert (TASK_DIR / "images" / r["image"]).is_file()
    total = sum(p.stat().st_size for p in TASK_DIR.rglob("*") if p.is_file())
    assert total < 3 * 2**20


def test_task_yamls_load_from_any_cwd(tmp_path, monkeypatch):
    from lmms_eval.tasks import TaskManager, get_task_dict

    monkeypatch.chdir(tmp_path)
    tm = TaskManager("WARNING", include_path=str(REPO / "tasks"))
    assert "shapes_vqa" in tm.all_groups
    names = [f"shapes_vqa_{f}" for f in FAMILIES]
    for name in names:
        assert name in tm.all_tasks
    tasks = get_task_dict(names, tm)
    for name in names:
        task = tasks[name]
        docs = list(task.test_docs())
        assert len(docs) == 50
        image = task.doc_to_visual(docs[0])[0]
        assert image.size == (336, 336) and image.mode == "RGB"
        assert task.doc_to_text(docs[0]).endswith("\nAnswer the question using a single word or phrase.")
