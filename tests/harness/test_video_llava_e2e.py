"""Video-LLaVA through lmms-eval (slow; run in CI): the offline video smoke task (8 clips + 2 images) on a tiny
Video-LLaVA. One CLI run (PruMerge, batch 4, with a task of bad clips beside it: one error line each, the run goes on)
and every model id in one process through lmms-eval's `simple_evaluate` (what the CLI calls), counts from the samples."""

from __future__ import annotations

import json

import pytest
from lmms_eval_runs import REPO, read_run, run_lmms_eval

from lmms_tokprune.catalog import model_ids

pytestmark = pytest.mark.slow
TASK = "tokprune_video_smoke"
DOCS = [json.loads(line) for line in (REPO / "tasks" / TASK / "data" / "test.jsonl").read_text().splitlines() if line.strip()]
# per id, args a 4-layer decoder takes (in-LLM methods cut before layer 1; budgets per video / equivalent tokens)
ARGS = {
    "llava_tokprune": "method=none", "llava_prumerge": "variant=fixed", "llava_prumerge_plus": "variant=fixed",
    "llava_recover": "variant=fixed", "llava_longtail": "variant=fixed,budget=200", "llava_visionzip": "variant=fixed,budget=256",
    "llava_vispruner": "variant=fixed,budget=256", "llava_fastervlm": "variant=fixed,budget=16,budget_scope=unit",
    "llava_divprune": "variant=fixed,budget=256", "llava_cdpruner": "variant=fixed,budget=256", "llava_fastv": "variant=fixed,k=1,budget=200",
    "llava_pdrop": "variant=fixed,layer_list=1/2/3", "llava_dart": "variant=fixed,k=1,budget=200", "llava_sparsevlm": "variant=fixed,prune_layers=0/1",
}

BAD_YAML = """
task: bad_videos
dataset_path: json
dataset_kwargs:
  data_files:
    test: docs.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
BAD_UTILS = '''
from pathlib import Path
HERE = Path(__file__).resolve().parent

def doc_to_visual(doc):
    return [str(HERE / doc["clip"])]

def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return "What happens?"

def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == "red")}
'''


def test_every_model_id_is_covered():
    assert set(ARGS) == set(model_ids())


def _check_counts(samples, kept_below=True):
    for s in samples:
        counts = s["token_counts"][0]
        assert "error" not in counts, counts.get("error")
        video = DOCS[s["doc_id"]]["visual"].endswith(".mp4")
        assert (counts["visual_tokens_in"], counts["layout_tokens"], counts["units"]) == ((2048, 8, 8) if video else (256, 0, 1))
        if kept_below and video:
            assert counts["visual_tokens_equivalent"] < counts["visual_tokens_in"]


def test_prumerge_through_the_cli_with_bad_clips_beside(tiny_video, tmp_path):
    import shutil

    from lmms_tokprune.testing.tiny_video import write_bad_clips

    shutil.copytree(REPO / "tasks" / TASK, tmp_path / "tasks" / TASK)  # one --include_path holds both tasks (the last one given wins)
    task = tmp_path / "tasks" / "bad_videos"
    clips = write_bad_clips(task)
    shutil.copy(REPO / "tasks" / TASK / "clips" / "red_circle_right.mp4", task / "good.mp4")
    docs = [{"clip": "good.mp4", "answer": "red"}] + [{"clip": clips[k].name, "answer": "red"} for k in ("short", "not_video", "raw_stream")]
    (task / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (task / "bad_videos.yaml").write_text(BAD_YAML)
    (task / "utils.py").write_text(BAD_UTILS)
    out = tmp_path / "out"
    proc = run_lmms_eval(out, "llava_prumerge", f"pretrained={tiny_video},variant=reference", tasks=f"{TASK},bad_videos", batch_size=4,
                         extra=["--include_path", str(tmp_path / "tasks")])
    run = read_run(out, proc)
    samples = run["_samples"][TASK]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(DOCS)))
    _check_counts(samples)
    bad = {s["doc_id"]: s["token_counts"][0].get("error") for s in run["_samples"]["bad_videos"]}
    assert bad[0] is None and bad[3] is None  # a raw H.264 stream: counted, then sampled
    assert bad[1] == "bad_videos doc 1: image 0: video 'short.mp4' has 5 frames; Video-LLaVA takes 8 (lmms-eval's video_llava fails on it too)"
    assert bad[2].startswith("bad_videos doc 2: image 0: video 'not_video.mp4' cannot be opened")


def test_every_model_id_runs_on_video_documents(tiny_video, tiny_clip):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    for model_id, args in sorted(ARGS.items()):
        args = f"pretrained={tiny_video},prompt_style=lmms_eval,{args}"
        if model_id in ("llava_recover", "llava_cdpruner"):
            args += f",text_encoder={tiny_clip}"
        results = simple_evaluate(model=model_id, model_args=args, tasks=[TASK], batch_size=1, limit=1,
                                  task_manager=TaskManager("WARNING", include_path=str(REPO / "tasks"), model_name=model_id), verbosity="WARNING")
        samples = results["samples"][TASK]
        assert len(samples) == 1, model_id
        _check_counts(samples, kept_below=model_id != "llava_tokprune")


def test_demo_video_states_that_the_answers_are_noise(capsys):
    from lmms_tokprune.cli import main

    assert main(["demo", "--video", "--methods", "none,prumerge", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "answers are noise" in out and "| none | - | 2048.0 |" in out and "| prumerge | 256 | 256.0 |" in out


def test_none_answers_as_lmms_evals_own_video_llava(tiny_video, monkeypatch):
    """method=none,prompt_style=lmms_eval == `--model video_llava` (with lmms-eval PR #1487's fix of its read_video call:
    0.7.3 passes the frame count positionally to a keyword-only parameter and fails on every request)."""
    import lmms_eval.models.simple.video_llava as upstream
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models.model_utils.load_video import read_video
    from lmms_eval.tasks import TaskManager

    monkeypatch.setattr(upstream, "read_video", lambda path, n: read_video(path, num_frm=n))
    answers = {}
    for model, args in (("video_llava", f"pretrained={tiny_video},device=cpu,device_map=auto"),
                        ("llava_tokprune", f"pretrained={tiny_video},method=none,prompt_style=lmms_eval")):
        results = simple_evaluate(model=model, model_args=args, tasks=[TASK], batch_size=1, limit=3, gen_kwargs="max_new_tokens=10",
                                  task_manager=TaskManager("WARNING", include_path=str(REPO / "tasks"), model_name=model), verbosity="WARNING")
        answers[model] = {s["doc_id"]: s["filtered_resps"] for s in results["samples"][TASK]}
    assert len(answers["video_llava"]) == 3 and answers["llava_tokprune"] == answers["video_llava"]
    assert any(str(a).strip("[]' ") for a in answers["video_llava"].values())  # real answers, not empty ones
