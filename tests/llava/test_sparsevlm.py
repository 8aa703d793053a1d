"""SparseVLM inside the LLM (methods/sparsevlm.py on the decoder loop of llava/llm_pruning.py) against an oracle:
a plain-torch reading of the released code (Gumpest/SparseVLMs @ 26a5f48, llava/model/language_model/
modelling_sparse_llama.py LlamaDynamicvitModel.forward, score.py attn_postprocess_topk / select_attn_head_by_sum,
utils.py cluster_and_merge) on a random 32-layer Llama with the release's hard-coded layers 2 / 6 / 15.

The oracle runs an eager copy of the same weights and materialises full attention maps, as the release does; the
method under test runs the SDPA copy and computes rater rows only."""

from __future__ import annotations

import math
from functools import cache
from typing import NamedTuple

import pytest
import torch
from transformers import LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lmms_tokprune.llava.llm_pruning import prune_prefill

PREFIX, N, QUESTION = 35, 576, 30  # vicuna_v1 system prefix, 24 x 24 patches, question + " ASSISTANT:"
LAYERS = (2, 6, 15)  # LlamaDynamicvitModel(pruning_loc=[2, 6, 15])
LISTS = {  # score.py sparse_token_list_* (USE_VERSION unset = v1.5 path, "2_0" = v2.0)
    "1.5": {192: [300, 200, 110], 128: [303, 110, 36], 96: [238, 48, 26], 64: [66, 30, 17]},
    "2.0": {192: [300, 200, 118], 128: [238, 108, 60], 96: [246, 54, 28], 64: [66, 34, 20]},
}
EQUIVALENT = {  # PEERS.md "Budget": input-counted equivalents at N = 576, L = 32
    "1.5": {192: 206.5, 128: 145.4, 96: 114.1, 64: 82.25},
    "2.0": {192: 206.75, 128: 144.1, 96: 113.9, 64: 81.8},
}
RETAINS = (192, 128, 96, 64)


# ------------------------------------------------------------------------------------------------ model, inputs
@cache
def _models():
    """One random 32-layer Llama (16 heads of 8: v2.0 keeps 14 of them), loaded as SDPA and as eager."""
    def config(impl: str) -> LlamaConfig:
        c = LlamaConfig(vocab_size=32, hidden_size=128, intermediate_size=96, num_hidden_layers=32, num_attention_heads=16,
                        num_key_value_heads=16, max_position_embeddings=1024, initializer_range=0.1, rms_norm_eps=1e-6)
        c._attn_implementation = impl
        return c

    torch.manual_seed(0)
    weights = LlamaModel(config("sdpa")).state_dict()
    out = {}
    for impl in ("sdpa", "eager"):
        out[impl] = LlamaModel(config(impl)).eval()
        out[impl].load_state_dict(weights)
        assert out[impl].config._attn_implementation == impl
    return out["sdpa"], out["eager"]


def _embeds(question: int = QUESTION, seed: int = 0) -> torch.Tensor:
    """[1, T, 128]: system prefix, N image tokens, the question. Per-token scales make raw and normed raters differ."""
    g = torch.Generator().manual_seed(seed)
    t = PREFIX + N + question
    return 0.3 * torch.randn(1, t, 128, generator=g) * (0.5 + torch.rand(1, t, 1, generator=g))


def _image_mask(t: int) -> torch.Tensor:
    mask = torch.zeros(1, t, dtype=torch.bool)
    mask[0, PREFIX:PREFIX + N] = True
    return mask


def _run(embeds: torch.Tensor, variant: str = "reference", **params):
    sdpa, _ = _models()
    t = embeds.shape[1]
    return prune_prefill("sparsevlm", sdpa, embeds, torch.ones(1, t, dtype=torch.long), _image_mask(t), variant=variant, **params)


# ------------------------------------------------------------------------------------------------ the oracle
class Oracle(NamedTuple):
    lengths: list[int]  # tokens each decoder layer computed on
    kept: list[torch.Tensor]  # original positions after each stage, sequence order, -1 = recycled
    last: torch.Tensor  # final-norm hidden state of the last prompt token
    raters: torch.Tensor  # rater offsets into the text after the image


def _eager_layer(layer, h: torch.Tensor, pos: torch.Tensor, rotary) -> tuple:
    """One decoder layer, eager, causal, batch 1 -> (output, full softmax map [1, H, T, T])."""
    t = h.shape[1]
    causal = torch.full((t, t), float("-inf")).triu(1)[None, None]
    attn, probs = layer.self_attn(layer.input_layernorm(h), position_embeddings=rotary(h, pos), attention_mask=causal)
    h = h + attn
    return h + layer.mlp(layer.post_attention_layernorm(h)), probs


def _rope_logits(rotary, h: torch.Tensor, pos: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """v2.0's "gravity correction" divisor: the logits all-ones q and k get after rotary at the current positions."""
    ones = h.new_ones(1, heads, h.shape[1], head_dim)
    cos, sin = rotary(h, pos)
    q, k = apply_rotary_pos_emb(ones, ones, cos, sin)
    return q @ k.transpose(2, 3) / math.sqrt(head_dim)


def dpc_knn(x: torch.Tensor, clusters: int, noise: torch.Tensor | None) -> tuple:
    """utils.cluster_and_merge on candidates x [n, C] -> (merged [clusters, C] in centre order, centre indices)."""
    _n, c = x.shape
    dist = (x[:, None, :] - x[None, :, :]).norm(dim=-1) / c**0.5
    density = (-(torch.topk(dist, k=clusters, dim=-1, largest=False).values ** 2).mean(dim=-1)).exp()
    if noise is not None:
        density = density + noise * 1e-6
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    delta = torch.where(denser, dist, torch.inf).min(dim=-1).values  # distance to the nearest denser candidate
    delta = torch.where(denser.any(dim=-1), delta, dist.max())  # the densest: the farthest distance overall
    centres = torch.topk(delta * density, k=clusters).indices
    owner = dist[centres].argmin(dim=0)  # nearest centre, first on ties
    owner[centres] = torch.arange(clusters)
    merged = torch.zeros(clusters, c)
    for k in range(clusters):
        members = x[owner == k]
        merged[k] = (members / (members.shape[0] + 1e-6)).sum(dim=0)
    return merged, centres


def seeded_noise(n: int, seed: int = 0) -> torch.Tensor:
    """PEERS.md: torch.rand of the density's shape [1, n] right after torch.manual_seed(0) (global RNG left as found)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.rand(1, n)[0]


def oracle(embeds: torch.Tensor, version: str = "1.5", retain: int = 192, raters_from: str = "raw", seed: int | None = 0,
           renumber: bool = True, divide: bool = True, heads: int | None = 14, all_rate: bool = False) -> Oracle:
    """LlamaDynamicvitModel.forward at batch 1, prefill only. The keywords undo one quirk each (tests below):
    raters_from="normed"; seed=None (no noise) or another seed; renumber=False (v1.5); divide=False, heads=None (v2.0).
    all_rate=True is fixed's guard (every text token rates when none exceeds the mean)."""
    _, model = _models()
    rotary, lists = model.rotary_emb, LISTS[version][retain]
    h = embeds
    t = h.shape[1]
    pos = torch.arange(t)[None]
    orig = torch.arange(t)
    v_start, v_num = PREFIX, N
    text_start = v_start + v_num
    with torch.no_grad():
        # raters, once, from the raw input embeddings: softmax over the text of V T^T, mean over the image rows
        src = h if raters_from == "raw" else model.layers[0].input_layernorm(h)
        rel = torch.softmax(src[0, v_start:text_start] @ src[0, text_start:].T, dim=-1).mean(dim=0)
        raters = torch.nonzero(rel > rel.mean()).flatten()
        if all_rate and raters.numel() == 0:
            raters = torch.arange(rel.numel())
        lengths, kept = [], []
        for idx, layer in enumerate(model.layers):
            lengths.append(h.shape[1])
            out, probs = _eager_layer(layer, h, pos, rotary)
            if idx not in LAYERS:
                h = out
                continue
            stage = LAYERS.index(idx)
            rows = raters + text_start
            maps = probs[0]  # [H, T, T]
            if version == "2.0":
                if divide:
                    maps = maps / _rope_logits(rotary, h, pos, maps.shape[0], model.config.head_dim)[0]
                if heads is not None:
                    mass = maps[:, rows, v_start:text_start].sum(dim=(1, 2))
                    maps = maps[mass.topk(heads).indices]
            score = maps.mean(dim=0)[rows, v_start:text_start].mean(dim=0)  # heads, then raters -> [v_num]
            chosen = torch.zeros(v_num, dtype=torch.bool)
            chosen[torch.topk(score, min(lists[stage], v_num - 1)).indices] = True
            visual = torch.arange(v_start, text_start)
            head, tail = torch.arange(v_start), torch.arange(text_start, h.shape[1])
            merged, centres, cand = out.new_zeros(0, out.shape[-1]), torch.zeros(0, dtype=torch.long), None
            if version == "1.5":  # recycle: top 30% + 1 of the pruned, clustered into a tenth + 1
                pruned = torch.nonzero(~chosen).flatten()
                cand = pruned[torch.topk(score[pruned], int(pruned.numel() * 0.3) + 1).indices]
                u = None if seed is None else seeded_noise(cand.numel(), seed)
                merged, centres = dpc_knn(out[0, visual[cand]], int(cand.numel() / 10) + 1, u)
            slots = torch.cat([head, visual[chosen], tail])
            cut = v_start + int(chosen.sum())  # recycled tokens go right after the kept visual tokens
            h = torch.cat([out[0, slots[:cut]], merged, out[0, slots[cut:]]])[None]
            orig = torch.cat([orig[slots[:cut]], torch.full((merged.shape[0],), -1), orig[slots[cut:]]])
            if version == "2.0":
                pos = pos[:, slots]  # "Keep Position ID"
            elif renumber:
                pos = torch.arange(h.shape[1])[None]  # position_ids[:, :new_length]
            else:  # undone: kept tokens keep theirs, a recycled token takes its centre's
                old = pos[0]
                pos = torch.cat([old[slots[:cut]], old[visual[cand[centres]]], old[slots[cut:]]])[None]
            kept.append(orig.clone())
            v_num = int(chosen.sum()) + merged.shape[0]
            text_start = v_start + v_num
        last = model.norm(h[0, -1])
    return Oracle(lengths, kept, last, raters)


@cache
def _oracle(version: str, retain: int, **undo) -> Oracle:
    return oracle(_embeds(), version, retain, **undo)


def _same(a: Oracle, b: Oracle) -> bool:
    kept = all(torch.equal(x, y) for x, y in zip(a.kept, b.kept))
    return a.lengths == b.lengths and kept and torch.allclose(a.last, b.last, atol=1e-5)


def _assert_matches(res, row: int, ref: Oracle) -> None:
    assert res.layer_lengths[row] == ref.lengths
    assert len(res.kept_positions[row]) == len(ref.kept) == len(LAYERS)
    for got, want in zip(res.kept_positions[row], ref.kept):
        assert torch.equal(got, want)
    torch.testing.assert_close(res.last_hidden[row], ref.last, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ reference = release
@pytest.mark.parametrize("version", ["1.5", "2.0"])
@pytest.mark.parametrize("retain", RETAINS)
def test_reference_equals_the_release_at_batch_1(version, retain):
    """Kept positions per stage and layer lengths exactly, the last hidden state to ~1e-5, the equivalent as listed."""
    res = _run(_embeds(), version=version, retain=retain)
    ref = _oracle(version, retain)
    assert 0 < ref.raters.numel() < QUESTION  # a proper rater subset: the selection matters
    _assert_matches(res, 0, ref)
    assert res.visual_tokens_equivalent[0] == pytest.approx(EQUIVALENT[version][retain], abs=0.05)
    if version == "1.5":  # kept + c recycled per stage, the new ones right after the kept visual tokens
        v, visual = N, []
        for stage, kept in enumerate(ref.kept):
            k = min(LISTS[version][retain][stage], v - 1)
            c = int((int(0.3 * (v - k)) + 1) / 10) + 1
            assert bool((kept[PREFIX + k:PREFIX + k + c] == -1).all()) and int(kept[PREFIX + k + c]) >= PREFIX + N
            v = k + c
            visual.append(v)
    else:
        assert all(int((kept < 0).sum()) == 0 for kept in ref.kept)
    if (version, retain) == ("1.5", 192):  # PEERS.md's cache lengths for a 30-token question
        assert res.layer_lengths[0] == [641] * 3 + [374] * 4 + [269] * 9 + [178] * 16
        assert visual == [309, 204, 113]


def test_reference_batch_2_raises():
    """The release reads row-0 masks and crashes at B = 2."""
    sdpa, _ = _models()
    e = _embeds().repeat(2, 1, 1)
    with pytest.raises(ValueError, match="batch"):
        prune_prefill("sparsevlm", sdpa, e, torch.ones(2, e.shape[1], dtype=torch.long), _image_mask(e.shape[1]).repeat(2, 1))


def test_reference_without_raters_still_prunes():
    """One text token after the image: m = [1.0] and nothing exceeds its mean, so t_token_idx is empty. The release
    goes on: the rater mean over no rows is NaN, topk still keeps min(list, v - 1) and recycling still runs, so the
    layer lengths fall as usual (which tokens NaN ranking keeps is backend-defined: lengths only)."""
    e = _embeds(question=1)
    for version in ("1.5", "2.0"):
        ref = oracle(e, version, 192)
        assert ref.raters.numel() == 0 and ref.lengths[3] < ref.lengths[0]
        assert _run(e, version=version).layer_lengths[0] == ref.lengths


# ------------------------------------------------------------------------------------------------ quirks
def test_raters_come_from_the_raw_embeddings():
    """Raters from inputs_embeds before any norm; the first layer's input norm would pick others and keep others."""
    raw, normed = _oracle("1.5", 192), _oracle("1.5", 192, raters_from="normed")
    assert not torch.equal(raw.raters, normed.raters)
    assert not _same(raw, normed) and not torch.equal(raw.kept[0], normed.kept[0])


def test_recycling_noise_decides_density_ties():
    """DPC-kNN at c = 2: the densest candidate pair are mutual nearest neighbours with bitwise equal densities, so
    without noise both are centres; the seeded draw makes the one with the larger u the first centre. At c = 1 the
    merged token is the mean of all candidates whatever the noise. The method's merge equals the oracle's."""
    from lmms_tokprune.methods.sparsevlm import dpc_knn_merge
    from lmms_tokprune.methods.sparsevlm import seeded_noise as method_noise

    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(3))
    u = seeded_noise(16)
    assert torch.equal(method_noise(16), u)
    dist = (x[:, None] - x[None]).norm(dim=-1) + torch.eye(16) * 1e9
    pair = [int(i) for i in torch.nonzero(dist == dist.min()).flatten()[:2]]
    _, tied = dpc_knn(x, 2, None)
    assert sorted(tied.tolist()) == sorted(pair)
    merged, centres = dpc_knn(x, 2, u)
    assert int(centres[0]) == max(pair, key=lambda i: float(u[i])) and int(centres[1]) not in pair
    torch.testing.assert_close(dpc_knn_merge(x, 2, u), merged, atol=1e-6, rtol=1e-6)
    one, _ = dpc_knn(x, 1, u)
    torch.testing.assert_close(one, dpc_knn(x, 1, None)[0])
    torch.testing.assert_close(one[0], x.sum(dim=0) / (16 + 1e-6))
    # end to end: retain 64 recycles with c = 16, 2, 1; another draw, or none, changes the result
    seeded = _oracle("1.5", 64)
    assert not _same(seeded, _oracle("1.5", 64, seed=None)) and not _same(seeded, _oracle("1.5", 64, seed=1))


def test_v15_renumbers_positions():
    """v1.5 truncates position_ids to the new length (0..T'-1); keeping the original positions changes the result."""
    renumbered, original = _oracle("1.5", 192), _oracle("1.5", 192, renumber=False)
    assert not _same(renumbered, original) and not torch.equal(renumbered.kept[1], original.kept[1])


@pytest.mark.parametrize("undo", [{"divide": False}, {"heads": None}], ids=["no_rope_division", "all_heads"])
def test_v20_rope_division_and_14_heads(undo):
    """v2.0 divides the map by the all-ones rotary logits, then averages the 14 heads of largest rater-to-visual
    mass (of 16 here); undoing either keeps other tokens."""
    released, undone = _oracle("2.0", 192), _oracle("2.0", 192, **undo)
    assert not torch.equal(released.kept[0], undone.kept[0])


def test_v20_divisor_in_half_precision():
    """The release's divisor in fp16 (its eval dtype): rotary cos / sin from fp32 angles (4.37's cos_cached), cast to
    fp16, all-ones q . k / sqrt(d). The method's w must match it to fp16 rounding at LLaVA-1.5's shapes."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from lmms_tokprune.methods.sparsevlm import rope_weight

    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=4096))
    h = torch.zeros(1, 641, 8, dtype=torch.float16)
    ones = torch.ones(1, 1, 641, 128, dtype=torch.float16)
    q, k = apply_rotary_pos_emb(ones, ones, *rotary(h, torch.arange(641)[None]))
    released = ((q.float() @ k.float().transpose(2, 3)).half() / math.sqrt(128))[0, 0, 611:, 35:611]
    w = rope_weight(torch.arange(611, 641), torch.arange(35, 611), rotary.inv_freq, 128, torch.float16)
    torch.testing.assert_close(w.float(), released.float(), atol=2e-2, rtol=0)


# ------------------------------------------------------------------------------------------------ fixed, budget, SDPA
@pytest.mark.parametrize("version", ["1.5", "2.0"])
def test_fixed_batch_equals_batch_1(version):
    """Left padding and different question lengths: every row as if it ran alone (its own raters, spans, noise)."""
    sdpa, _ = _models()
    rows = [_embeds(QUESTION, seed=0)[0], _embeds(22, seed=1)[0]]
    width = max(r.shape[0] for r in rows)
    e = torch.randn(2, width, 128)  # padding slots hold junk
    mask = torch.zeros(2, width, dtype=torch.long)
    image = torch.zeros(2, width, dtype=torch.bool)
    for b, r in enumerate(rows):
        pad = width - r.shape[0]
        e[b, pad:], mask[b, pad:] = r, 1
        image[b, pad + PREFIX:pad + PREFIX + N] = True
    both = prune_prefill("sparsevlm", sdpa, e, mask, image, variant="fixed", version=version, retain=128)
    for b, r in enumerate(rows):
        alone = _run(r[None], "fixed", version=version, retain=128)
        assert both.layer_lengths[b] == alone.layer_lengths[0]
        assert all(torch.equal(x, y) for x, y in zip(both.kept_positions[b], alone.kept_positions[0]))
        torch.testing.assert_close(both.last_hidden[b], alone.last_hidden[0], atol=1e-5, rtol=1e-5)


def test_fixed_every_text_token_rates_when_none_exceeds_the_mean():
    """fixed: with no rater above the mean, all text tokens rate (here the single one) and the cuts proceed."""
    e = _embeds(question=1)
    for version in ("1.5", "2.0"):
        ref = oracle(e, version, 192, all_rate=True)
        assert ref.raters.tolist() == [0]
        _assert_matches(_run(e, "fixed", version=version), 0, ref)


def test_budget_picks_the_nearest_retain_list():
    """budget = n equivalent visual tokens (input counting) -> the retain list of nearest equivalent."""
    from lmms_tokprune.methods import bind
    from lmms_tokprune.methods.llm_stages import LLMContext

    for version in ("1.5", "2.0"):
        for budget, retain in ((192, 192), (128, 96), (64, 64)):
            notes = bind("sparsevlm", "reference", version=version, budget=budget).llm_plan(LLMContext(32, N)).notes
            assert notes["retain"] == retain
            assert notes["visual_tokens_equivalent"] == pytest.approx(EQUIVALENT[version][retain], abs=0.05)
    res = _run(_embeds(), version="1.5", budget=128)
    assert res.plan.notes["retain"] == 96
    assert res.visual_tokens_equivalent[0] == pytest.approx(res.plan.notes["visual_tokens_equivalent"])
    assert res.visual_tokens_equivalent[0] == pytest.approx(114.1, abs=0.05)
    assert res.layer_lengths == _run(_embeds(), version="1.5", retain=96).layer_lengths
    with pytest.raises(ValueError):
        _run(_embeds(), version="1.5", budget=128, retain=96)


def test_no_layer_runs_eager_attention():
    """Every layer keeps SDPA (no attention weights come out of self_attn); the rater rows are computed aside."""
    sdpa, _ = _models()
    seen = []
    hooks = [layer.self_attn.register_forward_hook(lambda m, args, out: seen.append(out[1])) for layer in sdpa.layers]
    try:
        res = _run(_embeds(), version="1.5", retain=192)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == len(sdpa.layers) == 32 and all(w is None for w in seen)
    assert res.layer_lengths[0][-1] == 178
