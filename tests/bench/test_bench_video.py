"""`lmms-tokprune bench --preset video-llava-7b`: the full-width build's shapes (config only), the tiny video preset end to
end (videos of 8 frames: 2,048 visual tokens in, 8 layout tokens, 8 units), and FLOPs with the video tower per frame."""

from __future__ import annotations

import pytest


def test_video_preset_builds_the_released_shapes():
    from lmms_tokprune.bench.llava_bench import hf_config

    cfg = hf_config("video-llava-7b", image_token_id=7, video_token_id=8)
    assert cfg.model_type == "video_llava" and (cfg.image_token_id, cfg.video_token_id) == (7, 8)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads) == (4096, 11008, 32, 32)
    assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size, cfg.vision_feature_layer) == (1024, 24, 224, 14, -2)


def test_tiny_video_bench_counts_per_video():
    from lmms_tokprune.bench.llava_bench import run_bench

    rows = run_bench("tiny-video", ["none", "prumerge"], images=1, repeats=1, budgets=[256], progress=False, device="cpu")
    none, prumerge = rows
    assert (none.visual_tokens_in, none.visual_tokens, none.layout_tokens, none.units) == (2048, 2048, 8, 8)
    assert (prumerge.visual_tokens, prumerge.layout_tokens) == (256, 8) and prumerge.flops_ratio > 1


def test_flops_count_the_video_tower_per_frame():
    from lmms_tokprune.efficiency.flops import clip_units, flops_report, preset

    cfg = preset("LanguageBind/Video-LLaVA-7B-hf")
    assert cfg.model_type == "video_llava" and cfg.vision.image_size == 224
    assert clip_units(cfg, images=1) == 1 and clip_units(cfg, units=8) == 8
    video = flops_report("video-llava-7b", visual_tokens=2048, text_tokens=60, units=8, layout_tokens=8)
    frame = flops_report("video-llava-7b", visual_tokens=256, text_tokens=60, units=1)
    assert video["vision_tflops"] == pytest.approx(8 * frame["vision_tflops"])
    with pytest.raises(ValueError, match="fewer than images"):
        clip_units(cfg, units=1, images=2)
