"""lmms-eval runs on original LLaVA-repository checkpoints (LoRA + base given as model_base=), read from the result files."""

from __future__ import annotations

import pytest
from lmms_eval_runs import read_run, replay_in_process, run_lmms_eval

from lmms_tokprune.testing.original_format import build_base_llm, build_original_lora, build_tiny_clip_tower

pytestmark = pytest.mark.slow
TASK = "tokprune_smoke"


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("orig-e2e")
    tower = build_tiny_clip_tower(root / "clip")
    base = build_base_llm(root / "vicuna")
    return build_original_lora(root / "llava-lora", base, tower, base_name=str(root / "moved-away")), base


@pytest.mark.parametrize("model,extra", [("llava_tokprune", "method=none"), ("llava_prumerge", "variant=reference")])
def test_lmms_eval_on_a_lora_folder_with_model_base(lora, tmp_path, model, extra):
    """The adapter config names a base that is not there; model_base= points at the real one. Answers and counts are what
    the engine computes for the same documents in this process."""
    folder, base = lora
    args = f"pretrained={folder},model_base={base},{extra}"
    out = tmp_path / "out"
    run = read_run(out, run_lmms_eval(out, model, args, limit=6))
    samples = run["_samples"][TASK]
    assert len(samples) == 6 and not any(s["token_counts"][0].get("error") for s in samples)
    prov = samples[0]["token_counts"][0]["provenance"]
    assert prov["checkpoint"] == str(folder) and prov["model_base"] == str(base) and prov["vision_dtype"] == "float32"
    replay = replay_in_process(model, args, samples)
    for s in samples:
        text, kept, prefill = replay[s["doc_id"]]
        assert s["filtered_resps"] == text
        assert s["token_counts"][0]["visual_tokens_kept"] == kept and s["token_counts"][0]["llm_prefill_tokens"] == prefill


def test_lmms_eval_without_a_reachable_base_fails_with_one_line(lora, tmp_path):
    folder, _ = lora
    out = tmp_path / "out"
    proc = run_lmms_eval(out, "llava_tokprune", f"pretrained={folder}", limit=2)
    assert not list(out.rglob("*_results.json"))
    assert "LoRA base model_base=" in proc.stdout + proc.stderr and "moved-away" in proc.stdout + proc.stderr
