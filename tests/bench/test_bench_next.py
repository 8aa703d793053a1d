"""`lmms-tokprune bench` on LLaVA-NeXT presets: the shapes of the full-width builds (configs only), and the real engine
path end to end on the tiny NeXT preset (the 7B numbers go in the notes, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmms_tokprune.cli import main


def test_next_presets_build_the_released_shapes():
    from lmms_tokprune.bench.llava_bench import hf_config
    from lmms_tokprune.offline_processors import GRID_PINPOINTS

    cfg = hf_config("llava-next-7b", image_token_id=7)
    assert cfg.model_type == "llava_next" and cfg.image_grid_pinpoints == GRID_PINPOINTS and cfg.image_token_id == 7
    t, v = cfg.text_config, cfg.vision_config
    assert (t.model_type, t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == \
        ("llama", 4096, 11008, 32, 32, 32)
    assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size, cfg.vision_feature_layer) == (1024, 24, 336, 14, -2)
    short = hf_config("llava-next-7b", llm_layers=2).text_config
    assert short.num_hidden_layers == 2 and short.hidden_size == 4096
    mistral = hf_config("llava-next-mistral-7b", llm_width=1024).text_config  # narrowed in Mistral's proportions (4 query heads per kv head)
    assert (mistral.model_type, mistral.hidden_size, mistral.num_attention_heads, mistral.num_key_value_heads, mistral.intermediate_size) == \
        ("mistral", 1024, 8, 2, 3584)
    assert hf_config("llava-1.5-7b").model_type == "llava"
    assert hf_config("llava-next-7b", vision_layers=4).vision_config.num_hidden_layers == 4  # a shorter CLIP for CPU runs
    with pytest.raises(ValueError, match="--vision-layers must be >= 2"):
        hf_config("llava-next-7b", vision_layers=1)
    with pytest.raises(ValueError, match="llava-next-7b"):
        hf_config("llava-next-34b")


def test_next_bench_processor_cuts_a_640x480_image_into_five_units():
    from lmms_tokprune.bench.llava_bench import NEXT_IMAGE_SIZE, bench_images, bench_processor

    processor = bench_processor("llava-next-7b")
    out = processor.image_processor(images=bench_images(1, NEXT_IMAGE_SIZE), return_tensors="pt")
    assert out["pixel_values"].shape[1:] == (5, 3, 336, 336) and out["image_sizes"].tolist() == [[480, 640]]


def test_bench_next_reports_units_layout_and_every_budget(capsys):
    """The tiny NeXT preset through the real engine: a 640x480 image = 5 units, 576 + 36 x 48 patches and 36 newlines;
    each method at each budget; an in-LLM budget is equivalent tokens."""
    code = main(["bench", "--preset", "tiny-next", "--methods", "none,topk_cls,fastv", "--budget", "640,320", "--llm-layers", "8",
                 "--param", "fastv:k=1", "--images", "1", "--repeats", "1", "--text-tokens", "10", "--json"])
    assert code == 0
    rows = {r["label"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert list(rows) == ["none", "topk_cls@640", "topk_cls@320", "fastv@640", "fastv@320"]
    none = rows["none"]
    assert (none["visual_tokens_in"], none["visual_tokens"], none["layout_tokens"], none["units"]) == (2304, 2304, 36, 5)
    text = none["llm_seq_len"] - 2304 - 36
    for budget in (640, 320):
        top, fastv = rows[f"topk_cls@{budget}"], rows[f"fastv@{budget}"]
        assert top["budget"] == budget and top["visual_tokens"] == budget and top["units"] == 5
        assert top["llm_seq_len"] == budget + top["layout_tokens"] + text and top["layout_tokens"] <= 36
        assert fastv["method"] == "fastv" and abs(fastv["visual_tokens_equivalent"] - budget) <= 4  # the nearest rank
        assert fastv["layout_tokens"] == 36  # newlines are never pruned
        for row in (top, fastv):
            assert row["flops_ratio"] > 2 and row["prefill_ms"] > 0 and row["compress_ms"] >= 0
    assert none["flops_ratio"] == 1.0 and none["speedup"] == 1.0


def test_bench_next_image_size(capsys):
    code = main(["bench", "--preset", "tiny-next", "--methods", "none", "--image-size", "672x672", "--images", "1", "--repeats", "1", "--json"])
    assert code == 0
    row = json.loads(capsys.readouterr().out)["results"][0]
    assert (row["visual_tokens_in"], row["layout_tokens"], row["units"]) == (576 + 48 * 48, 48, 5)
    for bad in ("640", "640x", "0x480"):
        with pytest.raises(SystemExit):
            main(["bench", "--preset", "tiny-next", "--image-size", bad])
        assert "--image-size: must look like 640x480" in capsys.readouterr().err


def test_bench_imports_no_test_package():
    """Production code builds its offline processors from lmms_tokprune.offline_processors, never lmms_tokprune.testing."""
    code = ("import sys\n"
            "from lmms_tokprune.bench.llava_bench import bench_processor, hf_config\n"
            "bench_processor('llava-1.5-7b'); bench_processor('llava-next-7b'); hf_config('llava-next-7b')\n"
            "assert not [m for m in sys.modules if m.startswith('lmms_tokprune.testing')], sorted(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    from lmms_tokprune import offline_processors
    from lmms_tokprune.testing import tiny, tiny_next

    assert tiny.llama_tokenizer is offline_processors.llama_tokenizer and tiny_next.next_image_processor is offline_processors.next_image_processor
