"""What a CI leaderboard job needs: sharded sweeps, merged leaderboards with provenance, the regression gate.

Sweeps run on the stand-in lmms-eval of test_sweep_leaderboard.py; leaderboards are built from synthetic
results files shaped like lmms-eval's (results JSON + a samples file carrying our token_counts)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import pytest
from test_sweep_leaderboard import write_sweep

from lmms_tokprune.cli import main
from lmms_tokprune.report.leaderboard import build_rows
from lmms_tokprune.sweep import load_sweep, parse_shard, shard_runs

VERSIONS = {"lmms_tokprune": "0.1.0", "lmms_eval": "0.7.3", "transformers": "5.23.0", "torch": "2.14.1", "git_commit": "abc123"}


# -- shards --------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [("3/2", "within 1..2"), ("0/0", "at least 1"), ("0/3", "within 1..3"), ("x", "expected I/N"),
                                           ("1/", "expected I/N"), ("-1/2", "expected I/N")])
def test_bad_shard_specs_are_one_clear_error(spec, message, tmp_path, capsys):
    with pytest.raises(ValueError, match=message):
        parse_shard(spec)
    path = write_sweep(tmp_path, {"tasks": ["t"], "output_dir": "out", "runs": [{"name": "a", "model": "fake_ok"}]})
    assert main(["sweep", str(path), f"--shard={spec}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "out").exists()


def test_shards_cover_every_run_once_and_survive_appending(tmp_path):
    runs = [{"name": f"r{i}", "model": "fake_ok"} for i in range(11)]
    path = write_sweep(tmp_path, {"tasks": ["t"], "output_dir": "out", "runs": runs})
    sweep = load_sweep(path)
    for count in (1, 2, 3, 4, 11, 13):
        parts = [[r.name for r in shard_runs(sweep.runs, i, count)] for i in range(1, count + 1)]
        names = [n for part in parts for n in part]
        assert sorted(names) == sorted(r.name for r in sweep.runs) and len(names) == len(set(names))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    before = {i: [r.name for r in shard_runs(sweep.runs, i, 3)] for i in (1, 2, 3)}
    longer = write_sweep(tmp_path, {"tasks": ["t"], "output_dir": "out", "runs": runs + [{"name": "new1", "model": "fake_ok"},
                                                                                         {"name": "new2", "model": "fake_ok"}]}, "longer.yaml")
    after = {i: [r.name for r in shard_runs(load_sweep(longer).runs, i, 3)] for i in (1, 2, 3)}
    for i in (1, 2, 3):
        assert after[i][: len(before[i])] == before[i]  # appended runs never move an existing one


def test_sharded_sweep_runs_its_shard_lists_it_and_resumes(tmp_path, fake_launcher, capsys):
    launcher, calls = fake_launcher
    path = write_sweep(tmp_path, {"tasks": ["t1"], "output_dir": "out", "launcher": launcher,
                                  "runs": [{"name": n, "model": "fake_ok"} for n in ("a", "b", "c", "d", "e")]})
    assert main(["sweep", str(path), "--shard", "2/2", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in listed[:-1]] == ["b", "d"] and listed[-1] == "2 runs (shard 2/2) of sweep.yaml"
    assert all(line.endswith("to run") for line in listed[:-1]) and calls() == 0
    assert main(["sweep", str(path), "--shard", "2/2"]) == 0
    assert calls() == 2 and sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["b", "d"]
    manifest = json.loads((tmp_path / "out" / "sweep.shard-2-of-2.json").read_text())
    assert manifest["shard"] == "2/2" and [r["name"] for r in manifest["runs"]] == ["b", "d"]
    capsys.readouterr()
    assert main(["sweep", str(path), "--shard", "2/2"]) == 0 and calls() == 2  # resumed: nothing left to run
    capsys.readouterr()
    assert main(["sweep", str(path), "--shard", "2/2", "--list"]) == 0
    assert all(line.endswith("finished") for line in capsys.readouterr().out.splitlines()[:-1])
    assert main(["sweep", str(path), "--shard", "1/2"]) == 0 and calls() == 5


# -- merged leaderboards -------------------------------------------------------------------------
def write_run(folder: Path, method: str, scores: Dict[str, Dict[str, float]], kept: float, model: str = "llava_tokprune",
              checkpoint: str = "demo", prompt_style: str = "llava_v1", extra: str = "", prefill_ms: Optional[float] = None,
              lmms_eval: str = "0.7.3", config: str = "cfg0") -> Path:
    """A run folder as lmms-eval + our wrapper write it: results JSON and a samples file with token_counts."""
    sub = folder / "demo"
    sub.mkdir(parents=True, exist_ok=True)
    results = {t: {"alias": t, **{f"{m},none": v for m, v in ms.items()}} for t, ms in scores.items()}
    tp: Dict[str, Any] = {"avg_visual_tokens_in": 576.0, "avg_visual_tokens_kept": kept, "avg_visual_tokens_equivalent": kept,
                          "avg_llm_prefill_tokens": kept + 60, "avg_prefill_tflops": (kept + 60) * 1e-6}
    if prefill_ms is not None:
        tp["avg_prefill_ms"] = prefill_ms
    model_args = f"pretrained={checkpoint},method={method}" + (f",{extra}" if extra else "")
    data = {"results": results, "config": {"model": model, "model_args": model_args, "limit": 8.0}, "throughput": tp,
            "model_name_sanitized": "demo", "lmms_eval_version": "main@123"}
    (sub / "20260101_000000_results.json").write_text(json.dumps(data))
    counts = {"visual_tokens_kept": kept, "config": config, "method_args": f"method={method},variant=fixed" + (f",{extra}" if extra else ""),
              "provenance": {**VERSIONS, "lmms_eval": lmms_eval, "checkpoint": checkpoint, "prompt_style": prompt_style}}
    first_task = next(iter(scores))
    (sub / f"20260101_000000_samples_{first_task}.jsonl").write_text(json.dumps({"doc_id": 0, "token_counts": [counts]}) + "\n")
    return folder


SCORES = {"mme": {"mme_perception_score": 1400.0, "mme_cognition_score": 300.0}, "pope": {"pope_accuracy": 0.8}}


@pytest.fixture
def two_shards(tmp_path) -> Path:
    """A sweep run as two shards, each downloaded into its own folder (as a CI merge job gets them)."""
    write_run(tmp_path / "shard-1" / "none", "none", SCORES, 576, prefill_ms=100.0)
    write_run(tmp_path / "shard-1" / "topk-b64", "topk_cls", {"mme": {"mme_perception_score": 700.0, "mme_cognition_score": 150.0},
                                                              "pope": {"pope_accuracy": 0.6}}, 64, extra="budget=64", prefill_ms=25.0)
    write_run(tmp_path / "shard-2" / "fastv-b64", "fastv", {"mme": {"mme_perception_score": 1050.0, "mme_cognition_score": 300.0},
                                                            "pope": {"pope_accuracy": 0.8}}, 30, extra="budget=64", prefill_ms=30.0)
    return tmp_path


def test_leaderboard_merges_shards_with_provenance_and_mme_apart(two_shards, capsys):
    out = two_shards / "board"
    assert main(["leaderboard", str(two_shards / "shard-1"), str(two_shards / "shard-2"), "--out", str(out)]) == 0
    md = (out / "leaderboard.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| run "))
    for column in ("mme (mme_perception_score)", "mme (mme_cognition_score)", "mme vs baseline (%)", "pope (pope_accuracy)",
                   "visual tokens", "equivalent tokens", "prefill TFLOPs", "prefill ms", "mean vs baseline (%)"):
        assert column in head
    assert "## Provenance" in md and "| fastv-b64 | demo | llava_v1 | cfg0 | 0.1.0 | 0.7.3 | 5.23.0 | 2.14.1 | abc123 |" in md
    data = json.loads((out / "leaderboard.json").read_text())
    rows = {r["run"]: r for r in data["rows"]}
    assert set(rows) == {"none", "topk-b64", "fastv-b64"} and rows["fastv-b64"]["baseline"] == "none"  # across the two folders
    fastv = {(s["task"], s["metric"]): s for s in rows["fastv-b64"]["scores"]}
    assert fastv[("mme", "mme_perception_score")]["relative_pct"] == pytest.approx(75.0)
    assert fastv[("mme", "mme_cognition_score")]["relative_pct"] == pytest.approx(100.0)
    assert rows["fastv-b64"]["relative_score_pct"] == pytest.approx((75 + 100 + 100) / 3)
    assert rows["topk-b64"]["prefill_ms"] == 25.0 and rows["none"]["provenance"]["torch"] == "2.14.1"
    with open(out / "leaderboard.csv") as fh:
        records = {r["run"]: r for r in csv.DictReader(fh)}
    assert float(records["fastv-b64"]["mme/mme_cognition_score"]) == 300.0 and records["fastv-b64"]["config"] == "cfg0"
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "warning" not in capsys.readouterr().err


def test_identical_copies_merge_and_differing_copies_are_refused(two_shards, capsys):
    shutil.copytree(two_shards / "shard-2" / "fastv-b64", two_shards / "again" / "fastv-b64")
    rows, _ = build_rows([two_shards / "shard-1", two_shards / "shard-2", two_shards / "again"])
    assert sorted(r.name for r in rows) == ["fastv-b64", "none", "topk-b64"]
    write_run(two_shards / "again" / "fastv-b64", "fastv", {"mme": {"mme_perception_score": 1.0, "mme_cognition_score": 300.0},
                                                            "pope": {"pope_accuracy": 0.8}}, 30, extra="budget=64")
    out = two_shards / "board"
    assert main(["leaderboard", str(two_shards / "shard-1"), str(two_shards / "shard-2"), str(two_shards / "again"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run 'fastv-b64' is in two folders with the same configuration but different results" in err
    assert not out.exists()  # nothing half-written


def test_bad_inputs_are_one_error_line_each(two_shards, capsys):
    (two_shards / "failed").mkdir()
    (two_shards / "failed" / "run.log").write_text("Traceback ...")
    assert main(["leaderboard", str(two_shards / "shard-1"), str(two_shards / "failed"), "--out", str(two_shards / "b")]) == 2
    assert "no lmms-eval *_results.json in this folder" in capsys.readouterr().err
    write_run(two_shards / "other" / "builtin", "none", SCORES, 576, model="llava")
    assert main(["leaderboard", str(two_shards / "shard-1"), str(two_shards / "other"), "--out", str(two_shards / "b")]) == 2
    assert "results of model 'llava', not an lmms_tokprune model id" in capsys.readouterr().err
    assert not (two_shards / "b").exists()


def test_mixed_checkpoints_prompts_and_versions_are_warned_and_baselined_apart(two_shards, capsys):
    write_run(two_shards / "shard-3" / "none-7b", "none", SCORES, 576, checkpoint="llava-hf/llava-1.5-7b-hf")
    write_run(two_shards / "shard-3" / "topk-7b", "topk_cls", SCORES, 64, checkpoint="llava-hf/llava-1.5-7b-hf", extra="budget=64",
              prompt_style="chat_template", lmms_eval="0.7.4")
    warnings: list = []
    rows, _ = build_rows([two_shards / "shard-1", two_shards / "shard-2", two_shards / "shard-3"], warnings=warnings)
    by = {r.name: r for r in rows}
    assert by["topk-7b"].baseline_name == "none-7b" and by["topk-b64"].baseline_name == "none"  # the none run of its checkpoint
    text = "\n".join(warnings)
    assert "runs differ in checkpoint: demo (" in text and "llava-hf/llava-1.5-7b-hf (none-7b, topk-7b)" in text
    assert "runs differ in prompt style: chat_template (topk-7b); llava_v1 (" in text
    assert "runs differ in lmms-eval version: 0.7.3 (" in text and "0.7.4 (topk-7b)" in text
    shutil.rmtree(two_shards / "shard-3" / "none-7b")
    warnings = []
    rows, _ = build_rows([two_shards / "shard-1", two_shards / "shard-3"], warnings=warnings)
    assert next(r for r in rows if r.name == "topk-7b").relative_pct is None
    assert any("no uncompressed (method none) run on checkpoint llava-hf/llava-1.5-7b-hf: no relative scores for topk-7b" in w
               for w in warnings)


# -- the regression gate -------------------------------------------------------------------------
def _board(two_shards: Path, *extra: str) -> int:
    return main(["leaderboard", str(two_shards / "shard-1"), str(two_shards / "shard-2"), "--out", str(two_shards / "board"), *extra])


def test_check_passes_on_the_same_runs_and_fails_on_each_kind_of_change(two_shards, capsys):
    baseline = two_shards / "baseline.json"
    assert _board(two_shards, "--write-baseline", str(baseline)) == 0
    stored = json.loads(baseline.read_text())
    assert set(stored["runs"]) == {"none", "topk-b64", "fastv-b64"} and stored["runs"]["fastv-b64"]["checkpoint"] == "demo"
    capsys.readouterr()
    assert _board(two_shards, "--check", str(baseline), "--tolerance", "0.01") == 0
    out = capsys.readouterr().out
    assert "3 runs compared, passed" in out and "## Check" in (two_shards / "board" / "leaderboard.md").read_text()

    # a 0.5% drop passes at tolerance 0.01, a 2% drop does not
    write_run(two_shards / "shard-2" / "fastv-b64", "fastv", {"mme": {"mme_perception_score": 1050 * 0.995, "mme_cognition_score": 300.0},
                                                              "pope": {"pope_accuracy": 0.8}}, 30, extra="budget=64")
    assert _board(two_shards, "--check", str(baseline), "--tolerance", "0.01") == 0
    write_run(two_shards / "shard-2" / "fastv-b64", "fastv", {"mme": {"mme_perception_score": 1050 * 0.98, "mme_cognition_score": 300.0},
                                                              "pope": {"pope_accuracy": 0.8}}, 30, extra="budget=64")
    capsys.readouterr()
    assert _board(two_shards, "--check", str(baseline), "--tolerance", "0.01") == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "worse: fastv-b64: mme (mme_perception_score) 1029.0000 < 1050.0000" in out

    # same scores, other token counts
    write_run(two_shards / "shard-2" / "fastv-b64", "fastv", {"mme": {"mme_perception_score": 1050.0, "mme_cognition_score": 300.0},
                                                              "pope": {"pope_accuracy": 0.8}}, 31, extra="budget=64")
    assert _board(two_shards, "--check", str(baseline)) == 1
    assert "token counts changed: fastv-b64: visual_tokens_kept 31.0 (baseline 30.0)" in capsys.readouterr().out

    # a run missing, a run new: listed, and the gate fails
    shutil.rmtree(two_shards / "shard-2" / "fastv-b64")
    write_run(two_shards / "shard-2" / "dart-b64", "dart", SCORES, 28, extra="budget=64")
    assert _board(two_shards, "--check", str(baseline)) == 1
    out = capsys.readouterr().out
    assert "missing (in the baseline, not run now): fastv-b64" in out and "new (not in the baseline): dart-b64 (dart, budget 64)" in out


def test_check_refuses_another_checkpoints_baseline_and_bad_files(two_shards, capsys):
    baseline = two_shards / "baseline.json"
    assert _board(two_shards, "--write-baseline", str(baseline)) == 0
    data = json.loads(baseline.read_text())
    data["runs"]["none"]["checkpoint"] = "llava-hf/llava-1.5-7b-hf"
    baseline.write_text(json.dumps(data))
    shutil.rmtree(two_shards / "board")
    capsys.readouterr()
    assert _board(two_shards, "--check", str(baseline)) == 2
    err = capsys.readouterr().err
    assert "the baseline was made on checkpoint llava-hf/llava-1.5-7b-hf, but run 'none' ran on demo" in err
    assert not (two_shards / "board").exists()
    baseline.write_text("{}")
    assert _board(two_shards, "--check", str(baseline)) == 2 and "not a leaderboard baseline" in capsys.readouterr().err
    assert _board(two_shards, "--check", str(two_shards / "nope.json")) == 2 and "no such baseline file" in capsys.readouterr().err
    assert _board(two_shards, "--check", str(baseline), "--write-baseline", str(baseline)) == 2
    assert _board(two_shards, "--tolerance", "0.1") == 2 and "--tolerance applies to --check only" in capsys.readouterr().err
    assert _board(two_shards, "--write-baseline", str(baseline)) == 0
    assert _board(two_shards, "--check", str(baseline), "--tolerance", "1.5") == 2
    assert "must be a fraction of the baseline score" in capsys.readouterr().err
