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
