"""Every model id on a tiny LLaVA-NeXT checkpoint through the real lmms-eval CLI (slow; run in CI), read from the
result files: answers and counts equal what the engine computes in this process, NeXT counts per sample (units,
layout tokens, 576 + H'W' visual tokens in), batch 2 == batch 1."""

from __future__ import annotations

import pytest
from lmms_eval_runs import read_run, replay_in_process, run_lmms_eval, smoke_docs

from lmms_tokprune.catalog import model_ids

pytestmark = pytest.mark.slow
TASK = "tokprune_smoke"
LIMIT = 3
# the fixed variant of every id (in-LLM budgets are equivalent tokens per image)
ARGS = {
    "llava_tokprune": "method=none", "llava_prumerge": "variant=fixed", "llava_prumerge_plus": "variant=fixed",
    "llava_recover": "variant=fixed", "llava_longtail": "variant=fixed,budget=200", "llava_visionzip": "variant=fixed,budget=320",
    "llava_vispruner": "variant=fixed,budget=160", "llava_fastervlm": "variant=fixed,budget=29,budget_scope=unit",
    "llava_divprune": "variant=fixed,budget=160", "llava_cdpruner": "variant=fixed,budget=160", "llava_fastv": "variant=fixed,budget=640",
    "llava_pdrop": "variant=fixed", "llava_dart": "variant=fixed,budget=320", "llava_sparsevlm": "variant=fixed",
}


def test_every_model_id_is_covered():
    assert set(ARGS) == set(model_ids())


@pytest.fixture(scope="module")
def next_plans(tiny_next32):
    """Per smoke document: what the NeXT family makes of its images (units, visual and layout tokens in)."""
    import importlib.util

    import torch
    from lmms_eval_runs import REPO

    from lmms_tokprune.llava.opener import open_engine
    from lmms_tokprune.llava.options import engine_options

    spec = importlib.util.spec_from_file_location("smoke_utils", REPO / "tasks" / TASK / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    family = open_engine(engine_options({"pretrained": str(tiny_next32), "dtype": "float32"}), torch.device("cpu")).family
    return [[family.plan_image(im.convert("RGB")) for im in utils.smoke_doc_to_visual(doc)] for doc in smoke_docs()]


@pytest.mark.parametrize("model_id", sorted(ARGS))
def test_model_id_runs_on_llava_next(model_id, tiny_next32, tiny_clip, next_plans, tmp_path):
    args = f"pretrained={tiny_next32},{ARGS[model_id]}"
    if model_id in ("llava_recover", "llava_cdpruner"):
        args += f",text_encoder={tiny_clip}"
    out = tmp_path / "out"
    run = read_run(out, run_lmms_eval(out, model_id, args, batch_size=2, limit=LIMIT))
    samples = run["_samples"][TASK]
    assert len(samples) == LIMIT
    replay = replay_in_process(model_id, args, samples)  # one document at a time: batch 2 == batch 1
    for s in samples:
        counts = s["token_counts"][0]
        assert "error" not in counts, counts.get("error")
        assert (s["filtered_resps"], counts["visual_tokens_kept"], counts["llm_prefill_tokens"]) == replay[s["doc_id"]]
        plans = next_plans[s["doc_id"]]
        assert counts["visual_tokens_in"] == sum(p.visual_tokens_in for p in plans)
        assert counts["units"] == sum(p.units for p in plans) >= 3
        assert 0 < counts["layout_tokens"] <= sum(p.layout_tokens_in for p in plans)
        if model_id == "llava_tokprune":  # none: every valid patch, every newline
            assert counts["visual_tokens_kept"] == counts["visual_tokens_in"] and counts["layout_tokens"] == sum(p.layout_tokens_in for p in plans)
        else:
            assert counts["visual_tokens_equivalent"] < counts["visual_tokens_in"]
    assert run["throughput"]["avg_units"] >= 3 and run["throughput"]["avg_layout_tokens"] > 0


def test_reference_runs_on_llava_next_as_released(tiny_next32, next_plans, tmp_path):
    """One short run of a NeXT release through lmms-eval: VisionZip's per-crop budget and layout (no newline), batch 2 ==
    batch 1 (its release runs batched)."""
    args = f"pretrained={tiny_next32},variant=reference,budget=32"
    out = tmp_path / "out"
    run = read_run(out, run_lmms_eval(out, "llava_visionzip", args, batch_size=2, limit=LIMIT))
    samples = run["_samples"][TASK]
    replay = replay_in_process("llava_visionzip", args, samples)
    for s in samples:
        counts = s["token_counts"][0]
        assert (s["filtered_resps"], counts["visual_tokens_kept"], counts["llm_prefill_tokens"]) == replay[s["doc_id"]]
        plans = next_plans[s["doc_id"]]
        assert counts["visual_tokens_kept"] == 32 * sum(p.units for p in plans) and counts["layout_tokens"] == 0
        assert counts["visual_tokens_in"] == sum(p.visual_tokens_in for p in plans)
