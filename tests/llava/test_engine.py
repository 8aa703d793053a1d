"""CompressedLlava against plain transformers, batch invariance, variable visual lengths, odd images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lmms_tokprune.llava.batch import Sample
from lmms_tokprune.llava.engine import CompressedLlava, clean_generation_kwargs
from lmms_tokprune.llava.images import background_colour, expand_to_square, to_rgb
from lmms_tokprune.llava.loading import load_llava
from lmms_tokprune.llava.prompts import VICUNA_SYSTEM, build_prompt, question_text
from lmms_tokprune.methods import bind

QUESTIONS = ["What colour is the square?", "How many circles are there in the picture?", "Is there a red triangle?", "What shape is it?"]


def _images():
    rng = np.random.default_rng(0)
    sizes = [(336, 336), (200, 300), (400, 250), (9, 7)]
    imgs = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    imgs[1] = imgs[1].convert("L")  # grayscale
    imgs[2] = imgs[2].convert("RGBA")  # alpha channel
    return imgs


@pytest.fixture(scope="module", params=["pil", "torchvision"])
def loaded(request, tiny_llava):
    model, processor = load_llava(str(tiny_llava), torch.device("cpu"), "float32", "sdpa", request.param)
    return model, processor, request.param


def test_none_is_token_identical_to_plain_transformers(loaded, tiny_llava):
    """method=none + chat_template + no padding == processor(...) + model.generate(...)."""
    from transformers import AutoProcessor

    model, processor, backend = loaded
    plain_processor = AutoProcessor.from_pretrained(str(tiny_llava), backend=backend)
    engine = CompressedLlava(model, processor, bind("none"), prompt_style="chat_template", pad_to_square=False)
    for image, question in zip(_images(), QUESTIONS):
        prompt = plain_processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True
        )
        inputs = plain_processor(images=image.convert("RGB"), text=prompt, return_tensors="pt")
        ref = model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
        eos = processor.tokenizer.eos_token_id
        ref = ref[: ref.index(eos)] if eos in ref else ref  # our engine returns the text tokens, EOS cut
        ours, stats = engine.generate([Sample(question, [image])], {"max_new_tokens": 10, "temperature": 0})
        assert ours[0] == ref
        assert stats[0].visual_tokens_kept == 576 and stats[0].llm_prefill_tokens == inputs["input_ids"].shape[1]


@pytest.mark.parametrize("method,params", [("none", {}), ("topk_cls", {"ratio": 0.1}), ("random", {"budget": 64}), ("spatial", {"budget": 100})])
def test_batch_equals_single(loaded, method, params):
    model, processor, _ = loaded
    engine = CompressedLlava(model, processor, bind(method, **params))
    samples = [Sample(q, [im], [i]) for i, (im, q) in enumerate(zip(_images(), QUESTIONS))]
    singles = [engine.generate([s], {"max_new_tokens": 8})[0][0] for s in samples]
    batched, stats = engine.generate(samples, {"max_new_tokens": 8})
    assert batched == singles
    expected = {"none": 576, "topk_cls": 57, "random": 64, "spatial": 100}[method]
    assert [s.visual_tokens_kept for s in stats] == [expected] * 4


def test_variable_lengths_and_several_images(loaded):
    """Samples with different visual counts (1 vs 2 images) share a batch and match batch-1 runs."""
    model, processor, _ = loaded
    engine = CompressedLlava(model, processor, bind("topk_cls", budget=32))
    imgs = _images()
    samples = [Sample("Compare these.", imgs[:2], [0, 1]), Sample(QUESTIONS[0], [imgs[2]], [2])]
    batched, stats = engine.generate(samples, {"max_new_tokens": 6})
    singles = [engine.generate([s], {"max_new_tokens": 6})[0][0] for s in samples]
    assert batched == singles
    assert [s.visual_tokens_in for s in stats] == [1152, 576]
    assert [s.visual_tokens_kept for s in stats] == [64, 32]
    assert stats[0].llm_prefill_tokens - stats[1].llm_prefill_tokens != 0


def test_llava_v1_prompt_and_square_padding(loaded):
    _, processor, _ = loaded
    prompt = build_prompt("llava_v1", processor, "What is it?\nAnswer the question using a single word or phrase.", 1)
    assert prompt == (
        VICUNA_SYSTEM + " USER: <image>\nWhat is it?\nAnswer the question using a single word or phrase. ASSISTANT:"
    )
    colour = background_colour(processor.image_processor.image_mean)
    assert colour == (122, 116, 104)
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    square = expand_to_square(wide, colour)
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == colour and square.getpixel((20, 20)) == (255, 0, 0)
    assert square.getpixel((0, 9)) == colour and square.getpixel((0, 10)) == (255, 0, 0)


def test_question_text_strips_placeholder_and_format():
    ctx = "<image>\nWhat colour is the car?\nAnswer the question using a single word or phrase."
    assert question_text(ctx) == "What colour is the car?"


def test_odd_inputs_are_clear_errors():
    assert to_rgb(Image.new("L", (3, 3))).mode == "RGB"
    assert to_rgb(np.zeros((4, 4), dtype=np.float32)).mode == "RGB"
    with pytest.raises(ValueError, match="NaN"):
        to_rgb(np.full((4, 4), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="PIL image"):
        to_rgb("frame.mp4")


def test_generation_kwargs_are_cleaned():
    out = clean_generation_kwargs({"until": ["ASSISTANT:"], "image_aspect_ratio": "original", "temperature": 0, "top_p": 1.0, "max_new_tokens": "16", "num_beams": 1})
    assert out == {"max_new_tokens": 16, "do_sample": False, "num_beams": 1}
    sampled = clean_generation_kwargs({"temperature": 0.7, "do_sample": True, "top_p": 0.9})
    assert sampled["do_sample"] and sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9


def test_prefill_flops_and_latency_measurement(loaded):
    from lmms_tokprune.efficiency.flops import from_llava_config, llm_prefill_flops

    model, processor, _ = loaded
    engine = CompressedLlava(model, processor, bind("spatial", budget=64))
    engine.measure_latency = True
    _, stats = engine.generate([Sample(QUESTIONS[0], [_images()[0]])], {"max_new_tokens": 4})
    st = stats[0]
    text_cfg = from_llava_config(model.config).text
    assert st.prefill_tflops == pytest.approx(llm_prefill_flops(text_cfg, st.llm_prefill_tokens) / 1e12)
    assert set(st.latency) >= {"compress_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "peak_memory_mb"}
    assert 0 < st.latency["prefill_ms"] <= st.latency["ttft_ms"] and st.latency["compress_ms"] > 0
