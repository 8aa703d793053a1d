"""Summation-order invariance (issue #22, item 3): every pre-LLM method's `fixed` kept indices are identical when the
feature dimensions are permuted; VisPruner's `reference` (the released fp32 rounds) is not.

A permutation of the feature dimensions changes no score mathematically (checked below in float64), only the order
in which the BLAS kernels add up the D products of each dot product -- which is what differs between two CPUs or
two BLAS builds. The released VisPruner code gives different kept sets on two different CPUs; here the same effect is
produced on one machine, so the test needs no second machine.

Permutations (one fixed draw per input):
- q / k and feature_q / feature_k: one permutation of the head dimension applied inside every head, the same for q
  and k (per-head dot products unchanged; VisionZip's head-mean merge metric only has its columns permuted; the
  one-head CLS attention of PruMerge / RC / longtail treats it as any permutation of D);
- hidden: any permutation of D, applied to last_hidden and to the columns of visual_projection too (RC's projection
  of last_hidden is unchanged);
- projected: any permutation of its width;
- the text width: one permutation of patch_embeds, text_segments, text_embeds and the rows of visual_projection.

Inputs (N = 576 patches, D = 256 with 4 heads of 64, text width 64, projector width 128, to stay fast; the same
holds at CLIP-L widths, 1024 with 16 heads, 768 and 4096, checked when this test was written):
- peaked: the CLS queries are aligned with 24 salient keys (bench.compress_bench.clip_like_inputs' recipe): a long
  tail, the IQR / LOF rules find outliers;
- flat: the CLS queries are scaled by 1e-4: every attention is 1/577 within a relative 1e-4 (near-ties everywhere);
- near_duplicate: every patch (hidden, last_hidden, keys, projector outputs, patch embeddings) is a copy of one of 8
  prototypes: half exact copies, half perturbed by relative noise of 1e-7 .. 1e-8 (many rows round back to the exact
  copy in fp32, the others differ in a few ulps): exact ties and sub-1e-12 near-ties in every similarity.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmms_tokprune.catalog import METHODS, STAGE_PRE_PROJECTOR
from lmms_tokprune.methods import VisionInputs, compress
from lmms_tokprune.methods.signals import settle

N, D, HEADS, DT, DL, PROTOTYPES = 576, 256, 4, 64, 128, 8
KINDS = ("peaked", "flat", "near_duplicate")
SEED = {"peaked": 0, "flat": 1, "near_duplicate": 2}


def make(kind: str, seed: int) -> VisionInputs:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    hidden, q, k = r(1, N + 1, D), r(1, N + 1, D) * 0.1, r(1, N + 1, D)
    fq, fk = r(1, N + 1, D) * 0.1, r(1, N + 1, D)
    last = hidden + 0.1 * r(1, N + 1, D)
    projected, patch_embeds = r(1, N, DL), r(1, N, DT)
    if kind == "peaked":  # the CLS query points at 24 salient patches (both blocks)
        salient = torch.randperm(N, generator=g)[:24] + 1
        q[0, 0] = k[0, salient].sum(0) * 0.35 / math.sqrt(24)
        fq[0, 0] = fk[0, salient].sum(0) * 0.35 / math.sqrt(24)
    elif kind == "flat":
        q[0, 0] *= 1e-4
        fq[0, 0] *= 1e-4
    else:  # near_duplicate: patch j is prototype which[j], exact or times (1 + 1e-7..1e-8 noise)
        which = torch.randint(0, PROTOTYPES, (N,), generator=g)
        scale = torch.where(torch.rand(N, generator=g) < 0.5, 0.0, 10.0 ** (-7 - torch.rand(N, generator=g)))
        for t, first in ((hidden, 1), (k, 1), (fk, 1), (last, 1), (projected, 0), (patch_embeds, 0)):
            rows = t[0, first : first + PROTOTYPES].clone()[which]
            t[0, first:] = rows * (1 + scale[:, None] * r(N, rows.shape[1]))
    return VisionInputs(hidden, q, k, last_hidden=last, text_embeds=r(1, DT), visual_projection=r(DT, D) / D**0.5,
                        image_keys=[0], feature_q=fq, feature_k=fk, num_heads=HEADS, projected=projected,
                        patch_embeds=patch_embeds, text_segments=[r(2, DT)])


def permuted(inp: VisionInputs, seed: int) -> VisionInputs:
    """The same inputs with their feature dimensions permuted (module doc); every score is mathematically unchanged."""
    g = torch.Generator().manual_seed(10_000 + seed)

    def in_heads() -> torch.Tensor:  # one permutation of the head dimension, applied inside every head
        inner = torch.randperm(D // HEADS, generator=g)
        return torch.cat([h * (D // HEADS) + inner for h in range(HEADS)])

    p_qk, p_feat = in_heads(), in_heads()
    p_hidden, p_text, p_llm = torch.randperm(D, generator=g), torch.randperm(DT, generator=g), torch.randperm(DL, generator=g)

    def c(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return t[..., p].contiguous()

    return VisionInputs(c(inp.hidden, p_hidden), c(inp.q, p_qk), c(inp.k, p_qk), last_hidden=c(inp.last_hidden, p_hidden),
                        text_embeds=c(inp.text_embeds, p_text), visual_projection=inp.visual_projection[p_text][:, p_hidden].contiguous(),
                        image_keys=inp.image_keys, feature_q=c(inp.feature_q, p_feat), feature_k=c(inp.feature_k, p_feat),
                        num_heads=HEADS, projected=c(inp.projected, p_llm), patch_embeds=c(inp.patch_embeds, p_text),
                        text_segments=[c(t, p_text) for t in inp.text_segments])


_CASES: dict = {}


def case(kind: str) -> tuple[VisionInputs, VisionInputs]:
    """(inputs, permuted inputs) of one kind, built once."""
    if kind not in _CASES:
        inp = make(kind, SEED[kind])
        _CASES[kind] = (inp, permuted(inp, SEED[kind]))
    return _CASES[kind]


def kept(method: str, inp: VisionInputs, variant: str = "fixed", **params) -> list:
    return [(o.index.tolist(), o.role.tolist()) for o in compress(method, inp, variant=variant, **params)]


# Budgets 16 / 64 and the adaptive defaults (vispruner 58 @ 0.5: the odd residual only fixed runs).
SETTINGS = [
    ("none", {}), ("random", {"budget": 64}), ("spatial", {"budget": 64}),
    ("topk_cls", {"budget": 16}), ("topk_cls", {"budget": 64}),
    ("prumerge", {}), ("prumerge", {"budget": 16}), ("prumerge", {"budget": 64}), ("prumerge", {"adaptive": False}),
    ("prumerge_plus", {}), ("prumerge_plus", {"budget": 16}), ("prumerge_plus", {"budget": 64}),
    ("recover", {}), ("recover", {"budget": 16}), ("recover", {"budget": 64}),
    ("visionzip", {}), ("visionzip", {"budget": 16}), ("visionzip", {"budget": 64}),
    ("vispruner", {"budget": 16}), ("vispruner", {"budget": 64}), ("vispruner", {"budget": 64, "important_ratio": 0.75}),
    ("vispruner", {"budget": 58}),
    ("fastervlm", {"budget": 16}), ("fastervlm", {"budget": 64}),
    ("divprune", {}), ("divprune", {"budget": 16}), ("divprune", {"budget": 64}),
    ("cdpruner", {"budget": 16}), ("cdpruner", {"budget": 64}),
    ("longtail", {}), ("longtail", {"budget": 64}),
]


def test_settings_cover_every_pre_llm_method_and_longtail():
    covered = {m for m, _ in SETTINGS}
    assert covered == {m.name for m in METHODS if m.stage == STAGE_PRE_PROJECTOR} | {"longtail"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,params", SETTINGS, ids=[f"{m}-{'-'.join(f'{k}{v}' for k, v in p.items()) or 'default'}" for m, p in SETTINGS])
def test_fixed_kept_indices_do_not_depend_on_the_summation_order(kind, method, params):
    inp, perm = case(kind)
    assert kept(method, perm, **params) == kept(method, inp, **params)


def test_vispruner_reference_kept_set_depends_on_the_summation_order():
    """The test's teeth: the released fp32 rounds pick another set once the feature dims are permuted (exact and 1e-8
    ties ranked by rounding noise, one flip cascading through the re-ordered rounds). On our CPU (MKL, AVX2): peaked
    at 64 @ 0.5, flat at 16 @ 0.5 and near_duplicate at every setting; asserted for at least one, since which ties
    flip depends on the BLAS kernel."""
    changed = []
    for kind in KINDS:
        inp, perm = case(kind)
        for budget, ratio in ((16, 0.5), (64, 0.5), (64, 0.75)):
            if kept("vispruner", perm, "reference", budget=budget, important_ratio=ratio) != kept(
                    "vispruner", inp, "reference", budget=budget, important_ratio=ratio):
                changed.append((kind, budget, ratio))
    assert changed, "VisPruner reference gave the same kept set for every permuted input: the inputs lost their ties"


# ----------------------------------------------------------------------------------------- the inputs are fair and hard


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


def _head_logits(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, d = k.shape
    return (_f64(k).view(b, t, heads, d // heads) * _f64(q[:, :1]).view(b, 1, heads, d // heads)).sum(-1)


def _unit(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(_f64(t), dim=-1)


@pytest.mark.parametrize("kind", KINDS)
def test_the_permutations_change_no_score_mathematically(kind):
    """Every signal a method ranks, in plain float64, agrees between the inputs and their permutation to rounding."""
    a, b = case(kind)

    def close(x: torch.Tensor, y: torch.Tensor) -> None:
        torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-12)

    def metric(x: VisionInputs) -> torch.Tensor:  # VisionZip's merge metric: the head mean of the keys
        return _f64(x.feature_k[0, 1:]).view(N, HEADS, D // HEADS).mean(1)

    def text_score(x: VisionInputs) -> torch.Tensor:  # RC: cosine of the text and the projected last_hidden
        return _unit(_f64(x.last_hidden[0, 1:]) @ _f64(x.visual_projection).T) @ _unit(x.text_embeds[0])

    close(_head_logits(a.q, a.k, 1), _head_logits(b.q, b.k, 1))  # one-head CLS logits (PruMerge, RC, longtail)
    close(_head_logits(a.feature_q, a.feature_k, HEADS), _head_logits(b.feature_q, b.feature_k, HEADS))
    close(_unit(metric(a)) @ _unit(metric(a)).T, _unit(metric(b)) @ _unit(metric(b)).T)
    for name in ("hidden", "k", "projected", "patch_embeds"):  # VisPruner / PruMerge / DivPrune / CDPruner cosines
        x, y = _unit(getattr(a, name)[0]), _unit(getattr(b, name)[0])
        close(x @ x.T, y @ y.T)
    close(_unit(a.patch_embeds[0]) @ _unit(a.text_segments[0]).T, _unit(b.patch_embeds[0]) @ _unit(b.text_segments[0]).T)
    close(text_score(a), text_score(b))


def test_the_inputs_hold_ties_and_near_ties():
    """near_duplicate: rows with an exact duplicate and rows within 1e-6 (relative) of another; flat: every attention
    is 1/577 within a relative 1e-4."""
    for name in ("hidden", "k", "projected"):
        rows = _f64(getattr(case("near_duplicate")[0], name)[0, -N:])
        dist = torch.cdist(rows, rows, compute_mode="donot_use_mm_for_euclid_dist").fill_diagonal_(float("inf"))
        nearest = dist.min(dim=1).values / rows.norm(dim=1)
        assert int((nearest == 0).sum()) > 100 and int(((nearest > 0) & (nearest < 1e-6)).sum()) > 100, name
    flat = case("flat")[0]
    attn = torch.softmax(_head_logits(flat.q, flat.k, 1)[0, :, 0] / math.sqrt(D), dim=0)[1:]
    assert float(attn.max() / attn.min()) < 1 + 1e-4


def test_settle_rounds_to_a_fixed_grid():
    """settle: multiples of 2^-35, idempotent, exact ties stay ties, noise far below the grid disappears."""
    x = torch.randn(1000, dtype=torch.float64)
    s = settle(x)
    assert bool(((s * 2.0**35) == torch.round(s * 2.0**35)).all()) and torch.equal(settle(s), s)
    assert bool(((s - x).abs() <= 2.0**-36).all())
    noisy = torch.tensor([1.0 - 2e-16, 1.0 + 4e-16, 1.0 - 5e-15], dtype=torch.float64)
    assert settle(noisy).tolist() == [1.0, 1.0, 1.0]
    inf = torch.tensor([float("inf"), -float("inf")], dtype=torch.float64)
    assert torch.equal(settle(inf), inf)
    # one cosine summed in two orders: the float64 bits may differ, the settled ones do not
    g = torch.Generator().manual_seed(3)
    v = torch.randn(64, 1024, generator=g)
    w = v * (1 + 1e-7 * torch.randn(64, 1024, generator=g))
    p = torch.randperm(1024, generator=g)
    assert torch.equal(settle((_unit(v) * _unit(w)).sum(-1)), settle((_unit(v[:, p]) * _unit(w[:, p])).sum(-1)))

