"""VisionZip: reference == the released code (quirks included), fixed repairs, budgets, layout.

The oracle below is a plain per-image reading of dvlab-research/VisionZip @ 3151f6d for LLaVA-1.5:
  visionzip/main.py          visionzip(model, dominant=191, contextual=30) -> apply_info(dominant_num=dominant-1)
  visionzip/utils.py         CLIPAttention_forward: eager attention, q_proj * scale, heads = consecutive
                             head_dim slices, softmax over all 1+N keys; returns raw_key_states.mean(1)
                             (k_proj split into heads, averaged over heads, unscaled) as the merge metric;
                             apply_info: r = [0]*22 + [1] + [0], so the metric is kept at block 22 only
  visionzip/clip_encoder.py  CLIPVisionTower_VisionZip.forward (tensor branch): attentions[-2] /
                             hidden_states[-2] / layers[-2].metric, the dominant top-k, the 1-D stride
                             targets, argmax assignment, target + mean of members
  visionzip/llava_arch.py    encode_images_visionzip: the whole sequence goes to mm_projector as is, so
                             the output order [CLS, dominant ascending, contextual] is the LLM order
One image at a time, Python lists for the bookkeeping, so a batched re-implementation that changes a
semantic (head split, CLS column, stride, assignment ties, merge formula) fails here. Keyword switches of
the oracle undo one quirk each; the quirk tests show the input on which that would change the result.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmms_tokprune.methods import ROLE_EXTRA, ROLE_KEPT, ROLE_MERGED, VisionInputs, compress

N = 576


# ----------------------------------------------------------------------------------------- inputs


def peaked(b=1, seed=0, d=64, heads=4, hot=6, boost=3.0, cls_self=0.0):
    """Block-22-like states: random keys plus `hot` salient patches whose logit is +`boost` in every head.

    `cls_self` raises head 0's CLS-to-CLS logit by that much, so head 0 spends most of its mass on the
    CLS column (the column VisionZip drops without renormalising).
    """
    g = torch.Generator().manual_seed(seed)
    h, q, k = (torch.randn(b, N + 1, d, generator=g) for _ in range(3))
    dh = d // heads
    for i in range(b):
        qh = q[i, 0].view(heads, dh)
        lift = (math.sqrt(dh) * qh / qh.pow(2).sum(-1, keepdim=True)).reshape(d)  # +1 on every head's logit
        k[i, 1 + torch.randperm(N, generator=g)[:hot]] += boost * lift
        k[i, 0, :dh] += cls_self * lift[:dh]
    return h, q, k, heads


def near_duplicates(seed=0, d=64, heads=4):
    """Peaked states where 40 patches have an exact copy (same key and hidden) and a near copy (key + 1e-2)."""
    h, q, k, heads = peaked(1, seed, d, heads)
    g = torch.Generator().manual_seed(seed + 100)
    perm = 1 + torch.randperm(N, generator=g)
    src, exact, near = perm[:40], perm[40:80], perm[80:120]
    h[0, exact], k[0, exact] = h[0, src], k[0, src]
    k[0, near] = k[0, src] + 1e-2 * torch.randn(40, d, generator=g)
    return h, q, k, heads


def axis_keys(b=1, seed=0, d=64, heads=4, axes=3):
    """Keys whose head mean is exactly c * e_axis: every merge cosine is exactly 0 or 1 (pure tie order).

    Heads come in pairs base + v, base - v with quarter-integer v, so the head mean cancels v exactly while
    the per-head CLS attention still differs from patch to patch.
    """
    g = torch.Generator().manual_seed(seed)
    dh = d // heads
    h, q = torch.randn(b, N + 1, d, generator=g), torch.randn(b, N + 1, d, generator=g)
    base = torch.zeros(b, N + 1, 1, dh)
    axis = torch.randint(0, axes, (b, N + 1, 1, 1), generator=g)
    base.scatter_(3, axis, torch.randint(1, 9, (b, N + 1, 1, 1), generator=g) / 4)
    v = torch.randint(-8, 9, (b, N + 1, heads // 2, dh), generator=g) / 4
    k = torch.cat([base + v, base - v], dim=2).reshape(b, N + 1, d)
    return h, q, k, heads


def flat(b=1, seed=0, d=64, heads=4):
    """CLS query 0: every logit is 0, every patch gets exactly 1/577 in every head (all dominant scores tie)."""
    h, q, k, heads = peaked(b, seed, d, heads)
    q[:, 0] = 0.0
    return h, q, k, heads


def vis(x) -> VisionInputs:
    h, q, k, heads = x
    return VisionInputs(h, None, None, feature_q=q, feature_k=k, num_heads=heads)


def cat(*xs):
    """Stack single-image inputs into one batch."""
    return tuple(torch.cat([x[i] for x in xs]) for i in range(3)) + (xs[0][3],)


def split(n: int):
    """budget n -> (dominant, contextual): contextual = floor(5n/32), dominant = n - contextual."""
    return n - 5 * n // 32, 5 * n // 32


def resolved(params: dict):
    """The (dominant, contextual) that compress's params stand for (released defaults 191, 30)."""
    return split(params["budget"]) if "budget" in params else (params.get("dominant", 191), params.get("contextual", 30))


# ----------------------------------------------------------------------------------------- oracle


def _cls_attention_per_head(q, k, heads):
    """[1+N, D] raw q_proj / k_proj -> [H, N]: utils.CLIPAttention_forward's CLS row, CLS column dropped."""
    dh = k.shape[1] // heads
    rows = []
    for hd in range(heads):
        qh = q[0, hd * dh : (hd + 1) * dh] * dh**-0.5  # the release scales the query before the product
        logits = k[:, hd * dh : (hd + 1) * dh] @ qh  # [1+N], CLS key included
        rows.append(torch.softmax(logits, dim=0)[1:])  # dropped after the softmax, no renormalisation
    return torch.stack(rows)


def _released_image(h, q, k, heads, dominant, contextual, score, metric, targets, merge, ties, rank, eps):
    """One image [1+N, D]: clip_encoder.py's tensor branch step by step (defaults of `released` = the release)."""
    n, d = h.shape[0] - 1, h.shape[1]
    dh = d // heads
    # dominant: top (dominant - 1) patches of the CLS attention summed over heads
    attn = _cls_attention_per_head(q, k, heads)
    if score == "sum":
        s = attn.sum(0)
    elif score == "mean":
        s = attn.mean(0)
    elif score == "renorm":  # CLS column dropped, then each head renormalised over the patches
        s = (attn / attn.sum(1, keepdim=True)).sum(0)
    elif score == "one_head":  # one softmax over all D dims (the PruMerge reading)
        s = torch.softmax(k @ q[0] / math.sqrt(d), dim=0)[1:]
    if rank == "topk":  # released: torch.topk, its own tie order (per row, so one row at a time is the same)
        top = torch.topk(s, dominant - 1).indices
    else:  # fixed: stable, ties to the lower patch index
        top = torch.sort(s, descending=True, stable=True).indices[: dominant - 1]
    kept = sorted(top.tolist())  # masked_select keeps sequence order
    chosen = set(kept)
    rest = [p for p in range(n) if p not in chosen]  # ascending patch order
    # merge metric over the remaining patches, L2-normalised
    if metric == "head_mean":
        m = k.view(n + 1, heads, dh).mean(1)
    elif metric == "full":
        m = k
    elif metric == "hidden":
        m = h
    m = m[[1 + p for p in rest]]
    norm = m.norm(dim=-1, keepdim=True)
    m = m / (norm.clamp_min(eps) if eps else norm)  # released: no eps (0/0 = NaN)
    r = len(rest)
    # targets: positions 0, step, 2*step, ... of the remaining list (ZeroDivisionError for contextual = 0)
    if targets == "stride":
        step = max(1, r // contextual)
        tpos = list(range(0, r, step))[:contextual]
    elif targets == "spread":  # evenly over the whole remaining list
        tpos = sorted({round(i * (r - 1) / max(contextual - 1, 1)) for i in range(contextual)})
    tset = set(tpos)
    groups = {t: [] for t in tpos}
    tm = m[tpos]
    for i in range(r):
        if i in tset:
            continue
        sims = tm @ m[i]
        if ties == "earlier":
            j = int(torch.argmax(sims))  # documented: the first maximal value
        else:
            j = len(tpos) - 1 - int(torch.argmax(sims.flip(0)))
        groups[tpos[j]].append(i)
    ctx = []
    for t in tpos:
        target = h[1 + rest[t]]
        members = h[[1 + rest[i] for i in groups[t]]]
        total = members.sum(0)
        if merge == "target_plus_mean":
            ctx.append(target + total / max(len(groups[t]), 1))
        elif merge == "cluster_mean":
            ctx.append((target + total) / (len(groups[t]) + 1))
        elif merge == "members_mean":
            ctx.append(total / len(groups[t]) if groups[t] else target)
    feats = torch.cat([h[:1], h[[1 + p for p in kept]], torch.stack(ctx) if ctx else h[:0]])
    index = torch.tensor([-1] + kept + [rest[t] for t in tpos], dtype=torch.long)
    return feats, index


def released(x, dominant=191, contextual=30, *, score="sum", metric="head_mean", targets="stride",
             merge="target_plus_mean", ties="earlier", rank="topk", eps=0.0):
    """-> [(features [M, D], index [M])] per image, as CLIPVisionTower_VisionZip.forward computes them."""
    h, q, k, heads = x
    return [_released_image(h[b], q[b], k[b], heads, dominant, contextual, score, metric, targets, merge, ties, rank, eps)
            for b in range(h.shape[0])]


def assert_matches(outs, expected, tol=1e-6):
    assert len(outs) == len(expected)
    for out, (feats, index) in zip(outs, expected):
        assert out.index.tolist() == index.tolist()
        torch.testing.assert_close(out.features, feats, rtol=tol, atol=tol)


def differs(a, b) -> bool:
    return any(fa.shape != fb.shape or not torch.equal(ia, ib) or not torch.allclose(fa, fb, atol=1e-4)
               for (fa, ia), (fb, ib) in zip(a, b))


# ----------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("b,seed", [(1, 0), (1, 1), (3, 2)])
def test_reference_reproduces_released_defaults(b, seed):
    x = peaked(b, seed)
    assert_matches(compress("visionzip", vis(x), variant="reference"), released(x))
    assert_matches(compress("visionzip", vis(x), variant="reference", dominant=191, contextual=30), released(x))


@pytest.mark.parametrize("budget,dom,ctx", [(64, 54, 10), (128, 108, 20), (192, 162, 30)])
def test_reference_budget_maps_to_released_split(budget, dom, ctx):
    assert split(budget) == (dom, ctx)
    x = peaked(2, budget)
    outs = compress("visionzip", vis(x), variant="reference", budget=budget)
    assert_matches(outs, released(x, dom, ctx))
    for out in outs:
        assert out.num_tokens == budget
        assert out.role.tolist() == [ROLE_EXTRA] + [ROLE_KEPT] * (dom - 1) + [ROLE_MERGED] * ctx


@pytest.mark.parametrize("make", [near_duplicates, axis_keys, flat], ids=["near_duplicates", "axis_keys", "flat"])
@pytest.mark.parametrize("params", [{}, {"budget": 64}, {"dominant": 100, "contextual": 50}])
def test_reference_reproduces_released_on_ties(make, params):
    """Duplicate patches, exact 0/1 merge cosines, all-equal dominant scores: the release's tie order."""
    x = make(seed=3)
    assert_matches(compress("visionzip", vis(x), variant="reference", **params), released(x, *resolved(params)))


@pytest.mark.parametrize("params", [{}, {"budget": 64}, {"budget": 192}])
def test_reference_with_llava_head_count(params):
    """16 heads of 8 dims (LLaVA's split, narrower): the head slices are consecutive dims."""
    x = peaked(2, 4, d=128, heads=16)
    assert_matches(compress("visionzip", vis(x), variant="reference", **params), released(x, *resolved(params)))


@pytest.mark.parametrize("dom,ctx", [(1, 30), (2, 1), (547, 30), (300, 277), (576, 1)])
def test_reference_extreme_splits(dom, ctx):
    """CLS only as dominant (topk of 0), one target, every remaining patch a target (step 1, no members)."""
    x = peaked(1, 5)
    outs = compress("visionzip", vis(x), variant="reference", dominant=dom, contextual=ctx)
    assert_matches(outs, released(x, dom, ctx))
    assert outs[0].num_tokens == dom + ctx


# ----------------------------------------------------------------------------------------- quirks


def test_head_sum_cannot_be_told_from_head_mean():
    """Summing heads = averaging them for a top-k (x/H is monotone, exact for H a power of 2): no test can
    catch that mix-up, so none is asserted beyond this identity. Likewise the merge metric's scale (raw vs
    /sqrt(dh), head mean vs head sum) cannot matter: it is L2-normalised before the cosine."""
    x = peaked(2, 6)
    for (fa, ia), (fb, ib) in zip(released(x), released(x, score="mean")):
        assert torch.equal(ia, ib) and torch.equal(fa, fb)


@pytest.mark.parametrize("score", ["renorm", "one_head"])
def test_quirk_per_head_softmax_summed_with_cls_column_dropped(score):
    """Per-head softmax over 577 keys, CLS column dropped WITHOUT renormalising, heads summed.

    renorm: each head rescaled to sum 1 over the patches (head 0 here spends ~96% on the CLS column);
    one_head: a single softmax over all D dims (the PruMerge-style reading)."""
    x = peaked(1, 7, cls_self=10.0)
    ref = released(x)
    assert differs(released(x, score=score), ref)
    assert_matches(compress("visionzip", vis(x), variant="reference"), ref)


@pytest.mark.parametrize("metric", ["full", "hidden"])
def test_quirk_merge_metric_is_head_mean_of_raw_keys(metric):
    """Cosine of the head-averaged k_proj (D/H dims), not of the full keys or of the hidden states."""
    x = peaked(1, 8)
    ref = released(x)
    assert differs(released(x, metric=metric), ref)
    assert_matches(compress("visionzip", vis(x), variant="reference"), ref)


@pytest.mark.parametrize("budget", [None, 64, 128, 192])
def test_quirk_targets_are_a_1d_stride_over_the_remaining_list(budget):
    """step = max(1, R // C) over the remaining raster list, first C: the tail after C*step gets no target."""
    x = peaked(1, 9)
    dom, ctx = split(budget) if budget else (191, 30)
    out = compress("visionzip", vis(x), variant="reference", **({"budget": budget} if budget else {}))[0]
    kept = set(out.index[1:dom].tolist())
    rest = [p for p in range(N) if p not in kept]
    step = max(1, len(rest) // ctx)
    assert (len(rest), step) == {None: (386, 12), 64: (523, 52), 128: (469, 23), 192: (415, 13)}[budget]
    assert out.index[dom:].tolist() == [rest[i] for i in range(0, len(rest), step)][:ctx]
    assert differs(released(x, dom, ctx, targets="spread"), released(x, dom, ctx))


@pytest.mark.parametrize("merge", ["cluster_mean", "members_mean"])
def test_quirk_contextual_token_is_target_plus_member_mean(merge):
    """h_target + sum(members)/max(count, 1): the target is added to its members' mean, not averaged in."""
    x = peaked(1, 10)
    ref = released(x)
    assert differs(released(x, merge=merge), ref)
    assert_matches(compress("visionzip", vis(x), variant="reference"), ref)


@pytest.mark.parametrize("variant", ["reference", "fixed"])
def test_quirk_merge_ties_go_to_the_earlier_target(variant):
    """argmax returns the first maximum: with 0/1 cosines each axis's members all join its first target."""
    x = axis_keys(seed=11)
    rank = "topk" if variant == "reference" else "stable"
    ref = released(x, rank=rank)
    assert differs(released(x, ties="later", rank=rank), ref)
    out = compress("visionzip", vis(x), variant=variant)[0]
    assert_matches([out], ref)
    targets = x[0][0, 1 + out.index[191:]]
    absorbed = (out.features[191:] != targets).any(dim=1)  # a target without members stays itself
    assert 1 <= int(absorbed.sum()) <= 3  # one target per key axis took every member


# ----------------------------------------------------------------------------------------- fixed


@pytest.mark.parametrize("make", [peaked, near_duplicates, axis_keys, flat], ids=["peaked", "near_dup", "axis", "flat"])
@pytest.mark.parametrize("params", [{}, {"budget": 128}])
def test_fixed_is_released_with_stable_ranking(make, params):
    """fixed = reference with ties to the lower patch index (merge ties already go to the earlier target)."""
    x = make(seed=12)
    assert_matches(compress("visionzip", vis(x), variant="fixed", **params), released(x, *resolved(params), rank="stable"))


def test_fixed_dominant_ties_go_to_the_lower_patch_index():
    """All-equal dominant scores: fixed keeps the lowest patches (torch.topk's tie order is its own)."""
    out = compress("visionzip", vis(flat(seed=13)), variant="fixed")[0]
    assert out.index[1:191].tolist() == list(range(190))
    h, q, k, heads = peaked(1, 13)
    hot = [7, 40, 123, 300, 500]
    k[0, 1:] = k[0, 1]  # identical patch keys -> identical scores ...
    k[0, [1 + p for p in hot]] += q[0, 0]  # ... except five patches every head's CLS query prefers
    out = compress("visionzip", vis((h, q, k, heads)), variant="fixed", budget=10)[0]
    dom = split(10)[0]
    assert out.index[1:dom].tolist() == sorted(hot + [p for p in range(N) if p not in hot][: dom - 1 - len(hot)])


@pytest.mark.parametrize("variant", ["fixed", "reference"])
def test_batch_equals_single_images(variant):
    """The release's tensor path is per image (top-k, masks, argmax by row; R and the targets depend only on
    the counts), so a mixed batch gives each image's own result in both variants."""
    xs = [peaked(seed=14), near_duplicates(seed=15), axis_keys(seed=16), flat(seed=17)]
    batch = compress("visionzip", vis(cat(*xs)), variant=variant, budget=64)
    for out, x in zip(batch, xs):
        single = compress("visionzip", vis(x), variant=variant, budget=64)[0]
        assert torch.equal(out.index, single.index) and torch.equal(out.role, single.role)
        torch.testing.assert_close(out.features, single.features, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 5, 6, 7, 10, 31, 32, 64, 100, 128, 192, 300, 575, 576])
def test_fixed_budget_is_exact(n):
    """budget=n is n tokens, CLS and contextual ones included; n <= 6 has no contextual token (floor(5n/32) = 0)."""
    dom, ctx = split(n)
    for out in compress("visionzip", vis(peaked(2, 18)), variant="fixed", budget=n):
        assert out.num_tokens == n
        assert out.role.tolist() == [ROLE_EXTRA] + [ROLE_KEPT] * (dom - 1) + [ROLE_MERGED] * ctx
        assert out.index[1:].unique().numel() == n - 1  # contextual targets are never dominant patches


def test_budget_range_and_reference_budgets():
    """Reference budgets are exact where the release runs; budget outside [1, N] or with a parameter it sets
    is a ValueError."""
    inp = vis(peaked(1, 19))
    for n in (7, 64, 576):
        assert compress("visionzip", inp, variant="reference", budget=n)[0].num_tokens == n
    for n in (1, 6):  # contextual = floor(5n/32) = 0: the release divides by zero
        with pytest.raises(ValueError):
            compress("visionzip", inp, variant="reference", budget=n)
    for variant in ("fixed", "reference"):
        for bad in (0, 577):
            with pytest.raises(ValueError, match="budget"):
                compress("visionzip", inp, variant=variant, budget=bad)
        with pytest.raises(ValueError):
            compress("visionzip", inp, variant=variant, budget=64, dominant=54)


def test_contextual_zero_fixed_only():
    """contextual=0: fixed returns CLS + the dominant patches; the release computes R // 0 -> ValueError."""
    x = peaked(1, 20)
    out = compress("visionzip", vis(x), variant="fixed", dominant=100, contextual=0)[0]
    assert out.num_tokens == 100 and out.role.tolist() == [ROLE_EXTRA] + [ROLE_KEPT] * 99
    s = _cls_attention_per_head(x[1][0], x[2][0], 4).sum(0)
    assert out.index[1:].tolist() == sorted(torch.sort(s, descending=True, stable=True).indices[:99].tolist())
    assert torch.equal(out.features, x[0][0, [0] + [1 + p for p in out.index[1:].tolist()]])
    with pytest.raises(ValueError, match="contextual"):
        compress("visionzip", vis(x), variant="reference", dominant=100, contextual=0)


@pytest.mark.parametrize("dom,ctx", [(548, 30), (577, 1), (500, 100), (1, 577), (576, 2)])
def test_more_than_577_tokens_is_a_value_error(dom, ctx):
    """The release fails on these (shape mismatch; argmax over 0 targets at dominant=577), except (576, C >= 2),
    where [1, D] + [C, D] broadcasts into C copies of the one remaining patch: a ValueError here too."""
    for variant in ("fixed", "reference"):
        with pytest.raises(ValueError):
            compress("visionzip", vis(peaked(1, 21)), variant=variant, dominant=dom, contextual=ctx)


def test_zero_metric_vectors_nan_in_reference_eps_in_fixed():
    """Patches whose head-mean key is exactly 0. Released: 0/0 = NaN cosines, and argmax takes NaN as the
    maximum, so every member joins a zero-metric target; fixed: eps in the norm, a zero vector has cosine 0."""
    h, q, k, heads = peaked(1, 22)
    blocks = k[0, 1:61].view(60, heads, -1)
    blocks[:, 1], blocks[:, 3] = -blocks[:, 0], -blocks[:, 2]  # heads [a, -a, b, -b]: the mean is exactly 0
    x = (h, q, k, heads)
    ref, fix = released(x), released(x, rank="stable", eps=1e-6)
    assert min(ref[0][1][191:].tolist()) < 60  # patches 0..59: some target has a zero metric
    assert differs(ref, fix)
    assert_matches(compress("visionzip", vis(x), variant="reference"), ref)
    out = compress("visionzip", vis(x), variant="fixed")
    assert_matches(out, fix)
    assert bool(torch.isfinite(out[0].features).all())


# ----------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("variant", ["fixed", "reference"])
def test_output_layout_roles_and_pre_projector_features(variant):
    """[CLS (-1), dominant patches ascending, contextual tokens in target order], rows of `hidden`."""
    x = peaked(1, 23)
    h = x[0][0]
    out = compress("visionzip", vis(x), variant=variant, budget=128)[0]
    dom, ctx = split(128)
    idx = out.index.tolist()
    assert idx[0] == -1 and out.role.tolist() == [ROLE_EXTRA] + [ROLE_KEPT] * (dom - 1) + [ROLE_MERGED] * ctx
    assert idx[1:dom] == sorted(idx[1:dom]) and len(set(idx[1:])) == dom - 1 + ctx
    assert idx[dom:] == sorted(idx[dom:])  # targets are remaining-list positions 0, step, ...
    assert out.features.shape == (128, h.shape[-1]) and out.features.dtype == torch.float32
    assert torch.equal(out.features[0], h[0]) and torch.equal(out.features[1:dom], h[[1 + p for p in idx[1:dom]]])
    # a contextual token is its target's row plus something (the members' mean), never a projected vector
    assert not torch.allclose(out.features[dom:], h[[1 + p for p in idx[dom:]]])
    torch.testing.assert_close(out.features, released(x, dom, ctx, rank="topk" if variant == "reference" else "stable")[0][0],
                               rtol=1e-6, atol=1e-6)
