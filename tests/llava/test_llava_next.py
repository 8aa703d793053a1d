"""LLaVA-NeXT through the family adapter: counts per grid shape against transformers' own processor, `none` token-identical
to plain transformers (Llama and Mistral decoders), units and valid patches, re-assembly, budgets, batch == one-by-one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lmms_tokprune.llava.batch import Sample
from lmms_tokprune.llava.families.llava_next import unpadded_box
from lmms_tokprune.llava.opener import open_engine
from lmms_tokprune.llava.options import engine_options

# one image per anyres grid of the released pinpoints, plus tiny and grayscale ones: (width, height) -> (rows, cols)
SHAPES = {(640, 480): (2, 2), (336, 336): (1, 2), (672, 336): (1, 2), (336, 672): (2, 1), (1000, 300): (1, 3), (300, 1000): (3, 1),
          (700, 320): (1, 3), (7, 5): (1, 2), (900, 900): (2, 2)}
QUESTIONS = ["What colour is the circle?", "How many squares are there?", "Is there a blue star in the picture?", "What shape is it?"]


def _image(size, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    return image.convert(mode) if mode != "RGB" else image


def _engine(ckpt, **args):
    return open_engine(engine_options({"pretrained": str(ckpt), "dtype": "float32", **args}), torch.device("cpu"))


@pytest.fixture(scope="module")
def none_engine(tiny_next):
    return _engine(tiny_next, prompt_style="chat_template")


def test_unpadded_box_is_transformers_unpad_image():
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    for height, width in [(480, 640), (640, 480), (336, 336), (7, 5), (300, 1000), (333, 777), (1, 2000)]:
        for rows, cols in [(48, 48), (24, 48), (48, 24), (24, 72), (72, 24)]:
            top, bottom, left, right = unpadded_box(height, width, rows, cols)
            expected = unpad_image(torch.zeros(1, rows, cols), (height, width)).shape[1:]
            assert (bottom - top, right - left) == tuple(expected)


@pytest.mark.parametrize("size,grid", SHAPES.items(), ids=[f"{w}x{h}" for w, h in SHAPES])
def test_counts_per_grid_shape_match_the_processor(none_engine, size, grid):
    """units = 1 + crops, visual tokens in = 576 + H'W', layout tokens = H' newlines: together exactly the image tokens
    transformers' LlavaNextProcessor expands <image> to."""
    family = none_engine.family
    plan = family.plan_image(_image(size))
    placement = plan.placement
    assert (placement.rows, placement.cols) == grid and plan.units == 1 + grid[0] * grid[1]
    assert plan.visual_tokens_in == 576 + placement.height * placement.width and plan.layout_tokens_in == placement.height
    ids = none_engine.processor(images=_image(size), text="<image>", return_tensors="pt")["input_ids"][0]
    assert int((ids == none_engine.image_token_id).sum()) == plan.visual_tokens_in + plan.layout_tokens_in
    valid = plan.valid
    assert valid.shape == (plan.units, 576) and bool(valid[0].all()) and int(valid[1:].sum()) == placement.height * placement.width


def _plain_generate(ckpt, image, question, max_new_tokens=8):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    processor = AutoProcessor.from_pretrained(str(ckpt))  # what lmms-eval's llava_hf loads (torchvision backend)
    model = LlavaNextForConditionalGeneration.from_pretrained(str(ckpt)).eval()
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                                           add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    eos = processor.tokenizer.eos_token_id
    return (out[: out.index(eos)] if eos in out else out), inputs["input_ids"].shape[1]


@pytest.mark.parametrize("decoder", ["llama", "mistral"])
def test_none_is_token_identical_to_plain_transformers(decoder, tiny_next, tiny_next_mistral):
    ckpt = tiny_next if decoder == "llama" else tiny_next_mistral
    engine = _engine(ckpt, prompt_style="chat_template")
    answers = set()
    for i, (size, mode) in enumerate([((640, 480), "RGB"), ((300, 1000), "L"), ((7, 5), "RGB"), ((700, 320), "RGBA")]):
        image = _image(size, seed=i, mode=mode)
        reference, length = _plain_generate(ckpt, image.convert("RGB"), QUESTIONS[i])
        ours, stats = engine.generate([Sample(QUESTIONS[i], [image])], {"max_new_tokens": 8})
        assert ours[0] == reference
        plan = engine.family.plan_image(image.convert("RGB"))
        st = stats[0]
        assert (st.visual_tokens_in, st.visual_tokens_kept, st.layout_tokens, st.units) == (
            plan.visual_tokens_in, plan.visual_tokens_in, plan.layout_tokens_in, plan.units)
        assert st.llm_prefill_tokens == length
        answers.add(tuple(ours[0]))
    assert len(answers) > 1, "the tiny model must answer differently to different inputs"


def test_llava_v1_prompt_is_the_original_conversation(tiny_next, tiny_next_mistral):
    vicuna = _engine(tiny_next)
    assert vicuna.prompt_text(Sample("Q?", [_image((8, 8))])).endswith("USER: <image>\nQ? ASSISTANT:")
    mistral = _engine(tiny_next_mistral)
    assert mistral.prompt_text(Sample("Q?", [_image((8, 8))])) == "[INST] <image>\nQ? [/INST]"


def test_options_of_another_family_are_refused(tiny_next, tiny_llava):
    with pytest.raises(ValueError, match="pad_to_square do not apply to llava_next"):
        _engine(tiny_next, pad_to_square=True)
    with pytest.raises(ValueError, match="budget_scope do not apply to llava15"):
        _engine(tiny_llava, budget_scope="unit")
    _engine(tiny_next, budget_scope="unit", method="topk_cls", budget=16)  # its own option


@pytest.mark.parametrize("method,params", [("topk_cls", {"budget": 160}), ("spatial", {"budget": 160}), ("prumerge", {}),
                                           ("visionzip", {"budget": 160}), ("fastervlm", {"budget": 160}), ("random", {"budget": 160})])
def test_units_keep_only_valid_patches_and_reassemble(tiny_next, method, params):
    """Per unit, on valid patches only; kept grid tokens in global raster order with a newline after each kept row;
    `budget` per image split over the units."""
    engine = _engine(tiny_next, method=method, **params)
    images = [_image((640, 480), 1), _image((300, 1000), 2)]
    batch = engine.family.units(images)
    result = engine.compress_batch(batch, [Sample("q", [im], [i]) for i, im in enumerate(images)], ["q", "q"])
    unit = 0
    for image in batch.images:
        for u in range(image.units):
            index = result.images[unit].index
            patch = index[index >= 0]
            assert bool(image.valid[u][patch].all()), "a kept patch that unpadding removed"
            if "budget" in params:
                assert result.images[unit].num_tokens == engine.family.image_shares(params["budget"], image)[u]
            unit += 1
    tokens = engine.image_tokens(batch, result.images)
    for image, tok in zip(batch.images, tokens):
        if "budget" in params:
            assert tok.visual == params["budget"]
        assert tok.features.shape[0] == tok.visual + tok.layout_count and int(tok.layout.sum()) == tok.layout_count
        assert 1 <= tok.layout_count <= image.layout_tokens_in


def test_batch_of_mixed_shapes_equals_one_by_one(tiny_next):
    engine = _engine(tiny_next, method="topk_cls", budget=200)
    samples = [Sample(q, [_image(size, i)], [i]) for i, (q, size) in enumerate(zip(QUESTIONS, [(640, 480), (336, 336), (300, 1000), (7, 5)]))]
    singles = [engine.generate([s], {"max_new_tokens": 6}) for s in samples]
    batched, stats = engine.generate(samples, {"max_new_tokens": 6})
    assert batched == [s[0][0] for s in singles]
    assert [(st.visual_tokens_kept, st.layout_tokens, st.llm_prefill_tokens) for st in stats] == \
        [(s[1][0].visual_tokens_kept, s[1][0].layout_tokens, s[1][0].llm_prefill_tokens) for s in singles]


def test_two_image_document(tiny_next):
    engine = _engine(tiny_next, method="topk_cls", budget=100)
    images = [_image((640, 480), 5), _image((336, 336), 6)]
    tokens, stats = engine.generate([Sample("Compare these.", images, [0, 1])], {"max_new_tokens": 4})
    plans = [engine.family.plan_image(im) for im in images]
    st = stats[0]
    assert st.visual_tokens_in == sum(p.visual_tokens_in for p in plans) and st.visual_tokens_kept == 200
    assert st.units == sum(p.units for p in plans) == 5 + 3


def test_budget_scope_unit_gives_every_unit_the_budget(tiny_next):
    engine = _engine(tiny_next, method="topk_cls", budget=32, budget_scope="unit")
    _, stats = engine.generate([Sample("q", [_image((640, 480), 7)], [0])], {"max_new_tokens": 2})
    assert stats[0].units == 5 and stats[0].visual_tokens_kept == 5 * 32


def test_impossible_budgets_are_per_document_errors(tiny_next):
    from lmms_tokprune.llava.batch import DocumentError

    engine = _engine(tiny_next, method="topk_cls", budget=4)  # fewer tokens than a 2x2 image's 5 units
    with pytest.raises(DocumentError, match="budget=4 is less than the 5 units"):
        engine.admit(Sample("q", [_image((640, 480))]))
    engine.admit(Sample("q", [_image((336, 336))]))  # 3 units: fine
    engine = _engine(tiny_next, method="topk_cls", budget=500, budget_scope="unit")  # a 640x480 image's crops have < 500 valid
    with pytest.raises(DocumentError, match="budget=500 per unit"):
        engine.admit(Sample("q", [_image((640, 480))]))
    with pytest.raises(ValueError, match="budget=900 is outside"):
        _engine(tiny_next, method="topk_cls", budget=900, budget_scope="unit")
