"""lmms-eval's --use_cache with our model ids: counts come back, progress survives a kill, identity = resolved config."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from glob import glob

import pytest
from lmms_eval_runs import REPO, offline_env, read_run, run_lmms_eval

pytestmark = pytest.mark.slow
TASK = "tokprune_smoke"


def _counts(run: dict) -> dict:
    return {s["doc_id"]: (s["filtered_resps"], s["token_counts"][0]) for s in run["_samples"][TASK]}


def test_a_half_cached_rerun_keeps_every_count_and_its_means_cover_every_document(tiny_llava, tmp_path):
    cache = tmp_path / "cache"
    args = f"pretrained={tiny_llava},method=prumerge"
    first = read_run(tmp_path / "a", run_lmms_eval(tmp_path / "a", "llava_tokprune", args, limit=4, extra=["--use_cache", str(cache)]))
    second = read_run(tmp_path / "b", run_lmms_eval(tmp_path / "b", "llava_tokprune", args, limit=8, extra=["--use_cache", str(cache)]))
    fresh = read_run(tmp_path / "c", run_lmms_eval(tmp_path / "c", "llava_tokprune", args, limit=8))
    assert second["throughput"]["avg_served_from_cache"] == 4
    assert _counts(second) == _counts(fresh)  # the cached four carry the counts they were computed with
    assert all(c["visual_tokens_kept"] is not None for _, c in _counts(second).values())
    assert {d: v for d, v in _counts(second).items() if d < 4} == _counts(first)
    for key in ("avg_visual_tokens_kept", "avg_llm_prefill_tokens", "avg_prefill_tflops", "avg_num_samples"):
        assert second["throughput"][key] == pytest.approx(fresh["throughput"][key]), key
    assert second["throughput"]["avg_num_samples"] == 8


def _stored(cache) -> int:
    total = 0
    for db in glob(str(cache / "runs" / "*" / "rank_*.db")):
        try:
            with sqlite3.connect(db, timeout=1) as con:
                total += con.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        except sqlite3.Error:
            pass
    return total


def test_a_killed_run_resumes_from_its_last_finished_batch(tiny_llava, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "llava_tokprune", "--model_args", f"pretrained={tiny_llava},method=spatial,budget=32",
           "--tasks", TASK, "--include_path", str(REPO / "tasks"), "--batch_size", "2", "--output_path", str(out), "--log_samples",
           "--use_cache", str(cache), "--verbosity", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=offline_env(), cwd=str(tmp_path))
    deadline = time.time() + 300
    while _stored(cache) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _stored(cache)
    assert 6 <= done < 24 and not list(out.rglob("*_results.json")), done  # killed midway, three batches or more stored
    resumed = read_run(tmp_path / "resumed", run_lmms_eval(tmp_path / "resumed", "llava_tokprune", f"pretrained={tiny_llava},method=spatial,budget=32",
                                                           batch_size=2, extra=["--use_cache", str(cache)]))
    assert resumed["throughput"]["avg_served_from_cache"] == done  # what finished before the kill is not redone
    assert resumed["throughput"]["avg_num_samples"] == 24
    assert all(c["visual_tokens_kept"] == 32 * len(s["input_media"]) for s in resumed["_samples"][TASK] for c in s["token_counts"])


def test_the_cache_identity_follows_the_config_file_contents(tiny_llava, tmp_path):
    cache = tmp_path / "cache"
    cfg = tmp_path / "my.yaml"
    runs = {}
    for budget in (64, 8):
        cfg.write_text(f"model: llava_tokprune\nmodel_args: pretrained={tiny_llava},method=topk_cls,budget={budget}\n")
        out = tmp_path / f"b{budget}"
        runs[budget] = read_run(out, run_lmms_eval(out, "llava_tokprune", f"config={cfg}", limit=3, extra=["--use_cache", str(cache)]))
    assert "avg_served_from_cache" not in runs[8]["throughput"]  # the edited file is another configuration
    assert [s["token_counts"][0]["visual_tokens_kept"] for s in runs[8]["_samples"][TASK]] == [8, 8, 8]
    assert {s["token_counts"][0]["method_args"] for s in runs[64]["_samples"][TASK]} == {"method=topk_cls,variant=fixed,budget=64"}
    assert runs[64]["_samples"][TASK][0]["token_counts"][0]["config"] != runs[8]["_samples"][TASK][0]["token_counts"][0]["config"]
    again = read_run(tmp_path / "again", run_lmms_eval(tmp_path / "again", "llava_tokprune", f"config={cfg}", limit=3,
                                                       extra=["--use_cache", str(cache)]))
    assert again["throughput"]["avg_served_from_cache"] == 3 and _counts(again) == _counts(runs[8])
