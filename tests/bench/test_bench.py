"""`lmms-tokprune bench` end to end on a tiny preset (the 7B numbers go in the notes, not in tests)."""

from __future__ import annotations

import json

from lmms_tokprune.cli import main


def test_bench_reports_every_method_against_the_full_prefill(capsys):
    code = main(["bench", "--preset", "tiny", "--methods", "none,topk_cls,spatial", "--budget", "58", "--images", "2", "--repeats", "1", "--json"])
    assert code == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert set(rows) == {"none", "topk_cls", "spatial"}
    assert rows["none"]["visual_tokens"] == 576 and rows["topk_cls"]["visual_tokens"] == 58
    assert rows["topk_cls"]["llm_seq_len"] == rows["none"]["llm_seq_len"] - 576 + 58
    assert rows["none"]["flops_ratio"] == 1.0 and rows["topk_cls"]["flops_ratio"] > 3
    for row in rows.values():
        assert row["prefill_ms"] > 0 and row["compress_ms"] >= 0 and row["peak_memory_mb"] > 0


def test_bench_rejects_unknown_method(capsys):
    assert main(["bench", "--preset", "tiny", "--methods", "none,nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_compress_only_bench_times_every_method_and_variant(capsys):
    code = main(["bench", "--compress-only", "--methods", "topk_cls,prumerge", "--budget", "64", "--batch", "2", "--repeats", "1", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert {(r["method"], r["variant"]) for r in rows} == {("topk_cls", "fixed"), ("topk_cls", "reference"), ("prumerge", "fixed"), ("prumerge", "reference")}
    for r in rows:
        assert r["tokens"] == 64 and 0 < r["ms_per_image_best"] <= r["ms_per_image_median"]


def test_bench_bad_numbers_fail_before_any_work(capsys):

    for argv, message in [
        (["--images", "0"], "--images: must be an integer >= 1, got 0"),
        (["--repeats", "0"], "--repeats: must be an integer >= 1, got 0"),
        (["--budget", "0"], "--budget: must be an integer >= 1, got 0"),
        (["--methods", "none,topk_cls", "--param", "spatial:budget=8"], "which is not in --methods"),
    ]:
        try:
            code = main(["bench", "--preset", "tiny"] + argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)


def test_bench_budget_out_of_range_is_rejected_before_the_model_is_built(capsys, monkeypatch):
    import lmms_tokprune.bench.llava_bench as bench

    monkeypatch.setattr(bench, "build_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model built")))
    assert main(["bench", "--preset", "tiny", "--methods", "none,topk_cls", "--param", "topk_cls:ratio=2"]) == 2
    assert "must be in (0, 1]" in capsys.readouterr().err


def test_bench_counts_in_llm_methods_per_layer(capsys):
    """An in-LLM cut: the last layer sees `rank` image tokens, the layer average is the equivalent count, and the
    prefill FLOPs follow the per-layer lengths."""
    code = main(["bench", "--preset", "tiny", "--llm-layers", "4", "--methods", "none,fastv", "--param", "fastv:k=1",
                 "--param", "fastv:rank=100", "--images", "1", "--repeats", "1", "--json"])
    assert code == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert rows["none"]["visual_tokens_equivalent"] == 576
    assert rows["fastv"]["visual_tokens"] == 100 and rows["fastv"]["visual_tokens_equivalent"] == (576 + 3 * 100) / 4
    assert rows["fastv"]["llm_seq_len"] == rows["none"]["llm_seq_len"] - 3 * 476 / 4
    assert rows["fastv"]["flops_ratio"] > 1.5
