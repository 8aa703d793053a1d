"""End-to-end runs of the real lmms-eval CLI on the offline smoke task (slow; run in CI)."""

from __future__ import annotations

import pytest
from lmms_eval_runs import read_run, replay_in_process, run_lmms_eval

pytestmark = pytest.mark.slow
TASK = "tokprune_smoke"


def _per_sample(run: dict) -> dict:
    return {s["doc_id"]: (s["filtered_resps"], s["token_counts"][0]) for s in run["_samples"][TASK]}


@pytest.fixture(scope="module")
def batch_runs(tiny_llava, tmp_path_factory):
    """The same configuration at batch size 1 and 4."""
    runs = {}
    for bs in (1, 4):
        out = tmp_path_factory.mktemp(f"bs{bs}") / "out"
        proc = run_lmms_eval(out, "llava_tokprune", f"pretrained={tiny_llava},method=topk_cls,budget=32", batch_size=bs)
        runs[bs] = read_run(out, proc)
    return runs


def test_counts_in_samples_and_results(batch_runs):
    run = batch_runs[4]
    samples = run["_samples"][TASK]
    assert len(samples) == 24
    for s in samples:
        counts = s["token_counts"][0]
        images = len(s["input_media"])
        assert counts["visual_tokens_in"] == 576 * images
        assert counts["visual_tokens_kept"] == 32 * images
        assert counts["llm_prefill_tokens"] == counts["input_tokens"] > counts["visual_tokens_kept"]
        assert counts["prefill_tflops"] > 0
    # how the run was made, for the leaderboard's provenance block (the same for every sample)
    import lmms_eval
    import torch
    import transformers

    prov = samples[0]["token_counts"][0]["provenance"]
    assert prov["torch"] == torch.__version__.split("+")[0] or prov["torch"] == torch.__version__
    assert prov["transformers"] == transformers.__version__ and prov["lmms_eval"] == getattr(lmms_eval, "__version__", prov["lmms_eval"])
    assert prov["checkpoint"] == str(run["config"]["model_args"]).split("pretrained=")[1].split(",")[0] and prov["prompt_style"] == "llava_v1"
    assert prov["vision_dtype"] == "float32"  # the tower's resolved dtype (vision_dtype=auto on a CPU, fp32 model)
    assert all(s["token_counts"][0]["provenance"] == prov for s in samples)
    means = run["throughput"]
    kept = [s["token_counts"][0]["visual_tokens_kept"] for s in samples]
    prefill = [s["token_counts"][0]["llm_prefill_tokens"] for s in samples]
    assert means["avg_visual_tokens_kept"] == pytest.approx(sum(kept) / len(kept))
    assert means["avg_llm_prefill_tokens"] == pytest.approx(sum(prefill) / len(prefill))
    flops = [s["token_counts"][0]["prefill_tflops"] for s in samples]
    assert means["avg_prefill_tflops"] == pytest.approx(sum(flops) / len(flops))
    assert means[f"avg_{TASK}/visual_tokens_kept"] == pytest.approx(sum(kept) / len(kept))
    assert run["results"][TASK]["exact_match,none"] == pytest.approx(sum(s["exact_match"] for s in samples) / len(samples))
    assert run["config"]["model"] == "llava_tokprune"


def test_batch_4_equals_batch_1(batch_runs):
    assert _per_sample(batch_runs[4]) == _per_sample(batch_runs[1])
    assert batch_runs[4]["results"][TASK]["exact_match,none"] == batch_runs[1]["results"][TASK]["exact_match,none"]


def test_two_processes_equal_one(tiny_llava, tmp_path):
    """23 docs over 2 ranks: rank 1 gets a padding copy, which must not enter the statistics."""
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}" / "out"
        out.parent.mkdir()
        proc = run_lmms_eval(out, "llava_tokprune", f"pretrained={tiny_llava},method=random,budget=48", batch_size=2, limit=23, processes=n)
        runs[n] = read_run(out, proc)
    assert _per_sample(runs[2]) == _per_sample(runs[1])
    assert len(runs[2]["_samples"][TASK]) == 23
    for key in ("avg_visual_tokens_kept", "avg_llm_prefill_tokens", "avg_num_samples"):
        assert runs[2]["throughput"][key] == pytest.approx(runs[1]["throughput"][key])
    assert runs[2]["throughput"]["avg_num_samples"] == 23
    assert runs[2]["results"][TASK]["exact_match,none"] == runs[1]["results"][TASK]["exact_match,none"]


def test_model_config_file_with_cli_task_override(tiny_llava, tmp_path):
    """lmms-eval --config model_configs/... --tasks <override>, checkpoint swapped via config=...,pretrained=..."""
    from lmms_eval_runs import REPO

    cfg = REPO / "model_configs" / "spatial" / "budget64.yaml"
    out = tmp_path / "out"
    proc = run_lmms_eval(out, "llava_tokprune", f"config={cfg},pretrained={tiny_llava}", extra=["--config", str(cfg)], limit=4)
    run = read_run(out, proc)
    assert [s["token_counts"][0]["visual_tokens_kept"] for s in run["_samples"][TASK]] == [64] * 4


def test_bad_model_args_fail_without_results(tiny_llava, tmp_path):
    out = tmp_path / "out"
    proc = run_lmms_eval(out, "llava_tokprune", f"pretrained={tiny_llava},method=topk_cls,budget=999", limit=2)
    assert not list(out.rglob("*_results.json"))
    assert "budget=999 is outside [1, 576]" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "model_id,extra_args",
    [("llava_prumerge", "variant=fixed"), ("llava_prumerge_plus", "variant=fixed,adaptive=false,ratio=0.125"), ("llava_recover", "variant=fixed"), ("llava_recover", "variant=reference,text_source=reference"),
     ("llava_visionzip", "variant=reference"), ("llava_visionzip", "variant=fixed,budget=40"),
     ("llava_vispruner", "variant=reference,budget=64"), ("llava_vispruner", "variant=fixed,budget=40"),
     ("llava_fastervlm", "variant=reference,budget=58"), ("llava_divprune", "variant=reference"), ("llava_divprune", "variant=fixed,budget=40"),
     ("llava_cdpruner", "variant=reference,budget=64"), ("llava_cdpruner", "variant=fixed,budget=40")],
)
def test_paper_method_ids_run_end_to_end(model_id, extra_args, tiny_llava, tiny_clip, tmp_path):
    """Each paper method's model id through the real lmms-eval CLI computes what its engine computes in process
    (same answers, same per-sample visual token counts and prefill lengths), and compresses."""
    args = f"pretrained={tiny_llava},{extra_args}"
    if model_id in ("llava_recover", "llava_cdpruner"):
        args += f",text_encoder={tiny_clip}"
    batch = 1 if "reference" in extra_args else 2  # reference batches are the release's (DivPrune: image 0 decides): replay is per doc
    out = tmp_path / "out"
    proc = run_lmms_eval(out, model_id, args, batch_size=batch, limit=6)
    run = read_run(out, proc)
    samples = run["_samples"][TASK]
    assert len(samples) == 6
    replay = replay_in_process(model_id, args, samples)
    for s in samples:
        counts = s["token_counts"][0]
        assert (s["filtered_resps"], counts["visual_tokens_kept"], counts["llm_prefill_tokens"]) == replay[s["doc_id"]]
        assert 0 < counts["visual_tokens_kept"] < counts["visual_tokens_in"]
    kept = [s["token_counts"][0]["visual_tokens_kept"] for s in samples]
    assert run["throughput"]["avg_visual_tokens_kept"] == pytest.approx(sum(kept) / len(kept))
    assert run["config"]["model"] == model_id


def test_recover_without_text_encoder_fails_at_load_time(tiny_llava, tmp_path):
    out = tmp_path / "out"
    proc = run_lmms_eval(out, "llava_recover", f"pretrained={tiny_llava},text_encoder={tmp_path}/no-clip", limit=2)
    assert not list(out.rglob("*_results.json"))
    assert "text_encoder folder" in proc.stdout + proc.stderr and "does not exist" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "model_id,extra_args",
    [("llava_fastv", "variant=reference"), ("llava_fastv", "variant=fixed,budget=128"),
     ("llava_pdrop", "variant=reference"), ("llava_pdrop", "variant=fixed,budget=192"),
     ("llava_dart", "variant=reference"), ("llava_dart", "variant=fixed,budget=128"),
     ("llava_sparsevlm", "variant=reference"), ("llava_sparsevlm", "variant=fixed,version=2.0,budget=64")],
)
def test_in_llm_method_ids_generate_end_to_end(model_id, extra_args, tiny_llava32, tmp_path):
    """Every in-LLM id through the real lmms-eval CLI on a 32-layer LLM: the engine's answers and counts, the
    equivalent visual tokens each sample reports (< the 576 entering the LLM), and the run means."""
    args = f"pretrained={tiny_llava32},{extra_args}"
    out = tmp_path / "out"
    proc = run_lmms_eval(out, model_id, args, batch_size=1 if "reference" in extra_args else 3, limit=5)
    run = read_run(out, proc)
    samples = run["_samples"][TASK]
    assert len(samples) == 5
    replay = replay_in_process(model_id, args, samples)
    for s in samples:
        counts = s["token_counts"][0]
        assert (s["filtered_resps"], counts["visual_tokens_kept"], counts["llm_prefill_tokens"]) == replay[s["doc_id"]]
        assert counts["visual_tokens_kept"] < counts["visual_tokens_equivalent"] < counts["visual_tokens_in"] == 576
        assert counts["llm_prefill_tokens"] < counts["input_tokens"] + 1 and counts["prefill_tflops"] > 0
    eq = [s["token_counts"][0]["visual_tokens_equivalent"] for s in samples]
    assert run["throughput"]["avg_visual_tokens_equivalent"] == pytest.approx(sum(eq) / len(eq))
