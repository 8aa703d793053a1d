"""CLIP text guidance for recover: question vs reference text, pooling, 77-token limit, load errors."""

from __future__ import annotations

import pytest
import torch

from lmms_tokprune.llava.loading import load_llava
from lmms_tokprune.llava.prompts import VICUNA_SYSTEM, llava_v1_prompt
from lmms_tokprune.llava.text_guide import load_text_guide


@pytest.fixture(scope="module")
def llava(tiny_llava):
    return load_llava(str(tiny_llava), torch.device("cpu"), "float32")[0]


def test_question_source_uses_each_question_with_eos_pooling(llava, tiny_clip):
    from transformers import CLIPModel

    guide = load_text_guide(str(tiny_clip), llava, torch.device("cpu"), "question")
    contexts = ["<image>\nWhat colour is the car?\nAnswer the question using a single word or phrase.", "Is there a dog?"]
    texts = guide.texts_for(contexts, [llava_v1_prompt(c, 1) for c in contexts])
    assert texts == ["What colour is the car?", "Is there a dog?"]
    embeds, proj = guide.embed(texts)
    clip = CLIPModel.from_pretrained(str(tiny_clip))
    enc = guide.tokenizer(texts, padding=True, return_tensors="pt")
    ref = clip.get_text_features(**enc)
    ref = getattr(ref, "pooler_output", ref)
    torch.testing.assert_close(embeds, ref)
    torch.testing.assert_close(proj, clip.visual_projection.weight)


def test_reference_source_is_the_first_prompt_line_of_sample_zero(llava, tiny_clip):
    guide = load_text_guide(str(tiny_clip), llava, torch.device("cpu"), "reference")
    contexts = ["What colour is the car?", "Is there a dog?"]
    texts = guide.texts_for(contexts, [llava_v1_prompt(c, 1) for c in contexts])
    assert texts == [VICUNA_SYSTEM + " USER: <image>"] * 2  # vicuna_v1: the first line ends at "<image>"
    embeds, _ = guide.embed(texts)
    assert embeds.shape[0] == 2 and torch.equal(embeds[0], embeds[1])


def test_text_longer_than_77_tokens_is_truncated(llava, tiny_clip):
    guide = load_text_guide(str(tiny_clip), llava, torch.device("cpu"), "question")
    long = " ".join(["what colour is the big red square"] * 40)
    embeds, _ = guide.embed([long])
    truncated = guide.tokenizer([long], truncation=True, max_length=77, return_tensors="pt")
    out = guide.text_model(**truncated).text_embeds
    torch.testing.assert_close(embeds, out)


def test_missing_or_wrong_text_encoder_is_a_clear_error(llava, tmp_path, tiny_llava):
    with pytest.raises(ValueError, match="text_encoder folder .* does not exist"):
        load_text_guide(str(tmp_path / "nope"), llava, torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot load the CLIP text encoder .* not a CLIPModel"):
        load_text_guide(str(tiny_llava), llava, torch.device("cpu"))
