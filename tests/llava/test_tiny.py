"""The tiny offline checkpoints load through the same from_pretrained path as real ones and have LLaVA-1.5 shapes."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from PIL import Image

from lmms_tokprune.testing import (
    LLAVA_SYSTEM_PROMPT,
    build_tiny_clip_text_encoder,
    build_tiny_llava,
    tiny_clip_dir,
    tiny_llava_dir,
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    llava = build_tiny_llava(root / "llava")
    clip = build_tiny_clip_text_encoder(root / "clip", llava_dir=llava)
    return llava, clip


@pytest.fixture(scope="module")
def llava(dirs):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(dirs[0]).eval()
    processor = AutoProcessor.from_pretrained(dirs[0])
    return model, processor


def _image(w=336, h=336, seed=0):
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def test_llava_config_shapes(llava):
    model, processor = llava
    cfg = model.config
    v = cfg.vision_config
    assert (v.image_size, v.patch_size) == (336, 14)
    assert v.num_hidden_layers >= 4 and v.hidden_act == "quick_gelu"
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.projector_hidden_act == "gelu"
    assert cfg.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert cfg.text_config.vocab_size == len(processor.tokenizer)
    assert cfg.text_config.pad_token_id == processor.tokenizer.pad_token_id is not None
    with torch.no_grad():
        out = model.model.vision_tower(torch.zeros(1, 3, 336, 336), output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 577, 64)
    assert len(out.hidden_states) == v.num_hidden_layers + 1


def test_processor_expands_image_and_generates(llava):
    model, processor = llava
    text = f"{LLAVA_SYSTEM_PROMPT} USER: <image>\nWhat colour is the circle? ASSISTANT:"
    inputs = processor(images=_image(400, 300), text=text, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 336, 336)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576
    assert int(inputs["input_ids"][0, 0]) == processor.tokenizer.bos_token_id
    with torch.inference_mode():
        gen = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > inputs["input_ids"].shape[1]


def test_greedy_outputs_depend_on_image(llava):
    model, processor = llava
    text = "USER: <image>\nHow many squares are there? ASSISTANT:"
    outs = set()
    for seed in range(3):
        inputs = processor(images=_image(seed=seed), text=text, return_tensors="pt")
        with torch.inference_mode():
            gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        outs.add(tuple(gen[0, inputs["input_ids"].shape[1] :].tolist()))
    assert len(outs) >= 2
    assert any(len(set(o)) > 1 for o in outs), "greedy decoding repeats one id"


def test_chat_template(llava):
    _, processor = llava
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]}]
    assert processor.apply_chat_template(conv, add_generation_prompt=True) == "USER: <image>\nWhat shape? ASSISTANT:"
    assert processor.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False) == (
        "USER: <image>\nWhat shape? ASSISTANT:"
    )


def test_clip_text_encoder(dirs, llava):
    from transformers import AutoProcessor, AutoTokenizer, CLIPModel

    model, _ = llava
    clip = CLIPModel.from_pretrained(dirs[1]).eval()
    tok = AutoTokenizer.from_pretrained(dirs[1])
    assert AutoProcessor.from_pretrained(dirs[1]).tokenizer is not None
    assert tok.model_max_length == 77 and clip.config.text_config.max_position_embeddings == 77
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == tok.pad_token == "<|endoftext|>"
    v, lv = clip.config.vision_config, model.config.vision_config
    assert (v.hidden_size, v.image_size, v.patch_size, v.num_hidden_layers) == (
        lv.hidden_size,
        lv.image_size,
        lv.patch_size,
        lv.num_hidden_layers,
    )
    assert tuple(clip.visual_projection.weight.shape) == (clip.config.projection_dim, 64)
    enc = tok(["what colour is the circle?", "how many squares"], padding=True, truncation=True, return_tensors="pt")
    assert int(enc["input_ids"][0, 0]) == tok.bos_token_id
    with torch.no_grad():
        feats = clip.get_text_features(**enc)
        feats = getattr(feats, "pooler_output", feats)  # transformers 5 returns a ModelOutput
        x = torch.randn(1, 3, 336, 336)
        a = model.model.vision_tower(x, output_hidden_states=True).hidden_states[-2]
        b = clip.vision_model(x, output_hidden_states=True).hidden_states[-2]
    assert tuple(feats.shape) == (2, clip.config.projection_dim)
    assert torch.allclose(a, b), "CLIP vision tower weights were not copied from the LLaVA checkpoint"


def test_cached_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("LMMS_TOKPRUNE_CACHE", str(tmp_path))
    d = tiny_llava_dir()
    assert d.parent == tmp_path and (d / "config.json").exists()
    assert tiny_llava_dir() == d
    c = tiny_clip_dir()
    assert c.parent == tmp_path and (c / "config.json").exists()


def test_overwrite_guard(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("x")
    with pytest.raises(FileExistsError):
        build_tiny_llava(tmp_path / "x")


def test_deterministic(tmp_path, dirs):
    from safetensors.torch import load_file

    again = build_tiny_llava(tmp_path / "again")
    a, b = load_file(str(dirs[0] / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (dirs[0] / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
