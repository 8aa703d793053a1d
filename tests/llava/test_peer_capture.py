"""What the engine captures for the peer methods (PEERS.md): exactly the tensors their released code reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lmms_tokprune.llava.batch import Sample
from lmms_tokprune.llava.loading import load_llava
from lmms_tokprune.llava.opener import open_engine
from lmms_tokprune.llava.options import engine_options
from lmms_tokprune.llava.text_guide import cdpruner_text
from lmms_tokprune.llava.vision import capture_outputs, clip_parts, run_clip
from lmms_tokprune.methods.signals import cls_attention_per_head


def _images(n=2):
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 255, (70 + 30 * i, 90, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def engines(tiny_llava, tiny_clip):
    base = engine_options({"pretrained": str(tiny_llava), "method": "cdpruner", "budget": 32, "text_encoder": str(tiny_clip)})
    cd = open_engine(base, torch.device("cpu"))
    vz = open_engine(engine_options({"pretrained": str(tiny_llava), "method": "visionzip", "budget": 32}), torch.device("cpu"), cd.model, cd.processor)
    return cd, vz


def test_feature_block_qk_and_per_head_attention_equal_eager_clip(engines, tiny_llava):
    """feature_q / feature_k are block 22's (the feature block's) raw q_proj / k_proj outputs; their per-head CLS
    row equals the eager attention map of that block (the release reads attentions[-2])."""
    _, vz = engines
    pixels = vz.images.prepare(_images())
    states = run_clip(vz.vision_tower, pixels, need_feature_qk=True)
    inputs = vz.method_inputs(states, [0, 1], [])
    layers = clip_parts(vz.vision_tower)[2]
    feature_block = len(layers) - 1  # vision_feature_layer = -2: the output of the second-to-last block
    with capture_outputs({"q": layers[feature_block - 1].self_attn.q_proj, "k": layers[feature_block - 1].self_attn.k_proj}) as got:
        run_clip(vz.vision_tower, pixels)
    assert torch.equal(inputs.feature_q, got["q"].float()) and torch.equal(inputs.feature_k, got["k"].float())
    assert inputs.num_heads == vz.model.config.vision_config.num_attention_heads
    eager, _ = load_llava(str(tiny_llava), torch.device("cpu"), "float32", "eager")
    maps = eager.model.vision_tower(pixels, output_attentions=True).attentions[feature_block - 1]  # [B, H, 577, 577]
    ours = cls_attention_per_head(inputs.feature_q, inputs.feature_k, inputs.num_heads)
    torch.testing.assert_close(ours, maps[:, :, 0, 1:], rtol=1e-5, atol=1e-7)


def test_projected_and_patch_embeds(engines, tiny_clip):
    """projected = the projector on every patch; patch_embeds = CLIP visual_projection(post_layernorm(penultimate
    patches)) in fp32, with the CLIP checkpoint's own tower giving the same penultimate states."""
    from transformers import CLIPModel

    cd, _ = engines
    pixels = cd.images.prepare(_images())
    states = run_clip(cd.vision_tower, pixels)
    inputs = cd.method_inputs(states, [0, 1], ["q", "q"])
    torch.testing.assert_close(inputs.projected, cd.projector(states.hidden[:, 1:]))
    clip = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    with torch.no_grad():
        penultimate = clip.vision_model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        want = clip.visual_projection(clip.vision_model.post_layernorm(penultimate))
    torch.testing.assert_close(inputs.patch_embeds, want, rtol=1e-5, atol=1e-5)
    assert inputs.patch_embeds.dtype == torch.float32


def test_text_segments_are_77_token_rows_of_the_question(engines):
    """The released loader: CLIP-tokenise without truncation or padding, right-pad ids and mask with 0 to a multiple
    of 77, one text_embeds row per 77-token row."""
    cd, _ = engines
    guide = cd.text_guide
    short, long = "What colour is the circle?", " ".join(["what colour is the big red circle on the left"] * 12)
    ids = guide.tokenizer(long)["input_ids"]
    assert len(ids) > 77
    segments = guide.segments([short, long])
    assert [s.shape[0] for s in segments] == [1, -(-len(ids) // 77)]
    rows = segments[1].shape[0]
    padded = torch.zeros(rows * 77, dtype=torch.long)
    mask = torch.zeros(rows * 77, dtype=torch.long)
    padded[: len(ids)], mask[: len(ids)] = torch.tensor(ids), 1
    with torch.no_grad():
        want = guide.text_model(input_ids=padded.view(rows, 77), attention_mask=mask.view(rows, 77)).text_embeds
    torch.testing.assert_close(segments[1], want)
    assert segments[0].dtype == torch.float32


def test_cdpruner_question_is_the_context_minus_the_single_word_instruction():
    assert cdpruner_text("What is it?\nAnswer the question using a single word or phrase.") == "What is it?"
    assert cdpruner_text("Is it red?\nAnswer with the option's letter from the given choices directly.") == \
        "Is it red?\nAnswer with the option's letter from the given choices directly."  # other instructions stay
    assert cdpruner_text("<image>What is it?") == "What is it?"


def test_the_tower_keeps_sdpa_and_the_engine_reads_each_samples_question(engines):
    cd, _ = engines
    assert cd.model.config.vision_config._attn_implementation == "sdpa"
    weights = []
    layer = clip_parts(cd.vision_tower)[2][-2]
    handle = layer.self_attn.register_forward_hook(lambda m, a, o: weights.append(o[1]))
    try:
        samples = [Sample("What colour is it?\nAnswer the question using a single word or phrase.", [im], [i]) for i, im in enumerate(_images())]
        out = cd.generate(samples, {"max_new_tokens": 2})
    finally:
        handle.remove()
    assert weights and all(w is None for w in weights)  # SDPA: no attention map was materialised
    assert [s.visual_tokens_kept for s in out.stats] == [32, 32]
    assert cd.guidance_texts(samples, ["", ""]) == ["What colour is it?", "What colour is it?"]
