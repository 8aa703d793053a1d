"""DivPrune / CDPruner: reference == the released selection (quirks included), fixed repairs, budgets.

Released code read (PEERS.md Sources):
- DivPrune, vbdi/divprune @ 799e2d9: LLaVA/llava/model/llava_arch.py (DivPrune, pairwise_cosine_similarity,
  the LAYER_INDEX == '0' block of prepare_inputs_labels_for_multimodal) and run_Divprune.sh (SUBSET_RATIO=0.098).
- CDPruner, Theia-4869/CDPruner @ 9541616: llava/model/llava_arch.py (encode_images),
  llava/model/multimodal_encoder/clip_encoder.py (forward with texts), llava/eval/model_vqa_loader.py.

The oracles below are plain re-readings of those functions, one image at a time. Where the released
arithmetic decides the outcome (re-picks among ~0 distances, greedy steps past the kernel's rank, where
only rounding noise is left) they use the same torch ops with the same shapes and cast points, so the
noise is the same noise; everything else is written for clarity.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import pytest
import torch

from lmms_tokprune.methods import VisionInputs, compress

N = 576  # LLaVA-1.5 patches; DivPrune's count is int(round(ratio * 576))
D, D_LLM, DT = 32, 48, 24
WIDE = 256  # projector width for CDPruner cases that must stay below the kernel's rank (rank <= width)
INF = float("inf")


# ----------------------------------------------------------------------------------------- inputs


def make(b: int = 1, seed: int = 0, d_llm: int = D_LLM, segments: Sequence[int] = (1,), dtype=torch.float32) -> VisionInputs:
    """Random CLIP-like signals: hidden [B, 1+N, D], projected [B, N, d_llm], patch_embeds [B, N, DT], texts."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, N + 1, D, generator=g)
    projected = torch.randn(b, N, d_llm, generator=g).to(dtype)
    patch_embeds = torch.randn(b, N, DT, generator=g)
    texts = [torch.randn(segments[i % len(segments)], DT, generator=g) for i in range(b)]
    return VisionInputs(hidden, None, None, projected=projected, patch_embeds=patch_embeds, text_segments=texts)


def with_projected(inp: VisionInputs, projected: torch.Tensor) -> VisionInputs:
    return VisionInputs(inp.hidden, None, None, projected=projected, patch_embeds=inp.patch_embeds,
                        text_segments=list(inp.text_segments))


def alone(inp: VisionInputs, b: int) -> VisionInputs:
    """Image b as a batch of one (sliced by hand: every signal, its own text)."""
    return VisionInputs(inp.hidden[b : b + 1], None, None, projected=inp.projected[b : b + 1],
                        patch_embeds=inp.patch_embeds[b : b + 1], text_segments=[inp.text_segments[b]])


def duplicated(inp: VisionInputs, distinct: int) -> VisionInputs:
    """Only `distinct` different projector rows: patch i carries row i % distinct (exact copies)."""
    rows = torch.arange(N) % distinct
    return with_projected(inp, inp.projected[:, rows].clone())


def low_rank(inp: VisionInputs, rank: int, seed: int = 99) -> VisionInputs:
    """Projector outputs in a `rank`-dimensional subspace: the DPP kernel has rank `rank`."""
    g = torch.Generator().manual_seed(seed)
    b, n, w = inp.projected.shape
    coeff = torch.randn(b, n, rank, generator=g)
    basis = torch.randn(b, rank, w, generator=g)
    return with_projected(inp, (coeff @ basis).to(inp.projected.dtype))


# ----------------------------------------------------------------------------------------- DivPrune oracle


def divprune_picks(p: torch.Tensor, n: int, mask_picked: bool = False) -> List[int]:
    """DivPrune's pick order on one image's projector outputs p [N, D_llm], in p's dtype.

    Distance = 1 - cosine (rows divided by their norm, torch.mm). First pick: the token whose
    second-smallest column entry is largest (the smallest is its own ~0). Then each pick is the token
    farthest from its nearest picked token. Released: picked tokens are not masked (they score their own
    ~0 distance and win again once only duplicates are left); mask_picked=True undoes that.
    """
    unit = p / p.norm(dim=1, keepdim=True)
    dist = 1.0 - torch.mm(unit, unit.t())
    picks: List[int] = []
    nearest = None  # min over picked rows, updated per pick (min is exact: equals the release's min over all rows)
    for t in range(n):
        if t == 0:
            score = dist.sort(dim=0).values[1]
        else:
            row = dist[picks[-1]]
            nearest = row.clone() if nearest is None else torch.minimum(nearest, row)
            score = nearest.clone()
        if mask_picked and picks:
            score[picks] = -INF
        picks.append(int(torch.argmax(score)))  # ties: the first maximum
    return picks


def divprune_release(inp: VisionInputs, n: int, per_image: bool = False) -> List[List[int]]:
    """-> per image, the picks as the release feeds them to the LLM.

    Released: one selection, from sample 0's image span, indexes every row of the batch
    (new_input_embeds[:, keep_indexs]); per_image=True undoes that.
    """
    b = inp.projected.shape[0]
    if per_image:
        return [divprune_picks(inp.projected[i], n) for i in range(b)]
    return [divprune_picks(inp.projected[0], n)] * b


def released_llm_order(picks: List[int]) -> List[int]:
    """keep_indexs.sort(): ascending, a re-picked token stays in as often as it was picked."""
    return sorted(picks)


def divprune_margin(p: torch.Tensor, n: int) -> float:
    """Smallest gap between the best and second-best score over the first n steps (fp32, masked)."""
    unit = p / p.norm(dim=1, keepdim=True)
    dist = 1.0 - unit @ unit.t()
    score, picks, gaps = dist.sort(dim=0).values[1].clone(), [], []
    for _ in range(n):
        masked = score.clone()
        masked[picks] = -INF
        top = torch.topk(masked, 2).values
        gaps.append(float(top[0] - top[1]))
        picks.append(int(torch.argmax(masked)))
        score = dist[picks].min(dim=0).values
    return min(gaps)


# ----------------------------------------------------------------------------------------- CDPruner oracle


def cdpruner_relevance(patch_embeds: torch.Tensor, texts: Sequence[torch.Tensor], negative: bool = True,
                       batch_minmax: bool = True) -> torch.Tensor:
    """[B, N] relevance: mean over text segments of the (negative) cosine, then min-max.

    Released: NEGATIVE cosine, and one min / max over the whole [B, N] tensor, + 1e-6 on the numerator
    only. negative=False / batch_minmax=False undo those. texts[b] is image b's text (the release
    passes sample 0's question for every image: give [T_0] * B for that).
    """
    e = patch_embeds / patch_embeds.norm(dim=-1, keepdim=True)
    rows = []
    for b in range(e.shape[0]):
        t = texts[b] / texts[b].norm(dim=-1, keepdim=True)
        cos = e[b] @ t.t()  # [N, S]
        rows.append((-cos if negative else cos).mean(dim=-1))
    rel = torch.stack(rows)
    if batch_minmax:
        return (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
    lo, hi = rel.min(dim=1, keepdim=True).values, rel.max(dim=1, keepdim=True).values
    return (rel - lo + 1e-6) / (hi - lo)


def cdpruner_kernel(p: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """K_ij = rho_i * S_ij * rho_j, S = Gram of the rows of p normalised in p's dtype, then fp32."""
    unit = (p / p.norm(dim=-1, keepdim=True)).float()
    sim = torch.matmul(unit[None], unit[None].transpose(1, 2))[0]  # kept 3-D like the release (same matmul)
    return rel[:, None] * sim * rel[None, :]


def cdpruner_picks(kernel: torch.Tensor, n: int, stop_at_rank: bool = False,
                   fill_order: Optional[torch.Tensor] = None) -> List[int]:
    """Fast greedy MAP (Chen et al. 2018) in the released update order, on one image's kernel [N, N].

    d = diag(K); each step: j = argmax d; e = (K_j - sum_u c_uj c_u) / sqrt(d_j); d -= e^2; d_j = -inf.
    Released: no stop, so past the kernel's rank sqrt(d_j <= 0) gives NaN, NaN spreads to every d and
    argmax re-picks. stop_at_rank=True is the fix: once the best unpicked d is <= 1e-10 or not finite,
    the remaining slots take the unpicked tokens in `fill_order` (highest relevance first, ties lowest).
    """
    size = kernel.shape[0]
    coeffs = torch.zeros(n, 1, size)  # (step, image, token), as the release's cis for one image
    d = torch.diagonal(kernel).clone()
    picks: List[int] = []
    for t in range(n):
        if stop_at_rank:
            cand = d.clone()
            cand[picks] = -INF
            best = cand[int(torch.argmax(cand))]
            if not torch.isfinite(best) or float(best) <= 1e-10:
                taken = set(picks)
                return picks + [i for i in fill_order.tolist() if i not in taken][: n - len(picks)]
        j = int(torch.argmax(d))
        picks.append(j)
        # the same contraction as the release's einsum, so the rounding past the rank is the release's
        e = (kernel[j] - torch.einsum("tb,tbn->bn", coeffs[:t, :, j], coeffs[:t])[0]) / torch.sqrt(d[j])
        coeffs[t, 0] = e
        d -= torch.square(e)
        d[j] = -INF
    return picks


def relevance_order(rel: torch.Tensor) -> torch.Tensor:
    """Tokens by relevance, highest first, ties to the lower index."""
    return torch.sort(-rel, stable=True).indices


def cdpruner_release(inp: VisionInputs, n: int, negative: bool = True, batch_minmax: bool = True,
                     own_text: bool = False) -> List[List[int]]:
    """-> per image, the released kept set (select_idx sorted, scattered into a mask: distinct, ascending)."""
    b = inp.projected.shape[0]
    texts = list(inp.text_segments) if own_text else [inp.text_segments[0]] * b
    rel = cdpruner_relevance(inp.patch_embeds, texts, negative=negative, batch_minmax=batch_minmax)
    return [sorted(set(cdpruner_picks(cdpruner_kernel(inp.projected[i], rel[i]), n))) for i in range(b)]


def cdpruner_fixed(inp: VisionInputs, n: int) -> List[List[int]]:
    """The fixed reading: per image min-max, its own text, fp32, stop at the rank and fill by relevance."""
    out = []
    for i in range(inp.projected.shape[0]):
        rel = cdpruner_relevance(inp.patch_embeds[i : i + 1], [inp.text_segments[i]], batch_minmax=False)[0]
        p = inp.projected[i].float()
        norm = p.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        unit = p / norm
        kernel = rel[:, None] * (unit @ unit.t()) * rel[None, :]
        out.append(sorted(cdpruner_picks(kernel, n, stop_at_rank=True, fill_order=relevance_order(rel))))
    return out


def cdpruner_margin(kernel: torch.Tensor, n: int) -> float:
    """Smallest relative gap between the best and second-best d over n steps (well inside the rank)."""
    size = kernel.shape[0]
    coeffs, d, gaps = torch.zeros(n, size), torch.diagonal(kernel).clone(), []
    for t in range(n):
        top = torch.topk(d, 2).values
        gaps.append(float((top[0] - top[1]) / top[0]))
        j = int(torch.argmax(d))
        e = (kernel[j] - coeffs[:t, j] @ coeffs[:t]) / torch.sqrt(d[j])
        coeffs[t] = e
        d -= e * e
        d[j] = -INF
    return min(gaps)


# ----------------------------------------------------------------------------------------- helpers


def assert_outputs(outs, inp: VisionInputs, expected: List[List[int]]):
    """Indices exactly as expected (ascending), features exactly the hidden rows they name."""
    assert len(outs) == len(expected)
    for b, (out, exp) in enumerate(zip(outs, expected)):
        assert out.index.dtype == torch.long
        assert out.index.tolist() == exp, f"image {b}"
        assert torch.equal(out.features, inp.hidden[b, 1 + out.index])


def distinct(index: torch.Tensor) -> int:
    return int(index.unique().numel())


# ----------------------------------------------------------------------------------------- DivPrune reference


@pytest.mark.parametrize("params,n", [({}, 56), ({"ratio": 0.098}, 56), ({"budget": 64}, 64), ({"budget": 128}, 128),
                                      ({"budget": 192}, 192), ({"ratio": 0.1111}, 64), ({"ratio": 0.2222}, 128),
                                      ({"ratio": 0.3333}, 192)])
def test_divprune_reference_reproduces_released_selection(params, n):
    """Released default SUBSET_RATIO=0.098 keeps int(round(0.098*576)) = 56; budget=n keeps n."""
    inp = make(1, 0)
    picks = divprune_picks(inp.projected[0], n)
    assert len(set(picks)) == n  # random rows: no re-picks, the set and the LLM order coincide
    assert_outputs(compress("divprune", inp, variant="reference", **params), inp, [sorted(picks)])


@pytest.mark.parametrize("seed", [1, 2])
def test_divprune_reference_ranks_in_the_projector_dtype(seed):
    """Real runs feed fp16 LLM embeddings: distances, ties and argmax are taken in fp16."""
    inp = make(1, seed, dtype=torch.float16)
    picks = divprune_picks(inp.projected[0], 64)
    assert_outputs(compress("divprune", inp, variant="reference", budget=64), inp, [released_llm_order(picks)])


@pytest.mark.parametrize("n", [56, 64, 128])
def test_divprune_reference_duplicates_keep_the_released_distinct_tokens(n):
    """Only 40 different rows: after 40 picks every score is ~0 and argmax re-picks (fewer than n distinct)."""
    inp = duplicated(make(1, 3), 40)
    picks = divprune_picks(inp.projected[0], n)
    assert len(set(picks)) < n and len(picks) == n  # the oracle really re-picks
    out = compress("divprune", inp, variant="reference", budget=n)[0]
    assert sorted(set(out.index.tolist())) == sorted(set(picks))
    assert torch.equal(out.features, inp.hidden[0, 1 + out.index])


def test_divprune_reference_repicked_tokens_enter_the_llm_as_often_as_picked():
    """keep_indexs = sort(cat(prompt, picks + 35, rest)); new_input_embeds[:, keep_indexs] keeps repeats:
    the released LLM sees n visual tokens, a re-picked one at several consecutive positions."""
    inp = duplicated(make(1, 3), 40)
    picks = divprune_picks(inp.projected[0], 64)
    out = compress("divprune", inp, variant="reference", budget=64)[0]
    assert out.num_tokens == 64
    assert_outputs([out], inp, [released_llm_order(picks)])


@pytest.mark.parametrize("b", [2, 3])
def test_divprune_reference_image_zero_decides_for_the_batch(b):
    """The release reads sample 0's image span and indexes every row with it."""
    inp = make(b, 4)
    expected = [released_llm_order(p) for p in divprune_release(inp, 64)]
    assert expected[1] == expected[0]
    assert_outputs(compress("divprune", inp, variant="reference", budget=64), inp, expected)


def test_divprune_budget_ends_and_misuse():
    inp = make(1, 5)
    assert compress("divprune", inp, variant="reference", budget=1)[0].index.tolist() == divprune_picks(inp.projected[0], 1)
    assert compress("divprune", inp, variant="reference", budget=N)[0].index.tolist() == list(range(N))
    for variant in ("reference", "fixed"):
        with pytest.raises(ValueError):
            compress("divprune", inp, variant=variant, budget=64, ratio=0.1111)
        with pytest.raises(ValueError, match="budget"):
            compress("divprune", inp, variant=variant, budget=N + 1)


# ----------------------------------------------------------------------------------------- CDPruner reference


@pytest.mark.parametrize("segments", [(1,), (3,)])
@pytest.mark.parametrize("n", [64, 128, 192])
def test_cdpruner_reference_reproduces_released_selection(n, segments):
    """Full-rank kernel (width 256 > n): n distinct tokens, the released greedy order, mean over segments."""
    inp = make(1, 10 + n, d_llm=WIDE, segments=segments)
    expected = cdpruner_release(inp, n)
    assert len(expected[0]) == n
    assert_outputs(compress("cdpruner", inp, variant="reference", budget=n), inp, expected)


@pytest.mark.parametrize("n", [64, 128, 192])
def test_cdpruner_reference_past_the_rank_follows_the_released_rounding(n):
    """Width 48 < n: after 48 pivots the greedy runs on rounding noise (d ~ 1e-7) until the best d is <= 0;
    then sqrt gives NaN, NaN spreads to every d and argmax re-picks tokens 0 and 1 (first NaN)."""
    inp = make(1, 20 + n)
    expected = cdpruner_release(inp, n)
    if n > 64:
        assert len(expected[0]) < n  # the NaN steps were reached (at 64 this seed is still in the noise steps)
    assert_outputs(compress("cdpruner", inp, variant="reference", budget=n), inp, expected)


@pytest.mark.parametrize("n", [64, 128])
def test_cdpruner_reference_low_rank_kernel_keeps_fewer_than_n(n):
    """Rank 10: the 10 pivots are determined; what follows is the NaN regime (fewer than n distinct)."""
    inp = low_rank(make(1, 30), 10)
    rel = cdpruner_relevance(inp.patch_embeds, inp.text_segments)
    picks = cdpruner_picks(cdpruner_kernel(inp.projected[0], rel[0]), n)
    out = compress("cdpruner", inp, variant="reference", budget=n)[0]
    assert set(picks[:10]) <= set(out.index.tolist())  # robust part: the pivots inside the rank
    assert out.num_tokens < n
    assert_outputs([out], inp, [sorted(set(picks))])  # exact part: the released rounding past the rank


def test_cdpruner_reference_duplicates_keep_fewer_distinct_tokens():
    """30 different projector rows: kernel rank 30. The noise steps after it pick copies (new indices,
    same content), then NaN re-picks: budget 128 keeps fewer than 128 tokens."""
    inp = duplicated(make(1, 31, d_llm=WIDE), 30)
    expected = cdpruner_release(inp, 128)
    assert len(expected[0]) < 128
    assert_outputs(compress("cdpruner", inp, variant="reference", budget=128), inp, expected)


def test_cdpruner_reference_normalises_fp16_projector_outputs_in_fp16():
    """image_features / norm in the LLM dtype, then .float() for the Gram matrix."""
    inp = make(1, 32, d_llm=WIDE, dtype=torch.float16)
    assert_outputs(compress("cdpruner", inp, variant="reference", budget=64), inp, cdpruner_release(inp, 64))


def test_cdpruner_reference_refuses_a_batch_and_requires_a_budget():
    """The released LLM input assembly fails at sample 1, so no batched result exists to reproduce."""
    with pytest.raises(ValueError):
        compress("cdpruner", make(2, 33), variant="reference", budget=64)
    for variant in ("reference", "fixed"):
        with pytest.raises(ValueError, match="budget"):
            compress("cdpruner", make(1, 33), variant=variant)


# ----------------------------------------------------------------------------------------- quirks matter


def test_quirk_divprune_image_zero_decides():
    """Per-image selection differs from image 0's selection for image 1."""
    inp = make(2, 40)
    released, per_image = divprune_release(inp, 64), divprune_release(inp, 64, per_image=True)
    assert released[0] == per_image[0] and released[1] != per_image[1]


def test_quirk_divprune_picked_tokens_not_masked():
    """With duplicates, masking picked tokens gives n distinct tokens; the release re-picks."""
    p = duplicated(make(1, 41), 40).projected[0]
    released, masked = divprune_picks(p, 64), divprune_picks(p, 64, mask_picked=True)
    assert len(set(released)) < 64 == len(set(masked))
    assert sorted(released) != sorted(masked)


def test_quirk_cdpruner_negative_cosine():
    """Relevance as +cosine (the paper's reading) selects other tokens than the released -cosine."""
    inp = make(1, 42, d_llm=WIDE, segments=(2,))
    assert cdpruner_release(inp, 64) != cdpruner_release(inp, 64, negative=False)


def test_quirk_cdpruner_batch_minmax():
    """Min-max over the batch shifts image 0's relevance when image 1 reaches lower: other picks for image 0."""
    inp = make(2, 43, d_llm=WIDE)
    inp.text_segments[1] = inp.text_segments[0]  # same question: only the normalisation differs
    inp.patch_embeds[1, :50] = inp.text_segments[0][0]  # image 1: 50 patches at cosine 1, the lowest relevance
    pooled = cdpruner_relevance(inp.patch_embeds, inp.text_segments, batch_minmax=True)
    assert float(pooled[0].min()) > 0.05  # image 0 no longer starts at ~0
    assert cdpruner_release(inp, 64)[0] != cdpruner_release(inp, 64, batch_minmax=False)[0]


def test_quirk_cdpruner_nan_past_rank():
    """Stopping at the rank and filling by relevance keeps n tokens; the released NaN steps keep fewer."""
    inp = low_rank(make(1, 44), 10)
    released, fixed = cdpruner_release(inp, 64)[0], cdpruner_fixed(inp, 64)[0]
    assert len(released) < 64 == len(fixed)
    assert released != fixed


# ----------------------------------------------------------------------------------------- fixed


@pytest.mark.parametrize("n", [1, 2, 56, 64, 128, 576])
def test_divprune_fixed_keeps_exactly_n_distinct_even_with_duplicates(n):
    """Picked tokens masked: exactly n distinct; the 40 distinct rows are all covered before any copy."""
    inp = duplicated(make(2, 50), 40)
    for b, out in enumerate(compress("divprune", inp, variant="fixed", budget=n)):
        assert out.num_tokens == n == distinct(out.index)
        assert out.index.tolist() == sorted(out.index.tolist())
        assert torch.equal(out.features, inp.hidden[b, 1 + out.index])
        assert len({i % 40 for i in out.index.tolist()}) == min(n, 40)


@pytest.mark.parametrize("n", [1, 2, 56, 64, 128, 576])
@pytest.mark.parametrize("case", ["duplicates", "low_rank"])
def test_cdpruner_fixed_keeps_exactly_n_distinct_past_the_rank(case, n):
    base = make(2, 51, d_llm=WIDE)
    inp = duplicated(base, 30) if case == "duplicates" else low_rank(base, 10)
    for b, out in enumerate(compress("cdpruner", inp, variant="fixed", budget=n)):
        assert out.num_tokens == n == distinct(out.index)
        assert out.index.tolist() == sorted(out.index.tolist())
        assert torch.equal(out.features, inp.hidden[b, 1 + out.index])


def test_cdpruner_fixed_fills_with_the_most_relevant_unpicked_tokens_ties_lowest():
    """20 informative tokens + zero projector rows (d = 0 exactly): the greedy keeps the 20, then the fill
    takes the most relevant of the rest; the zero rows come in 4 relevance levels, so ties decide."""
    inp = make(1, 52, d_llm=WIDE)
    inp.projected[0, 20:] = 0.0
    t = inp.text_segments[0][0]
    inp.patch_embeds[0, :20] = -t + 0.1 * inp.patch_embeds[0, :20]  # anti-aligned: the most relevant tokens
    levels = torch.randn(4, DT, generator=torch.Generator().manual_seed(7))
    inp.patch_embeds[0, 20:] = levels[torch.arange(20, N) % 4]
    out = compress("cdpruner", inp, variant="fixed", budget=64)[0]
    expected = cdpruner_fixed(inp, 64)[0]
    assert set(range(20)) <= set(expected)
    rel = cdpruner_relevance(inp.patch_embeds, inp.text_segments, batch_minmax=False)[0]
    top_level = int(torch.argmax(rel[20:24])) + 20
    assert expected[20:] == [i for i in range(20, N) if i % 4 == top_level % 4][:44]  # lowest indices of the top tie
    assert_outputs([out], inp, [expected])


@pytest.mark.parametrize("method,params", [("divprune", {"budget": 64}), ("divprune", {}), ("cdpruner", {"budget": 64}),
                                           ("cdpruner", {"budget": 1})])
def test_fixed_batch_equals_each_image_alone(method, params):
    inp = make(3, 53, d_llm=WIDE, segments=(1, 2, 3))
    batch = compress(method, inp, variant="fixed", **params)
    for b in range(3):
        single = compress(method, alone(inp, b), variant="fixed", **params)[0]
        assert torch.equal(batch[b].index, single.index)
        assert torch.equal(batch[b].features, single.features)


def test_cdpruner_fixed_min_max_per_image_and_text_per_sample():
    """Image 0's result ignores image 1's relevance range and text; image 1 follows its own text."""
    inp = make(2, 54, d_llm=WIDE)
    first = compress("cdpruner", inp, variant="fixed", budget=64)
    inp.patch_embeds[1, :50] = inp.text_segments[1][0]  # image 1 reaches a much lower relevance
    second = compress("cdpruner", inp, variant="fixed", budget=64)
    assert torch.equal(first[0].index, second[0].index)
    assert second[1].index.tolist() == cdpruner_fixed(inp, 64)[1]
    inp.text_segments[1] = -inp.text_segments[1]  # another question for sample 1 only
    third = compress("cdpruner", inp, variant="fixed", budget=64)
    assert torch.equal(third[0].index, second[0].index) and not torch.equal(third[1].index, second[1].index)


@pytest.mark.parametrize("seed", [55, 56])
def test_fixed_equals_reference_where_the_release_has_no_defect(seed):
    """One image, fp32, well inside the rank, no near-ties: the repairs change nothing."""
    inp = make(1, seed, d_llm=WIDE)
    assert divprune_margin(inp.projected[0], 64) > 1e-6
    ref, fix = (compress("divprune", inp, variant=v, budget=64)[0] for v in ("reference", "fixed"))
    assert torch.equal(ref.index, fix.index)
    rel = cdpruner_relevance(inp.patch_embeds, inp.text_segments)
    assert cdpruner_margin(cdpruner_kernel(inp.projected[0], rel[0]), 128) > 1e-5
    ref, fix = (compress("cdpruner", inp, variant=v, budget=128)[0] for v in ("reference", "fixed"))
    assert torch.equal(ref.index, fix.index) and fix.index.tolist() == cdpruner_fixed(inp, 128)[0]


def test_divprune_fixed_ranks_in_fp32():
    """fp16 projector outputs: fixed picks what fp32 distances pick, masked, ties lowest."""
    inp = make(1, 57, dtype=torch.float16)
    p32 = inp.projected[0].float()
    assert divprune_margin(p32, 64) > 1e-6
    out = compress("divprune", inp, variant="fixed", budget=64)[0]
    assert out.index.tolist() == sorted(divprune_picks(p32, 64, mask_picked=True))


def test_cosine_gram_equals_sklearns_cosine_similarity_zero_rows_included():
    """The fixed paths' cosines come from the raw Gram scaled by its diagonal; sklearn (normalise first) is the oracle."""
    from sklearn.metrics.pairwise import cosine_similarity

    from lmms_tokprune.methods.signals import cosine_gram

    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 40, 96, generator=g) * torch.rand(3, 40, 1, generator=g) * 5
    x[1, 5] = 0.0  # a zero row: cosine 0 with everything, itself included (F.normalize / sklearn agree)
    x[2, 9] = x[2, 3]  # an exact duplicate: cosine 1
    got = cosine_gram(x.half())  # fp16 inputs (real runs) come back fp32
    assert got.dtype == torch.float32
    for b in range(3):
        expected = torch.from_numpy(cosine_similarity(x[b].half().float().numpy())).float()
        torch.testing.assert_close(got[b], expected, atol=1e-6, rtol=0)
    assert float(got[1, 5].abs().max()) == 0.0
