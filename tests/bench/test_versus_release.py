"""The side-by-side timing against the released FasterVLM / VisionZip selections times the same work as ours."""

from __future__ import annotations

import torch

from lmms_tokprune.bench.compress_bench import clip_like_inputs
from lmms_tokprune.bench.versus_release import (
    attention_maps,
    format_versus_rows,
    released_fastervlm,
    released_metric,
    released_visionzip,
    run_versus_release,
)
from lmms_tokprune.methods import compress


def test_the_timed_release_functions_select_what_our_reference_selects():
    inp = clip_like_inputs(2, n=64, dim=32, text_dim=16, llm_dim=24, heads=4, seed=5)
    maps = attention_maps(inp.feature_q, inp.feature_k, 4)
    ours = compress("fastervlm", inp, variant="reference", budget=12)
    assert torch.allclose(released_fastervlm(inp.hidden, maps, 12), torch.stack([o.features for o in ours]), atol=1e-6)
    ours = compress("visionzip", inp, variant="reference", dominant=10, contextual=4)
    theirs = released_visionzip(inp.hidden, maps, released_metric(inp.feature_k, 4), 10, 4)
    assert torch.allclose(theirs, torch.stack([o.features for o in ours]), atol=1e-5)


def test_run_versus_release_reports_every_candidate():
    rows = run_versus_release(batch=1, budget=64, repeats=1)
    names = {r.name for r in rows}
    assert {"fastervlm fixed", "visionzip fixed", "topk_cls fixed"} <= names and len(names) == 9
    table = format_versus_rows(rows)
    assert all(r.ms_per_image_best > 0 for r in rows) and table.count("\n") == len(rows) + 1
