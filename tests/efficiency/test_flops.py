"""Analytic FLOPs: the papers' Table 6, hand-computed small configs, per-layer lengths, the CLI."""

from __future__ import annotations

import json

import pytest

from lmms_tokprune.cli import main
from lmms_tokprune.efficiency import (
    TextConfig,
    VisionConfig,
    flops_report,
    from_llava_config,
    llava_config_for,
    llm_decode_flops,
    llm_prefill_flops,
    prefill_tflops_for,
    preset,
    projector_flops,
    vision_blocks_for,
    vision_flops,
)

# A tiny LLaMA: h=8, f=16, 2 layers, 2 heads of 4, 1 kv head, vocab 10.
SMALL = TextConfig(hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1, vocab_size=10)


def test_table6_recoverable_compression_7b():
    """RC paper Table 6 (LLM-Viewer, LLaVA-1.5-7B, 60 text tokens): 8.5 T at 576 visual, 1.5 T at ~10%."""
    full = prefill_tflops_for("llava-1.5-7b", 576, 60)
    assert full == pytest.approx(8.5, rel=0.02)
    for visual in (57, 58):
        assert prefill_tflops_for("llava-1.5-7b", visual, 60) == pytest.approx(1.5, rel=0.03)
    # the long-tail paper's Table 6, same tool: PruMerge+ (~144 visual tokens) 2.7 T
    assert prefill_tflops_for("llava-1.5-7b", 144, 60) == pytest.approx(2.7, rel=0.03)


def test_hand_computed_small_prefill():
    s = 5
    linear = 2 * s * 8 * (2 * 8 + 2 * 4) + 2 * s * 3 * 8 * 16  # q,o (8 wide) + k,v (1 kv head x 4) ; gate/up/down
    attention = 4 * s * s * 8
    lm_head = 2 * 8 * 10
    assert llm_prefill_flops(SMALL, [s, s]) == 2 * (linear + attention) + lm_head
    assert llm_prefill_flops(SMALL, s) == llm_prefill_flops(SMALL, [s, s])
    assert llm_prefill_flops(SMALL, [s, s], lm_head=False) == 2 * (linear + attention)


def test_hand_computed_small_decode_vision_projector():
    per_layer = 2 * 8 * (2 * 8 + 2 * 4) + 2 * 3 * 8 * 16
    assert llm_decode_flops(SMALL, 7) == 2 * (per_layer + 4 * 7 * 8) + 2 * 8 * 10
    assert llm_decode_flops(SMALL, 7, layers=1) == per_layer + 4 * 7 * 8 + 2 * 8 * 10
    assert llm_decode_flops(SMALL, [7, 3]) == 2 * per_layer + 4 * 10 * 8 + 2 * 8 * 10
    vis = VisionConfig(hidden_size=4, intermediate_size=8, num_layers=2, num_heads=1, image_size=28, patch_size=14)
    assert vis.num_tokens == 5

    def block(n):
        return 2 * n * (4 * 16 + 2 * 4 * 8) + 4 * n * n * 4

    patch = 2 * 4 * 3 * 14 * 14 * 4
    assert vision_flops(vis) == 2 * block(5) + patch
    assert vision_flops(vis, [5, 2]) == block(5) + block(2) + patch
    assert vision_flops(vis, [5, 2], patch_embed=False) == block(5) + block(2)
    assert projector_flops((4, 8, 8), 3) == 3 * 2 * (4 * 8 + 8 * 8)


def test_linear_in_tokens_up_to_the_attention_term():
    cfg = preset("llava-1.5-7b")
    f = [llm_prefill_flops(cfg.text, s, lm_head=False) for s in (100, 200, 300)]
    # f(s) = a*s + b*s^2 exactly: the second difference is 2*b*100^2 with b = 4 * 4096 * 32 layers
    assert f[2] - 2 * f[1] + f[0] == pytest.approx(2 * 4 * 4096 * 32 * 100**2)
    linear_only = f[1] - f[0] - 4 * 4096 * 32 * (200**2 - 100**2)
    assert linear_only == pytest.approx(100 * cfg.text.linear_flops_per_token() * 32)
    # visual and text tokens count the same
    assert prefill_tflops_for(cfg, 500, 60) == prefill_tflops_for(cfg, 400, 160)


def test_per_layer_lengths_count_in_llm_pruning():
    cfg = preset("llava-1.5-7b")
    full = llm_prefill_flops(cfg.text, [636] * 32)
    pruned = llm_prefill_flops(cfg.text, [636, 636] + [300] * 30)  # drop 336 tokens after layer 2

    def per_layer(s):
        return s * cfg.text.linear_flops_per_token() + 4 * s * s * 4096

    assert full - pruned == pytest.approx(30 * (per_layer(636) - per_layer(300)))
    assert pruned < full
    assert prefill_tflops_for(cfg, 576, 60, layer_seq_lens=[636, 636] + [300] * 30) == pytest.approx(pruned / 1e12)
    with pytest.raises(ValueError, match="32 layers"):
        llm_prefill_flops(cfg.text, [636] * 31)
    with pytest.raises(ValueError, match=">= 0"):
        llm_prefill_flops(cfg.text, -1)


def test_13b_preset_and_aliases():
    assert preset("llava-hf/llava-1.5-13b-hf") is preset("llava-1.5-13b")
    t13 = prefill_tflops_for("llava-1.5-13b", 576, 60)
    assert 1.8 < t13 / prefill_tflops_for("llava-1.5-7b", 576, 60) < 2.0
    with pytest.raises(ValueError, match="llava-1.5-7b"):
        preset("llava-2")


def test_from_llava_config_objects_and_dicts(tiny_llava_config):
    from transformers import LlavaConfig

    cfg = LlavaConfig.from_pretrained(tiny_llava_config)
    from_obj = from_llava_config(cfg)
    from_dict = llava_config_for(tiny_llava_config)  # the folder's config.json, no transformers
    assert from_obj.text == from_dict.text and from_obj.vision == from_dict.vision
    assert from_obj.projector.dims == (64, 64, 64)
    assert from_obj.vision.num_tokens == 577
    assert prefill_tflops_for(cfg, 64, 10) == prefill_tflops_for(str(tiny_llava_config), 64, 10)
    # the real 7B geometry through a transformers LlavaConfig equals the preset
    real = LlavaConfig(
        text_config={"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064},
        vision_config={"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_size": 336, "patch_size": 14},
    )
    got = from_llava_config(real)
    assert got.text == preset("llava-1.5-7b").text and got.vision == preset("llava-1.5-7b").vision
    assert got.projector == preset("llava-1.5-7b").projector


@pytest.fixture
def tiny_llava_config(tmp_path):
    """Just the config.json of a tiny LLaVA (no weights needed for FLOPs)."""
    from transformers import LlavaConfig

    cfg = LlavaConfig(
        text_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 642},
        vision_config={"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                       "num_attention_heads": 4, "image_size": 336, "patch_size": 14},
    )
    cfg.save_pretrained(tmp_path)
    return tmp_path


def test_report_fields():
    rep = flops_report("llava-1.5-7b", 576, 60)
    assert rep["sequence_length"] == 636
    assert rep["total_prefill_tflops"] == pytest.approx(rep["prefill_tflops"] + rep["vision_tflops"] + rep["projector_tflops"])
    assert 0.3 < rep["vision_tflops"] < 0.45  # CLIP ViT-L/14-336, 24 blocks x 577 tokens
    assert rep["projector_tflops"] == pytest.approx(576 * 2 * (1024 * 4096 + 4096 * 4096) / 1e12)
    assert rep["decode_tflops_per_token"] == pytest.approx(llm_decode_flops(preset("llava-1.5-7b").text, 636) / 1e12)
    pruned = flops_report("llava-1.5-7b", 576, 60, vision_block_tokens=[577] * 3 + [100] * 21)
    assert pruned["vision_tflops"] < rep["vision_tflops"]


def test_vision_flops_count_the_blocks_the_engine_runs():
    """CLIP runs up to LLaVA's feature block (vision_feature_layer -2: 23 of 24) unless the method reads the last block."""
    vis = preset("llava-1.5-7b").vision
    assert vis.feature_layer == -2 and vis.feature_blocks == 23 and vis.blocks_run("all") == 24
    block = 2 * 577 * (4 * 1024**2 + 2 * 1024 * 4096) + 4 * 577**2 * 1024
    patch = 2 * 576 * 3 * 14 * 14 * 1024
    assert vision_flops(vis) == 23 * block + patch
    assert vision_flops(vis, blocks="all") == 24 * block + patch == vision_flops(vis, [577] * 24)
    assert vision_flops(vis, blocks=5) == 5 * block + patch
    rep, full = flops_report("llava-1.5-7b", 576, 60), flops_report("llava-1.5-7b", 576, 60, vision_blocks="all")
    assert rep["vision_blocks"] == 23 and full["vision_blocks"] == 24
    assert rep["vision_tflops"] == pytest.approx((23 * block + patch) / 1e12)  # 0.366 (0.382 with the last block)
    assert full["vision_tflops"] == pytest.approx((24 * block + patch) / 1e12)
    # a per-block list says how many blocks ran; a list that disagrees with vision_blocks is refused
    assert flops_report("llava-1.5-7b", 576, 60, vision_block_tokens=[577] * 23)["vision_tflops"] == pytest.approx(rep["vision_tflops"])
    with pytest.raises(ValueError, match="23 per-block values for 24 blocks"):
        flops_report("llava-1.5-7b", 576, 60, vision_block_tokens=[577] * 23, vision_blocks="all")
    for bad in (0, 25, "last", True):
        with pytest.raises(ValueError, match="vision_blocks"):
            vision_flops(vis, blocks=bad)
    with pytest.raises(ValueError, match="outside the 24-block tower"):
        VisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, feature_layer=-25)


def test_feature_layer_comes_from_the_llava_config():
    from transformers import LlavaConfig

    vision = {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
              "num_attention_heads": 4, "image_size": 336, "patch_size": 14}
    assert from_llava_config(LlavaConfig(vision_config=vision)).vision.feature_blocks == 3  # the default -2
    assert from_llava_config(LlavaConfig(vision_config=vision, vision_feature_layer=-4)).vision.feature_blocks == 1
    multi = from_llava_config(LlavaConfig(vision_config=vision, vision_feature_layer=[-3, 2], vision_feature_select_strategy="full"))
    assert multi.vision.feature_blocks == 2 and multi.projector.dims[0] == 2 * 64  # the deepest of the layers read
    # a bare CLIP tower (no LLaVA around it) is read at its output: every block
    assert VisionConfig(hidden_size=4, intermediate_size=8, num_layers=2, num_heads=1).feature_blocks == 2


def test_engine_runs_the_blocks_the_flops_count(tiny_llava):
    """The CLIP blocks the engine runs for a method (counted with forward hooks) are the blocks `flops --method` counts."""
    from PIL import Image

    from lmms_tokprune.llava.batch import Sample
    from lmms_tokprune.llava.opener import open_engine
    from lmms_tokprune.llava.options import engine_options
    from lmms_tokprune.llava.vision import clip_parts

    model = processor = None
    cfg = llava_config_for(str(tiny_llava))
    for method, params in (("none", {}), ("topk_cls", {"budget": 8}), ("visionzip", {"budget": 8}), ("fastv", {"k": 1})):
        engine = open_engine(engine_options({"pretrained": str(tiny_llava), "method": method, **params}), None, model, processor)
        model, processor = engine.model, engine.processor
        ran = []
        handles = [layer.register_forward_hook(lambda *_a, i=i: ran.append(i)) for i, layer in enumerate(clip_parts(engine.vision_tower)[2])]
        try:
            engine.generate([Sample("What colour?", [Image.new("RGB", (40, 30), (200, 10, 10))], [0])], {"max_new_tokens": 1})
        finally:
            for h in handles:
                h.remove()
        assert len(ran) == cfg.vision.blocks_run(vision_blocks_for(method)), method
    assert vision_blocks_for("topk_cls") == "all" and vision_blocks_for("visionzip") == "feature" and vision_blocks_for("topk_cls", 3) == 3


def test_cli_flops_json(capsys):
    assert main(["flops", "--preset", "llava-1.5-7b", "--visual-tokens", "576", "--text-tokens", "60", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prefill_tflops"] == pytest.approx(8.5, rel=0.02)
    for key in ("llm_prefill_tflops", "vision_tflops", "projector_tflops", "decode_tflops_per_token", "sequence_length",
                "total_prefill_tflops"):
        assert key in out
    assert out["sequence_length"] == 636
    assert main(["flops", "--visual-tokens", "58", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prefill_tflops"] == pytest.approx(1.5, rel=0.03)
    assert main(["flops", "--preset", "nope"]) == 2
    assert "valid presets" in capsys.readouterr().err


def test_cli_flops_vision_blocks(capsys):
    def vision(*argv):
        assert main(["flops", "--json", *argv]) == 0
        out = json.loads(capsys.readouterr().out)
        return out["vision_blocks"], out["vision_tflops"]

    feature, full = vision(), vision("--vision-blocks", "all")
    assert feature[0] == 23 and full[0] == 24 and feature[1] < full[1]
    assert vision("--method", "topk_cls") == full and vision("--method", "visionzip") == feature == vision("--method", "fastv")
    assert vision("--method", "topk_cls", "--vision-blocks", "feature") == feature
    assert vision("--vision-blocks", "12")[0] == 12
    for bad in ("0", "last"):
        with pytest.raises(SystemExit):
            main(["flops", "--vision-blocks", bad])
        assert "--vision-blocks" in capsys.readouterr().err
    assert main(["flops", "--vision-blocks", "25"]) == 2
    assert "block count in 1..24" in capsys.readouterr().err


def test_cli_flops_refuses_a_checkpoint_that_is_not_llava(tiny_clip, tiny_llava, capsys):
    """A CLIP folder has a config.json too: refused as the model loader refuses it, not counted as a LLaVA."""
    assert main(["flops", "--pretrained", str(tiny_clip), "--visual-tokens", "64"]) == 2
    assert "is a 'clip' checkpoint; FLOPs are computed for LLaVA-1.5" in capsys.readouterr().err
    assert main(["flops", "--pretrained", str(tiny_llava), "--visual-tokens", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["llm_layers"] == 2


# -- LLaVA-NeXT ------------------------------------------------------------------------------------------------
NEXT_7B = dict(  # llava-hf/llava-v1.6-vicuna-7b-hf's config.json (text: lmsys/vicuna-7b-v1.5, LlamaConfig defaults for the widths)
    model_type="llava_next",
    text_config={"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096},
    vision_config={"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                   "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768},
    image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
)


def test_next_presets_and_aliases():
    vicuna, mistral = preset("llava-next-7b"), preset("llava-hf/llava-v1.6-mistral-7b-hf")
    assert preset("llava-hf/llava-v1.6-vicuna-7b-hf") is vicuna and preset("llava-v1.6-mistral-7b") is mistral
    assert vicuna.model_type == mistral.model_type == "llava_next" and preset("llava-1.5-7b").model_type == "llava"
    # the same Vicuna-7B, CLIP and projector as LLaVA-1.5-7B: equal token counts cost the same LLM prefill
    assert (vicuna.text, vicuna.vision, vicuna.projector) == (preset("llava-1.5-7b").text, preset("llava-1.5-7b").vision,
                                                              preset("llava-1.5-7b").projector)
    assert prefill_tflops_for("llava-next-7b", 2880, 60, layout_tokens=48) == prefill_tflops_for("llava-1.5-7b", 2928, 60)
    # Mistral-7B: 32 query heads and 8 key/value heads of 128, MLP 14336, vocab 32064
    t = mistral.text
    assert (t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.num_kv_heads, t.vocab_size) == (4096, 14336, 32, 32, 8, 32064)
    assert t.linear_flops_per_token() == 2 * 4096 * (2 * 4096 + 2 * 1024) + 2 * 3 * 4096 * 14336
    assert preset("llava-v1.6-vicuna-13b").text == preset("llava-1.5-13b").text
    with pytest.raises(ValueError, match="llava-next-7b"):
        preset("llava-next-34b")


def test_from_llava_config_reads_a_llava_next_config(tmp_path):
    from transformers import LlavaNextConfig

    cfg = LlavaNextConfig(**{k: v for k, v in NEXT_7B.items() if k != "model_type"})
    got = from_llava_config(cfg)
    want = preset("llava-next-7b")
    assert (got.text, got.vision, got.projector, got.model_type) == (want.text, want.vision, want.projector, "llava_next")
    cfg.save_pretrained(tmp_path)
    folder = llava_config_for(str(tmp_path))  # config.json, no transformers
    assert (folder.text, folder.vision, folder.model_type) == (want.text, want.vision, "llava_next")
    mistral = dict(NEXT_7B, text_config={**NEXT_7B["text_config"], "model_type": "mistral", "intermediate_size": 14336, "num_key_value_heads": 8})
    assert from_llava_config(mistral).text == preset("llava-next-mistral-7b").text


def test_next_vision_cost_is_per_unit():
    """One CLIP pass per unit (base image + each crop): a 672x672 image on the 2x2 grid is 5 passes; its 48 newline tokens
    enter the LLM (sequence, prefill) but not the projector."""
    one = flops_report("llava-next-7b", 576, 60)
    five = flops_report("llava-next-7b", 2880, 60, units=5, layout_tokens=48)
    assert one["units"] == 1 and five["units"] == 5 and five["model_type"] == "llava_next"
    assert five["vision_tflops"] == pytest.approx(5 * one["vision_tflops"]) == pytest.approx(5 * five["vision_tflops_per_unit"])
    assert five["sequence_length"] == 2880 + 48 + 60 and five["layout_tokens"] == 48
    assert five["prefill_tflops"] == pytest.approx(prefill_tflops_for("llava-next-7b", 2880, 60, layout_tokens=48))
    assert five["projector_tflops"] == pytest.approx(2880 * 2 * (1024 * 4096 + 4096 * 4096) / 1e12)
    assert flops_report("llava-next-7b", 2880, 60, units=5, images=1)["images"] == 1
    assert flops_report("llava-next-7b", 2880, 60, units=5, vision_blocks="all")["vision_tflops"] > five["vision_tflops"]
    with pytest.raises(ValueError, match="give units"):  # an image count does not say how many crops
        flops_report("llava-next-7b", 2880, 60, images=1)
    with pytest.raises(ValueError, match="fewer than images"):
        flops_report("llava-next-7b", 2880, 60, images=2, units=1)
    # LLaVA-1.5: a unit is an image (images keeps working; both must agree)
    assert flops_report("llava-1.5-7b", 1152, 60, images=2)["vision_tflops"] == flops_report("llava-1.5-7b", 1152, 60, units=2)["vision_tflops"]
    with pytest.raises(ValueError, match="a unit is an image"):
        flops_report("llava-1.5-7b", 1152, 60, images=2, units=3)
    with pytest.raises(ValueError, match="layout_tokens"):
        flops_report("llava-next-7b", 2880, 60, units=5, layout_tokens=-1)


def test_cli_flops_next(capsys):
    argv = ["flops", "--preset", "llava-next-7b", "--visual-tokens", "2880", "--layout-tokens", "48", "--text-tokens", "60", "--units", "5"]
    assert main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["units"] == 5 and out["sequence_length"] == 2988 and out["vision_blocks"] == 23
    assert out["vision_tflops"] == pytest.approx(5 * flops_report("llava-next-7b", 576, 60)["vision_tflops"])
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "2880 visual + 48 layout + 60 text tokens = sequence 2988" in text and "(5 unit(s) x 23 blocks)" in text
    assert main(["flops", "--preset", "llava-next-7b", "--visual-tokens", "2880", "--images", "1"]) == 2
    assert "give units" in capsys.readouterr().err
