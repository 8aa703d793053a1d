"""LLM-judged tasks that were never judged (no API key, no network, --predict_only) are "not judged", not a score.

The samples below are what lmms-eval 0.7.3 logs (``--log_samples``: a line per document, carrying what the task's
``process_results`` returned, per metric). The failure records were produced by calling lmms-eval 0.7.3's own
``llava_process_results`` / ``mmvet_process_results`` offline (no key; a key with no network); the last tests
call them again here, so a change in lmms-eval's records shows up as a failing test, not as a wrong table."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from lmms_tokprune.cli import main
from lmms_tokprune.report.judged import NOT_JUDGED, RULES, judge_rule
from lmms_tokprune.report.leaderboard import build_rows

STAMP = "20260101_000000"
JUDGE = "gpt-4o-2024-11-20"
CATEGORIES = ("conv", "detail", "complex")


# -- what lmms-eval 0.7.3 logs ---------------------------------------------------------------------
def llava_sample(doc_id: int, category: str, scores: List[float], review: str, eval_model: str) -> Dict[str, Any]:
    """A llava_in_the_wild sample line: the entry of the sample's category (and `gpt_eval_llava_all`) carries the
    judge's score pair, the other categories' entries [-999, -999] (llava-in-the-wild/utils.py)."""
    entry = {"question": "What is unusual about this image?", "ans1": "A man irons clothes on the back of a taxi.",
             "ans2": "A man is ironing on a car.", "context": "a man ironing", "category": f"llava_bench_{category}", "review": review,
             "scores": scores, "eval_model": eval_model, "content": "[Context]\n..."}
    line: Dict[str, Any] = {"doc_id": doc_id, "target": entry["ans1"], "filtered_resps": entry["ans2"], "doc_hash": f"h{doc_id}",
                            "input": "What is unusual about this image?"}
    for c in CATEGORIES:
        line[f"gpt_eval_llava_{c}"] = entry if c == category else {**entry, "scores": [-999, -999]}
    line["gpt_eval_llava_all"] = entry
    return line


def llava_no_key(doc_id: int, category: str = "conv") -> Dict[str, Any]:  # no OPENAI_API_KEY: the judge client cannot be built
    return llava_sample(doc_id, category, [-1, -1], "Failed to Get a Proper Review.", "Failed Request")


def llava_no_network(doc_id: int, category: str = "conv") -> Dict[str, Any]:  # a key, no network: the verifier's error text
    return llava_sample(doc_id, category, [-1, -1], "error: Connection error.", JUDGE)


def llava_judged(doc_id: int, category: str = "conv", pair=(8.0, 6.0)) -> Dict[str, Any]:
    return llava_sample(doc_id, category, list(pair), f"{pair[0]:g} {pair[1]:g}\nAssistant 2 misses the taxi.", JUDGE)


def mmvet_sample(doc_id: int, score: float, eval_model: str) -> Dict[str, Any]:
    """An mmvet sample line (mmvet/utils.py): a failed judge leaves score 0.0 and eval_model ''."""
    entry = {"question_id": f"v1_{doc_id}", "question": "What is x in the equation?", "gt_answer": "-1<AND>-5", "capabilities": "ocr,math",
             "pred_answer": "x = 3", "score": score, "eval_model": eval_model}
    return {"doc_id": doc_id, "target": "-1<AND>-5", "filtered_resps": "x = 3", "doc_hash": f"m{doc_id}", "input": "What is x?",
            "gpt_eval_score": entry}


def mmvet_failed(doc_id: int) -> Dict[str, Any]:
    return mmvet_sample(doc_id, 0.0, "")


def write_judged_run(folder: Path, method: str, results: Dict[str, Dict[str, Any]], samples: Dict[str, List[Dict[str, Any]]],
                     kept: float = 576, extra: str = "") -> Path:
    """A run folder as lmms-eval + our wrapper write it: results JSON (lmms-eval's keys) and a samples file per task,
    every line carrying our token_counts."""
    sub = folder / "demo"
    sub.mkdir(parents=True, exist_ok=True)
    res = {t: {"alias": t, **{f"{m},none": v for m, v in ms.items()}, **{f"{m}_stderr,none": "N/A" for m in ms}} for t, ms in results.items()}
    tp = {"avg_visual_tokens_in": 576.0, "avg_visual_tokens_kept": kept, "avg_visual_tokens_equivalent": kept,
          "avg_llm_prefill_tokens": kept + 60, "avg_prefill_tflops": (kept + 60) * 1e-6}
    model_args = f"pretrained=demo,method={method}" + (f",{extra}" if extra else "")
    (sub / f"{STAMP}_results.json").write_text(json.dumps({"results": res, "config": {"model": "llava_tokprune", "model_args": model_args,
                                                                                      "limit": None},
                                                           "throughput": tp, "model_name_sanitized": "demo", "lmms_eval_version": "0.7.3"}))
    counts = {"visual_tokens_kept": kept, "config": "cfg0", "method_args": f"method={method}" + (f",{extra}" if extra else ""),
              "provenance": {"lmms_eval": "0.7.3", "checkpoint": "demo", "prompt_style": "llava_v1"}}
    for task, lines in samples.items():
        with open(sub / f"{STAMP}_samples_{task}.jsonl", "w") as fh:
            for line in lines:
                fh.write(json.dumps({**line, "token_counts": [counts]}) + "\n")
    return folder


POPE = {"pope_accuracy": 0.86}


def pope_lines(n: int = 3) -> List[Dict[str, Any]]:
    return [{"doc_id": i, "target": "yes", "filtered_resps": "yes", "pope_accuracy": {"score": 1}} for i in range(n)]


@pytest.fixture
def runs(tmp_path) -> Path:
    """An uncompressed and a compressed run. The compressed run was made offline: no judge for llava_in_the_wild
    (no key: lmms-eval reports 100.0) nor mmvet (no network: 0.0); pope is scored as usual."""
    root = tmp_path / "runs"
    write_judged_run(root / "none", "none", {"llava_in_the_wild": {"gpt_eval_llava_all": 80.0, "gpt_eval_llava_conv": 80.0},
                                             "mmvet": {"gpt_eval_score": 30.0}, "pope": POPE},
                     {"llava_in_the_wild": [llava_judged(i) for i in range(3)],
                      "mmvet": [mmvet_sample(i, 0.3, JUDGE) for i in range(3)], "pope": pope_lines()})
    write_judged_run(root / "topk-b64", "topk_cls", {"llava_in_the_wild": {"gpt_eval_llava_all": 100.0, "gpt_eval_llava_conv": 100.0},
                                                     "mmvet": {"gpt_eval_score": 0.0}, "pope": {"pope_accuracy": 0.43}},
                     {"llava_in_the_wild": [llava_no_key(i) for i in range(3)], "mmvet": [mmvet_failed(i) for i in range(3)],
                      "pope": pope_lines()}, kept=64, extra="budget=64")
    return root


LLAVA = ("llava_in_the_wild", "gpt_eval_llava_all")
MMVET = ("mmvet", "gpt_eval_score")


# -- the detection table ------------------------------------------------------------------------------
@pytest.mark.parametrize("task, rule", [("llava_in_the_wild", 0), ("llava_in_the_wild_ko", 0), ("llava_in_the_wild_arabic", 0),
                                        ("llava_bench_coco", 0), ("llava_wilder_small", 0), ("mmvet", 1), ("mmvetv2", 1),
                                        ("wildvision_0630", 2), ("pope", None), ("mmbench_en_dev_static", None), ("textvqa_val", None),
                                        ("mme", None), ("tokprune_smoke", None)])
def test_which_tasks_are_llm_judged(task, rule):
    assert judge_rule(task) is (None if rule is None else RULES[rule])


@pytest.mark.parametrize("sample, failed", [
    (llava_no_key(0), True), (llava_no_network(0), True), (llava_sample(0, "conv", [-1, -1], "", ""), True),
    (llava_sample(0, "conv", [-1, -1], "I cannot score this.", JUDGE), True),  # a review without a score pair: no judgement
    (llava_judged(0), False), (llava_judged(0, pair=(7.0, 0.0)), False),
])
def test_llava_records(sample, failed):
    assert RULES[0].failed(sample, "gpt_eval_llava_all") is failed
    assert RULES[0].failed(sample, "gpt_eval_llava_conv") is failed
    assert RULES[0].failed(sample, "gpt_eval_llava_detail") is None  # another category's entry: not a sample of that column


def test_mmvet_records():
    assert RULES[1].failed(mmvet_failed(0), "gpt_eval_score") is True
    assert RULES[1].failed(mmvet_sample(0, 0.0, "dummy"), "gpt_eval_score") is True  # lmms-eval's API_TYPE=dummy stand-in judge
    assert RULES[1].failed(mmvet_sample(0, 0.0, JUDGE), "gpt_eval_score") is False  # judged, and wrong: a real 0.0
    assert RULES[1].failed(mmvet_sample(0, 1.0, JUDGE), "gpt_eval_score") is False
    assert RULES[1].failed({"doc_id": 0}, "gpt_eval_score") is None


# -- the leaderboard ------------------------------------------------------------------------------------
def test_failed_judge_makes_the_column_not_judged_out_of_the_means_and_warned(runs, capsys):
    warnings: list = []
    rows, _ = build_rows([runs], warnings=warnings)
    by = {r.name: r for r in rows}
    topk, none = by["topk-b64"], by["none"]
    assert topk.columns == [LLAVA, MMVET, ("pope", "pope_accuracy")]
    assert set(topk.not_judged) == {LLAVA, MMVET} and list(topk.scores) == [("pope", "pope_accuracy")]
    assert topk.not_judged[LLAVA].startswith("3/3 judge calls failed") and topk.not_judged[MMVET].startswith("3/3 judge calls failed")
    assert topk.reported == {LLAVA: 100.0, MMVET: 0.0}
    assert topk.mean_score == pytest.approx(0.43)  # not (100 + 0 + 0.43) / 3
    assert topk.relative == {("pope", "pope_accuracy"): pytest.approx(50.0)} and topk.relative_pct == pytest.approx(50.0)
    assert none.not_judged == {} and none.scores[LLAVA] == 80.0 and none.scores[MMVET] == 30.0  # judged: as before
    assert none.relative_pct == pytest.approx(100.0)
    text = "\n".join(warnings)
    assert "topk-b64: llava_in_the_wild (gpt_eval_llava_all) not judged: 3/3 judge calls failed" in text
    assert "lmms-eval reported 100.0, which is not a score" in text
    assert "topk-b64: mmvet (gpt_eval_score) not judged: 3/3 judge calls failed" in text and "none:" not in text

    out = runs.parent / "board"
    assert main(["leaderboard", str(runs), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: topk-b64: llava_in_the_wild (gpt_eval_llava_all) not judged: 3/3" in err
    md = (out / "leaderboard.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| topk-b64 "))
    assert line.count(f"| {NOT_JUDGED} |") == 2 and " 100.0 " not in line and "| 0.0000 |" not in line
    assert f"{NOT_JUDGED}: an LLM-judged task whose judge failed" in md
    with open(out / "leaderboard.csv") as fh:
        records = {r["run"]: r for r in csv.DictReader(fh)}
    assert records["topk-b64"]["llava_in_the_wild/gpt_eval_llava_all"] == NOT_JUDGED
    assert records["topk-b64"]["mmvet/gpt_eval_score"] == NOT_JUDGED and records["topk-b64"]["mmvet/gpt_eval_score vs baseline (%)"] == ""
    assert float(records["none"]["llava_in_the_wild/gpt_eval_llava_all"]) == 80.0
    assert float(records["topk-b64"]["relative_score_pct"]) == pytest.approx(50.0)
    data = json.loads((out / "leaderboard.json").read_text())
    scores = {(s["task"], s["metric"]): s for s in next(r for r in data["rows"] if r["run"] == "topk-b64")["scores"]}
    assert scores[LLAVA]["score"] is None and scores[LLAVA]["reported"] == 100.0 and scores[LLAVA]["not_judged"].startswith("3/3")
    assert scores[("pope", "pope_accuracy")]["score"] == 0.43 and "not_judged" not in scores[("pope", "pope_accuracy")]
    assert any("mmvet (gpt_eval_score) not judged" in w for w in data["warnings"])


def test_one_failed_judgement_is_enough(tmp_path):
    """lmms-eval averages a failed sample in as a score ([-1, -1] pair, 0.0): one failure moves the number."""
    write_judged_run(tmp_path / "r", "none", {"llava_in_the_wild": {"gpt_eval_llava_all": 71.4}, "mmvet": {"gpt_eval_score": 36.7}},
                     {"llava_in_the_wild": [llava_judged(0), llava_no_network(1), llava_judged(2)],
                      "mmvet": [mmvet_sample(0, 0.5, JUDGE), mmvet_sample(1, 0.6, JUDGE), mmvet_failed(2)]})
    warnings: list = []
    (row,), _ = build_rows([tmp_path / "r"], warnings=warnings)
    assert row.not_judged[LLAVA].startswith("1/3 judge calls failed") and row.not_judged[MMVET].startswith("1/3 judge calls failed")
    assert row.scores == {} and row.mean_score is None and row.relative_pct is None


def test_a_category_column_counts_only_its_own_samples(tmp_path):
    """--metric llava_in_the_wild=gpt_eval_llava_detail: the conv sample whose judge failed is not a detail sample."""
    samples = {"llava_in_the_wild": [llava_no_key(0, "conv"), llava_judged(1, "detail"), llava_judged(2, "detail")]}
    results = {"llava_in_the_wild": {"gpt_eval_llava_all": 25.0, "gpt_eval_llava_conv": 100.0, "gpt_eval_llava_detail": 75.0}}
    write_judged_run(tmp_path / "r", "none", results, samples)
    (row,), _ = build_rows([tmp_path / "r"], metrics={"llava_in_the_wild": "gpt_eval_llava_detail"})
    assert row.scores == {("llava_in_the_wild", "gpt_eval_llava_detail"): 75.0} and row.not_judged == {}
    (row,), _ = build_rows([tmp_path / "r"], metrics={"llava_in_the_wild": "gpt_eval_llava_conv"})
    assert row.not_judged[("llava_in_the_wild", "gpt_eval_llava_conv")].startswith("1/1 judge calls failed")
    (row,), _ = build_rows([tmp_path / "r"])
    assert row.not_judged[LLAVA].startswith("1/3 judge calls failed")


def test_predict_only_runs_are_not_judged(tmp_path):
    """lmms-eval --predict_only: every metric is its `bypass` placeholder (999), nothing is a score."""
    sub = write_judged_run(tmp_path / "r", "none", {"llava_in_the_wild": {"bypass": 999}, "pope": {"bypass": 999},
                                                    "tokprune_smoke": {"bypass": 999}},
                           {"llava_in_the_wild": [{"doc_id": 0, "filtered_resps": "A man irons.", "bypass": ["gold", ["A man irons."]]}]})
    warnings: list = []
    (row,), _ = build_rows([sub], warnings=warnings)
    assert row.columns == [LLAVA, ("pope", "pope_accuracy"), ("tokprune_smoke", "bypass")]
    assert set(row.not_judged) == set(row.columns) and row.scores == {}
    assert all("--predict_only" in why for why in row.not_judged.values())
    assert sum("not judged: a --predict_only run" in w for w in warnings) == 3


def test_a_judged_task_without_samples_keeps_its_score_and_is_warned(tmp_path):
    write_judged_run(tmp_path / "r", "none", {"llava_in_the_wild": {"gpt_eval_llava_all": 80.0}, "pope": POPE}, {"pope": pope_lines()})
    warnings: list = []
    (row,), _ = build_rows([tmp_path / "r"], warnings=warnings)
    assert row.scores[LLAVA] == 80.0 and row.not_judged == {}
    assert any("r: llava_in_the_wild (gpt_eval_llava_all) is LLM-judged but no samples file to check its judge" in w for w in warnings)


# -- the regression gate ----------------------------------------------------------------------------------
def _board(root: Path, *extra: str) -> int:
    return main(["leaderboard", str(root), "--out", str(root.parent / "board"), *extra])


def test_check_refuses_columns_not_judged_now_or_in_the_baseline(runs, capsys):
    judged = runs.parent / "judged.json"
    # a baseline from judged runs: the topk run judged this time
    write_judged_run(runs / "topk-b64", "topk_cls", {"llava_in_the_wild": {"gpt_eval_llava_all": 60.0}, "mmvet": {"gpt_eval_score": 20.0},
                                                     "pope": {"pope_accuracy": 0.43}},
                     {"llava_in_the_wild": [llava_judged(i, pair=(8.0, 4.8)) for i in range(3)],
                      "mmvet": [mmvet_sample(i, 0.2, JUDGE) for i in range(3)], "pope": pope_lines()}, kept=64, extra="budget=64")
    assert _board(runs, "--write-baseline", str(judged)) == 0
    stored = json.loads(judged.read_text())["runs"]["topk-b64"]
    assert stored["scores"]["llava_in_the_wild (gpt_eval_llava_all)"] == 60.0 and "not_judged" not in stored
    capsys.readouterr()
    assert _board(runs, "--check", str(judged)) == 0  # judged both times: compared as before

    # the same run made offline: the check refuses, writes nothing
    write_judged_run(runs / "topk-b64", "topk_cls", {"llava_in_the_wild": {"gpt_eval_llava_all": 100.0}, "mmvet": {"gpt_eval_score": 0.0},
                                                     "pope": {"pope_accuracy": 0.43}},
                     {"llava_in_the_wild": [llava_no_key(i) for i in range(3)], "mmvet": [mmvet_failed(i) for i in range(3)],
                      "pope": pope_lines()}, kept=64, extra="budget=64")
    board = runs.parent / "board"
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.json", "pareto.png"):
        (board / name).unlink()
    assert _board(runs, "--check", str(judged)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to compare columns that were not judged" in err
    assert "topk-b64: llava_in_the_wild (gpt_eval_llava_all) not judged now (3/3 judge calls failed" in err
    assert "topk-b64: mmvet (gpt_eval_score) not judged now" in err
    assert not any(board.iterdir())  # nothing written

    # a baseline written from the offline run: those columns are recorded as not judged, never as a number
    offline = runs.parent / "offline.json"
    assert _board(runs, "--write-baseline", str(offline)) == 0
    assert "2 column(s) not judged, recorded as such" in capsys.readouterr().out
    stored = json.loads(offline.read_text())["runs"]["topk-b64"]
    assert set(stored["scores"]) == {"pope (pope_accuracy)"}
    assert set(stored["not_judged"]) == {"llava_in_the_wild (gpt_eval_llava_all)", "mmvet (gpt_eval_score)"}
    # ... and a check against it refuses them even once the run is judged
    write_judged_run(runs / "topk-b64", "topk_cls", {"llava_in_the_wild": {"gpt_eval_llava_all": 60.0}, "mmvet": {"gpt_eval_score": 20.0},
                                                     "pope": {"pope_accuracy": 0.43}},
                     {"llava_in_the_wild": [llava_judged(i, pair=(8.0, 4.8)) for i in range(3)],
                      "mmvet": [mmvet_sample(i, 0.2, JUDGE) for i in range(3)], "pope": pope_lines()}, kept=64, extra="budget=64")
    assert _board(runs, "--check", str(offline)) == 2
    err = capsys.readouterr().err
    assert "topk-b64: llava_in_the_wild (gpt_eval_llava_all) not judged in the baseline (3/3 judge calls failed" in err
    assert "write the baseline again from judged runs" in err


# -- the records come from lmms-eval 0.7.3's own task code ---------------------------------------------------
def _task_utils(monkeypatch, folder: str, name: str, key: Optional[str], api_type: str = "openai"):
    lmms_eval = pytest.importorskip("lmms_eval")
    path = Path(lmms_eval.__file__).parent / "tasks" / folder / name
    if not path.is_file():
        pytest.skip(f"lmms-eval has no {folder}/{name}")
    monkeypatch.setenv("OPENAI_API_KEY", key or "")  # set (even empty): a .env file cannot bring a real one in
    monkeypatch.setenv("OPENAI_API_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("API_TYPE", api_type)
    spec = importlib.util.spec_from_file_location(f"_judged_{folder.replace('-', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("key, api_type", [(None, "openai"), ("sk-not-a-key", "dummy")])
def test_lmms_eval_llava_in_the_wild_without_a_judge_logs_what_we_detect(monkeypatch, key, api_type):
    utils = _task_utils(monkeypatch, "llava-in-the-wild", "utils.py", key=key, api_type=api_type)
    doc = {"question_id": 0, "question": "What is shown?", "gpt_answer": "A cat on a mat.", "caption": ["a cat"], "category": "detail"}
    record = utils.llava_process_results(doc, ["A cat."])
    assert record["gpt_eval_llava_all"]["scores"] == [-1, -1]
    assert RULES[0].failed(record, "gpt_eval_llava_all") is True and RULES[0].failed(record, "gpt_eval_llava_detail") is True
    assert RULES[0].failed(record, "gpt_eval_llava_conv") is None
    assert utils.llava_all_aggregation([record["gpt_eval_llava_all"]] * 3) == 100.0  # the number lmms-eval reports


def test_lmms_eval_mmvet_with_an_unreachable_judge_logs_what_we_detect(monkeypatch):
    utils = _task_utils(monkeypatch, "mmvet", "utils.py", key="sk-not-a-key")

    def unreachable(request):
        raise ConnectionError("Connection error.")

    monkeypatch.setattr(utils.server, "evaluate", unreachable)
    doc = {"question_id": "v1_0", "question": "What is x?", "answer": "-1<AND>-5", "capability": "ocr,math"}
    record = utils.mmvet_process_results(doc, ["x = 3"])
    assert record["gpt_eval_score"]["score"] == 0.0 and record["gpt_eval_score"]["eval_model"] == ""
    assert RULES[1].failed(record, "gpt_eval_score") is True
    assert utils.mmvet_aggregate_results([record["gpt_eval_score"]] * 3) == 0.0
