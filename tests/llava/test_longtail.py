"""Long-tail split + H2O pruning (re-implementation, no reference code): the pure stage-1 math, the
in-CLIP placement, the H2O selection, and our prefill/decode loop (positions, masks, KV cache)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from lmms_tokprune.llava.batch import Sample
from lmms_tokprune.llava.decoder import accumulated_attention, attention_scores, decoder_parts, project_query_key
from lmms_tokprune.llava.engine import clean_generation_kwargs
from lmms_tokprune.llava.llm_pruning import generate_pruned
from lmms_tokprune.llava.loading import load_llava
from lmms_tokprune.llava.longtail_engine import LongtailLlava
from lmms_tokprune.llava.opener import open_engine
from lmms_tokprune.llava.options import engine_options
from lmms_tokprune.llava.vision import capture_outputs, clip_parts, run_clip
from lmms_tokprune.methods import VisionInputs, bind, compress, get_method
from lmms_tokprune.methods.longtail import h2o_budgets, h2o_keep, h2o_span, longtail_counts, scaled_count, split_objective, split_point
from lmms_tokprune.methods.registry import STAGE_IN_CLIP_AND_LLM

QUESTIONS = ["What colour is the square?", "How many circles are there in the picture?", "Is there a red triangle?", "What shape is it?"]


def _images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(336, 336), (200, 300), (400, 250), (120, 90)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes[:n]]


def _samples():
    return [Sample(q, [im], [i]) for i, (im, q) in enumerate(zip(_images(), QUESTIONS))]


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    """Tiny LLaVA-1.5-shaped checkpoint with a 4-layer LLM (llm_layer > 0 needs layers before and after)."""
    from lmms_tokprune.testing.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("ckpt4") / "tiny-llava-4", text_layers=4)


@pytest.fixture(scope="module")
def loaded(tiny4):
    return load_llava(str(tiny4), torch.device("cpu"), "float32", "sdpa")


def _engine(loaded, **params):
    model, processor = loaded
    return open_engine(engine_options({"method": "longtail", **params}), torch.device("cpu"), model, processor)


def _qk_for(weights: torch.Tensor):
    """q, k [B, 1+N, D] whose CLS attention over the patches is exactly weights[:, 1:] / weights.sum()."""
    b, n1 = weights.shape
    d = 16
    q = torch.zeros(b, n1, d)
    k = torch.zeros(b, n1, d)
    q[:, 0, 0] = math.sqrt(d)
    k[:, :, 0] = torch.log(weights)
    return q, k


# ------------------------------------------------------------------------------------------------ stage 1
def test_split_point_on_hand_built_curves():
    n = 10
    step = torch.tensor([[1.0] + [0.0] * (n - 1)])  # f(1)=0, f(i)=(n-i) for i>=2 -> i*=2 (first tail point)
    assert split_point(step)[0].tolist() == [2]
    linear = torch.linspace(1, 0, 11)[None]  # f(i) = (11-i)(i-1)/10 -> i*=6
    assert split_point(linear)[0].tolist() == [6]
    plateau = torch.tensor([[5.0, 5, 5, 1, 1, 1, 1, 1]])  # f = 0,0,0,4,3,2,1 -> i*=4
    assert split_point(plateau)[0].tolist() == [4]
    f = split_objective(plateau)[0].tolist()
    assert f == [0.0, 0.0, 0.0, 4.0, 3.0, 2.0, 1.0]
    # a long-tailed curve against a brute-force float64 evaluation of eq. 3
    d = np.sort(np.random.default_rng(1).pareto(1.5, 576))[::-1].copy()
    brute = max(range(1, 576), key=lambda i: ((576 - i) * (d[0] - d[i - 1]) / (d[0] - d[-1]), -i))
    assert split_point(torch.from_numpy(d)[None])[0].item() == brute
    # batch rows are independent
    both = torch.stack([torch.linspace(1, 0, 11), torch.tensor([1.0] + [0.0] * 10)])
    assert split_point(both)[0].tolist() == [6, 2]


def test_alpha_readings_and_rounding():
    assert scaled_count(100, 576, 0.075, "expand") == 108  # 107.5 rounds half up
    assert scaled_count(100, 576, 0.075, "scale") == 8  # 7.5
    assert scaled_count(100, 576, 0.075, "offset") == 143  # 100 + round(43.2)
    assert scaled_count(100, 576, 0.075, "none") == 100
    assert scaled_count(575, 576, 0.075, "expand") == 576  # clamped to n
    assert scaled_count(5, 576, 0.075, "scale") == 1  # at least one token
    # "scale" can never reach the paper's reported counts (195-251 on POPE/TextVQA/MME): at most 43
    assert max(scaled_count(h, 576, 0.075, "scale") for h in range(1, 576)) == 43
    plateau = torch.tensor([[5.0, 5, 5, 1, 1, 1, 1, 1]])
    assert longtail_counts(plateau, alpha_mode="none") == [4]
    assert longtail_counts(plateau, alpha_mode="none", include_split=False) == [3]


def test_flat_curve_guard():
    flat = torch.full((2, 576), 1.0 / 577)
    istar, is_flat = split_point(flat)
    assert is_flat.all() and istar.tolist() == [1, 1]
    assert longtail_counts(flat) == [576, 576]
    assert longtail_counts(flat, flat_curve="keep_one") == [1, 1]
    q, k = _qk_for(torch.ones(1, 577))
    out = compress("longtail", VisionInputs(torch.randn(1, 577, 8), q, k))
    assert out[0].num_tokens == 576 and torch.equal(out[0].index, torch.arange(576))


def test_compress_contract_budget_ratio_and_errors():
    torch.manual_seed(0)
    w = torch.rand(3, 577) ** 8 + 1e-3  # long-tailed weights
    q, k = _qk_for(w)
    hidden = torch.randn(3, 577, 8)
    inp = VisionInputs(hidden, q, k)
    outs = compress("longtail", inp)
    attn = w[:, 1:] / w.sum(dim=1, keepdim=True)
    counts = longtail_counts(attn)
    for b, out in enumerate(outs):
        top = torch.sort(torch.argsort(attn[b], descending=True, stable=True)[: counts[b]]).values
        assert torch.equal(out.index, top)  # top of the CLS attention, spatial order
        assert torch.equal(out.features, hidden[b, 1:][top])
    assert [o.num_tokens for o in compress("longtail", inp, budget=64)] == [64] * 3
    assert [o.num_tokens for o in compress("longtail", inp, ratio=0.25)] == [144] * 3
    with pytest.raises(ValueError, match="budget=577 is outside"):
        compress("longtail", inp, budget=577)
    with pytest.raises(ValueError, match="alpha_mode"):
        compress("longtail", inp, alpha_mode="multiply")
    with pytest.raises(ValueError, match="valid variants: fixed"):
        compress("longtail", inp, variant="reference")
    with pytest.raises(ValueError, match="needs the last CLIP block's q and k"):
        compress("longtail", VisionInputs(hidden))
    spec = get_method("longtail")
    assert spec.stage == STAGE_IN_CLIP_AND_LLM
    assert {p: spec.params[p].default for p in ("alpha", "alpha_mode", "clip_layer", "heavy_ratio", "recent_ratio", "llm_layer", "budget_base", "exempt_system_prompt")} == {
        "alpha": 0.075, "alpha_mode": "expand", "clip_layer": 3, "heavy_ratio": 0.5, "recent_ratio": 0.5, "llm_layer": 0,
        "budget_base": "visual", "exempt_system_prompt": True,
    }


# ------------------------------------------------------------------------------------------------ in CLIP
def test_in_clip_pruning_equals_per_image_runs(loaded):
    model, _ = loaded
    engine = _engine(loaded, clip_layer=1)
    pixels = engine.images.prepare(_images())
    tower = model.model.vision_tower
    counts = [40, 7, 100, 1]

    def keep_first(h, q, k, counts=counts):  # different counts per image: ragged
        kept = [torch.arange(c) * 5 for c in counts]
        from lmms_tokprune.llava.longtail_engine import pack_kept

        return pack_kept(kept, h.device)

    def one_keep(c):
        return lambda h, q, k: torch.cat([torch.zeros(1, 1, dtype=torch.long), (torch.arange(c) * 5 + 1)[None]], dim=1)

    runs = {mode: run_clip(tower, pixels, token_filter=keep_first, filter_after_block=1, ragged=mode) for mode in ("mask", "per_image")}
    for b, c in enumerate(counts):
        alone = run_clip(tower, pixels[b:b + 1], token_filter=one_keep(c), filter_after_block=1).hidden[0]
        for mode, states in runs.items():
            assert states.token_mask[b].sum() == 1 + c
            torch.testing.assert_close(states.hidden[b, : 1 + c], alone, rtol=1e-5, atol=1e-5, msg=mode)
        assert torch.equal(runs["per_image"].hidden[b, : 1 + c], alone)  # image by image is exact


def test_fewer_clip_tokens_are_processed_and_stage1_is_the_pure_function(loaded):
    model, _ = loaded
    engine = _engine(loaded, clip_layer=1)
    layers = clip_parts(model.model.vision_tower)[2]
    seen = []
    handle = layers[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        pixels = engine.images.prepare(_images(1))
        comp = engine.compress_images(pixels, [0], []).images
    finally:
        handle.remove()
    n_kept = comp[0].num_tokens
    assert n_kept < 576 and seen == [1 + n_kept]  # block 2 saw CLS + the kept patches only
    # the kept set is the pure stage-1 function on block 1's q/k
    with capture_outputs({"q": layers[0].self_attn.q_proj, "k": layers[0].self_attn.k_proj}) as got:
        full = run_clip(model.model.vision_tower, pixels, feature_layer=1)
    ref = compress("longtail", VisionInputs(full.hidden.float(), got["q"].float(), got["k"].float()))
    assert torch.equal(comp[0].index, ref[0].index)
    # the features come from blocks 2-3 run over the kept tokens only: not the full run's features at those patches
    full_features = run_clip(model.model.vision_tower, pixels).hidden[0, 1:][comp[0].index]
    assert comp[0].features.shape == full_features.shape
    assert not torch.allclose(comp[0].features, full_features, atol=1e-3)


def test_budget_and_ratio_through_the_engine(loaded):
    engine = _engine(loaded, clip_layer=2, budget=32)
    stats = engine.generate(_samples()[:2], {"max_new_tokens": 2}).stats
    assert [s.details.stage1_counts for s in stats] == [[32], [32]]
    engine = _engine(loaded, ratio=0.125)
    stats = engine.generate(_samples()[:1], {"max_new_tokens": 1}).stats
    assert stats[0].details.stage1_counts == [72]
    model, processor = loaded
    with pytest.raises(ValueError, match="clip_layer=4 must be within 1..3"):
        LongtailLlava(model, processor, bind("longtail", clip_layer=4))
    with pytest.raises(ValueError, match="llm_layer=4 is outside"):
        LongtailLlava(model, processor, bind("longtail", llm_layer=4))
    with pytest.raises(ValueError, match="budget_base"):
        LongtailLlava(model, processor, bind("longtail", budget_base="text"))


# ------------------------------------------------------------------------------------------------ H2O
def test_h2o_selection_on_a_hand_built_attention_matrix():
    # one head; causal rows; token 1 and token 4 receive most attention
    t = 8
    logits = torch.full((t, t), 0.0)
    logits[:, 1] = 4.0
    logits[:, 4] = 3.0
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)[None, None]
    probs = torch.cat([probs, probs], dim=1)  # two identical heads: the mean is the same
    scores = accumulated_attention(probs)
    assert torch.allclose(scores[0], probs[0, 0].sum(dim=0))
    valid = torch.ones(1, t, dtype=torch.bool)
    prunable = torch.tensor([[False, False, True, True, True, True, True, True]])  # slots 0-1: exempt prefix
    keep = h2o_keep(scores, valid, prunable, heavy=[1], recent=[2])
    assert torch.nonzero(keep[0]).flatten().tolist() == [0, 1, 4, 6, 7]  # prefix + heavy {4} + recent {6, 7}
    keep = h2o_keep(scores, valid, prunable, heavy=[2], recent=[2])
    assert torch.nonzero(keep[0]).flatten().tolist() == [0, 1, 2, 4, 6, 7]  # equal scores: the earlier slot (2) wins over 3
    assert h2o_keep(scores, valid, prunable, heavy=[3], recent=[3]).equal(valid)  # span (6) fits: nothing pruned
    padded = torch.tensor([[False, False, True, True, True, True, True, True]])
    keep = h2o_keep(scores, padded, padded, heavy=[0], recent=[1])
    assert torch.nonzero(keep[0]).flatten().tolist() == [7]  # padding never kept
    assert h2o_budgets(200, 0.5, 0.5) == (100, 100) and h2o_budgets(1, 0.5, 0.5) == (0, 1)


def test_scores_equal_eager_attention_probabilities(tiny4, loaded):
    """Our q/k scores (SDPA model untouched) == the accumulated probabilities an eager model reports."""
    eager, _ = load_llava(str(tiny4), torch.device("cpu"), "float32", "eager")
    engine = _engine(loaded, clip_layer=2)
    batch = engine.prepare(_samples()[:2])
    emb, mask = batch.llm.inputs_embeds, batch.llm.attention_mask
    lm = eager.model.language_model
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = lm(inputs_embeds=emb, attention_mask=mask, position_ids=positions, output_attentions=True, output_hidden_states=True)
    parts = decoder_parts(loaded[0])
    valid = mask.bool()
    for layer_no in (0, 2):
        hidden = out.hidden_states[layer_no]
        pe = parts.rotary(hidden, positions)
        q, k = project_query_key(parts.layers[layer_no], hidden, pe)
        ours = attention_scores(q, k, parts.layers[layer_no].self_attn.scaling, valid, valid, chunk=7)
        ref = accumulated_attention(out.attentions[layer_no], valid)
        torch.testing.assert_close(ours * valid, ref * valid, rtol=1e-4, atol=1e-4)


def test_gqa_scores_repeat_key_heads():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 5, 8)
    k = torch.randn(1, 2, 5, 8)
    valid = torch.ones(1, 5, dtype=torch.bool)
    ours = attention_scores(q, k, 0.3, valid, valid)
    k_rep = k.repeat_interleave(2, dim=1)
    logits = (q @ k_rep.transpose(-1, -2) * 0.3).masked_fill(~torch.tril(torch.ones(5, 5, dtype=torch.bool)), float("-inf"))
    torch.testing.assert_close(ours, accumulated_attention(torch.softmax(logits, -1)))


# ------------------------------------------------------------------------------------------------ LLM loop
def test_no_pruning_is_token_identical_to_generate(loaded):
    model, processor = loaded
    engine = _engine(loaded, clip_layer=2, heavy_ratio=10.0)  # heavy + recent cover everything
    for samples in (_samples(), _samples()[2:3]):
        batch = engine.prepare(samples)
        emb, mask = batch.llm.inputs_embeds, batch.llm.attention_mask
        eos = processor.tokenizer.eos_token_id
        ref = model.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=engine.pad_token_id, eos_token_id=eos)
        ref = [r[: r.index(eos)] if eos in r else r for r in ref.tolist()]
        plain = generate_pruned(model, emb, mask, batch.llm.image_mask, None, {"max_new_tokens": 8}, eos, engine.pad_token_id)
        assert plain.tokens == ref
        toks, stats = engine.generate(samples, {"max_new_tokens": 8, "temperature": 0})
        assert toks == ref
        assert [s.llm_prefill_tokens for s in stats] == [float(n) for n in batch.llm.lengths]
        assert [s.details.evicted_in_decode for s in stats] == [0] * len(samples)


@pytest.mark.parametrize("params", [{"clip_layer": 2}, {"clip_layer": 1, "llm_layer": 2}])
def test_batch_equals_single_with_pruning(loaded, params):
    engine = _engine(loaded, **params)
    samples = _samples()
    batched, stats = engine.generate(samples, {"max_new_tokens": 6})
    details = [st.details for st in stats]
    for s, toks, st, det in zip(samples, batched, stats, details):
        single, single_stats = engine.generate([s], {"max_new_tokens": 6})
        assert single[0] == toks
        assert single_stats[0].layer_lengths == st.layer_lengths and single_stats[0].visual_tokens_kept == st.visual_tokens_kept
        assert torch.equal(single_stats[0].details.llm_kept_positions, det.llm_kept_positions)
    k = params.get("llm_layer", 0)
    for st, det in zip(stats, details):
        kept = det.llm_kept_positions.numel()
        assert kept < det.llm_prompt_length  # the LLM stage pruned
        assert st.layer_lengths == [det.llm_prompt_length] * k + [kept] * (4 - k)
        assert st.llm_prefill_tokens == sum(st.layer_lengths) / 4
        assert st.visual_tokens_kept <= det.stage1_counts[0] and st.visual_tokens_in == 576
        assert det.recent == det.heavy == det.stage1_counts[0] // 2


def _reference_logits(model, emb, kept_prompt, generated, k_layer):
    """No-cache recomputation of what the pruned, cached decode must produce (batch 1, no padding).

    Full sequence = prompt + generated tokens, original positions. Layers < K: prompt rows see the whole
    prompt (as at prefill), generated rows see only the kept prompt tokens; layers >= K: everybody sees only
    the kept prompt tokens (pruned rows are computed but never read)."""
    parts = decoder_parts(model)
    t = emb.shape[1]
    seq = torch.cat([emb, parts.embed(torch.tensor([generated]))], dim=1) if generated else emb
    s = seq.shape[1]
    pos = torch.arange(s)[None]
    pe = parts.rotary(seq, pos)
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))
    key_ok = torch.ones(s, dtype=torch.bool)
    key_ok[:t] = False
    key_ok[kept_prompt] = True
    early = causal.clone()
    early[t:] &= key_ok[None, :]
    late = causal & key_ok[None, :]
    late |= torch.eye(s, dtype=torch.bool)
    h = seq
    for i, layer in enumerate(parts.layers):
        mask = (early if i < k_layer else late)[None, None]
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
    logits = parts.lm_head(parts.norm(h)).float()[0]
    return [logits[t - 1]] + [logits[t + j] for j in range(len(generated))]


@pytest.mark.parametrize("k_layer", [0, 2])
def test_positions_and_kv_eviction_match_a_no_cache_recomputation(loaded, k_layer):
    model, _ = loaded
    engine = _engine(loaded, clip_layer=2, llm_layer=k_layer, decode_eviction=False)
    samples = _samples()[1:2]
    batch = engine.prepare(samples)
    plan = engine.plan(batch)
    out = generate_pruned(model, batch.llm.inputs_embeds, batch.llm.attention_mask, batch.llm.image_mask, plan, {"max_new_tokens": 6}, None,
                          engine.pad_token_id, keep_logits=True)
    kept = out.kept_positions[0]
    assert kept.numel() < out.prompt_lengths[0]
    gen = out.tokens[0]
    ref = _reference_logits(model, batch.llm.inputs_embeds, kept, gen[:-1], k_layer)
    assert len(ref) == len(out.step_logits) == 6
    for ours, theirs in zip(out.step_logits, ref):
        torch.testing.assert_close(ours[0], theirs, rtol=1e-4, atol=1e-4)


def test_decode_eviction_holds_the_budget(loaded):
    model, _ = loaded
    engine = _engine(loaded, clip_layer=2)
    samples = _samples()[:2]
    batch = engine.prepare(samples)
    plan = engine.plan(batch)
    out = generate_pruned(model, batch.llm.inputs_embeds, batch.llm.attention_mask, batch.llm.image_mask, plan, {"max_new_tokens": 7}, None,
                          engine.pad_token_id)
    assert out.evicted_in_decode == [6, 6]  # every fed token pushes the span over M + N once
    span = h2o_span(batch.llm.attention_mask.bool(), batch.llm.image_mask, True).sum(dim=1).tolist()
    for row in range(2):
        assert span[row] > plan.notes["heavy"][row] + plan.notes["recent"][row]


def test_sdpa_stays_and_sampling_and_beams(loaded):
    model, _ = loaded
    engine = _engine(loaded, clip_layer=2)
    weights = []
    handle = model.model.language_model.layers[0].self_attn.register_forward_hook(lambda m, a, o: weights.append(o[1]))
    try:
        engine.generate(_samples()[:2], {"max_new_tokens": 3})
    finally:
        handle.remove()
    assert model.config.text_config._attn_implementation == "sdpa"
    assert weights and all(w is None for w in weights)  # SDPA returns no attention weights: never eager
    engine.measure_latency = True
    _, stats = engine.generate(_samples()[:1], {"max_new_tokens": 3})
    engine.measure_latency = False
    assert stats[0].latency["prefill_ms"] > 0 and stats[0].latency["compress_ms"] > 0 and stats[0].prefill_tflops > 0
    kwargs = {"max_new_tokens": 5, "temperature": 0.8, "do_sample": True, "top_p": 0.9, "top_k": 20}
    torch.manual_seed(3)
    first = engine.generate(_samples()[:2], kwargs)[0]
    torch.manual_seed(3)
    assert engine.generate(_samples()[:2], kwargs)[0] == first
    assert all(0 <= t < model.config.text_config.vocab_size for row in first for t in row)
    with pytest.raises(ValueError, match="num_beams=2 is not supported"):
        engine.generate(_samples()[:1], {"max_new_tokens": 3, "num_beams": 2})
    assert clean_generation_kwargs({"num_beams": 2})["num_beams"] == 2


def test_exempt_prefix_and_no_image_samples(loaded):
    engine = _engine(loaded, clip_layer=2)
    samples = [_samples()[0], Sample("No picture here, what is a square?", [], [])]
    _, stats = engine.generate(samples, {"max_new_tokens": 3})
    with_image, text_only = [st.details for st in stats]
    prefix = engine.prepare(samples).llm.image_mask[0]
    pad = prefix.shape[0] - with_image.llm_prompt_length
    first_image = int(prefix[pad:].float().argmax())
    assert torch.equal(with_image.llm_kept_positions[:first_image], torch.arange(first_image))  # system prompt untouched
    assert text_only.llm_kept_positions.numel() == text_only.llm_prompt_length  # nothing to prune without an image
    assert stats[1].visual_tokens_in == 0 and stats[1].visual_tokens_kept == 0
    off = _engine(loaded, clip_layer=2, exempt_system_prompt=False)
    det = off.generate(samples[:1], {"max_new_tokens": 1}).stats[0].details
    assert det.llm_kept_positions.numel() <= det.heavy + det.recent


@pytest.mark.slow
def test_through_the_lmms_eval_wrapper(tiny_llava, tmp_path):
    """llava_longtail on the offline smoke task: batch 4 == batch 1, layer-averaged prefill counts."""
    from lmms_eval_runs import read_run, run_lmms_eval

    runs = {}
    for bs in (1, 4):
        out = tmp_path / f"bs{bs}" / "out"
        out.parent.mkdir()
        proc = run_lmms_eval(out, "llava_longtail", f"pretrained={tiny_llava},clip_layer=2,llm_layer=1", batch_size=bs, limit=8)
        runs[bs] = {s["doc_id"]: (s["filtered_resps"], s["token_counts"][0]) for s in read_run(out, proc)["_samples"]["tokprune_smoke"]}
    assert runs[1] == runs[4]
    for _, counts in runs[4].values():
        assert 0 <= counts["visual_tokens_kept"] < counts["visual_tokens_in"]
        assert counts["input_tokens"] == int(counts["llm_prefill_tokens"]) and counts["prefill_tflops"] > 0
    assert any(c["llm_prefill_tokens"] != int(c["llm_prefill_tokens"]) for _, c in runs[4].values())  # layer-averaged
