"""PruMerge / PruMerge+: reference == the released loop (quirks included), fixed repairs, budgets.

The oracle below follows the released token_prune_merge_advanced(_plus) step by step (one centre
at a time, candidate vectors built by concatenation, numpy IQR), so a batched shortcut that changes
any semantic (candidate order, tie order, pooling, stride, complement quirk) fails here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmms_tokprune.methods import ROLE_EXTRA, ROLE_KEPT, ROLE_MERGED, VisionInputs, cls_attention, compress
from lmms_tokprune.methods.merge import reference_complement
from lmms_tokprune.methods.prumerge import stride_of

N = 576


# ----------------------------------------------------------------------------------------- inputs


def make(b: int = 1, seed: int = 0, d: int = 64, hot: int = 30, boost: float = 4.0) -> VisionInputs:
    """CLIP-like states: the CLS query attends strongly to ~`hot` patches (IQR k ~ 30)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, N + 1, d, generator=g)
    q = torch.randn(b, N + 1, d, generator=g)
    k = torch.randn(b, N + 1, d, generator=g) * 0.3
    unit = q[:, :1] / q[:, :1].norm(dim=-1, keepdim=True)
    k[:, 1 : hot + 1] += unit * torch.rand(b, hot, 1, generator=g) * boost * math.sqrt(d) / q[:, :1].norm(dim=-1, keepdim=True)
    return VisionInputs(h, q, k)


def one_hot_keys(seed: int) -> VisionInputs:
    """Keys along 3 axes only: every cosine is exactly 0 or 1, so neighbour choice is pure tie order."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, N + 1, 64, generator=g)
    q = torch.zeros(1, N + 1, 64)
    q[0, 0, :3] = torch.tensor([6.0, 5.0, 4.0])
    k = torch.zeros(1, N + 1, 64)
    axis = torch.randint(0, 3, (N + 1,), generator=g)
    k[0, torch.arange(N + 1), axis] = torch.rand(N + 1, generator=g) * 2 + 0.1
    return VisionInputs(h, q, k)


# ----------------------------------------------------------------------------------------- oracle


def _released_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    full = F.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
    return full[:, 0, 1:]


def _released_iqr_ratio(attn: torch.Tensor) -> float:
    x = attn.to(torch.float32).numpy().flatten()
    q1, q3 = np.percentile(x, 25), np.percentile(x, 75)
    return len(np.where(x > q3 + 1.5 * (q3 - q1))[0]) / len(x)


def _released_merge(feat, attn, keys, idx, compl, nn=32):
    """The released per-centre loop: candidates = other centres ++ complement, topk on cosine."""
    take = lambda t, i: torch.gather(t, 1, i.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    xo, xa, ko = take(feat, idx), torch.gather(attn, 1, idx), F.normalize(take(keys, idx), p=2, dim=-1)
    nt, na, nk = take(feat, compl), torch.gather(attn, 1, compl), F.normalize(take(keys, compl), p=2, dim=-1)
    out = torch.zeros_like(xo)
    for b in range(xo.shape[0]):
        for i in range(xo.shape[1]):
            rest_k = torch.cat([ko[b, :i], ko[b, i + 1 :], nk[b]])[None]
            rest_x = torch.cat([xo[b, :i], xo[b, i + 1 :], nt[b]])[None]
            rest_a = torch.cat([xa[b, :i], xa[b, i + 1 :], na[b]])[None]
            _, ci = torch.topk(torch.bmm(ko[b, i][None, None], rest_k.transpose(1, 2)), k=nn, dim=2)
            out[b, i] = torch.sum(rest_x[:, ci.squeeze()] * rest_a[:, ci.squeeze()].unsqueeze(-1), dim=1) + xo[b, i]
    extra = torch.sum(nt * na.unsqueeze(-1), dim=1, keepdim=True)
    return torch.cat([out, extra], dim=1)


def released(inp: VisionInputs, plus: bool = False, adaptive: bool = True, ratio: float = 1 / 8):
    """-> (features [B, M+1, D], centre indices [B, M]) as the released functions compute them."""
    feat = inp.hidden[:, 1:]
    attn = _released_attention(inp.q, inp.k)
    if adaptive:
        ratio = _released_iqr_ratio(attn)
    idx = torch.topk(attn, int(N * ratio), dim=1).indices
    if plus and adaptive:
        seq = torch.arange(0, 575, int(int(1 / ratio) / 3))
        kept = idx.flatten()
        extra = torch.tensor([x for x in seq if x not in kept])
        idx = torch.cat((idx, extra.unsqueeze(0)), dim=1)
    elif plus:
        step = int(1 / ratio)
        idx = torch.cat([idx, torch.arange(int(step / 2), 575, step).expand(idx.shape[0], -1)], dim=1)
    return _released_merge(feat, attn, inp.k[:, 1:], idx, reference_complement(idx, N)), idx


def assert_matches_released(outs, feats, idx):
    for b, out in enumerate(outs):
        assert torch.equal(out.index[:-1], idx[b]) and int(out.index[-1]) == -1
        torch.testing.assert_close(out.features, feats[b], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("b,seed", [(1, 0), (1, 1), (3, 2)])
def test_prumerge_reference_reproduces_released_loop(b, seed):
    inp = make(b, seed)
    assert_matches_released(compress("prumerge", inp, variant="reference"), *released(inp))


@pytest.mark.parametrize("seed", [3, 4])
def test_prumerge_plus_reference_reproduces_released_adaptive_branch(seed):
    inp = make(1, seed)
    outs = compress("prumerge_plus", inp, variant="reference")
    assert_matches_released(outs, *released(inp, plus=True))
    assert outs[0].num_tokens > 40  # the stride samples are really there


def test_prumerge_plus_reference_non_adaptive_follows_released_training_branch():
    inp = make(2, 5)
    feats, idx = released(inp, plus=True, adaptive=False)
    outs = compress("prumerge_plus", inp, variant="reference", adaptive=False)
    assert_matches_released(outs, feats, idx)
    assert [o.num_tokens for o in outs] == [145, 145]  # 72 top + 72 samples at 4, 12, ... + extra
    assert torch.equal(outs[0].index[72:-1], torch.arange(4, 575, 8))
    # samples that are also top-k stay duplicated (released quirk)
    dup = set(outs[0].index[:72].tolist()) & set(range(4, 575, 8))
    assert len(outs[0].index[:-1].tolist()) - len(set(outs[0].index[:-1].tolist())) == len(dup)


@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("method", ["prumerge", "prumerge_plus"])
def test_exact_ties_follow_released_candidate_order(method, seed):
    inp = one_hot_keys(seed)
    assert_matches_released(compress(method, inp, variant="reference"), *released(inp, plus=method == "prumerge_plus"))


def test_reference_pools_one_fence_over_the_batch_fixed_is_per_image():
    inp = make(2, 6)
    inp.k[1, 1:60] = inp.k[0, 1:60]  # image 1 gets ~2x the hot patches of image 0
    inp.q[1, 0] = inp.q[0, 0]
    inp.k[1, 30:60] = inp.k[0, 1:31]
    attn = cls_attention(inp.q, inp.k)
    per_image = [round(_released_iqr_ratio(attn[i : i + 1]) * N) for i in range(2)]
    pooled = int(N * _released_iqr_ratio(attn))
    assert per_image[0] != per_image[1]
    assert [o.num_tokens - 1 for o in compress("prumerge", inp, variant="reference")] == [pooled, pooled]
    assert [o.num_tokens - 1 for o in compress("prumerge", inp, variant="fixed")] == per_image


# ----------------------------------------------------------------------------------------- fixed


@pytest.mark.parametrize("seed", [7, 8])
@pytest.mark.parametrize("method", ["prumerge", "prumerge_plus"])
def test_fixed_equals_reference_for_one_image(method, seed):
    inp = make(1, seed)
    ref, fix = compress(method, inp, variant="reference")[0], compress(method, inp, variant="fixed")[0]
    assert torch.equal(ref.index, fix.index) and torch.equal(ref.role, fix.role)
    torch.testing.assert_close(ref.features, fix.features, rtol=0, atol=0)


@pytest.mark.parametrize("params", [{}, {"adaptive": False, "ratio": 0.1}, {"budget": 40}])
@pytest.mark.parametrize("method", ["prumerge", "prumerge_plus"])
def test_fixed_batch_equals_single_images(method, params):
    inp = make(3, 9)
    batch = compress(method, inp, **params)
    for b in range(3):
        one = VisionInputs(inp.hidden[b : b + 1], inp.q[b : b + 1], inp.k[b : b + 1])
        single = compress(method, one, **params)[0]
        assert torch.equal(batch[b].index, single.index) and torch.equal(batch[b].role, single.role)
        torch.testing.assert_close(batch[b].features, single.features, rtol=1e-5, atol=1e-5)
    if not params:
        assert len({o.num_tokens for o in batch}) > 1  # per-image counts really differ


def test_merge_formula_is_unnormalised_knn_over_all_other_patches():
    inp = make(1, 10)
    out = compress("prumerge", inp)[0]
    h, a = inp.hidden[0, 1:], cls_attention(inp.q, inp.k)[0]
    keys = F.normalize(inp.k[0, 1:], dim=-1)
    kept = out.index[:-1]
    others = torch.ones(N, dtype=torch.bool)
    others[kept] = False
    torch.testing.assert_close(out.features[-1], (a[others, None] * h[others]).sum(0), rtol=1e-5, atol=1e-5)
    for row, i in enumerate(kept.tolist()[:5]):
        cos = keys @ keys[i]
        cos[i] = -2.0  # a token is never its own neighbour
        nb = torch.topk(cos, 32).indices
        expected = h[i] + (a[nb, None] * h[nb]).sum(0)
        torch.testing.assert_close(out.features[row], expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out.features[row], h[i] + (a[nb, None] * h[nb]).sum(0) / a[nb].sum(), atol=1e-3)


def test_output_order_roles_and_stride_samples():
    inp = make(1, 11)
    a = cls_attention(inp.q, inp.k)[0]
    pm = compress("prumerge", inp)[0]
    assert torch.equal(a[pm.index[:-1]], torch.sort(a[pm.index[:-1]], descending=True).values)
    assert pm.role.tolist() == [ROLE_KEPT] * (pm.num_tokens - 1) + [ROLE_EXTRA]
    plus = compress("prumerge_plus", inp)[0]
    k = pm.num_tokens - 1
    assert torch.equal(plus.index[:k], pm.index[:-1])
    s = int(stride_of(torch.tensor(k), N))
    assert s == int(int(1 / (k / N)) / 3) and s >= 2
    expected = [p for p in range(0, 575, s) if p not in set(pm.index[:-1].tolist())]
    assert plus.index[k:-1].tolist() == expected  # 1-D raster stride, ascending, 575 never sampled
    assert plus.role.tolist() == [ROLE_KEPT] * k + [ROLE_MERGED] * len(expected) + [ROLE_EXTRA]


@pytest.mark.parametrize("ratio,stride", [(0.05, 6), (0.1, 3), (0.2, 1), (0.5, 1)])
def test_fixed_plus_stride_from_ratio_with_guard(ratio, stride):
    inp = make(1, 12)
    out = compress("prumerge_plus", inp, adaptive=False, ratio=ratio)[0]
    k = int(N * ratio)
    assert int(stride_of(torch.tensor(k), N).clamp(min=1)) == stride
    kept = set(out.index[:k].tolist())
    assert out.index[k:-1].tolist() == [p for p in range(0, 575, stride) if p not in kept]


# ----------------------------------------------------------------------------------------- bad input


def test_flat_attention():
    inp = make(1, 13)
    inp.q[:, 0] = 0.0  # every logit 0: each patch gets exactly 1/577
    h, a = inp.hidden[0, 1:], cls_attention(inp.q, inp.k)[0]
    assert bool((a == 1 / 577).all())
    ref = compress("prumerge", inp, variant="reference")[0]  # IQR = 0 -> k = 0 -> extra token only
    assert ref.index.tolist() == [-1] and ref.role.tolist() == [ROLE_EXTRA]
    torch.testing.assert_close(ref.features[0], a[0] * h.sum(0), rtol=1e-5, atol=1e-6)
    fix = compress("prumerge", inp)[0]  # k >= 1, ties to the lowest index
    assert fix.index.tolist() == [0, -1]
    assert compress("prumerge_plus", inp)[0].index.tolist() == [0, 192, 384, -1]
    with pytest.raises(ValueError, match="k=0"):
        compress("prumerge_plus", inp, variant="reference")


def test_reference_crash_cases_raise_and_fixed_runs():
    with pytest.raises(ValueError, match="batch size 1"):
        compress("prumerge_plus", make(2, 14), variant="reference")
    with pytest.raises(ValueError, match="stride samples"):
        compress("prumerge_plus", make(1, 14), variant="reference", adaptive=False, ratio=0.3)
    small = make(1, 15)
    small = VisionInputs(small.hidden[:, :21], small.q[:, :21], small.k[:, :21])  # 20 patches < 33
    with pytest.raises(ValueError, match="merge candidates"):
        compress("prumerge", small, variant="reference", adaptive=False, ratio=0.25)
    out = compress("prumerge", small, adaptive=False, ratio=0.25)[0]  # every other patch is a neighbour
    a, h = cls_attention(small.q, small.k)[0], small.hidden[0, 1:]
    i = int(out.index[0])
    torch.testing.assert_close(out.features[0], h[i] + (a[:, None] * h).sum(0) - a[i] * h[i], rtol=1e-5, atol=1e-5)


def test_nan_and_ratio_misuse_are_value_errors():
    inp = make(1, 16)
    inp.k[0, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compress("prumerge", inp)
    with pytest.raises(ValueError, match="adaptive=false"):
        compress("prumerge", make(1, 16), ratio=0.2)
    with pytest.raises(ValueError, match="whisker"):
        compress("prumerge", make(1, 16), whisker=-1)


# ----------------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("variant", ["fixed", "reference"])
@pytest.mark.parametrize("method", ["prumerge", "prumerge_plus"])
def test_budget_is_exact(method, variant):
    inp = make(1 if variant == "reference" else 2, 17)
    for budget in (2, 3, 5, 33, 64, 192, 575, 576):
        for out in compress(method, inp, variant=variant, budget=budget):
            assert out.num_tokens == budget
            assert out.index[:-1].unique().numel() == budget - 1 and int(out.index[-1]) == -1
            assert int(out.role[-1]) == ROLE_EXTRA and int(out.role[0]) == ROLE_KEPT
    for bad in (0, 577):
        with pytest.raises(ValueError, match="budget"):
            compress(method, inp, variant=variant, budget=bad)


@pytest.mark.parametrize("method", ["prumerge", "prumerge_plus", "recover"])
def test_budget_one_is_the_top_patch_with_everything_merged_into_it(method):
    """budget=1: one token, h_c + sum_{j != c} a_j h_j with c the top CLS-attention patch (ties: lower index)."""
    inp = make(3, 5)
    inp.q[1, 0] = 0.0  # image 1: flat attention, every patch ties -> patch 0 in fixed
    if method == "recover":
        inp.last_hidden, inp.text_embeds, inp.visual_projection = inp.hidden.clone(), torch.randn(3, 8), torch.randn(8, 64)
    a = cls_attention(inp.q, inp.k)
    outs = compress(method, inp, budget=1)
    for b, out in enumerate(outs):
        c = 0 if b == 1 else int(torch.argmax(a[b]))
        w = a[b].clone()
        w[c] = 0
        assert out.num_tokens == 1 and out.index.tolist() == [c] and out.role.tolist() == [ROLE_KEPT]
        torch.testing.assert_close(out.features[0], inp.hidden[b, 1 + c] + w @ inp.hidden[b, 1:], rtol=1e-5, atol=1e-5)


def _plus_budget_rule(a: torch.Tensor, budget: int) -> tuple:
    """The documented split, one k at a time: largest k whose stride sample fits, then top up."""
    order = torch.sort(a, descending=True, stable=True).indices.tolist()
    m = budget - 1
    for k in range(m, 0, -1):
        s = max(1, int(int(1 / (k / N)) / 3))
        sample = [p for p in range(0, N - 1, s) if p not in set(order[:k])]
        if k + len(sample) <= m:
            kept = [p for p in order if p not in set(sample)][: m - len(sample)]
            return kept, sample
    return order[:m], []


@pytest.mark.parametrize("budget", [4, 5, 20, 64, 192])
def test_plus_budget_split(budget):
    inp = make(1, 18)
    out = compress("prumerge_plus", inp, budget=budget)[0]
    kept, sample = _plus_budget_rule(cls_attention(inp.q, inp.k)[0], budget)
    assert out.index[:-1].tolist() == kept + sample
    assert out.role.tolist() == [ROLE_KEPT] * len(kept) + [ROLE_MERGED] * len(sample) + [ROLE_EXTRA]
    if budget >= 20:
        assert sample  # the stride part is used whenever it fits


def test_fixed_drops_the_empty_extra_token_when_every_patch_is_a_centre():
    """PruMerge+ at stride 1 can make every patch a centre; the extra token then sums over nothing."""
    from lmms_tokprune.methods.prumerge import Selection, assemble

    n, d = 6, 4
    sel = Selection(torch.arange(n)[None], kept=[2], spatial=[n - 2])
    merged, extra = torch.randn(1, n, d), torch.zeros(1, d)
    fixed = assemble(sel, merged, extra, n, "fixed")[0]
    assert fixed.num_tokens == n and fixed.index.tolist() == list(range(n))
    reference = assemble(sel, merged, extra, n, "reference")[0]
    assert reference.num_tokens == n + 1 and reference.index[-1] == -1
