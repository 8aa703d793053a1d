"""`lmms-tokprune sweep` and `lmms-tokprune leaderboard`.

Fast tests drive the sweep with a stand-in for lmms-eval (a launcher script that writes lmms-eval-shaped
results, exits non-zero, or exits 0 without results, as lmms-eval does on many failures) and build
leaderboards from synthetic results JSON files. The slow test runs the real lmms-eval CLI on
tokprune_smoke with the tiny checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import pytest
import yaml

from lmms_tokprune.cli import main
from lmms_tokprune.paths import model_configs_dir, tasks_dir
from lmms_tokprune.report.leaderboard import build_rows, main_metric, write_leaderboard
from lmms_tokprune.sweep import format_model_args, load_sweep, run_sweep, sweep_main

SWEEPS = model_configs_dir() / "sweeps"
PAPER_TASKS = ["scienceqa_img", "textvqa_val", "mme", "vqav2_val", "pope", "mmbench_en_dev_static", "gqa", "seedbench"]

# Stand-in for `python -m lmms_eval`: behaviour chosen by the model id.
FAKE_LMMS_EVAL = r'''
import json, os, sys, time
argv = sys.argv[1:]
assert argv[:2] == ["-m", "lmms_eval"], argv
args = {}
i = 2
while i < len(argv):
    if argv[i].startswith("--"):
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            args[argv[i][2:]] = argv[i + 1]; i += 2
        else:
            args[argv[i][2:]] = True; i += 1
    else:
        i += 1
with open(os.environ["FAKE_CALLS"], "a") as fh:
    fh.write(json.dumps(args) + "\n")
print("fake lmms-eval starting", args["model"])
if args["model"] == "fake_exit3":
    print("Traceback: something broke", file=sys.stderr)
    sys.exit(3)
if args["model"] == "fake_silent":
    print("Error during evaluation: pretrained folder does not exist")
    sys.exit(0)
model_args = dict(kv.split("=", 1) for kv in args.get("model_args", "").split(",") if "=" in kv)
if "sleep" in model_args:  # a long run: record the pid, then wait to be stopped
    with open(os.environ["FAKE_PIDS"], "a") as fh:
        fh.write(f"{os.getpid()}\n")
    import time as _t
    _t.sleep(float(model_args["sleep"]))
score = float(model_args.get("score", 0.5))
tasks = args["tasks"].split(",")
out = os.path.join(args["output_path"], "fake__model")
os.makedirs(out, exist_ok=True)
stamp = time.strftime("%Y%m%d_%H%M%S")
data = {
    "results": {t: {"alias": t, "exact_match,none": score, "exact_match_stderr,none": 0.01} for t in tasks},
    "group_subtasks": {t: [] for t in tasks},
    # fake_ok stands for our generic id in the results (the leaderboard reads only lmms_tokprune runs)
    "config": {"model": "llava_tokprune" if args["model"] == "fake_ok" else args["model"], "model_args": args["model_args"], "limit": float(args["limit"]) if "limit" in args else None},
    "throughput": {"avg_visual_tokens_kept": float(model_args.get("kept", 576)), "avg_visual_tokens_in": 576.0,
                   "avg_llm_prefill_tokens": float(model_args.get("kept", 576)) + 60,
                   **({"avg_failed_docs": float(model_args["failed"])} if "failed" in model_args else {})},
    "model_name_sanitized": "fake__model",
}
with open(os.path.join(out, stamp + "_results.json"), "w") as fh:
    json.dump(data, fh)
'''


@pytest.fixture
def fake_launcher(tmp_path, monkeypatch):
    script = tmp_path / "fake_lmms_eval.py"
    script.write_text(FAKE_LMMS_EVAL)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))

    def count() -> int:
        return len(calls.read_text().splitlines()) if calls.exists() else 0

    return f"{sys.executable} {script}", count


def write_sweep(folder: Path, data: Dict[str, Any], name: str = "sweep.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- loading and validation ------------------------------------------------------------------------
def test_load_merges_model_args_and_resolves_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_FOR_TEST", "/ckpt/from/env")
    (tmp_path / "conf" / "mytasks").mkdir(parents=True)
    path = write_sweep(tmp_path / "conf", {
        "model": "llava_tokprune",
        "model_args": {"pretrained": "${CKPT_FOR_TEST}", "budget": 64, "pad_to_square": True, "dtype": "${UNSET_FOR_TEST:-float32}"},
        "tasks": "a, b ,a",
        "include_path": "mytasks",
        "output_dir": "../out",
        "limit": 4,
        "gen_kwargs": {"max_new_tokens": 8},
        "runs": [
            {"name": "none", "model_args": {"method": "none", "budget": None}},
            {"name": "topk", "model_args": "method=topk_cls,budget=128", "tasks": ["c"], "batch_size": 2, "limit": 2},
            {"name": "prumerge", "model": "llava_prumerge", "launcher": "accelerate launch --num_processes 8"},
        ],
    })
    sweep = load_sweep(path)
    assert sweep.output_dir == (tmp_path / "out").resolve()
    none, topk, pm = sweep.runs
    assert none.model_args == {"pretrained": "/ckpt/from/env", "pad_to_square": True, "dtype": "float32", "method": "none"}
    assert none.tasks == ["a", "b"] and none.limit == 4 and none.output_path == sweep.output_dir / "none"
    assert none.include_path == (tmp_path / "conf" / "mytasks").resolve()
    assert topk.model_args["budget"] == "128" and topk.tasks == ["c"] and topk.limit == 2
    assert format_model_args(none.model_args) == "pretrained=/ckpt/from/env,pad_to_square=true,dtype=float32,method=none"
    cmd = topk.command()
    assert cmd[:3] == [sys.executable, "-m", "lmms_eval"]
    for flag, value in (("--model", "llava_tokprune"), ("--tasks", "c"), ("--batch_size", "2"), ("--limit", "2"),
                        ("--output_path", str(sweep.output_dir / "topk")), ("--gen_kwargs", "max_new_tokens=8")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--log_samples" in cmd
    assert pm.model == "llava_prumerge" and pm.command()[:6] == ["accelerate", "launch", "--num_processes", "8", "-m", "lmms_eval"]


def test_include_path_defaults_to_shipped_tasks(tmp_path):
    path = write_sweep(tmp_path, {"model": "m", "tasks": ["t"], "output_dir": "o", "runs": [{"name": "r"}]})
    assert load_sweep(path).runs[0].include_path == tasks_dir()


def test_overrides(tmp_path):
    path = write_sweep(tmp_path, {"model": "m", "model_args": "pretrained=x,method=none", "tasks": ["t"], "output_dir": "o",
                                  "runs": [{"name": "a"}, {"name": "b", "model_args": {"budget": 64}}]})
    sweep = load_sweep(path, overrides=["limit=3", "model_args.dtype=float16", "runs.b.model_args.budget=128", "runs.a.batch_size=2"],
                       pretrained="/some/ckpt", output_dir=tmp_path / "elsewhere")
    a, b = sweep.runs
    assert a.model_args == {"pretrained": "/some/ckpt", "method": "none", "dtype": "float16"} and a.limit == 3 and a.batch_size == 2
    assert b.model_args["budget"] == 128
    assert sweep.output_dir == (tmp_path / "elsewhere").resolve()
    with pytest.raises(ValueError, match="no run named 'zzz'"):
        load_sweep(path, overrides=["runs.zzz.limit=3"])
    with pytest.raises(ValueError, match="unknown sweep key 'limt'"):
        load_sweep(path, overrides=["limt=3"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_sweep(path, overrides=["limit"])


def test_tiny_checkpoint_token(tmp_path, monkeypatch):
    import lmms_tokprune.testing.tiny as tiny

    monkeypatch.setattr(tiny, "tiny_llava_dir", lambda: tmp_path / "tiny")
    monkeypatch.delenv("LMMS_TOKPRUNE_PRETRAINED", raising=False)
    sweep = load_sweep(SWEEPS / "smoke.yaml", output_dir=tmp_path / "o")
    assert [r.name for r in sweep.runs] == ["none", "topk_cls-b64", "spatial-b64", "random-b64"]
    assert {r.model_args["pretrained"] for r in sweep.runs} == {str(tmp_path / "tiny")}
    assert [r.model_args.get("budget") for r in sweep.runs] == [None, 64, 64, 64]
    monkeypatch.setenv("LMMS_TOKPRUNE_PRETRAINED", "/env/ckpt")
    assert load_sweep(SWEEPS / "smoke.yaml", output_dir=tmp_path / "o").runs[0].model_args["pretrained"] == "/env/ckpt"


@pytest.mark.parametrize("data, message", [
    ({"tasks": "t", "output_dir": "o", "runs": [{"name": "a", "model": "m"}], "runz": []}, "unknown key.*runz"),
    ({"tasks": "t", "output_dir": "o", "runs": [{"name": "a", "model": "m", "modle_args": {}}]}, "unknown key.*modle_args"),
    ({"tasks": "t", "output_dir": "o", "runs": [{"name": "a", "model": "m"}, {"name": "a", "model": "m"}]}, "duplicate run name"),
    ({"tasks": "t", "output_dir": "o", "runs": [{"model": "m"}]}, "missing required key 'name'"),
    ({"tasks": "t", "output_dir": "o", "runs": [{"name": "a"}]}, "missing required key 'model'"),
    ({"output_dir": "o", "runs": [{"name": "a", "model": "m"}]}, "missing required key 'tasks'"),
    ({"tasks": "t", "runs": [{"name": "a", "model": "m"}]}, "missing required key 'output_dir'"),
    ({"tasks": "t", "output_dir": "o"}, "missing required key 'runs'"),
    ({"tasks": "t", "output_dir": "o", "runs": [{"name": "../x", "model": "m"}]}, "run name"),
    ({"tasks": "t", "output_dir": "o", "runs": [{"name": "a", "model": "m", "model_args": {"x": "1,2"}}]}, "comma"),
    ({"tasks": "t", "output_dir": "o", "limit": -1, "runs": [{"name": "a", "model": "m"}]}, "limit must be"),
    ({"tasks": "t", "output_dir": "o", "model_args": {"pretrained": "${SURELY_UNSET_VAR_X}"}, "runs": [{"name": "a", "model": "m"}]},
     "SURELY_UNSET_VAR_X is not set"),
    ({"tasks": "t", "output_dir": "o", "include_path": "nowhere", "runs": [{"name": "a", "model": "m"}]}, "include_path .* does not exist"),
])
def test_validation_errors(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        load_sweep(write_sweep(tmp_path, data))


def test_bad_model_args_stop_the_sweep_before_anything_runs(tmp_path, fake_launcher, capsys):
    launcher, calls = fake_launcher
    path = write_sweep(tmp_path, {"tasks": "t", "output_dir": "out", "launcher": launcher, "runs": [
        {"name": "ok", "model": "fake_ok"},
        {"name": "typo", "model": "llava_tokprune", "model_args": {"method": "topk_cls", "budgte": 64}},
    ]})
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "run 'typo'" in err and "budgte" in err and "valid keys" in err
    assert calls() == 0 and not (tmp_path / "out" / "ok").exists()


def test_shipped_paper_sweeps_parse():
    paper = load_sweep(SWEEPS / "llava15_7b_paper.yaml")
    assert paper.runs[0].model_args["method"] == "none"
    models = {(r.model, r.model_args.get("variant")) for r in paper.runs[1:]}
    for model in ("llava_prumerge", "llava_prumerge_plus", "llava_recover"):
        assert {(model, "reference"), (model, "fixed")} <= models
    assert ("llava_longtail", "fixed") in models  # no released code: no reference variant
    budgets = load_sweep(SWEEPS / "llava15_7b_budgets.yaml")
    assert len(budgets.runs) == 1 + 3 * 3 + 3 * 7 + 3 * 5 + 3 * 4  # + the five pre-LLM and the four in-LLM peers, fixed
    for sweep in (paper, budgets):
        assert all(r.tasks == PAPER_TASKS for r in sweep.runs)
        assert all(r.model_args["pretrained"] == os.environ.get("LMMS_TOKPRUNE_PRETRAINED", "llava-hf/llava-1.5-7b-hf") for r in sweep.runs)
    seen = {(r.model, r.model_args.get("method"), r.model_args.get("variant"), r.model_args.get("budget")) for r in budgets.runs}
    for b in (64, 128, 192):
        for m in ("topk_cls", "spatial", "random"):
            assert ("llava_tokprune", m, None, b) in seen
        for model in ("llava_prumerge", "llava_prumerge_plus", "llava_recover"):
            for v in ("reference", "fixed"):
                assert (model, None, v, b) in seen
        assert ("llava_longtail", None, "fixed", b) in seen
        for peer in ("visionzip", "vispruner", "fastervlm", "divprune", "cdpruner", "fastv", "pdrop", "dart", "sparsevlm"):
            assert (f"llava_{peer}", None, "fixed", b) in seen
    # every run's model_args are valid for the wrappers (what `sweep` checks before launching anything)
    from lmms_tokprune.sweep import validate_model_args

    for run in paper.runs + budgets.runs:
        validate_model_args(run)


# -- running (stand-in lmms-eval) ------------------------------------------------------------------
def test_sweep_runs_skips_and_reports_failures(tmp_path, fake_launcher, capsys):
    launcher, calls = fake_launcher
    path = write_sweep(tmp_path / "conf", {
        "model_args": {"score": 0.5},
        "tasks": ["t1", "t2"], "output_dir": "out", "launcher": launcher, "limit": 4,
        "runs": [
            {"name": "good", "model": "fake_ok"},
            {"name": "crash", "model": "fake_exit3"},
            {"name": "silent", "model": "fake_silent"},
            {"name": "good2", "model": "fake_ok", "model_args": {"score": 0.25, "kept": 64}},
        ],
    })
    out = tmp_path / "conf" / "out"  # relative to the sweep file's folder
    assert main(["sweep", str(path), "--json"]) == 1
    text = capsys.readouterr().out
    summary = json.loads(text.strip().splitlines()[-1])
    status = {r["name"]: r["status"] for r in summary["runs"]}
    assert status == {"good": "ok", "crash": "failed", "silent": "failed", "good2": "ok"}
    details = {r["name"]: r["detail"] for r in summary["runs"]}
    assert "exited with status 3" in details["crash"] and "something broke" in details["crash"]
    assert "exited 0 but wrote no results" in details["silent"] and "pretrained folder does not exist" in details["silent"]
    assert "[FAIL] crash" in text and "2 FAILED: crash, silent" in text
    for name in ("good", "crash", "silent", "good2"):
        assert (out / name / "run.log").read_text().startswith("$ ")
    assert calls() == 4
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["ok", "failed", "failed", "ok"]

    # second invocation: finished runs are skipped, only the failed ones are retried
    assert main(["sweep", str(path), "--only", "good,good2"]) == 0
    text = capsys.readouterr().out
    assert calls() == 4
    assert "[skip] good: already finished" in text and "[skip] good2: already finished" in text
    assert "0 ran now, 2 skipped (already finished)" in text
    # asking for a task the results do not cover re-runs; changed settings are pointed out on skip
    assert main(["sweep", str(path), "--only", "good", "--set", "tasks=[t1,t2,t3]"]) == 0
    assert calls() == 5
    capsys.readouterr()
    assert main(["sweep", str(path), "--only", "good", "--limit", "8"]) == 0
    assert "limit 4.0 (now 8" in capsys.readouterr().out and calls() == 5


def test_sweep_dry_run_and_leaderboard_flag(tmp_path, fake_launcher, capsys):
    launcher, calls = fake_launcher
    path = write_sweep(tmp_path, {"model": "fake_ok", "tasks": "t1", "output_dir": "out", "launcher": launcher,
                                  "runs": [{"name": "a"}, {"name": "b", "model_args": {"kept": 64}}]})
    code, outcomes = sweep_main(str(path), dry_run=True)
    assert code == 0 and [o.status for o in outcomes] == ["dry-run", "dry-run"] and calls() == 0
    assert "[plan] a:" in capsys.readouterr().out
    code, outcomes = sweep_main(str(path), leaderboard=True)
    assert code == 0 and calls() == 2
    assert (tmp_path / "out" / "leaderboard" / "leaderboard.md").exists()
    with pytest.raises(ValueError, match="no run named nope"):
        run_sweep(load_sweep(path), only=["nope"])


# -- leaderboard (synthetic results) ---------------------------------------------------------------
def write_results(run_dir: Path, model: str, model_args: str, scores: Dict[str, Dict[str, float]], kept: Optional[float] = None,
                  tflops: Optional[float] = None, stamp: str = "20250101_000000", limit: Optional[float] = None) -> Path:
    sub = run_dir / "llava-hf__llava-1.5-7b-hf"
    sub.mkdir(parents=True, exist_ok=True)
    results = {}
    for task, metrics in scores.items():
        entry: Dict[str, Any] = {"alias": task}
        for metric, value in metrics.items():
            entry[f"{metric},none"] = value
            entry[f"{metric}_stderr,none"] = "N/A"
        results[task] = entry
    tp: Dict[str, Any] = {"total_gen_tokens": 10}
    if kept is not None:
        tp.update(avg_visual_tokens_in=576.0, avg_visual_tokens_kept=kept, avg_visual_retention=kept / 576,
                  avg_llm_prefill_tokens=kept + 60)
    if tflops is not None:
        tp["avg_prefill_tflops"] = tflops
    data = {"results": results, "config": {"model": model, "model_args": model_args, "limit": limit}, "throughput": tp,
            "model_name_sanitized": "llava-hf__llava-1.5-7b-hf"}
    path = sub / f"{stamp}_results.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def synthetic_sweep(tmp_path) -> Path:
    root = tmp_path / "sweep_out"
    pre = "pretrained=llava-hf/llava-1.5-7b-hf"
    # mme lists cognition first: the headline metric (perception) must still be picked
    write_results(root / "none", "llava_tokprune", f"{pre},method=none",
                  {"mme": {"mme_cognition_score": 300.0, "mme_perception_score": 1500.0}, "textvqa_val": {"exact_match": 0.58},
                   "pope": {"pope_accuracy": 0.86, "pope_f1_score": 0.85}}, kept=576, tflops=8.45)
    write_results(root / "topk-b64", "llava_tokprune", f"{pre},method=topk_cls,budget=64",
                  {"mme": {"mme_cognition_score": 250.0, "mme_perception_score": 1200.0}, "textvqa_val": {"exact_match": 0.29},
                   "pope": {"pope_accuracy": 0.43, "pope_f1_score": 0.5}}, kept=64, tflops=1.6)
    # an older, worse results file of the same run: the newest one wins
    write_results(root / "prumerge-ref-b128", "llava_prumerge", f"{pre},variant=reference,budget=128",
                  {"mme": {"mme_perception_score": 1.0}, "textvqa_val": {"exact_match": 0.0}, "pope": {"pope_accuracy": 0.0}},
                  kept=128, stamp="20240101_000000")
    write_results(root / "prumerge-ref-b128", "llava_prumerge", f"{pre},variant=reference,budget=128",
                  {"mme": {"mme_perception_score": 1500.0}, "textvqa_val": {"exact_match": 0.58}, "pope": {"pope_accuracy": 0.86}},
                  kept=128)  # no avg_prefill_tflops: computed from the mean prefill length
    write_results(root / "recover-fix", "llava_recover", f"{pre},ratio=0.1",
                  {"mme": {"mme_perception_score": 750.0}, "textvqa_val": {"exact_match": 0.29}, "pope": {"pope_accuracy": 0.43}},
                  kept=58, tflops=1.54)
    (root / "failed-run").mkdir()
    (root / "failed-run" / "run.log").write_text("boom")
    return root


def test_main_metric_rules():
    mme = {"alias": "mme", "mme_cognition_score,none": 3.0, "mme_perception_score,none": 1.0}
    assert main_metric("mme", mme) == ("mme_perception_score", 1.0)
    assert main_metric("foo", {"alias": "foo", "acc_stderr,none": 0.1, "acc,none": 0.5, "f1,none": 0.2}) == ("acc", 0.5)
    assert main_metric("pope", {"pope_accuracy,none": 0.8, "pope_f1_score,none": 0.7}, preferred="pope_f1_score") == ("pope_f1_score", 0.7)
    assert main_metric("pope", {"pope_accuracy,none": 0.8}, preferred="pope_f1") is None
    assert main_metric("x", {"alias": "x", "a,none": "N/A"}) is None


def test_leaderboard_rows_and_relative_scores(synthetic_sweep):
    rows, has_baseline = build_rows([synthetic_sweep])
    assert has_baseline
    assert [r.name for r in rows] == ["none", "prumerge-ref-b128", "topk-b64", "recover-fix"]
    by = {r.name: r for r in rows}
    assert by["none"].relative_pct == pytest.approx(100.0)
    assert by["prumerge-ref-b128"].relative_pct == pytest.approx(100.0)  # newest results file used
    # MME perception and cognition are two columns: (1200/1500, 250/300, textvqa 0.5, pope 0.5)
    assert by["topk-b64"].relative_pct == pytest.approx(100 * (1200 / 1500 + 250 / 300 + 0.5 + 0.5) / 4)
    assert by["topk-b64"].relative[("mme", "mme_cognition_score")] == pytest.approx(100 * 250 / 300)
    assert by["recover-fix"].relative_pct == pytest.approx(50.0)
    pm = by["prumerge-ref-b128"]
    assert (pm.method, pm.variant, pm.budget) == ("prumerge", "reference", "128")
    assert (by["recover-fix"].method, by["recover-fix"].variant, by["recover-fix"].ratio) == ("recover", "fixed", "0.1")
    assert (by["topk-b64"].method, by["topk-b64"].budget) == ("topk_cls", "64")
    assert by["none"].scores[("mme", "mme_perception_score")] == 1500.0 and by["none"].scores[("mme", "mme_cognition_score")] == 300.0
    assert list(by["none"].scores)[:2] == [("mme", "mme_perception_score"), ("mme", "mme_cognition_score")]
    assert by["topk-b64"].prefill_tflops == 1.6 and not by["topk-b64"].tflops_computed
    from lmms_tokprune.efficiency import prefill_tflops_for

    assert by["prumerge-ref-b128"].tflops_computed
    assert by["prumerge-ref-b128"].prefill_tflops == pytest.approx(prefill_tflops_for("llava-1.5-7b", 128, 60))
    assert by["topk-b64"].retention_pct == pytest.approx(100 * 64 / 576)


def test_leaderboard_files(synthetic_sweep, tmp_path, capsys):
    out = tmp_path / "board"
    assert main(["leaderboard", str(synthetic_sweep), "--out", str(out), "--metric", "pope=pope_f1_score"]) == 0
    printed = capsys.readouterr().out
    assert "| **none** (baseline) |" in printed
    md = (out / "leaderboard.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| run "))
    for col in ("mme (mme_perception_score)", "textvqa_val (exact_match)", "pope (pope_f1_score)", "visual tokens", "retention (%)",
                "LLM prefill tokens", "prefill TFLOPs", "vs baseline (%)"):
        assert col in header
    assert "TFLOPs computed" in md
    with open(out / "leaderboard.csv") as fh:
        records = list(csv.DictReader(fh))
    assert records[0]["run"] == "none" and len(records) == 4
    assert set(records[0]) >= {"run", "model", "method", "variant", "budget", "mme/mme_perception_score", "pope/pope_f1_score",
                                "visual_tokens_kept", "visual_retention_pct", "llm_prefill_tokens", "prefill_tflops", "relative_score_pct"}
    topk = next(r for r in records if r["run"] == "topk-b64")
    assert float(topk["pope/pope_f1_score"]) == 0.5 and float(topk["visual_tokens_kept"]) == 64
    png = out / "pareto.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_leaderboard_without_baseline_and_explicit_baseline(synthetic_sweep, tmp_path):
    import shutil

    shutil.rmtree(synthetic_sweep / "none")
    rows, has_baseline = build_rows([synthetic_sweep])
    assert not has_baseline
    assert rows[0].name == "prumerge-ref-b128" and rows[0].relative_pct == pytest.approx(100.0)
    rows, has_baseline = build_rows([synthetic_sweep], baseline="recover-fix")
    assert has_baseline and rows[0].name == "recover-fix"
    assert next(r for r in rows if r.name == "prumerge-ref-b128").relative_pct == pytest.approx(200.0)
    written = write_leaderboard([synthetic_sweep / "topk-b64", synthetic_sweep / "recover-fix"], tmp_path / "b2")
    assert [r.name for r in written["rows"]] == ["topk-b64", "recover-fix"]
    assert "best run of each task" in written["table"]


def test_leaderboard_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["leaderboard", str(tmp_path / "empty"), "--out", str(tmp_path / "b")]) == 2
    assert "no lmms-eval *_results.json" in capsys.readouterr().err
    assert main(["leaderboard", str(tmp_path / "missing"), "--out", str(tmp_path / "b")]) == 2
    capsys.readouterr()
    write_results(tmp_path / "one" / "r", "llava_tokprune", "method=none", {"pope": {"pope_accuracy": 0.8}})
    assert main(["leaderboard", str(tmp_path / "one"), "--out", str(tmp_path / "b"), "--metric", "pope=pope_f1"]) == 2
    assert "pope metrics: pope_accuracy" in capsys.readouterr().err


# -- end to end: the real lmms-eval CLI -------------------------------------------------------------
@pytest.mark.slow
def test_sweep_end_to_end_real_lmms_eval(tiny_llava, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    path = write_sweep(tmp_path, {
        "model": "llava_tokprune",
        "model_args": {"pretrained": str(tiny_llava)},
        "tasks": "tokprune_smoke",
        "output_dir": "runs",
        "limit": 4,
        "batch_size": 4,
        "runs": [
            {"name": "none", "model_args": {"method": "none"}},
            {"name": "topk_cls-b64", "model_args": {"method": "topk_cls", "budget": 64}},
            {"name": "broken", "model_args": {"method": "spatial", "budget": 64, "pretrained": str(tmp_path / "no-such-checkpoint")}},
        ],
    })
    out = tmp_path / "runs"
    assert main(["sweep", str(path)]) == 1
    text = capsys.readouterr().out
    assert "[ok  ] none" in text and "[ok  ] topk_cls-b64" in text
    assert "[FAIL] broken" in text and "no-such-checkpoint" in text and "does not exist" in text
    assert "no-such-checkpoint" in (out / "broken" / "run.log").read_text()
    for name, kept in (("none", 576), ("topk_cls-b64", 64)):
        (results,) = list((out / name).rglob("*_results.json"))
        data = json.loads(results.read_text())
        assert data["config"]["model_args"].endswith(f"method={name.split('-')[0]}" + (",budget=64" if kept == 64 else ""))
        assert data["throughput"]["avg_visual_tokens_kept"] == kept
        assert list((out / name).rglob("*_samples_tokprune_smoke.jsonl"))

    import lmms_tokprune.sweep as sweep_module

    def no_launch(*args, **kwargs):
        raise AssertionError("a finished run was launched again")

    monkeypatch.setattr(sweep_module.subprocess, "Popen", no_launch)
    assert main(["sweep", str(path), "--only", "none,topk_cls-b64"]) == 0
    text = capsys.readouterr().out
    assert "[skip] none: already finished" in text and "[skip] topk_cls-b64: already finished" in text
    assert "0 ran now, 2 skipped" in text
    assert len(list(out.rglob("*_results.json"))) == 2

    board = tmp_path / "board"
    assert main(["leaderboard", str(out), "--out", str(board)]) == 0
    with open(board / "leaderboard.csv") as fh:
        records = list(csv.DictReader(fh))
    assert [r["run"] for r in records] == ["none", "topk_cls-b64"]
    assert [r["method"] for r in records] == ["none", "topk_cls"]
    assert [float(r["visual_tokens_kept"]) for r in records] == [576.0, 64.0]
    assert "tokprune_smoke/exact_match" in records[0]
    assert float(records[1]["prefill_tflops"]) < float(records[0]["prefill_tflops"])
    assert (board / "leaderboard.md").read_text().count("\n| ") >= 3
    assert (board / "pareto.png").stat().st_size > 10_000


def test_include_path_may_be_a_list(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    path = write_sweep(tmp_path, {"tasks": "t", "output_dir": "o", "include_path": ["a", str(tmp_path / "b")],
                                  "runs": [{"name": "r", "model": "m"}]})
    run = load_sweep(path).runs[0]
    assert run.include_paths == [tmp_path / "a", tmp_path / "b"] and run.include_path is None
    cmd = run.command()
    assert "--include_path" not in cmd and cmd[cmd.index("--config") + 1] == str(run.include_config)
    run.write_include_config()
    assert yaml.safe_load(run.include_config.read_text()) == {"include_path": [str(tmp_path / "a"), str(tmp_path / "b")]}
    with pytest.raises(ValueError, match="include_path .*nowhere.* does not exist"):
        load_sweep(write_sweep(tmp_path, {"tasks": "t", "output_dir": "o", "include_path": ["a", "nowhere"], "runs": [{"name": "r", "model": "m"}]}))


@pytest.mark.slow
def test_sweep_with_two_include_paths_runs_a_task_of_the_second(tiny_llava, tmp_path):
    """The real lmms-eval gets both folders (through the --config file) and finds the task in the second one."""
    import shutil

    from lmms_eval_runs import REPO

    (tmp_path / "empty").mkdir()
    shutil.copytree(REPO / "tasks" / "tokprune_smoke", tmp_path / "second" / "tokprune_smoke")
    path = write_sweep(tmp_path, {"model": "llava_tokprune", "model_args": {"pretrained": str(tiny_llava)}, "tasks": "tokprune_smoke",
                                  "include_path": ["empty", "second"], "output_dir": "out", "limit": 2,
                                  "runs": [{"name": "spatial", "model_args": {"method": "spatial", "budget": 16}}]})
    assert main(["sweep", str(path)]) == 0
    (results,) = list((tmp_path / "out" / "spatial").rglob("*_results.json"))
    data = json.loads(results.read_text())
    assert data["throughput"]["avg_visual_tokens_kept"] == 16 and "tokprune_smoke" in data["results"]


def test_runs_with_failed_documents_fail_unless_allowed(tmp_path, fake_launcher, capsys):
    launcher, calls = fake_launcher
    path = write_sweep(tmp_path, {"model": "fake_ok", "tasks": "t1", "output_dir": "out", "launcher": launcher,
                                  "runs": [{"name": "strict", "model_args": {"failed": 2}},
                                           {"name": "lenient", "model_args": {"failed": 2}, "allow_failed_docs": True},
                                           {"name": "clean"}]})
    assert main(["sweep", str(path)]) == 1
    text = capsys.readouterr().out
    assert "[FAIL] strict" in text and "2 document(s) were not run" in text and "allow_failed_docs: true" in text
    assert "[ok  ] lenient" in text and "[ok  ] clean" in text and "1 FAILED: strict" in text
    assert main(["sweep", str(path)]) == 1 and calls() == 4  # the failed run is retried, the others are finished
    with pytest.raises(ValueError, match="allow_failed_docs must be true or false"):
        load_sweep(write_sweep(tmp_path, {"model": "m", "tasks": "t", "output_dir": "o", "allow_failed_docs": "yes", "runs": [{"name": "a"}]}, "b.yaml"))


def test_a_second_sweep_leaves_a_locked_run_folder_alone(tmp_path, fake_launcher, capsys):
    import fcntl

    launcher, calls = fake_launcher
    path = write_sweep(tmp_path, {"model": "fake_ok", "tasks": "t1", "output_dir": "out", "launcher": launcher,
                                  "runs": [{"name": "a"}, {"name": "b"}]})
    (tmp_path / "out" / "a").mkdir(parents=True)
    (tmp_path / "out" / "a" / "run.log").write_text("the other sweep's log\n")
    with open(tmp_path / "out" / "a" / ".sweep.lock", "w") as held:  # another sweep is running run a
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["sweep", str(path)]) == 0
    text = capsys.readouterr().out
    assert "[busy] a: another sweep is running it" in text and "[ok  ] b" in text and "1 left to another sweep: a" in text
    assert calls() == 1 and (tmp_path / "out" / "a" / "run.log").read_text() == "the other sweep's log\n"


def test_sigterm_to_the_sweep_stops_its_lmms_eval_child(tmp_path, fake_launcher, monkeypatch):
    import signal
    import subprocess

    launcher, _ = fake_launcher
    pids = tmp_path / "pids.txt"
    monkeypatch.setenv("FAKE_PIDS", str(pids))
    path = write_sweep(tmp_path, {"model": "fake_ok", "tasks": "t1", "output_dir": "out", "launcher": launcher,
                                  "runs": [{"name": "long", "model_args": {"sleep": 120}}, {"name": "next"}]})
    sweep = subprocess.Popen([sys.executable, "-m", "lmms_tokprune.cli", "sweep", str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (pids.exists() and pids.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    child = int(pids.read_text().split()[0])
    sweep.send_signal(signal.SIGTERM)
    out, _ = sweep.communicate(timeout=60)
    assert sweep.returncode == 128 + signal.SIGTERM, out
    assert "[stop] SIGTERM while 'long' was running: it was stopped" in out and "[run ] next" not in out
    time.sleep(0.2)
    try:
        os.kill(child, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, "the lmms-eval child outlived the sweep"
    assert not list((tmp_path / "out").rglob("*_results.json"))


def test_every_results_file_is_a_row_or_a_named_warning(tmp_path, capsys):
    """README's first example writes two runs to one --output_path: both are rows (told apart by their model args),
    the uncompressed one is the baseline; a truncated results file is a warning, not a silently missing run."""
    logs = tmp_path / "logs"
    write_results(logs, "llava_tokprune", "pretrained=x,method=none", {"pope": {"pope_accuracy": 0.8}}, kept=576, stamp="20250101_000000")
    write_results(logs, "llava_tokprune", "pretrained=x,method=topk_cls,budget=64", {"pope": {"pope_accuracy": 0.6}}, kept=64,
                  stamp="20250101_000100")
    broken = write_results(tmp_path / "other" / "spatial", "llava_tokprune", "pretrained=x,method=spatial,budget=64",
                           {"pope": {"pope_accuracy": 0.7}}, kept=64)
    broken.write_text(broken.read_text()[:40])
    # a folder given on the command line whose only results file is broken: one error line, nothing written
    assert main(["leaderboard", str(logs), str(tmp_path / "other"), "--out", str(tmp_path / "board")]) == 2
    assert "no lmms-eval *_results.json in this folder" in capsys.readouterr().err and not (tmp_path / "board").exists()
    write_results(tmp_path / "other" / "random", "llava_tokprune", "pretrained=x,method=random,budget=64", {"pope": {"pope_accuracy": 0.7}},
                  kept=64)
    assert main(["leaderboard", str(logs), str(tmp_path / "other"), "--out", str(tmp_path / "board")]) == 0
    captured = capsys.readouterr()
    with open(tmp_path / "board" / "leaderboard.csv") as fh:
        records = {r["run"]: r for r in csv.DictReader(fh)}
    assert set(records) == {"logs/none", "logs/topk_cls-budget64", "random"}
    assert records["logs/topk_cls-budget64"]["baseline"] == "logs/none"
    assert float(records["logs/topk_cls-budget64"]["relative_score_pct"]) == pytest.approx(75.0)
    assert f"warning: skipped {broken}: not a complete results JSON" in captured.err
    assert f"skipped {broken}" in (tmp_path / "board" / "leaderboard.md").read_text()


def test_labels_come_from_what_the_run_resolved_not_from_the_config_file_now(tmp_path):
    """config=my.yaml edited after the run (budget 64 -> 8): the row says what the run used, read from its samples."""
    cfg = tmp_path / "my.yaml"
    cfg.write_text("model: llava_tokprune\nmodel_args: pretrained=x,method=topk_cls,budget=8\n")
    results = write_results(tmp_path / "runs" / "mine", "llava_tokprune", f"config={cfg}", {"pope": {"pope_accuracy": 0.6}}, kept=64)
    samples = results.parent / "20250101_000000_samples_pope.jsonl"
    samples.write_text(json.dumps({"doc_id": 0, "token_counts": [{"visual_tokens_kept": 64, "method_args": "method=topk_cls,variant=fixed,budget=64"}]}) + "\n")
    rows, _ = build_rows([tmp_path / "runs"])
    assert (rows[0].method, rows[0].budget, rows[0].setting) == ("topk_cls", "64", "budget 64")
    samples.unlink()
    warnings: list = []
    rows, _ = build_rows([tmp_path / "runs"], warnings=warnings)
    assert rows[0].budget == "8" and "labelled from the current contents of" in warnings[0]
