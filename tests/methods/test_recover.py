"""Recoverable Compression: reference == the released loop (quirks included), fixed repairs, budgets.

The oracle follows the released token_recycling_with_text_in_vision_and_clustring step by step,
with scikit-learn's LocalOutlierFactor as the released code calls it.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.neighbors import LocalOutlierFactor

from lmms_tokprune.methods import (
    ROLE_EXTRA,
    ROLE_KEPT,
    ROLE_MERGED,
    ROLE_RECOVERED,
    VisionInputs,
    cls_attention,
    compress,
    outliers,
)
from lmms_tokprune.methods.merge import reference_complement
from lmms_tokprune.methods.recover import subset_fraction, text_similarity

N = 576


def make(b: int = 1, seed: int = 0, d: int = 64, dt: int = 32, hot: int = 30, boost: float = 4.0) -> VisionInputs:
    """CLIP-like states plus a text tower: CLS attends to ~`hot` patches; text matches a few others."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    h, q, last = r(b, N + 1, d), r(b, N + 1, d), r(b, N + 1, d)
    k = r(b, N + 1, d) * 0.3
    unit = q[:, :1] / q[:, :1].norm(dim=-1, keepdim=True)
    k[:, 1 : hot + 1] += unit * torch.rand(b, hot, 1, generator=g) * boost * math.sqrt(d) / q[:, :1].norm(dim=-1, keepdim=True)
    proj, text = r(dt, d), r(b, dt)
    return VisionInputs(h, q, k, last_hidden=last, text_embeds=text, visual_projection=proj)


# ----------------------------------------------------------------------------------------- oracle


def _lof_ratio(x: torch.Tensor, k: int) -> float:
    data = x.to(torch.float32).numpy().flatten()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = LocalOutlierFactor(n_neighbors=k, contamination="auto").fit_predict([[v] for v in data])
    return np.sum(y == -1) / len(y)


def released(inp: VisionInputs, key_by_position: bool = True, nc_is_hidden: bool = True) -> tuple:
    """The released function for batch 1 -> (features [M, D], info). The two flags undo the
    quirks, so a test can show that each one changes the result."""
    proj = F.linear(inp.last_hidden, inp.visual_projection)
    t = F.normalize(inp.text_embeds[:1], p=2, dim=-1)
    sim = (t @ F.normalize(proj[:, 1:], p=2, dim=-1).transpose(-2, -1) * proj.shape[-1] ** -0.5)[:, 0, :]
    feat, c = inp.hidden[:, 1:], inp.hidden.shape[-1]
    attn = F.softmax((inp.q @ inp.k.transpose(-2, -1)) * c**-0.5, dim=-1)[:, 0, 1:]
    v = torch.topk(attn, int(N * _lof_ratio(attn, 20)), dim=1).indices
    sim = sim.clone()
    sim[:, v[0]] = torch.min(sim, dim=-1).values
    t_idx = torch.topk(sim, int((N - v.shape[-1]) * _lof_ratio(sim, 20)), dim=1).indices
    first = torch.sort(torch.cat((v, t_idx), dim=-1), dim=-1).values
    rest = reference_complement(first, N)
    attn_r = torch.gather(attn, 1, rest)
    n_c = int((c if nc_is_hidden else rest.shape[1]) * _lof_ratio(attn_r, 10))
    pos = torch.topk(attn_r, n_c, dim=1).indices
    feat_r = feat[0, rest[0]]
    text_r = 50 * sim[0, rest[0]]
    keys = inp.k[0, 1:] if key_by_position else inp.k[0, 1:][rest[0]]  # the quirk: position p -> patch p
    compl = reference_complement(pos, rest.shape[1])[0]
    centres = pos[0]
    kn = F.normalize(keys, p=2, dim=-1)
    merged = []
    for i in range(n_c):
        cand = torch.cat([centres[:i], centres[i + 1 :], compl])
        score = torch.bmm(kn[centres[i]][None, None], kn[cand][None].transpose(1, 2)) + text_r[cand][None, None]
        nb = cand[torch.topk(score, 32, dim=2).indices.squeeze()]
        merged.append(torch.sum(feat_r[nb] * attn_r[0, nb].unsqueeze(-1), dim=0) + feat_r[centres[i]])
    extra = torch.sum(feat_r[compl] * attn_r[0, compl].unsqueeze(-1), dim=0)
    out = [feat[0, first[0]]] + ([torch.stack(merged), extra[None]] if n_c else [])
    info = {"v": v[0], "t": t_idx[0], "first": first[0], "rest": rest[0], "centres": rest[0, centres], "n_c": n_c}
    return torch.cat(out), info


# ----------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("seed", [2, 5])
def test_reference_reproduces_released_loop(seed):
    inp = make(1, seed, d=256)
    feats, info = released(inp)
    out = compress("recover", inp, variant="reference")[0]
    assert info["n_c"] >= 1  # the merge path is exercised
    nf = info["first"].numel()
    assert torch.equal(out.index, torch.cat([info["first"], info["centres"], torch.tensor([-1])]))
    torch.testing.assert_close(out.features, feats, rtol=1e-5, atol=1e-5)
    roles = [ROLE_KEPT if p in set(info["v"].tolist()) else ROLE_RECOVERED for p in info["first"].tolist()]
    assert out.role.tolist() == roles + [ROLE_MERGED] * info["n_c"] + [ROLE_EXTRA]
    assert set(info["t"].tolist()).isdisjoint(info["v"].tolist()) and nf == len(set(info["first"].tolist()))


def test_reference_quirks_change_the_result():
    inp = make(1, 2, d=256)
    out = compress("recover", inp, variant="reference")[0]
    by_patch, _ = released(inp, key_by_position=False)
    assert not torch.allclose(out.features, by_patch, atol=1e-4)  # keys looked up by position in R
    _, info = released(inp, nc_is_hidden=False)
    assert out.num_tokens != info["first"].numel() + info["n_c"] + 1  # N_c = hidden size, not |R|


def test_reference_min_masks_visual_tokens_before_the_text_lof():
    inp = make(1, 3)
    out = compress("recover", inp, variant="reference")[0]
    _, info = released(inp)
    sim = text_similarity(inp.last_hidden, inp.text_embeds, inp.visual_projection)
    masked = sim.clone()
    masked[0, info["v"]] = sim.min()
    n_t = int((N - info["v"].numel()) * _lof_ratio(masked, 20))
    assert n_t == info["t"].numel() and int((N - info["v"].numel()) * _lof_ratio(sim, 20)) != n_t
    assert out.role.tolist().count(ROLE_RECOVERED) == n_t


def test_reference_crash_cases_raise(monkeypatch):
    with pytest.raises(ValueError, match="batch size 1"):
        compress("recover", make(2, 4), variant="reference")
    with pytest.raises(ValueError, match="patches remain"):
        compress("recover", make(1, 2, d=256), variant="reference", num_neighbors=600)
    fractions = iter([0.9, 0.9, 0.5])  # V = 518, T = 52 -> |R| = 6 < 33, n_c = 32 > 6
    monkeypatch.setattr(outliers, "lof_fraction", lambda s, k: torch.full((s.shape[0],), next(fractions), dtype=torch.float64))
    with pytest.raises(ValueError, match="exceed"):
        compress("recover", make(1, 5), variant="reference")


# ----------------------------------------------------------------------------------------- fixed


def test_fixed_layout_and_repairs():
    inp = make(1, 6)
    out = compress("recover", inp)[0]
    a = cls_attention(inp.q, inp.k)[0]
    n_v, n_first = out.role.tolist().count(ROLE_KEPT), int((out.role <= ROLE_RECOVERED).sum())
    first, centres = out.index[:n_first], out.index[n_first:-1]
    assert torch.equal(first, torch.sort(first).values) and int(out.index[-1]) == -1
    assert set(first[out.role[:n_first] == ROLE_KEPT].tolist()) == set(torch.topk(a, n_v).indices.tolist())
    rest = torch.ones(N, dtype=torch.bool)
    rest[first] = False
    n_c = int(int(rest.sum()) * outliers.lof_fraction(a[rest][None], 10)[0])  # N_c = |R|
    assert centres.tolist() == [int(rest.nonzero()[i]) for i in torch.topk(a[rest], n_c).indices]
    # keys by patch index: centre 0 merges its 32 best by cosine + 50 * s over R
    sim = text_similarity(inp.last_hidden, inp.text_embeds, inp.visual_projection)[0]
    keys = F.normalize(inp.k[0, 1:], dim=-1)
    c0 = int(centres[0])
    score = keys @ keys[c0] + 50 * sim
    score[~rest] = float("-inf")
    score[c0] = float("-inf")
    nb = torch.topk(score, 32).indices
    h = inp.hidden[0, 1:]
    torch.testing.assert_close(out.features[n_first], h[c0] + (a[nb, None] * h[nb]).sum(0), rtol=1e-5, atol=1e-5)


def test_fixed_batch_equals_single_and_uses_each_text():
    inp = make(3, 7)
    inp.hidden[1], inp.q[1], inp.k[1], inp.last_hidden[1] = inp.hidden[0], inp.q[0], inp.k[0], inp.last_hidden[0]
    batch = compress("recover", inp)
    for b in range(3):
        one = VisionInputs(
            inp.hidden[b : b + 1],
            inp.q[b : b + 1],
            inp.k[b : b + 1],
            last_hidden=inp.last_hidden[b : b + 1],
            text_embeds=inp.text_embeds[b : b + 1],
            visual_projection=inp.visual_projection,
        )
        single = compress("recover", one)[0]
        assert torch.equal(batch[b].index, single.index) and torch.equal(batch[b].role, single.role)
        torch.testing.assert_close(batch[b].features, single.features, rtol=1e-5, atol=1e-5)
    recovered = [set(o.index[o.role == ROLE_RECOVERED].tolist()) for o in batch[:2]]
    assert recovered[0] != recovered[1]  # same image, different question -> different recovery


def test_flat_signals_keep_no_centres_and_no_extra():
    inp = make(2, 8)
    inp.q[:, 0] = 0.0  # flat attention: no visual outliers, no centres
    for variant, b in (("fixed", 2), ("reference", 1)):
        sub = VisionInputs(
            inp.hidden[:b],
            inp.q[:b],
            inp.k[:b],
            last_hidden=inp.last_hidden[:b],
            text_embeds=inp.text_embeds[:b],
            visual_projection=inp.visual_projection,
        )
        for out in compress("recover", sub, variant=variant):
            assert set(out.role.tolist()) <= {ROLE_RECOVERED}  # only text-recovered tokens, extra dropped
            assert int(out.index.min()) >= 0
    inp.text_embeds.zero_()  # flat text too: nothing at all is selected
    one = VisionInputs(
        inp.hidden[:1],
        inp.q[:1],
        inp.k[:1],
        last_hidden=inp.last_hidden[:1],
        text_embeds=inp.text_embeds[:1],
        visual_projection=inp.visual_projection,
    )
    assert compress("recover", one, variant="reference")[0].num_tokens == 0  # as released
    fixed = compress("recover", one)[0]  # fixed keeps the extra token: sum of a_j h_j over everything
    assert fixed.index.tolist() == [-1] and fixed.role.tolist() == [ROLE_EXTRA]
    a = cls_attention(one.q, one.k)[0]
    torch.testing.assert_close(fixed.features[0], (a[:, None] * one.hidden[0, 1:]).sum(0), rtol=1e-5, atol=1e-6)


def test_subset_lof_fraction_equals_separate_fits():
    g = torch.Generator().manual_seed(9)
    x = torch.softmax(torch.randn(6, N, generator=g) * 2, dim=1)
    mask = torch.rand(6, N, generator=g) < torch.tensor([[0.9], [0.5], [0.2], [0.03], [0.0], [0.7]])
    mask[3, :15] = True  # a subset of <= 2k+1 values takes the per-row path
    got = subset_fraction(x, mask, 10)
    for i in range(6):
        want = _lof_ratio(x[i][mask[i]], 10) if mask[i].sum() > 1 else 0.0
        assert float(got[i]) == want


# ----------------------------------------------------------------------------------------- params


@pytest.mark.parametrize("variant", ["fixed", "reference"])
def test_budget_is_exact(variant):
    inp = make(1 if variant == "reference" else 2, 10)
    for budget in (2, 3, 20, 64, 192, 576):
        for out in compress("recover", inp, variant=variant, budget=budget):
            assert out.num_tokens == budget and int(out.index[-1]) == -1
            assert out.index[:-1].unique().numel() == budget - 1
            nf = int((out.role <= ROLE_RECOVERED).sum())
            assert torch.equal(out.index[:nf], torch.sort(out.index[:nf]).values)
    a = cls_attention(inp.q, inp.k)[:1]
    n_v = int(N * float(outliers.lof_fraction(a, 20)[0]))
    full = compress("recover", inp, variant=variant)[0]
    n_t = full.role.tolist().count(ROLE_RECOVERED)
    assert full.role.tolist().count(ROLE_KEPT) == n_v and n_v + n_t > 12
    small = compress("recover", inp, variant=variant, budget=13)[0]  # first block shrinks to 12
    nv = -(-n_v * 12 // (n_v + n_t))
    assert small.role.tolist() == [r for r in small.role.tolist() if r != ROLE_EXTRA] + [ROLE_EXTRA]
    assert small.role.tolist().count(ROLE_KEPT) == nv and small.role.tolist().count(ROLE_RECOVERED) == 12 - nv
    roomy = compress("recover", inp, variant=variant, budget=n_v + n_t + 6)[0]  # first block kept, 5 centres
    assert roomy.role.tolist().count(ROLE_MERGED) == 5 and torch.equal(roomy.index[: n_v + n_t], full.index[: n_v + n_t])
    one = compress("recover", inp, variant=variant, budget=1)[0]  # the top patch with everything merged into it
    assert one.num_tokens == 1 and int(one.index[0]) == int(torch.argmax(a[0]))


def test_ratio_is_rejected_with_alternatives():
    with pytest.raises(ValueError, match="budget=N"):
        compress("recover", make(1, 11), ratio=0.1)


def test_text_similarity_is_cosine_over_sqrt_dim():
    inp = make(2, 12)
    proj = inp.last_hidden[:, 1:] @ inp.visual_projection.T
    want = F.cosine_similarity(proj, inp.text_embeds[:, None, :], dim=-1) / math.sqrt(proj.shape[-1])
    torch.testing.assert_close(text_similarity(inp.last_hidden, inp.text_embeds, inp.visual_projection), want, rtol=1e-5, atol=1e-6)
