"""The decoder loop (llava/llm_pruning.py) on Mistral decoders (LLaVA-NeXT Mistral-7B's MistralForCausalLM-style
language model): GQA, and the sliding window transformers applies over cache positions, which the loop applies in its
own masks and attention rows. plan=None generation is token-identical to transformers' generate (left padding too),
with and without a window that the prompt exceeds; every in-LLM method (fixed) runs on it."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig, MistralForCausalLM

from lmms_tokprune.llava.decoder import accumulated_attention, attention_scores, decoder_parts, project_query_key, row_logits
from lmms_tokprune.llava.llm_pruning import generate_pruned, prune_prefill
from lmms_tokprune.methods import bind
from lmms_tokprune.methods.llm_stages import LLMContext

D, LAYERS, VOCAB, WINDOW = 64, 4, 64, 16
PREFIX, N, QUESTION = 3, 24, 6  # a row: prefix, N image tokens, question -> 33 > WINDOW


def _config(window, impl="sdpa") -> MistralConfig:
    config = MistralConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, sliding_window=window, eos_token_id=1, pad_token_id=0,
                           bos_token_id=2, tie_word_embeddings=False)
    config._attn_implementation = impl
    return config


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    model = MistralForCausalLM(_config(WINDOW))
    with torch.no_grad():
        for layer in model.model.layers:  # peaked attention: the window and the cuts change what rows see
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return model.state_dict()


def _mistral(weights, window, impl="sdpa") -> MistralForCausalLM:
    model = MistralForCausalLM(_config(window, impl)).eval()
    model.load_state_dict(weights)
    return model


def _inputs(questions=(QUESTION, QUESTION + 9), seed=0):
    """Left-padded rows: PREFIX tokens, N image tokens, a question of the given length; random embeddings."""
    g = torch.Generator().manual_seed(seed)
    lengths = [PREFIX + N + q for q in questions]
    t = max(lengths)
    x = torch.zeros(len(questions), t, D)
    mask = torch.zeros(len(questions), t, dtype=torch.long)
    image = torch.zeros(len(questions), t, dtype=torch.bool)
    for b, n in enumerate(lengths):
        pad = t - n
        x[b, pad:] = torch.randn(n, D, generator=g)
        mask[b, pad:] = 1
        image[b, pad + PREFIX: pad + PREFIX + N] = True
    return x, mask, image


def _hf(model, x, mask, steps):
    out = model.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=steps, do_sample=False, eos_token_id=1, pad_token_id=0,
                         min_new_tokens=steps, output_scores=True, return_dict_in_generate=True)
    return out.sequences, out.scores


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("window", [WINDOW, None])
def test_no_plan_is_token_identical_to_generate(weights, window, impl):
    model = _mistral(weights, window, impl)
    x, mask, image = _inputs()
    for rows in (slice(0, 2), slice(1, 2)):  # a left-padded batch, and one row alone
        seqs, scores = _hf(model, x[rows], mask[rows], 12)
        ours = generate_pruned(model, x[rows], mask[rows], image[rows], None, {"max_new_tokens": 12, "min_new_tokens": 12}, None, 0,
                               keep_logits=True)
        assert torch.equal(ours.sequences, seqs)
        for mine, theirs in zip(ours.step_logits, scores):  # generate's scores carry min_new_tokens' -inf on EOS
            finite = torch.isfinite(theirs)
            torch.testing.assert_close(mine[finite], theirs.float()[finite], rtol=1e-4, atol=1e-4)


def test_the_window_matters(weights):
    """The prompts exceed the window: the same weights without a window give other logits (the test above has teeth)."""
    x, mask, image = _inputs()
    windowed = generate_pruned(_mistral(weights, WINDOW), x, mask, image, None, {"max_new_tokens": 2}, None, 0, keep_logits=True)
    full = generate_pruned(_mistral(weights, None), x, mask, image, None, {"max_new_tokens": 2}, None, 0, keep_logits=True)
    assert not torch.allclose(windowed.step_logits[0], full.step_logits[0], atol=1e-3)


def test_attention_rows_follow_the_window(weights):
    """What cuts read (row_logits, attention_scores) equals the eager attention transformers computes with the window."""
    model = _mistral(weights, WINDOW, "eager")
    x, mask, _ = _inputs()
    out = model.model(inputs_embeds=x, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    parts = decoder_parts(model)
    valid = mask.bool()
    positions = (mask.cumsum(-1) - 1).masked_fill(~valid, 0)
    for layer_no in (0, 2):
        hidden = out.hidden_states[layer_no]
        pe = parts.rotary(hidden, positions)
        q, k = project_query_key(parts.layers[layer_no], hidden, pe)
        scaling = parts.layers[layer_no].self_attn.scaling
        ours = attention_scores(q, k, scaling, valid, valid, chunk=7, window=WINDOW)
        ref = accumulated_attention(out.attentions[layer_no], valid)
        torch.testing.assert_close(ours * valid, ref * valid, rtol=1e-4, atol=1e-4)
        last = torch.full((2, 1), x.shape[1] - 1)
        probs = torch.softmax(row_logits(q[:, :, -1:], k, scaling, last, valid, WINDOW), dim=-1)[:, :, 0]
        torch.testing.assert_close(probs, out.attentions[layer_no][:, :, -1], rtol=1e-4, atol=1e-5)
        assert bool((probs[:, :, : x.shape[1] - WINDOW] == 0).all())  # nothing outside the window


METHODS = {
    "fastv": {"k": 1, "rank": 6},
    "pdrop": {"layer_list": (1, 2, 3)},
    "dart": {"k": 1, "max_num_trunction": 8, "pivot_image_token": 2, "pivot_text_token": 2},
    "sparsevlm": {"prune_layers": (0, 1, 2), "retain": 64},
    "sparsevlm2": {"version": "2.0", "prune_layers": (0, 1, 2), "retain": 64},
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_in_llm_method_runs_on_mistral(weights, name):
    method = "sparsevlm" if name.startswith("sparsevlm") else name
    model = _mistral(weights, WINDOW)
    x, mask, image = _inputs()
    both = prune_prefill(method, model.model, x, mask, image, variant="fixed", **METHODS[name])
    for b in range(2):
        keep = mask[b].bool()
        alone = prune_prefill(method, model.model, x[b:b + 1, keep], mask[b:b + 1, keep], image[b:b + 1, keep], variant="fixed",
                              num_patches=N, **METHODS[name])
        assert both.layer_lengths[b] == alone.layer_lengths[0]
        assert [p.tolist() for p in both.kept_positions[b]] == [p.tolist() for p in alone.kept_positions[0]]
        torch.testing.assert_close(both.last_hidden[b], alone.last_hidden[0], rtol=1e-5, atol=1e-5)
        assert both.visual_per_layer[b][-1] < N
    plan = bind(method, **METHODS[name]).llm_plan(LLMContext(LAYERS, N, 4))
    out = generate_pruned(model, x, mask, image, plan, {"max_new_tokens": 5}, 1, 0)
    assert len(out.tokens) == 2 and all(len(t) <= 5 for t in out.tokens)


def test_longtail_h2o_runs_on_mistral(weights):
    model = _mistral(weights, WINDOW)
    x, mask, image = _inputs()
    plan = bind("longtail", llm_layer=1, heavy_ratio=0.25, recent_ratio=0.25).llm_plan(LLMContext(LAYERS, N, 4))
    out = generate_pruned(model, x, mask, image, plan, {"max_new_tokens": 6}, None, 0)
    assert all(v[-1] < N for v in out.visual_per_layer) and out.evicted_in_decode == [5, 5]


def test_llava_next_with_a_mistral_decoder(weights):
    """LlavaNextForConditionalGeneration with a Mistral text config: the loop runs its MistralModel and lm_head."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14)
    config = LlavaNextConfig(vision_config=vision, text_config=_config(WINDOW), image_grid_pinpoints=[[28, 28]], image_token_index=63)
    config.text_config._attn_implementation = "sdpa"
    model = LlavaNextForConditionalGeneration(config).eval()
    model.model.language_model.load_state_dict({k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")})
    model.lm_head.load_state_dict({"weight": weights["lm_head.weight"]})
    parts = decoder_parts(model)
    assert type(model.model.language_model).__name__ == "MistralModel" and parts.layers[0] is model.model.language_model.layers[0]
    assert parts.lm_head is model.lm_head and parts.sliding_window == WINDOW
    x, mask, image = _inputs()
    seqs = model.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    ours = generate_pruned(model, x, mask, image, None, {"max_new_tokens": 6}, None, 0)
    assert torch.equal(ours.sequences, seqs)
