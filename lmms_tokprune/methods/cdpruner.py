"""CDPruner (Zhang et al., NeurIPS'25; released code: Theia-4869/CDPruner @ 9541616, llava/model/llava_arch.py).

A conditional DPP on the projector outputs, conditioned on the question, n tokens:
1. rho_bj = mean over the question's 77-token segments s of ( -cos(patch_embeds_bj, text_s) ) -- the NEGATIVE
   cosine (the maintainer calls it deliberate, issues #14 / #19) -- then rho = (rho - min + 1e-6) / (max - min).
   patch_embeds = CLIP visual_projection(post_layernorm(penultimate patches)).
2. S = Gram matrix of the L2-normalised projector outputs (normalised in their dtype, then fp32); K_ij = rho_i S_ij rho_j.
3. Fast greedy MAP (Chen et al. 2018), n steps: d = diag(K); step t: j = argmax d (ties: the lowest index);
   e_i = (K_ji - sum_{u<t} c_uj c_ui) / sqrt(d_j); c_t = e; d = d - e^2; d_j = -inf.
4. Kept = the picks in ascending patch order; features = hidden rows.

Variants: `reference` = the release: min and max over the whole batch tensor, the text of sample 0, no eps (one image
per call, or with `release_batch` the units of one released call: a LLaVA-NeXT image's base + crops, min-maxed together
as its release does); past
the kernel's numerical rank d_j <= 0, sqrt gives NaN, NaN spreads and argmax re-picks, so fewer than n distinct
tokens come out (reproduced, the actual count reported). More than one image -> ValueError: the released vision
step min-maxes over the batch and uses sample 0's text, then its pipeline fails at sample 1, so no batched
result exists to reproduce. `fixed` = min-max per image, each sample's own text, eps in the norms, and exactly
n tokens: once the best remaining d is <= 1e-10 or not finite, the remaining slots take the unpicked tokens of
highest relevance (ties to the lowest index). The greedy steps run over the whole batch at once. fixed computes
relevance, kernel and greedy steps in float64 from settled cosines (signals.settle): the picks do not depend on the
BLAS summation order, and past the kernel's rank the gains fall to ~1e-16 (float64 noise) instead of fp32's ~1e-7,
so the 1e-10 floor marks the rank.

Units (fixed; methods/units.py): with valid patches the relevance is min-maxed over the unit's valid patches and the
invalid ones start out as picked (never a DPP step, never a fill). budgets[b] replaces `budget` unit by unit.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch.nn.utils.rnn import pad_sequence

from . import units
from .baselines import gather_sorted
from .inputs import CompressedImage, VisionInputs
from .registry import REQUIRED_BUDGET, MethodSpec, register
from .signals import FIXED_DTYPE, cosine_cross, cosine_gram

RANK_FLOOR = 1e-10  # fixed: a gain at or below this is past the kernel's rank


def relevance(inp: VisionInputs, variant: str) -> torch.Tensor:
    """[B, N] rho: the mean negative cosine to the question's segments, min-maxed (over the batch in reference).

    The samples' segment lists are ragged (one row per 77 tokens of each question): they are zero-padded into one
    [B, S, Dt] tensor and averaged over each sample's own rows, so the whole batch is one matmul.
    """
    texts = inp.text_segments[:1] * inp.batch_size if variant == "reference" else inp.text_segments
    padded = pad_sequence(texts, batch_first=True).float()  # [B, S, Dt], zero rows past each sample's segments
    if variant == "reference":  # one sample (no padding), no eps, fp32
        patches = inp.patch_embeds.float()
        patches = patches / patches.norm(dim=-1, keepdim=True)
        padded = padded / padded.norm(dim=-1, keepdim=True)
        cos = torch.bmm(patches, padded.transpose(1, 2))
    else:  # settled float64 cosines; F.normalize's eps leaves the zero rows zero
        cos = cosine_cross(inp.patch_embeds, padded)
    counts = torch.tensor([t.shape[0] for t in texts], dtype=cos.dtype, device=cos.device)
    rho = -cos.sum(dim=-1) / counts[:, None]  # padded rows add exactly 0
    if variant == "reference":
        lo, hi = rho.min(), rho.max()
    elif inp.valid is None:
        lo, hi = rho.min(dim=1, keepdim=True).values, rho.max(dim=1, keepdim=True).values
    else:  # over each unit's valid patches (the invalid ones get values outside [0, 1]; they are never picked)
        lo = rho.masked_fill(~inp.valid, float("inf")).min(dim=1, keepdim=True).values
        hi = rho.masked_fill(~inp.valid, float("-inf")).max(dim=1, keepdim=True).values
    return (rho - lo + 1e-6) / (hi - lo if variant == "reference" else (hi - lo).clamp_min(1e-12))


def dpp_kernel(inp: VisionInputs, rho: torch.Tensor, variant: str) -> torch.Tensor:
    """[B, N, N] K = rho_i S_ij rho_j, S the cosine Gram matrix of the projector outputs."""
    p = inp.projected
    if variant != "reference":
        return cosine_gram(p, dtype=FIXED_DTYPE).mul_(rho[:, :, None]).mul_(rho[:, None, :])
    unit = (p / p.norm(dim=-1, keepdim=True)).float()  # normalised in P's dtype, as released
    return rho[:, :, None] * torch.bmm(unit, unit.transpose(1, 2)) * rho[:, None, :]


def greedy_map(kernel: torch.Tensor, count: int, fill: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fast greedy MAP over [B, N, N] kernels, all images at once -> [B, count] picks.

    fill [B, N] (fixed): when the best remaining gain is <= RANK_FLOOR or not finite, the pick is the unpicked
    token of highest `fill` instead (ties: the lowest index); None (reference): the released arithmetic, NaN included.
    valid [B, N] (fixed): the invalid tokens start out as picked (gain -inf, never a fill), so no step picks one.
    """
    b, n, _ = kernel.shape
    rows = torch.arange(b, device=kernel.device)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    c = torch.zeros(b, count, n, dtype=kernel.dtype, device=kernel.device)
    picked = torch.zeros(b, n, dtype=torch.bool, device=kernel.device) if valid is None else ~valid
    if valid is not None:
        gains = gains.masked_fill(picked, float("-inf"))
    out = []
    spent = torch.zeros(b, dtype=torch.bool, device=kernel.device)
    for t in range(count):
        j = torch.argmax(gains, dim=1)
        if fill is not None:
            best = gains[rows, j]
            spent = spent | ~torch.isfinite(best) | (best <= RANK_FLOOR)
            if bool(spent.any()):
                backup = torch.argmax(fill.masked_fill(picked, float("-inf")), dim=1)
                j = torch.where(spent, backup, j)
        out.append(j)
        picked[rows, j] = True
        e = (kernel[rows, j] - torch.einsum("bu,bun->bn", c[rows, :t, j], c[:, :t])) / torch.sqrt(gains[rows, j])[:, None]
        if fill is not None:  # a spent image keeps no DPP state: the rest of its slots come from `fill`
            e = torch.where(spent[:, None], torch.zeros_like(e), e)
        c[:, t] = e
        gains = gains - e * e
        gains[rows, j] = float("-inf")
        if fill is not None:
            gains = gains.masked_fill(picked, float("-inf"))
    return torch.stack(out, dim=1)


def _cdpruner(inp: VisionInputs, variant: str, budget: Optional[int] = None) -> List[CompressedImage]:
    if variant == "reference" and inp.batch_size > 1 and not inp.release_batch:
        raise ValueError("cdpruner (reference): the released code min-maxes over the batch, uses sample 0's text and then fails at "
                         "sample 1, so it has no batched result; run one image at a time or use variant=fixed")
    rho = relevance(inp, variant)
    kernel = dpp_kernel(inp, rho, variant)
    if variant == "reference":  # per unit its distinct picks (the release's index mask), ascending
        picks = [torch.unique(row) for row in greedy_map(kernel, budget)]
        width = max(int(p.numel()) for p in picks)
        keep = torch.stack([torch.nn.functional.pad(p, (0, width - int(p.numel()))) for p in picks])
        return gather_sorted(inp, keep, [int(p.numel()) for p in picks])
    budgets = units.unit_budgets(inp, budget)
    return gather_sorted(inp, greedy_map(kernel, max(budgets), fill=rho, valid=inp.valid), budgets)


register(
    MethodSpec(
        "cdpruner",
        _cdpruner,
        "CDPruner: conditional DPP (question relevance x projector-output similarity), fast greedy MAP, spatial order",
        params={"budget": REQUIRED_BUDGET},
        needs=frozenset({"projected", "patch_embeds", "text_segments"}),
        reference_batch_one=True,
        reference_short=True,
        unit_aware=True,
    )
)
