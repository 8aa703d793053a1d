"""FastV, PyramidDrop and DART inside the LLM (methods/{fastv,pdrop,dart}.py on llava/llm_pruning.py's loop) against
plain-torch oracles of their released prefill loops (PEERS.md, Sources):

* FastV: pkunlp-icler/FastV @ d165972, src/transformers/src/transformers/models/llama/modeling_llama.py
  (LlamaModel.forward, the fast_v_inplace branch) and src/FastV/lmms-eval/fastv_kvcache.py;
* PDrop: Cooperx521/PyramidDrop @ 6444f30, llava/model/modeling_llama_pdrop.py (pdrop_forward, pdrop_rank_drop), with
  the eval scripts' `image_token_ratio_list.insert(0, 1.0)`;
* DART: xqy1111111/DART @ 5a19452, llava/model/language_model/modeling_llama_self.py (DART.forward,
  get_retained_image_token).

The oracles run an EAGER copy of one random 32-layer Llama layer by layer the way those loops do (full attention maps,
explicit position ids, Python sets); prune_prefill runs the SDPA copy of the same weights and must agree with them
exactly on what it keeps and to ~1e-5 on the final hidden state. N = 576 image tokens after a 35-token prefix, as in
LLaVA-1.5."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaModel

from lmms_tokprune.llava.llm_pruning import prune_prefill

L, N, D, SYS = 32, 576, 64, 35  # layers, image tokens, width, LLaVA-1.5's prefix before the image


def _llama(path, kv_heads: int):
    """(sdpa, eager): one random Llama saved once and loaded twice. q/k weights x8: peaked attention, clear rank gaps."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=D, intermediate_size=128, num_attention_heads=4, num_key_value_heads=kv_heads,
                         num_hidden_layers=L, vocab_size=8, max_position_embeddings=1024)
    model = LlamaModel(config)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    model.save_pretrained(path)
    return tuple(LlamaModel.from_pretrained(path, attn_implementation=impl).eval() for impl in ("sdpa", "eager"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """4 query heads = 4 KV heads, as Vicuna-7B (PDrop's release multiplies q by k per head: it has no GQA)."""
    return _llama(tmp_path_factory.mktemp("llama-mha"), 4)


@pytest.fixture(scope="module")
def llama_gqa(tmp_path_factory):
    return _llama(tmp_path_factory.mktemp("llama-gqa"), 2)


def _rows(*layouts, seed=0):
    """A left-padded batch, one row per (prefix, question) layout: prefix tokens, N image tokens, question tokens,
    random embeddings. Returns inputs_embeds [B, T, D], attention_mask [B, T], image_mask [B, T]."""
    g = torch.Generator().manual_seed(seed)
    lengths = [p + N + q for p, q in layouts]
    t = max(lengths)
    x = torch.zeros(len(layouts), t, D)
    mask = torch.zeros(len(layouts), t, dtype=torch.long)
    image = torch.zeros(len(layouts), t, dtype=torch.bool)
    for b, ((p, _), n) in enumerate(zip(layouts, lengths)):
        pad = t - n
        x[b, pad:] = torch.randn(n, D, generator=g)
        mask[b, pad:] = 1
        image[b, pad + p: pad + p + N] = True
    return x, mask, image


def _row(inputs, b):
    """Row b of a batch alone, padding removed."""
    x, mask, image = inputs
    valid = mask[b].bool()
    return x[b:b + 1, valid], mask[b:b + 1, valid], image[b:b + 1, valid]


def _prefill(method, sdpa, inputs, **params):
    """prune_prefill with a hook on every self_attn: SDPA returns no attention weights, so all of them must be None
    (an eager layer inside the loop would return its map)."""
    weights = []
    hooks = [layer.self_attn.register_forward_hook(lambda mod, args, out: weights.append(out[1])) for layer in sdpa.layers]
    try:
        res = prune_prefill(method, sdpa, *inputs, **params)
    finally:
        for h in hooks:
            h.remove()
    assert len(weights) == L and all(w is None for w in weights)
    return res


# ------------------------------------------------------------------------------------------------ oracles
@dataclass
class Released:
    layer_lengths: list[list[int]]  # per row, per layer
    kept: list[list[list[int]]]  # per row, per cut: original prompt positions in sequence order
    last_hidden: torch.Tensor  # [B, D] final norm at the last prompt token
    visit: list[int] = field(default_factory=list)  # DART: the order its pivots were visited


def _image_start(image, b=0):
    return int(torch.nonzero(image[b])[0])


def _eager_layer(model, i, h, pos, cache=None):
    """Eager decoder layer i on unpadded rows h [B, T, D] at rotary positions pos [B, T] with the causal additive mask
    the released loops pass; returns its output and the attention map it computed [B, H, T, T] (softmax in fp32, cast
    to the model dtype)."""
    maps = []
    hook = model.layers[i].self_attn.register_forward_hook(lambda mod, args, out: maps.append(out[1]))
    t = h.shape[1]
    causal = torch.full((t, t), torch.finfo(h.dtype).min).triu(1)[None, None]
    try:
        out = model.layers[i](h, attention_mask=causal, position_ids=pos, past_key_values=cache, use_cache=cache is not None,
                              position_embeddings=model.rotary_emb(h, pos))
    finally:
        hook.remove()
    return out, maps[0]


def _gather_rows(h, index):
    return torch.stack([h[b, index[b]] for b in range(h.shape[0])])


@torch.no_grad()
def fastv_release(model, x, image, k=2, rank=288, own_layer=False, per_row=False):
    """FastV's prefill: at the boundary before layer k, the map layer k-1 returned (`layer_outputs[1]` of the previous
    iteration), head mean, sample 0 (`[0]`), last row (`[-1]`), image columns [SYS_LENGTH, SYS_LENGTH + 576), topk(rank);
    keep = prefix + top + text, sorted; every row gathers those slots (`hidden_states[:, keep]`); position_ids = keep:
    the original positions, gaps and all. own_layer (layer k's own map) and per_row (each row its own map, its own
    offsets) undo the two quirks."""
    bsz, t, _ = x.shape
    pos = torch.arange(t).repeat(bsz, 1)
    h, lengths, kept, prev = x, [], None, None
    for i in range(L):
        if i == k:
            attn = _eager_layer(model, k, h, pos)[1] if own_layer else prev
            avg = attn.mean(dim=1)
            keep = []
            for b in (range(bsz) if per_row else [0] * bsz):
                start = _image_start(image, b)
                top = avg[b][-1][start:start + N].topk(rank).indices + start
                keep.append(torch.cat([torch.arange(start), top, torch.arange(start + N, t)]).sort().values)
            kept = torch.stack(keep)
            h, pos = _gather_rows(h, kept), kept
        lengths.append(h.shape[1])
        h, prev = _eager_layer(model, i, h, pos)
    return Released([lengths] * bsz, [[kept[b].tolist()] for b in range(bsz)], model.norm(h[:, -1]))


@torch.no_grad()
def pdrop_release(model, x, image, layer_list=(8, 16, 24), image_token_ratio_list=(0.5, 0.25, 0.125), from_sequence=False,
                  renumber=True):
    """PDrop's prefill: after layer l-1 runs, if l is in layer_list (stage s), layer l's OWN input norm and q/k on the
    current tokens at the current positions give the last prompt token's row (prompt_len + image_tokens - 1), fp32
    softmax over the causal keys, head mean, columns [image_index, image_index + image_tokens); topk(keep_length),
    sorted; the row becomes prefix + top + rest. image_tokens = int(N * r_s) and keep_length = int(N * r_{s+1}) with
    r_0 = 1.0: counts from the ratios. Positions are renumbered 0..T'-1 per row. Rows are ranked one by one (no
    padding). from_sequence (keep int(current * r_{s+1} / r_s) of the current span) and renumber=False (original
    positions kept) undo the quirks."""
    ratios = [1.0, *image_token_ratio_list]
    bsz, t, _ = x.shape
    starts = [_image_start(image, b) for b in range(bsz)]
    prompt_len = [t - N] * bsz  # text tokens: the prompt's input ids minus the image placeholder
    pos = torch.arange(t).repeat(bsz, 1)
    h, orig, count = x, pos.clone(), [N] * bsz
    lengths, kept = [], [[] for _ in range(bsz)]
    for i in range(L):
        if i in layer_list:
            s = list(layer_list).index(i)
            attn = _eager_layer(model, i, h, pos)[1]
            index = []
            for b in range(bsz):
                cur, keep_n = int(N * ratios[s]), int(N * ratios[s + 1])
                if from_sequence:
                    cur, keep_n = count[b], int(count[b] * ratios[s + 1] / ratios[s])
                score = attn[b].mean(dim=0)[prompt_len[b] + cur - 1][starts[b]:starts[b] + cur]
                top = score.topk(keep_n).indices.sort().values + starts[b]
                index.append(torch.cat([torch.arange(starts[b]), top, torch.arange(starts[b] + cur, h.shape[1])]))
                count[b] = keep_n
            index = torch.stack(index)
            h, orig = _gather_rows(h, index), torch.gather(orig, 1, index)
            pos = torch.arange(h.shape[1]).repeat(bsz, 1) if renumber else orig
            for b in range(bsz):
                kept[b].append(orig[b].tolist())
        lengths.append(h.shape[1])
        h = _eager_layer(model, i, h, pos)[0]
    return Released([lengths] * bsz, kept, model.norm(h[:, -1]))


def _dart_retained(keys, feats, start, max_num_trunction, pivot_image_token, pivot_text_token, visit, least):
    """get_retained_image_token in plain Python: L1-norm pivots from the keys, then each pivot (visited in the order of
    `list(set(...))` of their positions) takes the TOKEN_TOPK pool tokens of lowest cosine to it; a Python set keeps the
    picks, the text pivots are removed at the end."""
    per_pivot = math.ceil(max_num_trunction // (pivot_image_token + pivot_text_token))
    image_pivots = (keys[start:start + N].norm(p=1, dim=-1).topk(pivot_image_token).indices + start).tolist()
    text_pivots = (keys[start + N:].norm(p=1, dim=-1).topk(pivot_text_token).indices + start + N).tolist()
    selected = set(image_pivots + text_pivots)
    pool = set(range(start, start + N)) - set(image_pivots)
    order = list(selected) if visit == "set" else sorted(selected)
    for pivot in order:
        candidates = list(pool)
        cos = F.cosine_similarity(feats[pivot], feats[candidates], dim=-1)
        picks = [candidates[j] for j in (-cos if least else cos).topk(per_pivot).indices.tolist()]
        selected.update(picks)
        pool.difference_update(picks)
    selected.difference_update(text_pivots)
    return list(selected), order


@torch.no_grad()
def dart_release(model, x, image, k=2, max_num_trunction=128, pivot_image_token=4, pivot_text_token=4, visit="set",
                 least=True):
    """DART's prefill (it asserts batch 1): at the boundary before layer k, features = model.norm(layer k-1's output),
    keys = layer k-1's post-rotary key_states as its attention returns them (after repeat_kv), heads concatenated;
    keep = prefix + retained image tokens + text, sorted; position_ids = keep (original positions). visit="sorted"
    and least=False undo the quirks."""
    assert x.shape[0] == 1
    t = x.shape[1]
    start = _image_start(image)
    cache = DynamicCache(config=model.config)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    pos, h, lengths, kept, order = torch.arange(t)[None], x, [], None, []
    for i in range(L):
        if i == k:
            feats = model.norm(h)[0]
            keys = cache.layers[k - 1].keys.repeat_interleave(groups, dim=1)
            keys = keys.permute(0, 2, 1, 3).reshape(1, t, -1)[0]
            retained, order = _dart_retained(keys, feats, start, max_num_trunction, pivot_image_token, pivot_text_token, visit, least)
            keep = torch.cat([torch.arange(start), torch.tensor(retained, dtype=torch.long), torch.arange(start + N, t)]).sort().values
            h, pos, kept = h[:, keep], keep[None], keep.tolist()
        lengths.append(h.shape[1])
        h = _eager_layer(model, i, h, pos, cache)[0]
    return Released([lengths], [[kept]], model.norm(h[:, -1]), order)


ORACLES = {"fastv": fastv_release, "pdrop": pdrop_release, "dart": dart_release}


@pytest.fixture(scope="module")
def released(llama):
    """The oracles on the eager copy, memoised: several tests compare against the same run."""
    memo = {}

    def run(method, layouts, **params):
        key = (method, layouts, tuple(sorted(params.items())))
        if key not in memo:
            x, _, image = _rows(*layouts)
            memo[key] = ORACLES[method](llama[1], x, image, **params)
        return memo[key]

    return run


def _kept(res):
    return [[p.tolist() for p in stages] for stages in res.kept_positions]


def _assert_release(res, rel):
    assert res.layer_lengths == rel.layer_lengths
    assert _kept(res) == rel.kept
    torch.testing.assert_close(res.last_hidden, rel.last_hidden, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ reference = release
@pytest.mark.parametrize("question, params", [(5, {}), (23, {"k": 3, "rank": 72}), (48, {"rank": 144})])
def test_fastv_reference_equals_the_release(llama, released, question, params):
    layouts = ((SYS, question),)
    res = _prefill("fastv", llama[0], _rows(*layouts), **params)
    rel = released("fastv", layouts, **params)
    _assert_release(res, rel)
    k, rank = params.get("k", 2), params.get("rank", 288)
    assert rel.layer_lengths[0] == [SYS + N + question] * k + [SYS + rank + question] * (L - k)


@pytest.mark.parametrize("question, params", [(5, {}), (23, {"layer_list": (2, 6, 12)}),
                                              (48, {"image_token_ratio_list": (0.3, 0.2, 0.05)})])
def test_pdrop_reference_equals_the_release(llama, released, question, params):
    layouts = ((SYS, question),)
    res = _prefill("pdrop", llama[0], _rows(*layouts), **params)
    _assert_release(res, released("pdrop", layouts, **params))


@pytest.mark.parametrize("question, params", [(5, {}), (23, {"k": 3, "max_num_trunction": 64}),
                                              (48, {"max_num_trunction": 256, "pivot_text_token": 6})])
def test_dart_reference_equals_the_release(llama, released, question, params):
    layouts = ((SYS, question),)
    res = _prefill("dart", llama[0], _rows(*layouts), **params)
    _assert_release(res, released("dart", layouts, **params))


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_reference_equals_the_release_with_grouped_kv_heads(llama_gqa, method):
    """2 KV heads for 4 query heads: FastV's eager map and DART's key_states repeat the KV heads (PDrop's release
    cannot run GQA: its per-head matmul of 4 query heads with 2 key heads does not broadcast)."""
    inputs = _rows((SYS, 17))
    _assert_release(_prefill(method, llama_gqa[0], inputs), ORACLES[method](llama_gqa[1], inputs[0], inputs[2]))


def test_fastv_batch_applies_sample_0s_choice(llama, released):
    """Rows of one layout (no padding, same image span): the release ranks sample 0's map and gathers its slots in
    every row."""
    layouts = ((SYS, 23),) * 3
    res = _prefill("fastv", llama[0], _rows(*layouts))
    rel = released("fastv", layouts)
    _assert_release(res, rel)
    assert rel.kept[0] == rel.kept[1] == rel.kept[2]


def test_pdrop_batch_ranks_each_row(llama, released):
    """Unpadded rows (equal lengths, images at different offsets): the release ranks and drops row by row."""
    layouts = ((SYS, 23), (SYS - 6, 29), (SYS + 9, 14))
    res = _prefill("pdrop", llama[0], _rows(*layouts))
    rel = released("pdrop", layouts)
    _assert_release(res, rel)
    assert rel.kept[0] != rel.kept[1]


def test_reference_raises_where_the_release_crashes(llama):
    sdpa = llama[0]
    padded = _rows((SYS, 5), (SYS, 23))
    shifted = _rows((SYS, 23), (SYS + 4, 19))  # equal lengths, the image elsewhere in row 1
    for inputs in (padded, shifted):
        with pytest.raises(ValueError, match="sample 0's image offsets"):
            prune_prefill("fastv", sdpa, *inputs)
    with pytest.raises(ValueError, match="crashes on padded rows"):
        prune_prefill("pdrop", sdpa, *padded)
    with pytest.raises(ValueError, match="asserts batch size 1"):
        prune_prefill("dart", sdpa, *_rows((SYS, 23), (SYS, 23)))
    with pytest.raises(ValueError, match="only 3 text tokens"):  # topk(4) of the 3 key norms after the image
        prune_prefill("dart", sdpa, *_rows((SYS, 3)))
    with pytest.raises(ValueError, match="rank=577"):  # topk(577) of 576
        prune_prefill("fastv", sdpa, *_rows((SYS, 5)), rank=577)


def test_pdrop_reference_raises_on_increasing_ratios(llama):
    """Stage 2 of (0.5, 0.6, 0.125) asks for int(576 * 0.6) = 345 of the 288 image tokens left: the release's topk
    crashes (the oracle shows it), so reference must not run."""
    inputs = _rows((SYS, 5))
    with pytest.raises(RuntimeError):
        pdrop_release(llama[1], inputs[0], inputs[2], image_token_ratio_list=(0.5, 0.6, 0.125))
    with pytest.raises(ValueError):
        prune_prefill("pdrop", llama[0], *inputs, image_token_ratio_list=(0.5, 0.6, 0.125))


def test_dart_reference_raises_when_the_pool_runs_out(llama):
    """max_num_trunction=576: TOKEN_TOPK = 72 picks for each of 8 pivots from a pool of 572; the 8th pivot's topk(72)
    of 68 crashes in the release (the oracle shows it), so reference must not run."""
    inputs = _rows((SYS, 5))
    with pytest.raises(RuntimeError):
        dart_release(llama[1], inputs[0], inputs[2], max_num_trunction=576)
    with pytest.raises(ValueError):
        prune_prefill("dart", llama[0], *inputs, max_num_trunction=576)


# ------------------------------------------------------------------------------------------------ the quirks matter
def test_fastv_quirks_change_the_result(llama, released):
    """Layer k's own map instead of layer k-1's, or each row ranking its own map, keeps other tokens here: the equality
    tests above would catch an implementation without the quirks."""
    one = ((SYS, 23),)
    assert released("fastv", one, own_layer=True).kept != released("fastv", one).kept
    three = ((SYS, 23),) * 3
    shared, own = released("fastv", three), released("fastv", three, per_row=True)
    assert own.kept[0] == shared.kept[0] and own.kept[1] != shared.kept[1] and own.kept[2] != shared.kept[2]


def test_pdrop_quirks_change_the_result(llama, released):
    """budget=200 -> λ 0.286: counts 164 / 47 / 13 from the ratios (int(576 * 0.286²) = 47) but 164 / 46 / 13 from the
    current span (int(164 * 0.286) = 46); keeping original positions instead of renumbering changes the later choices
    and the final state."""
    layouts = ((SYS, 23),)
    ratios = tuple(0.286 ** (s + 1) for s in range(3))
    res = _prefill("pdrop", llama[0], _rows(*layouts), budget=200)
    rel = released("pdrop", layouts, image_token_ratio_list=ratios)
    _assert_release(res, rel)
    text = SYS + 23
    assert rel.layer_lengths[0] == [text + N] * 8 + [text + 164] * 8 + [text + 47] * 8 + [text + 13] * 8
    assert released("pdrop", layouts, image_token_ratio_list=ratios, from_sequence=True).layer_lengths[0][16] == text + 46
    gaps = released("pdrop", layouts, renumber=False)
    renumbered = released("pdrop", layouts)
    assert gaps.kept[0][1:] != renumbered.kept[0][1:]
    assert not torch.allclose(gaps.last_hidden, renumbered.last_hidden, atol=1e-3)


def test_dart_quirks_change_the_result(llama, released):
    """The pivots' CPython set order is not sorted order here, and visiting them sorted keeps other tokens; picking the
    most similar tokens instead of the least similar does too."""
    layouts = ((SYS, 23),)
    base = released("dart", layouts)
    assert base.visit != sorted(base.visit)
    assert released("dart", layouts, visit="sorted").kept != base.kept
    assert released("dart", layouts, least=False).kept != base.kept


# ------------------------------------------------------------------------------------------------ fixed
@pytest.mark.parametrize("method", ["fastv", "pdrop", "dart"])
def test_fixed_batch_equals_batch_1_with_left_padding(llama, method):
    inputs = _rows((SYS, 4), (SYS, 41), (SYS - 10, 23))
    batch = prune_prefill(method, llama[0], *inputs, variant="fixed")
    for b in range(3):
        alone = prune_prefill(method, llama[0], *_row(inputs, b), variant="fixed")
        assert batch.layer_lengths[b] == alone.layer_lengths[0]
        assert _kept(batch)[b] == _kept(alone)[0]
        torch.testing.assert_close(batch.last_hidden[b], alone.last_hidden[0], rtol=1e-5, atol=1e-5)
    assert _kept(batch)[0] != _kept(batch)[1]  # rows decide for themselves


def test_fixed_ties_go_to_the_earlier_position(llama):
    """Zero q_proj (layers 1, 8, 16, 24) makes every attention row uniform: FastV's and PDrop's scores tie exactly and
    fixed keeps the first image tokens; zero k_proj (layer 1) ties every key L1 norm: DART's image pivots are the
    first four image tokens."""
    tied = copy.deepcopy(llama[0])
    with torch.no_grad():
        for i in (1, 8, 16, 24):
            tied.layers[i].self_attn.q_proj.weight.zero_()
        tied.layers[1].self_attn.k_proj.weight.zero_()
    inputs = _rows((SYS, 9))
    fastv = prune_prefill("fastv", tied, *inputs, variant="fixed", rank=100)
    assert _kept(fastv)[0][0] == list(range(SYS + 100)) + list(range(SYS + N, SYS + N + 9))
    pdrop = prune_prefill("pdrop", tied, *inputs, variant="fixed")
    for stage, count in enumerate((288, 144, 72)):
        assert _kept(pdrop)[0][stage] == list(range(SYS + count)) + list(range(SYS + N, SYS + N + 9))
    dart = prune_prefill("dart", tied, *inputs, variant="fixed")
    assert set(range(SYS, SYS + 4)) <= set(_kept(dart)[0][0])


def _visual(k_counts):
    return [c for c, layers in k_counts for _ in range(layers)]


@pytest.mark.parametrize("method, budget, resolved, visual", [
    ("fastv", 192, {"rank": 166}, _visual([(N, 2), (166, 30)])),
    ("fastv", 128, {"rank": 98}, _visual([(N, 2), (98, 30)])),
    ("fastv", 64, {"rank": 30}, _visual([(N, 2), (30, 30)])),
    ("pdrop", 192, {"image_token_ratio_list": [0.254, 0.064516, 0.016387]}, _visual([(N, 8), (146, 8), (37, 8), (9, 8)])),
    ("dart", 192, {"max_num_trunction": 160}, _visual([(N, 2), (164, 30)])),
    ("dart", 128, {"max_num_trunction": 96}, _visual([(N, 2), (100, 30)])),
    ("dart", 64, {"max_num_trunction": 24}, _visual([(N, 2), (28, 30)])),
])
def test_budget_maps_to_the_released_parameters(llama, method, budget, resolved, visual):
    """budget = n equivalent visual tokens (input counting): the resolved parameter, the visual tokens each layer saw,
    and their mean -- (2*576 + 30*rank)/32 for FastV, sum of stage spans x counts / 32 for PDrop (192.0),
    (2*576 + 30*(4 + 8t))/32 for DART (189.75 / 129.75 / 62.25)."""
    res = prune_prefill(method, llama[0], *_rows((SYS, 9)), budget=budget)
    assert {key: res.plan.notes[key] for key in resolved} == resolved
    assert res.visual_per_layer == [visual]
    assert res.visual_tokens_equivalent == [sum(visual) / L] == [res.plan.notes["visual_tokens_equivalent"]]


@pytest.mark.parametrize("method, budget, reach", [
    ("fastv", 36, "36.94 .. 576.00"), ("fastv", 577, "36.94 .. 576.00"),
    ("pdrop", 163, "163.50 .. 576.00"), ("dart", 39, "39.75 .. 572.25"), ("dart", 573, "39.75 .. 572.25"),
])
def test_unreachable_budgets_name_the_range(llama, method, budget, reach):
    with pytest.raises(ValueError, match=f"budget={budget} equivalent visual tokens is outside the reachable range {reach}"):
        prune_prefill(method, llama[0], *_rows((SYS, 9)), budget=budget)


@pytest.mark.parametrize("method, param", [("fastv", {"rank": 98}), ("pdrop", {"image_token_ratio_list": (0.5, 0.25, 0.125)}),
                                           ("dart", {"max_num_trunction": 96})])
def test_budget_with_the_parameter_it_sets_is_refused(llama, method, param):
    with pytest.raises(ValueError, match=f"give either budget or {next(iter(param))}, not both"):
        prune_prefill(method, llama[0], *_rows((SYS, 9)), budget=128, **param)


@pytest.mark.parametrize("variant", ["reference", "fixed"])
def test_no_layer_runs_eager_attention(llama, variant):
    """Every decoder layer inside prune_prefill runs SDPA (no attention weights returned); the model stays SDPA."""
    inputs = _rows((SYS, 12)) if variant == "reference" else _rows((SYS, 12), (SYS, 30))
    for method in ("fastv", "pdrop", "dart"):
        _prefill(method, llama[0], inputs, variant=variant)
    assert llama[0].config._attn_implementation == "sdpa"
